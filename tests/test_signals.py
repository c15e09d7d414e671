"""SIGTERM (schedulers, `timeout`, `kill PID`) and SIGHUP (a closed terminal) end every script as Ctrl-C does:
the same one-line summary, exit 143 or 129, no temporary file and no process left behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_reliability import (  # noqa: F401  (tiny_split: a fixture)
    maps_being_written,
    stopped_by,
    temp_files,
    tiny_split,
    train_py_running,
)

from pipelines.cli import Interrupted, exit_code_of, interrupt_for, run_cli


def stoppable() -> None:
    """Child set-up: SIGINT, SIGTERM and SIGHUP at their defaults, whatever the test runner inherited
    (a background shell ignores SIGINT, `nohup` SIGHUP), so the script installs its own handlers."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (children, grandchildren, ...), read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float = 300) -> None:
    """Poll `condition` until it holds (the test then acts on a process that is mid-run)."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_run_cli_maps_stop_signals_to_their_exit_codes(capsys) -> None:
    def stopped_by(signum: int):
        def body() -> int:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
            return 0
        return body
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    assert run_cli(stopped_by(signal.SIGTERM), lambda: "3 maps written") == 143
    assert capsys.readouterr().err == "interrupted (SIGTERM): 3 maps written\n"
    assert run_cli(stopped_by(signal.SIGHUP)) == 129
    assert capsys.readouterr().err == "interrupted (SIGHUP)\n"
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == before  # handlers restored
    assert isinstance(Interrupted(signal.SIGTERM), KeyboardInterrupt)  # every Ctrl-C path runs for it


def test_an_exit_code_names_the_interrupt_that_stopped_a_script() -> None:
    """The demo runs the scripts' mains and stops as they were stopped: interrupt_for inverts exit_code_of."""
    for stop in (KeyboardInterrupt(), Interrupted(signal.SIGTERM), Interrupted(signal.SIGHUP)):
        again = interrupt_for(exit_code_of(stop))
        assert type(again) is type(stop) and getattr(again, "signum", None) == getattr(stop, "signum", None)
    assert [interrupt_for(code) for code in (0, 1, 2, 137)] == [None] * 4


