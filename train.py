"""Train FSANet on DIS5K with the authors' recipe (defaults = the release).

    python train.py --train_path data/DIS5K/DIS-TR --val_path data/DIS5K/DIS-VD --train_save FSANet
    torchrun --nproc_per_node 2 train.py --train_path data/DIS5K/DIS-TR --batchsize 4   # DDP, 4 per GPU
    python train.py ... --pre_model checkpoints/FSANet/last.pth                        # resume

Without torchrun it trains on every visible GPU through DataParallel (as the release), or on the CPU.
"""
from __future__ import annotations

from pipelines.cli import quiet_interrupts_while_starting

quiet_interrupts_while_starting(__name__)  # before the imports below: they take seconds to load

import argparse
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from lib import FREQ_ENCODER_NAMES
from pipelines.cli import exit_process, float_in, int_at_least, run_cli
from pipelines.training import TrainConfig, Trainer
from utils.device import AMP_CHOICES
from utils.distributed import cleanup_distributed, init_distributed
from utils.imageio import DEFAULT_MAX_PIXELS
from utils.logs import configure_logging

# torch.manual_seed's largest seed; numpy's SeedSequence (the data order) takes no negative one.
SEED_MAX = 2**64 - 1


def build_parser() -> argparse.ArgumentParser:
    """The release's train.py flags (same names and defaults) plus scale, resume and logging options."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("release recipe")
    g.add_argument("--epoch", type=int, default=d.epoch,
                   help="epochs E of the poly schedule lr*(1-e/E)^0.9, set at the start of epoch e=1..E (the "
                        "last epoch runs at lr 0, as released). Resuming our last.pth finishes these E epochs; "
                        "the release instead ran --epoch more epochs past the saved one (a bug not copied)")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate of AdaXW (release: 2e-4)")
    g.add_argument("--weight_decay", type=float, default=d.weight_decay,
                   help="AdaXW decoupled weight decay, applied to every parameter with a gradient (release: 1e-4)")
    g.add_argument("--batchsize", "--batch_size", dest="batchsize", type=int, default=d.batchsize,
                   help="images per batch (release: 8). Under torchrun this is PER PROCESS (global batch = "
                        "batchsize x processes); with DataParallel it is split over the GPUs")
    g.add_argument("--accum_steps", type=int, default=d.accum_steps,
                   help="accumulate gradients over N batches before each clamp and AdaXW step (per rate), so one "
                        "GPU runs the release's batch of 8 as --batchsize 4 --accum_steps 2. Changes one thing: "
                        "BatchNorm normalises over each batch of --batchsize images instead of all of them "
                        "(default 1: no accumulation, the release)")
    g.add_argument("--trainsize", type=int, default=d.trainsize,
                   help="square size images and masks are resized to (release: 736)")
    g.add_argument("--rates", type=float, nargs="+", default=list(d.rates),
                   help="multi-scale rates, one optimiser step each per batch at round(trainsize*rate/32)*32 "
                        "(release: 0.75 1 1.25)")
    g.add_argument("--clip", type=float, default=d.clip,
                   help="clamp every gradient element to [-clip, clip] before each step "
                        "(release: 0.5; not a norm clip)")
    g.add_argument("--weighted_bce", action="store_true",
                   help="apply the boundary weight 1+5|avgpool(mask)-mask| to the BCE term as the release intended; "
                        "by default the BCE term is a plain mean over pixels, as the release actually computes it")
    g.add_argument("--train_path", default=d.train_path,
                   help="training split with im/ + gt/ (DIS5K v1.0) or Imgs/ + GT/ (release layout)")
    g.add_argument("--train_save", default=d.train_save,
                   help="run name: checkpoints, TensorBoard logs go to <save_root>/<train_save>/")
    g.add_argument("--pre_model", default=None,
                   help="our <run>/last.pth (or FSANet-N.pth): resume it exactly (model, optimiser, epoch, "
                        "step, schedule, RNG, GradScaler) and finish --epoch. The release's FSANet-100.pth or bare "
                        "weights: initialise the weights only and start at epoch 1 (pretrained files not needed)")

    g = p.add_argument_group("model and pretrained encoders")
    g.add_argument("--freq_encoder", choices=FREQ_ENCODER_NAMES, default=d.freq_encoder,
                   help="frequency-image encoder (release: resnet50)")
    g.add_argument("--drop_path_rate", type=float_in(0, 1, high_open=True), default=d.drop_path_rate,
                   help="stochastic depth of the PVT-v2 encoder, in [0, 1) (release: 0.1)")
    g.add_argument("--radius", type=float, default=d.radius,
                   help="initial radius, in frequency bins, of the frequency branch's high-pass mask (release: 100; "
                        "it never changes in training and is saved as frequency.radius, so test.py reads it from "
                        "the checkpoint). At the release's test size 992, 100 is about 20%% of the spectrum's "
                        "half-width (496 bins) and removes about 3%% of its bins; at sizes up to 142 it removes all "
                        "of them and the frequency image is 0. Keeping the release's proportion at size S means "
                        "about 100 * S / 992 (e.g. 12.9 at 128). --pre_model weights bring their own radius")
    g.add_argument("--pvt_path", default=d.pvt_path,
                   help="ImageNet PVT-v2-b2 weights (original pvt_v2_b2.pth)")
    g.add_argument("--resnet_path", default=d.resnet_path,
                   help="torchvision ImageNet ResNet-50 weights (used with --freq_encoder resnet50)")
    g.add_argument("--res2net_path", default=d.res2net_path,
                   help="Res2Net-50 v1b 26w4s ImageNet weights (used with --freq_encoder res2net50)")
    g.add_argument("--no_pretrained", action="store_true",
                   help="start from random weights instead of stopping when a pretrained file is missing")

    g = p.add_argument_group("data")
    g.add_argument("--on_bad", choices=("skip", "error"), default=d.on_bad,
                   help="unusable pairs (missing mask, unreadable file, image/mask size mismatch): skip them "
                        "with a warning naming each file and a count (release: silently dropped), or stop")
    g.add_argument("--hflip", action="store_true",
                   help="augment with random horizontal flips (p=0.5); the release has no augmentation")
    g.add_argument("--fast_decode", action="store_true",
                   help="decode JPEGs at reduced scale and box-reduce masks (both still >= --trainsize), then resize "
                        "with torch's uint8 kernel: faster loading of large photos (benchmark.py --only data; README), "
                        "pixel values differ slightly from the release's")
    g.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images whose header says more pixels than this before decoding (decompression "
                        "bombs; skipped or stopped as --on_bad says). Default: PIL's own limit, which every "
                        "DIS5K image fits")
    g.add_argument("--cache_dir", default=None,
                   help="cache each resized pair here (about 4*trainsize^2 bytes) so later epochs skip decoding")
    g.add_argument("--num_workers", type=int, default=d.num_workers,
                   help="DataLoader worker processes per process (release: 4)")
    g.add_argument("--seed", type=int_at_least(0, maximum=SEED_MAX), default=d.seed,
                   help="seed of weights init, shuffling (a function of seed and epoch), workers and drop path "
                        "(the release sets none); 0 to 2**64-1")

    g = p.add_argument_group("devices and speed")
    g.add_argument("--device", default=d.device,
                   help="auto (every visible GPU via DataParallel, else CPU), cpu, cuda or cuda:N; under "
                        "torchrun each process takes cuda:LOCAL_RANK (cuda:0 when it sees one GPU)")
    g.add_argument("--backend", default=d.backend, choices=("auto", "nccl", "gloo"),
                   help="DDP backend under torchrun (auto: nccl on GPUs, gloo on CPU)")
    g.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                   help="mixed precision (fp16 uses a GradScaler, saved in checkpoints), in every DataParallel "
                        "replica too; release: none")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format (faster convs on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (three shapes: one per rate); "
                   "refused with DataParallel, whose replicas it cannot compile: use torchrun")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute the encoders' activations (PVT-v2 blocks, ResNet stages) in the backward pass: "
                        "lower peak memory for more compute (the encoders run forward twice), the same weights "
                        "(release: off)")

    g = p.add_argument_group("checkpoints, validation, stopping")
    g.add_argument("--save_root", default=d.save_root, help="folder holding the run folders (release: checkpoints)")
    g.add_argument("--save_every", type=int, default=d.save_every,
                   help="also write FSANet-{e+1}.pth after epoch e when (e+1) %% N == 0, the release's names "
                        "(FSANet-100.pth holds 99 epochs); 0: off. last.pth is written after every epoch")
    g.add_argument("--save_iters", type=int, default=d.save_iters,
                   help="also write last.pth every N batches inside an epoch (resumes mid-epoch); 0: off")
    g.add_argument("--val_path", default=None,
                   help="validation split (e.g. data/DIS5K/DIS-VD): maxF and MAE at GT size, best.pth by maxF")
    g.add_argument("--val_every", type=int, default=d.val_every,
                   help="validate after every N epochs and after the last (with --val_path)")
    g.add_argument("--val_size", type=int, default=d.val_size,
                   help="square input size for validation, as test.py's --testsize (release test: 992)")
    g.add_argument("--stop_after_epoch", type=int, default=None,
                   help="end this invocation after epoch N with last.pth saved (e.g. for job time limits); "
                        "resume with --pre_model <run>/last.pth")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags."""
    values = vars(args).copy()
    values["rates"] = tuple(values["rates"])
    return TrainConfig(**values)


