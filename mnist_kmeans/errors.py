"""The few exception types a user can meet, and how any exception becomes one line; cli.py maps each to an exit code.

Messages are one line of bounded length that names the file or key at fault and what is wrong with it
(docs/contract.md, "Exit codes").
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]  # where progress and notices go: one line per call (the CLI prints them to stderr)

MAX_LINE = 600  # characters of one error line: a value echoed from user input never makes it longer
MAX_VALUE = 80  # characters of one echoed value (a key, a path fragment, a YAML scalar)


class UserError(Exception):
    """Bad input or configuration (exit code 2). Nothing existing has been overwritten."""

    exit_code = 2


class ClusterError(Exception):
    """The Dask cluster cannot be reached or was lost beyond recovery (exit code 3)."""

    exit_code = 3


class Cancelled(Exception):
    """A job stopped by ``mnist-kmeans cancel`` (exit code 130, as an interrupt); its finished epochs are kept."""

    exit_code = 130


def to_stderr(message: str) -> None:
    """The command line's :data:`Log`: one line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


def shorten(text: object, limit: int = MAX_VALUE) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis: how a user's value is echoed."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def shown(value: object) -> str:
    """A value read from a user's file as an error line echoes it: its repr, shortened."""
    return shorten(repr(value))


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 class", "10 classes", "2 epochs"."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x")) else f"{n} {noun}s"


def one_line(exc: BaseException, *, with_type: bool = False, limit: int = MAX_LINE) -> str:
    """The message of ``exc`` as one bounded line; ``with_type`` prefixes its class name (for foreign exceptions,
    whose message alone may be empty or cryptic)."""
    text = " ".join(str(exc).split())
    if with_type:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return shorten(text, limit)
