"""Class names of a data set (docs/contract.md, "Sources"): a text file of one name per line, label order.

Labels index the classes; a store may name them in its attribute ``class_names`` (a list of ``n_classes`` strings),
so that the report can title an image "Ankle boot" rather than "9". The names come from ``ingest --classes FILE``
or from a file ``classes`` beside the four IDX files of the source. Without names, the report says "class 3" (and,
on MNIST, "digit").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnist_kmeans.errors import UserError, shorten
from mnist_kmeans.reading import read_text

CLASSES_FILE = "classes"
MAX_NAME_CHARS = 64  # a name is a tile's title in the report's figures: short by nature
MAX_FILE_BYTES = 1 << 16  # 256 classes (labels are uint8) of 64 characters each fit easily


def parse_class_names(where: str, text: str) -> list[str]:
    """The names listed in ``text`` (read from ``where``): one per line, surrounding blanks stripped.

    Trailing empty lines are ignored; an empty line before the last name, a name longer than
    :data:`MAX_NAME_CHARS` or one with control characters is a :class:`UserError` naming ``where`` and the line.
    """
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise UserError(f"{where}: holds no class names (expected one name per line)")
    for number, name in enumerate(lines, start=1):
        if not name:
            raise UserError(f"{where}: line {number}: empty class name")
        if len(name) > MAX_NAME_CHARS:
            raise UserError(f"{where}: line {number}: class name longer than {MAX_NAME_CHARS} characters")
        if not name.isprintable():
            raise UserError(f"{where}: line {number}: class name {shorten(name)!r} holds control characters")
    return lines


def read_class_names(path: str) -> list[str]:
    """The names of the classes file at ``path`` (``ingest --classes``); see :func:`parse_class_names`."""
    return parse_class_names(path, read_text(Path(path), MAX_FILE_BYTES))  # a regular file: a FIFO never blocks


def decode_names(where: str, data: bytes) -> str:
    """``data`` (at most :data:`MAX_FILE_BYTES` + 1 bytes read from ``where``) as text, or a UserError."""
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"{where}: larger than {MAX_FILE_BYTES >> 10} KiB; not a file of class names")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a UTF-8 text file of class names") from None


def check_count(where: str, names: Sequence[str], n_classes: int) -> None:
    """Raise unless there is one name per class (labels 0 .. n_classes - 1)."""
    if len(names) != n_classes:
        raise UserError(
            f"{where}: lists {len(names)} class names, but the labels have {n_classes} classes (0..{n_classes - 1})"
        )


def valid_class_names(value: Any, n_classes: int) -> bool:
    """Whether ``value`` (a stored attribute or a JSON key) is a list of ``n_classes`` names as ingest writes them."""
    return (
        isinstance(value, list)
        and len(value) == n_classes
        and all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS and v.isprintable() for v in value)
    )
