"""The Zarr v3 store layout (SPEC "The store"): open only when complete, read one chunk.

Layout::

    <store>/zarr.json            group attributes: format, source, md5, image_shape, n_classes, complete
    <store>/train/images         uint8 (n_train, H*W), chunks (chunk_rows, H*W)
    <store>/train/labels         uint8 (n_train,),     chunks (chunk_rows,)
    <store>/test/images, test/labels   the same for the test split

A chunk of rows is the unit of work of every later step: one task reads one chunk, on the worker.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from mnist_kmeans.errors import UserError

FORMAT = "mnist-kmeans/1"
SPLITS = ("train", "test")
# 10,000 rows x 784 pixels = 7.8 MB of uint8 per chunk: large enough that reading and per-task overhead are small
# beside the k-means work on it, small enough that a worker holds a few at once; see README "Chunk size".
DEFAULT_CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class StoreInfo:
    """What a complete store says about itself; cheap to send to workers."""

    url: str
    n_train: int
    n_test: int
    n_features: int
    image_shape: tuple[int, int]
    n_classes: int
    chunk_rows: int
    md5: dict[str, str]
    source: str
    ingest_id: str

    def n_rows(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_test

    def chunks(self, split: str) -> list[tuple[int, int]]:
        """Row bounds ``(start, stop)`` of each chunk of a split."""
        n = self.n_rows(split)
        return [(s, min(s + self.chunk_rows, n)) for s in range(0, n, self.chunk_rows)]

    def n_chunks(self, split: str) -> int:
        return len(self.chunks(split))


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def _open_group(url: str, mode: str = "r") -> zarr.Group:
    # use_consolidated=False: attributes (complete) change after creation, and a consolidated snapshot would hide that
    return zarr.open_group(store=str(url), mode=mode, use_consolidated=False)


def read_attrs(url: str) -> dict[str, Any] | None:
    """The group attributes of the store at ``url``, or ``None`` when there is no group there."""
    try:
        return dict(_open_group(url).attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return None
    except Exception as exc:  # a file that is not Zarr, a bad URL, an unreadable directory
        raise UserError(f"{url}: cannot open as a Zarr store: {type(exc).__name__}: {exc}") from None


def open_store(url: str) -> StoreInfo:
    """Open a complete store for reading; anything else is a UserError that says how to fix it."""
    url = str(url)
    attrs = read_attrs(url)
    if attrs is None:
        raise UserError(f"{url}: no store there (run `mnist-kmeans ingest --store {url}` first)")
    if attrs.get("format") != FORMAT:
        raise UserError(f"{url}: store format is {attrs.get('format')!r}, this version reads {FORMAT!r}")
    if attrs.get("complete") is not True:
        raise UserError(f"{url}: store is incomplete (an ingest was interrupted); run `mnist-kmeans ingest --store {url}` again")
    try:
        group = _open_group(url)
        train, test = group["train/images"], group["test/images"]
        h, w = (int(v) for v in attrs["image_shape"])
        if train.shape[1] != h * w or test.shape[1] != h * w:
            raise ValueError(f"image arrays have {train.shape[1]} columns, image_shape says {h}x{w}")
        if group["train/labels"].shape[0] != train.shape[0] or group["test/labels"].shape[0] != test.shape[0]:
            raise ValueError("images and labels have different numbers of rows")
        return StoreInfo(
            url=url,
            n_train=int(train.shape[0]),
            n_test=int(test.shape[0]),
            n_features=h * w,
            image_shape=(h, w),
            n_classes=int(attrs["n_classes"]),
            chunk_rows=int(train.chunks[0]),
            md5=dict(attrs.get("md5", {})),
            source=str(attrs.get("source", "")),
            ingest_id=str(attrs.get("ingest_id", "")),
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{url}: not a valid mnist-kmeans store: {type(exc).__name__}: {exc}") from None


def read_rows(url: str, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of a split as stored: uint8 images ``(n, H*W)`` and uint8 labels ``(n,)``."""
    group = _open_group(url)
    return group[f"{split}/images"][start:stop], group[f"{split}/labels"][start:stop]


