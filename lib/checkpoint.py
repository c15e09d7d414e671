"""Checkpoint reading: the release's `FSANet-100.pth`, our own training files and bare state dicts.

Files are read with `weights_only=True`, so a checkpoint can never run code. The release's key
layout reaches ours only through `convert_release_state_dict`.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from utils.errors import FSANetError

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# (release pattern, our replacement), applied in order to every key of the release's layout.
RELEASE_KEY_RULES: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"^resnet_f\.", "freq_encoder."),
    (r"^se(\d)\.", lambda m: f"mf.{int(m.group(1)) - 1}.se."),
    (r"^conv_(\d)\.", lambda m: f"mf.{int(m.group(1)) - 1}.conv."),
    (r"^upsample(\d+_\d)\.", r"csfm.up\1."),
    (r"^down(\d+_\d)\.", r"csfm.down\1."),
    (r"^rfb(\d)_after\.", lambda m: f"hcf.{int(m.group(1)) - 1}."),
    (r"^(conv_up\d|conv2_1)\.", r"head.\1."),
]


# What the loaders read: a path, the file's bytes (already read and hashed), or an open binary file.
CheckpointSource = str | os.PathLike | bytes | BinaryIO


class CheckpointError(FSANetError):
    """A checkpoint or weights file that cannot be used; the message names the file and the fix."""


# A PyTorch checkpoint is a zip archive (torch >= 1.6) or, in the legacy format, a pickle (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def _not_a_checkpoint(path: Path) -> str | None:
    """Why `path` is not a PyTorch checkpoint at all (a folder, empty, text, another format), or None."""
    if path.is_dir():
        return f"{path} is a folder, not a checkpoint file; pass the .pth file inside it"
    if not path.exists():
        return f"checkpoint not found: {path}"
    with open(path, "rb") as f:
        return _not_a_checkpoint_head(f.read(512), str(path))


def _not_a_checkpoint_head(head: bytes, name: str) -> str | None:
    """Why a file starting with `head` is not a PyTorch checkpoint (empty, text, another format), or None."""
    if not head:
        return f"{name} is empty (0 bytes), not a PyTorch checkpoint; the save was probably interrupted"
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return None
    kind = "a text file" if _looks_like_text(head) else f"binary data starting with {head[:8]!r}"
    return (f"{name} is {kind}, not a PyTorch checkpoint (a .pth file saved by torch.save); "
            "check the --pth_path / --pre_model path")


def _looks_like_text(head: bytes) -> bool:
    """True when the first bytes of a file decode as printable UTF-8 text."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def torch_load_weights(source: CheckpointSource, name: str | None = None) -> object:
    """torch.load with weights_only=True of a path, a checkpoint's bytes or an open binary file; every failure
    becomes a CheckpointError naming `name` (default: the path).

    Bytes let a caller load exactly the bytes it hashed (utils.cache_keys.read_hashed): a file rewritten
    between the digest and the load cannot slip other weights under the digest's name.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    try:
        if isinstance(source, (str, os.PathLike)):
            source = Path(source)
            problem = _not_a_checkpoint(source)
        else:
            problem = _not_a_checkpoint_head(source.read(512), name)
            source.seek(0)
    except OSError as err:
        raise CheckpointError(f"{name}: cannot read the checkpoint ({err.strerror or err})") from None
    if problem:
        raise CheckpointError(problem)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{name} holds Python objects other than tensors and plain containers; refusing to "
                f"unpickle it (weights_only=True). Re-save it as a plain state dict."
            ) from None
        raise CheckpointError(f"{name} is not a PyTorch checkpoint ({err})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError, struct.error) as err:
        reason = str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__
        if isinstance(err, (KeyError, IndexError, EOFError, struct.error)) or reason.isdigit() or len(reason) < 8:
            reason = "its data ends early or is damaged"
        raise CheckpointError(f"{name} is a truncated or damaged PyTorch checkpoint ({reason}); "
                              "copy or save it again") from None


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes from every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def read_state_dict(source: CheckpointSource, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (a path, its bytes or an open file; release layout, our layout or a bare
    state dict), unprefixed; errors name `name` (default: the path)."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    return extract_state_dict(torch_load_weights(source, name), name)


def checkpoint_radius(path: str | os.PathLike) -> float | None:
    """The frequency filter radius a checkpoint holds (None if it has none), read without loading the rest.

    Memory-mapped, so an exported runtime can check its input size against the radius for the cost of the
    file's index, not its 440 MB of weights.
    """
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mapped; read them the normal way
        obj = torch_load_weights(path)
    radius = extract_state_dict(obj, path).get("frequency.radius")
    return None if radius is None else float(radius.float().reshape(-1)[0])


def extract_state_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a loaded checkpoint (`model` / `state_dict` entry or bare), unprefixed."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path} holds no model weights (expected a state dict or a dict with 'model'; "
                              f"found {found})")
    return strip_wrapper_prefixes(obj)


def is_release_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the authors' key layout (`backbone.*`, `rfb1_after.*`, ...)."""
    return any(k.startswith(("backbone.", "rfb1_after.", "resnet_f.")) for k in state)


def convert_release_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the release's keys onto this implementation's modules (the one place the layouts differ)."""
    from timm.models.pvt_v2 import checkpoint_filter_fn

    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = {f"rgb_encoder.body.{k}": v for k, v in checkpoint_filter_fn(backbone, None).items()}
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        for pattern, replacement in RELEASE_KEY_RULES:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        out[key] = value
    return out


def describe_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """'' when `state` fits `own` key for key and shape for shape, else the keys that do not."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or wrongly shaped key."""
    own = model.state_dict()
    problems = describe_mismatch(own, state)
    if problems:
        differing = {k for k in own.keys() ^ state.keys()} | {k for k in state if k in own and
                                                               state[k].shape != own[k].shape}
        hint = ""
        if differing and all(k.startswith("freq_encoder.") for k in differing):
            hint = " (only the frequency encoder differs: pass the --freq_encoder it was trained with, resnet50 " \
                   "or res2net50)"
        raise CheckpointError(f"{source} does not match this FSANet architecture{hint}; {problems}")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load an unprefixed state dict of either layout into `model` strictly; errors name `source`."""
    if is_release_layout(state):
        state = convert_release_state_dict(state)
    target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    check_compatible(target, state, source)
    target.load_state_dict(state, strict=True)
    log.info("loaded weights from %s", source)
    return model


def load_checkpoint(model: nn.Module, source: CheckpointSource, name: str | None = None) -> nn.Module:
    """Load weights into `model` strictly from a checkpoint (a path, its bytes or an open binary file) of any
    supported layout; errors name `name` (default: the path); returns the model."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "checkpoint")
    return load_weights(model, read_state_dict(source, name), name)


def fsanet_from_checkpoint(source: CheckpointSource, freq_encoder: str = "resnet50",
                           name: str | None = None) -> nn.Module:
    """FSANet holding a checkpoint's weights, built without the random initialisation they replace.

    Every parameter and buffer is in the state dict and loading is strict, so nothing is left uninitialised;
    drawing 109 M random numbers first would cost half a second per start.
    """
    from lib.fsanet import FSANet  # here: lib.checkpoint alone does not import timm

    return load_checkpoint(FSANet.empty(freq_encoder=freq_encoder), source, name)
