"""The training loop's edges: DataParallel's split of a shrunk batch, a partial last --accum_steps group,
a mid-epoch resume at another --batchsize, resume warnings, checkpoint space (CPU, tiny FSANet runs)."""
from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from pipelines.training import TrainConfig, Trainer, checkpointing
from pipelines.training.checkpointing import (
    CheckpointSaveError,
    checkpoint_bytes,
    link_checkpoint,
    save_checkpoint,
    warn_changed_settings,
)
from pipelines.training.reproducibility import EpochSampler, tensors_digest
from utils.distributed import DistContext, replica_batch_sizes, trainable_batch
from utils.synthetic import generate_split

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def chunk_sizes(batch: int, gpus: int) -> list[int]:
    """What DataParallel's scatter gives each GPU: torch.chunk of the batch along dim 0."""
    return [c.shape[0] for c in torch.chunk(torch.zeros(batch, 1), gpus)]


def test_replica_split_is_torch_chunk_and_no_gpu_trains_one_image():
    for gpus in range(1, 9):
        for batch in range(1, 41):
            assert replica_batch_sizes(batch, gpus) == chunk_sizes(batch, gpus), (batch, gpus)
            wanted = max((n for n in range(2, batch + 1) if min(chunk_sizes(n, gpus)) >= 2), default=0)
            assert trainable_batch(batch, gpus) == wanted, (batch, gpus)
    # 4 GPUs, batch 8, one undecodable file: 7 split 2+2+2+1, so 6 train; 3 over 2 GPUs cannot train.
    assert (chunk_sizes(7, 4), trainable_batch(7, 4), trainable_batch(3, 2)) == ([2, 2, 2, 1], 6, 0)


def test_sampler_resumes_by_samples_under_another_batchsize():
    """2 samples done at --batchsize 2, resumed at 4: the other 2 of the epoch's order remain, as one batch."""
    before = EpochSampler(range(4), 2, CPU, seed=0)
    before.set_epoch(1)
    order = list(before)
    after = EpochSampler(range(4), 4, CPU, seed=0)
    after.set_epoch(1, skip_samples=2)
    assert list(after) == order[2:] and after.batches_left() == 1
    after.set_epoch(1, skip_samples=3)  # one sample left: no batch BatchNorm can train
    assert list(after) == [] and after.batches_left() == 0


def test_resume_warns_for_each_changed_decode_model_and_data_flag(caplog):
    saved = TrainConfig().to_dict()
    now = TrainConfig(fast_decode=True, drop_path_rate=0.2, train_path="other/DIS-TR").to_dict()
    with caplog.at_level(logging.WARNING):
        warn_changed_settings({"args": saved, "world_size": 1}, now, 1)
    lines = caplog.text.strip().splitlines()
    assert len(lines) == 3
    for flag, new, old in [("fast_decode", "True", "False"), ("drop_path_rate", "0.2", "0.1"),
                           ("train_path", "other/DIS-TR", "data/DIS5K/DIS-TR")]:
        line = next(text for text in lines if f"--{flag} " in text)
        assert f"--{flag} {new} (the checkpoint was trained with {old})" in line


def test_resume_compares_the_training_folder_by_where_it_leads(tmp_path, monkeypatch, caplog):
    (tmp_path / "data" / "DIS-TR").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(train_path="data/DIS-TR").to_dict()
    with caplog.at_level(logging.WARNING):
        for same in (str(tmp_path / "data" / "DIS-TR"), "./data/DIS-TR/", "link/DIS-TR"):
            warn_changed_settings({"args": saved, "world_size": 1}, TrainConfig(train_path=same).to_dict(), 1)
        assert not caplog.text
        warn_changed_settings({"args": saved, "world_size": 1}, TrainConfig(train_path="data/DIS-VD").to_dict(), 1)
    assert "--train_path data/DIS-VD (the checkpoint was trained with data/DIS-TR)" in caplog.text


