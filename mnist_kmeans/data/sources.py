"""Where IDX files come from (docs/contract.md, "Sources"), and which checksums they must match.

A source is a directory or an http(s) base URL holding the four standard names, each raw or ``.gz``. A directory
prefers the raw file when both exist (nothing to decompress); a URL is tried as ``.gz`` first (fewer bytes to move).
Files are opened as streams, never downloaded whole.

Checksums (md5 of the uncompressed bytes) are enforced when the source says what they must be:

- a file ``MD5SUMS`` beside the four files (``md5sum`` output: ``<md5>  <name>`` per line) lists sums for the
  uncompressed names; those listed are enforced, other lines are ignored;
- without one, the MNIST copy vendored in this repository (``data/mnist``) is held to MNIST's published sums.

Any other source is accepted as it is, and its sums are recorded in the store. Sums are not matched by file name
or shape alone: Fashion-MNIST, KMNIST and others use the same names and shapes with other bytes; the report tells
MNIST from them by these sums (:func:`mnist_kmeans.reference.is_mnist`).

A file ``classes`` beside the four files names the classes, one per line in label order (:mod:`.classes`); it is
read like ``MD5SUMS``, from a directory or a URL, and is optional.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mnist_kmeans.data.classes import CLASSES_FILE, MAX_FILE_BYTES, decode_names, parse_class_names
from mnist_kmeans.data.idx import Closing, IdxReader
from mnist_kmeans.errors import UserError

# split -> (images, labels), in the order ingest reads them
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES: tuple[str, ...] = tuple(name for pair in SPLIT_FILES.values() for name in pair)
MANIFEST = "MD5SUMS"
# MNIST's published md5 sums of the uncompressed files (also in data/mnist/README.md).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
VENDORED_MNIST = Path(__file__).resolve().parents[2] / "data" / "mnist"
HTTP_TIMEOUT_S = 60
_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")
# MD5SUMS and classes are small: more than this is not one of them (decode_names says so for classes)
_TEXT_MAX_BYTES = max(1 << 20, MAX_FILE_BYTES + 1)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


@dataclass
class Source(Closing):
    """The four files of a source, opened and their headers checked, ready to stream once.

    Attributes
    ----------
    location : str
        What the store records as its source: the absolute directory, or the URL as given.
    readers : dict
        File name (uncompressed, e.g. ``train-images-idx3-ubyte``) -> its open :class:`IdxReader`.
    expected_md5 : dict
        File name -> md5 its uncompressed bytes must have; only the names that have a known sum.
    checksums_from : str
        Where ``expected_md5`` comes from, for messages.
    class_names : list of str or None
        The names of the ``classes`` file beside the four files, if there is one.
    class_names_from : str
        That file's path or URL, for messages.
    """

    location: str
    readers: dict[str, IdxReader]
    expected_md5: dict[str, str] = field(default_factory=dict)
    checksums_from: str = ""
    class_names: list[str] | None = None
    class_names_from: str = ""

    def check_md5(self, name: str, actual: str) -> str:
        """Raise if the sum of ``name`` is known and differs; else return what to log about it."""
        expected = self.expected_md5.get(name)
        if expected is None:
            return f"md5 {actual} (not checked: no {MANIFEST} beside the files)"
        if actual != expected:
            raise UserError(
                f"{self.readers[name].name}: md5 of the uncompressed bytes is {actual}, expected {expected} "
                f"({self.checksums_from})"
            )
        return "md5 ok"

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def open_source(source: str) -> Source:
    """Open the four files of ``source`` (a directory or an http(s) base URL) and check their headers.

    Raises
    ------
    UserError
        When the source does not exist, a file is missing or cannot be opened, a header is wrong, or the
        ``MD5SUMS`` or ``classes`` file is malformed.
    """
    source = str(source)
    if is_url(source):
        base = source.rstrip("/") + "/"
        location, opener = source, functools.partial(_open_url_file, base)
        read_text = functools.partial(_read_url_text, base)
    else:
        if not os.path.isdir(source):
            raise UserError(f"{source}: no such directory (a source is a directory or an http(s) base URL)")
        location, opener = os.path.abspath(source), functools.partial(_open_local_file, source)
        read_text = functools.partial(_read_local_text, source)
    readers: dict[str, IdxReader] = {}
    with contextlib.ExitStack() as stack:
        for name in FILE_NAMES:
            stream, where, gz = opener(name)
            readers[name] = stack.enter_context(IdxReader(stream, where, gz=gz, ndim=3 if "-images-" in name else 1))
        manifest = read_text(MANIFEST, _decode)
        classes = read_text(CLASSES_FILE, decode_names)
        names = parse_class_names(*classes) if classes is not None else None
        stack.pop_all()  # success: the Source owns the readers now
    src = Source(location, readers, class_names=names, class_names_from=classes[0] if classes else "")
    if manifest is not None:
        src.expected_md5, src.checksums_from = _parse_manifest(*manifest), f"listed in {manifest[0]}"
    elif not is_url(source) and Path(source).resolve() == VENDORED_MNIST.resolve():
        src.expected_md5, src.checksums_from = dict(MNIST_MD5), "MNIST's published sum"
    return src


def _parse_manifest(where: str, text: str) -> dict[str, str]:
    sums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _MANIFEST_LINE.match(line)
        if match is None:
            raise UserError(f"{where}: line {number}: expected '<md5>  <file name>', got {line[:60]!r}")
        name = match.group(2).strip().rsplit("/", 1)[-1]
        if name in FILE_NAMES:
            sums[name] = match.group(1).lower()
    return sums


# --- local directories --------------------------------------------------------------------------------------------


def _open_local_file(directory: str, name: str) -> tuple[BinaryIO, str, bool]:
    for candidate, gz in ((name, False), (name + ".gz", True)):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            try:
                return open(path, "rb"), path, gz
            except OSError as exc:
                raise UserError(f"{path}: cannot open: {exc.strerror}") from None
    raise UserError(f"{os.path.join(directory, name)}: not found (neither {name} nor {name}.gz is in {directory})")


def _read_local_text(directory: str, name: str, decode: Callable[[str, bytes], str]) -> tuple[str, str] | None:
    """``(path, text)`` of the small text file ``name`` beside the IDX files, or ``None`` when there is none."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return path, decode(path, f.read(_TEXT_MAX_BYTES))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


# --- http(s) ------------------------------------------------------------------------------------------------------


def _open_url_file(base: str, name: str) -> tuple[BinaryIO, str, bool]:
    for candidate, gz in ((name + ".gz", True), (name, False)):
        response = _urlopen(base + candidate)
        if response is not None:
            return response, base + candidate, gz
    raise UserError(f"{base}{name}: not found (HTTP 404 for both {name}.gz and {name})")


def _read_url_text(base: str, name: str, decode: Callable[[str, bytes], str]) -> tuple[str, str] | None:
    """``(url, text)`` of the small text file ``name`` at ``base``, or ``None`` for 404 Not Found."""
    url = base + name
    response = _urlopen(url)
    if response is None:
        return None
    with response:
        try:
            return url, decode(url, response.read(_TEXT_MAX_BYTES))
        except OSError as exc:
            raise UserError(f"{url}: cannot read: {exc}") from None


def _urlopen(url: str) -> BinaryIO | None:
    """An open response streaming the body of ``url``, or ``None`` for 404 Not Found."""
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            return None
        raise UserError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{url}: cannot fetch: {reason}") from None


def _decode(where: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file of md5 sums") from None
