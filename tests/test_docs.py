"""Every example in README.md and docs/*.md runs, and says what it really prints.

The convention (also in docs/architecture.md, "Examples in the docs are tests"): every fenced
block is checked according to its language, and an HTML comment on the line before the fence,
``<!-- doc-test: ... -->``, says how when the language alone does not:

- ``console``: a session. ``$ command`` lines (``\\`` continues one), each followed by what the
  terminal shows. Output is compared line by line with whitespace collapsed and wall times
  (``8.07 ms``) set aside; a line ``...`` or ``…`` stands for any number of lines. A command must
  exit 0 unless the session shows its status (``echo $?``).
- ``bash``: one command per line; each must exit 0 unless its comment says ``(exit N)``.
- ``yaml``: a whole config, solved; it must converge (``exit N`` says otherwise).
- ``pycon``: a doctest, run in the scratch folder.
- anything else needs a directive.

Directives: ``skip: REASON`` (not run; pytest reports the reason), ``file PATH`` (write the block
there for the examples after it on the same page), ``same as PATH`` (the block is a verbatim part
of a shipped file), ``into CONFIG at KEY`` (a YAML fragment, merged into CONFIG at KEY and
solved), ``exit N``, ``output of COMMAND`` (the block is what COMMAND prints; JSON is compared as
data), ``usage of deq COMMAND`` (every flag named exists), ``errors`` (each line is an error
message; ``ERRORS`` below holds the input that produces it) and ``timings vary`` (rows may come
in another order, and the time ratios, ranks and wins that follow from timings are set aside).

Commands run in-process (``deq`` through Typer's CliRunner at 100 columns) in a scratch copy of
configs/ and bench/, one per page, so files written by one example serve the next.
"""

from __future__ import annotations

import doctest
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from deqcli.cli import app
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WIDTH = "100"
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
FLAGS = {"slow", "timings vary"}


@dataclass
class Block:
    """One fenced block of a page."""

    page: Path
    line: int
    lang: str
    text: str
    directives: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def flags(self) -> set[str]:
        """The directive's flags: ``slow``, ``timings vary``."""
        return {p.strip() for p in self.directives.split(";")} & FLAGS

    @property
    def directive(self) -> str:
        """The directive's instruction (``file PATH``, ``output of ...``, …), without the flags."""
        rest = [p.strip() for p in self.directives.split(";") if p.strip() not in FLAGS]
        return "; ".join(p for p in rest if p)


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the directive on the line before each (if any)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = lines[i - 1].strip() if i else ""
            match = DIRECTIVE.match(before)
            text = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(page, i + 1, fence.group(1), text, match.group(1) if match else ""))
            i = end
        i += 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


# -- a small shell: enough for the docs' pipes, redirects, && and echo $? -------------------------


