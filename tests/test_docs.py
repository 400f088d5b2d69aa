"""Every example in README.md and docs/*.md runs, and says what it really prints.

The convention (also in docs/architecture.md, "Examples in the docs are tests"): every fenced
block is checked according to its language, and an HTML comment on the line before the fence,
``<!-- doc-test: ... -->``, says how when the language alone does not:

- ``console``: a session. ``$ command`` lines (``\\`` continues one), each followed by what the
  terminal shows. Output is compared line by line with whitespace collapsed and wall times
  (``8.07 ms``) set aside; a line ``...`` or ``…`` stands for any number of lines. A command must
  exit 0 unless the session shows its status (``echo $?``).
- ``bash``: one command per line; each must exit 0 unless its comment says ``(exit N)`` (or
  ``(exit 0 or 1)`` where the outcome depends on the machine, as a time against a baseline does).
- ``yaml``: a whole config, solved; it must converge (``exit N`` says otherwise, for a session too).
- ``pycon``: a doctest, run in the scratch folder.
- anything else needs a directive.

Directives: ``skip: REASON`` (not run; pytest reports the reason), ``file PATH`` (write the block
there for the examples after it on the same page), ``same as PATH`` (the block is a verbatim part
of a shipped file), ``into CONFIG at KEY`` (a YAML fragment, merged into CONFIG at KEY and
solved), ``exit N``, ``output of COMMAND`` (the block is what COMMAND prints; JSON is compared as
data), ``usage of deq COMMAND`` (every flag named exists), ``errors`` (each line is an error
message; ``ERRORS`` below holds the input that produces it, ``SETUPS`` how to show one that only
another machine prints), ``formulas`` (each line's formula builds), ``cluster file`` (a --cluster
file deq accepts), ``timings vary`` (rows may come in another order, and the time ratios, ranks
and wins that follow from timings are set aside) and ``slow`` (run with ``pytest -m slow``).

``DEQ_DOCS_UPDATE=1`` rewrites the console sessions and ``output of`` blocks whose output differs
with what the tool prints now (docs/architecture.md, "Refreshing the examples").

Commands run in-process (``deq`` through Typer's CliRunner at 100 columns) in a scratch copy of
configs/, bench/ and examples/, one per page, so files written by one example serve the next.
"""

from __future__ import annotations

import difflib
import doctest
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
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
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

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
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if fence:
            indent = fence.group(1)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            before = lines[i - 1].strip() if i else ""
            match = DIRECTIVE.match(before)
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            text = "\n".join(body) + "\n"
            found.append(Block(page, i + 1, fence.group(2), text, match.group(1) if match else ""))
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

# A wall time or a range of them: 8.07 ms, 1.1–1.2 ms, 950 µs–1.2 ms.
TIME = re.compile(r"\d+(?:\.\d+)?(?:\s?(?:s|ms|µs))?(?:–\d+(?:\.\d+)?)?\s?(?:s|ms|µs)(?!\w)")
RATIO = re.compile(r"\d+(?:\.\d+)?×")
WILDCARD = ("...", "…")


def normal(line: str, loose: bool) -> str:
    """A line with whitespace collapsed and wall times (and, loosely, ranks and ratios) set aside."""
    line = TIME.sub("<time>", " ".join(line.split()))
    if loose:
        line = RATIO.sub("<x>", line)
        line = re.sub(r"(<x>)( \|)? \d+( \|)?$", r"\1\2 <rank>\3", line)  # a row's rank
        # A summary row's wins, in the terminal and in Markdown.
        line = re.sub(r"^(\S+ \d+/\d+) \d+ (\d+ <x>)$", r"\1 <wins> \2", line)
        line = re.sub(r"^(\| \S+ \| \d+/\d+ \|) \d+ (\| \d+ \| <x> \|)$", r"\1 <wins> \2", line)
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


# -- refreshing the examples: DEQ_DOCS_UPDATE=1 ---------------------------------------------------

# With DEQ_DOCS_UPDATE=1, a console session or an ``output of`` block whose output differs is
# rewritten in its page with what the tool prints now, and the test passes with a warning naming
# it. Exit codes, errors, usage and doctests are never rewritten: they still fail.
UPDATE = os.environ.get("DEQ_DOCS_UPDATE") == "1"

