"""Model benchmarks: parameters, MACs, inference latency and memory, one training batch.

The release's way of computing (eager float32, explicit attention, the filter mask rebuilt per call,
BatchNorm unfolded, all four heads) is timed in the same run as the fast paths, round by round in turn.
"""
from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib import FSANet
from lib.fast import optimize_for_inference, use_release_compute
from pipelines.benchmarks.timing import Row, Timing, device_name, ratio, time_call, time_interleaved
from pipelines.inference import logits_to_map
from utils.device import AMP_DTYPES

TRAIN_VARIANTS = ("plain", "accum", "checkpointing", "accum+checkpointing")


def count_macs(forward: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Multiply-accumulates (convolutions, matrix products) of one call of `forward` (a model or its predict), in G."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        forward(x)
    return counter.get_total_flops() / 2 / 1e9


def _maps(p1: torch.Tensor) -> np.ndarray:
    """8-bit maps exactly as test.py writes them (at the input size)."""
    return np.stack([logits_to_map(logits, tuple(p1.shape[-2:])) for logits in p1])


def _prepared(state: dict, device: torch.device, autocast_dtype: torch.dtype | None = None) -> FSANet:
    """The fast model with `state` loaded, prepared as test.py runs it (weights cast once under --amp)."""
    model = FSANet.empty(device)
    model.load_state_dict(state)  # strict: every tensor comes from `state`
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
    amp_models = {"bf16": _prepared(state, device, torch.bfloat16)}
    if device.type == "cuda":  # fp16 on a CPU is far slower than fp32 (test.py refuses it there)
        amp_models["fp16"] = _prepared(state, device, torch.float16)
    variants = {"release": lambda: release(x)[0], "fast": lambda: fast.predict(x),
                **{dtype: _under_autocast(m, x, AMP_DTYPES[dtype]) for dtype, m in amp_models.items()}}
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
        batch_calls = {"fp32": lambda: fast.predict(xb)}
        if device.type == "cuda":  # throughput in every dtype; on a CPU a mixed-precision batch takes minutes
            batch_calls.update({dtype: _under_autocast(m, xb, AMP_DTYPES[dtype]) for dtype, m in amp_models.items()})
        for dtype, call in batch_calls.items():
            with torch.inference_mode():
                t_b, _, m_b = time_call(call, device, max(1, runs - 1))
            rows.append(Row(f"forward {size}x{size}, batch {batch}, fast paths", f"{t_b:.3f} s", name, dtype,
                            f"{batch / t_b:.2f} images/s; peak {m_b:.2f} GiB",
                            {"seconds": t_b, "images_per_s": batch / t_b, "peak_gib": m_b}))
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


def train_rows(trainsize: int, batch: int, runs: int, device: str, amp: str = "none",
               variants: tuple[str, ...] = ("plain",), accum_steps: int = 2, warmup: int = 0) -> list[Row]:
    """One multi-scale training batch (three forward/backward/AdaXW steps, as released) per variant.

    Variants (TRAIN_VARIANTS): plain; accum (`accum_steps` batches per optimiser step, --accum_steps);
    checkpointing (--grad_checkpointing); accum+checkpointing. `device` is train.py's --device: "cuda"
    or "auto" use DataParallel over every visible GPU, as train.py does.
    """
    rows = []
    for variant in variants:
        accum = accum_steps if "accum" in variant else 1
        rows.append(_train_row(trainsize, batch, runs, device, amp, accum, "checkpointing" in variant, warmup))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next variant's peak starts from an empty cache
    return rows


def _train_row(trainsize: int, batch: int, runs: int, device: str, amp: str, accum: int, checkpointing: bool,
               warmup: int) -> Row:
    """Time `runs` optimiser batches of `batch` x `accum` images; peak memory per GPU on CUDA."""
    from pipelines.training import TrainConfig, Trainer
    from utils.synthetic import generate_split

    with tempfile.TemporaryDirectory(prefix="fsanet_bench_train_") as tmp:
        generate_split(tmp, "DIS-TR", 2 * batch * accum, seed=0, size=trainsize)
        cfg = TrainConfig(train_path=f"{tmp}/DIS-TR", save_root=tmp, no_pretrained=True, batchsize=batch,
                          trainsize=trainsize, num_workers=0, device=device, amp=amp, epoch=2, accum_steps=accum,
                          grad_checkpointing=checkpointing)
        trainer = Trainer(cfg)
        trainer.sampler.set_epoch(1)
        batches = [(images, gts) for images, gts, _ in itertools.islice(iter(trainer.loader), accum)]
        dev = trainer.device
        gpus = _reset_gpu_peaks(dev)
        # No warm-up by default: at the release's size one batch is minutes on a CPU.
        try:
            seconds, _, memory = time_call(lambda: trainer.train_batches(batches, epoch=1), dev, runs, warmup=warmup)
        finally:
            trainer.close_writer()
        per_gpu = [(torch.cuda.max_memory_allocated(i) / 2**30, torch.cuda.max_memory_reserved(i) / 2**30)
                   for i in gpus]
        replicas = trainer.replicas
    images = batch * accum
    what = f"training batch at {trainsize} (rates {'/'.join(f'{r:g}' for r in cfg.rates)}, " \
           f"{len(cfg.rates)} optimiser steps), batch {batch}"
    if accum > 1:
        what += f" x {accum} accumulated (--accum_steps {accum}: effective batch {images})"
    if checkpointing:
        what += ", --grad_checkpointing"
    if replicas > 1:
        what += f", DataParallel over {replicas} GPUs ({-(-batch // replicas)} per GPU)"
    data = {"seconds": seconds, "images_per_s": images / seconds, "peak_gib": memory, "batch": batch,
            "accum_steps": accum, "grad_checkpointing": checkpointing, "replicas": replicas}
    if per_gpu:
        memory = max(allocated for allocated, _ in per_gpu)
        data.update(peak_gib=memory, peak_allocated_gib_per_gpu=[a for a, _ in per_gpu],
                    peak_reserved_gib_per_gpu=[r for _, r in per_gpu])
        note = "peak per GPU " + ", ".join(f"{a:.2f} GiB allocated / {r:.2f} GiB reserved" for a, r in per_gpu)
    else:
        note = f"peak {memory:.2f} GiB"
    dtype = "fp32" if amp == "none" else amp
    return Row(what, f"{seconds:.2f} s", device_name(dev), dtype, f"{images / seconds:.2f} images/s; {note}", data)


def _reset_gpu_peaks(device: torch.device) -> list[int]:
    """Reset the allocator peaks of every GPU the run may use (DataParallel: all visible); their indices."""
    if device.type != "cuda":
        return []
    gpus = list(range(torch.cuda.device_count()))
    for i in gpus:
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)
    return gpus