def failing_writer(error: Exception):
    """A stand-in for the checkpoint writer that fails as a full disk makes it fail."""
    def write(obj: object, path: Path) -> None:
        raise error
    return write


def test_failed_save_names_a_resume_file_only_when_one_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing, "atomic_torch_save",
                        failing_writer(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointSaveError) as err:
        save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    message = str(err.value)
    assert "\n" not in message and "no space left on device" in message and str(tmp_path / "last.pth") in message
    assert "--pre_model" not in message and "no checkpoint of this run exists" in message
    # PyTorch's zip writer given a path reports a short write as "unexpected pos", hiding ENOSPC.
    monkeypatch.setattr(checkpointing, "atomic_torch_save", failing_writer(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 258010112 vs 258010008")))
    with pytest.raises(CheckpointSaveError, match="no space left on device") as err:
        save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    assert "enforce fail" not in str(err.value)
    (tmp_path / "last.pth").write_bytes(b"an earlier checkpoint")
    with pytest.raises(CheckpointSaveError) as err:
        save_checkpoint({"epoch": 4}, tmp_path / "FSANet-5.pth")
    assert f"resume with --pre_model {tmp_path / 'last.pth'}" in str(err.value)


@pytest.mark.parametrize("links", [True, False], ids=["hard_link", "no_links"])
def test_a_checkpoint_saved_as_another_name_keeps_its_state(tmp_path, monkeypatch, links):
    """FSANet-N.pth and best.pth are last.pth's state of that epoch (linked, or copied where the filesystem has no
    hard links): the next epoch's last.pth leaves them as they were."""
    if not links:
        def no_link(source, target):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(checkpointing.os, "link", no_link)
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, last)
    best.write_bytes(b"an older best.pth")
    link_checkpoint(last, best, 1)
    save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, last)
    kept = torch.load(best, weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert (best.stat().st_nlink == 1) and sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]


def split_with_cut_files(root: Path, good: int, cut: int) -> Path:
    """DIS-TR with `good` synthetic 64x48 pairs and `cut` JPEGs cut mid-body (their headers read fine)."""
    split = generate_split(root, "DIS-TR", good, seed=0, size=(64, 48))
    data = (split / "im" / "tr_0000.jpg").read_bytes()
    for index in range(cut):
        (split / "im" / f"cut_{index}.jpg").write_bytes(data[: len(data) // 2])
        shutil.copy(split / "gt" / "tr_0000.png", split / "gt" / f"cut_{index}.png")
    return split


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory) -> Path:
    """6 decodable pairs and 2 undecodable ones."""
    return split_with_cut_files(tmp_path_factory.mktemp("six_and_two"), 6, 2)


def tiny_config(split: Path, save_root: Path, **options: object) -> TrainConfig:
    """The smallest training run: trainsize 32, one rate, CPU, no workers, random weights, 2 epochs."""
    values = dict(train_path=str(split), save_root=str(save_root), trainsize=32, rates=(1.0,), batchsize=2,
                  no_pretrained=True, num_workers=0, device="cpu", epoch=2, save_every=0)
    values.update(options)
    return TrainConfig(**values)


def test_refused_before_training_when_a_checkpoint_would_not_fit(eight_pairs, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=200 * 10**6))  # 0.2 GB free
    args = ["--train_path", str(eight_pairs), "--trainsize", "32", "--rates", "1", "--batchsize", "2",
            "--no_pretrained", "--device", "cpu", "--num_workers", "0", "--save_root", str(tmp_path)]
    assert train.main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: --save_root")
    assert "0.20 GB free" in lines[0] and "needs about 1.3" in lines[0]
    assert not list(tmp_path.rglob("*.pth")) and not (tmp_path / "FSANet" / "tb").exists()


class ChunkedLikeDataParallel(nn.Module):
    """DataParallel's split on the CPU: each replica's forward on torch.chunk of the batch, outputs concatenated."""

    def __init__(self, module: nn.Module, gpus: int) -> None:
        super().__init__()
        self.module, self.gpus = module, gpus

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [self.module(part) for part in torch.chunk(images, self.gpus)]
        return tuple(torch.cat(parts) for parts in zip(*outputs))


