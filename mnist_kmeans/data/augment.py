"""``mnist-kmeans augment``: a larger training set of deformed digits (infimnist-style), written by the cluster.

Row ``i`` of the new training split is a random deformation of source training row ``i % n_train``, with that
row's label; this is infimnist's own mapping (pattern ``i`` is a deformation of training digit ``i mod 60000``),
so every source digit occurs ``rows // n_train`` or ``rows // n_train + 1`` times and the class balance of the
source is kept. The test split is copied unchanged.

The deformation and its random numbers are :mod:`mnist_kmeans.data.deform`'s: row ``i`` depends only on
``(seed, i)``, so it does not depend on the store's chunk size, on which task or worker computes it, or on
``--rows``: the first ``N`` rows of a larger augmented set equal a set of ``N`` rows with the same seed.

Work. One task writes one whole chunk of the new store (chunks are the source store's ``chunk_rows``): it reads
the source rows it needs, deforms them ``deform.BATCH_ROWS`` at a time (so that float temporaries stay in the CPU
cache and memory stays at about two chunks of uint8 per task), and writes its images and labels on the worker.
The test split is copied by tasks too, chunk by chunk. The client holds no data; it keeps a bounded window of
tasks in flight (:class:`_TaskWindow`), so that its memory and the scheduler's do not grow with ``--rows``. A local
store is built in a sibling temporary directory and renamed into place once complete, exactly as ``ingest`` does;
``complete: true`` is written last, by the client, after every task succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mnist_kmeans.data.deform import DEFAULT_PARAMS, ROWS_PER_STREAM, DeformParams, deform
from mnist_kmeans.data.staging import claimed, existing_store, local_path, staging
from mnist_kmeans.data.store import (
    CHECKSUM_ATTR,
    CLASS_NAMES_ATTR,
    LABEL_MAX_ATTR,
    Options,
    StoreError,
    StoreInfo,
    check_writer,
    chunk_checksum,
    create_split,
    create_store,
    fsspec_options,
    is_complete,
    mark_complete,
    open_store,
    read_rows,
    write_error,
)
from mnist_kmeans.errors import ClusterError, Log, UserError, one_line, to_stderr

MAX_SEED = 2**32 - 1  # the bound of job seeds (config.py)
# retries: a chunk is rewritten whole, so running a task again is harmless (e.g. a flaky remote store).
TASK_RETRIES = 2


def source_rows(start: int, stop: int, n_train: int) -> np.ndarray:
    """The source training row of each augmented row ``start .. stop - 1``: ``i % n_train`` (infimnist's map)."""
    return np.arange(start, stop, dtype=np.int64) % n_train


# --- tasks: run on the workers, each writes one whole chunk ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything that the tasks and the client need: checked inputs, where the store goes."""

    source: StoreInfo
    out: str  # as the user wrote it, for messages
    local: Path | None  # absolute path of a local --out, None for a URL
    rows: int
    seed: int
    params: DeformParams
    overwrite: bool  # a remote --out holds an incomplete store: rebuild it in place

    def train_chunks(self) -> Iterator[tuple[int, int]]:
        """Row bounds of each chunk of the new training split, lazily: there may be many."""
        r = self.source.chunk_rows
        return ((s, min(s + r, self.rows)) for s in range(0, self.rows, r))

    def n_chunks(self, split: str) -> int:
        """Chunks of a split of the new store: ``rows`` in the source's chunk size, or the source's test chunks."""
        return -(-self.rows // self.source.chunk_rows) if split == "train" else self.source.n_chunks(split)


@dataclasses.dataclass(frozen=True)
class WrittenChunk:
    """What a task reports of the chunk it wrote: the CRC-32 sums that ``store.verify_chunk`` checks later, and its
    largest label (``label_max``)."""

    split: str
    index: int
    images_crc32: int
    labels_crc32: int
    label_max: int


def _read_source(info: StoreInfo, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The source rows of augmented rows ``[start, stop)``, reading at most the chunk's worth (plus a wrap)."""
    n = info.n_train
    if stop - start >= n:  # a chunk longer than the source: read it all once, then repeat
        images, labels = read_rows(info.url, "train", 0, n, info.storage_options)
        idx = source_rows(start, stop, n)
        return images[idx], labels[idx]
    first = start % n
    if first + (stop - start) <= n:  # no wrap: one contiguous read
        return read_rows(info.url, "train", first, first + stop - start, info.storage_options)
    head = read_rows(info.url, "train", first, n, info.storage_options)
    tail = read_rows(info.url, "train", 0, first + stop - start - n, info.storage_options)
    return np.concatenate([head[0], tail[0]]), np.concatenate([head[1], tail[1]])


def _open_target(target: str, options: Options) -> zarr.Group:
    # mode "r+": a worker that does not see the client's file system fails here instead of creating a stray store.
    return zarr.open_group(store=target, mode="r+", use_consolidated=False, **fsspec_options(target, options))


def _write_chunk(
    info: StoreInfo, target: str, split: str, start: int, images: np.ndarray, labels: np.ndarray
) -> WrittenChunk:
    """Write one whole chunk (also when it is all zeros) and return its sums; the new store is opened with the
    source's storage options (one ``storage:`` section serves both)."""
    group = _open_target(target, info.storage_options)
    with zarr.config.set({"array.write_empty_chunks": True}):
        group[f"{split}/images"][start : start + len(images)] = images
        group[f"{split}/labels"][start : start + len(labels)] = labels
    index = start // group[f"{split}/images"].chunks[0]
    return WrittenChunk(split, index, chunk_checksum(images), chunk_checksum(labels), int(labels.max()))


def augment_chunk(info: StoreInfo, target: str, start: int, stop: int, seed: int, params: DeformParams) -> WrittenChunk:
    """Task: deform the source rows of augmented rows ``[start, stop)`` and write them, one whole chunk."""
    images, labels = _read_source(info, start, stop)
    h, w = info.image_shape
    deformed = deform(images.reshape(-1, h, w), seed, start, params)
    return _write_chunk(info, target, "train", start, deformed.reshape(stop - start, h * w), labels)


def copy_test_chunk(info: StoreInfo, target: str, start: int, stop: int) -> WrittenChunk:
    """Task: copy test rows ``[start, stop)`` unchanged, one whole chunk."""
    images, labels = read_rows(info.url, "test", start, stop, info.storage_options)
    return _write_chunk(info, target, "test", start, images, labels)


# --- the command ------------------------------------------------------------------------------------------------------


def augment_command(args: argparse.Namespace) -> StoreInfo:
    """``mnist-kmeans augment``: check everything, start or join the cluster, build the store.

    The cluster file is ``--cluster``, else ``./cluster.yaml`` when present, as for ``run``. Every input error is a
    :class:`UserError` raised before a cluster starts.
    """
    from mnist_kmeans.config import load_cluster, local_path_option, refuse_memory_store

    for url in (args.store, args.out):
        refuse_memory_store(url)
    cfg = load_cluster(args.cluster)
    # absolute: each chunk is read and written on a worker, whose working directory may be anywhere
    stores = (local_path_option(args.store), local_path_option(args.out))
    with _planned(*stores, args.rows, args.seed, options=cfg.storage) as plan:
        from mnist_kmeans.cluster import connect, wait_closed  # imports distributed: only once the inputs are good

        try:
            with connect(cfg, args.scheduler) as (client, cinfo):
                print(f"dashboard: {cinfo.dashboard}", flush=True)
                return _build(plan, client, to_stderr)
        finally:
            wait_closed()


def augment(
    store: str,
    out: str,
    rows: int,
    seed: int = 0,
    *,
    client: Any,
    params: DeformParams = DEFAULT_PARAMS,
    log: Log = print,
    storage_options: Options = None,
) -> StoreInfo:
    """Write a store whose training split is ``rows`` deformed digits of ``store``'s; return its description.

    Parameters
    ----------
    store : str
        Path or URL of a complete source store.
    out : str
        Path or URL of the new store; must not hold a complete store, nor be ``store`` or inside it.
    rows : int
        Rows of the new training split, >= 1.
    seed : int, default=0
        Seed of the deformations, in ``[0, 2**32 - 1]``.
    client : distributed.Client
        The cluster that does the work; its workers must reach both stores.
    params : DeformParams, default=DEFAULT_PARAMS
        Strength of the deformation.
    log : callable, default=print
        Receives progress lines.
    storage_options : dict or None, default=None
        fsspec storage options of remote stores (both), sent to the workers with the tasks; ``None``: the standard
        credentials.

    Raises
    ------
    UserError
        Bad inputs (nothing is written), or a store that cannot be written.
    ClusterError
        The cluster was lost; the partial store is removed (local) or left incomplete (remote).
    """
    with _planned(store, out, rows, seed, params, storage_options) as plan:
        return _build(plan, client, log)


@contextlib.contextmanager
def _planned(
    store: str, out: str, rows: int, seed: int, params: DeformParams = DEFAULT_PARAMS, options: Options = None
) -> Iterator[_Plan]:
    """The checked plan, with ``--out`` claimed (``staging.claimed``) for as long as the caller builds it: a second
    augment or ingest into it is refused."""
    plan = _check(store, out, rows, seed, params, options)
    with claimed(plan.local, plan.out):  # only now: --out inside the source must not get a lock file there
        yield _check_target(plan)


def _check(
    store: str, out: str, rows: int, seed: int, params: DeformParams = DEFAULT_PARAMS, options: Options = None
) -> _Plan:
    """Every refusal of exit code 2 (docs/contract.md) but those about what is at ``--out`` (:func:`_check_target`),
    before anything starts or is written."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise UserError(f"--rows: must be a positive integer, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed: must be an integer in [0, {MAX_SEED}], got {seed!r}")
    store, out = str(store), str(out)
    source = open_store(store, options)  # messages name the store as the user wrote it
    src_local = local_path(store)
    if src_local is not None:  # workers may run in another directory: hand them an absolute path
        source = dataclasses.replace(source, url=str(src_local))
    local = local_path(out)
    where = _same_or_inside(out, local, store, src_local)
    if where:
        raise UserError(f"--out {out}: is {where} the source store --store {store}; choose another path")
    return _Plan(source, out, local, rows, seed, params, overwrite=False)


def _check_target(plan: _Plan) -> _Plan:
    """Refuse a complete store (or anything not a store) at ``--out``; an incomplete one is rebuilt."""
    existing = existing_store(plan.out, plan.local, plan.source.storage_options)
    if existing is not None and is_complete(plan.out, existing):
        raise UserError(f"--out {plan.out}: a complete store is already there; will not overwrite it (remove it first)")
    return dataclasses.replace(plan, overwrite=plan.local is None and existing is not None)


def _same_or_inside(out: str, out_local: Path | None, store: str, src_local: Path | None) -> str | None:
    """``"the same as"`` or ``"inside"`` when ``out`` would overwrite or sit in the source store, else ``None``."""
    if out_local is not None and src_local is not None:  # symlinks and ./ spellings resolved
        o, s = Path(os.path.realpath(out_local)), Path(os.path.realpath(src_local))
        return "the same as" if o == s else "inside" if o.is_relative_to(s) else None
    if out_local is None and src_local is None:
        o, s = out.rstrip("/"), store.rstrip("/")
        return "the same as" if o == s else "inside" if o.startswith(s + "/") else None
    return None


def _build(plan: _Plan, client: Any, log: Log) -> StoreInfo:
    """Create the empty store, let the workers fill it chunk by chunk, then mark it complete and put it in place."""
    started = time.perf_counter()
    attrs = _store_attributes(plan)
    with staging(plan.local, plan.out, log) as target:
        group = _create_empty(plan, target, attrs)
        checksums, label_max = _run_tasks(client, _tasks(plan, target, attrs["ingest_id"][:8]), plan, log)
        _check_labels(plan, label_max)
        if plan.local is None:  # a remote store has no claim: still ours? (store.check_writer)
            check_writer(plan.out, attrs["ingest_id"], plan.source.storage_options)
        mark_complete(group, {CHECKSUM_ATTR: checksums, LABEL_MAX_ATTR: label_max})
    info = open_store(str(plan.local) if plan.local is not None else plan.out, plan.source.storage_options)
    seconds = time.perf_counter() - started
    log(
        f"augment: wrote {plan.out}: {info.n_train} deformed training rows from {plan.source.url} "
        f"(seed {plan.seed}), {info.n_test} test rows copied, chunks of {info.chunk_rows} rows, {seconds:.1f} s "
        f"({info.n_train / seconds:,.0f} rows/s)"
    )
    return info


def _check_labels(plan: _Plan, label_max: dict[str, int]) -> None:
    """The labels copied must be classes of the new store (its ``n_classes`` is the source's): a source whose labels
    were changed after it was written must not yield a complete store that ``open_store`` would refuse."""
    top = max(label_max.values())
    if top >= plan.source.n_classes:
        raise StoreError(
            f"{plan.source.url}: holds label {top}, but the store says n_classes is {plan.source.n_classes}; the store "
            "was changed after it was written: rebuild it (mnist-kmeans ingest --force)"
        )


def _store_attributes(plan: _Plan) -> dict[str, Any]:
    """The group attributes of the new store: the source's description, and how the training split was made."""
    src = plan.source
    return {
        "source": src.source,  # the IDX files that `md5` describes
        "md5": src.md5,
        "image_shape": list(src.image_shape),
        "n_classes": src.n_classes,
        "chunk_rows": src.chunk_rows,
        "ingest_id": uuid.uuid4().hex,  # new on every build: caches of chunks key on it
        **({CLASS_NAMES_ATTR: list(src.class_names)} if src.class_names is not None else {}),
        "augmented_from": {
            "store": src.url,
            "ingest_id": src.ingest_id,
            "n_train": src.n_train,
            "rows": plan.rows,
            "seed": plan.seed,
            "mapping": "row i is a deformation of source training row i % n_train, with its label",
            "deformation": {"method": "elastic (Simard 2003), affine, shift", **dataclasses.asdict(plan.params)},
            "rows_per_stream": ROWS_PER_STREAM,
        },
    }


def _create_empty(plan: _Plan, target: str, attrs: dict[str, Any]) -> zarr.Group:
    """The new group at ``target`` with its empty splits; a store that cannot be written is a UserError."""
    src = plan.source
    try:
        group = create_store(target, attrs, overwrite=plan.overwrite, options=plan.source.storage_options)
        create_split(group, "train", plan.rows, src.n_features, src.chunk_rows)
        create_split(group, "test", src.n_test, src.n_features, src.chunk_rows)
    except (OSError, NotImplementedError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
        raise write_error(plan.out, exc) from None
    return group


# --- running the tasks ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
    """One call to run on a worker."""

    key: str  # the Dask key: names the task on the dashboard
    func: Callable[..., WrittenChunk]
    args: tuple


def _tasks(plan: _Plan, target: str, token: str) -> Iterator[_Task]:
    """Every task, lazily: the training chunks, then the test chunks."""
    for i, (start, stop) in enumerate(plan.train_chunks()):
        args = (plan.source, target, start, stop, plan.seed, plan.params)
        yield _Task(f"augment-train-{token}-{i}", augment_chunk, args)
    for i, (start, stop) in enumerate(plan.source.chunks("test")):
        yield _Task(f"augment-copy-test-{token}-{i}", copy_test_chunk, (plan.source, target, start, stop))


class _TaskWindow:
    """At most ``size`` tasks in flight: the next task is submitted as each one completes, so that the client's
    and the scheduler's memory stay O(size) however many tasks there are."""

    def __init__(self, client: Any, tasks: Iterator[_Task], size: int) -> None:
        from distributed import as_completed

        self._client = client
        self._tasks = tasks
        self._running = as_completed([self._submit(task) for task in itertools.islice(tasks, size)])

    def _submit(self, task: _Task) -> Any:
        return self._client.submit(task.func, *task.args, key=task.key, retries=TASK_RETRIES)

    def results(self) -> Iterator[Any]:
        """The result of every task, in the order they complete; a failed task raises here."""
        for future in self._running:
            result = future.result()
            future.release()
            task = next(self._tasks, None)
            if task is not None:
                self._running.add(self._submit(task))
            yield result

    def cancel(self) -> None:
        """Cancel every task still in flight."""
        self._client.cancel(list(self._running.futures))


def _run_tasks(
    client: Any, tasks: Iterator[_Task], plan: _Plan, log: Log
) -> tuple[dict[str, dict[str, list[int]]], dict[str, int]]:
    """Run the tasks in a bounded window; raise on the first failure, cancelling the rest.

    Returns the CRC-32 of every chunk written, ``{split: {"images": [...], "labels": [...]}}`` (``chunk_crc32``), and
    the largest label of each split (``label_max``).
    """
    threads = sum(client.nthreads().values()) or 1
    # enough to keep every thread busy while results come back; O(1) in --rows
    window = _TaskWindow(client, tasks, size=max(8, 4 * threads))
    n_chunks = {split: plan.n_chunks(split) for split in ("train", "test")}
    sums = {split: {"images": [0] * n, "labels": [0] * n} for split, n in n_chunks.items()}
    label_max = dict.fromkeys(n_chunks, 0)
    progress = _ChunkProgress(sum(n_chunks.values()), log)
    try:
        for written in window.results():
            sums[written.split]["images"][written.index] = written.images_crc32
            sums[written.split]["labels"][written.index] = written.labels_crc32
            label_max[written.split] = max(label_max[written.split], written.label_max)
            progress.chunk_written()
    except BaseException as exc:
        window.cancel()
        error = _translated(exc, plan)
        if error is None:
            raise
        raise error from None
    return sums, label_max


@dataclasses.dataclass
class _ChunkProgress:
    """Logs "augment: DONE/TOTAL chunks written" at every tenth of the chunks, and at the last."""

    total: int
    log: Log
    done: int = 0
    next_report: float = 0.1  # fraction of the chunks done at which the next line is due

    def chunk_written(self) -> None:
        self.done += 1
        if self.done / self.total >= self.next_report or self.done == self.total:
            self.log(f"augment: {self.done}/{self.total} chunks written")
            self.next_report = math.floor(self.done / self.total * 10 + 1) / 10


def _translated(exc: BaseException, plan: _Plan) -> UserError | ClusterError | None:
    """What a failure while the tasks ran means to the user: a store that the workers cannot open or write is a
    UserError, a lost cluster a ClusterError; anything else (None) is re-raised as it is."""
    from distributed.comm.core import CommClosedError

    from mnist_kmeans.watch import lost_cluster

    # A worker's OSError is about a store; a comm's (CommClosedError, TimeoutError: OSErrors too) about the cluster.
    comm_failure = isinstance(exc, (CommClosedError, TimeoutError))
    if isinstance(exc, (OSError, zarr.errors.GroupNotFoundError)) and not comm_failure:
        return UserError(
            f"{plan.out}: a worker cannot read {plan.source.url} or write the new store "
            f"({one_line(exc, with_type=True)}); every worker must reach both stores (a shared file system or a URL)"
        )
    why = lost_cluster(exc)
    return None if why is None else ClusterError(f"{why} while writing {plan.out}; run augment again")
