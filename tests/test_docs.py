"""Every command line shown in README.md and docs/*.md parses with its script's own argparse parser.

Commands are taken from fenced shell blocks and from inline code spans that start with `python` or
`torchrun`. Each is parsed by the parser the script builds (the flags must exist, choices and types
must be valid); `...` in a shown command stands for the flags shown elsewhere, so such a line may
leave out required flags. docs/pending-*.md are other changes' notes, not documentation yet.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
from conftest import ROOT

from pipelines import cli

SCRIPTS = ("train.py", "test.py", "eval.py", "export.py", "benchmark.py", "gpu_check.py", "demo.py")
MODULES = ("utils.synthetic",)  # run as `python -m <module>`
PYTHONS = {"python", "python3", ".venv/bin/python"}
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and the docs/ pages (not the pending notes of unmerged changes)."""
    return [root / "README.md", *sorted(p for p in (root / "docs").glob("*.md") if not p.name.startswith("pending-"))]


def shell_lines(text: str) -> list[str]:
    """The lines of the markdown's fenced blocks that are not Python code, continuation lines joined."""
    lines, language, pending = [], None, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            language = line[3:].strip() if language is None else None
        elif language is not None and language != "python":
            if line.endswith("\\"):
                pending += line[:-1]
            else:
                lines.append(pending + line)
                pending = ""
    return [line for line in lines if line]


def inline_commands(text: str) -> list[str]:
    """Inline code spans (which may wrap across lines) that run python or torchrun."""
    outside_fences = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    spans = (" ".join(m.group(1).split()) for m in INLINE_CODE.finditer(outside_fences))
    return [s for s in spans if s.split(" ", 1)[0] in PYTHONS | {"torchrun"}]


def invocation(line: str) -> tuple[str, list[str]] | None:
    """(script or module, its arguments) of a shell line that runs one of ours, else None."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, token in enumerate(tokens):
        rest = tokens[i + 1:]
        if token in PYTHONS and rest[:1] == ["-m"] and len(rest) > 1:
            return rest[1], rest[2:]
        if token in PYTHONS and rest and rest[0].endswith(".py"):
            return rest[0], rest[1:]
        if token == "torchrun":
            script = next((j for j, t in enumerate(rest) if t.endswith(".py")), None)
            return (rest[script], rest[script + 1:]) if script is not None else None
    return None


def commands(text: str) -> list[str]:
    """Every command line of ours shown in a markdown text."""
    return [line for line in shell_lines(text) + inline_commands(text) if invocation(line)]


def load_script(name: str) -> ModuleType:
    """One of the top-level scripts (or a `-m` module), imported without running it."""
    if name in MODULES:
        return importlib.import_module(name)
    return cli.load_script(name)


class _Captured(Exception):
    """Raised instead of parsing, carrying the parser the script built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _capture(parser: argparse.ArgumentParser, args=None, namespace=None):
    """ArgumentParser.parse_args stand-in: hand the parser back instead of parsing."""
    raise _Captured(parser)


def script_parser(name: str) -> argparse.ArgumentParser:
    """The argparse parser a script builds for its command line (its build_parser, or what parse_args builds)."""
    module = load_script(name)
    if hasattr(module, "build_parser"):
        return module.build_parser()
    parse = getattr(module, "parse_args", None) or module._parse_args
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture):
        try:
            parse([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{name}: parse_args built no argparse parser")


def parse_error(line: str) -> str | None:
    """None when the shown command parses with its script's parser, else argparse's complaint."""
    script, args = invocation(line)
    if script not in SCRIPTS and script not in MODULES:
        return None if script.startswith(("torch.", "pipelines.")) else f"{script} is not one of our scripts"
    parser = script_parser(script)
    if "..." in args:  # `...` stands for the flags shown elsewhere, required ones among them
        for action in parser._actions:
            action.required = False
    args = [a.strip("[]") for a in args if a != "..."]  # `[--flag]` marks an optional flag
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as done:
        if done.code not in (0, None):  # 0: --help
            return stderr.getvalue().strip().splitlines()[-1]
    return None


DOC_COMMANDS = [(path.relative_to(ROOT).as_posix(), line)
                for path in doc_files() for line in commands(path.read_text())]


def test_the_docs_show_a_command_of_every_script():
    shown = {invocation(line)[0] for _, line in DOC_COMMANDS}
    assert set(SCRIPTS) <= shown, set(SCRIPTS) - shown
    assert len(DOC_COMMANDS) >= 30


@pytest.mark.parametrize("doc, line", DOC_COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(DOC_COMMANDS)])
def test_shown_command_parses(doc: str, line: str) -> None:
    assert parse_error(line) is None, f"{doc}: {line}: {parse_error(line)}"


FAKE_DOC = """Train with the new flag:

```bash
python train.py --train_path data/DIS5K/DIS-TR \\
    --no_such_flag 3   # a flag train.py does not have
torchrun --nproc_per_node 2 train.py --batchsize 4
```

and predict with `python test.py ... --runtime tensorrt`; `--runtime torch` alone is not a command.

```python
python_code = "python train.py --not_a_command"
```
"""


def test_a_flag_that_does_not_exist_or_a_bad_choice_fails() -> None:
    found = commands(FAKE_DOC)
    assert [invocation(line) for line in found] == [
        ("train.py", ["--train_path", "data/DIS5K/DIS-TR", "--no_such_flag", "3"]),
        ("train.py", ["--batchsize", "4"]),
        ("test.py", ["...", "--runtime", "tensorrt"]),
    ]
    assert "unrecognized arguments: --no_such_flag 3" in parse_error(found[0])
    assert parse_error(found[1]) is None
    assert "invalid choice: 'tensorrt'" in parse_error(found[2])
    assert "the following arguments are required: --pth_path" in parse_error("python test.py --runtime torch")
    assert parse_error("python made_up.py --x 1") == "made_up.py is not one of our scripts"


def test_pending_notes_are_not_checked(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/training.md", "docs/pending-22.md"):
        (tmp_path / name).write_text("```bash\npython train.py --no_such_flag\n```\n")
    assert [p.relative_to(tmp_path).as_posix() for p in doc_files(tmp_path)] == ["README.md", "docs/training.md"]
