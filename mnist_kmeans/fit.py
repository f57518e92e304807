"""The map side: one scikit-learn ``MiniBatchKMeans`` per (K, restart), advanced by ``partial_fit`` chunk by chunk.

A *chain* is the sequence of tasks of one (K, restart)::

    draw_sample ─▶ init_chain ─▶ fit_chunk ─▶ fit_chunk ─▶ … ─▶ fit_chunk   epoch 1: chunks c₃, c₀, …, in a seeded order
                                                          ─▶ fit_chunk …   epoch 2: another seeded order …

Each ``fit_chunk`` advances the chain by its next chunk, which the state itself names (epoch, chunks done, and the
seeded order of that epoch): a task needs no more than the state it continues. Every task reads its chunk from the
store on the worker (``store.load_chunk``); only the small :class:`ChainState` travels between tasks. Chains are
independent, so the scheduler runs all of them at once.

A *lane* is several chains advanced together: every chain visits the chunks of an epoch in the same seeded order
(it depends on the job seed and the epoch only), so chains at the same position need the same chunk next, and one
``fit_lane`` task reads and converts it once for all of them. Reading, checking and converting a chunk costs about as
much as fitting it at K=10 (README, "Performance"); a chunk cache cannot help once the store outgrows it. Which
chains share a lane changes no result: each chain's ``partial_fit`` calls see only its own state and the chunk.

With early stopping (the job's ``max_no_improvement``), a chain scores its centers on each chunk before it fits it
and stops once that score, smoothed, no longer improves (:class:`Convergence`, scikit-learn's rule); its later
tasks only move it on, and a lane whose chains have all stopped reads nothing.

Determinism: every random choice (the init sample, k-means++, the chunk order of an epoch, the row order and the
random reassignments inside a chunk) is drawn from a seed derived from ``(seed, K, restart, epoch, chunk)``. A
task's result is therefore a pure function of its inputs: the same job gives the same centroids on any cluster
shape, after a worker is lost and its tasks are recomputed, and after ``--resume`` from an epoch checkpoint.

This module holds the pure functions that run in tasks; ``pipeline.py`` submits them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from mnist_kmeans.data.store import StoreInfo, load_chunk, read_rows_at
from mnist_kmeans.evaluate import assign

if TYPE_CHECKING:
    from sklearn.cluster import MiniBatchKMeans

# scikit-learn is imported inside the functions that run on the workers: the client, which only submits them, is
# spared its import (two seconds of every cold `run`).


@dataclass(frozen=True)
class FitParams:
    """What every task of a job needs besides the chain state."""

    batch_size: int
    seed: int
    # Rows of the k-means++ sample; None: max(1024, 3 * K). scikit-learn's MiniBatchKMeans uses 3 * batch_size
    # (3,072): at K=256 that costs 3.5x more time for 0.1% lower final inertia on MNIST (README, "Initialisation").
    init_size: int | None = None
    reassignment_ratio: float = 0.01  # scikit-learn's default
    # Restarts of a K are compared after their first ``screen_rows`` training rows (whole chunks); only the best
    # goes on (schedule.py). On MNIST the ranking after 10,000 rows mostly holds to the end (README, "Restarts are
    # screened").
    screen_rows: int = 10_000
    # Stop a chain after this many chunks in a row without a new low of its smoothed batch inertia (Convergence);
    # None: never, as partial_fit never stops.
    max_no_improvement: int | None = None

    def screen_chunks(self, info: StoreInfo) -> int:
        """Chunks every restart fits before the restarts are compared (at least 1, at most one epoch)."""
        return int(min(info.n_chunks("train"), max(1, -(-self.screen_rows // info.chunk_rows))))

    def init_rows(self, k: int, n_train: int) -> int:
        rows = self.init_size if self.init_size is not None else max(1024, 3 * k)
        return int(min(max(rows, k), n_train))


# The weight of each new chunk in the smoothed batch inertia: an average over about the last 9 chunks (2 / (9 + 1)).
# scikit-learn weighs each batch by 2 * batch_size / (n_samples + 1), a window of one epoch, which never stops a
# one-epoch fit; a window in chunks stops at the same point whatever the data set's size (README, "Early stopping").
EWA_WEIGHT = 0.2


@dataclass(frozen=True)
class Convergence:
    """The stopping rule of scikit-learn's ``MiniBatchKMeans.fit`` (its ``_mini_batch_convergence``), once per chunk.

    Before a chain fits a chunk, its centers are scored on the chunk's first batch (mean squared distance, rows not
    fitted yet in this epoch); an exponentially weighted average of those scores (:data:`EWA_WEIGHT`) smooths them; a
    chunk whose average sets no new low counts one more *without improvement*, a new low resets the count. The chain
    stops once the count reaches ``max_no_improvement``: it still fits the chunk that decided it, as scikit-learn fits
    the batch that decides, and no later one. As in scikit-learn the chain's first score (of its k-means++ centers)
    is not counted.
    """

    ewa: float | None = None  # the smoothed score; None before the second scored chunk
    best: float | None = None  # its lowest value so far
    no_improvement: int = 0  # chunks in a row whose smoothed score was not a new low
    stopped: bool = False

    def after(self, score: float, max_no_improvement: int) -> Convergence:
        """The rule's state after one more chunk's score."""
        ewa = score if self.ewa is None else self.ewa * (1 - EWA_WEIGHT) + score * EWA_WEIGHT
        improved = self.best is None or ewa < self.best
        no_improvement = 0 if improved else self.no_improvement + 1
        best = ewa if improved else self.best
        return Convergence(ewa, best, no_improvement, no_improvement >= max_no_improvement)


@dataclass(frozen=True)
class ChainState:
    """Everything a ``MiniBatchKMeans`` carries from one ``partial_fit`` to the next, as plain arrays.

    This is also what an epoch checkpoint stores (no pickles): restoring it continues the chain exactly.
    """

    k: int
    restart: int
    epoch: int  # epochs completed
    chunks_done: int  # chunks completed in the current epoch
    centers: np.ndarray  # float32 (K, n_features)
    counts: np.ndarray  # float32 (K,): rows seen by each center, scikit-learn's per-center learning rate
    n_since_last_reassign: int
    n_steps: int
    rows_fitted: int = 0  # training rows partial_fit has seen, over every epoch
    convergence: Convergence = Convergence()  # the early-stopping rule's state (used with max_no_improvement)


class Purpose(IntEnum):
    """What a derived seed is for: one stream per purpose, so that no two random choices share a seed. The values
    are part of every seed: changing them changes every result."""

    SAMPLE = 0
    KMEANS_PP = 1
    CHUNK_ORDER = 2
    REASSIGN = 3
    SELECTION_SAMPLE = 4  # the rows of the silhouette and restart-agreement sample (kselect.py)


def derive_seed(seed: int, purpose: Purpose, *parts: int) -> int:
    """A 32-bit seed that depends on the job seed, the purpose and every part (K, restart, epoch, chunk)."""
    return int(np.random.SeedSequence([seed, int(purpose), *(int(p) for p in parts)]).generate_state(1)[0])


def chunk_order(n_chunks: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which every chain visits the training chunks in one epoch.

    The same for every K and restart, so that chains at the same position can share one read (a lane, above).
    """
    return [int(i) for i in np.random.RandomState(derive_seed(seed, Purpose.CHUNK_ORDER, epoch)).permutation(n_chunks)]


