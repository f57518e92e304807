"""The Zarr v3 store layout (docs/contract.md, "The store"): open only when complete, read one chunk.

Layout::

    <store>/zarr.json            group attributes: format, source, md5, image_shape, n_classes, label_max,
                                 chunk_rows, ingest_id, chunk_crc32, complete, and optionally class_names,
                                 augmented_from
    <store>/train/images         uint8 (n_train, H*W), chunks (chunk_rows, H*W)
    <store>/train/labels         uint8 (n_train,),     chunks (chunk_rows,)
    <store>/test/images, test/labels   the same for the test split

A chunk of rows is the unit of work of every later step: one task reads one chunk, on the worker.

Integrity: ingest records the CRC-32 of every chunk as stored (the decoded uint8 bytes of its images and of its
labels) in the group attribute ``chunk_crc32`` = ``{split: {"images": [...], "labels": [...]}}``, and writes every
chunk, also an all-zero one. :func:`load_chunk` checks the sums on every read that misses its cache (zlib.crc32 runs
at about 1 GB/s: some 7 ms for a 7.8 MB chunk, beside ~5 ms to decode it), so a chunk that was deleted (Zarr would
silently return its fill value), truncated or changed since ingest stops the job with a :class:`StoreError` that
names the store, the split, the chunk and its rows, rather than giving a wrong result. A store without the attribute
(ingested before it existed) is still read; there only a missing images chunk is detected, and the advice is to
re-ingest with ``--force``.

Trust: :func:`open_store` checks every group attribute against the arrays before anything uses it, so a store that
misdescribes itself fails there, before a cluster starts. ``n_classes`` must exceed the largest label, which ingest
and augment record per split (``label_max``; read from the labels for a store that lacks it); :func:`load_chunk`
checks each chunk's labels against ``n_classes`` too, for labels changed after the store was written.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mnist_kmeans import allocator
from mnist_kmeans.data.chunk_cache import CACHE
from mnist_kmeans.data.classes import valid_class_names
from mnist_kmeans.errors import UserError, one_line, shown

FORMAT = "mnist-kmeans/1"
SPLITS = ("train", "test")
# 10,000 rows x 784 pixels = 7.8 MB of uint8 per chunk: large enough that reading and per-task overhead are small
# beside the k-means work on it, small enough that a worker holds a few at once; see README "Chunk size".
DEFAULT_CHUNK_ROWS = 10_000
CHECKSUM_ATTR = "chunk_crc32"
CLASS_NAMES_ATTR = "class_names"
# {split: largest label}, recorded at ingest so that opening a store checks n_classes without reading labels
LABEL_MAX_ATTR = "label_max"
MAX_CLASSES = 256  # labels are uint8
_HEX32 = re.compile(r"[0-9a-f]{32}")


class StoreError(UserError):
    """A store that cannot be read as it was written: a chunk missing, unreadable or changed since ingest (exit 2).

    Raised on the workers and re-raised on the client by Dask: a plain exception of one string argument, so that it
    pickles as itself.
    """


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
    # CRC-32 of every chunk as written, {split: {"images": (...), "labels": (...)}}; empty for a store ingested
    # before checksums were recorded (see the module docstring).
    checksums: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    # The names of the classes in label order, when the store has them (``ingest --classes``, data/classes.py).
    class_names: tuple[str, ...] | None = None
    # A store written by ``augment``: its attribute of that name (the source store, rows, seed, ...); else None.
    augmented_from: dict[str, Any] | None = None
    # fsspec storage options of a remote store (the cluster file's ``storage:``), sent to the workers with every task
    # that reads it. They may hold a secret: never shown (repr=False), never compared, never written anywhere.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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


Options = dict[str, Any] | None  # fsspec storage options of a remote store; None or {}: the standard credentials


def fsspec_options(url: str, options: Options) -> dict[str, Any]:
    """The keyword ``storage_options=`` for zarr: ``options`` for a remote store, nothing for a local path (zarr
    refuses storage options there)."""
    return {"storage_options": dict(options)} if options and is_remote(url) else {}


def _open_group(url: str, mode: str = "r", options: Options = None) -> zarr.Group:
    # use_consolidated=False: attributes (complete) change after creation, and a consolidated snapshot would hide that.
    # zarr_format=3: the layout is Zarr v3; a v2 group (whose codecs could name pickle) is not a store of ours.
    return zarr.open_group(
        store=str(url), mode=mode, use_consolidated=False, zarr_format=3, **fsspec_options(url, options)
    )


def read_attrs(url: str, options: Options = None) -> dict[str, Any] | None:
    """The group attributes of the store at ``url``, or ``None`` when there is nothing there (or an empty directory).

    A local directory that holds something else (other files, a Zarr v2 group) is a UserError: nothing may be
    written over it, and nothing in it is read.
    """
    try:
        return dict(_open_group(url, options=options).attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        local = None if is_remote(url) else Path(str(url).removeprefix("file://"))
        if local is not None and local.exists() and not local.is_dir():
            raise UserError(f"{url}: exists and is not a directory; will not overwrite it") from None
        if local is not None and local.is_dir() and any(local.iterdir()):
            raise UserError(f"{url}: exists and is not an mnist-kmeans store; will not overwrite it") from None
        return None
    except PermissionError as exc:
        if is_remote(url):
            raise UserError(f"{url}: access denied ({one_line(exc, with_type=True)}); {CREDENTIALS_HINT}") from None
        raise UserError(f"{url}: cannot open as a Zarr store: {one_line(exc, with_type=True)}") from None
    except Exception as exc:  # a file that is not Zarr, a bad URL, an unreadable directory
        raise UserError(f"{url}: cannot open as a Zarr store: {type(exc).__name__}: {exc}") from None


# Where the credentials of a remote store come from (README, "Object storage"); said when they are refused.
CREDENTIALS_HINT = (
    "check the credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL), ~/.aws, "
    "or the storage: section of the cluster file"
)


def write_error(name: str, exc: BaseException) -> UserError:
    """The error for a store that cannot be written: a remote store whose credentials may only read says so."""
    reason = one_line(exc, with_type=True)
    if isinstance(exc, PermissionError) and is_remote(name):
        return UserError(f"{name}: cannot write the store: access denied ({reason}): these credentials may not write")
    return UserError(f"{name}: cannot write the store: {reason}")


def open_store(url: str, options: Options = None) -> StoreInfo:
    """Open a complete store for reading; anything else is a UserError that says how to fix it.

    No attribute is trusted: each is checked against the arrays (docs/contract.md, "Store layout"), so a store that
    misdescribes itself is refused here, before any cluster starts, instead of failing in the middle of a run.
    """
    url = str(url)
    attrs = read_attrs(url, options)
    if attrs is None:
        raise UserError(f"{url}: no store there (run `mnist-kmeans ingest --store {url}` first)")
    if attrs.get("format") != FORMAT:
        raise attribute_error(
            url, "format", f"the store format is {_shown(attrs.get('format'))}, this version reads {FORMAT!r}"
        )
    if not is_complete(url, attrs):
        raise UserError(
            f"{url}: store is incomplete (an ingest was interrupted); run `mnist-kmeans ingest --store {url}` again"
        )
    try:
        group = _open_group(url, options=options)
        arrays, n_features, chunk_rows = _checked_arrays(group)
    except Exception as exc:  # an array missing, of another kind or shape, metadata that does not parse
        raise UserError(f"{url}: not a valid mnist-kmeans store: {one_line(exc, with_type=True)}") from None
    checked = _Attributes(url, attrs)
    checked.equal_int("chunk_rows", chunk_rows, "the arrays' chunks")
    info = StoreInfo(
        url=url,
        n_train=int(arrays["train", "images"].shape[0]),
        n_test=int(arrays["test", "images"].shape[0]),
        n_features=n_features,
        image_shape=checked.image_shape(n_features),
        n_classes=checked.n_classes(_label_max(checked, arrays)),
        chunk_rows=chunk_rows,
        md5=checked.md5(),
        source=checked.text("source"),
        ingest_id=checked.hex_id("ingest_id"),
    )
    return dataclasses.replace(
        info,
        checksums=checked.checksums(info),
        class_names=checked.class_names(info.n_classes),
        augmented_from=checked.augmented_from(),
        storage_options=dict(options or {}),
    )


def is_complete(url: str, attrs: dict[str, Any]) -> bool:
    """The ``complete`` attribute of a store of this format: ``True`` (complete), ``False`` (being built or
    interrupted); anything else is a UserError, for neither state can be assumed of it."""
    value = attrs.get("complete")
    if isinstance(value, bool):
        return value
    raise attribute_error(
        url,
        "complete",
        f"must be true or false, got {_shown(value)}; the store cannot be trusted: rebuild it "
        "(mnist-kmeans ingest --force, or augment into a new path)",
    )


def attribute_error(url: str, name: str, what: str) -> UserError:
    """The error for a wrong group attribute: ``<store>: attribute <name>: what is wrong``."""
    return UserError(f"{url}: attribute {name}: {what}")


def _shown(value: object) -> str:
    """A value read from a store, as an error message echoes it: its repr, shortened."""
    return "nothing (missing)" if value is None else shown(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_arrays(group: zarr.Group) -> tuple[dict[tuple[str, str], zarr.Array], int, int]:
    """The four arrays ``{(split, name): array}``, the pixels per image and the rows per chunk, checked against the
    layout above; a ``ValueError`` (or whatever reading them raises) says what does not fit."""
    arrays = {(split, name): group[f"{split}/{name}"] for split in SPLITS for name in ("images", "labels")}
    for (split, name), array in arrays.items():
        if not isinstance(array, zarr.Array):
            raise ValueError(f"{split}/{name} is not an array")
        if array.dtype != np.uint8:
            raise ValueError(f"{split}/{name} has dtype {array.dtype}, not uint8")
    first = arrays["train", "images"]
    if first.ndim != 2:
        raise ValueError(f"train/images has shape {first.shape}, expected (rows, pixels)")
    n_features, chunk_rows = int(first.shape[1]), int(first.chunks[0])
    for (split, name), array in arrays.items():
        shape, chunks = ((n_features,), (chunk_rows, n_features)) if name == "images" else ((), (chunk_rows,))
        if array.ndim != len(chunks) or array.shape[1:] != shape or array.chunks != chunks:
            raise ValueError(
                f"{split}/{name} has shape {array.shape} in chunks {array.chunks}, expected "
                f"(rows, {n_features}) in chunks of {chunk_rows} rows as train/images"
            )
    for split in SPLITS:
        if arrays[split, "labels"].shape[0] != arrays[split, "images"].shape[0]:
            raise ValueError(f"{split}: images and labels have different numbers of rows")
        if arrays[split, "images"].shape[0] == 0:
            raise ValueError(f"{split}: holds no rows")
    return arrays, n_features, chunk_rows


def _label_max(checked: _Attributes, arrays: dict[tuple[str, str], zarr.Array]) -> int:
    """The largest label of the store: from ``label_max`` when the store records it, else read from the labels
    (stores ingested before it existed: one byte per row, 70 kB for MNIST, read once on the client)."""
    if LABEL_MAX_ATTR in checked.attrs:
        return max(checked.label_max().values())
    top = 0
    for split in SPLITS:
        try:
            top = max(top, int(arrays[split, "labels"][:].max()))
        except Exception as exc:
            raise StoreError(f"{checked.url}: {split}/labels: cannot read: {one_line(exc, with_type=True)}") from None
    return top


@dataclass(frozen=True)
class _Attributes:
    """The group attributes of a store being opened, each checked against what the arrays say."""

    url: str
    attrs: dict[str, Any]

    def fail(self, name: str, what: str) -> UserError:
        return attribute_error(self.url, name, what)

    def equal_int(self, name: str, actual: int, what: str) -> int:
        value = self.attrs.get(name)
        if not _is_int(value) or value != actual:
            raise self.fail(name, f"is {_shown(value)}, but {what} say {actual}")
        return actual

    def image_shape(self, n_features: int) -> tuple[int, int]:
        value = self.attrs.get("image_shape")
        if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) and v >= 1 for v in value):
            raise self.fail("image_shape", f"must be [H, W] of two positive integers, got {_shown(value)}")
        h, w = value
        if h * w != n_features:
            raise self.fail("image_shape", f"{h}x{w} does not match the {n_features} pixels per row of the images")
        return h, w

    def label_max(self) -> dict[str, int]:
        value = self.attrs.get(LABEL_MAX_ATTR)
        if (
            not isinstance(value, dict)
            or set(value) != set(SPLITS)
            or not all(_is_int(v) and 0 <= v <= MAX_CLASSES - 1 for v in value.values())
        ):
            raise self.fail(
                LABEL_MAX_ATTR, f"must be {{train: L, test: L}} of labels in 0..{MAX_CLASSES - 1}, got {_shown(value)}"
            )
        return value

    def n_classes(self, label_max: int) -> int:
        value = self.attrs.get("n_classes")
        if not _is_int(value) or not 1 <= value <= MAX_CLASSES:
            raise self.fail("n_classes", f"must be an integer in 1..{MAX_CLASSES} (uint8 labels), got {_shown(value)}")
        if value <= label_max:
            raise self.fail("n_classes", f"is {value}, but the store holds label {label_max}")
        return value

    def md5(self) -> dict[str, str]:
        value = self.attrs.get("md5")
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX32.fullmatch(v) for k, v in value.items()
        ):
            raise self.fail("md5", f"must map file names to md5 sums (32 hex digits), got {_shown(value)}")
        return dict(value)

    def text(self, name: str) -> str:
        value = self.attrs.get(name)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {_shown(value)}")
        return value

    def hex_id(self, name: str) -> str:
        value = self.attrs.get(name)
        if not isinstance(value, str) or not _HEX32.fullmatch(value):
            raise self.fail(name, f"must be 32 hex digits, got {_shown(value)}")
        return value

    def class_names(self, n_classes: int) -> tuple[str, ...] | None:
        value = self.attrs.get(CLASS_NAMES_ATTR)
        if value is not None and not valid_class_names(value, n_classes):
            raise self.fail(CLASS_NAMES_ATTR, f"must be a list of {n_classes} short names, got {_shown(value)}")
        return tuple(value) if value is not None else None

    def augmented_from(self) -> dict[str, Any] | None:
        value = self.attrs.get("augmented_from")
        if value is not None and not isinstance(value, dict):
            raise self.fail("augmented_from", f"must be a mapping, got {_shown(value)}")
        return dict(value) if value is not None else None

    def checksums(self, info: StoreInfo) -> dict[str, dict[str, tuple[int, ...]]]:
        """The validated ``chunk_crc32`` attribute: one sum per chunk of each array; ``{}`` when the store has none."""
        raw = self.attrs.get(CHECKSUM_ATTR)
        if raw is None:
            return {}
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for split in SPLITS:
            n = info.n_chunks(split)
            per_split = raw.get(split) if isinstance(raw, dict) else None
            out[split] = {}
            for name in ("images", "labels"):
                sums = per_split.get(name) if isinstance(per_split, dict) else None
                if not isinstance(sums, list) or len(sums) != n or not all(_is_int(v) and 0 <= v < 2**32 for v in sums):
                    raise self.fail(CHECKSUM_ATTR, f"{split}.{name} must be a list of {n} CRC-32 values")
                out[split][name] = tuple(sums)
        return out


def chunk_checksum(block: np.ndarray) -> int:
    """CRC-32 of a block of rows as stored (its uint8 bytes, C order): what ``chunk_crc32`` records per chunk."""
    return zlib.crc32(np.ascontiguousarray(block, dtype=np.uint8).data)


def _rows_of(url: str, split: str, start: int, stop: int, options: Options) -> tuple[np.ndarray, np.ndarray]:
    group = _open_group(url, options=options)
    return group[f"{split}/images"][start:stop], group[f"{split}/labels"][start:stop]


def read_rows(url: str, split: str, start: int, stop: int, options: Options = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of a split as stored: uint8 images ``(n, H*W)`` and uint8 labels ``(n,)``."""
    try:
        return _rows_of(url, split, start, stop, options)
    except Exception as exc:
        reason = one_line(exc, with_type=True)
        raise StoreError(f"{url}: {split} rows {start}-{stop - 1}: cannot read: {reason}") from None


