"""Multi-GPU correctness on the CPU: each test reproduces the mechanism of a DataParallel/DDP fault.

nn.DataParallel cannot replicate on a CPU, so these tests run what it does: a replica's forward in a
fresh thread that re-enters autocast the way torch's parallel_apply does, the zero gradients its
backward gives parameters that got none, a mocked GPU count. The `gpu` tests repeat items 1-3 on
real GPUs (`pytest -k gpu`) and are skipped without one.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data._utils.pin_memory import pin_memory

from lib import FSANet
from lib.fsanet import NEVER_USED
from pipelines.inference import Batch, LoadedImage
from pipelines.training import TrainConfig, Trainer
from pipelines.training.checkpointing import rank_rng
from pipelines.training.config import TrainingError
from pipelines.training.reproducibility import rng_state, set_rng_state
from utils.device import AutocastForward, DeviceError, resolve_device
from utils.distributed import DistContext, unwrap_model, wrap_model
from utils.losses import RELEASE_WEIGHTS, deep_supervision_loss
from utils.optim import AdaXW


def needs_gpus(count: int) -> Callable[[Callable], Callable]:
    """Mark a test for `make gpu-check`'s `pytest -m cuda` run; skip it with fewer than `count` CUDA GPUs."""
    def mark(test: Callable) -> Callable:
        reason = "needs a CUDA GPU" if count == 1 else f"needs {count} CUDA GPUs"
        return pytest.mark.cuda(pytest.mark.skipif(torch.cuda.device_count() < count, reason=reason)(test))
    return mark


needs_gpu = needs_gpus(1)
needs_two_gpus = needs_gpus(2)


@pytest.fixture(scope="module")
def model() -> FSANet:
    """The released architecture with random weights (seeded), in eval mode."""
    torch.manual_seed(0)
    return FSANet().eval()


def conv_output_dtypes(module: nn.Module, run: Callable[[], Any]) -> set[torch.dtype]:
    """The dtypes of every Conv2d output while `run()` calls `module` (hooks fire in replica threads too)."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def call_like_parallel_apply(module: nn.Module, x: torch.Tensor) -> Any:
    """module(x) as parallel_apply's worker runs a replica: a new thread, autocast re-entered without a dtype."""
    device_type = x.device.type
    grad_enabled, autocast_enabled = torch.is_grad_enabled(), torch.is_autocast_enabled(device_type)
    result: dict[str, Any] = {}

    def worker() -> None:
        torch.set_grad_enabled(grad_enabled)
        with torch.amp.autocast(device_type, enabled=autocast_enabled):
            result["out"] = module(x)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return result["out"]


def thread_default_autocast_dtype(device_type: str) -> torch.dtype:
    """The autocast dtype a fresh thread starts with (thread-local; fp16 on CUDA, bf16 on the CPU)."""
    box: list[torch.dtype] = []
    thread = threading.Thread(target=lambda: box.append(torch.get_autocast_dtype(device_type)))
    thread.start()
    thread.join()
    return box[0]