def sample_rows(n_train: int, n_rows: int, seed: int) -> np.ndarray:
    """Row indices of the k-means++ sample, drawn without replacement from the whole training split, in a seeded
    random order (so that any prefix of the sample is itself a random sample)."""
    return np.random.RandomState(derive_seed(seed, Purpose.SAMPLE)).choice(n_train, size=n_rows, replace=False)


def draw_sample(info: StoreInfo, n_rows: int, seed: int) -> np.ndarray:
    """One task: the k-means++ sample of the job as float32 in [0, 1], shared by every chain.

    Read row by row from the store, not through the chunk cache: on a store of millions of rows the sample touches
    hundreds of chunks once, and caching them would evict the chunks the fit is using.
    """
    rows = sample_rows(info.n_train, n_rows, seed)
    order = np.argsort(rows)
    images = np.empty((n_rows, info.n_features), dtype=np.uint8)
    images[order] = read_rows_at(info.url, "train", rows[order], info.storage_options)
    return np.divide(images, np.float32(255), dtype=np.float32)


def init_chain(sample: np.ndarray, k: int, restart: int, params: FitParams) -> ChainState:
    """k-means++ on the first ``params.init_rows(k)`` rows of the job's sample: the state before the first
    ``partial_fit``. Restarts of a K differ by the k-means++ seed."""
    import sklearn
    from sklearn.cluster import kmeans_plusplus

    rows = sample[: params.init_rows(k, len(sample))]
    # float64: scikit-learn's k-means++ upcasts float32 distances block by block, which is 2x slower on MNIST.
    # The sample is finite and the arguments checked: skipping the per-call checks of its K steps saves 15%.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        seed = derive_seed(params.seed, Purpose.KMEANS_PP, k, restart)
        centers, _ = kmeans_plusplus(rows.astype(np.float64), k, random_state=seed)
    return ChainState(
        k=k,
        restart=restart,
        epoch=0,
        chunks_done=0,
        centers=centers.astype(np.float32),
        counts=np.zeros(k, dtype=np.float32),
        n_since_last_reassign=0,
        n_steps=0,
    )


