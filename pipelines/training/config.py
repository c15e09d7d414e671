"""A training run's configuration (train.py's flags) and the checks made before any work."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.frequency import narrow_band_sizes, scaled_radius
from utils.device import AMP_CHOICES
from utils.distributed import smallest_replica_batch
from utils.errors import FSANetError, RunError

log = logging.getLogger(__name__)

class TrainingError(FSANetError):
    """A training setup problem; the message names the cause and the fix."""


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; nothing of the broken state was saved."""


class OutOfMemoryError(RunError):
    """The GPU ran out of memory; the message names the batch size and the options that lower the peak."""


def out_of_memory_error(cfg: TrainConfig, device: object, replicas: int, last: Path) -> OutOfMemoryError:
    """The one-line out-of-memory error: the batch that did not fit, the two options, the kept checkpoint."""
    kept = f"the last checkpoint {last} is kept" if last.exists() else "no checkpoint was saved yet"
    per_gpu = f" ({-(-cfg.batchsize // replicas)} per GPU)" if replicas > 1 else ""
    half = cfg.batchsize // 2
    smaller = (f"--batchsize {half} --accum_steps {2 * cfg.accum_steps} (the same effective batch) and/or "
               if smallest_replica_batch(half, replicas) >= 2 else "")
    largest = max(scaled_size(cfg.trainsize, r) for r in cfg.rates)
    return OutOfMemoryError(
        f"out of GPU memory on {device} at --batchsize {cfg.batchsize}{per_gpu}, --trainsize {cfg.trainsize} "
        f"(largest scale {largest}); lower the peak with {smaller}--grad_checkpointing; {kept}")


@dataclass
class TrainConfig:
    """Every training option; field names are train.py's flag names (the release's where it had one)."""

    train_path: str = "data/DIS5K/DIS-TR"
    train_save: str = "FSANet"
    save_root: str = "checkpoints"
    epoch: int = 200
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batchsize: int = 8
    accum_steps: int = 1
    trainsize: int = 736
    clip: float = 0.5
    rates: tuple[float, ...] = (0.75, 1.0, 1.25)
    weighted_bce: bool = False
    freq_encoder: str = "resnet50"
    drop_path_rate: float = 0.1
    radius: float = 100.0
    pre_model: str | None = None
    pvt_path: str | None = "checkpoints/pvt_v2_b2.pth"
    resnet_path: str | None = "checkpoints/resnet50-0676ba61.pth"
    res2net_path: str | None = "checkpoints/res2net50_v1b_26w_4s-3cf99910.pth"
    no_pretrained: bool = False
    device: str = "auto"
    backend: str = "auto"
    num_workers: int = 4
    seed: int = 0
    hflip: bool = False
    fast_decode: bool = False
    cache_dir: str | None = None
    on_bad: str = "skip"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    save_every: int = 5
    save_iters: int = 0
    val_path: str | None = None
    val_every: int = 1
    val_size: int = 992
    stop_after_epoch: int | None = None
    max_pixels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint's "args" (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def check_config(cfg: TrainConfig) -> None:
    """Reject option values the recipe cannot run with, naming the flag."""
    problems = []
    if cfg.epoch < 1:
        problems.append(f"--epoch {cfg.epoch}: must be at least 1")
    if not cfg.lr > 0:
        problems.append(f"--lr {cfg.lr}: must be positive (release: 2e-4)")
    if not cfg.weight_decay >= 0:
        problems.append(f"--weight_decay {cfg.weight_decay}: must be 0 or more (release: 1e-4)")
    if not cfg.clip > 0:
        problems.append(f"--clip {cfg.clip}: must be positive; every gradient element is clamped to "
                        "[-clip, clip], so 0 zeroes all gradients (release: 0.5)")
    if cfg.max_pixels is not None and cfg.max_pixels < 1:
        problems.append(f"--max_pixels {cfg.max_pixels}: must be positive")
    if cfg.batchsize < 2:
        problems.append(f"--batchsize {cfg.batchsize}: must be at least 2 (BatchNorm cannot train on one image)")
    if cfg.accum_steps < 1:
        problems.append(f"--accum_steps {cfg.accum_steps}: must be at least 1 (1: no accumulation)")
    if cfg.trainsize < 32:
        problems.append(f"--trainsize {cfg.trainsize}: must be at least 32")
    if any(scaled_size(cfg.trainsize, r) < 32 for r in cfg.rates) or not cfg.rates:
        problems.append(f"--rates {cfg.rates}: every trainsize*rate must round to at least 32")
    if cfg.val_size % 32 or cfg.val_size < 32:
        problems.append(f"--val_size {cfg.val_size}: must be a positive multiple of 32")
    if not 0 <= cfg.radius < float("inf"):
        problems.append(f"--radius {cfg.radius}: must be 0 or more (release: 100)")
    if cfg.amp not in AMP_CHOICES:
        problems.append(f"--amp {cfg.amp}: choose {', '.join(AMP_CHOICES)}")
    if cfg.on_bad not in ("skip", "error"):
        problems.append(f"--on_bad {cfg.on_bad}: choose skip or error")
    if cfg.stop_after_epoch is not None and cfg.stop_after_epoch < 1:
        problems.append(f"--stop_after_epoch {cfg.stop_after_epoch}: must be at least 1")
    if min(cfg.save_every, cfg.save_iters, cfg.val_every, cfg.num_workers) < 0:
        problems.append("--save_every, --save_iters, --val_every and --num_workers must be 0 or more")
    if problems:
        raise TrainingError("; ".join(problems))
    if cfg.epoch == 1:
        log.warning("--epoch 1: the poly schedule lr*(1-e/E)^0.9 gives epoch 1 of 1 lr 0, so nothing is learned; "
                    "use --epoch 2 or more")


