"""Hostile inputs and faults across test.py, eval.py and train.py: each ends in one clear line, the right
exit code (0 done, 1 some items failed or a run-time fault, 2 refused before any work, 130 interrupted),
and nothing already computed is lost. Real FSANet on CPU at tiny sizes; only OS errors are simulated."""
from __future__ import annotations

import builtins
import errno
import logging
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, read_only
from PIL import Image
from torch.utils.data import DataLoader

import eval as eval_script
import train
from lib import FSANet
from lib.checkpoint import CheckpointError, check_compatible, torch_load_weights
from pipelines import inference
from pipelines.cli import load_script, run_cli
from pipelines.training.checkpointing import CheckpointSaveError, RunState, save_checkpoint
from pipelines.training.config import TrainConfig, check_config
from utils import atomic
from utils.atomic import check_writable_dir, remove_stale_temps
from utils.data import TrainDataset, train_collate
from utils.errors import FSANetError
from utils.imageio import ImageReadError, image_size, is_readable_png, read_rgb, set_max_pixels
from utils.synthetic import generate_split

SMALL = "64"


def bomb_png(path: Path, side: int = 60000) -> Path:
    """A ~9 KB grayscale PNG whose header says side x side pixels (3.6 G for 60000): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\0" * ((side + 1) * 128), 9)  # the first rows only: the file stays tiny
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def rotated_photo(path: Path, width: int = 40, height: int = 24) -> Path:
    """A JPEG stored width x height whose EXIF orientation 6 makes viewers show it height x width."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = 200
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def temp_files(folder: Path) -> list[Path]:
    """Hidden temporary files of atomic writes under folder."""
    return [p for p in folder.rglob(".*.tmp")]


def one_error_line(stderr: str, *needles: str) -> str:
    """The single `error:` line of stderr (log lines aside), checked to name every needle."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def default_pixel_budget():
    """Every test starts and ends with the default pixel budget."""
    set_max_pixels(None)
    yield
    set_max_pixels(None)


# ---------------------------------------------------------------- images: bombs, EXIF, unreadable maps

def test_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 16_000
    for read in (read_rgb, image_size):
        with pytest.raises(ImageReadError, match=r"bomb.png: header says 60000x60000.*--max_pixels"):
            read(bomb)
    set_max_pixels(60000 * 60000)
    assert image_size(bomb) == (60000, 60000)  # a raised budget lets a genuine large header through


@pytest.mark.slow
def test_bomb_beside_a_good_image_under_a_memory_limit(release_checkpoint: Path, tmp_path: Path) -> None:
    """ulimit -v 6000000: exit 1, the bomb named, the good map written (in the photo's displayed orientation)."""
    photos, out = tmp_path / "photos", tmp_path / "maps"
    photos.mkdir()
    bomb_png(photos / "a_bomb.png")
    rotated_photo(photos / "b_phone.jpg")
    (photos / "c_anim.gif").write_bytes(b"GIF89a")

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6_000_000 * 1024, 6_000_000 * 1024))
    result = subprocess.run([sys.executable, str(ROOT / "test.py"), "--pth_path", str(release_checkpoint),
                             "--input", str(photos), "--save_root", str(out), "--testsize", SMALL, "--device", "cpu",
                             "--runtime", "torch"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit_memory)
    assert result.returncode == 1, result.stderr
    assert "a_bomb.png: header says 60000x60000" in result.stderr and "MemoryError" not in result.stderr
    assert "c_anim.gif" in result.stderr  # the unsupported file is named, not skipped silently
    with Image.open(out / "b_phone.png") as im:
        assert im.size == (24, 40)  # displayed orientation: the stored 40x24 turned by EXIF 6
    assert not (out / "a_bomb.png").exists() and not temp_files(out)


def test_exif_orientation_only_in_folder_mode(tmp_path: Path) -> None:
    photo = rotated_photo(tmp_path / "p.jpg")
    release = inference.ImageListDataset([photo], 32)[0]
    shown = inference.ImageListDataset([photo], 32, exif=True)[0]
    fast = inference.ImageListDataset([photo], 32, fast_decode=True, exif=True)[0]
    assert release.size == (24, 40) and shown.size == fast.size == (40, 24)  # (height, width)
    assert not torch.equal(release.image, shown.image)


def test_unreadable_existing_map_is_not_skipped(tmp_path: Path) -> None:
    empty, good = tmp_path / "empty.png", tmp_path / "good.png"
    empty.write_bytes(b"")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-20])
    assert is_readable_png(good) and not is_readable_png(empty) and not is_readable_png(cut)
    assert not is_readable_png(tmp_path / "missing.png")


