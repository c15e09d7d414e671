"""Training-sample loading benchmark: the release's own loader against TrainDataset's paths."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from pipelines.benchmarks.timing import Row, device_name
from utils.data import IMAGENET_MEAN, IMAGENET_STD, Pair, TrainDataset, pair_samples
from utils.imageio import write_png
from utils.synthetic import shapes_pair, write_jpeg


def data_rows(n: int, trainsize: int) -> list[Row]:
    """Training-sample loading on DIS-sized (2500 x 3400) JPEG/PNG pairs: the release's loader vs ours."""
    r = benchmark_loading(n, trainsize=trainsize)
    name = device_name(torch.device("cpu")).replace(f"({torch.get_num_threads()} threads)", "(1 thread)")
    what = f"training sample load, {r['width']}x{r['height']} JPEG + PNG -> {trainsize}"
    release = r["release_samples_per_s"]
    return [
        Row(f"{what}, the release's loader", f"{release:.2f} samples/s", name, "uint8",
            "PIL full decode + convert, torchvision transforms"),
        Row(f"{what}, TrainDataset default", f"{r['default_samples_per_s']:.2f} samples/s", name, "uint8",
            f"{r['default_samples_per_s'] / release:.2f}x the release; same tensors"),
        Row(f"{what}, --fast_decode", f"{r['fast_samples_per_s']:.2f} samples/s", name, "uint8",
            f"{r['speedup']:.2f}x the release; max diff image {r['fast_max_diff_image']:.3f} (normalised), "
            f"mask {r['fast_max_diff_mask'] * 255:.0f}/255"),
        Row(f"{what}, --cache_dir hits", f"{r['cached_samples_per_s']:.1f} samples/s", name, "uint8",
            f"{r['cached_samples_per_s'] / release:.1f}x the release"),
    ]


class ReleaseTrainLoader:
    """The release's training loader, as its dataset code reads: PIL `convert`, torchvision transforms."""

    def __init__(self, samples: Sequence[Pair], size: int) -> None:
        """Load `samples` resized to `size` square."""
        self.samples = list(samples)
        self.image_transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.gt_transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, mask) of pair `index`."""
        sample = self.samples[index]
        with open(sample.image, "rb") as f:
            image = Image.open(f).convert("RGB")
        with open(sample.gt, "rb") as f:
            gt = Image.open(f).convert("L")
        return self.image_transform(image), self.gt_transform(gt)


def _write_benchmark_pair(folder: Path, index: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    """One photo-like JPEG (quality 90) with its PNG mask, DIS5K v1.0 layout."""
    image, mask = shapes_pair(rng, *size)
    write_jpeg(image, folder / "im" / f"bench_{index:03d}.jpg")
    write_png(mask, folder / "gt" / f"bench_{index:03d}.png")


def _seconds_per_item(datasets: Sequence[Dataset], repeats: int) -> list[float]:
    """Mean over items of each dataset's fastest of `repeats` timings, interleaved so load hits all alike."""
    best = np.full((len(datasets), len(datasets[0])), np.inf)
    for _ in range(repeats):
        for index in range(len(datasets[0])):
            for k, dataset in enumerate(datasets):
                start = time.perf_counter()
                dataset[index]
                best[k, index] = min(best[k, index], time.perf_counter() - start)
    return best.mean(axis=1).tolist()


def benchmark_loading(n: int, size: tuple[int, int] = (2500, 3400), trainsize: int = 736,
                      repeats: int = 3) -> dict[str, Any]:
    """One-thread per-sample loading rates on `n` generated (width, height) JPEG/PNG pairs.

    The release's own loader against TrainDataset's default (release) path, --fast_decode, and
    --cache_dir hits; `fast_max_diff_image` and `fast_max_diff_mask` are the largest differences of
    --fast_decode's tensors from the release's over the pairs (image normalised, mask in [0, 1]).
    """
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fsanet_bench_") as tmp:
        root = Path(tmp)
        for i in tqdm(range(n), desc="writing benchmark images", leave=False, disable=None):
            _write_benchmark_pair(root, i, size, rng)
        samples = pair_samples(root, on_bad="error")
        release = ReleaseTrainLoader(samples, trainsize)
        fast = TrainDataset(samples, trainsize, fast_decode=True)
        # The cached dataset fills its cache in the first repeat; the fastest repeat is a cache hit.
        datasets = [release, TrainDataset(samples, trainsize), fast,
                    TrainDataset(samples, trainsize, fast_decode=True, cache_dir=root / "cache")]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            release_s, default_s, fast_s, cached_s = _seconds_per_item(datasets, max(2, repeats))
        finally:
            torch.set_num_threads(threads)
        diffs = [[(a - b).abs().max().item() for a, b in zip(release[i], fast[i])] for i in range(n)]
    return {"n": n, "width": size[0], "height": size[1], "trainsize": trainsize,
            "release_samples_per_s": 1.0 / release_s, "default_samples_per_s": 1.0 / default_s,
            "fast_samples_per_s": 1.0 / fast_s, "speedup": release_s / fast_s,
            "cached_samples_per_s": 1.0 / cached_s,
            "fast_max_diff_image": max(d[0] for d in diffs), "fast_max_diff_mask": max(d[1] for d in diffs)}
