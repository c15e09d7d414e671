"""train.py end to end on a tiny synthetic dataset with the real FSANet (trainsize 32, batch 2, CPU)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, child_env

import train
from lib import FSANet, load_checkpoint
from pipelines.training import TrainConfig, Trainer
from pipelines.training.checkpointing import CHECKPOINT_FORMAT
from pipelines.training.reproducibility import tensors_digest
from utils.synthetic import generate_split

SEED = 7


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """DIS-TR with 4 and DIS-VD with 2 synthetic 96x80 pairs (DIS5K v1.0 layout)."""
    root = tmp_path_factory.mktemp("tiny_dis5k")
    generate_split(root, "DIS-TR", 4, seed=0, size=(96, 80))
    generate_split(root, "DIS-VD", 2, seed=0, size=(96, 80))
    return root


@pytest.fixture(autouse=True)
def drop_checkpoints(tmp_path):
    """Delete each test's checkpoints afterwards: every one holds 1.3 GB (weights and AdaXW moments)."""
    yield
    remove_checkpoints(tmp_path)


def remove_checkpoints(folder: Path) -> None:
    """Delete every .pth file under folder."""
    for path in folder.rglob("*.pth"):
        path.unlink()


def cli_args(train_path: Path, save_root: Path, name: str, *extra: str) -> list[str]:
    """train.py flags for a tiny CPU run from random weights."""
    return ["--train_path", str(train_path), "--trainsize", "32", "--batchsize", "2", "--no_pretrained",
            "--num_workers", "0", "--device", "cpu", "--save_root", str(save_root), "--train_save", name,
            "--seed", str(SEED), *extra]


def load(path: Path) -> dict:
    """A training checkpoint, read the way users read it (mapped: its 1.3 GB are not copied to be compared)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def parameter_names() -> list[str]:
    """Names of FSANet's parameters (not buffers), from a weightless meta-device model."""
    with torch.device("meta"):
        return [name for name, _ in FSANet().named_parameters()]


def assert_never_used_untouched(ckpt: dict) -> None:
    """FSANet's never-used parameters got no AdaXW step: not even a zero gradient's (no state), so no decay.

    `radius == 100.0` alone cannot tell: float32 rounds the default lr x weight decay away.
    """
    names = parameter_names()
    with torch.device("meta"):
        never_used = FSANet().never_used_parameters()
    assert len(never_used) == 9
    assert not {names.index(n) for n in never_used} & set(ckpt["optimizer"]["state"])
    assert len(ckpt["optimizer"]["state"]) == len(names) - len(never_used)  # every other one was stepped
    assert ckpt["model"]["frequency.radius"].item() == 100.0


