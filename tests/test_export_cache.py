"""The ONNX export cache and OpenVINO's compile cache: keys that cannot go stale, and cache faults that cost no run.

Most tests stand in for the full export (about 15 s) with an exporter that writes a small valid ONNX graph with
FSANet's interface (B x 3 x S x S in, B x 1 x S x S out), so OpenVINO and onnxruntime really load
and run what the cache hands them; the swapped-checkpoint test builds the real model from the bytes.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, read_only

from pipelines.cli import load_script
from utils import cache_keys, export_cache, onnx_export, runtimes

SIZE = 32


def tiny_onnx(path: Path, size: int, bias: float = 1.0) -> None:
    """A small valid ONNX graph with FSANet's interface: the channel mean of the image plus a bias map."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, size, size])
    bias_map = numpy_helper.from_array(np.full((1, 1, size, size), bias, np.float32), "bias")
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1),
             helper.make_node("Add", ["mean", "bias"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [image], [logits], [bias_map])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def tiny_exporter(calls: list[Path]):
    """An exporter writing tiny_onnx at the spec's size; records where it was asked to write."""
    def export(spec: export_cache.ExportSpec, *args) -> float:
        path = args[-1]  # (weights, path): the weights are those of the real exporter's model only
        assert path.name.endswith(".tmp")  # written under a temporary name, renamed when complete
        calls.append(path)
        tiny_onnx(path, spec.testsize)
        return 0.0
    return export


def fake_exporter(calls: list[Path]):
    """An exporter that writes stand-in bytes (for the bookkeeping alone) and records where it wrote."""
    def export(spec: export_cache.ExportSpec, *args) -> float:
        path = args[-1]
        calls.append(path)
        path.write_bytes(f"{spec.testsize} {spec.freq_encoder}".encode() * 100)
        return 0.0
    return export


def must_not_export(spec: export_cache.ExportSpec, *args) -> float:
    """An exporter for tests where a sound entry must be used as it is."""
    raise AssertionError("a sound cache entry was exported again")


def temp_files(folder: Path) -> list[Path]:
    """The temporary files atomic_path leaves while writing (or a killed run left) under `folder`."""
    return sorted(folder.rglob("*.tmp"))


@pytest.fixture
def small_ckpt(tmp_path: Path) -> Path:
    """A stand-in checkpoint file (the cache hashes it; the stand-in exporters never load it)."""
    path = tmp_path / "weights.pth"
    path.write_bytes(b"weights v1")
    return path


@pytest.fixture
def radius_ckpt(tmp_path: Path) -> Path:
    """A small checkpoint file holding only a frequency radius (all test.py reads of it when an export stands in)."""
    path = tmp_path / "radius.pth"
    torch.save({"frequency.radius": torch.tensor([6.0])}, path)
    return path


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folder for this test alone, so what a run leaves in /tmp can be seen."""
    folder = tmp_path / "system_tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# ---- bookkeeping: entries verified, rebuilt, keyed by everything that computes them ----

def test_cache_rebuilds_missing_corrupt_and_foreign_entries(small_ckpt: Path, tmp_path: Path) -> None:
    calls: list[Path] = []
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=fake_exporter(calls))
    spec = export_cache.ExportSpec(small_ckpt, 64)
    path = cache.get(spec)
    assert len(calls) == 1 and calls[0] != path and path.read_bytes().startswith(b"64 resnet50")
    assert cache.get(spec) == path and len(calls) == 1  # hit
    # Corrupt model file (same size, one byte changed): rebuilt.
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    assert cache.get(spec) == path and len(calls) == 2
    # Truncated, then missing model file; missing and unreadable record: rebuilt each time.
    path.write_bytes(path.read_bytes()[:50])
    cache.get(spec)
    path.unlink()
    cache.get(spec)
    path.with_suffix(".json").unlink()
    cache.get(spec)
    path.with_suffix(".json").write_text("{not json")
    cache.get(spec)
    assert len(calls) == 6 and path.read_bytes().startswith(b"64 resnet50")
    assert not temp_files(path.parent)


def test_exports_another_version_made_and_nobody_used_for_30_days_are_removed(
        small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=fake_exporter(calls))
    spec = export_cache.ExportSpec(small_ckpt, 64)
    day = 86400
    with monkeypatch.context() as m:  # entries of other code versions (the format is one of the key's fields)
        m.setattr(export_cache, "CACHE_FORMAT", 98)
        old_unused = cache.get(spec)
        other_size = cache.get(export_cache.ExportSpec(small_ckpt, 128))
        m.setattr(export_cache, "CACHE_FORMAT", 99)
        old_recent = cache.get(spec)
    for path, age in ((old_unused, 31), (other_size, 31), (old_recent, 29)):
        os.utime(path.with_suffix(".json"), (time.time() - age * day,) * 2)
    new = cache.get(spec)
    assert len(calls) == 4 and new not in (old_unused, old_recent)
    assert not old_unused.exists() and not old_unused.with_suffix(".json").exists()
    assert other_size.exists() and old_recent.exists() and new.exists()  # another size; used 29 days ago


def test_a_cache_hit_stamps_the_record_not_the_model(small_ckpt: Path, tmp_path: Path) -> None:
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=fake_exporter([]))
    spec = export_cache.ExportSpec(small_ckpt, 64)
    path = cache.get(spec)
    long_ago = time.time() - 40 * 86400
    for file in (path, path.with_suffix(".json")):
        os.utime(file, (long_ago, long_ago))
    cache.exporter = must_not_export
    assert cache.get(spec) == path
    assert path.with_suffix(".json").stat().st_mtime > long_ago + 39 * 86400
    assert path.stat().st_mtime == pytest.approx(long_ago)  # OpenVINO keys its blobs by the model's time


def test_cache_key_separates_size_architecture_and_weights(small_ckpt: Path, tmp_path: Path) -> None:
    calls: list[Path] = []
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=fake_exporter(calls))
    base = cache.get(export_cache.ExportSpec(small_ckpt, 64))
    other_size = cache.get(export_cache.ExportSpec(small_ckpt, 128))
    other_arch = cache.get(export_cache.ExportSpec(small_ckpt, 64, "res2net50"))
    assert len({base, other_size, other_arch}) == 3 and len(calls) == 3
    assert other_size.read_bytes().startswith(b"128 resnet50") and other_arch.read_bytes().startswith(b"64 res2net50")
    small_ckpt.write_bytes(b"weights v2")  # retrained weights, same file name
    assert cache.get(export_cache.ExportSpec(small_ckpt, 64)) != base and len(calls) == 4
    # A record naming another size is never used for this one, even under this entry's file name.
    fields = cache.fields(export_cache.ExportSpec(small_ckpt, 64))
    model_path, record_path = cache.paths(fields)
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(dict(record, testsize=128)))
    assert "another checkpoint, size or version" in export_cache.ExportCache.check(fields, model_path, record_path)


@pytest.mark.parametrize("library", ["timm", "torchvision", "onnx-ir", "torch"])
def test_an_upgraded_library_on_the_export_path_misses_the_cache(library: str, small_ckpt: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """After `pip install -U timm` the export follows the new code, as --runtime torch does (issue 22, item 5)."""
    calls: list[Path] = []
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=fake_exporter(calls))
    spec = export_cache.ExportSpec(small_ckpt, 64)
    first = cache.get(spec)
    assert cache.get(spec) == first and len(calls) == 1
    real = cache_keys.library_versions
    monkeypatch.setattr(cache_keys, "library_versions",
                        lambda names: {n: ("99.0" if n == library else v) for n, v in real(names).items()})
    assert cache.get(spec) != first and len(calls) == 2


def test_export_key_covers_the_model_code_actually_imported() -> None:
    """The code digest reads the model's modules (not a folder listing) and the export's own code."""
    sources = cache_keys.repo_sources(export_cache.EXPORT_MODULES)
    for module in ("lib.fsanet", "lib.encoders", "lib.frequency", "lib.checkpoint", "lib.fast", "utils.onnx_export"):
        assert module in sources
    fields = export_cache.cache_fields(export_cache.ExportSpec(Path("x.pth"), 64), "ab" * 32)
    assert fields["code_sha256"] == cache_keys.code_digest(*export_cache.EXPORT_MODULES)
    assert {f"version:{n}" for n in ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnx-ir")} <= set(fields)


@pytest.mark.slow
def test_export_is_keyed_by_the_weights_it_was_built_from(release_checkpoint: Path, official_weights,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 1: test.py exports run/last.pth while training rewrites it. Whatever the timing, the
    entry's key names the digest of the weights the exported model holds."""
    checkpoint = tmp_path / "last.pth"
    shutil.copyfile(release_checkpoint, checkpoint)  # radius 60
    newer = tmp_path / "newer.pth"
    official_weights.save_official_checkpoint(newer, seed=0, radius=50.0)
    digest_of_radius = {60.0: export_cache.file_sha256(checkpoint), 50.0: export_cache.file_sha256(newer)}

    def swapping_exporter(spec: export_cache.ExportSpec, *args) -> float:
        os.replace(newer, checkpoint)  # training saves its next checkpoint meanwhile
        return export_cache.export_checkpoint(spec, *args)

    def radius_export(model: torch.nn.Module, path: Path, testsize: int, **kwargs) -> float:
        # The real model, built by the real loader; the file records the radius its weights hold.
        Path(path).write_text(str(float(model.frequency.radius)))
        return 0.0

    monkeypatch.setattr(onnx_export, "export_onnx", radius_export)
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=swapping_exporter)
    entry = cache.get(export_cache.ExportSpec(checkpoint, 64))
    record = json.loads(entry.with_suffix(".json").read_text())
    assert record["checkpoint_sha256"] == digest_of_radius[float(entry.read_text())]