def train(cfg: TrainConfig, running: list[Trainer] | None = None) -> int:
    """Join the process group (under torchrun), train, leave it; the Trainer is appended to `running`."""
    try:
        ctx = init_distributed(cfg.device, cfg.backend)
        configure_logging(ctx.rank)
        with logging_redirect_tqdm():
            trainer = Trainer(cfg, ctx)
            if running is not None:
                running.append(trainer)
            trainer.fit()
    finally:
        cleanup_distributed()
    return 0


def progress(cfg: TrainConfig, running: list[Trainer]) -> str:
    """Where an interrupted run stopped and the checkpoint to resume from."""
    if not running:
        return "before training started; nothing was saved"
    state = running[0].state
    last = Path(cfg.save_root) / cfg.train_save / "last.pth"
    where = f"in epoch {state.epoch + 1} of {cfg.epoch} ({state.epoch} completed)"
    if not last.is_file():
        return f"{where}; no checkpoint was saved yet"
    return f"{where}; resume with --pre_model {last}"


def main(argv: list[str] | None = None) -> int:
    """Parse flags and train; a problem ends in one `error:` line and the exit code of utils.errors."""
    cfg = config_from_args(build_parser().parse_args(argv))
    running: list[Trainer] = []
    return run_cli(lambda: train(cfg, running), interrupted=lambda: progress(cfg, running))


if __name__ == "__main__":
    exit_process(main())