# Lines each page gained in this run, by the fence line (as collected) of the block rewritten: the
# blocks below it have moved by that much.
_MOVED: dict[Path, list[tuple[int, int]]] = {}


def rewrite_block(block: Block, body: list[str]) -> None:
    """Replace the block's text in its page with ``body`` (indented as the fence is)."""
    text = block.page.read_text(encoding="utf-8")
    lines = text.splitlines()
    moved = _MOVED.setdefault(block.page, [])
    start = block.line - 1 + sum(added for line, added in moved if line < block.line)
    fence = re.match(r"^(\s*)```", lines[start]) if start < len(lines) else None
    assert fence, f"{block.id}: the page changed during this run; run the update again"
    indent = fence.group(1)
    end = next(j for j in range(start + 1, len(lines)) if lines[j].strip().startswith("```"))
    now = "\n".join(line.removeprefix(indent) for line in lines[start + 1 : end]) + "\n"
    assert now == block.text, f"{block.id}: the page changed during this run; run it again"
    new = [indent + line if line.strip() else "" for line in body]
    lines[start + 1 : end] = new
    moved.append((block.line, len(new) - (end - start - 1)))
    block.page.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""), "utf-8")
    warnings.warn(f"{block.id}: rewritten with what the tool prints now", stacklevel=2)


def refresh_text(expected: str, actual: str, loose: bool) -> list[str]:
    """Lines that show ``actual`` as ``compare_text`` reads them, close to what the page said.

    The page's lines are kept where they still match (their spacing and wall times as written),
    and so is each ``...`` whose neighbours still match; everything else is the tool's output. In a
    ``timings vary`` block every line shown is the tool's, elisions aside: its times, ratios and
    ranks must all come from one run to agree with each other.
    """
    want = expected.rstrip("\n").splitlines()
    trailing = len(expected.splitlines()) - len(want)  # blank lines the page ends with stay
    have = "\n".join(line.rstrip() for line in actual.splitlines()).strip("\n").splitlines()
    out = _aligned(want, have, loose) + [""] * trailing
    if compare_text("\n".join(out), actual, loose) is not None:
        out = have  # a safe answer if the alignment ever is not
    return out


def _aligned(want: list[str], have: list[str], loose: bool) -> list[str]:
    """The page's lines ``want`` matched to the tool's ``have``: equal runs kept (the tool's lines
    when ``loose``), gaps refreshed."""
    wild = "\0..."  # never equal to a line the tool prints
    keys = [wild if w.strip() in WILDCARD else normal(w, loose) for w in want]
    matcher = difflib.SequenceMatcher(None, keys, [normal(h, loose) for h in have], autojunk=False)
    out: list[str] = []
    w0 = h0 = 0
    for w1, h1, size in matcher.get_matching_blocks():
        out += _gap(want[w0:w1], have[h0:h1], loose)
        out += have[h1 : h1 + size] if loose else want[w1 : w1 + size]
        w0, h0 = w1 + size, h1 + size
    return out


def _gap(want: list[str], have: list[str], loose: bool) -> list[str]:
    """What stands between two matching runs: the tool's lines, except that an elision the page
    had here stays, over the lines it covers, around any changed line it can be paired with."""
    if not any(w.strip() in WILDCARD for w in want):
        return have
    out: list[str] = []
    start = 0
    pending_wild: str | None = None
    for w in want:
        if w.strip() in WILDCARD:
            pending_wild = w
            continue
        # The line still to come that most resembles this changed line of the page.
        ratios = [
            difflib.SequenceMatcher(None, normal(w, loose), normal(h, loose)).ratio()
            for h in have[start:]
        ]
        best = max(range(len(ratios)), key=ratios.__getitem__, default=None)
        if best is None or ratios[best] < 0.6:
            continue  # the line is gone; the elision before it, if any, covers its place
        skipped = have[start : start + best]
        out += [pending_wild] if pending_wild is not None else skipped
        out.append(have[start + best])
        start += best + 1
        pending_wild = None
    rest = have[start:]
    if pending_wild is not None:
        out.append(pending_wild)
    else:
        out += rest
    return out