def read_rows_at(url: str, split: str, rows: np.ndarray) -> np.ndarray:
    """The images of the given rows (sorted indices) of a split, as stored (uint8)."""
    return _open_group(url)[f"{split}/images"].get_orthogonal_selection((np.asarray(rows), slice(None)))


# --- the worker-side chunk cache --------------------------------------------------------------------------
# Every (K, restart) chain visits every chunk once per epoch. Without a cache, a worker would read and decode the
# same chunk once per chain; with it, once per worker while it fits in the budget. Bounded in bytes, so that a
# store of millions of rows streams through at constant memory. Keyed by the store's ingest_id, so a rebuilt
# store is never served from a stale cache.

CACHE_BYTES = int(os.environ.get("MNIST_KMEANS_CHUNK_CACHE_MB", "256")) * 2**20
_cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_cache_lock = threading.Lock()
_cache_size = 0


def load_chunk(info: StoreInfo, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``index`` of a split: images as float32 in [0, 1] (x / 255) and labels; cached per process.

    The returned arrays are shared with the cache: callers must not modify them.
    """
    global _cache_size
    key = (info.url, info.ingest_id, split, index)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    start, stop = info.chunks(split)[index]
    images, labels = read_rows(info.url, split, start, stop)
    x = np.divide(images, np.float32(255), dtype=np.float32)  # exactly x / 255, as the seed notebook scales
    x.flags.writeable = False
    labels.flags.writeable = False
    item = (x, labels)
    nbytes = x.nbytes + labels.nbytes
    with _cache_lock:
        if nbytes <= CACHE_BYTES and key not in _cache:
            _cache[key] = item
            _cache_size += nbytes
            while _cache_size > CACHE_BYTES:
                _, (ox, oy) = _cache.popitem(last=False)
                _cache_size -= ox.nbytes + oy.nbytes
    return item


def clear_cache() -> None:
    global _cache_size
    with _cache_lock:
        _cache.clear()
        _cache_size = 0


# --- the write side (ingest, augment) -----------------------------------------------------------------------------
# Blosc LZ4HC, level 5, no shuffle (values are single bytes). Measured on one 10,000-row MNIST chunk read through
# zarr: ~5 ms to read and decode, 1.9 MB; Zstd level 1: ~12 ms, 1.6 MB; Zstd level 3 (zarr's default): ~15 ms;
# uncompressed: ~3 ms, 7.8 MB. Workers decode every chunk again and again, ingest writes it once: decoding speed
# wins, and LZ4HC keeps the store a quarter of its raw size for remote readers.
COMPRESSORS = (zarr.codecs.BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle"),)


def create_store(url: str, attributes: dict[str, Any], overwrite: bool = False) -> zarr.Group:
    """A new group at ``url`` holding ``attributes``, marked ``complete: false`` until :func:`mark_complete`."""
    attrs = {"format": FORMAT, **attributes, "complete": False}
    return zarr.create_group(store=str(url), zarr_format=3, attributes=attrs, overwrite=overwrite)


def create_split(group: zarr.Group, split: str, n_rows: int, n_features: int, chunk_rows: int) -> tuple[zarr.Array, zarr.Array]:
    """The empty ``images`` and ``labels`` arrays of one split, chunked by rows as the layout above says."""
    images = group.create_array(
        f"{split}/images", shape=(n_rows, n_features), chunks=(chunk_rows, n_features), dtype="uint8",
        compressors=COMPRESSORS, fill_value=0,
    )
    labels = group.create_array(
        f"{split}/labels", shape=(n_rows,), chunks=(chunk_rows,), dtype="uint8", compressors=COMPRESSORS, fill_value=0
    )
    return images, labels


def mark_complete(group: zarr.Group, attributes: dict[str, Any]) -> None:
    """Add the final ``attributes`` and ``complete: true`` in one write of ``zarr.json``; call after every chunk."""
    group.attrs.update({**attributes, "complete": True})
