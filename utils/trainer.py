"""The training loop: the release's multi-scale recipe, checkpoints that resume exactly, DP/DDP, AMP.

One `Trainer` owns everything train.py runs: data, model, AdaXW, the poly schedule, the three
optimiser steps per batch (rates 0.75/1/1.25), the elementwise gradient clamp, mixed precision,
logging (tqdm, TensorBoard, `logging`), validation and checkpoints.

Resuming is exact: a run stopped (even killed) after any saved epoch, or batch with --save_iters, and
resumed from its `last.pth` ends with the same weights as one that never stopped, because the data order
is a function of (seed, epoch) and the checkpoint holds the optimiser, schedule position, GradScaler and
every RNG (per rank under DDP). One exception: with --hflip and DataLoader workers, a mid-epoch resume
draws other flips for the rest of that epoch (worker RNGs are seeded per epoch, not per batch).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from lib import FSANet, load_pretrained_encoders
from lib.checkpoint import extract_state_dict, load_weights, strip_wrapper_prefixes, torch_load_weights
from lib.fast import to_channels_last
from utils.atomic import atomic_torch_save
from utils.data import EvalDataset, TrainDataset, eval_collate
from utils.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    data_parallel_replicas,
    init_distributed,
    smallest_replica_batch,
    unwrap_model,
    wrap_model,
)
from utils.inference import AMP_DTYPES, autocast, logits_to_map
from utils.losses import RELEASE_WEIGHTS, deep_supervision_loss
from utils.optim import AdaXW, clip_gradient, poly_lr, set_lr

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fsanet-train-v1"
LOSS_NAMES = ("loss", "P1", "P2", "P3", "P4")
# Settings that change the data order or the schedule; resuming with other values is allowed but warned.
RESUME_SENSITIVE = ("epoch", "lr", "batchsize", "trainsize", "rates", "seed", "clip", "weight_decay",
                    "weighted_bce", "hflip", "amp")


class TrainingError(Exception):
    """A training setup or run problem; the message names the cause and the fix."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; nothing of the broken state was saved."""


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
    trainsize: int = 736
    clip: float = 0.5
    rates: tuple[float, ...] = (0.75, 1.0, 1.25)
    weighted_bce: bool = False
    freq_encoder: str = "resnet50"
    drop_path_rate: float = 0.1
    pre_model: Optional[str] = None
    pvt_path: Optional[str] = "checkpoints/pvt_v2_b2.pth"
    resnet_path: Optional[str] = "checkpoints/resnet50-0676ba61.pth"
    res2net_path: Optional[str] = "checkpoints/res2net50_v1b_26w_4s-3cf99910.pth"
    no_pretrained: bool = False
    device: str = "auto"
    backend: str = "auto"
    num_workers: int = 4
    seed: int = 0
    hflip: bool = False
    fast_decode: bool = False
    cache_dir: Optional[str] = None
    on_bad: str = "skip"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    save_every: int = 5
    save_iters: int = 0
    val_path: Optional[str] = None
    val_every: int = 1
    val_size: int = 992
    stop_after_epoch: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint's "args" (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class RunState:
    """Where the run is: epochs completed, batches done in the next epoch, optimiser steps, best maxF."""

    epoch: int = 0
    iteration: int = 0
    step: int = 0
    best_maxf: float = -1.0


