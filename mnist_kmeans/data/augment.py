"""``mnist-kmeans augment``: a larger training set of deformed digits (infimnist-style), written by the cluster.

Row ``i`` of the new training split is a random deformation of source training row ``i % n_train``, with that
row's label; this is infimnist's own mapping (pattern ``i`` is a deformation of training digit ``i mod 60000``),
so every source digit occurs ``rows // n_train`` or ``rows // n_train + 1`` times and the class balance of the
source is kept. The test split is copied unchanged.

The deformation of a digit (:func:`deform_batch`) maps every output pixel ``p`` to a point of the source image,
read by bilinear interpolation (zero outside the image)::

    source point = M (p - centre) + centre + shift + elastic(p)

- ``elastic``: Simard et al. (2003): a field of uniform(-1, 1) values per pixel and axis, smoothed by a Gaussian
  of ``sigma`` pixels and scaled by ``alpha``. Default sigma = 4 (theirs) and alpha = 24, milder than their 34
  (which trains a CNN): about 0.9 px of displacement (standard deviation) per axis instead of 1.3;
- ``M``: a small affine map, rotation by up to ``max_rotation`` degrees, isotropic scale in
  ``[1 / max_scale, max_scale]`` (log-uniform), horizontal shear (slant) up to ``max_shear``;
- ``shift``: a translation of up to ``max_shift`` pixels along each axis.

All lengths are given for 28 x 28 images and scale with the image side (``sqrt(H * W) / 28``).

Randomness. Row ``i`` uses ``D = 5 + 2 * H * W`` uniform numbers, drawn from a stream that depends only on
``(seed, i)`` (:func:`row_uniforms`): the stream of a block of :data:`ROWS_PER_STREAM` consecutive rows is a
``PCG64`` seeded by ``SeedSequence(seed, spawn_key=(block,))``, and row ``i`` takes its ``D`` numbers in order
from it, skipping the rows before it by ``advance`` (exact: a float64 draw consumes one 64-bit output). Hence a
row does not depend on the store's chunk size, on which task or worker computes it, or on ``--rows``: the first
``N`` rows of a larger augmented set equal a set of ``N`` rows with the same seed. The arithmetic is numpy
elementwise float32 and scipy's ``gaussian_filter`` (no BLAS, no threads, no SIMD transcendental functions), so
the bytes are identical on every worker of one platform and library versions.

Work. One task writes one whole chunk of the new store (chunks are the source store's ``chunk_rows``): it reads
the source rows it needs, deforms them :data:`BATCH_ROWS` at a time (so that float temporaries stay in the CPU
cache and memory stays at about two chunks of uint8 per task), and writes its images and labels on the worker.
The test split is copied by tasks too, chunk by chunk. The client holds no data; it keeps a bounded window of
tasks in flight, so that its memory and the scheduler's do not grow with ``--rows``. A local store is built in a
sibling temporary directory and renamed into place once complete, exactly as ``ingest`` does; ``complete: true``
is written last, by the client, after every task succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from scipy import ndimage

from mnist_kmeans.data.staging import existing_store, local_path, staging
from mnist_kmeans.data.store import (
    CHECKSUM_ATTR,
    StoreInfo,
    chunk_checksum,
    create_split,
    create_store,
    mark_complete,
    open_store,
    read_rows,
)
from mnist_kmeans.errors import ClusterError, UserError

Log = Callable[[str], None]

# Rows per random stream. Creating a stream costs ~40 us (SeedSequence hashing, PCG64 set-up), a row ~100 us of
# work: one stream per row would add ~40%, one per 256 rows adds nothing measurable.
ROWS_PER_STREAM = 256
# Rows deformed at once: the float scratch arrays of 128 rows of 28 x 28 (~0.4 MB each) stay in cache, and memory
# per task does not grow with the chunk size. Measured: 4,096 rows at once make bilinear sampling 7x slower.
BATCH_ROWS = 128
REFERENCE_SIDE = 28  # the image side that the lengths of DeformParams are given for
N_AFFINE = 5  # uniforms per row for the affine part: rotation, log-scale, shear, shift along rows, along columns
MAX_SEED = 2**32 - 1  # the bound of job seeds (config.py)


@dataclasses.dataclass(frozen=True)
class DeformParams:
    """Strength of the random deformation; lengths in pixels of a 28 x 28 image (scaled to other sizes).

    Parameters
    ----------
    alpha : float, default=24.0
        Scale of the elastic field. Simard et al. (2003) use 34 with sigma 4; together with the affine part that
        makes strokes wavy (mean correlation of a deformed MNIST digit with its source 0.52); 24 keeps digits
        looking handwritten (0.61).
    sigma : float, default=4.0
        Standard deviation of the Gaussian that smooths the elastic field (Simard et al. 2003).
    truncate : float, default=3.0
        The smoothing kernel is cut at ``truncate * sigma``; weights beyond 3 sigma are below 1.1% of the peak,
        and the shorter kernel is 1.4x faster than scipy's default of 4.
    max_rotation : float, default=6.0
        Largest rotation, in degrees (uniform in ``[-max_rotation, max_rotation]``).
    max_scale : float, default=1.1
        Isotropic scale, log-uniform in ``[1 / max_scale, max_scale]``.
    max_shear : float, default=0.1
        Largest horizontal shear: a column shift of ``max_shear`` pixels per pixel of height (a slant).
    max_shift : float, default=1.5
        Largest translation along each axis, in pixels (uniform, sub-pixel).
    """

    alpha: float = 24.0
    sigma: float = 4.0
    truncate: float = 3.0
    max_rotation: float = 6.0
    max_scale: float = 1.1
    max_shear: float = 0.1
    max_shift: float = 1.5


DEFAULT_PARAMS = DeformParams()


# --- the deformation: pure functions, no store, no cluster ------------------------------------------------------------


class _Scratch:
    """Named scratch arrays, reused from batch to batch of one call.

    Why not plain temporaries: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, so glibc hands
    every freed temporary back to the OS and the next batch page-faults it in again. Measured on a worker: 1.0 s
    of system time per 10,000-row chunk (310,000 page faults), more than the deformation itself; with reused
    arrays, none. Arrays are zero-filled when created (the bilinear border relies on it).
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.shape[0] < shape[0] or array.shape[1:] != shape[1:] or array.dtype != dtype:
            array = self._arrays[name] = np.zeros(shape, dtype)
        return array[: shape[0]]  # a leading slice: contiguous


