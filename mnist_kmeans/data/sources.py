"""Where IDX files come from (docs/contract.md, "Sources"), and which checksums they must match.

A source is a directory or an http(s) base URL holding the four standard names, each raw or ``.gz``. A directory
prefers the raw file when both exist (nothing to decompress); a URL is tried as ``.gz`` first (fewer bytes to move).
Files are opened as streams, never downloaded whole.

Checksums (md5 of the uncompressed bytes) are enforced when the source says what they must be:

- a file ``MD5SUMS`` beside the four files (``md5sum`` output: ``<md5>  <name>`` per line) lists sums for the
  uncompressed names; those listed are enforced, other lines are ignored;
- without one, the MNIST copy vendored in this repository (``data/mnist``) is held to MNIST's published sums.

Any other source is accepted as it is, and its sums are recorded in the store. Sums are not matched by file name
or shape alone: Fashion-MNIST, KMNIST and others use the same names and shapes with other bytes; the sums are what
says a store holds MNIST (:func:`is_mnist`).

Class names: a file ``classes`` beside the four files (or the file given to ``ingest --classes``) names the classes,
one per line in label order; the store records them as ``class_names``. Each name is checked by
:func:`check_class_name`, the one rule for a class name wherever one is read (source, store, run directory).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from mnist_kmeans.data.idx import IdxReader
from mnist_kmeans.errors import UserError, shorten

# split -> (images, labels), in the order ingest reads them
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES: tuple[str, ...] = tuple(name for pair in SPLIT_FILES.values() for name in pair)
MANIFEST = "MD5SUMS"
CLASSES = "classes"
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
_MANIFEST_MAX_BYTES = 1 << 20
# Labels are uint8, so at most 256 classes; a name is a title over a small tile, so a few words at most.
MAX_CLASSES = 256
MAX_CLASS_NAME_CHARS = 40


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def is_mnist(md5: Mapping[str, Any] | None) -> bool:
    """Whether the md5 sums recorded for the four files are MNIST's published ones (not a look-alike's)."""
    return isinstance(md5, Mapping) and all(md5.get(name) == digest for name, digest in MNIST_MD5.items())


def check_class_name(name: Any) -> None:
    """Raise ``ValueError`` unless ``name`` is a class name: 1 to 40 printable characters, no surrounding space."""
    if not (isinstance(name, str) and 0 < len(name) <= MAX_CLASS_NAME_CHARS and name.isprintable()
            and name == name.strip()):
        raise ValueError(
            f"a class name must be 1 to {MAX_CLASS_NAME_CHARS} printable characters without surrounding spaces, "
            f"got {shorten(repr(name))}"
        )


@dataclass
class Source:
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
    class_names : tuple of str or None
        The names of the classes in label order, from the ``classes`` file; ``None`` without one.
    classes_from : str
        The ``classes`` file read, for messages.
    """

    location: str
    readers: dict[str, IdxReader]
    expected_md5: dict[str, str] = field(default_factory=dict)
    checksums_from: str = ""
    class_names: tuple[str, ...] | None = None
    classes_from: str = ""

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

    def __enter__(self) -> Source:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_source(source: str, classes: str | None = None) -> Source:
    """Open the four files of ``source`` (a directory or an http(s) base URL) and check their headers.

    ``classes``: a local file naming the classes, one per line; by default the ``classes`` file beside the four
    files, if there is one.

    Raises
    ------
    UserError
        When the source does not exist, a file is missing or cannot be opened, a header is wrong, the ``MD5SUMS`` or
        ``classes`` file is malformed, or the ``classes`` file given is missing.
    """
    source = str(source)
    if classes is not None and not os.path.isfile(classes):
        raise UserError(f"--classes {shorten(classes)}: no such file")
    where = _Location.of(source)
    readers: dict[str, IdxReader] = {}
    with contextlib.ExitStack() as stack:
        for name in FILE_NAMES:
            stream, path, gz = where.open(name)
            readers[name] = stack.enter_context(IdxReader(stream, path, gz=gz, ndim=3 if "-images-" in name else 1))
        manifest = where.read_text(MANIFEST, "md5 sums")
        names = _read_local_text(classes, "class names") if classes else where.read_text(CLASSES, "class names")
        stack.pop_all()  # success: the Source owns the readers now
    src = Source(where.location, readers)
    if manifest is not None:
        src.expected_md5, src.checksums_from = _parse_manifest(*manifest), f"listed in {manifest[0]}"
    elif not is_url(source) and Path(source).resolve() == VENDORED_MNIST.resolve():
        src.expected_md5, src.checksums_from = dict(MNIST_MD5), "MNIST's published sum"
    if names is not None:
        src.class_names, src.classes_from = _parse_classes(*names), names[0]
    return src


