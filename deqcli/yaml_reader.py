"""Reading config text safely: capped reads, and YAML bounded in depth, aliases and integers.

Configs come from pull requests and other people, so reading one must stay cheap whatever it holds:

- ``read_capped`` reads at most ``MAX_CONFIG_BYTES`` from a file, a FIFO, a device such as
  ``/dev/zero`` or standard input, and refuses more (a config is a page of YAML, not a data set).
- ``load_document`` composes the document with its own iterative composer on top of the YAML event
  stream (libyaml's C parser when installed): nesting deeper than ``MAX_DEPTH`` is refused before
  any recursive code sees it (libyaml's composer would overflow the C stack), an alias that refers
  to a node still being built (a recursive structure) is refused, and so is a document whose
  aliases would expand it by more than ``MAX_ALIAS_EXPANSION`` values (a "billion laughs" file
  is refused in milliseconds instead of being expanded). The same pass records the line of every
  key, without ever walking into an alias. The nodes are then turned into Python values by
  PyYAML's safe constructor (never a Python tag); a value it cannot read (``!!float abc``, a
  ``!!timestamp`` that is no date, an integer beyond 64 bits) is one error naming its line.

Nothing here evaluates text, and nothing imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import yaml
from yaml.constructor import ConstructorError
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from deqcli.errors import ConfigError

#: Largest config accepted, in bytes.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Deepest nesting of mappings and sequences.
MAX_DEPTH = 64
#: How many values aliases may add to a document beyond those written out.
MAX_ALIAS_EXPANSION = 100_000
#: Integers are kept within 64 bits (what torch and every option can hold).
INT_LIMIT = 2**63

KeyLines = dict[tuple[str, ...], int]

_BASE_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


CONFIG_ADVICE = (
    "a config is a page of YAML (put large arrays in .npy or .pt files and name them with "
    "{file: ...})"
)
#: Largest JSON document read back (a baseline, a sweep's results file).
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024


def read_capped(
    stream: IO[bytes],
    source: str,
    limit: int = MAX_CONFIG_BYTES,
    advice: str = CONFIG_ADVICE,
) -> str:
    """Read at most ``limit`` bytes of UTF-8 text from ``stream``; refuse anything longer.

    Works on regular files, FIFOs, devices and pipes alike: never more than ``limit + 1`` bytes are
    read, so ``/dev/zero`` or an endless pipe is refused instead of filling the memory.
    """
    try:
        data = stream.read(limit + 1)
    except OSError as exc:
        raise ConfigError("", f"cannot read {source}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError("", f"{source} is longer than {limit // (1024 * 1024)} MiB; {advice}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"{source} is not UTF-8 text (byte {exc.start}); is it a config file?"
        ) from None


def read_capped_file(path: str | Path, source: str, limit: int, advice: str) -> str:
    """``read_capped`` on the file at ``path`` (opening errors are ConfigErrors too)."""
    try:
        with open(path, "rb") as fh:
            return read_capped(fh, source, limit, advice)
    except OSError as exc:
        raise ConfigError("", f"cannot read {source}: {exc.strerror or exc}") from None


class _Loader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """The safe loader with integers kept in range and unreadable values reported with their line."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ConstructorError(
                None, None, f"cannot read this value ({detail})", node.start_mark
            ) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        text = str(node.value)
        # int() itself refuses more than 4300 digits with a message about Python internals.
        digits = sum(c.isalnum() for c in text)
        value = super().construct_yaml_int(node) if digits <= 64 else None
        if value is None or not -INT_LIMIT <= value < INT_LIMIT:
            shown = text if len(text) <= 24 else f"{text[:12]}…{text[-6:]} ({digits} digits)"
            raise ConstructorError(
                None,
                None,
                f"integer {shown} is out of range (|n| < 2**63); write a large value as a float "
                "such as 1.0e30",
                node.start_mark,
            )
        return value


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


class _Frame:
    """A mapping or sequence being composed, with its key path and what it holds so far."""

    __slots__ = ("key", "keys", "node", "path", "size")

    def __init__(self, node: Node, path: tuple[str, ...]) -> None:
        self.node = node
        self.path = path
        self.size = 1  # values in its expansion, itself included
        self.key: Node | None = None  # a mapping's key awaiting its value
        self.keys: dict[tuple[str, str], int] = {}  # a mapping's scalar keys so far -> line