def restore_model(state: ChainState, params: FitParams, random_state: np.random.RandomState) -> MiniBatchKMeans:
    """A ``MiniBatchKMeans`` in exactly the state ``partial_fit`` left it in (see :func:`snapshot`).

    scikit-learn keeps the mini-batch state in a few attributes that its first ``partial_fit`` creates; setting
    them from the checkpoint continues the chain as if the estimator had never left memory. The test
    ``tests/test_fit.py`` guards this against scikit-learn changes.
    """
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(
        n_clusters=state.k,
        init=state.centers,
        n_init=1,
        batch_size=params.batch_size,
        compute_labels=False,  # labels of every batch would double the work; evaluate.py labels everything once
        reassignment_ratio=params.reassignment_ratio,
    )
    model.cluster_centers_ = state.centers.copy()  # a copy: never mutate a task's input
    model._counts = state.counts.copy()
    model._n_since_last_reassign = state.n_since_last_reassign
    model.n_steps_ = state.n_steps
    model.n_features_in_ = state.centers.shape[1]
    model._n_features_out = state.k
    model._batch_size = params.batch_size
    model._random_state = random_state
    # One OpenMP thread: workers are one process per core, and a fixed thread count keeps results identical
    # on every cluster shape.
    model._n_threads = 1
    return model


def snapshot(model: MiniBatchKMeans, state: ChainState, **changes: object) -> ChainState:
    """The :class:`ChainState` of ``model`` after it advanced from ``state``; ``changes``: the state's other fields
    that moved (its position, rows fitted, convergence)."""
    return dataclasses.replace(
        state,
        centers=np.asarray(model.cluster_centers_, dtype=np.float32),
        counts=np.asarray(model._counts, dtype=np.float32),
        n_since_last_reassign=int(model._n_since_last_reassign),
        n_steps=int(model.n_steps_),
        **changes,
    )