def assert_save_stopped_by_sigterm(tmp_path: Path, setup: str, state: str) -> None:
    """A child saves `state` over an older last.pth with atomic_torch_save inside run_cli, after `setup` (which
    arranges the SIGTERM): exit 143, the interrupted line, the old file kept, no temp file."""
    target = tmp_path / "last.pth"
    target.write_bytes(b"the previous checkpoint")
    code = (f"import io, os, signal, sys, torch\nimport utils.atomic\nfrom pipelines.cli import run_cli\n"
            f"from utils.atomic import atomic_torch_save\n{setup}state = {state}\n"
            f"sys.exit(run_cli(lambda: atomic_torch_save(state, {str(target)!r}), lambda: 'save stopped'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=stoppable)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM): save stopped"
    assert target.read_bytes() == b"the previous checkpoint" and not temp_files(tmp_path)


@pytest.mark.slow
def test_sigterm_while_saving_leaves_no_temp_file(tmp_path: Path) -> None:
    """The signal arrives inside torch.save of a checkpoint: exit 143, the old file kept, no temp file."""
    assert_save_stopped_by_sigterm(tmp_path, (
        "class Stop:\n"
        "    def __reduce__(self):\n"  # pickled mid-write: the signal lands inside torch.save
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return (int, (0,))\n"), "{'w': torch.zeros(1_000_000), 'stop': Stop(), 'v': torch.ones(1_000_000)}")


@pytest.mark.slow
def test_sigterm_while_torch_writes_the_tensors_is_an_interrupt_not_a_full_disk(tmp_path: Path) -> None:
    """The signal lands in a write PyTorch's C++ writer makes (the tensors' bytes, after pickling): its
    "unexpected pos" error must not turn the stop into a failed save (once read as a full disk, exit 1)."""
    assert_save_stopped_by_sigterm(tmp_path, (
        "class SignalledOnThirdWrite(io.FileIO):\n"
        "    writes = 0\n"
        "    def write(self, data):\n"
        "        SignalledOnThirdWrite.writes += 1\n"
        "        if SignalledOnThirdWrite.writes == 3:\n"  # a tensor record: the handler runs in this frame
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return super().write(data)\n"
        "utils.atomic.open = lambda path, mode: SignalledOnThirdWrite(path, mode)\n"),
        "{'w': torch.zeros(1_000_000), 'v': torch.ones(1_000_000)}")


@pytest.mark.slow
def test_sighup_in_test_py_reports_maps_written(release_checkpoint: Path, tmp_path: Path) -> None:
    proc, out = maps_being_written(release_checkpoint, tmp_path, stoppable)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 129, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGHUP): ") and "maps written" in last and "--skip_existing" in last, last
    written = int(last.split(": ", 1)[1].split()[0])
    assert 0 < written == len(list(out.glob("p*.png"))) < 200
    assert "Traceback" not in stderr and not temp_files(out)


@pytest.mark.slow
def test_sigterm_in_train_py_names_where_it_stopped(tiny_split: Path, tmp_path: Path) -> None:  # noqa: F811
    """SIGTERM once training runs (DataLoader workers up): one line, exit 143, no worker left behind."""
    proc, seen = train_py_running(tiny_split, tmp_path, stoppable)
    children = descendants(proc.pid)
    stderr = stopped_by(proc, seen, signal.SIGTERM)
    assert proc.returncode == 143, stderr
    final = stderr.strip().splitlines()[-1]
    assert final.startswith("interrupted (SIGTERM): in epoch ") and " of 50" in final, final
    assert "Traceback" not in stderr and not temp_files(tmp_path)
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=30)
    assert not [pid for pid in children if alive(pid)]


@pytest.mark.slow
def test_sigterm_in_eval_py_leaves_no_worker_behind(reference_dir: Path, tmp_path: Path) -> None:
    """`kill PID` of eval.py with a process pool (workers, fork server, resource tracker): exit 143, one line,
    and none of its processes outlive it."""
    case = reference_dir / "eval_case"
    (tmp_path / "gt" / "case" / "gt").mkdir(parents=True)
    (tmp_path / "pred" / "case").mkdir(parents=True)
    for copy in range(12):
        for gt in sorted((case / "gt").glob("*.png")):
            shutil.copy(gt, tmp_path / "gt" / "case" / "gt" / f"{copy}_{gt.name}")
            shutil.copy(case / "pred" / gt.name, tmp_path / "pred" / "case" / f"{copy}_{gt.name}")
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval.py"), "--gt_root", str(tmp_path / "gt"),
                             "--pred_root", str(tmp_path / "pred"), "--datasets", "case", "--workers", "2",
                             "--no_cache", "--save_json", str(tmp_path / "m.json")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=stoppable)
    wait_for(lambda: len(descendants(proc.pid)) >= 3 or proc.poll() is not None)  # workers started
    time.sleep(1)
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted (SIGTERM): no table printed and no output written"
    assert "Traceback" not in stderr and not out and not (tmp_path / "m.json").exists()
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=30)
    assert len(children) >= 3 and not [pid for pid in children if alive(pid)]