class Shell:
    """Runs the docs' command lines in ``cwd``; ``deq`` in-process, a few tools as processes."""

    TOOLS = ("jq", "cat", "head", "ls")

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.status = 0

    def run(self, line: str) -> str:
        """Run one command line; returns what the terminal shows. Sets ``self.status``."""
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        shown, connector = [], ";"
        while tokens:
            cut = next((i for i, t in enumerate(tokens) if t in (";", "&&", "||")), len(tokens))
            part, tokens = tokens[:cut], tokens[cut:]
            go = connector == ";" or (connector == "&&") == (self.status == 0)
            if go and part:
                shown.append(self._pipeline(part))
            connector = tokens.pop(0) if tokens else ";"
        return "".join(shown)

    def _pipeline(self, tokens: list[str]) -> str:
        target, mode, piped = None, "w", None
        for op in (">>", ">"):
            if op in tokens:
                at = tokens.index(op)
                target, mode, tokens = tokens[at + 1], "a" if op == ">>" else "w", tokens[:at]
                break
        if "<" in tokens:
            at = tokens.index("<")
            piped = (self.cwd / tokens[at + 1]).read_text(encoding="utf-8")
            tokens = tokens[:at] + tokens[at + 2 :]
        commands, shown = [], []
        while "|" in tokens:
            at = tokens.index("|")
            commands.append(tokens[:at])
            tokens = tokens[at + 1 :]
        commands.append(tokens)
        for k, argv in enumerate(commands):
            last = k == len(commands) - 1
            out, err, both, self.status = self._command(argv, piped)
            if last and target is None:
                shown.append(both)
            else:
                shown.append(err)
            piped = out
        if target is not None:
            with open(self.cwd / target, mode, encoding="utf-8") as handle:
                handle.write(piped or "")
        return "".join(shown)

    def _command(self, argv: list[str], stdin: str | None) -> tuple[str, str, str, int]:
        argv = [a.replace("$?", str(self.status)) for a in argv]
        expanded: list[str] = []
        for arg in argv:
            matches = sorted(glob.glob(arg, root_dir=self.cwd)) if "*" in arg else []
            expanded.extend(matches or [arg])
        name, args = expanded[0], expanded[1:]
        if name == "echo":
            text = " ".join(args) + "\n"
            return text, "", text, 0
        if name == "deq":
            res = CliRunner().invoke(
                app, args, input=stdin, env={"COLUMNS": WIDTH}, prog_name="deq"
            )
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                raise res.exception
            return res.stdout, res.stderr, res.output, res.exit_code
        if name in self.TOOLS:
            if shutil.which(name) is None:
                pytest.skip(f"{name} is not installed")
            done = subprocess.run(
                expanded, input=stdin, cwd=self.cwd, capture_output=True, text=True, check=False
            )
            return done.stdout, done.stderr, done.stderr + done.stdout, done.returncode
        raise AssertionError(f"'{name}' cannot run in a doc test; mark the block with a skip")


# -- comparing what the docs claim with what the tools print --------------------------------------

TIME = re.compile(r"\d+(?:\.\d+)?(?:–\d+(?:\.\d+)?)?\s?(?:s|ms|µs)(?![\w])")
RATIO = re.compile(r"\d+(?:\.\d+)?×")
WILDCARD = ("...", "…")


def normal(line: str, loose: bool) -> str:
    """A line with whitespace collapsed and wall times (and, loosely, ranks and ratios) set aside."""
    line = TIME.sub("<time>", " ".join(line.split()))
    if loose:
        line = RATIO.sub("<x>", line)
        line = re.sub(r"(<x>) \d+$", r"\1 <rank>", line)  # a table row's rank
        line = re.sub(r"^(\S+ \d+/\d+) \d+ (\d+ <x>)$", r"\1 <wins> \2", line)  # summary wins
    return line


def compare_text(expected: str, actual: str, loose: bool) -> str | None:
    """None when ``actual`` shows what ``expected`` claims, else a message saying where not."""
    want = [normal(x, loose) for x in expected.splitlines() if x.strip()]
    have = [normal(x, loose) for x in actual.splitlines() if x.strip()]
    if loose:
        if any(w in WILDCARD for w in want):
            missing = [w for w in want if w not in WILDCARD and w not in have]
        else:
            missing = sorted(set(want) ^ set(have))
        return None if not missing else "differs in:\n" + "\n".join(missing) + _both(want, have)
    pattern = "".join(r"(?:[^\n]*\n)*?" if w in WILDCARD else re.escape(w) + r"\n" for w in want)
    if re.fullmatch(pattern, "\n".join(have) + "\n" if have else ""):
        return None
    return "output differs" + _both(want, have)


def _both(want: list[str], have: list[str]) -> str:
    return "\n--- the docs say:\n" + "\n".join(want) + "\n--- the tool prints:\n" + "\n".join(have)


VOLATILE_KEYS = {"wall_time", "time", "created", "environment", "runs"}


