"""IDX files -> the Zarr store of docs/contract.md, "Store layout", streamed one chunk at a time.

An ingest:

1. opens the source's four files and checks their headers (counts of images and labels agree per split, training
   and test images have one size) before anything is written;
2. claims a local target (an exclusive lock on ``<store>.lock``, ``staging.claimed``: a second ingest or augment
   into it is refused until this one ends), then looks at it: nothing there, a store of this format (complete or
   not), or anything else (refused);
3. with a complete store there and no ``force``, reads the source once for its md5 sums: the same sums are a no-op
   that writes nothing, other sums an error that asks for ``--force``;
4. otherwise streams every file into a new store, a chunk at a time (memory: one chunk), checks each file's md5 as
   it ends, records the CRC-32 of every chunk written (``chunk_crc32``, checked by every later read, see
   ``store.py``), writes every chunk even when it is all zeros, and writes ``complete: true`` last. A local store is
   built in a sibling directory ``<store>.tmp-<hex>`` and renamed into place only once complete, so an error or a
   kill leaves what was there untouched; the next ingest removes the leftovers. A remote store (URL) is written in
   place: until its last attribute is written it is incomplete, which ``open_store`` refuses, and the next ingest
   rebuilds it (``staging.py``, shared with ``augment``).

Class names (``--classes FILE``, else a file ``classes`` beside the IDX files; :mod:`.classes`) are parsed before
anything is written, and their count is checked against the labels before ``complete: true``; they are stored as
the attribute ``class_names``. A store that already holds this data is a no-op only if it also holds these names.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import zarr

from mnist_kmeans.data import store as store_layout
from mnist_kmeans.data.classes import check_count, read_class_names
from mnist_kmeans.data.idx import IdxReader
from mnist_kmeans.data.sources import SPLIT_FILES, Source, open_source
from mnist_kmeans.data.staging import claimed, existing_store, local_path, staging
from mnist_kmeans.data.store import (
    CHECKSUM_ATTR,
    CLASS_NAMES_ATTR,
    DEFAULT_CHUNK_ROWS,
    LABEL_MAX_ATTR,
    Options,
    StoreInfo,
    chunk_checksum,
    is_complete,
    open_store,
)
from mnist_kmeans.errors import Log, UserError, count

# A chunk is what a worker decodes and then holds as float32 (4x its bytes): 1 GiB of uint8 is far beyond any sane
# choice, and stays below Blosc's 2 GiB limit per buffer.
MAX_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class _Layout:
    """What the headers say about the data set: one image size, the rows of each split."""

    image_shape: tuple[int, int]
    n_rows: dict[str, int]

    @property
    def n_features(self) -> int:
        return self.image_shape[0] * self.image_shape[1]


@dataclass(frozen=True)
class _Names:
    """The class names to record, and the file they come from (for messages); ``names`` is None without one."""

    names: list[str] | None = None
    where: str = ""


def ingest(
    source: str,
    store: str,
    chunk_rows: int | None = None,
    force: bool = False,
    log: Log = print,
    classes: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StoreInfo:
    """Write the IDX files of ``source`` into the Zarr store ``store``; return the complete store's description.

    Parameters
    ----------
    source : str
        A directory or an http(s) base URL holding the four standard IDX files, raw or ``.gz``.
    store : str
        Path or URL of the store to write.
    chunk_rows : int or None, default=None
        Rows per chunk; ``None`` means :data:`~mnist_kmeans.data.store.DEFAULT_CHUNK_ROWS` for a new store, and any
        chunk size for a store that is already complete.
    force : bool, default=False
        Rebuild a complete store even when it holds other data or another chunk size.
    log : callable, default=print
        Receives one line per step (the command line sends them to stderr), once the ingest has succeeded.
    classes : str or None, default=None
        A file of class names, one per line in label order; ``None`` takes the source's ``classes`` file, if any.
    storage_options : dict or None, default=None
        fsspec storage options of a remote store (the cluster file's ``storage:``); ``None``: the standard
        credentials (``AWS_*`` variables, ``~/.aws``).

    Raises
    ------
    UserError
        For every fault of the source or the target (exit code 2); what existed at the target is left untouched,
        except that a remote store being rebuilt is overwritten in place.
    """
    store = str(store)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise UserError(f"--chunk-rows: must be a positive integer, got {chunk_rows!r}")
    # An error must be the only line on stderr (docs/contract.md, "Exit codes"): progress waits for success.
    progress: list[str] = []
    given = _Names(read_class_names(classes), classes) if classes is not None else None
    info = _ingest(source, store, chunk_rows, force, progress.append, given, storage_options or {})
    for line in progress:
        log(line)
    return info


def _ingest(
    source: str, store: str, chunk_rows: int | None, force: bool, log: Log, given: _Names | None, options: Options
) -> StoreInfo:
    local = local_path(store)
    with claimed(local, store):  # before the target is read: a second ingest into it stops here, changing nothing
        existing = existing_store(store, local, options)
        with open_source(source) as src:
            names = given or _Names(src.class_names, src.class_names_from)
            layout = _check_layout(src)
            rows = chunk_rows or DEFAULT_CHUNK_ROWS
            _check_chunk_bytes(src, layout, rows)
            # a `complete` that is neither true nor false is refused (is_complete) unless --force rebuilds anyway
            if existing is not None and not force and is_complete(store, existing):
                return _keep_existing(store, src, chunk_rows, names, log, options)
            if existing is not None:
                why = "it is incomplete" if existing.get("complete") is False else "--force"
                log(f"ingest: rebuilding {store} ({why})")
            with staging(local, store, log) as target:
                overwrite = local is None and existing is not None
                to = _Target(target, store, overwrite, options if local is None else None)
                _write(to, src, layout, rows, names, log=log)
        info = open_store(store, options)
    h, w = info.image_shape
    log(
        f"ingest: wrote {store}: {info.n_train} training and {info.n_test} test images of {h}x{w}, "
        f"{count(info.n_classes, 'class')}, chunks of {info.chunk_rows} rows"
    )
    return info


# --- checks before anything is written ------------------------------------------------------------------------------


def _check_layout(src: Source) -> _Layout:
    """Image and label counts agree per split, every split has rows, and all images have one size."""
    n_rows, item_shapes = {}, {}
    for split, (images_name, labels_name) in SPLIT_FILES.items():
        images, labels = src.readers[images_name], src.readers[labels_name]
        n = images.header.n_items
        if n == 0:
            raise UserError(f"{images.name}: holds no images")
        if labels.header.n_items != n:
            raise UserError(f"{labels.name}: holds {labels.header.n_items} labels, but {images.name} holds {n} images")
        n_rows[split], item_shapes[split] = n, images.header.shape[1:]
    if item_shapes["test"] != item_shapes["train"]:
        test = src.readers[SPLIT_FILES["test"][0]]
        raise UserError(
            f"{test.name}: images are {_hxw(item_shapes['test'])}, the training images are {_hxw(item_shapes['train'])}"
        )
    h, w = item_shapes["train"]
    return _Layout((h, w), n_rows)


def _check_chunk_bytes(src: Source, layout: _Layout, rows: int) -> None:
    if layout.n_features > MAX_CHUNK_BYTES:
        raise UserError(
            f"{src.readers[SPLIT_FILES['train'][0]].name}: images of {_hxw(layout.image_shape)} are too large"
        )
    if rows * layout.n_features > MAX_CHUNK_BYTES:
        raise UserError(
            f"--chunk-rows {rows}: chunks of {rows} images of {_hxw(layout.image_shape)} exceed "
            f"{MAX_CHUNK_BYTES >> 20} MiB; choose at most {MAX_CHUNK_BYTES // layout.n_features} rows"
        )


def _hxw(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


# --- no-op or refuse ------------------------------------------------------------------------------------------------


def _keep_existing(
    store: str, src: Source, chunk_rows: int | None, names: _Names, log: Log, options: Options
) -> StoreInfo:
    """A complete store is there and no ``force``: succeed without writing if it holds this very data (and, when
    class names are given, these names)."""
    info = open_store(store, options)
    if chunk_rows is not None and chunk_rows != info.chunk_rows:
        raise UserError(
            f"{store}: a complete store with chunks of {info.chunk_rows} rows is there; "
            f"use --force to rebuild it with --chunk-rows {chunk_rows}"
        )
    if names.names is not None and tuple(names.names) != info.class_names:
        raise UserError(
            f"{store}: a complete store with {'other' if info.class_names else 'no'} class names is there; "
            f"use --force to rebuild it with the names of {names.where}"
        )
    for name, reader in src.readers.items():
        _copy(reader, DEFAULT_CHUNK_ROWS)
        if _finish_file(src, name, log) != info.md5.get(name):
            raise UserError(
                f"{store}: holds a complete store of other data (from {info.source}; {name} differs); "
                "use --force to replace it"
            )
    log(f"ingest: {store} already holds this data (same md5 sums); nothing to do")
    return info


# --- writing --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Where :func:`_write` builds the store: ``url`` (the store or its temporary sibling), ``name`` for messages,
    whether an incomplete remote store is rebuilt in place, and the storage options of a remote one."""

    url: str
    name: str
    overwrite: bool
    options: Options

    def check_writer(self, ingest_id: str) -> None:
        """A remote store: still the one this ingest created (``store.check_writer``); a local one is claimed."""
        if self.options is not None:
            store_layout.check_writer(self.url, ingest_id, self.options, self.name)


def _write(to: _Target, src: Source, layout: _Layout, rows: int, names: _Names, log: Log) -> None:
    """Stream the four files into a new store at ``to.url``; ``complete: true`` comes last, after a remote store was
    checked to be still this ingest's own (before every split and before ``complete``)."""
    attrs = {
        "source": src.location,
        "image_shape": list(layout.image_shape),
        "chunk_rows": rows,
        "ingest_id": uuid.uuid4().hex,  # new on every build: caches of chunks key on it
    }
    try:
        group = store_layout.create_store(to.url, attrs, overwrite=to.overwrite, options=to.options)
        md5, label_max, checksums = {}, {}, {}
        for split, (images_name, labels_name) in SPLIT_FILES.items():
            to.check_writer(attrs["ingest_id"])
            images, labels = store_layout.create_split(group, split, layout.n_rows[split], layout.n_features, rows)
            _, images_crc = _copy(src.readers[images_name], rows, images)
            md5[images_name] = _finish_file(src, images_name, log)
            label_max[split], labels_crc = _copy(src.readers[labels_name], rows, labels)
            md5[labels_name] = _finish_file(src, labels_name, log)
            checksums[split] = {"images": images_crc, "labels": labels_crc}
        # Labels index the classes (label maps, confusion matrices): n_classes is the largest label + 1; label_max
        # lets open_store check that without reading the labels. The CRC-32 of every chunk lets every later read
        # prove it got what was written (store.verify_chunk).
        n_classes = max(label_max.values()) + 1
        final = {"md5": md5, "n_classes": n_classes, LABEL_MAX_ATTR: label_max, CHECKSUM_ATTR: checksums}
        if names.names is not None:
            check_count(names.where, names.names, n_classes)  # before complete: a wrong count leaves no store
            final[CLASS_NAMES_ATTR] = names.names
        to.check_writer(attrs["ingest_id"])
        store_layout.mark_complete(group, final)
    except (OSError, NotImplementedError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
        raise store_layout.write_error(to.name, exc) from None


def _copy(reader: IdxReader, rows: int, array: zarr.Array | None = None) -> tuple[int, list[int]]:
    """Read a file to its end, ``rows`` items at a time, writing block i to chunk i of ``array`` when one is given.

    Blocks match chunks one to one, so every chunk is written once, whole. Returns the largest value read and the
    CRC-32 of each block (that is, of each chunk as stored).
    """
    top, crcs = 0, []
    for i, block in enumerate(reader.blocks(rows)):
        if array is not None:
            array[i * rows : i * rows + len(block)] = block
            crcs.append(chunk_checksum(block))
        top = max(top, int(block.max()))
    return top, crcs


def _finish_file(src: Source, name: str, log: Log) -> str:
    """Check the md5 of a file read to its end against the source's known sums; log it; return it."""
    reader = src.readers[name]
    status = src.check_md5(name, reader.md5)
    log(f"ingest: {name} {reader.header.describe()} {status}")
    return reader.md5