def batches(n_rows: int, batch_size: int) -> list[slice]:
    """Split a chunk into mini-batches of ``batch_size`` rows; a short tail joins the last batch.

    The tail is merged rather than fitted alone: a batch of a few rows would move its centers as much as a full
    batch does in the first steps.
    """
    n_batches = max(1, n_rows // batch_size)
    bounds = [i * batch_size for i in range(n_batches)] + [n_rows]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def next_chunk(state: ChainState, n_chunks: int, seed: int) -> int:
    """The training chunk a chain visits next: position ``chunks_done`` of the seeded order of its current epoch."""
    return chunk_order(n_chunks, seed, state.epoch)[state.chunks_done]


def next_position(state: ChainState, n_chunks: int) -> dict[str, int]:
    """The chain's ``epoch`` and ``chunks_done`` once it has visited its next chunk."""
    done = state.chunks_done + 1
    if done == n_chunks:
        return {"epoch": state.epoch + 1, "chunks_done": 0}
    return {"epoch": state.epoch, "chunks_done": done}


def fit_chunk(state: ChainState, info: StoreInfo, params: FitParams) -> ChainState:
    """One task: ``partial_fit`` on the consecutive mini-batches of the chain's next training chunk."""
    return fit_lane((state,), info, params)[0]


def fit_lane(states: Sequence[ChainState], info: StoreInfo, params: FitParams) -> tuple[ChainState, ...]:
    """One task: every chain of a lane (all at the same position) advanced by the chunk they visit next, read once.

    Each chain's result is what :func:`fit_chunk` gives it alone: which chains share a lane changes nothing. A lane
    whose chains have all stopped (:class:`Convergence`) only moves them on, without reading the chunk.
    """
    positions = {(state.epoch, state.chunks_done) for state in states}
    if len(positions) != 1:
        raise ValueError(f"a lane's chains must be at one position, not {sorted(positions)}")
    n_chunks = info.n_chunks("train")
    if all(state.convergence.stopped for state in states):
        return tuple(dataclasses.replace(state, **next_position(state, n_chunks)) for state in states)
    chunk = next_chunk(states[0], n_chunks, params.seed)
    x, _ = load_chunk(info, "train", chunk)
    return tuple(advance(state, x, chunk, n_chunks, params) for state in states)


def advance(state: ChainState, x: np.ndarray, chunk: int, n_chunks: int, params: FitParams) -> ChainState:
    """``partial_fit`` of one chain on the consecutive mini-batches of ``x``, its next chunk (number ``chunk``).

    Rows keep their stored order (MNIST's is already mixed; the chunk order of each epoch is seeded), so every batch is
    a view of the cached chunk: no copy. The random reassignments of empty or tiny clusters draw from a generator
    seeded for this (chain, epoch, chunk). A chain that has stopped (:class:`Convergence`) only moves on.
    """
    import sklearn

    if state.convergence.stopped:
        return dataclasses.replace(state, **next_position(state, n_chunks))
    convergence = scored_convergence(state, x, params)
    rng = np.random.RandomState(derive_seed(params.seed, Purpose.REASSIGN, state.k, state.restart, state.epoch, chunk))
    model = restore_model(state, params, rng)
    # The rows come from a uint8 store (always finite) and the parameters were validated with the job file:
    # skipping scikit-learn's per-call checks cuts the fixed cost of each small partial_fit by a quarter.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for rows in batches(len(x), params.batch_size):
            model.partial_fit(x[rows])
    return snapshot(
        model, state, **next_position(state, n_chunks), rows_fitted=state.rows_fitted + len(x), convergence=convergence
    )


def scored_convergence(state: ChainState, x: np.ndarray, params: FitParams) -> Convergence:
    """The chain's :class:`Convergence` once its centers are scored on the first batch of ``x``, which it is about to
    fit; unchanged without ``max_no_improvement`` and at the chain's first chunk (k-means++ centers: not counted)."""
    if params.max_no_improvement is None or state.rows_fitted == 0:
        return state.convergence
    _, dist = assign(x[batches(len(x), params.batch_size)[0]], state.centers)
    return state.convergence.after(float(dist.mean(dtype=np.float64)), params.max_no_improvement)