def check_config(cfg: TrainConfig) -> None:
    """Reject option values the recipe cannot run with, naming the flag."""
    problems = []
    if cfg.epoch < 1:
        problems.append(f"--epoch {cfg.epoch}: must be at least 1")
    if cfg.batchsize < 2:
        problems.append(f"--batchsize {cfg.batchsize}: must be at least 2 (BatchNorm cannot train on one image)")
    if cfg.trainsize < 32:
        problems.append(f"--trainsize {cfg.trainsize}: must be at least 32")
    if any(scaled_size(cfg.trainsize, r) < 32 for r in cfg.rates) or not cfg.rates:
        problems.append(f"--rates {cfg.rates}: every trainsize*rate must round to at least 32")
    if cfg.val_size % 32 or cfg.val_size < 32:
        problems.append(f"--val_size {cfg.val_size}: must be a positive multiple of 32")
    if cfg.amp not in ("none", *AMP_DTYPES):
        problems.append(f"--amp {cfg.amp}: choose none, {', '.join(AMP_DTYPES)}")
    if cfg.on_bad not in ("skip", "error"):
        problems.append(f"--on_bad {cfg.on_bad}: choose skip or error")
    if cfg.stop_after_epoch is not None and cfg.stop_after_epoch < 1:
        problems.append(f"--stop_after_epoch {cfg.stop_after_epoch}: must be at least 1")
    if min(cfg.save_every, cfg.save_iters, cfg.val_every, cfg.num_workers) < 0:
        problems.append("--save_every, --save_iters, --val_every and --num_workers must be 0 or more")
    if problems:
        raise TrainingError("; ".join(problems))


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


def scaled_size(trainsize: int, rate: float) -> int:
    """The release's multi-scale size: round(trainsize * rate / 32) * 32."""
    return int(round(trainsize * rate / 32) * 32)


