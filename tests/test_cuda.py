"""Every CUDA path, at small sizes (`pytest -m cuda`; `make gpu-check` runs them and collects their figures).

Skipped without a CUDA GPU. The forward against the authors' fixture, test.py's maps on GPU vs CPU
(fp32, fp16, bf16), short train.py runs with each GPU option, resume equal to an uninterrupted run,
a GPU checkpoint read on a CPU-only process, DataParallel over every visible GPU, torchrun with NCCL.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, child_env
from PIL import Image
from torch import nn

import train
from lib import FSANet, load_checkpoint
from pipelines.cli import load_script
from pipelines.gpu_check import FIGURES_ENV
from pipelines.training import TrainConfig, Trainer
from pipelines.training.reproducibility import tensors_digest
from utils.synthetic import generate_split

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

# cuBLAS reads this at its first call, which comes after collection: deterministic matrix products.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

OUTPUTS = ("P1", "P2", "P3", "P4", "frequency")
SEED = 5
# Stated bounds. Logits of the fixture reach 1.7; cuDNN convolutions default to TF32 (10-bit mantissa).
FP32_FORWARD_MAX = 1e-3
DEFAULT_FORWARD_MAX = 2e-2
# test.py's 8-bit maps on the GPU vs the CPU (fp32): gray levels.
FP32_MAP_MAX = 1
AMP_MAP_BOUNDS = {"fp16": (0.5, 8), "bf16": (1.5, 16)}  # (mean, max) vs the CPU's fp32 maps


@pytest.fixture
def figure(request) -> Callable[[str, object], None]:
    """Record a figure of this test for gpu-check's summary (a no-op outside gpu-check)."""
    def record(name: str, value: object) -> None:
        path = os.environ.get(FIGURES_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.nodeid, "name": name, "value": str(value)}) + "\n")
    return record