@dataclass(frozen=True)
class _Location:
    """Where the files of a source are: its recorded location, and how to open a file or read a text beside them."""

    location: str
    base: str  # the directory, or the URL ending in "/"
    remote: bool

    @classmethod
    def of(cls, source: str) -> _Location:
        if is_url(source):
            return cls(source, source.rstrip("/") + "/", remote=True)
        if not os.path.isdir(source):
            raise UserError(f"{source}: no such directory (a source is a directory or an http(s) base URL)")
        return cls(os.path.abspath(source), source, remote=False)

    def open(self, name: str) -> tuple[BinaryIO, str, bool]:
        """The stream of file ``name`` (raw or ``.gz``), its path or URL, and whether it is gzip-compressed."""
        return _open_url_file(self.base, name) if self.remote else _open_local_file(self.base, name)

    def read_text(self, name: str, what: str) -> tuple[str, str] | None:
        """``(path or URL, text)`` of the text file ``name`` beside the four files, or ``None`` if there is none."""
        if self.remote:
            return _read_url_text(self.base + name, what)
        return _read_local_text(os.path.join(self.base, name), what)


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


def _parse_classes(where: str, text: str) -> tuple[str, ...]:
    """One class name per line, in label order; blank lines only at the end."""
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if not lines:
        raise UserError(f"{where}: names no class (expected one class name per line, in label order)")
    if len(lines) > MAX_CLASSES:
        raise UserError(f"{where}: names {len(lines)} classes; labels are bytes, so at most {MAX_CLASSES}")
    for number, name in enumerate(lines, start=1):
        try:
            check_class_name(name)
        except ValueError as exc:
            raise UserError(f"{where}: line {number}: {exc}") from None
    if len(set(lines)) != len(lines):
        twice = next(name for name in lines if lines.count(name) > 1)
        raise UserError(f"{where}: names the class {shorten(repr(twice))} more than once")
    return tuple(lines)


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


def _read_local_text(path: str, what: str) -> tuple[str, str] | None:
    """``(path, its text)``, or ``None`` when there is no such file; ``what`` the file should hold, for messages."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return path, _decode(path, f.read(_MANIFEST_MAX_BYTES), what)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


# --- http(s) ------------------------------------------------------------------------------------------------------


def _open_url_file(base: str, name: str) -> tuple[BinaryIO, str, bool]:
    for candidate, gz in ((name + ".gz", True), (name, False)):
        response = _urlopen(base + candidate)
        if response is not None:
            return response, base + candidate, gz
    raise UserError(f"{base}{name}: not found (HTTP 404 for both {name}.gz and {name})")


def _read_url_text(url: str, what: str) -> tuple[str, str] | None:
    """``(url, its text)``, or ``None`` for 404 Not Found; ``what`` the file should hold, for messages."""
    response = _urlopen(url)
    if response is None:
        return None
    with response:
        try:
            return url, _decode(url, response.read(_MANIFEST_MAX_BYTES), what)
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


def _decode(where: str, data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file of {what}") from None