def resize_pair(images: torch.Tensor, gts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) resize of images and masks to size x size, as the release."""
    if images.shape[-2:] == (size, size):
        return images, gts
    resize = dict(size=(size, size), mode="bilinear", align_corners=True)
    return F.interpolate(images, **resize), F.interpolate(gts, **resize)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by rng_state()."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive python and numpy seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the DataLoader generator (worker seeds) for one (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and bytes of tensors, sorted by name (identical tensors, identical digest)."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EpochSampler(Sampler[int]):
    """Indices of one epoch for this rank: DistributedSampler's (seed, epoch) shuffle, resumable mid-epoch.

    A final batch that would give some GPU a single sample is dropped: BatchNorm cannot train on
    one sample (the release crashes there; with DIS-TR's 3,000 images and batch 8 or 6 it never has one).
    """

    def __init__(self, dataset: Any, batch_size: int, ctx: DistContext, seed: int, replicas: int = 1) -> None:
        """Shard `dataset` over ctx's ranks in batches of `batch_size` (split over `replicas` GPUs), shuffled from `seed`."""
        self.inner = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                        shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.replicas = replicas
        self.indices: list[int] = []

    def _usable(self, n: int) -> int:
        """How many of n indices to keep: without a final batch too small for BatchNorm on every replica."""
        rest = n % self.batch_size
        return n - rest if rest and smallest_replica_batch(rest, self.replicas) < 2 else n

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Fix the order of `epoch` and skip the batches already trained in it."""
        self.inner.set_epoch(epoch)
        indices = list(self.inner)
        indices = indices[:self._usable(len(indices))]
        self.indices = indices[skip_batches * self.batch_size:]

    def batches_per_epoch(self) -> int:
        """Batches in a full epoch of this rank."""
        return -(-self._usable(self.inner.num_samples) // self.batch_size)

    def __iter__(self) -> Iterator[int]:
        """This rank's remaining indices of the current epoch."""
        return iter(self.indices)

    def __len__(self) -> int:
        """Number of remaining indices of the current epoch."""
        return len(self.indices)


class Trainer:
    """Owns one training run; `Trainer(cfg).fit()` is all train.py does."""

    def __init__(self, cfg: TrainConfig, ctx: Optional[DistContext] = None) -> None:
        """Check the options, then build data, model, optimiser and logging; resume --pre_model if given."""
        check_config(cfg)
        pretrained = check_pretrained(cfg)
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.device, cfg.backend)
        self.device = self.ctx.device
        if cfg.amp == "fp16" and self.device.type == "cpu":
            log.warning("--amp fp16 on the CPU is many times slower than fp32; use --amp bf16 there")
        self.save_dir = Path(cfg.save_root) / cfg.train_save
        self.state = RunState()
        self.dataset = TrainDataset(cfg.train_path, cfg.trainsize, hflip=cfg.hflip, fast_decode=cfg.fast_decode,
                                    cache_dir=cfg.cache_dir, on_bad=cfg.on_bad)
        replicas = data_parallel_replicas(self.ctx, self.uses_data_parallel)
        if smallest_replica_batch(cfg.batchsize, replicas) < 2:
            raise TrainingError(f"--batchsize {cfg.batchsize} over {replicas} GPUs (DataParallel) gives one GPU a single "
                                f"image; BatchNorm needs 2: use --batchsize {2 * replicas} or more, or --device cuda:0")
        self.sampler = EpochSampler(self.dataset, cfg.batchsize, self.ctx, cfg.seed, replicas)
        if self.sampler.batches_per_epoch() == 0:
            raise TrainingError(f"{cfg.train_path}: {len(self.dataset)} usable image(s) give no batch of at least 2 "
                                "per process (BatchNorm needs 2); add images or use fewer processes")
        self.val_set = self._build_val_set()
        seed_everything(cfg.seed)  # the same initial weights on every rank and in every rerun
        self.model = self._build_model(pretrained)
        self.optimizer = AdaXW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        resumed_rng = self._load_pre_model() if cfg.pre_model else None
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:
            seed_everything(cfg.seed + self.ctx.rank)
        self.net = self._wrap(self.model)
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(self.dataset, batch_size=cfg.batchsize, sampler=self.sampler,
                                 num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                 worker_init_fn=seed_worker, generator=self.loader_generator)
        self.writer = self._open_writer()

    # ---- setup -------------------------------------------------------------------------------------

    def _build_val_set(self) -> Optional[EvalDataset]:
        """DIS-VD (or any split) for validation on rank 0, when --val_path is given."""
        if not self.cfg.val_path or not self.cfg.val_every or not self.ctx.is_main:
            return None
        return EvalDataset(self.cfg.val_path, self.cfg.val_size, fast_decode=self.cfg.fast_decode,
                           on_bad=self.cfg.on_bad)

    def _build_model(self, pretrained: dict[str, str]) -> nn.Module:
        """FSANet with the release's drop path, ImageNet encoders loaded, on the device."""
        model = FSANet(freq_encoder=self.cfg.freq_encoder, drop_path_rate=self.cfg.drop_path_rate)
        if pretrained:
            load_pretrained_encoders(model, **pretrained)
        elif self.cfg.no_pretrained and not self.cfg.pre_model:
            log.warning("--no_pretrained: training from random weights (the release starts from ImageNet)")
        model.to(self.device)
        if self.cfg.channels_last:
            to_channels_last(model)
        return model

    @property
    def uses_data_parallel(self) -> bool:
        """A named GPU (--device cuda:N) means that GPU alone; auto/cuda use every visible GPU, as the release."""
        return self.cfg.device in ("auto", "cuda")

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP / DataParallel / bare, then torch.compile when asked."""
        net = wrap_model(model, self.ctx, data_parallel=self.uses_data_parallel)
        if self.cfg.compile:
            net = torch.compile(net)
        return net

    def _open_writer(self) -> Any:
        """TensorBoard writer in <save_dir>/tb on rank 0 (None elsewhere)."""
        if not self.ctx.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        self.save_dir.mkdir(parents=True, exist_ok=True)
        if not self.cfg.pre_model and (self.save_dir / "last.pth").exists():
            log.warning("%s already exists and will be overwritten; pass --pre_model %s to resume it instead",
                        self.save_dir / "last.pth", self.save_dir / "last.pth")
        return SummaryWriter(log_dir=str(self.save_dir / "tb"))

    def _load_pre_model(self) -> Optional[dict[str, Any]]:
        """Resume our own checkpoint fully, or load other weights only; returns the RNG state to restore."""
        path = Path(self.cfg.pre_model)
        ckpt = torch_load_weights(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
            load_weights(self.model, extract_state_dict(ckpt, path), str(path))
            log.info("--pre_model %s: weights only (no training state of this trainer); the run starts at epoch 1",
                     path)
            return None
        load_weights(self.model, strip_wrapper_prefixes(ckpt["model"]), str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(epoch=int(ckpt["epoch"]), iteration=int(ckpt.get("iteration", 0)),
                              step=int(ckpt["step"]), best_maxf=float(ckpt.get("best_maxf", -1.0)))
        self._warn_changed_settings(ckpt)
        log.info("resuming %s: %d epoch(s) and %d batch(es) done, %d optimiser steps", path, self.state.epoch,
                 self.state.iteration, self.state.step)
        return self._rank_rng(ckpt)

    def _warn_changed_settings(self, ckpt: dict[str, Any]) -> None:
        """Warn when the resumed run's recipe differs from the one it was saved with."""
        saved = ckpt.get("args", {})
        now = self.cfg.to_dict()
        for key in RESUME_SENSITIVE:
            if key in saved and saved[key] != now[key]:
                log.warning("resuming with --%s %s (the checkpoint was trained with %s): the run will not "
                            "match an uninterrupted one", key, now[key], saved[key])
        if ckpt.get("world_size", 1) != self.ctx.world_size:
            log.warning("resuming with %d process(es), saved with %d: the data order changes",
                        self.ctx.world_size, ckpt.get("world_size", 1))

    def _rank_rng(self, ckpt: dict[str, Any]) -> Optional[dict[str, Any]]:
        """This rank's saved RNG state (each rank's under DDP; rank 0's if the world size changed)."""
        ranks = ckpt.get("rng_ranks") or [ckpt.get("rng")]
        if self.ctx.rank < len(ranks) and ranks[self.ctx.rank] is not None:
            return ranks[self.ctx.rank]
        return ranks[0]

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self) -> RunState:
        """Train from the current state to the end of the schedule (or --stop_after_epoch); returns the state."""
        cfg = self.cfg
        if self.state.epoch >= cfg.epoch:
            log.info("the schedule of %d epochs is already complete; nothing to train", cfg.epoch)
            self.close_writer()
            return self.state
        n = len(self.dataset)
        log.info("training on %d images (%d per process per batch, %d process(es)) on %s for epochs %d..%d",
                 n, cfg.batchsize, self.ctx.world_size, self.device, self.state.epoch + 1, cfg.epoch)
        try:
            for epoch in range(self.state.epoch + 1, cfg.epoch + 1):
                self.train_epoch(epoch)
                self.end_epoch(epoch)
                if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch and epoch < cfg.epoch:
                    log.info("stopping after epoch %d as asked; resume with --pre_model %s", epoch,
                             self.save_dir / "last.pth")
                    break
            self.check_replicas()
        finally:
            self.close_writer()
        return self.state

    def close_writer(self) -> None:
        """Flush and close the TensorBoard writer (rank 0)."""
        if self.writer is not None:
            self.writer.close()

    def train_epoch(self, epoch: int) -> None:
        """One epoch at the poly learning rate of `epoch`: three optimiser steps per batch."""
        cfg = self.cfg
        lr = poly_lr(cfg.lr, epoch, cfg.epoch)
        set_lr(self.optimizer, lr)
        skip = self.state.iteration
        self.sampler.set_epoch(epoch, skip_batches=skip)
        self.loader_generator.manual_seed(loader_seed(cfg.seed, epoch, self.ctx.rank))
        self.net.train()
        total = self.sampler.batches_per_epoch()
        bar = tqdm(self.loader, total=total, initial=skip, desc=f"epoch {epoch}/{cfg.epoch}",
                   disable=not self.ctx.is_main or None, dynamic_ncols=True, file=sys.stderr)
        sums = torch.zeros(len(LOSS_NAMES))
        for images, gts in bar:
            start = time.perf_counter()
            losses = self.train_batch(images, gts, epoch)
            self.state.iteration += 1
            sums += losses
            speed = images.shape[0] * self.ctx.world_size / (time.perf_counter() - start)
            self._log_batch(losses, lr, speed)
            bar.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
            if cfg.save_iters and self.state.iteration % cfg.save_iters == 0 and self.state.iteration < total:
                self.save("last.pth")
        batches = max(self.state.iteration - skip, 1)
        log.info("epoch %d/%d: lr %.3e, mean loss %.4f over %d batch(es)", epoch, cfg.epoch, lr,
                 float(sums[0]) / batches, batches)

    def train_batch(self, images: torch.Tensor, gts: torch.Tensor, epoch: int) -> torch.Tensor:
        """The release's multi-scale step: one forward/backward/clamp/step per rate; mean loss terms."""
        images = images.to(self.device, non_blocking=True)
        gts = gts.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sums = torch.zeros(len(LOSS_NAMES))
        for rate in self.cfg.rates:
            size = scaled_size(self.cfg.trainsize, rate)
            x, y = resize_pair(images, gts, size)
            sums += self.train_step(x, y, epoch, size)
        return sums / len(self.cfg.rates)

    def train_step(self, images: torch.Tensor, gts: torch.Tensor, epoch: int, size: int) -> torch.Tensor:
        """Forward, loss, finiteness check (all ranks), backward, clamp, AdaXW step; returns the loss terms."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.cfg.amp):
            preds = self.net(images)
        loss, terms = deep_supervision_loss(preds[: len(RELEASE_WEIGHTS)], gts, weighted_bce=self.cfg.weighted_bce)
        report = torch.stack([loss.detach(), *(t.detach() for t in terms)]).float()
        report = all_reduce_sum(report, self.ctx) / self.ctx.world_size
        report = report.cpu()
        if not torch.isfinite(report).all():
            self._stop_non_finite(report, epoch, size)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        clip_gradient(self.optimizer, self.cfg.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        return report

    def _stop_non_finite(self, report: torch.Tensor, epoch: int, size: int) -> None:
        """Raise NonFiniteLossError naming where it happened and the last good checkpoint."""
        last = self.save_dir / "last.pth"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved"
        terms = ", ".join(f"{n} {v:.4g}" for n, v in zip(LOSS_NAMES, report.tolist()))
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, batch {self.state.iteration + 1}, optimiser step "
            f"{self.state.step + 1}, size {size} ({terms}); stopped without saving, {kept}. "
            "Lower --lr, check the data, or try without --amp fp16."
        )

    def _log_batch(self, losses: torch.Tensor, lr: float, speed: float) -> None:
        """TensorBoard scalars of one batch (rank 0): each loss term (mean over the rates), lr, images/s."""
        if self.writer is None:
            return
        for name, value in zip(LOSS_NAMES, losses.tolist()):
            self.writer.add_scalar(f"train/{name}", value, self.state.step)
        self.writer.add_scalar("train/lr", lr, self.state.step)
        self.writer.add_scalar("train/images_per_s", speed, self.state.step)

    def end_epoch(self, epoch: int) -> None:
        """Mark the epoch done, validate when due, save last.pth (+ FSANet-N.pth, best.pth)."""
        self.state.epoch, self.state.iteration = epoch, 0
        cfg = self.cfg
        improved = False
        if cfg.val_path and cfg.val_every and (epoch % cfg.val_every == 0 or epoch == cfg.epoch):
            improved = self.validate_and_log(epoch)
        self.save("last.pth")
        # The release's names: after epoch e (1-based) with (e + 1) % 5 == 0 it writes FSANet-{e+1}.pth.
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
            self.save(f"FSANet-{epoch + 1}.pth")
        if improved:
            self.save("best.pth")

    def validate_and_log(self, epoch: int) -> bool:
        """Validate on rank 0 while the others wait; True when maxF improved (rank 0)."""
        improved = False
        if self.ctx.is_main and self.val_set is not None:
            metrics = self.validate()
            log.info("epoch %d validation: maxF %.4f, MAE %.4f", epoch, metrics["maxF"], metrics["MAE"])
            for name, value in metrics.items():
                self.writer.add_scalar(f"val/{name}", value, self.state.step)
            improved = metrics["maxF"] > self.state.best_maxf
            if improved:
                self.state.best_maxf = metrics["maxF"]
        barrier(self.ctx)
        # Every rank must take part in the save that follows (it gathers RNG states).
        return bool(broadcast_object(improved, self.ctx))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """maxF and MAE at GT size, as test.py maps P1: bilinear to GT size, sigmoid, min-max, 8 bits."""
        from py_sod_metrics import MAE, FmeasureHandler, FmeasureV2

        model = unwrap_model(self.net)
        model.eval()
        fm = FmeasureV2({"fm": FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3)})
        mae = MAE()
        loader = DataLoader(self.val_set, batch_size=self.cfg.batchsize, num_workers=self.cfg.num_workers,
                            collate_fn=eval_collate)
        for images, masks, _ in tqdm(loader, desc="validation", leave=False, disable=None, file=sys.stderr):
            images = images.to(self.device)
            with autocast(self.device, self.cfg.amp):
                logits = model.predict(images)
            for logit, mask in zip(logits, masks):
                pred = logits_to_map(logit, mask.shape)
                fm.step(pred=pred, gt=mask)
                mae.step(pred=pred, gt=mask)
        model.train()
        return {"maxF": float(fm.get_results()["fm"]["dynamic"].max()), "MAE": float(mae.get_results()["mae"])}

    # ---- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self, rng_ranks: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The full training state as saved in last.pth (format fsanet-train-v1)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap_model(self.net).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.state.epoch,
            "iteration": self.state.iteration,
            "step": self.state.step,
            "best_maxf": self.state.best_maxf,
            "scaler": self.scaler.state_dict(),
            "rng": rng_ranks[0],
            "rng_ranks": list(rng_ranks),
            "world_size": self.ctx.world_size,
            "args": self.cfg.to_dict(),
        }

    def save(self, name: str) -> Path:
        """Write <save_dir>/<name> atomically from rank 0 (every rank contributes its RNG state)."""
        rng_ranks = all_gather_objects(rng_state(), self.ctx)
        path = self.save_dir / name
        if self.ctx.is_main:
            atomic_torch_save(self.checkpoint(rng_ranks), path)
            log.info("saved %s (epoch %d, step %d)", path, self.state.epoch, self.state.step)
        return path

    def check_replicas(self) -> None:
        """Under DDP, confirm every rank holds identical parameters (a diverged replica is a bug)."""
        if not self.ctx.distributed:
            return
        digests = all_gather_objects(tensors_digest(unwrap_model(self.net).named_parameters()), self.ctx)
        if len(set(digests)) != 1:
            raise TrainingError(f"DDP replicas diverged: parameter sha256 per rank {digests}")
        log.info("parameter sha256 per rank: %s; identical on all %d ranks", " ".join(digests), self.ctx.world_size)


def configure_logging(ctx: DistContext, level: int = logging.INFO) -> None:
    """Log to stderr: INFO on rank 0, warnings and errors only on the other ranks."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if ctx.is_main else \
        f"%(asctime)s [rank {ctx.rank}] %(levelname)s %(name)s: %(message)s"
    level = level if ctx.is_main else logging.WARNING
    logging.basicConfig(level=level, format=fmt)  # keeps handlers already installed (e.g. by pytest)
    logging.getLogger().setLevel(level)