def n_uniforms(image_shape: tuple[int, int]) -> int:
    """Uniform numbers that one row of ``image_shape`` consumes: the affine part, then two displacement fields."""
    h, w = image_shape
    return N_AFFINE + 2 * h * w


def row_uniforms(seed: int, start: int, n: int, n_values: int, out: np.ndarray | None = None) -> np.ndarray:
    """The random numbers of rows ``start .. start + n - 1``: float64 ``(n, n_values)`` in ``[0, 1)``.

    Row ``i``'s numbers depend only on ``(seed, i, n_values)``: they are numbers ``(i - b * R) * n_values ...`` of
    the stream of block ``b = i // R`` (``R`` = :data:`ROWS_PER_STREAM`), a PCG64 seeded by
    ``SeedSequence(seed, spawn_key=(b,))``. So any split of a range of rows into calls gives the same numbers.
    ``out``, if given, is a C-contiguous float64 array of that shape to fill.
    """
    out = np.empty((n, n_values)) if out is None else out
    row = start
    while row < start + n:
        block, offset = divmod(row, ROWS_PER_STREAM)
        stop = min(start + n, (block + 1) * ROWS_PER_STREAM)
        bits = np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(block,)))
        bits.advance(offset * n_values)  # one float64 draw = one 64-bit output, so this skips exactly `offset` rows
        np.random.Generator(bits).random(out=out[row - start : stop - start])
        row = stop
    return out


def deform_batch(images: np.ndarray, uniforms: np.ndarray, params: DeformParams = DEFAULT_PARAMS) -> np.ndarray:
    """Deform each image by the random numbers of its row; a pure function.

    Parameters
    ----------
    images : ndarray of shape (n, H, W), uint8
        The source images.
    uniforms : ndarray of shape (n, 5 + 2 * H * W), float64 in [0, 1)
        Per row: rotation, log-scale, shear, shift along rows, shift along columns, then the uniform fields of
        the row and column displacements (``H * W`` each, row-major), as :func:`row_uniforms` gives them.
    params : DeformParams, default=DEFAULT_PARAMS
        Strength of the deformation.

    Returns
    -------
    ndarray of shape (n, H, W), uint8
        The deformed images, rounded to the nearest integer; within [0, 255] since bilinear interpolation is a
        convex combination of pixels.
    """
    n, h, w = images.shape
    if uniforms.shape != (n, n_uniforms((h, w))):
        raise ValueError(f"uniforms must have shape {(n, n_uniforms((h, w)))}, got {uniforms.shape}")
    out = np.empty((n, h, w), np.uint8)
    _deform_into(images, uniforms, params, _Scratch(), out)
    return out


