"""The training loop: the release's multi-scale recipe on CPU, one GPU, DataParallel or DDP, with AMP.

One `Trainer` owns everything train.py runs: data, model, AdaXW, the poly schedule, the three
optimiser steps per batch (rates 0.75/1/1.25), the elementwise gradient clamp, mixed precision,
logging (tqdm, TensorBoard, `logging`), validation and saving. What a checkpoint holds and how a run
resumes from it is `checkpointing`'s; seeds and the data order are `reproducibility`'s.

With --accum_steps N, each optimiser batch is N loader batches: per rate, every micro-batch's
forward/backward adds its share of the gradient, then one clamp and one AdaXW step, as on the whole
batch (BatchNorm alone sees each micro-batch separately). Checkpoints fall on optimiser-batch boundaries;
an epoch's short last group is stepped too (`batches`, which also trims batches shrunk by undecodable files).

Resuming is exact: a run stopped (even killed) after any saved epoch, or batch with --save_iters, and
resumed from its `last.pth` ends with the same weights as one that never stopped. One exception: with
--hflip and DataLoader workers, a mid-epoch resume draws other flips for the rest of that epoch (worker
RNGs are seeded per epoch, not per batch).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lib import FSANet, load_pretrained_encoders
from lib.checkpoint import torch_load_weights
from lib.fast import to_channels_last
from pipelines.training.batches import Batch, LoaderBatch, optimiser_groups, resize_pair, trainable_part
from pipelines.training.checkpointing import (
    RunState,
    check_free_space,
    checkpoint_bytes,
    is_training_checkpoint,
    link_checkpoint,
    resume,
    save_checkpoint,
    training_checkpoint,
)
from pipelines.training.config import (
    NonFiniteLossError,
    TrainConfig,
    TrainingError,
    check_config,
    check_pretrained,
    highpass_warning,
    out_of_memory_error,
    scaled_size,
)
from pipelines.training.reproducibility import (
    EpochSampler,
    loader_seed,
    rng_state,
    seed_everything,
    seed_worker,
    set_rng_state,
    tensors_digest,
)
from utils.atomic import check_writable_dir, remove_stale_temps
from utils.data import EvalDataset, TrainDataset, train_collate
from utils.device import autocast
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
from utils.imageio import set_max_pixels
from utils.losses import RELEASE_WEIGHTS, deep_supervision_loss
from utils.optim import AdaXW, clip_gradient, poly_lr, set_lr

log = logging.getLogger(__name__)

LOSS_NAMES = ("loss", "P1", "P2", "P3", "P4")


class Trainer:
    """Owns one training run; `Trainer(cfg).fit()` is all train.py does."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext | None = None) -> None:
        """Check the options, then build data, model, optimiser and logging; resume --pre_model if given."""
        check_config(cfg)
        pretrained = check_pretrained(cfg)
        set_max_pixels(cfg.max_pixels)
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.device, cfg.backend)
        self.device = self.ctx.device
        self._refuse_compiled_data_parallel()
        if cfg.amp == "fp16" and self.device.type == "cpu":
            log.warning("--amp fp16 on the CPU is many times slower than fp32; use --amp bf16 there")
        self.save_dir = Path(cfg.save_root) / cfg.train_save
        if self.ctx.is_main:
            check_writable_dir(self.save_dir, "--save_root")  # before any work, not at the first save
        self.state = RunState()
        self.bad_seen: set[str] = set()  # undecodable files reported so far (each once per run)
        self.dataset = TrainDataset(cfg.train_path, cfg.trainsize, hflip=cfg.hflip, fast_decode=cfg.fast_decode,
                                    cache_dir=cfg.cache_dir, on_bad=cfg.on_bad)
        self.replicas = replicas = data_parallel_replicas(self.ctx, self.uses_data_parallel)
        if smallest_replica_batch(cfg.batchsize, replicas) < 2:
            raise TrainingError(f"--batchsize {cfg.batchsize} over {replicas} GPUs (DataParallel) gives one GPU "
                                f"a single image; BatchNorm needs 2: use --batchsize {2 * replicas} or more, "
                                "or --device cuda:0")
        self.sampler = EpochSampler(self.dataset, cfg.batchsize, self.ctx, cfg.seed, replicas)
        if self.sampler.batches_per_epoch() == 0:
            raise TrainingError(f"{cfg.train_path}: {len(self.dataset)} usable image(s) give no batch of at least 2 "
                                "per process (BatchNorm needs 2); add images or use fewer processes")
        self.val_set = self._build_val_set()
        seed_everything(cfg.seed)  # the same initial weights on every rank and in every rerun
        pre_model = torch_load_weights(Path(cfg.pre_model)) if cfg.pre_model else None
        # Resuming replaces every weight and the RNG state: the random initial weights are not drawn.
        self.model = self._build_model(pretrained, initialise=not is_training_checkpoint(pre_model))
        self.optimizer = AdaXW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        resumed_rng = None
        if cfg.pre_model:
            resumed = resume(pre_model, Path(cfg.pre_model), self.model, self.optimizer, self.scaler,
                             cfg.to_dict(), self.ctx.rank, self.ctx.world_size)
            self.state, resumed_rng = resumed.state, resumed.rng
        self._warn_frequency_band()
        if self.ctx.is_main:  # before the first epoch, not at its end
            check_free_space(self.save_dir, checkpoint_bytes(self.model, self.optimizer))
        if resumed_rng is not None:
            set_rng_state(resumed_rng)
        else:
            seed_everything(cfg.seed + self.ctx.rank)
        self.net = self._wrap(self.model)
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(self.dataset, batch_size=cfg.batchsize, sampler=self.sampler,
                                 num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                 worker_init_fn=seed_worker, generator=self.loader_generator,
                                 collate_fn=train_collate)
        self.writer = self._open_writer()

    # ---- setup -------------------------------------------------------------------------------------

    def _build_val_set(self) -> EvalDataset | None:
        """DIS-VD (or any split) for validation on rank 0, when --val_path is given."""
        if not self.cfg.val_path or not self.cfg.val_every or not self.ctx.is_main:
            return None
        return EvalDataset(self.cfg.val_path, self.cfg.val_size, fast_decode=self.cfg.fast_decode,
                           on_bad=self.cfg.on_bad)

    def _build_model(self, pretrained: dict[str, str], initialise: bool = True) -> nn.Module:
        """FSANet with the release's drop path, ImageNet encoders loaded, on the device; without `initialise`
        its weights are left unset, for a checkpoint that sets them all (loading is strict)."""
        options = dict(freq_encoder=self.cfg.freq_encoder, drop_path_rate=self.cfg.drop_path_rate,
                       radius=self.cfg.radius)
        model = FSANet(**options) if initialise else FSANet.empty(self.device, **options)
        if pretrained:
            load_pretrained_encoders(model, **pretrained)
        elif self.cfg.no_pretrained and not self.cfg.pre_model:
            log.warning("--no_pretrained: training from random weights (the release starts from ImageNet)")
        model.to(self.device)
        if self.cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.cfg.channels_last:
            to_channels_last(model)
        return model

    def _warn_frequency_band(self) -> None:
        """Warn once (rank 0) when the radius in use empties the frequency image at this run's sizes."""
        if not self.ctx.is_main:
            return
        radius = float(self.model.frequency.radius.detach().cpu())
        # The parameter is float32: 19.4 reads back as 19.3999996.
        if self.cfg.pre_model and not math.isclose(radius, self.cfg.radius, rel_tol=1e-6):
            log.warning("--radius %g is not used: the weights of --pre_model %s hold frequency.radius %g",
                        self.cfg.radius, self.cfg.pre_model, radius)
        message = highpass_warning(self.cfg, radius)
        if message:
            log.warning(message)

    @property
    def uses_data_parallel(self) -> bool:
        """A named GPU (--device cuda:N) means that GPU alone; auto/cuda use every visible GPU, as the release."""
        return self.cfg.device in ("auto", "cuda")

    def _refuse_compiled_data_parallel(self) -> None:
        """--compile with DataParallel: Dynamo cannot trace the replica threads (pytorch issue 94636)."""
        replicas = data_parallel_replicas(self.ctx, self.uses_data_parallel)
        if self.cfg.compile and replicas > 1:
            raise TrainingError(f"--compile with DataParallel over {replicas} GPUs compiles nothing in the replicas; "
                                f"use torchrun --nproc_per_node {replicas} train.py ... --compile (DDP), "
                                "or --device cuda:0")

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP / DataParallel / bare, then torch.compile when asked."""
        net = wrap_model(model, self.ctx, data_parallel=self.uses_data_parallel, amp=self.cfg.amp)
        if self.cfg.compile:
            net = torch.compile(net)
        return net

    def _open_writer(self) -> Any:
        """TensorBoard writer in <save_dir>/tb on rank 0 (None elsewhere)."""
        if not self.ctx.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        self.save_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.save_dir, (".pth",))
        if not self.cfg.pre_model and (self.save_dir / "last.pth").exists():
            log.warning("%s already exists and will be overwritten; pass --pre_model %s to resume it instead",
                        self.save_dir / "last.pth", self.save_dir / "last.pth")
        return SummaryWriter(log_dir=str(self.save_dir / "tb"))

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self) -> RunState:
        """Train from the current state to the end of the schedule (or --stop_after_epoch); returns the state."""
        cfg = self.cfg
        if self.state.epoch >= cfg.epoch:
            log.info("the schedule of %d epochs is already complete; nothing to train", cfg.epoch)
            self.close_writer()
            return self.state
        n = len(self.dataset)
        log.info("training on %d images (%d per process per batch x %d accumulated, %d process(es)) on %s for "
                 "epochs %d..%d", n, cfg.batchsize, cfg.accum_steps, self.ctx.world_size, self.device,
                 self.state.epoch + 1, cfg.epoch)
        try:
            for epoch in range(self.state.epoch + 1, cfg.epoch + 1):
                self.train_epoch(epoch)
                self.end_epoch(epoch)
                if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch and epoch < cfg.epoch:
                    log.info("stopping after epoch %d as asked; resume with --pre_model %s", epoch,
                             self.save_dir / "last.pth")
                    break
            self.check_replicas()
        except torch.OutOfMemoryError:
            raise out_of_memory_error(cfg, self.device, self.replicas, self.save_dir / "last.pth") from None
        finally:
            self.close_writer()
        return self.state

    def close_writer(self) -> None:
        """Flush and close the TensorBoard writer (rank 0); log nothing after (a closed one would reopen, unstopped)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def train_epoch(self, epoch: int) -> None:
        """One epoch at the poly learning rate of `epoch`: three optimiser steps per batch."""
        cfg = self.cfg
        lr = poly_lr(cfg.lr, epoch, cfg.epoch)
        set_lr(self.optimizer, lr)
        skip = self.state.iteration
        self.sampler.set_epoch(epoch, skip_samples=self.state.samples)
        if self.state.samples and not self.sampler.indices:
            log.info("epoch %d/%d: nothing left to train in it: after the %d sample(s) per process the checkpoint "
                     "had trained, the rest give no batch of at least 2 at --batchsize %d", epoch, cfg.epoch,
                     self.state.samples, cfg.batchsize)
            return
        self.loader_generator.manual_seed(loader_seed(cfg.seed, epoch, self.ctx.rank))
        self.net.train()
        total = skip + self.sampler.batches_left()
        bar = tqdm(self.loader, total=total, initial=skip, desc=f"epoch {epoch}/{cfg.epoch}",
                   disable=not self.ctx.is_main or None, dynamic_ncols=True, file=sys.stderr)
        sums = torch.zeros(len(LOSS_NAMES))
        steps = 0
        start = time.perf_counter()
        for group in optimiser_groups(bar, cfg.accum_steps, self._trainable, first=skip + 1):
            losses = self.train_batches(group.batches, epoch)
            self.state.iteration += group.consumed
            self.state.samples += group.samples
            sums += losses
            steps += 1
            speed = sum(x.shape[0] for x, _ in group.batches) * self.ctx.world_size / (time.perf_counter() - start)
            self._log_batch(losses, lr, speed)
            bar.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
            # Only at optimiser-batch boundaries, so a resumed run regroups the same loader batches.
            done = self.state.iteration // cfg.accum_steps
            if cfg.save_iters and done % cfg.save_iters == 0 and self.state.iteration < total:
                self.save("last.pth")
            start = time.perf_counter()
        if steps:
            log.info("epoch %d/%d: lr %.3e, mean loss %.4f over %d batch(es)", epoch, cfg.epoch, lr,
                     float(sums[0]) / steps, steps)
        else:
            log.warning("epoch %d/%d: no batch trained (every batch was skipped)", epoch, cfg.epoch)

    def _trainable(self, item: LoaderBatch, number: int) -> Batch | None:
        """Report loader batch `number`'s undecodable files (each once); what of it trains (None: skipped)."""
        self._report_undecodable(item[2], "")
        return trainable_part(item, number, self.replicas, self.ctx)

    def _report_undecodable(self, bad: list[str], where: str) -> None:
        """Warn about each file that failed to decode, once per run although every epoch meets it."""
        for reason in bad:
            if reason not in self.bad_seen:
                self.bad_seen.add(reason)
                log.warning("%sskipping %s (it cannot be decoded; --on_bad skip)", where, reason)

    def train_batch(self, images: torch.Tensor, gts: torch.Tensor, epoch: int) -> torch.Tensor:
        """The release's multi-scale step: one forward/backward/clamp/step per rate; mean loss terms."""
        return self.train_batches([(images, gts)], epoch)

    def train_batches(self, batches: Sequence[Batch], epoch: int) -> torch.Tensor:
        """The multi-scale step on the union of `batches` (--accum_steps loader batches); mean loss terms."""
        on_device = []
        for images, gts in batches:
            images = images.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            on_device.append((images, gts.to(self.device, non_blocking=True)))
        sums = torch.zeros(len(LOSS_NAMES))
        for rate in self.cfg.rates:
            size = scaled_size(self.cfg.trainsize, rate)
            sums += self.train_step([resize_pair(x, y, size) for x, y in on_device], epoch, size)
        return sums / len(self.cfg.rates)

    def train_step(self, batches: Sequence[Batch], epoch: int, size: int) -> torch.Tensor:
        """Forward/backward of each micro-batch, then one clamp and one AdaXW step; returns the loss terms."""
        self.optimizer.zero_grad(set_to_none=True)
        total = sum(images.shape[0] for images, _ in batches)
        report = torch.zeros(len(LOSS_NAMES))
        for i, (images, gts) in enumerate(batches):
            with self._gradient_sync(last=i == len(batches) - 1):
                report += self._forward_backward(images, gts, images.shape[0] / total, epoch, size)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        clip_gradient(self.optimizer, self.cfg.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        return report

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces once per optimiser step: gradients of the micro-batches before the last stay local."""
        if not last and isinstance(self.net, nn.parallel.DistributedDataParallel):
            return self.net.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, images: torch.Tensor, gts: torch.Tensor, share: float, epoch: int,
                          size: int) -> torch.Tensor:
        """Forward, loss x `share` (this micro-batch's part of the batch mean), finiteness check (all ranks),
        backward adding to the gradients; returns the weighted loss terms."""
        with autocast(self.device, self.cfg.amp):
            preds = self.net(images)
        loss, terms = deep_supervision_loss(preds[: len(RELEASE_WEIGHTS)], gts, weighted_bce=self.cfg.weighted_bce)
        report = torch.stack([loss.detach(), *(t.detach() for t in terms)]).float()
        report = all_reduce_sum(report, self.ctx) / self.ctx.world_size
        report = report.cpu()
        if not torch.isfinite(report).all():
            self._stop_non_finite(report, epoch, size)
        if share != 1:  # the batch mean is the share-weighted sum of the micro-batch means
            loss, report = loss * share, report * share
        self.scaler.scale(loss).backward()
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
        self.state.epoch, self.state.iteration, self.state.samples = epoch, 0, 0
        cfg = self.cfg
        improved = False
        if cfg.val_path and cfg.val_every and (epoch % cfg.val_every == 0 or epoch == cfg.epoch):
            improved = self.validate_and_log(epoch)
        last = self.save("last.pth")
        also = []
        # The release's names: after epoch e (1-based) with (e + 1) % 5 == 0 it writes FSANet-{e+1}.pth.
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0:
            also.append(f"FSANet-{epoch + 1}.pth")
        if improved:
            also.append("best.pth")
        # The same state as last.pth: linked to it, not written again (1.3 GB each at the release's size).
        for name in also if self.ctx.is_main else ():
            link_checkpoint(last, self.save_dir / name, epoch)
            log.info("saved %s (the state of %s)", self.save_dir / name, last.name)

    def validate_and_log(self, epoch: int) -> bool:
        """Validate on rank 0 while the others wait; True when maxF improved (rank 0)."""
        improved = False
        if self.ctx.is_main and self.val_set is not None:
            metrics = self.validate()
            log.info("epoch %d validation: maxF %.4f, MAE %.4f", epoch, metrics["maxF"], metrics["MAE"])
            for name, value in metrics.items():
                if self.writer is not None:
                    self.writer.add_scalar(f"val/{name}", value, self.state.step)
            improved = metrics["maxF"] > self.state.best_maxf
            if improved:
                self.state.best_maxf = metrics["maxF"]
        barrier(self.ctx)
        # Every rank must take part in the save that follows (it gathers RNG states).
        return bool(broadcast_object(improved, self.ctx))

    def validate(self) -> dict[str, float]:
        """maxF and MAE on the validation split at GT size, as test.py maps P1."""
        from pipelines.training.validation import validate  # here: its metrics' libraries take most of a second

        model = unwrap_model(self.net)
        try:
            return validate(model, self.val_set, self.cfg.batchsize, self.cfg.num_workers, self.device, self.cfg.amp,
                             lambda bad: self._report_undecodable(bad, "validation: "))
        finally:
            model.train()

    def save(self, name: str) -> Path:
        """Write <save_dir>/<name> atomically from rank 0 (every rank contributes its RNG state)."""
        rng_ranks = all_gather_objects(rng_state(), self.ctx)
        path = self.save_dir / name
        if self.ctx.is_main:
            checkpoint = training_checkpoint(unwrap_model(self.net), self.optimizer, self.scaler, self.state,
                                             rng_ranks, self.cfg.to_dict())
            save_checkpoint(checkpoint, path)
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