def assert_same_state(a: dict, b: dict) -> None:
    """Model tensors, optimiser state and counters are bit-identical."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[index][name], sb[index][name]), (index, name)
        assert sa[index]["step"] == sb[index]["step"]
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])


def test_bad_data_is_reported_by_file_name(tiny_data, tmp_path, capsys):
    split = tmp_path / "DIS-TR"
    shutil.copytree(tiny_data / "DIS-TR", split)
    (split / "gt" / "tr_0001.png").unlink()  # an image without its mask
    (split / "im" / "broken.jpg").write_bytes(b"not a jpeg")
    (split / "gt" / "broken.png").write_bytes(b"not a png")
    rc = train.main(cli_args(split, tmp_path / "ck", "bad", "--on_bad", "error"))
    assert rc == 2  # refused before any work
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tr_0001.jpg" in err and "broken.jpg" in err
    assert not (tmp_path / "ck" / "bad" / "last.pth").exists()


def test_missing_pretrained_weights_stop_with_a_clear_message(tiny_data, tmp_path, capsys):
    args = [a for a in cli_args(tiny_data / "DIS-TR", tmp_path, "nopre") if a != "--no_pretrained"]
    rc = train.main(args + ["--pvt_path", str(tmp_path / "missing_pvt.pth"),
                            "--resnet_path", str(tmp_path / "missing_resnet.pth")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing_pvt.pth" in err and "--no_pretrained" in err


@pytest.mark.parametrize("flags, message", [
    (("--batchsize", "1"), "--batchsize 1: must be at least 2"),
    (("--val_size", "100"), "--val_size 100: must be a positive multiple of 32"),
    pytest.param(("--device", "cuda"), "--device cuda: no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_unusable_options_stop_with_one_clear_line(tiny_data, tmp_path, capsys, flags, message):
    rc = train.main(cli_args(tiny_data / "DIS-TR", tmp_path, "opts", *flags))
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "opts").exists()


# The DDP and fp16 runs come first: the runs further down keep two 1.3 GB checkpoints until the module ends, and
# while they are held every process on a machine short of memory runs slower.
def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_trains_identical_replicas(tiny_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "train.py"),
           *cli_args(tiny_data / "DIS-TR", tmp_path, "ddp", "--epoch", "2", "--stop_after_epoch", "1", "--rates", "1")]
    # TMPDIR: torchrun's log folder (torchelastic_*) goes to tmp_path, removed with it.
    env = child_env(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine; no hostname lookup needed
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    line = next(text for text in log.splitlines() if "parameter sha256 per rank:" in text)
    digests = line.split("per rank:")[1].split(";")[0].split()
    assert len(digests) == 2 and digests[0] == digests[1]

    ckpt = load(tmp_path / "ddp" / "last.pth")
    names = set(parameter_names())
    assert tensors_digest((k, v) for k, v in ckpt["model"].items() if k in names) == digests[0]
    # 4 images, 2 per process per batch: each rank took one batch, one optimiser step (one rate: the replicas'
    # agreement, not the multi-scale recipe, is the subject here).
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (1, 1, 2)
    assert len(ckpt["rng_ranks"]) == 2 and not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
    assert_never_used_untouched(ckpt)  # and DDP trained without find_unused_parameters
    assert len(list((tmp_path / "ddp" / "tb").iterdir())) == 1  # rank 0 alone logs


@pytest.mark.slow
def test_fp16_run_keeps_its_grad_scaler_and_validates(tiny_data, tmp_path):
    two_images = tiny_data / "DIS-VD"
    # One rate, one optimiser step: CPU fp16 kernels are slow, and one step moves the GradScaler's state.
    rc = train.main(cli_args(two_images, tmp_path, "amp", "--epoch", "2", "--stop_after_epoch", "1", "--rates", "1",
                             "--amp", "fp16", "--channels_last", "--val_path", str(two_images), "--val_size", "64"))
    assert rc == 0
    run = tmp_path / "amp"
    assert sorted(p.name for p in run.glob("*.pth")) == ["best.pth", "last.pth"]
    ckpt = load(run / "last.pth")
    # The GradScaler ran: its state moved from the initial one (a step counted, or the scale halved on an
    # overflow, which CPU fp16 kernels of some torch versions hit).
    scaler = ckpt["scaler"]
    assert scaler["scale"] > 0 and (scaler["_growth_tracker"] > 0 or scaler["scale"] < 2.0**16)
    scalars = tensorboard_scalars(run)
    assert scalars["val/maxF"] == [pytest.approx(ckpt["best_maxf"])] and 0 < ckpt["best_maxf"] <= 1
    assert len(scalars["val/MAE"]) == 1 and 0 <= scalars["val/MAE"][0] <= 1
    cfg = TrainConfig(train_path=str(two_images), trainsize=64, batchsize=2, num_workers=0, device="cpu",
                      save_root=str(tmp_path), train_save="amp", epoch=2, amp="fp16", pre_model=str(run / "last.pth"))
    trainer = Trainer(cfg)
    assert trainer.scaler.state_dict() == ckpt["scaler"]  # resuming restores the GradScaler
    trainer.writer.close()


@pytest.fixture(scope="module")
def train_split(tiny_data, tmp_path_factory) -> Path:
    """The 4 training pairs plus an image whose mask is missing (skipped by name)."""
    split = tmp_path_factory.mktemp("with_bad") / "DIS-TR"
    shutil.copytree(tiny_data / "DIS-TR", split)
    shutil.copy(split / "im" / "tr_0000.jpg", split / "im" / "orphan.jpg")
    return split


# The planned schedule is 3 epochs; the runs stop after epoch 2, whose learning rate is still non-zero. Two rates:
# the multi-scale loop (an optimiser step per rate) resumes mid-epoch; the release's three cost a third more.
SCHEDULE = ("--epoch", "3", "--save_every", "3", "--rates", "1", "1.25")


@pytest.fixture(scope="module")
def straight_run(train_split, tmp_path_factory) -> Iterator[Path]:
    """Epochs 1 and 2 of the schedule trained without interruption."""
    save_root = tmp_path_factory.mktemp("straight")
    assert train.main(cli_args(train_split, save_root, "run", *SCHEDULE, "--stop_after_epoch", "2")) == 0
    yield save_root / "run"
    remove_checkpoints(save_root)


@pytest.fixture(scope="module")
def killed_run(train_split, tmp_path_factory) -> Iterator[Path]:
    """The same run in its own process, saving after every batch and killed (SIGKILL) inside epoch 1."""
    save_root = tmp_path_factory.mktemp("killed")
    cmd = [sys.executable, str(ROOT / "train.py"),
           *cli_args(train_split, save_root, "run", *SCHEDULE, "--save_iters", "1")]
    # The same thread count as this process, so both runs sum in the same order.
    env = child_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    last = save_root / "run" / "last.pth"
    with open(save_root / "train.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # last.pth appears (by rename) after batch 1; batch 2's two steps leave time to kill it mid-epoch.
            deadline = time.monotonic() + 400
            while proc.poll() is None and not last.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.kill()
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (save_root / "train.log").read_text()[-3000:]
    ckpt = load(last)
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["step"]) == (0, 1, 2)  # one of epoch 1's two batches done
    yield save_root / "run"
    remove_checkpoints(save_root)


def linked_copy(run: Path, save_root: Path) -> Path:
    """The run folder hard-linked under save_root: checkpoints are replaced by rename, so the source stays intact."""
    dest = save_root / run.name
    shutil.copytree(run, dest, copy_function=os.link)
    return dest


def tensorboard_scalars(run: Path) -> dict[str, list[float]]:
    """Every scalar series the run wrote to <run>/tb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs_it(straight_run):
    scalars = tensorboard_scalars(straight_run)
    for tag in ("train/loss", "train/P1", "train/P2", "train/P3", "train/P4", "train/lr", "train/images_per_s"):
        assert len(scalars[tag]) == 4, tag  # 2 batches per epoch, 2 epochs
    loss = scalars["train/loss"]
    assert loss[2] + loss[3] < loss[0] + loss[1]  # the same 4 images: epoch 2's loss is lower
    assert scalars["train/lr"] == pytest.approx([2e-4 * (2 / 3) ** 0.9] * 2 + [2e-4 * (1 / 3) ** 0.9] * 2)