def refresh_json(doc: Any, real: Any) -> str:
    """The real document as the page shows JSON: short arrays on one line, and the page's values
    for the volatile keys it shows (times, environment)."""
    return _json_text(_keep_volatile(doc, real), 0) + "\n"


def _keep_volatile(doc: Any, real: Any) -> Any:
    if isinstance(doc, dict) and isinstance(real, dict):
        return {
            k: doc[k] if k in VOLATILE_KEYS and k in doc else _keep_volatile(doc.get(k), v)
            for k, v in real.items()
        }
    if isinstance(doc, list) and isinstance(real, list) and len(doc) == len(real):
        return [_keep_volatile(a, b) for a, b in zip(doc, real, strict=True)]
    return real


def _json_text(value: Any, depth: int) -> str:
    """JSON with two-space indents; a list of numbers or strings (or of such lists) on one line."""

    def flat(v: Any) -> bool:
        return not isinstance(v, (dict, list)) or (
            isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)
        )

    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, list) and all(flat(x) for x in value):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        items = [inner + _json_text(x, depth + 1) for x in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {_json_text(v, depth + 1)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return json.dumps(value, ensure_ascii=False)


# -- the examples -----------------------------------------------------------------------------------

_SCRATCH: dict[Path, Path] = {}


@pytest.fixture
def scratch(block: Block, tmp_path_factory, monkeypatch) -> Path:
    """The page's scratch folder (a copy of configs/, bench/ and examples/), the working directory."""
    if block.page not in _SCRATCH:
        root = tmp_path_factory.mktemp(block.page.stem)
        for folder in ("configs", "bench", "examples"):
            if (ROOT / folder).is_dir():
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
    if directive == "formulas":
        _check_formulas(block, scratch)
        return
    if directive == "cluster file":
        _check_cluster_file(block, scratch)
        return
    if block.lang == "console":
        _check_session(block, scratch, loose, _exit_code(directive))
    elif block.lang == "bash":
        _check_commands(block, scratch)
    elif block.lang == "yaml":
        _solve_config(_write(scratch, block.text), scratch, _exit_code(directive))
    elif block.lang == "pycon":
        _check_doctest(block, scratch)
    else:
        raise AssertionError(f"{block.id}: a '{block.lang}' block needs a doc-test directive")


def _exit_code(directive: str) -> int:
    """The exit code an ``exit N`` directive promises (0 without one)."""
    return int(directive.removeprefix("exit ")) if directive.startswith("exit ") else 0


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
        said = re.search(r"#.*\(exit (\d+(?: or \d+)*)\)", line)
        shown = shell.run(line)
        allowed = [int(code) for code in said.group(1).split(" or ")] if said else [0]
        assert shell.status in allowed, f"{block.id}: `{line}` exited {shell.status}\n{shown}"


@dataclass
class Step:
    """One ``$ command`` of a console session and the lines the page shows after it."""

    written: list[str]  # the command's lines as the page writes them (``\\`` continuations)
    command: str
    expected: list[str]


def session_steps(block: Block) -> list[Step]:
    """The steps of a console block, each command with its continuation lines joined."""
    steps: list[Step] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            written = [lines[i]]
            while written[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                written.append(lines[i])
            command = "\n".join(written).replace("\\\n", " ")[2:].strip()
            steps.append(Step(written, command, []))
        else:
            assert steps, f"{block.id}: output before any $ command"
            steps[-1].expected.append(lines[i])
        i += 1
    return steps


def _check_session(block: Block, scratch: Path, loose: bool, exit_code: int) -> None:
    shell = Shell(scratch)
    steps = session_steps(block)
    problems, refreshed = [], []
    for k, step in enumerate(steps):
        shown = shell.run(step.command)
        checked = "$?" in step.command or (k + 1 < len(steps) and "$?" in steps[k + 1].command)
        assert checked or shell.status == exit_code, (
            f"{block.id}: `{step.command}` exited {shell.status}\n{shown}"
        )
        expected = "\n".join(step.expected)
        problem = compare_text(expected, shown, loose)
        if problem is not None:
            problems.append(f"{block.id}: `{step.command}`: {problem}")
            # Ended by its own newline, the text keeps a blank line before the next command.
            refreshed += step.written + refresh_text(expected + "\n", shown, loose)
        else:
            refreshed += step.written + step.expected
    if problems and UPDATE:
        rewrite_block(block, refreshed)
        return
    assert not problems, problems[0]


def _check_output(block: Block, scratch: Path, command: str, loose: bool) -> None:
    shell = Shell(scratch)
    shown = shell.run(command)
    if block.lang == "json":
        real = json.loads(shown)
        differences = same_data(json.loads(block.text), real)
        if differences and UPDATE:
            rewrite_block(block, refresh_json(json.loads(block.text), real).splitlines())
            return
        assert not differences, f"{block.id}:\n" + "\n".join(differences)
        return
    problem = compare_text(block.text, shown, loose)
    if problem is not None and UPDATE:
        rewrite_block(block, refresh_text(block.text, shown, loose))
        return
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


# One Python session per page, as a reader would type the page's examples one after the other:
# its names and its working directory carry over from one block to the next.
_NAMESPACES: dict[Path, dict[str, Any]] = {}
_SESSION_CWD: dict[Path, str] = {}


def _check_doctest(block: Block, scratch: Path) -> None:
    parser = doctest.DocTestParser()
    names = _NAMESPACES.setdefault(block.page, {})
    os.chdir(_SESSION_CWD.get(block.page, scratch))
    path = list(sys.path)
    test = parser.get_doctest(block.text, names, block.id, str(block.page), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    try:
        runner.run(test, out=out.append, clear_globs=False)
    finally:
        sys.path[:] = path
        _SESSION_CWD[block.page] = os.getcwd()
    names.update(test.globs)  # the DocTest worked on a copy
    assert runner.failures == 0, "".join(out)


# -- documented error messages and the input behind each -------------------------------------------

# Each documented error line (without "error: ") -> (config file name, its text, deq arguments).
# The config is written in a folder named "project" of the scratch folder (with a copy of
# configs/models), which the messages show as /tmp/project.
EXPR = "problem:\n  kind: expression\n  fixed_point: cos(z)\n  initial: 1.0\n"
TANH = "problem:\n  kind: tanh_layer\n  dim: 3\n"
ROOT_EXPR = "problem:\n  kind: expression\n  residual: z\n"
MATRIX = (
    "problem:\n  kind: expression\n  params:\n    A: [[1.0, 0.0], [0.0, 1.0]]\n  fixed_point: z\n"
)


NO_DASK = (
    "--workers needs Dask, which is not installed; install it with: pip install "
    "'deqcli[distributed]'"
)
NO_SUCH = "slurm.yaml: options.no_such: SLURMCluster takes no 'no_such'; see the dask-jobqueue docs"
SWEPT = "problem:\n  kind: expression\n  params: {a: 0.5}\n  fixed_point: a * cos(z)\n"
SWEEP = ["sweep", "../configs/logistic_sweep.yaml", "--param", "r=3", "--cluster", "slurm.yaml"]
SLURM = "kind: slurm\nworkers: 32\ncores: 8\nmemory: 16GB\n"


def _solve(text: str, *extra: str, name: str = "cfg.yaml") -> tuple[str, str, list[str]]:
    return name, text, ["solve", name, *extra]


ERRORS: dict[str, tuple[str, str, list[str]]] = {
    # docs/configuration.md, Limits: the estimates made before anything is allocated
    "problem.dim: a start of batch 1 × n 1000000000 and its copies need about 14.9 GiB, more than "
    "run.max_memory = 4 GiB; make the problem smaller or raise run.max_memory": _solve(
        'problem:\n  kind: expression\n  fixed_point: "0.5*z"\n  dim: 1000000000\n'
    ),
    "problem.fixed_point (line 3): one evaluation needs about 8e8 operations, most of them in '*' "
    "at column 5 (20000×1, 1×20000 → 20000×20000); the limit is run.max_work = 1e8; make the "
    "arrays smaller or raise run.max_work": _solve(
        "problem:\n  kind: expression\n"
        '  fixed_point: "sum(ones(20000,1)*ones(1,20000)) * 0 + 0.5*z"\n'
    ),
    # docs/configuration.md: keys, types and values, with the YAML line
    "solvr (line 4): unknown key; did you mean 'solver'? (valid keys: problem, solver, run)": _solve(
        EXPR.replace("  initial: 1.0\n", "solvr: newton\n")
    ),
    "run.max_iters (line 5): unknown key; did you mean 'max_iter'? (valid keys: atol, rtol, "
    "stop_mode, max_iter, timeout, device, dtype, seed, keep_iterates, check_every, "
    "divergence_factor, history_limit, max_memory, max_work)": _solve(
        EXPR.replace("  initial: 1.0\n", "run:\n  max_iters: 10\n")
    ),
    "problem.fixed_pont (line 3): unknown key; did you mean 'fixed_point'? (valid keys: kind, "
    "name, fixed_point, residual, dim, batch, initial, params, batch_params)": _solve(
        EXPR.replace("fixed_point:", "fixed_pont:")
    ),
    "problem.kind (line 2): unknown or missing problem kind; use one of tanh_layer, expression, "
    "gradient_descent, python, module": _solve("problem:\n  kind: tanh\n"),
    "problem.W (line 1): required key is missing": _solve("problem: {kind: tanh_layer, dim: 3}\n"),
    "problem.dim (line 3): Input should be a valid integer, unable to parse string as an "
    "integer, got 'three'": _solve(TANH.replace("3", "three") + "  W: {random: normal}\n"),
    "run.max_iter (line 5): Input should be greater than or equal to 0, got -3": _solve(
        EXPR.replace("  initial: 1.0\n", "run:\n  max_iter: -3\n")
    ),
    "problem (line 1): give exactly one of fixed_point (z = f(z)) or residual (g(z) = 0)": _solve(
        EXPR + "  residual: z - cos(z)\n"
    ),
    "problem.W (line 4): unknown key 'sead' (valid keys: random, shape, seed, scale, spectral_norm, "
    "eigenvalues)": _solve(TANH + "  W: {random: normal, sead: 1}\n"),
    "problem.initial (line 4): a mapping here needs a 'file' or 'random' key, got keys "
    "['rand']": _solve(EXPR.replace("1.0", "{rand: normal}")),
    "problem.initial (line 4): lists must hold only numbers (or lists of numbers)": _solve(
        EXPR.replace("1.0", "[1.0, one]")
    ),
    "broken.yaml: malformed YAML at line 4, column 1: expected ',' or ']', but got "
    "'<stream end>'": _solve(
        "problem:\n  kind: expression\n  initial: [1.0, 2.0\n", name="broken.yaml"
    ),
    "solver.name: unknown solver 'newtn'; did you mean 'newton'? (valid: fixed_point, newton, "
    "anderson, broyden, newton-krylov, trust-region, levenberg-marquardt, ptc, auto, scipy:hybr, scipy:lm, scipy:krylov, "
    "scipy:anderson, scipy:df-sane, torchdeq:anderson, torchdeq:broyden, "
    "torchdeq:fixed_point_iter; see deq list-solvers)": _solve(EXPR, "--solver", "newtn"),
    "solver.bta: unknown option for solver 'fixed_point'; did you mean 'beta'? (valid options: "
    "beta)": _solve(EXPR + "solver: {name: fixed_point, bta: 0.5}\n"),
    "solver.beta: must lie in (0, 2), got 2.5": _solve(EXPR + "solver: {beta: 2.5}\n"),
    "solver.max_backtracks: must be an integer, got 2.5": _solve(
        EXPR + "solver: {name: newton, max_backtracks: 2.5}\n"
    ),
    "--set: expected key.path=value, got 'foo'": _solve(EXPR, "--set", "foo"),
    "problem.fixed_point (line 3): unknown function 'sn' at column 11; did you mean 'sin'?": _solve(
        EXPR.replace("cos(z)", "0.5 * z + sn(z)")
    ),
    # docs/configuration.md: found while building the problem
    "problem.W: expected shape (3, 3), got (2, 2)": _solve(
        TANH + "  W: [[0.5, 0.0], [0.0, 0.5]]\n"
    ),
    "problem.W: file 'weights/W.npy' does not exist (looked in /tmp/project/weights)": _solve(
        TANH + "  W: {file: weights/W.npy}\n"
    ),
    "problem.U: required when input_dim (2) differs from dim (3)": _solve(
        TANH + "  input_dim: 2\n  W: {random: normal}\n"
    ),
    "problem.batch_params.r: has 2 entries but the batch has 3 samples": _solve(
        "problem:\n  kind: expression\n  batch: 3\n  batch_params: {r: [1.0, 2.0]}\n"
        "  fixed_point: r * z\n"
    ),
    "problem.fixed_point: is not finite at the initial point (sample 0, z0 = [-1]); choose "
    "another initial": _solve(EXPR.replace("cos(z)", "log(z)").replace("1.0", "-1.0")),
    "problem.target: 'build' is not a callable in 'models/damped_cosine.py' (callables there: "
    "DampedCosine, make)": _solve(
        "problem: {kind: python, target: models/damped_cosine.py:build}\n", "--trust-code"
    ),
    # docs/expressions.md: formulas
    "problem.fixed_point (line 3): unknown function 'cso' at column 1; did you mean 'cos'?": _solve(
        EXPR.replace("cos(z)", "cso(z)")
    ),
    "problem.residual (line 3): unknown name 'zz' at column 1; did you mean 'z'? (known names: "
    "n, z)": _solve(ROOT_EXPR.replace("residual: z", "residual: zz - 1")),
    "problem.fixed_point (line 5): attribute access '.T' is not allowed at column 2; use "
    "transpose(A)": _solve(MATRIX.replace("fixed_point: z", "fixed_point: A.T @ z")),
    "problem.params.A (line 4): syntax error at column 5: unexpected token ')'": _solve(
        MATRIX.replace("[[1.0, 0.0], [0.0, 1.0]]", "(1 +)")
    ),
    "problem.fixed_point (line 3): cos() takes 1 argument, got 2 at column 1": _solve(
        EXPR.replace("cos(z)", "cos(z, z)")
    ),
    "problem.fixed_point (line 3): chained comparisons are not supported at column 13; write "
    "(a < b) & (b < c)": _solve(EXPR.replace("cos(z)", "where(0 < z < 1, z, 0)")),
    "problem.params.A: ones(): would create 100000000 elements; the limit is 10000000 "
    "at column 1": _solve(MATRIX.replace("[[1.0, 0.0], [0.0, 1.0]]", "ones(10000, 10000)")),
    "problem.residual: cannot evaluate '@' at column 3: size mismatch, got input (3), mat "
    "(3x3), vec (2)": _solve(
        "problem:\n  kind: expression\n  dim: 2\n  params: {A: eye(3)}\n  residual: A @ z\n"
    ),
    # docs/scale-out.md: Dask and the cluster file
    NO_DASK: (
        "cfg.yaml",
        SWEPT,
        ["sweep", "cfg.yaml", "--param", "a=0:1:5", "--workers", "1"],
    ),
    "slurm.yaml: queu (line 5): unknown key; did you mean 'queue'? (valid keys: kind, workers, "
    "cores, memory, processes, threads, walltime, queue, account, interface, local_directory, "
    "python, job_script_prologue, job_extra_directives, options)": (
        "slurm.yaml",
        SLURM + "queu: normal\n",
        SWEEP,
    ),
    NO_SUCH: (
        "slurm.yaml",
        SLURM + "options: {no_such: 1}\n",
        SWEEP,
    ),
}


def _without_dask(patch: pytest.MonkeyPatch, project: Path) -> None:
    """A machine without Dask: importing distributed fails."""
    patch.setitem(sys.modules, "distributed", None)


def _with_sbatch(patch: pytest.MonkeyPatch, project: Path) -> None:
    """A Slurm login node: sbatch on the PATH. This one refuses to run, since the documented error
    comes before any job is submitted."""
    pytest.importorskip("dask_jobqueue")
    sbatch = project / "bin" / "sbatch"
    sbatch.parent.mkdir(exist_ok=True)
    sbatch.write_text("#!/bin/sh\necho 'no job may be submitted here' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    patch.setenv("PATH", f"{sbatch.parent}{os.pathsep}{os.environ.get('PATH', '')}")


# The documented errors that only a machine unlike this one shows, and how to make it look so.
SETUPS: dict[str, Callable[[pytest.MonkeyPatch, Path], None]] = {
    NO_DASK: _without_dask,
    NO_SUCH: _with_sbatch,
}


def _check_errors(block: Block, scratch: Path) -> None:
    project = scratch / "project"
    if not project.exists():
        project.mkdir()
        shutil.copytree(scratch / "configs" / "models", project / "models")
    for line in [x.strip() for x in block.text.splitlines() if x.strip()]:
        message = line.removeprefix("error: ")
        assert message in ERRORS, f"{block.id}: no input known for the documented error: {line}"
        name, text, args = ERRORS[message]
        (project / name).write_text(text, encoding="utf-8")
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(project)
            if message in SETUPS:
                SETUPS[message](patch, project)
            res = CliRunner().invoke(app, args, env={"COLUMNS": WIDTH}, prog_name="deq")
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
    "formulas",
    "cluster",
    "slow",
    "timings",
    "",
}


def _check_formulas(block: Block, scratch: Path) -> None:
    """Each line's formula (before the gap that starts its comment) builds a vector problem."""
    shell = Shell(scratch)
    for line in [x for x in block.text.splitlines() if x.strip()]:
        formula = re.split(r"\s{2,}", line.strip())[0]
        config = {"problem": {"kind": "expression", "dim": 3, "fixed_point": formula}}
        path = _write(scratch, yaml.safe_dump(config))
        shown = shell.run(f"deq solve {path.name} --max-iter 0 --no-diagnostics -q")
        assert shell.status in (0, 1), f"{block.id}: `{formula}` does not build:\n{shown}"


def _check_cluster_file(block: Block, scratch: Path) -> None:
    """The block is a --cluster file that deq accepts (validated as --cluster reads it; no batch
    system is asked and nothing is submitted)."""
    from deqcli.execution.cluster import load_cluster

    path = scratch / "doc-cluster.yaml"
    path.write_text(block.text, encoding="utf-8")
    load_cluster(path)


def test_every_block_is_checked_or_skipped_with_a_reason() -> None:
    known = ("console", "bash", "yaml", "pycon")
    for block in ALL:
        assert block.lang, f"{block.id}: name the block's language"
        if block.directive.startswith("skip"):
            assert block.directive.removeprefix("skip:").strip(), f"{block.id}: skip needs a reason"
        assert block.lang in known or block.directive, f"{block.id}: needs a doc-test directive"
        unknown = [p for p in block.directives.split(";") if p.strip().split(" ")[0] not in WORDS]
        assert not unknown, f"{block.id}: unknown doc-test directive {unknown}"


# -- the update mode itself -------------------------------------------------------------------------


def test_a_refreshed_output_keeps_the_pages_lines_and_elisions_where_they_still_match() -> None:
    page = "│ problem  dottie │\n│ wall time 8.07 ms │\n...\n│ rate 0.32 │\nthe end\n"
    tool = (
        "│ problem dottie │\n│ wall time 9.1 ms │\nx\ny\n│ rate 0.33 │\n│ error 1e-9 │\nthe end\n"
    )
    assert compare_text(page, tool, loose=False) is not None
    new = refresh_text(page, tool, loose=False)
    # The page's spacing and wall time stay, the elision still covers x and y, the changed line
    # and the new row are the tool's.
    assert new == [
        "│ problem  dottie │",
        "│ wall time 8.07 ms │",
        "...",
        "│ rate 0.33 │",
        "│ error 1e-9 │",
        "the end",
    ]
    assert compare_text("\n".join(new), tool, loose=False) is None


def test_a_line_gone_from_the_output_leaves_the_elision_before_it() -> None:
    new = refresh_text("start\n...\nα = 0.5 was here\nend\n", "start\n1\n2\nend\n", False)
    assert new == ["start", "...", "end"]
    new = refresh_text("a\nb\nd\n", "a\nb\nc\nd\n", False)  # no elision: the tool's lines
    assert new == ["a", "b", "c", "d"]


def test_a_refreshed_block_whose_timings_vary_shows_one_runs_numbers() -> None:
    page = "newton 4 1.00× 1\n...\nfixed_point 67 5.88× 2\nsummary fixed_point 5.88×\n"
    tool = "newton 4 1.00× 1\nnote\nfixed_point 68 3.12× 2\nsummary fixed_point 3.12×\n"
    assert compare_text(page, tool, loose=True) is not None
    new = refresh_text(page, tool, loose=True)
    # The summary row matched loosely, but a ratio of another run would contradict the row above.
    assert new == ["newton 4 1.00× 1", "...", "fixed_point 68 3.12× 2", "summary fixed_point 3.12×"]
    assert compare_text("\n".join(new), tool, loose=True) is None


def test_a_refreshed_json_document_keeps_short_arrays_on_one_line_and_the_pages_times() -> None:
    page = {"iterations": 5, "wall_time": 0.01, "history": {"residual": [[1.0], [0.25]]}}
    real = {"iterations": 6, "wall_time": 0.02, "history": {"residual": [[1.0], [0.5]]}, "x": []}
    text = refresh_json(page, real)
    assert text == (
        '{\n  "iterations": 6,\n  "wall_time": 0.01,\n  "history": {\n'
        '    "residual": [[1.0], [0.5]]\n  },\n  "x": []\n}\n'
    )
    assert same_data(json.loads(text), real) == []


def test_the_update_mode_rewrites_only_the_blocks_that_differ(tmp_path, monkeypatch) -> None:
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "dottie.yaml", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    intro = "# A page\n\n- a list item whose examples are indented:\n\n"
    page = tmp_path / "page.md"
    page.write_text(
        intro
        + "  ```console\n  $ deq validate configs/dottie.yaml\n  ok dottie: tanh_layer\n"
        + "  and a line it no longer prints\n\n  $ deq validate configs/dottie.yaml\n"
        + "  ok configs/dottie.yaml: expression, solver fixed_point\n  ```\n\n"
        + "  ```console\n  $ deq solve configs/dottie.yaml \\\n    --no-diagnostics\n"
        + "  ...\n  │ iterations   67 │\n  ...\n  │ wall time    1.00 ms │\n  ...\n  ```\n\n"
        + "  ```console\n  $ deq validate configs/dottie.yaml\n"
        + "  ok configs/dottie.yaml: expression, solver fixed_point\n  ```\nThe end.\n",
        encoding="utf-8",
    )
    found = blocks(page)
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", False)  # whatever the run's own mode
    for block in found:  # the page as written fails the normal run
        if block is not found[2]:
            with pytest.raises(AssertionError, match="output differs"):
                _check_session(block, tmp_path, loose=False, exit_code=0)
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", True)
    with pytest.warns(UserWarning, match="rewritten") as caught:
        for block in found:
            _check_session(block, tmp_path, loose=False, exit_code=0)
    assert len(caught) == 2  # the third block was right
    text = page.read_text(encoding="utf-8")
    assert text.startswith(intro) and text.endswith("  ```\nThe end.\n")
    first, second, third = blocks(page)
    ok = "$ deq validate configs/dottie.yaml\nok configs/dottie.yaml: expression, solver fixed_point\n"
    assert first.text == ok + "\n" + ok  # the blank line between the commands stays
    lines = second.text.splitlines()
    # The command keeps its continuation line; the changed row is the tool's; the elisions and
    # the page's own wall time stay.
    assert lines[:3] == ["$ deq solve configs/dottie.yaml \\", "  --no-diagnostics", "..."]
    assert normal(lines[3], False) == "│ iterations 68 │"
    assert lines[4:] == ["...", "│ wall time    1.00 ms │", "..."]
    assert third.text == found[2].text and third.line == found[2].line - 1  # moved up by one
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", False)
    for block in (first, second, third):  # and the normal run passes right after
        _check_session(block, tmp_path, loose=False, exit_code=0)