def check_pretrained(cfg: TrainConfig) -> dict[str, str]:
    """The encoder weight files to load, or an error naming each missing one (unless --no_pretrained)."""
    if cfg.no_pretrained or cfg.pre_model:
        return {}
    wanted = {"pvt_path": cfg.pvt_path,
              "resnet_path" if cfg.freq_encoder == "resnet50" else "res2net_path":
                  cfg.resnet_path if cfg.freq_encoder == "resnet50" else cfg.res2net_path}
    missing = [f"--{flag} {path}" if path else f"--{flag} (not given)"
               for flag, path in wanted.items() if not path or not Path(path).is_file()]
    if missing:
        raise TrainingError(f"pretrained encoder weights not found: {', '.join(missing)}. Pass the ImageNet "
                            "weight files (see README), or --no_pretrained to train from random weights.")
    return {k: str(v) for k, v in wanted.items()}


def highpass_warning(cfg: TrainConfig, radius: float) -> str | None:
    """Why the frequency branch would see an (almost) empty image at this run's sizes, and the fix; else None."""
    sizes = {f"trainsize*{rate:g}": scaled_size(cfg.trainsize, rate) for rate in cfg.rates}
    if cfg.val_path and cfg.val_every:
        sizes["val_size"] = cfg.val_size
    narrow = narrow_band_sizes(sizes, radius)
    if not narrow:
        return None
    wanted = f"{scaled_radius(cfg.trainsize):g} (100 * trainsize / 992, the release's share of the spectrum)"
    fix = (f"start from weights whose frequency.radius is about {wanted}" if cfg.pre_model
           else f"pass --radius {wanted}")
    source = f"from --pre_model {cfg.pre_model}" if cfg.pre_model else "--radius"
    return (f"frequency radius {radius:g} ({source}) leaves the high-pass band empty or nearly so at "
            f"{', '.join(narrow)}: the frequency encoder sees an (almost) constant image; {fix}, "
            "or train at larger sizes")


def scaled_size(trainsize: int, rate: float) -> int:
    """The release's multi-scale size: round(trainsize * rate / 32) * 32."""
    return int(round(trainsize * rate / 32) * 32)