@pytest.mark.slow
def test_checkpoints_hold_the_full_training_state(straight_run):
    # Release names: after epoch e with (e + 1) % save_every == 0, FSANet-{e+1}.pth (it holds e epochs).
    assert sorted(p.name for p in straight_run.glob("*.pth")) == ["FSANet-3.pth", "last.pth"]
    ckpt = load(straight_run / "last.pth")
    assert ckpt["format"] == CHECKPOINT_FORMAT and (ckpt["epoch"], ckpt["step"]) == (2, 8)
    assert {"model", "optimizer", "scaler", "rng", "args"} <= ckpt.keys()
    assert {"python", "numpy", "torch"} <= ckpt["rng"].keys() and ckpt["args"]["epoch"] == 3
    assert set(parameter_names()) <= ckpt["model"].keys()  # no module. prefixes
    assert_never_used_untouched(ckpt)
    assert_same_state(ckpt, load(straight_run / "FSANet-3.pth"))


@pytest.mark.slow
def test_a_checkpoint_loads_back_into_the_whole_model_state(straight_run):
    # The whole state dict, BatchNorm's 0-dim num_batches_tracked included.
    saved = load(straight_run / "last.pth")["model"]
    model = load_checkpoint(FSANet(), straight_run / "last.pth")
    assert tensors_digest(model.state_dict().items()) == tensors_digest(saved.items())


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(train_split, killed_run, straight_run, tmp_path):
    run = linked_copy(killed_run, tmp_path)
    rc = train.main(cli_args(train_split, tmp_path, "run", *SCHEDULE, "--stop_after_epoch", "2",
                             "--pre_model", str(run / "last.pth")))
    assert rc == 0
    straight, resumed = load(straight_run / "last.pth"), load(run / "last.pth")
    assert (resumed["epoch"], resumed["iteration"], resumed["step"]) == (2, 0, 8)
    assert_same_state(straight, resumed)
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])
    killed = load(killed_run / "last.pth")["model"]
    assert any(not torch.equal(killed[k], resumed["model"][k]) for k in parameter_names())  # it trained on


@pytest.mark.slow
def test_resuming_a_finished_schedule_trains_nothing(train_split, straight_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = linked_copy(straight_run, tmp_path)
    before = (run / "last.pth").stat()
    rc = train.main(cli_args(train_split, tmp_path, "run", "--epoch", "2", "--pre_model", str(run / "last.pth")))
    assert rc == 0
    assert "already complete" in caplog.text
    assert (run / "last.pth").stat().st_mtime_ns == before.st_mtime_ns
    assert "orphan.jpg" in caplog.text  # the image without a mask is skipped by name (--on_bad skip)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(train_split, killed_run, tmp_path, capsys):
    run = linked_copy(killed_run, tmp_path)
    before = (run / "last.pth").stat()
    rc = train.main(cli_args(train_split, tmp_path, "run", *SCHEDULE, "--save_iters", "1", "--lr", "1e30",
                             "--pre_model", str(run / "last.pth")))
    assert rc == 1  # a fault at run time
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, batch 2" in err and str(run / "last.pth") in err
    after = (run / "last.pth").stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert sorted(p.name for p in run.glob("*.pth")) == ["last.pth"]


def test_release_checkpoint_initialises_weights_only(official_weights, release_checkpoint, tiny_data, tmp_path):
    # release_checkpoint: the release's layout, with optimizer
    cfg = TrainConfig(train_path=str(tiny_data / "DIS-TR"), trainsize=64, batchsize=2, num_workers=0, device="cpu",
                      save_root=str(tmp_path / "ck"), pre_model=str(release_checkpoint), epoch=3)
    trainer = Trainer(cfg)  # no --no_pretrained needed: the weights come from --pre_model
    assert (trainer.state.epoch, trainer.state.step) == (0, 0)  # the run starts at epoch 1
    assert not trainer.optimizer.state
    expected = official_weights.official_state_dict(seed=0, radius=60.0)
    assert trainer.model.frequency.radius.item() == 60.0
    assert torch.equal(trainer.model.head.conv2_1.weight.detach(), expected["conv2_1.weight"])
    trainer.writer.close()
