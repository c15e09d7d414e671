"""Model benchmarks: parameters, MACs, inference latency and memory, one training batch.

The release's way of computing (eager float32, explicit attention, the filter mask rebuilt per call,
BatchNorm unfolded, all four heads) is timed in the same run as the fast paths, round by round in turn.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib import FSANet
from lib.fast import optimize_for_inference, use_release_compute
from pipelines.benchmarks.timing import Row, Timing, device_name, ratio, time_call, time_interleaved
from pipelines.inference import logits_to_map


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass (convolutions and matrix products), in G."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def _maps(p1: torch.Tensor) -> np.ndarray:
    """8-bit maps exactly as test.py writes them (at the input size)."""
    return np.stack([logits_to_map(logits, tuple(p1.shape[-2:])) for logits in p1])


def _prepared(state: dict, device: torch.device, autocast_dtype: torch.dtype | None = None) -> FSANet:
    """The fast model with `state` loaded, prepared as test.py runs it (weights cast once under --amp)."""
    model = FSANet().to(device)
    model.load_state_dict(state)
    return optimize_for_inference(model, autocast_dtype=autocast_dtype)


def _under_autocast(model: FSANet, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A call of `model.predict(x)` under torch.autocast in `dtype`."""
    def call() -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return model.predict(x)
    return call


def inference_rows(size: int, batch: int, runs: int, device: torch.device, compile_model: bool = False,
                   seed: int = 0) -> list[Row]:
    """Release-compute vs fast fp32 vs bf16/fp16 (and optionally compiled) inference at `size` x `size`."""
    name = device_name(device)
    torch.manual_seed(seed)
    base = FSANet().eval().to(device)
    state = base.state_dict()
    release = use_release_compute(base)
    fast = _prepared(state, device)
    x = torch.randn(1, 3, size, size, device=device)
    rows = [Row("parameters", f"{sum(p.numel() for p in base.parameters()):,}", name)]
    rows.append(Row(f"MACs at {size}x{size}", f"{count_macs(release, x):.1f} G", name, "fp32",
                    "convolutions and matrix products (attention included) of the full forward"))
    variants = {"release": lambda: release(x)[0], "fast": lambda: fast.predict(x),
                "bf16": _under_autocast(_prepared(state, device, torch.bfloat16), x, torch.bfloat16)}
    if device.type == "cuda":  # fp16 on a CPU is far slower than fp32 (test.py refuses it there)
        variants["fp16"] = _under_autocast(_prepared(state, device, torch.float16), x, torch.float16)
    with torch.inference_mode():
        timings = time_interleaved(variants, device, runs)
    rel, fst = timings["release"], timings["fast"]
    ref_maps = _maps(rel.result.float())
    logit_diff = (fst.result.float() - rel.result.float()).abs().max().item()
    rows.append(Row(f"forward {size}x{size}, batch 1, release compute", f"{rel.median:.3f} s", name, "fp32",
                    f"peak {rel.peak_gib:.2f} GiB", {"seconds": rel.median}))
    fast_ratio = ratio(timings, "fast", "release")
    rows.append(Row(f"forward {size}x{size}, batch 1, fast paths", f"{fst.median:.3f} s", name, "fp32",
                    f"{fast_ratio:.2f}x the release; max logit diff {logit_diff:.1e}; peak {fst.peak_gib:.2f} GiB",
                    {"seconds": fst.median, "ratio": fast_ratio}))
    for dtype in ("bf16", "fp16"):
        if dtype in timings:
            rows.append(_amp_row(size, dtype, timings[dtype], ratio(timings, dtype, "release"),
                                 _maps(timings[dtype].result.float()), ref_maps, name))
    if batch > 1:
        xb = torch.randn(batch, 3, size, size, device=device)
        with torch.inference_mode():
            t_b, _, m_b = time_call(lambda: fast.predict(xb), device, max(1, runs - 1))
        rows.append(Row(f"forward {size}x{size}, batch {batch}, fast paths", f"{t_b:.3f} s", name, "fp32",
                        f"{batch / t_b:.2f} images/s; peak {m_b:.2f} GiB", {"seconds": t_b}))
    if compile_model:
        compiled = torch.compile(fast.predict)
        with torch.inference_mode():
            t_c, p_c, _ = time_call(lambda: compiled(x), device, runs, warmup=2)
        rows.append(Row(f"forward {size}x{size}, batch 1, torch.compile", f"{t_c:.3f} s", name, "fp32",
                        f"{t_c / rel.median:.2f}x the release's median; max logit diff "
                        f"{(p_c - rel.result).abs().max().item():.1e}"))
    return rows


def _amp_row(size: int, dtype: str, timing: Timing, release_ratio: float, maps: np.ndarray,
             ref_maps: np.ndarray, name: str) -> Row:
    """A mixed-precision latency row with its maps' difference from the fp32 maps, in gray levels."""
    diff = np.abs(maps.astype(np.int16) - ref_maps.astype(np.int16))
    return Row(f"forward {size}x{size}, batch 1, fast paths + autocast", f"{timing.median:.3f} s", name, dtype,
               f"{release_ratio:.2f}x the release fp32; 8-bit map diff from fp32 mean {diff.mean():.3f}, "
               f"max {diff.max()}; peak {timing.peak_gib:.2f} GiB",
               {"seconds": timing.median, "ratio": release_ratio})


def train_rows(trainsize: int, batch: int, runs: int, device: str, amp: str = "none") -> list[Row]:
    """One multi-scale training batch (three forward/backward/AdaXW steps, as released) at `trainsize`."""
    from pipelines.training import TrainConfig, Trainer
    from utils.synthetic import generate_split

    with tempfile.TemporaryDirectory(prefix="fsanet_bench_train_") as tmp:
        generate_split(tmp, "DIS-TR", 2 * batch, seed=0, size=trainsize)
        cfg = TrainConfig(train_path=f"{tmp}/DIS-TR", save_root=tmp, no_pretrained=True, batchsize=batch,
                          trainsize=trainsize, num_workers=0, device=device, amp=amp, epoch=2)
        trainer = Trainer(cfg)
        trainer.sampler.set_epoch(1)
        images, gts = next(iter(trainer.loader))
        dev = trainer.device
        # No separate warm-up: at the release's size one batch is minutes on a CPU.
        try:
            seconds, _, memory = time_call(lambda: trainer.train_batch(images, gts, epoch=1), dev, runs, warmup=0)
        finally:
            trainer.close_writer()
    dtype = "fp32" if amp == "none" else amp
    return [Row(f"training batch at {trainsize} (rates 0.75/1/1.25, 3 optimiser steps), batch {batch}",
                f"{seconds:.2f} s", device_name(dev), dtype, f"{batch / seconds:.2f} images/s; peak {memory:.2f} GiB",
                {"seconds": seconds})]