def same_data(doc: Any, real: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ (volatile keys such as wall_time are not compared)."""
    if isinstance(doc, dict) and isinstance(real, dict):
        out = [f"{path}.{k}: missing in the real document" for k in doc if k not in real]
        out += [f"{path}.{k}: not in the docs" for k in real if k not in doc]
        for k in doc.keys() & real.keys():
            if k not in VOLATILE_KEYS:
                out += same_data(doc[k], real[k], f"{path}.{k}")
        return out
    if isinstance(doc, list) and isinstance(real, list) and len(doc) == len(real):
        return [
            d
            for a, b, i in zip(doc, real, range(len(doc)), strict=True)
            for d in same_data(a, b, f"{path}[{i}]")
        ]
    return [] if doc == real else [f"{path}: docs {doc!r}, real {real!r}"]


# -- the examples -----------------------------------------------------------------------------------

_SCRATCH: dict[Path, Path] = {}


@pytest.fixture
def scratch(block: Block, tmp_path_factory, monkeypatch) -> Path:
    """The page's scratch folder (a copy of configs/ and bench/), the working directory."""
    if block.page not in _SCRATCH:
        root = tmp_path_factory.mktemp(block.page.stem)
        for folder in ("configs", "bench"):
            shutil.copytree(ROOT / folder, root / folder)
        _SCRATCH[block.page] = root
    monkeypatch.chdir(_SCRATCH[block.page])
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    return _SCRATCH[block.page]


@pytest.fixture(
    params=[pytest.param(b, marks=[pytest.mark.slow] if "slow" in b.flags else []) for b in ALL],
    ids=[b.id for b in ALL],
)
def block(request) -> Block:
    return request.param


def test_doc_example(block: Block, scratch: Path) -> None:
    directive = block.directive
    if directive.startswith("skip:"):
        pytest.skip(directive.removeprefix("skip:").strip())
    loose = "timings vary" in block.flags
    if directive.startswith("file "):
        target = scratch / directive.removeprefix("file ").strip()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text, encoding="utf-8")
        if block.lang == "yaml":
            _solve_config(target, scratch, 0)
        return
    if directive.startswith("same as "):
        shipped = (ROOT / directive.removeprefix("same as ").strip()).read_text(encoding="utf-8")
        assert block.text.strip() in shipped, f"{block.id} is not a verbatim part of that file"
        return
    if directive.startswith("into "):
        config, _, key = directive.removeprefix("into ").partition(" at ")
        _solve_fragment(block, scratch, config.strip(), key.strip())
        return
    if directive.startswith("output of "):
        _check_output(block, scratch, directive.removeprefix("output of ").strip(), loose)
        return
    if directive.startswith("usage of "):
        _check_usage(block, directive.removeprefix("usage of ").strip())
        return
    if directive == "errors":
        _check_errors(block, scratch)
        return
    if block.lang == "console":
        _check_session(block, scratch, loose)
    elif block.lang == "bash":
        _check_commands(block, scratch)
    elif block.lang == "yaml":
        exit_code = int(directive.removeprefix("exit ")) if directive.startswith("exit ") else 0
        _solve_config(_write(scratch, block.text), scratch, exit_code)
    elif block.lang == "pycon":
        _check_doctest(block, scratch)
    else:
        raise AssertionError(f"{block.id}: a '{block.lang}' block needs a doc-test directive")


def _write(scratch: Path, text: str) -> Path:
    path = scratch / "doc-example.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _solve_config(path: Path, scratch: Path, exit_code: int) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict) and "problem" in raw, f"{path.name} is not a whole config"
    shell = Shell(scratch)
    shown = shell.run(f"deq solve {shlex.quote(str(path))} --trust-code --no-diagnostics")
    assert shell.status == exit_code, shown


def _solve_fragment(block: Block, scratch: Path, config: str, key: str) -> None:
    raw = yaml.safe_load((scratch / config).read_text(encoding="utf-8"))
    node = raw
    for part in [p for p in key.split(".") if p]:
        node = node.setdefault(part, {})
    node.update(yaml.safe_load(block.text))
    path = scratch / Path(config).parent / "doc-fragment.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _solve_config(path, scratch, 0)