@pytest.mark.slow
def test_data_parallel_batch_shrunk_by_an_undecodable_file_still_trains(tmp_path, caplog):
    """4 GPUs, batch 8 of which one file is undecodable: 7 would split 2+2+2+1 and BatchNorm would raise."""
    split = split_with_cut_files(tmp_path / "data", 7, 1)
    trainer = Trainer(tiny_config(split, tmp_path, batchsize=8))
    trainer.close_writer()
    trainer.replicas = 4
    trainer.net = ChunkedLikeDataParallel(trainer.model, 4)
    with caplog.at_level(logging.WARNING):
        trainer.train_epoch(1)
    assert trainer.state.step == 1
    assert "batch 1: trained on 6 of its 7 decodable images" in caplog.text and "2+2+2+1" in caplog.text


def seed_with_cut_files_last(split: Path, batch: int) -> int:
    """A --seed whose epoch-1 order puts both cut files in the last batch (that batch is then skipped)."""
    stems = sorted(p.stem for p in (split / "im").iterdir())
    cut = {stems.index("cut_0"), stems.index("cut_1")}
    for seed in range(1000):
        sampler = EpochSampler(range(len(stems)), batch, CPU, seed)
        sampler.set_epoch(1)
        if set(list(sampler)[-batch:]) == cut:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.slow
def test_partial_last_accumulation_group_is_trained(eight_pairs, tmp_path, caplog):
    """--accum_steps 2 over 4 loader batches, the last one skipped: the group holding batch 3 alone is stepped."""
    seed = seed_with_cut_files_last(eight_pairs, 2)
    trainer = Trainer(tiny_config(eight_pairs, tmp_path, accum_steps=2, seed=seed))
    trainer.close_writer()
    real = trainer.train_batches
    groups: list[tuple[int, str]] = []

    def recording(batches, epoch):
        losses = real(batches, epoch)
        groups.append((len(batches), tensors_digest(trainer.model.named_parameters())))
        return losses

    trainer.train_batches = recording
    with caplog.at_level(logging.INFO):
        trainer.train_epoch(1)
    assert "batch 4 skipped" in caplog.text
    assert [size for size, _ in groups] == [2, 1] and groups[0][1] != groups[1][1]  # the trailing group moved them
    assert trainer.state.step == 2 and "over 2 batch(es)" in caplog.text


@pytest.mark.slow
def test_mid_epoch_resume_with_a_larger_batchsize_trains_the_rest_of_the_epoch(tmp_path, caplog):
    """Saved after 1 of epoch 1's 2 batches of 2, resumed at --batchsize 4: the other 2 samples train as one batch
    (counted in batches of 4, the old position skipped all 4 samples and logged a mean loss of 0 over 1 batch)."""
    split = split_with_cut_files(tmp_path / "data", 4, 0)
    first = Trainer(tiny_config(split, tmp_path, save_iters=1))
    first.close_writer()
    first.train_epoch(1)  # saves last.pth after batch 1 (not after batch 2: the end of the epoch saves that)
    last = tmp_path / "FSANet" / "last.pth"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["iteration"], saved["samples"], saved["step"]) == (0, 1, 2, 1)
    size = last.stat().st_size
    assert size <= checkpoint_bytes(first.model, first.optimizer) <= 1.05 * size  # the free-space estimate
    resumed = Trainer(tiny_config(split, tmp_path, batchsize=4, pre_model=str(last)))
    resumed.close_writer()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed.train_epoch(1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/2: lr"))
    assert "over 1 batch(es)" in line and float(line.split("mean loss ")[1].split()[0]) > 0
    assert resumed.state.step == 2  # 1 step before the checkpoint, 1 after
    resumed.state.samples = 3  # as if the checkpoint had trained 3 of the 4: one left, no batch of 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed.train_epoch(1)
    assert "epoch 1/2: nothing left to train in it" in caplog.text and resumed.state.step == 2