# ---- 1. --amp under DataParallel -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_dtype_reaches_the_replica_threads(model, dtype):
    x = torch.randn(1, 3, 32, 32)
    wrapped = AutocastForward(model, "cpu", dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        bare = conv_output_dtypes(model, lambda: call_like_parallel_apply(model, x))
        fixed = conv_output_dtypes(model, lambda: call_like_parallel_apply(wrapped, x))
    # The mechanism: without the wrapper the replica computes in its thread's default dtype.
    assert bare == {thread_default_autocast_dtype("cpu")}
    assert fixed == {dtype}
    assert unwrap_model(nn.DataParallel(wrapped)) is model  # checkpoints and validation see the bare model


@needs_gpu
def test_gpu_bf16_reaches_the_replica_threads(model):
    net = copy.deepcopy(model).to(torch.device("cuda", 0))
    wrapped = AutocastForward(net, "cuda", torch.bfloat16)
    x = torch.randn(1, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        # parallel_apply itself, two replica threads on GPU 0.
        bare = conv_output_dtypes(net, lambda: nn.parallel.parallel_apply([net, net], [x, x], devices=[0, 0]))
        fixed = conv_output_dtypes(net, lambda: nn.parallel.parallel_apply([wrapped, wrapped], [x, x], devices=[0, 0]))
    assert bare == {torch.float16}  # what the replicas computed before the fix
    assert fixed == {torch.bfloat16}


@needs_two_gpus
def test_gpu_data_parallel_trains_in_bf16(model):
    net = copy.deepcopy(model).to(torch.device("cuda", 0))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    parallel = wrap_model(net, ctx, data_parallel=True, amp="bf16")
    assert isinstance(parallel, nn.DataParallel) and unwrap_model(parallel) is net
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert conv_output_dtypes(net, lambda: parallel(x)) == {torch.bfloat16}


# ---- 2. parameters that never get a gradient -------------------------------------------------------

def train_step_as_data_parallel(model: FSANet, lr: float = 4e-4) -> AdaXW:
    """One training step whose backward ends as DataParallel's does: no gradient becomes a zero gradient."""
    model.train()
    optimizer = AdaXW(model.parameters(), lr=lr, weight_decay=1e-4)
    x, gt = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    preds = model(x)
    loss, _ = deep_supervision_loss(preds[: len(RELEASE_WEIGHTS)], gt)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert sorted(missing) == sorted(model.never_used_parameters())
    # replicate() broadcasts the parameters that require grad; ReduceAddCoalesced fills their None grads.
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer


@pytest.mark.slow  # an optimiser step, as training takes it
def test_never_used_parameters_stay_untouched_under_data_parallel(model):
    net = model  # the other tests only need the architecture, not these weights (a copy costs 400 MB)
    names = net.never_used_parameters()
    assert len(names) == 9 and all(n.startswith(NEVER_USED) for n in names)
    before = {n: (net.get_parameter(n).detach().clone(), net.get_parameter(n)._version) for n in names}
    # lr x weight_decay = 4e-8 would decay radius 100.0 (float32 rounds it away below about 3e-8).
    try:
        optimizer = train_step_as_data_parallel(net, lr=4e-4)
    finally:
        net.eval().zero_grad(set_to_none=True)
    frozen = {id(net.get_parameter(n)) for n in names}
    assert not frozen & {id(p) for p in optimizer.state}  # no AdaXW moments, no weight decay
    for name, (value, version) in before.items():
        param = net.get_parameter(name)
        assert torch.equal(param.detach(), value) and param._version == version, name


@needs_two_gpus
def test_gpu_data_parallel_leaves_never_used_parameters_alone(model):
    net = copy.deepcopy(model).to(torch.device("cuda", 0)).train()
    names = net.never_used_parameters()
    before = {n: net.get_parameter(n).detach().clone() for n in names}
    optimizer = AdaXW(net.parameters(), lr=4e-4, weight_decay=1e-4)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    gt = (torch.rand(4, 1, 64, 64, device="cuda") > 0.5).float()
    preds = nn.DataParallel(net)(x)
    deep_supervision_loss(preds[: len(RELEASE_WEIGHTS)], gt)[0].backward()
    assert sorted(n for n, p in net.named_parameters() if p.grad is None) == sorted(names)
    optimizer.step()
    assert all(torch.equal(net.get_parameter(n).detach(), v) for n, v in before.items())


# ---- 3. pinned inference batches ---------------------------------------------------------------------

def inference_batch() -> Batch:
    """Two readable 32x32 images and one failure, as collate_samples builds them."""
    failure = LoadedImage(2, None, (0, 0), "broken.jpg: not an image")
    return Batch(indices=[0, 1], images=torch.randn(2, 3, 32, 32), sizes=[(40, 50), (30, 20)], failures=[failure])


def test_data_loader_pinning_uses_the_batch_method(monkeypatch):
    batch = inference_batch()
    pinned_sources: list[torch.Tensor] = []
    if not torch.cuda.is_available():  # pinning itself needs CUDA: record what would be pinned
        def fake_pin(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            pinned_sources.append(tensor)
            return tensor.clone()
        monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = pin_memory(batch)  # what the DataLoader's pinning thread calls on every batch
    assert isinstance(out, Batch) and out is not batch
    assert torch.equal(out.images, batch.images) and out.images is not batch.images
    assert (out.indices, out.sizes, out.failures) == (batch.indices, batch.sizes, batch.failures)
    if pinned_sources:
        assert len(pinned_sources) == 1 and pinned_sources[0] is batch.images
    empty = Batch(indices=[], images=None, sizes=[], failures=batch.failures)
    assert pin_memory(empty).images is None


@needs_gpu
def test_gpu_batch_images_are_pinned():
    assert pin_memory(inference_batch()).images.is_pinned()


# ---- 4. --compile with DataParallel ------------------------------------------------------------------

def test_compile_with_data_parallel_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = TrainConfig(train_path=str(tmp_path / "absent"), save_root=str(tmp_path), batchsize=4, no_pretrained=True,
                      compile=True, device="cuda")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    with pytest.raises(TrainingError, match="--compile with DataParallel over 2 GPUs.*torchrun") as info:
        Trainer(cfg, ctx)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


# ---- 5. one GPU per process --------------------------------------------------------------------------

@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (4, 3, 3), (2, 1, 1)])
def test_ddp_rank_takes_its_gpu_when_a_launcher_gives_each_process_one(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert resolve_device("auto", local_rank, distributed=True) == torch.device("cuda", expected)


def test_more_ranks_than_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="LOCAL_RANK 3 .* 2 CUDA device.*--nproc_per_node 2"):
        resolve_device("cuda", 3, distributed=True)


# ---- 6. resuming on another GPU count or world size ------------------------------------------------

def test_cuda_rng_states_restore_what_exists_and_warn(monkeypatch, caplog):
    state = rng_state()
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored: list[tuple[torch.Tensor, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    caplog.set_level(logging.WARNING)
    set_rng_state({**state, "cuda": saved})  # saved on two GPUs, resumed on one
    assert restored == [(saved[0], 0)]
    assert "CUDA RNG states of 2 GPU(s) and this machine has 1" in caplog.text
    caplog.clear()
    restored.clear()
    set_rng_state({**state, "cuda": saved[:1]})
    assert restored == [(saved[0], 0)] and not caplog.text


def test_new_ranks_get_no_other_ranks_rng_state(caplog):
    states = [{"torch": torch.tensor([0])}, {"torch": torch.tensor([1])}]
    ckpt = {"rng": states[0], "rng_ranks": states}
    assert rank_rng(ckpt, 1) is states[1]
    caplog.set_level(logging.WARNING)
    assert rank_rng(ckpt, 2) is None  # the Trainer then seeds it from --seed + rank
    assert "rank 2: the checkpoint holds no RNG state" in caplog.text


# ---- 7. masks cached under inference mode ------------------------------------------------------------

def test_mask_cached_under_inference_mode_still_serves_training():
    from lib.frequency import FrequencyFilter

    flt = FrequencyFilter(6.0)
    with torch.inference_mode():
        flt(torch.randn(1, 3, 32, 32))
    assert not flt.mask(32, 32, torch.device("cpu")).is_inference()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    flt(x).sum().backward()  # would raise "Inference tensors cannot be saved for backward"
    assert x.grad is not None and x.grad.abs().sum() > 0
