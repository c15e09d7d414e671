"""Training checkpoints and resume: the file format, what it holds, and how a run picks up from it.

`last.pth` holds the full state (weights, AdaXW moments, epoch, batch and step counters, best maxF,
GradScaler, every rank's RNG states, the run's options), so a run resumed from it ends with the same
weights as one that never stopped. Other files given to --pre_model (the release's FSANet-100.pth, bare
state dicts) only initialise the weights.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lib.checkpoint import extract_state_dict, load_weights, strip_wrapper_prefixes
from utils.atomic import atomic_path, atomic_torch_save, os_reason
from utils.errors import FSANetError, RunError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fsanet-train-v1"
# Settings that change the data order, the schedule or the arithmetic (the pixels decoded, the drop-path
# rate, the images trained on); resuming with other values is allowed but warned, one line per flag.
RESUME_SENSITIVE = ("epoch", "lr", "batchsize", "trainsize", "rates", "seed", "clip", "weight_decay",
                    "weighted_bce", "hflip", "amp", "accum_steps", "fast_decode", "drop_path_rate", "train_path")


@dataclass
class RunState:
    """Where the run is: epochs completed, loader batches and samples (this rank's) done in the next epoch,
    optimiser steps, best maxF. `samples` is the resume position: it holds under another --batchsize."""

    epoch: int = 0
    iteration: int = 0
    samples: int = 0
    step: int = 0
    best_maxf: float = -1.0


@dataclass
class Resumed:
    """What a --pre_model file gave the run: its state, and this rank's RNG state to restore (None: weights only)."""

    state: RunState
    rng: dict[str, Any] | None


def training_checkpoint(model: nn.Module, optimizer: Optimizer, scaler: torch.amp.GradScaler, state: RunState,
                        rng_ranks: Sequence[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
    """The full training state as saved in last.pth (format fsanet-train-v1)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "iteration": state.iteration,
        "samples": state.samples,
        "step": state.step,
        "best_maxf": state.best_maxf,
        "scaler": scaler.state_dict(),
        "rng": rng_ranks[0],
        "rng_ranks": list(rng_ranks),
        "world_size": len(rng_ranks),
        "args": args,
    }


class CheckpointSaveError(RunError):
    """A checkpoint could not be written (full disk, folder gone); the previous file of that name is kept."""


def _writer_reason(message: str) -> str:
    """The reason in a RuntimeError of PyTorch's zip writer: a short write ("unexpected pos") is a full disk."""
    if "unexpected pos" in message:
        return "no space left on device (PyTorch's writer stopped short)"
    return message.splitlines()[0] if message else "RuntimeError"


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: a crash or failed write keeps the previous file whole, no temp file left."""
    try:
        atomic_torch_save(checkpoint, path)
    except (OSError, RuntimeError) as e:
        reason = os_reason(e) if isinstance(e, OSError) else _writer_reason(str(e))
        raise _save_error(path, checkpoint.get("epoch"), reason) from None


def link_checkpoint(source: Path, path: Path, epoch: int) -> None:
    """Make `path` the checkpoint `source` is now, atomically and without writing it again: a hard link (a copy
    where the filesystem has none). `source` is only ever replaced by a rename, so `path` keeps this version."""
    try:
        with atomic_path(path) as tmp:
            tmp.unlink()
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
    except OSError as e:
        raise _save_error(path, epoch, os_reason(e)) from None


def _save_error(path: Path, epoch: object, reason: str) -> CheckpointSaveError:
    """The one-line error of a failed save: the file, why, what is kept and how to go on."""
    kept = f"the previous {path.name} is kept" if path.is_file() else "no earlier copy exists"
    last = path.parent / "last.pth"
    then = (f"then resume with --pre_model {last}" if last.is_file()
            else "then train again (no checkpoint of this run exists to resume from)")
    return CheckpointSaveError(
        f"{path}: could not save the checkpoint after epoch {epoch} ({reason}); {kept}. "
        f"Free space or choose another --save_root, {then}"
    )


class NotEnoughSpaceError(FSANetError):
    """--save_root's filesystem lacks the space one checkpoint needs (exit 2: refused before the first epoch)."""


def checkpoint_bytes(model: nn.Module, optimizer: Optimizer) -> int:
    """About what one checkpoint of this run takes on disk: the model's state plus AdaXW's two moments of every
    trainable parameter (or the moments the optimiser holds already, when resumed)."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    held = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
    # 2% for what else the file holds (counters, every rank's RNG states, the options, the zip and pickle framing).
    return int(1.02 * (model_bytes + max(moments, held)))


def check_free_space(folder: Path, needed: int) -> None:
    """NotEnoughSpaceError naming --save_root and both sizes when `folder`'s filesystem has less than `needed`
    bytes free (a checkpoint is written beside the previous one, then renamed over it)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise NotEnoughSpaceError(
            f"--save_root: {folder} has {free / 1e9:.2f} GB free on its filesystem and a checkpoint of this run "
            f"needs about {needed / 1e9:.2f} GB (weights and AdaXW state); free space or choose another "
            "--save_root before training, so no epoch is lost to a failed save")


def is_training_checkpoint(ckpt: Any) -> bool:
    """True for our own full-state checkpoints (resumable), False for weights-only files."""
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT and "optimizer" in ckpt


def resume(ckpt: Any, path: Path, model: nn.Module, optimizer: Optimizer, scaler: torch.amp.GradScaler,
           args: dict[str, Any], rank: int, world_size: int) -> Resumed:
    """Load --pre_model (`ckpt`, read from `path`): our checkpoint resumes fully, any other weights file
    initialises the weights only."""
    if not is_training_checkpoint(ckpt):
        load_weights(model, extract_state_dict(ckpt, path), str(path))
        log.info("--pre_model %s: weights only (no training state of this trainer); the run starts at epoch 1", path)
        return Resumed(RunState(), None)
    load_weights(model, strip_wrapper_prefixes(ckpt["model"]), str(path))
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    iteration = int(ckpt.get("iteration", 0))
    # Checkpoints written before "samples" was saved counted the position in batches of their --batchsize.
    samples = int(ckpt.get("samples", iteration * int(ckpt.get("args", {}).get("batchsize", args["batchsize"]))))
    state = RunState(epoch=int(ckpt["epoch"]), iteration=iteration, samples=samples, step=int(ckpt["step"]),
                     best_maxf=float(ckpt.get("best_maxf", -1.0)))
    warn_changed_settings(ckpt, args, world_size)
    log.info("resuming %s: %d epoch(s) and %d batch(es) (%d samples per process) done, %d optimiser steps", path,
             state.epoch, state.iteration, state.samples, state.step)
    return Resumed(state, rank_rng(ckpt, rank))


def warn_changed_settings(ckpt: dict[str, Any], args: dict[str, Any], world_size: int) -> None:
    """Warn when the resumed run's recipe differs from the one it was saved with."""
    saved = ckpt.get("args", {})
    for key in RESUME_SENSITIVE:
        if key in saved and _differs(key, saved[key], args[key]):
            log.warning("resuming with --%s %s (the checkpoint was trained with %s): the run will not "
                        "match an uninterrupted one", key, args[key], saved[key])
    if ckpt.get("world_size", 1) != world_size:
        log.warning("resuming with %d process(es), saved with %d: the data order changes",
                    world_size, ckpt.get("world_size", 1))


def _differs(key: str, saved: Any, now: Any) -> bool:
    """Whether a saved recipe value differs from this run's; the training folder by where it leads, not by how it
    was typed (relative or absolute, through a symbolic link; a saved relative path is read from here)."""
    if key == "train_path" and isinstance(saved, str) and isinstance(now, str):
        return os.path.realpath(saved) != os.path.realpath(now)
    return saved != now


def rank_rng(ckpt: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """This rank's saved RNG state, or None for a rank the checkpoint has none of (seeded from --seed + rank).

    Handing a new rank another rank's state would make it draw the same drop-path masks as that rank.
    """
    ranks = ckpt.get("rng_ranks") or [ckpt.get("rng")]
    if rank < len(ranks) and ranks[rank] is not None:
        return ranks[rank]
    log.warning("rank %d: the checkpoint holds no RNG state for it (saved with %d process(es)); "
                "seeding it from --seed + rank instead", rank, len(ranks))
    return None