def test_checkpoint_loader_reads_the_bytes_it_is_given(tmp_path: Path) -> None:
    """lib.checkpoint loads a path, the file's bytes or an open file alike (weights_only); errors name the file."""
    from lib.checkpoint import CheckpointError, read_state_dict

    path = tmp_path / "c.pth"
    torch.save({"model": {"module.a.weight": torch.arange(4.0)}, "epoch": 3}, path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        for source in (path, data, f):
            assert torch.equal(read_state_dict(source, "run/last.pth")["a.weight"], torch.arange(4.0))
    with pytest.raises(CheckpointError, match=r"^run/last.pth is a text file"):
        read_state_dict(b"hello world", "run/last.pth")
    with pytest.raises(CheckpointError, match=r"^run/last.pth is a truncated or damaged"):
        read_state_dict(data[: len(data) // 2], "run/last.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "obj": Path("x")}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(evil.read_bytes(), "evil.pth")


# ---- the checkpoint-digest memo ----

def test_checkpoint_digest_is_remembered_until_the_file_changes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint, memo = tmp_path / "weights.pth", tmp_path / "cache" / "digests.json"
    checkpoint.write_bytes(b"weights v1")
    # Just written: the clock's coarse step could hide a rewrite, so the digest is not remembered yet.
    assert export_cache.DigestMemo(memo).sha256(checkpoint) == export_cache.file_sha256(checkpoint)
    assert not memo.exists()
    monkeypatch.setattr(cache_keys, "RACY_SECONDS", -1.0)  # as if it had been written long ago
    first = export_cache.DigestMemo(memo).sha256(checkpoint)
    assert memo.is_file()
    hashed: list[Path] = []
    real = export_cache.stamped_sha256
    monkeypatch.setattr(export_cache, "stamped_sha256", lambda path: hashed.append(path) or real(path))
    assert export_cache.DigestMemo(memo).sha256(checkpoint) == first and hashed == []  # read from the memo
    checkpoint.write_bytes(b"weights v2")  # retrained in place: same name and size
    assert export_cache.DigestMemo(memo).sha256(checkpoint) == export_cache.file_sha256(checkpoint) != first
    assert hashed == [checkpoint]
    memo.write_text("{not json")  # a damaged memo costs a hash, nothing else
    assert export_cache.DigestMemo(memo).sha256(checkpoint) == export_cache.file_sha256(checkpoint)


def test_an_in_place_copy_that_keeps_the_mtime_misses_the_memo(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 2: `cp -p other.pth current.pth` keeps path, inode, size and mtime, not the content."""
    checkpoint, memo = tmp_path / "current.pth", tmp_path / "cache" / "digests.json"
    checkpoint.write_bytes(b"weights A")
    old = checkpoint.stat().st_mtime_ns - 60 * 10**9
    os.utime(checkpoint, ns=(old, old))
    monkeypatch.setattr(cache_keys, "RACY_SECONDS", -1.0, raising=False)  # remembered at once
    assert export_cache.DigestMemo(memo).sha256(checkpoint) == export_cache.file_sha256(checkpoint)
    before = checkpoint.stat()
    with open(checkpoint, "r+b") as f:  # what cp -p / rsync --inplace -t do: rewrite, then set the mtime back
        f.write(b"weights B")
    os.utime(checkpoint, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = checkpoint.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert export_cache.DigestMemo(memo).sha256(checkpoint) == export_cache.file_sha256(checkpoint)


def test_a_file_rewritten_while_hashed_is_not_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp is taken from the open file before and after hashing; a change in between is not trusted."""
    checkpoint = tmp_path / "w.pth"
    checkpoint.write_bytes(b"weights A" * 1000)
    monkeypatch.setattr(cache_keys, "RACY_SECONDS", -1.0)
    real_digest = cache_keys.hashlib.file_digest

    def digest_while_rewritten(f, name):
        checkpoint.write_bytes(b"weights B" * 1000)
        return real_digest(f, name)

    monkeypatch.setattr(cache_keys.hashlib, "file_digest", digest_while_rewritten)
    assert cache_keys.stamped_sha256(checkpoint)[1] is None
    monkeypatch.setattr(cache_keys.hashlib, "file_digest", real_digest)
    assert cache_keys.stamped_sha256(checkpoint)[1] == cache_keys.file_stamp(checkpoint.stat())


# ---- OpenVINO's compile cache ----

def compile_folders(root: Path) -> list[Path]:
    """The folders of OpenVINO's compile cache under the cache root."""
    folder = root / "openvino"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_compile_cache_is_keyed_by_the_onnx_digest_and_pruned(small_ckpt: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 6: a compiled blob lives in a folder named by the ONNX file's SHA-256 and OpenVINO's version,
    and goes with its export."""
    root, calls = tmp_path / "cache", []
    monkeypatch.setattr(export_cache, "export_checkpoint", tiny_exporter(calls))
    (root / "openvino").mkdir(parents=True)
    (root / "openvino" / "1234567890.blob").write_bytes(b"an older layout's blob")
    runner = runtimes.load_runner("openvino", export_cache.ExportSpec(small_ckpt, SIZE), None, root)
    entry = runner.source
    digest = export_cache.file_sha256(entry)
    version = cache_keys.library_versions(["openvino"])["openvino"]
    assert [p.name for p in compile_folders(root)] == [f"{digest[:32]}-openvino-{version}"]
    assert list(compile_folders(root)[0].iterdir())  # OpenVINO wrote its blob there
    other = runtimes.load_runner("openvino", export_cache.ExportSpec(small_ckpt, 2 * SIZE), None, root)
    assert len(compile_folders(root)) == 2 and len(calls) == 2
    entry.unlink()
    entry.with_suffix(".json").unlink()  # the user deleted an export: its compiled blob goes too
    runtimes.load_runner("openvino", export_cache.ExportSpec(small_ckpt, 2 * SIZE), None, root)
    digest = export_cache.file_sha256(other.source)
    assert [p.name for p in compile_folders(root)] == [f"{digest[:32]}-openvino-{version}"] and len(calls) == 2


def test_blob_compiled_from_a_corrupt_entry_is_removed(small_ckpt: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 9: OpenVINO compiles the entry beside its checksum check; a corrupt entry's blob goes."""
    root, calls = tmp_path / "cache", []
    monkeypatch.setattr(export_cache, "export_checkpoint", tiny_exporter(calls))
    spec = export_cache.ExportSpec(small_ckpt, SIZE)
    entry = runtimes.load_runner("openvino", spec, None, root).source
    data = bytearray(entry.read_bytes())
    data[-200] ^= 0x40  # one bias value, same size: the file still compiles, only the checksum tells
    entry.write_bytes(bytes(data))
    runner = runtimes.load_runner("openvino", spec, None, root)
    assert len(calls) == 2
    (folder,) = compile_folders(root)
    assert len(list(folder.iterdir())) == 1  # the blob of the sound file only, compiled after the re-export
    x = torch.rand(1, 3, SIZE, SIZE)
    assert torch.allclose(runner.predict(x), x.mean(1, keepdim=True) + 1.0, atol=1e-5)


def test_openvino_compiles_without_its_cache_when_the_folder_cannot_be_used(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    tiny_onnx(path, SIZE)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    runner = runtimes.OpenVINORunner(path, SIZE, "f32", blocker / "openvino")
    assert runner.predict(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)


# ---- cache faults: killed and failed exports, full, read-only and unusable caches ----

def test_orphaned_temp_files_are_removed_by_the_next_run(small_ckpt: Path, tmp_path: Path, dead_pid: int) -> None:
    """Issue 22, item 7: what a killed export left (its writer's pid is gone) is removed; a live writer's stays."""
    onnx = tmp_path / "cache" / "onnx"
    onnx.mkdir(parents=True)
    orphan = onnx / f".fsanet-resnet50-64-abc.onnx.{dead_pid}.abcdefgh.tmp"
    orphan.write_bytes(b"x" * 1000)
    live = onnx / f".fsanet-resnet50-64-def.onnx.{os.getppid()}.abcdefgh.tmp"
    live.write_bytes(b"y")
    cache = export_cache.ExportCache(tmp_path / "cache", exporter=fake_exporter([]))
    cache.get(export_cache.ExportSpec(small_ckpt, 64))
    assert not orphan.exists() and live.exists()


@pytest.mark.slow
def test_a_killed_exports_temp_file_is_removed_by_the_next_run(small_ckpt: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pathlib import Path\nfrom utils import export_cache\n"
            "def slow(spec, weights, path):\n"
            "    path.write_bytes(b'x' * 100000); print('exporting', flush=True); time.sleep(60)\n"
            f"export_cache.ExportCache(Path({str(root)!r}), exporter=slow)"
            f".get(export_cache.ExportSpec(Path({str(small_ckpt)!r}), 64))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "exporting"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    (left,) = temp_files(root)
    calls: list[Path] = []
    export_cache.ExportCache(root, exporter=fake_exporter(calls)).get(export_cache.ExportSpec(small_ckpt, 64))
    assert not left.exists() and not temp_files(root) and len(calls) == 1


def no_space_under(root: Path, calls: list[Path]):
    """An exporter whose writes under `root` fail with ENOSPC (a full cache disk) and work elsewhere."""
    def export(spec: export_cache.ExportSpec, *args) -> float:
        path = args[-1]
        calls.append(path)
        if path.resolve().is_relative_to(root.resolve()):
            path.write_bytes(b"half an export")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        tiny_onnx(path, spec.testsize)
        return 0.0
    return export


def test_a_full_cache_exports_to_a_temporary_folder_removed_once_loaded(small_ckpt: Path, tmp_path: Path,
                                                                        private_tmp: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    root, calls = tmp_path / "cache", []
    monkeypatch.setattr(export_cache, "export_checkpoint", no_space_under(root, calls))
    with caplog.at_level(logging.WARNING):
        runner = runtimes.load_runner("openvino", export_cache.ExportSpec(small_ckpt, SIZE), None, root)
    x = torch.rand(1, 3, SIZE, SIZE)
    assert torch.allclose(runner.predict(x), x.mean(1, keepdim=True) + 1.0, atol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no space left on device" in warnings[0] and "temporary folder" in warnings[0]
    assert len(calls) == 2 and not temp_files(root) and not list((root / "onnx").glob("*.onnx"))
    assert not list(private_tmp.iterdir())  # the temporary export is gone once OpenVINO compiled it


def test_a_full_disk_everywhere_is_one_runtime_unavailable(small_ckpt: Path, tmp_path: Path, private_tmp: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(export_cache, "export_checkpoint", no_space_under(tmp_path, calls))
    monkeypatch.setattr(export_cache, "scratch_dir", lambda prefix: tempfile.TemporaryDirectory(dir=tmp_path))
    with pytest.raises(runtimes.RuntimeUnavailable, match="no space left on device.*--runtime torch") as err:
        runtimes.load_runner("onnxruntime", export_cache.ExportSpec(small_ckpt, SIZE), None, tmp_path / "cache")
    assert "\n" not in str(err.value) and len(calls) == 2 and not temp_files(tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("reuse_release_model")
def test_test_py_on_a_full_cache_disk_writes_the_maps_with_one_warning(release_checkpoint: Path, tmp_path: Path,
                                                                       private_tmp: Path, one_photo: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Issue 22, item 9: the ONNX save hits ENOSPC (cache and temporary folder): PyTorch writes the maps."""


    def full_disk(model: torch.nn.Module, path: Path, testsize: int, **kwargs) -> float:
        Path(path).write_bytes(b"half an export")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_export, "export_onnx", full_disk)  # the real model is built, its save fails
    # 128: the checkpoint's radius leaves a high-pass band (no other warning than the cache's).
    args = ["--pth_path", str(release_checkpoint), "--input", str(one_photo), "--testsize", "128", "--device", "cpu",
            "--save_root", str(tmp_path / "maps"), "--cache_dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.WARNING):
        assert load_script("test.py").main(args) == 0
    assert (tmp_path / "maps" / "x.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no space left on device" in warnings[0]
    assert "falling back to --runtime torch" in warnings[0] and "Traceback" not in capsys.readouterr().err
    assert not temp_files(tmp_path / "cache") and not list(private_tmp.iterdir())


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_test_py_with_an_unusable_cache_dir_leaves_no_temporary_folder(kind: str, radius_ckpt: Path,
                                                                        tmp_path: Path, private_tmp: Path,
                                                                        one_photo: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 9: a `--cache_dir` that is a file or read-only costs no run and leaves no /tmp folder."""

    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        read_only(monkeypatch, cache)
    calls: list[Path] = []
    monkeypatch.setattr(export_cache, "export_checkpoint", tiny_exporter(calls))
    args = ["--pth_path", str(radius_ckpt), "--input", str(one_photo), "--testsize", str(SIZE), "--device", "cpu",
            "--save_root", str(tmp_path / "maps"), "--cache_dir", str(cache), "--runtime", "openvino"]
    assert load_script("test.py").main(args) == 0
    assert (tmp_path / "maps" / "x.png").is_file() and len(calls) == 1
    assert not list(private_tmp.iterdir())  # no fsanet-cache-* folder left behind


def test_a_read_only_cache_with_a_sound_entry_is_used(small_ckpt: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 9: a read-only cache is read: its sound entry serves the run, nothing is exported."""
    root, calls = tmp_path / "cache", []
    spec = export_cache.ExportSpec(small_ckpt, SIZE)
    monkeypatch.setattr(export_cache, "export_checkpoint", tiny_exporter(calls))
    entry = runtimes.load_runner("openvino", spec, None, root).source
    read_only(monkeypatch, root)
    monkeypatch.setattr(export_cache, "export_checkpoint", must_not_export)
    monkeypatch.setattr(onnx_export, "export_onnx", must_not_export)
    runner = runtimes.load_runner("openvino", spec, None, root)
    assert runner.source == entry and len(calls) == 1
    assert runtimes.load_runner("onnxruntime", spec, None, root).source == entry


def test_orphaned_temporary_cache_folders_are_removed(private_tmp: Path, dead_pid: int) -> None:
    """A killed run's temporary cache folder (its pid gone) is removed by the next; a live run's stays."""
    orphan = private_tmp / f"fsanet-cache-{dead_pid}-abcd1234"
    legacy = private_tmp / "fsanet-cache-k2j4h5g6"  # the older, pid-less fallback, never removed before
    live = private_tmp / f"fsanet-cache-{os.getppid()}-abcd1234"
    unrelated = private_tmp / "fsanet-cache-notes"
    for folder in (orphan, legacy, live, unrelated):
        folder.mkdir()
    export_cache.ExportCache(private_tmp / "cache")  # any next run, even one that needs no temporary folder
    assert not orphan.exists() and not legacy.exists() and live.is_dir() and unrelated.is_dir()
    scratch = cache_keys.scratch_dir("fsanet-cache-")
    assert Path(scratch.name).is_dir() and f"fsanet-cache-{os.getpid()}-" in scratch.name
    scratch.cleanup()
    assert not Path(scratch.name).exists()


def test_a_child_ending_after_two_openvino_models_were_freed_does_not_crash_the_process(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack for one of its own and puts back the one it
    found when freed: two models freed in the order they were made leave the first one's freed stack in place.
    Python's handlers run on it (SA_ONSTACK): with a SIGCHLD handler installed (a DataLoader with workers installs
    one), the next child to end killed the process with SIGSEGV. Run in a child so a crash fails this test alone."""
    onnx_path = tmp_path / "tiny.onnx"
    tiny_onnx(onnx_path, 32)
    code = (f"import gc, signal, subprocess, sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pathlib import Path\nfrom utils.runtimes import OpenVINORunner\n"
            "signal.signal(signal.SIGCHLD, lambda *args: None)\n"
            f"first, second = (OpenVINORunner(Path({str(onnx_path)!r}), 32) for _ in range(2))\n"
            "del first; gc.collect()\ndel second; gc.collect()\n"
            "subprocess.run([sys.executable, '-c', 'pass'], check=True)\nprint('alive')\n")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", (proc.returncode, proc.stderr[-2000:])
