"""--accum_steps and --grad_checkpointing on the CPU with the real FSANet at 64 x 64, and the out-of-memory line."""
from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from lib import FSANet
from pipelines.training import TrainConfig, Trainer
from utils.synthetic import generate_split

SEED = 3


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory) -> Path:
    """A DIS-TR split of 4 synthetic 64x64 pairs."""
    return generate_split(tmp_path_factory.mktemp("mem_opts"), "DIS-TR", 4, seed=1, size=64)


@pytest.fixture(autouse=True)
def drop_checkpoints(tmp_path):
    """Checkpoints hold 1.3 GB each; delete them after every test."""
    yield
    for path in tmp_path.rglob("*.pth"):
        path.unlink()


def cli(split: Path, save_root: Path, name: str, *extra: str) -> list[str]:
    """train.py flags of a tiny CPU run from random weights."""
    return ["--train_path", str(split), "--trainsize", "64", "--no_pretrained", "--num_workers", "0",
            "--device", "cpu", "--save_root", str(save_root), "--train_save", name, "--seed", str(SEED),
            "--save_every", "0", *extra]


def load(path: Path) -> dict:
    """A training checkpoint as users read it (mapped: its 1.3 GB are not copied to be compared)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def trainer(split: Path, tmp_path: Path, **options) -> Trainer:
    """A CPU Trainer without drop path (its random draws would differ between one batch and its halves)."""
    options = {"rates": (1.0, 1.25), **options}
    cfg = TrainConfig(train_path=str(split), save_root=str(tmp_path), trainsize=64, no_pretrained=True,
                      num_workers=0, device="cpu", seed=SEED, epoch=2, drop_path_rate=0.0, **options)
    t = Trainer(cfg)
    t.close_writer()
    # BatchNorm on running statistics: the one documented difference of accumulation taken out.
    for m in t.model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return t


@pytest.mark.slow
def test_accumulated_halves_take_the_full_batch_steps(four_pairs, tmp_path):
    full, accum = trainer(four_pairs, tmp_path, batchsize=4), trainer(four_pairs, tmp_path, batchsize=2, accum_steps=2)
    for a, b in zip(full.model.parameters(), accum.model.parameters()):
        assert torch.equal(a, b)  # same seed, same initial weights
    full.sampler.set_epoch(1)
    images, gts, _ = next(iter(full.loader))
    loss_full = full.train_batch(images, gts, epoch=1)
    loss_accum = accum.train_batches([(images[:2], gts[:2]), (images[2:], gts[2:])], epoch=1)
    # One clamp and one AdaXW step per rate, not per micro-batch.
    assert full.state.step == accum.state.step == 2
    assert torch.allclose(loss_full, loss_accum, rtol=1e-5, atol=1e-6)
    named = dict(accum.model.named_parameters())
    grad_diff = grad_norm = 0.0
    moved = differ = 0
    for name, p in full.model.named_parameters():
        q = named[name]
        if p.grad is None:
            assert q.grad is None, name
            continue
        # The last rate's clamped gradients: the full batch's mean, up to summation order.
        grad_diff += (p.grad - q.grad).pow(2).sum().item()
        grad_norm += p.grad.pow(2).sum().item()
        moved += p.numel()
        differ += ((p - q).abs() > 1e-7).sum().item()
        assert accum.optimizer.state[q]["step"] == 2
    assert grad_norm > 0 and (grad_diff / grad_norm) ** 0.5 < 1e-4
    # AdaXW's first steps move each weight by about 0.1 lr sign(grad): only gradients within round-off
    # of zero may flip, a tiny fraction of the weights.
    assert differ / moved < 1e-3, (differ, moved)


# 6 pairs at --batchsize 2 --accum_steps 2: three loader batches = one accumulated pair + a last single batch.
ACCUMULATED = ("--batchsize", "2", "--accum_steps", "2", "--rates", "1", "--epoch", "2", "--stop_after_epoch", "1")


@pytest.fixture(scope="module")
def six_pairs(four_pairs, tmp_path_factory) -> Path:
    """The 4 pairs plus copies of two of them."""
    six = tmp_path_factory.mktemp("six") / "DIS-TR"
    shutil.copytree(four_pairs, six)
    for stem in ("tr_0000", "tr_0001"):
        shutil.copy(six / "im" / f"{stem}.jpg", six / "im" / f"x{stem}.jpg")
        shutil.copy(six / "gt" / f"{stem}.png", six / "gt" / f"x{stem}.png")
    return six


@pytest.fixture(scope="module")
def accumulated_run(six_pairs, tmp_path_factory) -> Iterator[tuple[Path, Path, list[tuple[int, int]]]]:
    """Epoch 1 of ACCUMULATED with --save_iters 1, uninterrupted: (its last.pth, the mid-epoch last.pth it wrote,
    (iteration, step) at each save)."""
    root = tmp_path_factory.mktemp("accumulated")
    saved: list[tuple[int, int]] = []
    original = Trainer.save

    def keep_mid_epoch(self: Trainer, name: str) -> Path:
        path = original(self, name)
        saved.append((self.state.iteration, self.state.step))
        if self.state.iteration:  # last.pth is replaced by a rename later: the link keeps this version
            os.link(path, root / "mid.pth")
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save", keep_mid_epoch)
        assert train.main(cli(six_pairs, root, "straight", *ACCUMULATED, "--save_iters", "1")) == 0
    yield root / "straight" / "last.pth", root / "mid.pth", saved
    for path in root.rglob("*.pth"):
        path.unlink()


@pytest.mark.slow
def test_accumulation_saves_on_boundaries_and_resumes_exactly(six_pairs, accumulated_run, tmp_path):
    straight, mid, saved = accumulated_run
    # Saved after the first accumulated batch (2 loader batches, 1 step) and after the epoch, never in between.
    assert saved == [(2, 1), (0, 2)]
    assert train.main(cli(six_pairs, tmp_path, "resumed", *ACCUMULATED, "--save_iters", "1",
                          "--pre_model", str(mid))) == 0
    a, b = load(straight), load(tmp_path / "resumed" / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 2)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_grad_checkpointing_gives_the_same_weights_after_an_epoch(six_pairs, accumulated_run, tmp_path):
    """The same epoch as accumulated_run (its --save_iters saves change nothing trained), recomputing activations."""
    assert train.main(cli(six_pairs, tmp_path, "ckpt", *ACCUMULATED, "--grad_checkpointing")) == 0
    a, b = load(accumulated_run[0]), load(tmp_path / "ckpt" / "last.pth")
    assert a["step"] == b["step"] == 2
    # Weights and buffers, BatchNorm running statistics included (updated once, not again when recomputed).
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=0, atol=1e-6), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.allclose(state["exp_avg"], b["optimizer"]["state"][index]["exp_avg"], rtol=0, atol=1e-9)


def test_grad_checkpointing_keeps_batchnorm_statistics_and_drop_path():
    torch.manual_seed(0)
    plain = FSANet(freq_encoder="res2net50").train()
    ckpt = copy.deepcopy(plain)  # the same weights and buffers, without building a second model
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same drop-path draws
        sum(p.mean() for p in model(x)[:4]).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("flags, message", [
    (("--accum_steps", "0"), "--accum_steps 0: must be at least 1"),
])
def test_bad_accumulation_is_refused_before_work(four_pairs, tmp_path, capsys, flags, message):
    assert train.main(cli(four_pairs, tmp_path, "bad", *flags)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_out_of_memory_is_one_line_and_keeps_the_last_checkpoint(four_pairs, tmp_path, capsys, monkeypatch):
    forward = FSANet.forward
    calls = []

    def runs_out_in_epoch_two(self: FSANet, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append(x.shape)
        if len(calls) == 2:  # one forward per epoch (4 images, batch 4, one rate): the second is epoch 2's
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)

    monkeypatch.setattr(FSANet, "forward", runs_out_in_epoch_two)
    rc = train.main(cli(four_pairs, tmp_path, "oom", "--batchsize", "4", "--rates", "1", "--epoch", "3"))
    assert rc == 1
    # The run's own log lines come first (in this process they share stderr); then exactly one error line.
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("error: out of GPU memory"), lines
    for part in ("--batchsize 4", "--batchsize 2 --accum_steps 2", "--grad_checkpointing", "last.pth is kept"):
        assert part in errors[0], part
    assert load(tmp_path / "oom" / "last.pth")["epoch"] == 1


@pytest.mark.slow
def test_ddp_accumulation_all_reduces_once_per_optimiser_step(four_pairs, tmp_path):
    """Under DDP the micro-batches before the last keep their gradients local (no_sync): N accumulated
    loader batches cost the all-reduces of one batch, not N times as many."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        t = trainer(four_pairs, tmp_path, batchsize=2, accum_steps=2, rates=(1.0,))
        t.net = nn.parallel.DistributedDataParallel(t.model)
        reduced: list[int] = []

        def counting_allreduce(state, bucket):
            reduced.append(bucket.buffer().numel())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        t.net.register_comm_hook(None, counting_allreduce)
        t.sampler.set_epoch(1)
        images, gts, _ = next(iter(t.loader))
        t.train_batches([(images[:1], gts[:1]), (images[1:], gts[1:])], epoch=1)  # DDP settles its buckets
        reduced.clear()
        t.train_batches([(images, gts)], epoch=1)
        one_batch = list(reduced)
        reduced.clear()
        t.train_batches([(images[:1], gts[:1]), (images[1:], gts[1:])], epoch=1)
        assert one_batch and reduced == one_batch  # every gradient element all-reduced exactly once
        assert sum(one_batch) == sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