@pytest.mark.slow
def test_objects_the_interrupt_left_half_built_complain_to_the_debug_log_only() -> None:
    """Dropping the interrupt's traceback runs __del__ of what its frames held (a DataLoader iterator stopped in
    its __init__ fails there): the summary is the only line on stderr. In a child: pytest hooks unraisables."""
    code = ("import signal, sys\n"
            "from pipelines.cli import Interrupted, run_cli\n"
            "class HalfBuilt:\n"
            "    def __del__(self):\n"
            "        raise AttributeError('no attribute _workers_status')\n"
            "def body():\n"
            "    held = HalfBuilt()\n"  # referenced by the traceback's frame alone
            "    raise Interrupted(signal.SIGTERM)\n"
            "sys.exit(run_cli(body, lambda: 'nothing saved'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr == "interrupted (SIGTERM): nothing saved\n", done.stderr


def run_with_a_forked_child(setup: str, target: str, after: str) -> subprocess.CompletedProcess:
    """`python -c`: `setup`, then run_cli(body), where body forks a Process(target=...), joins it, then `after`."""
    code = ("import multiprocessing as mp, os, signal, sys, time\n" + setup +
            "from pipelines.cli import run_cli\n"
            "def body():\n"
            f"    p = mp.get_context('fork').Process(target={target})\n"
            "    p.start(); p.join()\n"
            f"    {after}\n"
            "    return 0\n"
            "sys.exit(run_cli(body, lambda: 'stopped'))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=stoppable)


@pytest.mark.slow
def test_a_forked_child_still_starting_ends_by_the_signal_quietly() -> None:
    """A process forked inside run_cli (a DataLoader worker before it sets its own handlers) that gets SIGTERM
    (the exiting parent terminates its daemon workers) dies by the signal without the parent's traceback."""
    done = run_with_a_forked_child("def child():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n",
                                   "child", "print(p.exitcode)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{-signal.SIGTERM}\n" and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_a_signal_inside_a_librarys_fork_hook_still_stops_the_run() -> None:
    """SIGTERM handled while another library's fork hook runs (filelock pins its objects there each time a
    DataLoader forks a worker) used to be printed as 'Exception ignored' and lost: the run went on."""
    hook = ("def library_hook():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    sum(range(100000))\n"  # the handler runs here, inside the hook
            "os.register_at_fork(before=library_hook)\n")
    done = run_with_a_forked_child(hook, "lambda: None", "time.sleep(10)")
    assert done.returncode == 143 and done.stderr == "interrupted (SIGTERM): stopped\n", done.stderr


def test_exit_process_keeps_the_code_the_output_and_the_exit_handlers(tmp_path):
    """The scripts end through exit_process (no final garbage collection): the exit status, unflushed output
    and atexit handlers are as sys.exit leaves them."""
    marker = tmp_path / "atexit_ran"
    probe = (f"import atexit, pathlib, sys; from pipelines.cli import exit_process; "
             f"atexit.register(pathlib.Path({str(marker)!r}).touch); "
             f"sys.stdout.write('no newline'); sys.stderr.write('err'); exit_process(3)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "no newline", "err")
    assert marker.exists()


SCRIPTS = ("train.py", "test.py", "eval.py", "export.py", "demo.py", "benchmark.py", "gpu_check.py")


# Runs a script as a program, its next import after the quiet start stalled (a marker file says so): the Ctrl-C then
# lands while it loads its libraries, whatever this machine's speed.
STALLED_START = """
import importlib.abc, pathlib, runpy, sys, time
marker, script = pathlib.Path(sys.argv[1]), sys.argv[2]
class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if sys.excepthook is not sys.__excepthook__:
            marker.touch()
            time.sleep(60)
        return None
sys.meta_path.insert(0, Stall())
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_a_script_loads_its_libraries_is_one_line(script: str, tmp_path: Path) -> None:
    marker = tmp_path / "importing"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_START, str(marker), script], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=60)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert marker.exists(), err
    assert proc.returncode == -signal.SIGINT  # a shell shows 130
    assert err == "interrupted (Ctrl-C) while starting: nothing was done\n"


def test_the_quiet_start_is_for_programs_only_and_ends_when_run_cli_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import quiet_interrupts_while_starting

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    quiet_interrupts_while_starting("fsanet_train_script")  # loaded by a test or the demo: left alone
    assert sys.excepthook is sys.__excepthook__
    quiet_interrupts_while_starting("__main__")
    assert sys.excepthook is not sys.__excepthook__
    assert run_cli(lambda: 0) == 0 and sys.excepthook is sys.__excepthook__