def deform(
    images: np.ndarray, seed: int, start: int, params: DeformParams = DEFAULT_PARAMS, batch_rows: int = BATCH_ROWS
) -> np.ndarray:
    """Rows ``start .. start + n - 1`` of an augmented set whose sources are ``images`` (uint8 ``(n, H, W)``).

    Row ``start + j`` is ``images[j]`` deformed by the random numbers of row ``start + j`` (:func:`row_uniforms`,
    :func:`deform_batch`); the result does not depend on ``batch_rows``, which only bounds the scratch memory.
    """
    n, h, w = images.shape
    d = n_uniforms((h, w))
    out = np.empty((n, h, w), np.uint8)
    scratch = _Scratch()
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        uniforms = row_uniforms(seed, start + lo, hi - lo, d, out=scratch("uniforms", (hi - lo, d), np.float64))
        _deform_into(images[lo:hi], uniforms, params, scratch, out[lo:hi])
    return out


def _deform_into(
    images: np.ndarray, uniforms: np.ndarray, params: DeformParams, scratch: _Scratch, out: np.ndarray
) -> None:
    """:func:`deform_batch` writing into ``out``, with its float arrays taken from ``scratch``."""
    n, h, w = images.shape
    px = math.sqrt(h * w) / REFERENCE_SIDE  # the lengths of params are for 28 x 28
    # The fields, uniform in [-1, 1), in float32: ample for values that are smoothed next, and half the work.
    fields = scratch("fields", (n, 2, h, w))
    np.multiply(uniforms[:, N_AFFINE:].reshape(n, 2, h, w), 2.0, out=fields, casting="same_kind")
    fields -= np.float32(1)
    smooth = scratch("smooth", (n, 2, h, w))
    # Smooth within each field only: sigma 0 along the row and field axes.
    ndimage.gaussian_filter(
        fields, sigma=(0, 0, params.sigma * px, params.sigma * px), truncate=params.truncate, output=smooth
    )
    smooth *= np.float32(params.alpha * px)

    # Source point of output pixel p: M (p - centre) + centre + shift + elastic(p), on (row, column).
    mat, shift = _affine(2.0 * uniforms[:, :N_AFFINE] - 1.0, params, px)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy = (np.arange(h, dtype=np.float32) - np.float32(cy))[None, :, None]
    xx = (np.arange(w, dtype=np.float32) - np.float32(cx))[None, None, :]
    rows, cols = scratch("rows", (n, h, w)), scratch("cols", (n, h, w))
    for axis, (target, centre) in enumerate(((rows, cy), (cols, cx))):
        np.add(smooth[:, axis], (np.float32(centre) + shift[:, axis])[:, None, None], out=target)
        target += mat[:, axis, 0, None, None] * yy  # (n, H, 1): small temporaries
        target += mat[:, axis, 1, None, None] * xx  # (n, 1, W)
    values = _bilinear_into(images, rows, cols, scratch)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    out[...] = values