def load_document(text: str, source: str = "<config>") -> tuple[Any, KeyLines]:
    """Parse one YAML document safely: its Python value and the line of every key path.

    Raises ConfigError for malformed YAML, nesting deeper than MAX_DEPTH, recursive aliases,
    alias expansion beyond MAX_ALIAS_EXPANSION and values that cannot be read.
    """
    loader = _Loader(text)
    positions: dict[tuple[int, int], tuple[str, ...]] = {}
    try:
        root, lines = _compose(loader, source, positions)
        value = loader.construct_document(root) if root is not None else None
    except ConstructorError as exc:
        raise _unreadable(exc, source, positions) from None
    except yaml.YAMLError as exc:
        raise _malformed(_pure_python_error(exc, text), source) from None
    except RecursionError:  # defensive: the composer bounds depth, merges could still nest
        raise ConfigError("", f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()
    return value, lines


def _pure_python_error(exc: yaml.YAMLError, text: str) -> yaml.YAMLError:
    """The same syntax error in the words of PyYAML's own parser (libyaml words it differently).

    Only parsing is repeated, and only after libyaml found an error: the pure-Python parser is
    iterative and stops at the same place.
    """
    if _BASE_LOADER is yaml.SafeLoader or isinstance(exc, ConstructorError):
        return exc
    try:
        for _ in yaml.parse(text, Loader=yaml.SafeLoader):
            pass
    except yaml.YAMLError as own:
        return own
    return exc


class YamlSyntaxError(ConfigError):
    """The text is not well-formed YAML (as opposed to YAML that is refused for its shape)."""


def _unreadable(
    exc: ConstructorError, source: str, positions: dict[tuple[int, int], tuple[str, ...]]
) -> ConfigError:
    """A well-formed value the safe constructor cannot read, named by its key."""
    mark = exc.problem_mark
    problem = exc.problem or "cannot read this value"
    if mark is None:
        return ConfigError("", f"{source}: {problem}")
    path = positions.get((mark.line, mark.column))
    if path:
        return ConfigError(".".join(path), problem, line=mark.line + 1)
    return ConfigError("", f"{source}: {problem} at line {mark.line + 1}, column {mark.column + 1}")


def _malformed(exc: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["invalid YAML"])[0]
    if "'\\t'" in problem:
        problem += " (a tab: YAML indents with spaces)"
    return YamlSyntaxError("", f"{source}: malformed YAML{where}: {problem}")


def _compose(
    loader: Any, source: str, positions: dict[tuple[int, int], tuple[str, ...]]
) -> tuple[Node | None, KeyLines]:
    """Build the node graph from the event stream without recursion (see the module docstring).

    ``positions`` receives the key path of every value written out, by its (line, column).
    """
    lines: KeyLines = {}
    anchors: dict[str, Node] = {}
    sizes: dict[int, int] = {}  # id(node) -> values in its expansion (finished nodes only)
    open_nodes: set[int] = set()
    stack: list[_Frame] = []
    written = 0  # values written out in the text (no alias counted twice)
    root: Node | None = None

    loader.get_event()  # StreamStartEvent
    if loader.check_event(StreamEndEvent):
        return None, lines

    def refuse(message: str, mark: Any, path: tuple[str, ...]) -> ConfigError:
        if not path:
            return ConfigError("", f"{source}: {message} (line {mark.line + 1})")
        shown = path if len(path) <= 6 else (*path[:5], "…")
        return ConfigError(".".join(shown), message, line=mark.line + 1)

    def child_path() -> tuple[str, ...]:
        if not stack:
            return ()
        top = stack[-1]
        if isinstance(top.node, MappingNode):
            key = top.key
            return (*top.path, str(key.value)) if key is not None else top.path
        return (*top.path, str(len(top.node.value)))

    def attach(node: Node, size: int, mark: Any = None) -> Node | None:
        """Give a finished node to its parent (or make it the root); check the expansion."""
        nonlocal root
        if not stack:
            root = node
            return node
        top = stack[-1]
        top.size += size
        # Values written anywhere so far bound those written inside this node from above, so this
        # is a lower bound on the node's own expansion; the root sees the whole document's.
        if top.size - written > MAX_ALIAS_EXPANSION:
            raise refuse(
                f"aliases expand this document by more than {MAX_ALIAS_EXPANSION:,} values (an "
                "alias bomb?); write the values out or use fewer aliases",
                mark or node.start_mark,
                top.path,
            )
        if isinstance(top.node, MappingNode):
            if top.key is None:
                if type(node) is ScalarNode:
                    # YAML forbids a key twice in one mapping, but PyYAML keeps the last silently:
                    # an `atol` given twice would quietly lose the first.
                    at = mark or node.start_mark
                    first = top.keys.get((node.tag, node.value))
                    if first is not None:
                        raise refuse(
                            f"duplicate key (also given at line {first}; YAML would keep only "
                            "the last): keep one",
                            at,
                            (*top.path, str(node.value)),
                        )
                    top.keys[(node.tag, node.value)] = at.line + 1
                top.key = node
                return None
            path = (*top.path, str(top.key.value))
            lines[path] = top.key.start_mark.line + 1
            if mark is None:
                positions[(node.start_mark.line, node.start_mark.column)] = path
            top.node.value.append((top.key, node))
            top.key = None
        else:
            if type(node) is not ScalarNode:  # items of arrays are not worth a path each
                path = (*top.path, str(len(top.node.value)))
                lines[path] = node.start_mark.line + 1
                if mark is None:
                    positions[(node.start_mark.line, node.start_mark.column)] = path
            top.node.value.append(node)
        return None

    loader.get_event()  # DocumentStartEvent
    while True:
        event = loader.get_event()
        kind_of = type(event)
        if kind_of is DocumentEndEvent:
            break
        if kind_of is AliasEvent:
            target = anchors.get(event.anchor)
            if target is None:
                raise refuse(
                    f"alias *{event.anchor} is not defined", event.start_mark, child_path()
                )
            if id(target) in open_nodes:
                raise refuse(
                    f"alias *{event.anchor} refers to a structure that contains it (a recursive "
                    "alias); configs must be finite trees",
                    event.start_mark,
                    child_path(),
                )
            attach(target, sizes[id(target)], event.start_mark)
            continue
        # Sizes and open nodes are only ever looked up by aliases, so only anchored nodes keep them.
        anchor = getattr(event, "anchor", None)
        if kind_of is ScalarEvent:
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(ScalarNode, event.value, event.implicit)
            node: Node = ScalarNode(
                tag, event.value, event.start_mark, event.end_mark, style=event.style
            )
            written += 1
            if anchor is not None:
                anchors[anchor] = node
                sizes[id(node)] = 1
            attach(node, 1)
        elif kind_of is SequenceStartEvent or kind_of is MappingStartEvent:
            kind = SequenceNode if kind_of is SequenceStartEvent else MappingNode
            if len(stack) >= MAX_DEPTH:
                raise refuse(
                    f"YAML nested more than {MAX_DEPTH} levels deep; flatten it (or put arrays in "
                    ".npy files)",
                    event.start_mark,
                    child_path(),
                )
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(kind, None, event.implicit)
            node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
            written += 1
            if anchor is not None:
                anchors[anchor] = node
                open_nodes.add(id(node))
            stack.append(_Frame(node, child_path()))
        elif kind_of is SequenceEndEvent or kind_of is MappingEndEvent:
            frame = stack.pop()
            frame.node.end_mark = event.end_mark
            if id(frame.node) in open_nodes:
                open_nodes.discard(id(frame.node))
                sizes[id(frame.node)] = frame.size
            attach(frame.node, frame.size)
        else:  # pragma: no cover - the parser emits nothing else inside a document
            raise refuse(f"unexpected YAML event {type(event).__name__}", event.start_mark, ())
    if not loader.check_event(StreamEndEvent):
        event = loader.get_event()
        raise ConfigError(
            "",
            f"{source}: expected a single YAML document, found another at line "
            f"{event.start_mark.line + 1}",
        )
    loader.get_event()
    return root, lines


__all__ = [
    "INT_LIMIT",
    "MAX_ALIAS_EXPANSION",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "KeyLines",
    "YamlSyntaxError",
    "load_document",
    "read_capped",
    "read_capped_file",
]
