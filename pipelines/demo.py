"""`make demo`: the whole pipeline on a built-in synthetic DIS-like dataset, in minutes on a CPU.

Generates the data, trains the default FSANet from scratch, writes maps with test.py for the
untrained and the trained weights, evaluates both with eval.py, prints the two tables side by
side and saves a picture of images, ground truth and both predictions. Each script runs through its own
`main` with the command line the demo prints, in this process: the interpreter and its libraries load once
instead of five times.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lib import FSANet
from lib.frequency import scaled_radius
from pipelines.cli import interrupt_for, load_script
from utils.atomic import atomic_torch_save
from utils.dis5k import EVAL_SPLITS
from utils.errors import RunError
from utils.metrics import FIELD_METRICS
from utils.synthetic import generate_dataset

log = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]
DATASETS = list(EVAL_SPLITS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Demo options; the defaults finish in under 10 minutes on 2 CPU cores."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="where the synthetic DIS5K-layout dataset is written")
    p.add_argument("--out", default="checkpoints/demo", help="run folder: checkpoints, TensorBoard log, maps, picture")
    p.add_argument("--size", type=int, default=192, help="side of the generated images")
    p.add_argument("--n_train", type=int, default=48, help="training images")
    p.add_argument("--n_test", type=int, default=6, help="images in DIS-VD and in each of DIS-TE1..4")
    # Training and testing at the generated size keeps the 1-3 px wires (128 blurred them below a pixel).
    p.add_argument("--trainsize", type=int, default=192, help="training size (the release trains at 736)")
    p.add_argument("--testsize", type=int, default=192, help="test size (the release tests at 992)")
    p.add_argument("--epoch", type=int, default=10, help="training epochs (the last runs at lr 0, as released)")
    p.add_argument("--batchsize", "--batch_size", dest="batchsize", type=int, default=4, help="images per batch")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdaXW learning rate (higher than the release's 2e-4: no pretraining)")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0], help="multi-scale rates (release: 0.75 1 1.25)")
    p.add_argument("--radius", type=float, default=None,
                   help="frequency filter radius in bins (default: 100 * trainsize / 992, the release's share of "
                        "the spectrum; the release's 100 would empty the frequency image at sizes up to 142)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initial weights and training")
    p.add_argument("--device", default="auto", help="auto (GPU when present, else CPU), cpu or cuda")
    return p.parse_args(argv)


def demo_radius(args: argparse.Namespace) -> float:
    """--radius, or the release's 100 bins at 992 scaled to the demo's training size."""
    return scaled_radius(args.trainsize) if args.radius is None else args.radius


def run_script(script: str, *args: str) -> None:
    """Run one of the project's scripts, as `python <script> <args>` would; stop the demo if it fails.

    A script stopped by Ctrl-C, SIGTERM or SIGHUP has said what it did; the demo stops the same way."""
    log.info("$ python %s", " ".join((script, *args)))
    code = load_script(script).main(list(args))
    interrupt = interrupt_for(code)
    if interrupt is not None:
        raise interrupt
    if code:
        raise RunError(f"the demo stopped: `python {script} {' '.join(args)}` exited with status {code} "
                       "(its messages are above)")


def save_initial_weights(path: Path, seed: int, radius: float) -> Path:
    """The untrained model the run starts from, so 'before' and 'after' share their initialisation."""
    torch.manual_seed(seed)
    atomic_torch_save({"model": FSANet(radius=radius).state_dict()}, path)
    return path


def predict_and_evaluate(weights: Path, data: Path, maps: Path, args: argparse.Namespace) -> dict:
    """test.py then eval.py on every test split; returns eval.py's JSON."""
    device = ["--device", args.device] if args.device != "auto" else []
    run_script("test.py", "--pth_path", str(weights), "--data_root", str(data), "--save_root", str(maps),
        "--testsize", str(args.testsize), "--datasets", *DATASETS, *device,
        # Two fresh checkpoints at a small size: exporting each to ONNX would cost more than it saves.
        "--runtime", "torch")
    metrics = maps / "metrics.json"
    run_script("eval.py", "--pred_root", str(maps), "--gt_root", str(data), "--datasets", *DATASETS,
        "--save_json", str(metrics), "--no_cache")
    return json.loads(metrics.read_text())


def comparison_table(before: dict, after: dict) -> str:
    """Markdown table: each metric untrained -> trained, per dataset and for DIS-TE (1-4)."""
    lines = ["| dataset | " + " | ".join(FIELD_METRICS) + " |", "|:--|" + "--:|" * len(FIELD_METRICS)]
    for name in after:
        cells = []
        for metric in FIELD_METRICS:
            digits = 0 if metric == "HCE" else 3
            cells.append(f"{before[name][metric]:.{digits}f} → {after[name][metric]:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_picture(data: Path, before: Path, after: Path, path: Path, per_split: int = 2) -> Path:
    """A grid: image | ground truth | untrained | trained, two test images from each split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.imageio import list_images, read_mask, read_rgb

    rows = [(split, image) for split in DATASETS[1:] for image in list_images(data / split / "im")[:per_split]]
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), squeeze=False)
    for r, (split, image) in enumerate(rows):
        stem = image.stem
        panels = [np.asarray(read_rgb(image)), np.asarray(read_mask(data / split / "gt" / f"{stem}.png")),
                  np.asarray(read_mask(before / split / f"{stem}.png")),
                  np.asarray(read_mask(after / split / f"{stem}.png"))]
        for c, (panel, title) in enumerate(zip(panels, ["image", "ground truth", "untrained", "trained"])):
            ax = axes[r, c]
            ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
            if c == 0:
                ax.set_ylabel(f"{split}\n{stem}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it."""
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def run_demo(args: argparse.Namespace) -> str:
    """Run the demo end to end; returns the report to print (table, picture, TensorBoard log)."""
    start = time.perf_counter()
    data, out = ROOT / args.data, ROOT / args.out
    log.info("generating the synthetic DIS-like dataset in %s", data)
    generate_dataset(data, seed=args.seed, size=args.size, n_train=args.n_train, n_val=args.n_test, n_test=args.n_test)
    radius = demo_radius(args)
    initial = save_initial_weights(out / "untrained.pth", args.seed, radius)
    before = predict_and_evaluate(initial, data, out / "maps_untrained", args)
    run_script("train.py", "--train_path", str(data / "DIS-TR"), "--save_root", str(out.parent),
        "--train_save", out.name,
        "--pre_model", str(initial), "--no_pretrained", "--epoch", str(args.epoch), "--batchsize", str(args.batchsize),
        "--trainsize", str(args.trainsize), "--lr", str(args.lr), "--rates", *map(str, args.rates),
        "--radius", str(radius), "--seed", str(args.seed), "--device", args.device, "--num_workers", "0", "--hflip")
    after = predict_and_evaluate(out / "last.pth", data, out / "maps_trained", args)
    picture = save_picture(data, out / "maps_untrained", out / "maps_trained", out / "predictions.png")
    return "\n".join([
        "\nFSANet on the synthetic DIS-like test sets, untrained → trained:\n",
        comparison_table(before, after),
        f"\npicture: {_shown(picture)}  (image | ground truth | untrained | trained)",
        f"TensorBoard: .venv/bin/tensorboard --logdir {_shown(out)}",
        f"demo took {time.perf_counter() - start:.0f} s",
    ])