def _affine(u: np.ndarray, params: DeformParams, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row (``u`` uniform in [-1, 1)), ``M = scale * R(angle) @ [[1, 0], [shear, 1]]`` and the shift, float32."""
    angle = u[:, 0] * math.radians(params.max_rotation)
    shear = u[:, 2] * params.max_shear
    # math.cos/sin/exp per row, not np.cos/...: numpy may dispatch those to SIMD code that rounds differently on
    # other CPUs, and the bytes of a row must not depend on which worker computed it. n is small.
    scale = np.array([math.exp(v * math.log(params.max_scale)) for v in u[:, 1]])
    cos = np.array([math.cos(v) for v in angle])
    sin = np.array([math.sin(v) for v in angle])
    mat = np.empty((len(u), 2, 2))
    # R = [[cos, -sin], [sin, cos]] times the shear (the column moves with the row: a slant), spelled out.
    mat[:, 0, 0] = (cos - sin * shear) * scale
    mat[:, 0, 1] = -sin * scale
    mat[:, 1, 0] = (sin + cos * shear) * scale
    mat[:, 1, 1] = cos * scale
    shift = u[:, 3:5] * (params.max_shift * px)
    return mat.astype(np.float32), shift.astype(np.float32)


def bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample each image at fractional points by bilinear interpolation, zero outside the image.

    Equal (to float32 rounding) to ``scipy.ndimage.map_coordinates`` with ``order=1, mode="grid-constant"`` on the
    stacked ``(n, H, W)`` volume with integer coordinates along axis 0, and 7x faster (14 against 103 us per
    28 x 28 image, measured on 256 images at a time): that call computes 8 taps per point, half of them zero.

    Parameters
    ----------
    images : ndarray of shape (n, H, W)
    rows, cols : ndarray of shape (n, H_out, W_out)
        Coordinates of the points, in pixels of the image they index.

    Returns
    -------
    ndarray of shape (n, H_out, W_out), float32
    """
    return _bilinear_into(images, rows.astype(np.float32), cols.astype(np.float32), _Scratch()).copy()


def _bilinear_into(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, scratch: _Scratch) -> np.ndarray:
    """:func:`bilinear` on float32 ``rows`` and ``cols``, which it overwrites; the result is a scratch array."""
    n, h, w = images.shape
    shape = rows.shape
    # A zero border of 1 before and 2 after each axis: coordinates clipped to [-1, side] then read their two
    # neighbours inside the padded image, and every point outside the image reads only zeros. Only the inside of
    # the scratch array is ever written: its border stays zero.
    pad = scratch("pad", (n, h + 3, w + 3))
    pad[:, 1 : h + 1, 1 : w + 1] = images
    r0, c0 = scratch("r0", shape), scratch("c0", shape)
    for coord, floor, side in ((rows, r0, h), (cols, c0, w)):
        np.clip(coord, -1, side, out=coord)
        coord += np.float32(1)  # into the padded image
        np.floor(coord, out=floor)
        coord -= floor  # now the fraction
    stride = w + 3
    idx = scratch("idx", shape, np.intp)
    np.multiply(r0, stride, out=idx, casting="unsafe")  # whole numbers, exact in float32 for any image size here
    np.add(idx, c0, out=idx, casting="unsafe")
    idx += (np.arange(n, dtype=np.intp) * ((h + 3) * stride))[:, None, None]
    flat = pad.reshape(-1)
    top, top_right = scratch("top", shape), scratch("top_right", shape)
    bottom, bottom_right = scratch("bottom", shape), scratch("bottom_right", shape)
    # mode="clip": every index is inside, and "raise" would buffer the output
    np.take(flat, idx, out=top, mode="clip")
    idx += 1
    np.take(flat, idx, out=top_right, mode="clip")
    idx += stride
    np.take(flat, idx, out=bottom_right, mode="clip")
    idx -= 1
    np.take(flat, idx, out=bottom, mode="clip")
    top_right -= top  # top + fc * (top_right - top)
    top_right *= cols
    top += top_right
    bottom_right -= bottom  # bottom + fc * (bottom_right - bottom)
    bottom_right *= cols
    bottom += bottom_right
    bottom -= top  # top + fr * (bottom - top)
    bottom *= rows
    top += bottom
    return top


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


def _read_source(info: StoreInfo, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The source rows of augmented rows ``[start, stop)``, reading at most the chunk's worth (plus a wrap)."""
    n = info.n_train
    if stop - start >= n:  # a chunk longer than the source: read it all once, then repeat
        images, labels = read_rows(info.url, "train", 0, n)
        idx = source_rows(start, stop, n)
        return images[idx], labels[idx]
    first = start % n
    if first + (stop - start) <= n:  # no wrap: one contiguous read
        return read_rows(info.url, "train", first, first + stop - start)
    head = read_rows(info.url, "train", first, n)
    tail = read_rows(info.url, "train", 0, first + stop - start - n)
    return np.concatenate([head[0], tail[0]]), np.concatenate([head[1], tail[1]])


def _open_target(target: str) -> zarr.Group:
    # mode "r+": a worker that does not see the client's file system fails here instead of creating a stray store.
    return zarr.open_group(store=target, mode="r+", use_consolidated=False)


def _write_chunk(target: str, split: str, start: int, images: np.ndarray, labels: np.ndarray) -> tuple[str, int, int, int]:
    """Write one whole chunk (also when it is all zeros) and return (split, chunk index, CRC-32 of images, of labels):
    the sums ``store.verify_chunk`` checks on every later read."""
    group = _open_target(target)
    with zarr.config.set({"array.write_empty_chunks": True}):
        group[f"{split}/images"][start : start + len(images)] = images
        group[f"{split}/labels"][start : start + len(labels)] = labels
    index = start // group[f"{split}/images"].chunks[0]
    return split, index, chunk_checksum(images), chunk_checksum(labels)


def augment_chunk(
    info: StoreInfo, target: str, start: int, stop: int, seed: int, params: DeformParams
) -> tuple[str, int, int, int]:
    """Task: deform the source rows of augmented rows ``[start, stop)`` and write them, one whole chunk."""
    images, labels = _read_source(info, start, stop)
    h, w = info.image_shape
    deformed = deform(images.reshape(-1, h, w), seed, start, params)
    return _write_chunk(target, "train", start, deformed.reshape(stop - start, h * w), labels)


def copy_test_chunk(info: StoreInfo, target: str, start: int, stop: int) -> tuple[str, int, int, int]:
    """Task: copy test rows ``[start, stop)`` unchanged, one whole chunk."""
    images, labels = read_rows(info.url, "test", start, stop)
    return _write_chunk(target, "test", start, images, labels)


# --- the command ------------------------------------------------------------------------------------------------------


def augment_command(args: argparse.Namespace) -> StoreInfo:
    """``mnist-kmeans augment``: check everything, start or join the cluster, build the store.

    The cluster file is ``--cluster``, else ``./cluster.yaml`` when present, as for ``run``. Every input error is a
    :class:`UserError` raised before a cluster starts.
    """
    from mnist_kmeans.config import load_cluster

    cluster_file = args.cluster
    if cluster_file is None and Path("cluster.yaml").is_file():
        cluster_file = "cluster.yaml"
    cfg = load_cluster(cluster_file)
    plan = _check(args.store, args.out, args.rows, args.seed)
    from mnist_kmeans.cluster import connect, wait_closed  # imports distributed: only once the inputs are good

    try:
        with connect(cfg, args.scheduler) as (client, cinfo):
            print(f"dashboard: {cinfo.dashboard}", flush=True)
            return _build(plan, client, _err)
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

    Raises
    ------
    UserError
        Bad inputs (nothing is written), or a store that cannot be written.
    ClusterError
        The cluster was lost; the partial store is removed (local) or left incomplete (remote).
    """
    return _build(_check(store, out, rows, seed, params), client, log)


def _check(store: str, out: str, rows: int, seed: int, params: DeformParams = DEFAULT_PARAMS) -> _Plan:
    """Every refusal of SPEC's exit code 2, before anything starts or is written."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise UserError(f"--rows: must be a positive integer, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed: must be an integer in [0, {MAX_SEED}], got {seed!r}")
    store, out = str(store), str(out)
    source = open_store(store)  # messages name the store as the user wrote it
    src_local = local_path(store)
    if src_local is not None:  # workers may run in another directory: hand them an absolute path
        source = dataclasses.replace(source, url=str(src_local))
    local = local_path(out)
    where = _same_or_inside(out, local, store, src_local)
    if where:
        raise UserError(f"--out {out}: is {where} the source store --store {store}; choose another path")
    existing = existing_store(out, local)
    if existing is not None and existing.get("complete") is True:
        raise UserError(f"--out {out}: a complete store is already there; will not overwrite it (remove it first)")
    return _Plan(source, out, local, rows, seed, params, overwrite=local is None and existing is not None)


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
    t0 = time.perf_counter()
    src = plan.source
    attrs = {
        "source": src.source,  # the IDX files that `md5` describes
        "md5": src.md5,
        "image_shape": list(src.image_shape),
        "n_classes": src.n_classes,
        "chunk_rows": src.chunk_rows,
        "ingest_id": uuid.uuid4().hex,  # new on every build: caches of chunks key on it
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
    with staging(plan.local, plan.out, log) as target:
        try:
            group = create_store(target, attrs, overwrite=plan.overwrite)
            create_split(group, "train", plan.rows, src.n_features, src.chunk_rows)
            create_split(group, "test", src.n_test, src.n_features, src.chunk_rows)
        except (OSError, NotImplementedError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise UserError(f"{plan.out}: cannot write the store: {exc}") from None
        checksums = _run_tasks(client, _tasks(plan, target, attrs["ingest_id"][:8]), plan, log)
        mark_complete(group, {CHECKSUM_ATTR: checksums})
    info = open_store(str(plan.local) if plan.local is not None else plan.out)
    seconds = time.perf_counter() - t0
    log(
        f"augment: wrote {plan.out}: {info.n_train} deformed training rows from {src.url} (seed {plan.seed}), "
        f"{info.n_test} test rows copied, chunks of {info.chunk_rows} rows, {seconds:.1f} s "
        f"({info.n_train / seconds:,.0f} rows/s)"
    )
    return info


def _tasks(plan: _Plan, target: str, token: str) -> Iterator[tuple[str, Callable[..., int], tuple]]:
    """(key, function, arguments) of every task: the training chunks, then the test chunks."""
    for i, (start, stop) in enumerate(plan.train_chunks()):
        yield f"augment-train-{token}-{i}", augment_chunk, (plan.source, target, start, stop, plan.seed, plan.params)
    for i, (start, stop) in enumerate(plan.source.chunks("test")):
        yield f"augment-copy-test-{token}-{i}", copy_test_chunk, (plan.source, target, start, stop)


def _run_tasks(
    client: Any, tasks: Iterator[tuple[str, Callable[..., tuple], tuple]], plan: _Plan, log: Log
) -> dict[str, dict[str, list[int]]]:
    """Run the tasks with a bounded window in flight; raise on the first failure, cancelling the rest.

    Returns the CRC-32 of every chunk written, ``{split: {"images": [...], "labels": [...]}}`` (``chunk_crc32``).
    """
    from distributed import as_completed

    total = -(-plan.rows // plan.source.chunk_rows) + plan.source.n_chunks("test")
    threads = sum(client.nthreads().values()) or 1
    window = max(8, 4 * threads)  # enough to keep every thread busy while results come back; O(1) in --rows

    def submit(task: tuple[str, Callable[..., int], tuple]) -> Any:
        key, func, args = task
        # retries: a chunk is rewritten whole, so running a task again is harmless (e.g. a flaky remote store).
        return client.submit(func, *args, key=key, retries=2)

    n_chunks = {"train": -(-plan.rows // plan.source.chunk_rows), "test": plan.source.n_chunks("test")}
    sums = {split: {"images": [0] * n, "labels": [0] * n} for split, n in n_chunks.items()}
    running = as_completed([submit(t) for _, t in zip(range(window), tasks)])
    done, next_report = 0, 0.1
    try:
        for future in running:
            split, index, crc_images, crc_labels = future.result()
            sums[split]["images"][index], sums[split]["labels"][index] = crc_images, crc_labels
            future.release()
            done += 1
            task = next(tasks, None)
            if task is not None:
                running.add(submit(task))
            if done / total >= next_report or done == total:
                log(f"augment: {done}/{total} chunks written")
                next_report = math.floor(done / total * 10 + 1) / 10
    except BaseException as exc:
        client.cancel(list(running.futures))
        _reraise(exc, plan)
        raise
    return sums


def _reraise(exc: BaseException, plan: _Plan) -> None:
    """A lost cluster is a ClusterError, a store the workers cannot open or write a UserError; else re-raise."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    if isinstance(exc, (KilledWorker, CommClosedError, FutureCancelledError, TimeoutError)):
        raise ClusterError(
            f"lost the cluster while writing {plan.out} ({type(exc).__name__}: {exc}); run augment again"
        ) from None
    if isinstance(exc, (OSError, zarr.errors.GroupNotFoundError)):
        raise UserError(
            f"{plan.out}: a worker cannot read {plan.source.url} or write the new store ({type(exc).__name__}: "
            f"{exc}); every worker must reach both stores (a shared file system or a URL)"
        ) from None


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
