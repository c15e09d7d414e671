"""utils.cache_keys: what every cache key is made of (content from one read, code digest, library versions)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from utils import cache_keys
from utils.atomic import atomic_path


def _write(root: Path, rel: str, text: str) -> Path:
    """Write a source file of a throwaway repo."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _toy_repo(root: Path) -> None:
    """A package whose entry module imports a sibling lazily and a subpackage relatively; one unrelated module."""
    _write(root, "pkg/__init__.py", "")
    _write(root, "pkg/entry.py", "import numpy as np\n\ndef f():\n    from pkg.helper import g\n    return g()\n")
    _write(root, "pkg/helper.py", "from .sub import deep\n\ndef g():\n    return deep.h()\n")
    _write(root, "pkg/sub/__init__.py", "")
    _write(root, "pkg/sub/deep.py", "def h():\n    return 1\n")
    _write(root, "pkg/unrelated.py", "X = 1\n")


def test_repo_sources_follow_lazy_relative_and_from_imports_but_not_libraries(tmp_path):
    """The closure holds every repo module the entry can reach, and nothing else (numpy is a library)."""
    _toy_repo(tmp_path)
    found = cache_keys.repo_sources(["pkg.entry"], tmp_path)
    assert sorted(found) == ["pkg", "pkg.entry", "pkg.helper", "pkg.sub", "pkg.sub.deep"]


def test_code_digest_changes_with_a_transitively_imported_file_only(tmp_path, monkeypatch):
    """An edit deep in the closure changes the digest; an edit outside it does not."""
    _toy_repo(tmp_path)
    monkeypatch.setattr(cache_keys, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(cache_keys.repo_sources, "__defaults__", (tmp_path,))

    def digest() -> str:
        cache_keys.code_digest.cache_clear()
        return cache_keys.code_digest("pkg.entry")

    first = digest()
    _write(tmp_path, "pkg/unrelated.py", "X = 2\n")
    assert digest() == first
    _write(tmp_path, "pkg/sub/deep.py", "def h():\n    return 2\n")
    assert digest() != first


def test_code_digest_of_the_real_metric_code_covers_the_thinning_module():
    """The HCE skeleton is computed by utils/thinning.py: eval's code digest must read it."""
    assert "utils.thinning" in cache_keys.repo_sources(["utils.gt_cache"])
    with pytest.raises(ValueError, match="not modules of this repo"):
        cache_keys.repo_sources(["numpy"])


def test_library_versions_read_metadata_and_say_none_when_absent():
    """Versions come from the installed distributions; a missing one is "none", not an error."""
    import numpy as np

    versions = cache_keys.library_versions(["numpy", "surely-not-installed-fsanet-xyz"])
    assert versions == {"numpy": np.__version__, "surely-not-installed-fsanet-xyz": "none"}


def test_computation_fields_change_with_a_library_upgrade(monkeypatch):
    """A different version of a library on the path gives a different entry name."""
    before = cache_keys.fields_digest(cache_keys.computation_fields(["utils.gt_cache"], ["scipy"], gt="ab"))
    real = cache_keys.library_versions
    monkeypatch.setattr(cache_keys, "library_versions",
                        lambda names: {n: ("99.0" if n == "scipy" else v) for n, v in real(names).items()})
    after = cache_keys.fields_digest(cache_keys.computation_fields(["utils.gt_cache"], ["scipy"], gt="ab"))
    assert before != after


def test_read_hashed_names_the_bytes_used(tmp_path):
    """The digest is of the bytes returned."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights-A")
    data, digest = cache_keys.read_hashed(path)
    assert data == b"weights-A" and digest == cache_keys.file_sha256(path)
    assert digest == hashlib.sha256(b"weights-A").hexdigest()


def test_orphaned_temps_are_removed_but_a_live_writers_are_kept(tmp_path, dead_pid):
    """A temp file whose writer died is removed (subfolders too); one a live process writes stays."""
    sub = tmp_path / "results" / "ab"
    sub.mkdir(parents=True)
    orphan = sub / f".x.json.{dead_pid}.abcdefgh.tmp"
    orphan.write_text("half")
    live = tmp_path / f".y.json.{os.getppid()}.abcdefgh.tmp"
    live.write_text("being written")
    legacy = tmp_path / ".z.onnx.ABCDEFGH.tmp"  # written before temp names carried a pid
    legacy.write_text("old")
    removed = cache_keys.remove_orphaned_temps(tmp_path, (".json", ".onnx"), recursive=True)
    assert sorted(removed) == sorted([orphan, legacy])
    assert live.exists()


def test_atomic_path_names_its_temp_file_with_the_writers_pid(tmp_path):
    """What lets remove_orphaned_temps tell a live writer's file from an orphan."""
    with atomic_path(tmp_path / "a.png") as tmp:
        assert f".{os.getpid()}." in tmp.name
        assert cache_keys.remove_orphaned_temps(tmp_path, (".png",)) == []  # our own write in progress
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.png").read_bytes() == b"x"
