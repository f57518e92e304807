"""Streaming reader of IDX files (the format of MNIST), raw or gzip-compressed.

An IDX file is, big-endian::

    0x00 0x00 <type code> <ndim>      the magic number
    ndim x uint32                     the size of each dimension; the first one counts the items
    prod(sizes) x <type>              the items, C order

The reader parses and checks the header on open, then hands out the items block by block, so that memory is bounded
by a block, never by the file. It checks that the file holds exactly the bytes its header announces (a truncated or
an over-long file is an error) and computes the md5 of the uncompressed bytes on the way, which is what checksums of
IDX files are published for. Every fault is a one-line :class:`~mnist_kmeans.errors.UserError` that names the file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

import numpy as np

from mnist_kmeans.errors import UserError

UBYTE = 0x08
TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
GZIP_MAGIC = b"\x1f\x8b"
# Faults of the gzip layer itself, as opposed to faults of the transport below it (OSError, HTTPException).
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


@dataclass(frozen=True)
class IdxHeader:
    """The header of an IDX file of unsigned bytes: the sizes of its dimensions, items first."""

    shape: tuple[int, ...]

    @property
    def n_items(self) -> int:
        return self.shape[0]

    @property
    def item_size(self) -> int:
        """Bytes (= values) per item: an image's H*W, or 1 for a label."""
        return math.prod(self.shape[1:])

    @property
    def header_bytes(self) -> int:
        return 4 + 4 * len(self.shape)

    @property
    def total_bytes(self) -> int:
        """The exact length of the uncompressed file."""
        return self.header_bytes + self.n_items * self.item_size

    def describe(self) -> str:
        """The shape as people write it, e.g. ``60000x28x28``."""
        return "x".join(str(s) for s in self.shape)


class Closing:
    """``with obj:`` closes ``obj`` at the end (the readers here own open files)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class IdxReader(Closing):
    """One IDX file of unsigned bytes, opened for a single streaming pass.

    Parameters
    ----------
    stream : binary file object
        The file's bytes from their start: compressed bytes when ``gz`` is true. The reader takes ownership and
        closes it.
    name : str
        Path or URL of the file, for error messages.
    gz : bool, default=False
        Whether ``stream`` holds a gzip stream.
    ndim : int or None, default=None
        The number of dimensions the caller needs (3 for images, 1 for labels), or ``None`` for any.

    Raises
    ------
    UserError
        On open, when the header is missing, malformed, of another type than unsigned byte, or of the wrong ``ndim``;
        while reading, when the data is truncated, followed by trailing bytes, or the gzip stream is corrupt.
    """

    def __init__(self, stream: BinaryIO, name: str, *, gz: bool = False, ndim: int | None = None):
        self.name = name
        self._raw = stream
        self._stream: BinaryIO = gzip.GzipFile(fileobj=stream, mode="rb") if gz else stream
        self._gz = gz
        self._md5 = hashlib.md5()
        self._n_read = 0
        self._finished = False
        try:
            self.header = self._read_header(ndim)
        except BaseException:
            self.close()
            raise

    # --- public -------------------------------------------------------------------------------------------------

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Yield the items in order, ``rows`` at a time (the last block may be shorter), then check the end of file.

        Blocks are new uint8 arrays of shape ``(k, item_size)`` (images flattened row-major, as the store keeps them),
        or ``(k,)`` for a file of one dimension (labels).
        """
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        h = self.header
        remaining = h.n_items
        while remaining:
            k = min(rows, remaining)
            block = np.empty((k, h.item_size) if len(h.shape) > 1 else (k,), dtype=np.uint8)
            got = self._fill(memoryview(block.reshape(-1)))
            if got < block.nbytes:
                raise self._fault(
                    f"truncated: the header announces {h.describe()} ({h.total_bytes} bytes), "
                    f"the file ends after {self._n_read} bytes"
                )
            remaining -= k
            yield block
        if self._read(1):  # one byte more than announced is enough to know the file is wrong
            raise self._fault(f"trailing data after the {h.total_bytes} bytes its header announces ({h.describe()})")
        self._finished = True

    @property
    def md5(self) -> str:
        """Hex md5 of the uncompressed bytes, header included; known once :meth:`blocks` has run to its end."""
        if not self._finished:
            raise RuntimeError(f"{self.name}: md5 is known only after reading the whole file")
        return self._md5.hexdigest()

    def close(self) -> None:
        # GzipFile does not close a fileobj it was given: close both.
        for s in (self._stream, self._raw):
            with contextlib.suppress(Exception):  # closing after a failure must not hide that failure
                s.close()

    # --- internals ----------------------------------------------------------------------------------------------

    def _read_header(self, ndim: int | None) -> IdxHeader:
        magic = self._read(4)
        if len(magic) < 4:
            raise self._fault(f"truncated: {len(magic)} bytes, too short for an IDX header")
        if magic[:2] != b"\x00\x00":
            hint = " (it looks gzip-compressed: name it *.gz)" if magic[:2] == GZIP_MAGIC else ""
            raise self._fault(f"not an IDX file: magic bytes {magic.hex(' ')}, expected 00 00 <type> <ndim>{hint}")
        code, n_dims = magic[2], magic[3]
        if code != UBYTE:
            what = TYPE_NAMES.get(code, "unknown")
            raise self._fault(f"IDX data type 0x{code:02x} ({what}) is not supported; only 0x08 (unsigned byte) is")
        if n_dims == 0 or (ndim is not None and n_dims != ndim):
            raise self._fault(f"IDX header declares {n_dims} dimensions, expected {ndim or 'at least 1'}")
        sizes = self._read(4 * n_dims)
        if len(sizes) < 4 * n_dims:
            raise self._fault(f"truncated: the file ends inside its IDX header ({4 + len(sizes)} bytes)")
        shape = tuple(int.from_bytes(sizes[i : i + 4], "big") for i in range(0, len(sizes), 4))
        if 0 in shape[1:]:
            raise self._fault(f"IDX header declares an empty item shape {'x'.join(map(str, shape))}")
        return IdxHeader(shape)

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self._fill(memoryview(buf))])

    def _fill(self, buf: memoryview) -> int:
        """Read into ``buf`` until it is full or the file ends; returns the number of bytes read and hashes them."""
        got = 0
        try:
            while got < len(buf):
                n = self._stream.readinto(buf[got:])
                if not n:
                    break
                got += n
        except _GZIP_ERRORS as exc:
            if self._gz and self._n_read == 0 and got == 0 and isinstance(exc, gzip.BadGzipFile):
                raise self._fault("named .gz but is not gzip-compressed") from None
            raise self._fault(f"corrupt gzip stream: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._fault(f"cannot read: {exc}") from None
        self._md5.update(buf[:got])
        self._n_read += got
        return got

    def _fault(self, what: str) -> UserError:
        return UserError(f"{self.name}: {what}")