def _commands(text: str) -> list[str]:
    """Command lines of a block, with ``\\`` continuations joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def _check_commands(block: Block, scratch: Path) -> None:
    shell = Shell(scratch)
    for line in _commands(block.text):
        if line.startswith("#"):
            continue
        said = re.search(r"#.*\(exit (\d+)\)", line)
        shown = shell.run(line)
        want = int(said.group(1)) if said else 0
        assert shell.status == want, f"{block.id}: `{line}` exited {shell.status}\n{shown}"


def _check_session(block: Block, scratch: Path, loose: bool) -> None:
    shell = Shell(scratch)
    lines = block.text.replace("\\\n", " ").splitlines()
    steps: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            steps.append((line[2:].strip(), []))
        else:
            assert steps, f"{block.id}: output before any $ command"
            steps[-1][1].append(line)
    for k, (command, expected) in enumerate(steps):
        shown = shell.run(command)
        checked = "$?" in command or (k + 1 < len(steps) and "$?" in steps[k + 1][0])
        assert checked or shell.status == 0, (
            f"{block.id}: `{command}` exited {shell.status}\n{shown}"
        )
        problem = compare_text("\n".join(expected), shown, loose)
        assert problem is None, f"{block.id}: `{command}`: {problem}"


def _check_output(block: Block, scratch: Path, command: str, loose: bool) -> None:
    shell = Shell(scratch)
    shown = shell.run(command)
    if block.lang == "json":
        differences = same_data(json.loads(block.text), json.loads(shown))
        assert not differences, f"{block.id}:\n" + "\n".join(differences)
        return
    problem = compare_text(block.text, shown, loose)
    assert problem is None, f"{block.id}: `{command}`: {problem}"


def _check_usage(block: Block, command: str) -> None:
    words = command.split()
    assert words[0] == "deq", f"{block.id}: usage of what?"
    res = CliRunner().invoke(app, [*words[1:], "--help"], prog_name="deq")
    assert res.exit_code == 0, res.output
    for flag in re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", block.text):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", res.stdout), (
            f"{block.id}: {flag} is not an option of {command}"
        )


# One Python session per page, as a reader would type the page's examples one after the other.
_NAMESPACES: dict[Path, dict[str, Any]] = {}


def _check_doctest(block: Block, scratch: Path) -> None:
    parser = doctest.DocTestParser()
    names = _NAMESPACES.setdefault(block.page, {})
    test = parser.get_doctest(block.text, names, block.id, str(block.page), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=False)
    names.update(test.globs)  # the DocTest worked on a copy
    assert runner.failures == 0, "".join(out)


# -- documented error messages and the input behind each -------------------------------------------

# Each documented error line (without "error: ") -> (config file name, its text, deq arguments).
# The config is written in a folder named "project" of the scratch folder, which the messages
# show as /tmp/project.
DOTTIE = "problem:\n  kind: expression\n  fixed_point: cos(z)\n  initial: 1.0\n"
ERRORS: dict[str, tuple[str, str, list[str]]] = {}


def _check_errors(block: Block, scratch: Path) -> None:
    project = scratch / "project"
    project.mkdir(exist_ok=True)
    for line in [x.strip() for x in block.text.splitlines() if x.strip()]:
        message = line.removeprefix("error: ")
        assert message in ERRORS, f"{block.id}: no input known for the documented error: {line}"
        name, text, args = ERRORS[message]
        (project / name).write_text(text, encoding="utf-8")
        os.chdir(project)
        try:
            res = CliRunner().invoke(app, args, env={"COLUMNS": WIDTH}, prog_name="deq")
        finally:
            os.chdir(scratch)
        shown = res.stderr.replace(str(scratch), "/tmp").strip()
        assert res.exit_code == 2 and shown == f"error: {message}", (
            f"{block.id}: the docs say\n  error: {message}\nthe tool prints\n  {shown}"
        )


WORDS = {
    "skip:",
    "file",
    "same",
    "into",
    "exit",
    "output",
    "usage",
    "errors",
    "slow",
    "timings",
    "",
}


def test_every_block_is_checked_or_skipped_with_a_reason() -> None:
    known = ("console", "bash", "yaml", "pycon")
    for block in ALL:
        assert block.lang, f"{block.id}: name the block's language"
        if block.directive.startswith("skip"):
            assert block.directive.removeprefix("skip:").strip(), f"{block.id}: skip needs a reason"
        assert block.lang in known or block.directive, f"{block.id}: needs a doc-test directive"
        unknown = [p for p in block.directives.split(";") if p.strip().split(" ")[0] not in WORDS]
        assert not unknown, f"{block.id}: unknown doc-test directive {unknown}"