# ---------------------------------------------------------------- test.py

def test_test_py_unwritable_save_root_is_refused_before_the_model(tmp_path: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rotated_photo(photos / "x.jpg")
    script = load_script("test.py")
    blocker = tmp_path / "file"
    blocker.write_text("")
    # The checkpoint does not exist: refusing before it is read proves no work was done.
    base = ["--pth_path", str(tmp_path / "unused.pth"), "--input", str(photos)]
    assert script.main(base + ["--save_root", str(blocker / "maps")]) == 2
    one_error_line(capsys.readouterr().err, "--save_root", "not a directory")
    locked = read_only_folder(tmp_path / "locked", monkeypatch)
    assert script.main(base + ["--save_root", str(locked)]) == 2
    one_error_line(capsys.readouterr().err, "--save_root", str(locked), "permission denied")


def read_only_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new folder nothing can be written in (as root, which writes anywhere, the OS's answer is simulated)."""
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    return folder


def train_py_running(split: Path, save_root: Path, preexec_fn) -> tuple[subprocess.Popen, list[str]]:
    """train.py started on `split` for 50 epochs with 2 DataLoader workers, once its loop runs; its stderr so far."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *train_args(split, save_root, "--epoch", "50", "--num_workers", "2")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    seen = []
    for line in proc.stderr:  # log lines end in newlines; wait for the loop to start
        seen.append(line)
        if "training on" in line:
            break
    return proc, seen


def stopped_by(proc: subprocess.Popen, seen: list[str], signum: int) -> str:
    """Send `signum` to a running script, wait for it to end; its whole stderr (`seen` so far and the rest)."""
    proc.send_signal(signum)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    return "".join(seen) + rest


def test_stale_temps_removed_and_empty_maps_redone(release_model: torch.nn.Module, tmp_path: Path, caplog) -> None:
    photos, out = tmp_path / "photos", tmp_path / "maps"
    photos.mkdir()
    out.mkdir()
    for name in ("a.jpg", "b.jpg"):
        rotated_photo(photos / name)
    (out / "a.png").write_bytes(b"")  # a 0-byte map left by another tool
    Image.fromarray(np.full((40, 24), 9, np.uint8)).save(out / "b.png")
    orphan, foreign = out / ".a.png.k2j4_x9q.tmp", out / ".notes.tmp"
    orphan.write_bytes(b"partial")
    foreign.write_text("not ours")
    options = inference.InferenceOptions(testsize=int(SMALL), skip_existing=True)
    with caplog.at_level(logging.INFO):
        summary = inference.predict_jobs(release_model, [inference.folder_job(photos, out, exif=True)], options)
    assert (summary.written, summary.skipped, summary.failed) == (1, 1, [])
    assert is_readable_png(out / "a.png") and not orphan.exists() and foreign.exists()
    assert "removed 1 temporary file" in caplog.text


def interruptible() -> None:
    """Child set-up: Ctrl-C raises KeyboardInterrupt even when this run was started in the background.

    A shell without job control starts background jobs with SIGINT ignored, children inherit that,
    and Python then never installs its KeyboardInterrupt handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def maps_being_written(checkpoint: Path, tmp_path: Path, preexec_fn) -> tuple[subprocess.Popen, Path]:
    """test.py started on 200 small photos, once it has written its first map (or ended); its output folder."""
    photos, out = tmp_path / "photos", tmp_path / "maps"
    photos.mkdir()
    for i in range(200):
        Image.fromarray(np.full((48, 40, 3), i, np.uint8)).save(photos / f"p{i:03d}.png")
    proc = subprocess.Popen([sys.executable, str(ROOT / "test.py"), "--pth_path", str(checkpoint),
                             "--input", str(photos), "--save_root", str(out), "--testsize", SMALL, "--device", "cpu",
                             "--runtime", "torch"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    deadline = time.monotonic() + 300
    while not list(out.glob("p*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc, out


@pytest.mark.slow
def test_ctrl_c_in_test_py_reports_maps_written(release_checkpoint: Path, tmp_path: Path) -> None:
    proc, out = maps_being_written(release_checkpoint, tmp_path, interruptible)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "maps written" in last and "--skip_existing" in last
    assert "Traceback" not in stderr and not temp_files(out)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("kind, needle", [
    ("text", "is a text file, not a PyTorch checkpoint"),
    ("junk", "binary data starting with"),
    ("pickle_junk", "truncated or damaged"),
    ("folder", "is a folder, not a checkpoint file"),
    ("empty", "is empty (0 bytes)"),
    ("cut", "truncated or damaged"),
])
def test_checkpoint_messages_say_what_the_file_is(kind: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    if kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "junk":
        path.write_bytes(b"\x01\x02\x03\x04\x05")
    elif kind == "pickle_junk":
        path.write_bytes(b"\x80\x02jnk")
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError) as err:
        torch_load_weights(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message
    assert "174812789" not in message and "other than tensors" not in message


def test_wrong_freq_encoder_hints_at_the_flag() -> None:
    with torch.device("meta"):
        resnet, res2net = FSANet(freq_encoder="resnet50"), FSANet(freq_encoder="res2net50")
    with pytest.raises(CheckpointError, match="pass the --freq_encoder it was trained with"):
        check_compatible(res2net, resnet.state_dict(), "resnet.pth")


# ---------------------------------------------------------------- eval.py

def test_eval_prints_the_table_before_failed_outputs(reference_dir: Path, tmp_path: Path, capsys, caplog) -> None:
    case = reference_dir / "eval_case"
    stems = sorted(p.stem for p in (case / "gt").glob("*.png"))[:2]
    (tmp_path / "gt" / "case" / "gt").mkdir(parents=True)
    (tmp_path / "pred" / "case").mkdir(parents=True)
    for stem in stems:
        shutil.copy(case / "gt" / f"{stem}.png", tmp_path / "gt" / "case" / "gt")
        Image.open(case / "pred" / f"{stem}.png").convert("RGB").save(tmp_path / "pred" / "case" / f"{stem}.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        code = eval_script.main(["--gt_root", str(tmp_path / "gt"), "--pred_root", str(tmp_path / "pred"),
                                 "--datasets", "case", "--workers", "1", "--no_cache",
                                 "--save_json", str(blocker / "m.json"), "--save_csv", str(tmp_path / "m.csv")])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines()[0].startswith("| Dataset |") and "| case |" in out
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        line for line in err.splitlines() if "m.json" in line]
    assert (tmp_path / "m.csv").is_file()  # the other outputs are still written
    assert "not grayscale" in caplog.text and stems[0] in caplog.text  # RGB maps converted with a note


def test_eval_names_a_bomb_prediction_and_exits_1(reference_dir: Path, tmp_path: Path, capsys) -> None:
    case = reference_dir / "eval_case"
    stem = sorted(p.stem for p in (case / "gt").glob("*.png"))[0]
    (tmp_path / "gt" / "case" / "gt").mkdir(parents=True)
    (tmp_path / "pred" / "case").mkdir(parents=True)
    shutil.copy(case / "gt" / f"{stem}.png", tmp_path / "gt" / "case" / "gt")
    bomb_png(tmp_path / "pred" / "case" / f"{stem}.png")
    code = eval_script.main(["--gt_root", str(tmp_path / "gt"), "--pred_root", str(tmp_path / "pred"),
                             "--datasets", "case", "--workers", "1", "--no_cache"])
    assert code == 1  # found at run time, not a refused setup
    one_error_line(capsys.readouterr().err, f"{stem}.png: header says 60000x60000")


# ---------------------------------------------------------------- train.py

@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIS-TR with 3 synthetic 96x80 pairs plus one JPEG cut mid-body (its header reads fine): 2 full batches."""
    root = tmp_path_factory.mktemp("rel_dis5k")
    generate_split(root, "DIS-TR", 3, seed=0, size=(96, 80))
    split = root / "DIS-TR"
    data = (split / "im" / "tr_0000.jpg").read_bytes()
    (split / "im" / "cut.jpg").write_bytes(data[: len(data) // 2])
    shutil.copy(split / "gt" / "tr_0000.png", split / "gt" / "cut.png")
    return split


def train_args(split: Path, save_root: Path, *extra: str) -> list[str]:
    """A tiny CPU run from random weights: one rate, 4 pairs, batch 2."""
    return ["--train_path", str(split), "--trainsize", "32", "--rates", "1", "--batchsize", "2", "--no_pretrained",
            "--device", "cpu", "--save_root", str(save_root), "--train_save", "run", "--save_every", "0", *extra]


@pytest.mark.parametrize("flags, needle", [
    (("--lr", "-1"), "--lr -1.0: must be positive"),
    (("--weight_decay", "-1"), "--weight_decay -1.0: must be 0 or more"),
    (("--clip", "-1"), "--clip -1.0: must be positive"),
    (("--clip", "0"), "0 zeroes all gradients"),
])
def test_bad_optimiser_flags_are_refused(flags, needle, tiny_split: Path, tmp_path: Path, capsys) -> None:
    assert train.main(train_args(tiny_split, tmp_path, *flags)) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()


def test_one_epoch_warns_about_lr_zero(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        check_config(TrainConfig(epoch=1))
    assert "--epoch 1" in caplog.text and "lr 0" in caplog.text


def test_train_save_root_checked_before_training(tiny_split: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train.main(train_args(tiny_split, blocker)) == 2
    one_error_line(capsys.readouterr().err, "--save_root", str(blocker))


def writes_to_a_full_disk(path, mode="r", *args, **kwargs):
    """open() as on a full disk: files opened for writing go to /dev/full (ENOSPC), reads are untouched."""
    return builtins.open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(atomic, "open", lambda _, mode: builtins.open("/dev/full", mode),  # noqa: SIM115
                        raising=False)
    with pytest.raises(CheckpointSaveError, match="no space left on device") as err:
        save_checkpoint({"epoch": 2, "w": torch.zeros(1_000_000)}, path)
    assert err.value.exit_code == 1 and str(path) in str(err.value) and "previous last.pth is kept" in str(err.value)
    assert torch.load(path, weights_only=True)["epoch"] == 1 and not temp_files(tmp_path)


def test_train_cache_dir_behind_a_file_is_refused_before_training(tiny_split: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train.main(train_args(tiny_split, tmp_path, "--cache_dir", str(blocker / "cache"))) == 2
    one_error_line(capsys.readouterr().err, "--cache_dir", str(blocker / "cache"), "not a directory")
    assert not (tmp_path / "run").exists()


def test_read_only_train_cache_is_read_and_the_rest_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    split, cache = tmp_path / "DIS-TR", tmp_path / "cache"
    generate_split(tmp_path, "DIS-TR", 2, seed=0, size=(96, 80))
    expected = [TrainDataset(split, 32)[i] for i in range(2)]
    TrainDataset(split, 32, cache_dir=cache)[0]  # one pair cached
    cached = sorted(cache.iterdir())
    read_only(monkeypatch, cache)
    with caplog.at_level(logging.WARNING):
        dataset = TrainDataset(split, 32, cache_dir=cache)
        got = [dataset[i] for i in range(2)]
    assert all(torch.equal(a, b) for pair, want in zip(got, expected) for a, b in zip(pair, want))
    assert sorted(cache.iterdir()) == cached
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"--cache_dir {cache}" in warnings[0] and "read" in warnings[0]


def test_train_cache_on_a_full_disk_warns_once_and_serves_the_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from utils import data

    split = tmp_path / "DIS-TR"
    generate_split(tmp_path, "DIS-TR", 3, seed=0, size=(96, 80))
    expected = [TrainDataset(split, 32)[i] for i in range(3)]

    monkeypatch.setattr(data, "open", writes_to_a_full_disk, raising=False)
    dataset = TrainDataset(split, 32, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        got = [dataset[i] for i in range(3)]
    assert all(torch.equal(a, b) for pair, want in zip(got, expected) for a, b in zip(pair, want))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no space left on device" in warnings[0], warnings
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list((tmp_path / "cache").glob(".*"))


def test_checkpoints_skip_the_zip_crc32_and_still_load(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 3, "w": torch.arange(1000.0)}, path)
    with zipfile.ZipFile(path) as archive:
        data = [info for info in archive.infolist() if "/data/" in info.filename]
        assert data and all(info.CRC == 0 for info in data)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(1000.0))
    assert torch.serialization.get_crc32_options()  # other torch.save calls still write them


@pytest.mark.slow
def test_cut_jpeg_skipped_in_workers_then_full_disk(tiny_split: Path, tmp_path: Path, capsys, caplog,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--on_bad skip: the cut JPEG is named once, when a DataLoader worker fails to decode it, and the epoch is
    trained; its save then meets a full disk (writes go to /dev/full): exit 1, the OS's reason and the path, no
    temp file left. A stale temp file of a killed run is removed first (keeping the earlier checkpoint whole
    on a full disk is test_failed_save_keeps_the_previous_checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pth.abc123xy.tmp").write_bytes(b"left by a killed run")

    monkeypatch.setattr(atomic, "open", writes_to_a_full_disk, raising=False)
    with caplog.at_level(logging.INFO):
        code = train.main(train_args(tiny_split, tmp_path, "--epoch", "2", "--num_workers", "2"))
    assert code == 1
    one_error_line(capsys.readouterr().err, "no space left on device", str(run / "last.pth"), "after epoch 1")
    assert "epoch 1/2: lr" in caplog.text  # the epoch was trained before the save failed
    assert not list(run.glob("*.pth")) and not temp_files(run) and "removed 1 temporary file" in caplog.text
    reports = [r for r in caplog.records if "cut.jpg" in r.getMessage() and "cannot be decoded" in r.getMessage()]
    assert len(reports) == 1 and "changed after" not in caplog.text


def test_cut_jpeg_with_on_bad_error_stops_with_a_true_message(tiny_split: Path, capsys) -> None:
    """In a DataLoader worker, as train.py loads it: one true line (not 'changed after indexing'), exit 1."""
    dataset = TrainDataset(tiny_split, trainsize=32, on_bad="error")  # indexing passes: headers are fine
    batches = iter(DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=train_collate, timeout=120))
    assert run_cli(lambda: len(list(batches))) == 1
    line = one_error_line(capsys.readouterr().err, "cut.jpg", "--on_bad skip")
    assert "changed after" not in line and "DataLoader" not in line
    # Freed after a worker's error, torch's iterator waits 5 s (MP_STATUS_CHECK_INTERVAL) for that worker to end
    # (train.py's process ends without freeing it): end the worker here, not in a later test's collection.
    for worker in batches._workers:
        worker.terminate()


@pytest.mark.slow
def test_ctrl_c_in_train_py_is_one_line(tiny_split: Path, tmp_path: Path) -> None:
    """A real SIGINT once training has started (DataLoader workers running): one line, exit 130."""
    proc, seen = train_py_running(tiny_split, tmp_path, interruptible)
    stderr = stopped_by(proc, seen, signal.SIGINT)
    assert proc.returncode == 130, stderr
    final = stderr.strip().splitlines()[-1]
    assert final.startswith("interrupted: in epoch 1 of 50") and "no checkpoint was saved yet" in final, final
    assert "Traceback" not in stderr and not temp_files(tmp_path)


def test_interrupted_training_names_the_checkpoint_to_resume(tmp_path: Path) -> None:
    cfg = TrainConfig(save_root=str(tmp_path), train_save="run", epoch=10)
    assert train.progress(cfg, []) == "before training started; nothing was saved"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth").write_bytes(b"")
    running = [SimpleNamespace(state=RunState(epoch=3))]  # the part of a Trainer progress() reads
    assert train.progress(cfg, running) == (f"in epoch 4 of 10 (3 completed); resume with --pre_model "
                                            f"{tmp_path / 'run' / 'last.pth'}")


# ---------------------------------------------------------------- shared plumbing

def test_worker_wrapped_errors_and_ctrl_c_are_one_line(capsys) -> None:
    def wrapped() -> int:
        raise FSANetError("Caught FSANetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          "call last):\n  File \"x.py\", line 1\nutils.errors.FSANetError: a.jpg: broken")

    def interrupted() -> int:
        raise KeyboardInterrupt
    assert run_cli(wrapped) == 2
    assert capsys.readouterr().err == "error: a.jpg: broken\n"
    assert run_cli(interrupted, lambda: "3 maps written") == 130
    assert capsys.readouterr().err == "interrupted: 3 maps written\n"


def test_stale_temp_names_are_recognised(tmp_path: Path) -> None:
    ours = [tmp_path / ".last.pth.a1b2c3d4.tmp", tmp_path / ".x.png.zz_9abcd.tmp"]
    others = [tmp_path / ".last.pth.tmp", tmp_path / "x.png.a1b2c3d4.tmp", tmp_path / ".cfg.yaml.a1b2c3d4.tmp"]
    for path in ours + others:
        path.write_text("")
    assert sorted(remove_stale_temps(tmp_path, (".pth", ".png"))) == sorted(ours)
    assert all(p.exists() for p in others)
    check_writable_dir(tmp_path / "new" / "deeper", "--save_root")  # creatable: accepted, nothing created
    assert not (tmp_path / "new").exists()