def read_rows_at(url: str, split: str, rows: np.ndarray, options: Options = None) -> np.ndarray:
    """The images of the given rows (sorted indices) of a split, as stored (uint8)."""
    rows = np.asarray(rows)
    try:
        array = _open_group(url, options=options)[f"{split}/images"]
        return array.get_orthogonal_selection((rows, slice(None)))
    except Exception as exc:
        where = f"{url}: {split} rows"
        try:  # name the chunk at fault: read the chunks these rows touch one by one (only on this error path)
            step, n = int(array.chunks[0]), int(array.shape[0])
            for index in np.unique(rows // step):
                start, stop = int(index) * step, min(int(index) * step + step, n)
                try:
                    array[start:stop]
                except Exception:
                    where = f"{url}: {split} chunk {index} (rows {start}-{stop - 1})"
                    break
        except Exception:  # the store itself is unreadable: the rows are all we can name
            pass
        raise StoreError(f"{where}: cannot read: {one_line(exc, with_type=True)}") from None


def _chunk_where(info: StoreInfo, split: str, index: int) -> str:
    start, stop = info.chunks(split)[index]
    return f"{info.url}: {split} chunk {index} (rows {start}-{stop - 1})"


def _chunk_exists(url: str, split: str, name: str, index: int, options: Options = None) -> bool:
    """Whether chunk ``index`` of ``split/name`` has an object in the store (Zarr reads a missing one as fill value)."""
    from zarr.core.sync import sync

    array = _open_group(url, options=options)[f"{split}/{name}"]
    coords = (index,) + (0,) * (array.ndim - 1)
    return bool(sync((array.store_path / array.metadata.encode_chunk_key(coords)).exists()))


def verify_chunk(info: StoreInfo, split: str, index: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Raise :class:`StoreError` unless the chunk read is the chunk ingest wrote (see the module docstring)."""
    sums = info.checksums.get(split)
    if sums:
        for name, block in (("images", images), ("labels", labels)):
            got, want = chunk_checksum(block), sums[name][index]
            if got != want:
                what = (
                    "is missing from the store"
                    if not _chunk_exists(info.url, split, name, index, info.storage_options)
                    else f"does not match its checksum (crc32 {got:08x}, ingest recorded {want:08x})"
                )
                raise StoreError(
                    f"{_chunk_where(info, split, index)}: the {name} chunk {what}: the store is damaged or was "
                    "changed after ingest; rebuild it (mnist-kmeans ingest --force, or augment again)"
                )
    elif not _chunk_exists(info.url, split, "images", index, info.storage_options):
        # labels: an all-zero chunk may legitimately be absent
        raise StoreError(
            f"{_chunk_where(info, split, index)}: the images chunk is missing from the store; rebuild it "
            "(mnist-kmeans ingest --force: a store of this version also records a checksum of every chunk)"
        )


# --- the read of one chunk by a task ------------------------------------------------------------------------------


def load_chunk(info: StoreInfo, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``index`` of a split: images as float32 in [0, 1] (x / 255) and labels; cached per process
    (:mod:`mnist_kmeans.data.chunk_cache`).

    Every read from the store is verified (:func:`verify_chunk`); a chunk that is missing, unreadable or changed is a
    :class:`StoreError` naming the store, split, chunk and rows. The returned arrays are shared with the cache:
    callers must not modify them.
    """
    allocator.tune()  # every task that computes on rows comes here first (allocator.py: why)
    key = (info.url, info.ingest_id, split, index)
    cached = CACHE.get(key)
    if cached is not None:
        return cached
    images, labels = _read_verified(info, split, index)
    # Exactly x / 255 in float32 (every result depends on it), as np.divide(images, 255, dtype=float32) gives it, in
    # a quarter less time: the mixed-type divide casts element by element, astype and an in-place divide vectorise.
    x = images.astype(np.float32)
    np.divide(x, np.float32(255), out=x)
    x.flags.writeable = False
    labels.flags.writeable = False
    chunk = (x, labels)
    CACHE.put(key, chunk)
    return chunk


def _read_verified(info: StoreInfo, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``index`` of a split as stored, checked by :func:`verify_chunk`; any failure is a StoreError."""
    start, stop = info.chunks(split)[index]
    try:
        images, labels = _rows_of(info.url, split, start, stop, info.storage_options)
        verify_chunk(info, split, index, images, labels)
    except StoreError:
        raise
    except Exception as exc:  # unreadable: permissions, a chunk that does not decode, a store gone, a network error
        raise StoreError(f"{_chunk_where(info, split, index)}: cannot read: {one_line(exc, with_type=True)}") from None
    top = int(labels.max())
    if top >= info.n_classes:  # would index past every per-class table (label maps, contingency)
        raise StoreError(
            f"{_chunk_where(info, split, index)}: holds label {top}, but the store says n_classes is {info.n_classes}; "
            "the store was changed after it was written: rebuild it (mnist-kmeans ingest --force, or augment again)"
        )
    return images, labels


# --- the write side (ingest, augment) -----------------------------------------------------------------------------
# Blosc LZ4HC, level 5, no shuffle (values are single bytes). Measured on one 10,000-row MNIST chunk read through
# zarr: ~5 ms to read and decode, 1.9 MB; Zstd level 1: ~12 ms, 1.6 MB; Zstd level 3 (zarr's default): ~15 ms;
# uncompressed: ~3 ms, 7.8 MB. Workers decode every chunk again and again, ingest writes it once: decoding speed
# wins, and LZ4HC keeps the store a quarter of its raw size for remote readers.
COMPRESSORS = (zarr.codecs.BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle"),)


def create_store(url: str, attributes: dict[str, Any], overwrite: bool = False, options: Options = None) -> zarr.Group:
    """A new group at ``url`` holding ``attributes``, marked ``complete: false`` until :func:`mark_complete`.

    ``attributes["ingest_id"]``, new on every build, is also the writer's id: :func:`check_writer` reads it back.
    """
    attrs = {"format": FORMAT, **attributes, "complete": False}
    return zarr.create_group(
        store=str(url), zarr_format=3, attributes=attrs, overwrite=overwrite, **fsspec_options(url, options)
    )


def check_writer(url: str, ingest_id: str, options: Options = None, name: str | None = None) -> None:
    """Raise a UserError unless the store at ``url`` is still the incomplete one this writer created (its
    ``ingest_id``): an object store has no rename and no lock, so a second ingest or augment into the same URL
    rebuilds it in place, and the first must not then mark the mix complete (README, "Object storage")."""
    attrs = read_attrs(url, options) or {}
    if attrs.get("ingest_id") != ingest_id or attrs.get("complete") is not False:
        raise UserError(
            f"{name or url}: another ingest or augment wrote this store meanwhile; this one stopped without marking "
            "it complete: run it again once the other has finished"
        )


def create_split(
    group: zarr.Group, split: str, n_rows: int, n_features: int, chunk_rows: int
) -> tuple[zarr.Array, zarr.Array]:
    """The empty ``images`` and ``labels`` arrays of one split, chunked by rows as the layout above says."""
    # write_empty_chunks: every chunk gets an object, also one of all zeros, so that "no object" always means damage
    config = {"write_empty_chunks": True}
    images = group.create_array(
        f"{split}/images",
        shape=(n_rows, n_features),
        chunks=(chunk_rows, n_features),
        dtype="uint8",
        compressors=COMPRESSORS,
        fill_value=0,
        config=config,
    )
    labels = group.create_array(
        f"{split}/labels",
        shape=(n_rows,),
        chunks=(chunk_rows,),
        dtype="uint8",
        compressors=COMPRESSORS,
        fill_value=0,
        config=config,
    )
    return images, labels


def mark_complete(group: zarr.Group, attributes: dict[str, Any]) -> None:
    """Add the final ``attributes`` and ``complete: true`` in one write of ``zarr.json``; call after every chunk.

    ``group.update_attributes``, not ``group.attrs.update``: the latter writes ``zarr.json`` once per key.
    """
    group.update_attributes({**attributes, "complete": True})