@pytest.fixture(scope="module", autouse=True)
def deterministic() -> Iterator[None]:
    """Deterministic cuDNN and kernels (warnings only where none exists), so reruns can be compared."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


@pytest.fixture(autouse=True)
def drop_checkpoints(tmp_path) -> Iterator[None]:
    """Delete each test's checkpoints afterwards: every one holds 1.3 GB."""
    yield
    for path in tmp_path.rglob("*.pth"):
        path.unlink()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A DIS-TR split of 4 synthetic 64x64 pairs."""
    return generate_split(tmp_path_factory.mktemp("cuda_data"), "DIS-TR", 4, seed=2, size=64)


def cli(split: Path, save_root: Path, name: str, *extra: str) -> list[str]:
    """train.py flags of a tiny run on the first GPU from random weights (2 batches x 3 rates per epoch)."""
    return ["--train_path", str(split), "--trainsize", "64", "--batchsize", "2", "--no_pretrained",
            "--num_workers", "0", "--device", "cuda:0", "--save_root", str(save_root), "--train_save", name,
            "--seed", str(SEED), "--save_every", "0", "--epoch", "3", *extra]


def load(path: Path) -> dict:
    """A checkpoint read onto the CPU, as users read it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def max_state_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the float tensors of two model state dicts."""
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()),
               default=0.0)


def test_cuda_forward_matches_the_release_fixture(release_checkpoint, reference_dir, figure):
    ref = np.load(reference_dir / "official_forward_seed0_256x256.npz")
    model = load_checkpoint(FSANet(), release_checkpoint).eval().to("cuda:0")
    x = torch.from_numpy(ref["input"]).to("cuda:0")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    diffs = {}
    try:
        for mode, tf32 in (("fp32 (TF32 off)", (False, False)), ("defaults", saved)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            with torch.no_grad():
                outputs = model(x)
            diffs[mode] = max(float(np.abs(out.float().cpu().numpy() - ref[name]).max())
                              for name, out in zip(OUTPUTS, outputs))
            figure(f"max diff {mode}", f"{diffs[mode]:.2e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert diffs["fp32 (TF32 off)"] < FP32_FORWARD_MAX
    assert diffs["defaults"] < DEFAULT_FORWARD_MAX


def run_test_py(*args: str | os.PathLike) -> int:
    """test.py's main() in this process (the user's code path without a new interpreter)."""
    return load_script("test.py").main([str(a) for a in args])


def read_maps(folder: Path) -> dict[str, np.ndarray]:
    """Every 8-bit map in folder by file name."""
    return {p.name: np.asarray(Image.open(p)).astype(np.int16) for p in sorted(folder.glob("*.png"))}


def test_test_py_maps_on_gpu_match_the_cpu(release_checkpoint, reference_dir, tmp_path, figure):
    images = reference_dir / "infer_case" / "im"
    common = ("--pth_path", release_checkpoint, "--input", images, "--testsize", "256")
    # PyTorch on both sides (the CPU's default would be OpenVINO): the maps differ by the GPU's arithmetic alone.
    assert run_test_py(*common, "--device", "cpu", "--runtime", "torch", "--save_root", tmp_path / "cpu") == 0
    cpu = read_maps(tmp_path / "cpu")
    assert cpu
    for amp in ("none", "fp16", "bf16"):
        out = tmp_path / amp
        assert run_test_py(*common, "--device", "cuda:0", "--amp", amp, "--save_root", out) == 0
        gpu = read_maps(out)
        assert gpu.keys() == cpu.keys()
        diffs = [np.abs(gpu[name] - cpu[name]) for name in cpu]
        mean, worst = float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs))
        figure(f"{amp} vs CPU fp32 (mean/max gray levels)", f"{mean:.3f}/{worst}")
        if amp == "none":
            assert worst <= FP32_MAP_MAX
        else:
            bound_mean, bound_max = AMP_MAP_BOUNDS[amp]
            assert mean <= bound_mean and worst <= bound_max
            assert worst > 0  # identical maps would mean autocast never ran
    assert not torch.backends.cudnn.benchmark  # test.py's autotuning did not leak into this process's tests


def test_data_parallel_over_every_visible_gpu_equals_one_gpu(release_checkpoint, figure):
    gpus = torch.cuda.device_count()
    model = load_checkpoint(FSANet(), release_checkpoint).eval().to("cuda:0")
    x = torch.randn(2 * gpus, 3, 64, 64, device="cuda:0")
    with torch.no_grad():
        single = model(x)[0]
        parallel = nn.DataParallel(model)(x)[0]  # every visible GPU; with one it calls the model itself
    diff = (single - parallel).abs().max().item()
    figure(f"max logit diff over {gpus} GPU(s)", f"{diff:.1e}")
    assert parallel.device == torch.device("cuda:0") and diff < 1e-4


def test_data_parallel_training_on_every_visible_gpu(pairs, tmp_path, caplog):
    gpus = torch.cuda.device_count()
    args = cli(pairs, tmp_path, "dp", "--device", "cuda", "--batchsize", str(2 * gpus), "--stop_after_epoch", "1")
    with caplog.at_level("INFO"):
        assert train.main(args) == 0
    assert ("DataParallel over" in caplog.text) == (gpus > 1)
    ckpt = load(tmp_path / "dp" / "last.pth")
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one image per GPU needs two GPUs to arise")
def test_data_parallel_batch_leaving_one_image_per_gpu_is_refused(pairs, tmp_path, capsys):
    gpus = torch.cuda.device_count()
    assert train.main(cli(pairs, tmp_path, "dp1", "--device", "cuda", "--batchsize", str(2 * gpus - 1))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DataParallel" in err[0] and not (tmp_path / "dp1" / "last.pth").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="replicas run in threads only with two GPUs or more")
def test_data_parallel_replicas_run_under_bf16_autocast(pairs, tmp_path):
    cfg = TrainConfig(train_path=str(pairs), save_root=str(tmp_path), no_pretrained=True, trainsize=64,
                      batchsize=2 * torch.cuda.device_count(), num_workers=0, device="cuda", amp="bf16",
                      rates=(1.0,), epoch=2)
    trainer = Trainer(cfg)
    trainer.close_writer()
    dtypes: list[torch.dtype] = []
    trainer.model.rgb_encoder.body.patch_embed.proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.sampler.set_epoch(1)
    images, gts, _ = next(iter(trainer.loader))
    trainer.train_batch(images, gts, epoch=1)
    assert len(dtypes) == torch.cuda.device_count() and set(dtypes) == {torch.bfloat16}


def test_fp16_clamps_unscaled_gradients(pairs, tmp_path, figure):
    cfg = TrainConfig(train_path=str(pairs), save_root=str(tmp_path), no_pretrained=True, trainsize=64, batchsize=2,
                      num_workers=0, device="cuda:0", amp="fp16", epoch=2, seed=SEED)
    trainer = Trainer(cfg)
    trainer.close_writer()
    trainer.sampler.set_epoch(1)
    images, gts, _ = next(iter(trainer.loader))
    losses = trainer.train_batch(images, gts, epoch=1)
    scale = trainer.scaler.get_scale()
    grads = torch.cat([p.grad.flatten().float() for p in trainer.model.parameters() if p.grad is not None])
    largest = grads[torch.isfinite(grads)].abs().max().item()
    figure("largest clamped gradient / GradScaler scale", f"{largest:.3g} / {scale:g}")
    assert torch.isfinite(losses).all() and scale > 1
    # Clamped after unscale_: gradients reach the clip. Clamped while scaled, they would stay below clip / scale.
    assert largest <= cfg.clip and largest > 10 * cfg.clip / scale


@pytest.mark.parametrize("flags", [
    ("--amp", "bf16"),
    ("--amp", "fp16"),
    ("--channels_last",),
    ("--grad_checkpointing",),
    ("--accum_steps", "2"),
], ids=lambda flags: "_".join(f.lstrip("-") for f in flags))
def test_short_cuda_run_with_each_option(pairs, tmp_path, flags):
    assert train.main(cli(pairs, tmp_path, "opt", *flags, "--stop_after_epoch", "1")) == 0
    ckpt = load(tmp_path / "opt" / "last.pth")
    steps = 3 if "--accum_steps" in flags else 6  # 4 images: 1 accumulated batch or 2 batches, 3 rates each
    assert (ckpt["epoch"], ckpt["step"]) == (1, steps)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if "fp16" in flags:
        assert ckpt["scaler"]["scale"] > 0


@pytest.fixture(scope="module")
def gpu_run(pairs, tmp_path_factory) -> Iterator[Path]:
    """Epoch 1 of 3 trained on the GPU (deterministic settings), saved."""
    save_root = tmp_path_factory.mktemp("gpu_run")
    assert train.main(cli(pairs, save_root, "run", "--stop_after_epoch", "1")) == 0
    yield save_root / "run"
    for path in save_root.rglob("*.pth"):
        path.unlink()


def test_resume_on_gpu_equals_an_uninterrupted_run(pairs, gpu_run, tmp_path, figure):
    resumed = tmp_path / "resumed"
    shutil.copytree(gpu_run, resumed, copy_function=os.link)
    assert train.main(cli(pairs, tmp_path, "resumed", "--stop_after_epoch", "2",
                          "--pre_model", str(resumed / "last.pth"))) == 0
    for name in ("straight", "again"):
        assert train.main(cli(pairs, tmp_path, name, "--stop_after_epoch", "2")) == 0
    straight, again, after = (load(tmp_path / n / "last.pth") for n in ("straight", "again", "resumed"))
    assert (after["epoch"], after["step"]) == (straight["epoch"], straight["step"]) == (2, 12)
    rerun, resume = max_state_diff(straight["model"], again["model"]), max_state_diff(straight["model"], after["model"])
    figure("max weight diff: rerun / resumed", f"{rerun:.1e} / {resume:.1e}")
    if rerun == 0:  # the GPU computed deterministically: resuming must be exact
        assert resume == 0
    else:  # some kernel without a deterministic version: resuming adds no more than a rerun differs
        # The floor, far below one AdaXW step (about lr = 2e-4 a weight), keeps two round-off-sized
        # differences from failing on their ratio; a resume that lost any state differs by whole steps.
        assert resume <= max(4 * rerun, 1e-6)


def test_gpu_checkpoint_loads_on_a_cpu_only_process(pairs, gpu_run, tmp_path):
    ckpt = load(gpu_run / "last.pth")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    model = load_checkpoint(FSANet(), gpu_run / "last.pth")
    assert tensors_digest(model.state_dict().items()) == tensors_digest(ckpt["model"].items())
    env = child_env(CUDA_VISIBLE_DEVICES="")
    maps = subprocess.run([sys.executable, str(ROOT / "test.py"), "--pth_path", str(gpu_run / "last.pth"),
                           "--input", str(pairs / "im"), "--save_root", str(tmp_path / "maps"), "--testsize", "64",
                           "--device", "cpu", "--runtime", "torch"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert maps.returncode == 0, maps.stderr[-2000:]
    assert len(list((tmp_path / "maps").glob("*.png"))) == 4
    resumed = tmp_path / "cpu_resume"
    shutil.copytree(gpu_run, resumed, copy_function=os.link)
    args = [a if a != "cuda:0" else "cpu" for a in cli(pairs, tmp_path, "cpu_resume", "--stop_after_epoch", "2",
                                                         "--pre_model", str(resumed / "last.pth"), "--rates", "1")]
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert load(resumed / "last.pth")["epoch"] == 2


def test_torchrun_one_process_with_nccl(pairs, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "train.py"), *cli(pairs, tmp_path, "ddp", "--device", "cuda", "--backend", "nccl",
                                        "--stop_after_epoch", "1")]
    env = child_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "identical on all 1 ranks" in log
    ckpt = load(tmp_path / "ddp" / "last.pth")
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (1, 6, 1)


def test_compiled_cuda_run(pairs, tmp_path):
    # Last in the file: compiling FSANet takes the longest; one rate means one compiled shape.
    assert train.main(cli(pairs, tmp_path, "compiled", "--compile", "--rates", "1", "--stop_after_epoch", "1")) == 0
    ckpt = load(tmp_path / "compiled" / "last.pth")
    assert ckpt["step"] == 2 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
