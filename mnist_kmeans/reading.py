"""Reading what users hand in: regular files of bounded size, and YAML of bounded nesting and alias expansion.

A job file, a cluster file or a run directory may come from anyone: ``/dev/zero``, a FIFO or a billion-laughs alias
bomb must end in one line and exit 2 (docs/contract.md, "Exit codes"), not in a hang, a MemoryError or a traceback.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from mnist_kmeans.errors import UserError, shorten

MAX_FILE_BYTES = 1 << 20  # a job or cluster file is a few hundred bytes; 1 MiB is generous and cheap to parse
MAX_YAML_DEPTH = 20  # levels of nesting; the files use 4 (mapping, report, list, value)
MAX_YAML_NODES = 10_000  # values after alias expansion (a job file has ~30); bounds the pure-Python parse to ~0.5 s


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; any failure is a one-line UserError naming the file."""
    path = Path(path)
    text = read_text(path)
    try:
        data = load_yaml(text)
    except _TooLarge as exc:
        raise UserError(f"{path}: {exc.problem}{_line_of(exc)}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML{_line_of(exc)}") from None
    except ValueError as exc:  # an integer of more digits than int() takes, a date such as 2001-13-45
        raise UserError(f"{path}: not a usable YAML value ({shorten(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a YAML mapping of keys, found {type(data).__name__}")
    return data


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The text of a regular file of at most ``limit`` bytes. Checked with stat before opening, and again on the open
    descriptor: O_NONBLOCK keeps a FIFO swapped in between from blocking the open."""
    try:
        _check_regular(path, os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            _check_regular(path, os.fstat(f.fileno()), limit)
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or shorten(exc)}") from None
    if len(data) > limit:  # grew since the stat, or a file system that does not say its size
        raise _too_large(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: cannot read: not UTF-8 text (byte {exc.start})") from None


def _check_regular(path: Path, st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file (a device, FIFO or socket is not read)")
    if st.st_size > limit:
        raise _too_large(path, limit)


def _too_large(path: Path, limit: int) -> UserError:
    return UserError(f"{path}: larger than {limit} bytes, too large for a file of this kind")


def _line_of(exc: yaml.YAMLError) -> str:
    where = getattr(exc, "problem_mark", None)
    return f" (line {where.line + 1})" if where is not None else ""


class _TooLarge(yaml.MarkedYAMLError):
    """A document beyond MAX_YAML_DEPTH or MAX_YAML_NODES."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags) that refuses a document while composing it: deeper than MAX_YAML_DEPTH (before
    Python's recursion limit is near), or of more than MAX_YAML_NODES values, each alias counted as the size of what
    it names. Shared nodes would construct cheaply, but every later walk (a check, an error message) expands them."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0  # nodes open above the one being composed
        self._expanded = 0  # values so far, aliases expanded
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded values, height) of finished nodes

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)  # the anchored node (or an error for an unknown alias)
            if id(node) not in self._measured:
                raise _TooLarge(problem="an alias inside the node it names (a cycle)", problem_mark=mark)
            size, height = self._measured[id(node)]
            self._expanded += size
        else:
            if self._depth >= MAX_YAML_DEPTH:
                raise _TooLarge(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=mark)
            self._depth += 1
            try:
                node = super().compose_node(parent, index)  # its children count themselves
            finally:
                self._depth -= 1
            height = self._measure(node)[1]
            self._expanded += 1
        if self._depth + height > MAX_YAML_DEPTH:
            raise _TooLarge(problem=f"nested deeper than {MAX_YAML_DEPTH} levels (through aliases)", problem_mark=mark)
        if self._expanded > MAX_YAML_NODES:
            too_many = f"more than {MAX_YAML_NODES} values (aliases counted at each use)"
            raise _TooLarge(problem=too_many, problem_mark=mark)
        return node

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        stats = [self._measured[id(child)] for child in children]
        measured = (1 + sum(s for s, _ in stats), 1 + max((h for _, h in stats), default=0))
        self._measured[id(node)] = measured
        return measured


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the bounds of :class:`_BoundedLoader`."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
