"""The pure core of the fit (``fit.py``): no cluster, real scikit-learn.

The distributed job is only as exact as these functions: a chain continued from a :class:`ChainState` must be the
chain that never left memory (``--resume``, lost workers), and a task must be a pure function of its inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from mnist_kmeans.data.chunk_cache import clear_cache
from mnist_kmeans.data.store import load_chunk
from mnist_kmeans.fit import (
    EWA_WEIGHT,
    ChainState,
    Convergence,
    FitParams,
    Purpose,
    batches,
    chunk_order,
    derive_seed,
    draw_sample,
    fit_chunk,
    fit_lane,
    next_chunk,
    restore_model,
    sample_rows,
    snapshot,
)
from tests.helpers import assert_states_equal, blobs, first_state

# --- data -----------------------------------------------------------------------------------------------------


def start_state(x: np.ndarray, k: int, seed: int = 1) -> ChainState:
    """A chain before its first ``partial_fit``: K rows of ``x`` as centers, the last one far from every row.

    The far center gets no rows, so scikit-learn's random reassignment (which draws from the chain's random state)
    happens in the first steps: a restore that lost the random state would show.
    """
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(len(x), size=k, replace=False)].copy()
    centers[-1] = 5.0
    return ChainState(
        k=k,
        restart=0,
        epoch=0,
        chunks_done=0,
        centers=centers,
        counts=np.zeros(k, np.float32),
        n_since_last_reassign=0,
        n_steps=0,
    )


# --- restore_model / snapshot: the mini-batch state survives a checkpoint exactly ----------------------------------


PARAMS = FitParams(batch_size=64, seed=5)


@pytest.mark.parametrize("reassignment_ratio", [0.01, 0.3])
def test_restore_continues_exactly(reassignment_ratio: float) -> None:
    """A ≡ B: advanced on batches A then B in memory, or on A, snapshotted, restored, then on B (bitwise).

    Guards the scikit-learn private attributes that ``restore_model`` sets and ``snapshot`` reads. With a ratio of
    0.3, scikit-learn's random reassignment of low-count centers also happens during B, so the random stream must
    continue across the snapshot too (checked: another stream during B gives other centers).
    """
    params = dataclasses.replace(PARAMS, reassignment_ratio=reassignment_ratio)
    x, _ = blobs(64 * 8)
    state0 = start_state(x, k=8)
    batches_a = [x[i * 64 : (i + 1) * 64] for i in range(4)]
    batches_b = [x[i * 64 : (i + 1) * 64] for i in range(4, 8)]

    straight = restore_model(state0, params, np.random.RandomState(123))
    for b in batches_a + batches_b:
        straight.partial_fit(b)

    def through_snapshot(rng_b: np.random.RandomState | None) -> ChainState:
        rng = np.random.RandomState(123)  # one random stream, as in fit_chunk: it continues across the snapshot
        first = restore_model(state0, params, rng)
        for b in batches_a:
            first.partial_fit(b)
        mid = snapshot(first, state0, epoch=0, chunks_done=1)
        assert (mid.epoch, mid.chunks_done, mid.n_steps) == (0, 1, 4)
        del first
        second = restore_model(mid, params, rng if rng_b is None else rng_b)
        for b in batches_b:
            second.partial_fit(b)
        return snapshot(second, mid, epoch=0, chunks_done=2)

    end = through_snapshot(None)
    assert np.array_equal(end.centers, np.asarray(straight.cluster_centers_, np.float32))
    assert np.array_equal(end.counts, np.asarray(straight._counts, np.float32))
    assert end.n_steps == straight.n_steps_ == 8
    assert end.n_since_last_reassign == straight._n_since_last_reassign
    # the far center was reassigned into the data: the random state was used, and used identically
    assert np.all(end.centers[-1] <= 1.0)
    if reassignment_ratio == 0.3:
        assert not np.array_equal(end.centers, through_snapshot(np.random.RandomState(7)).centers)


def test_restore_from_the_start_is_scikit_learns_own_partial_fit() -> None:
    """``restore_model`` of an untouched chain behaves as a fresh ``MiniBatchKMeans(init=centers)``, step for step."""
    x, _ = blobs(64 * 6, seed=3)
    state0 = start_state(x, k=6, seed=4)
    ours = restore_model(state0, PARAMS, np.random.RandomState(9))
    plain = MiniBatchKMeans(
        n_clusters=6,
        init=state0.centers,
        n_init=1,
        batch_size=64,
        compute_labels=False,
        reassignment_ratio=PARAMS.reassignment_ratio,
        random_state=np.random.RandomState(9),
    )
    for i in range(6):
        b = x[i * 64 : (i + 1) * 64]
        ours.partial_fit(b)
        plain.partial_fit(b)
        assert np.array_equal(ours.cluster_centers_, plain.cluster_centers_), f"step {i}"
        assert np.array_equal(ours._counts, plain._counts), f"step {i}"
        assert ours._n_since_last_reassign == plain._n_since_last_reassign
        assert ours.n_steps_ == plain.n_steps_


def test_restore_does_not_touch_the_state() -> None:
    x, _ = blobs(128)
    state0 = start_state(x, k=5)
    centers, counts = state0.centers.copy(), state0.counts.copy()
    model = restore_model(state0, PARAMS, np.random.RandomState(0))
    model.partial_fit(x[:64])
    model.partial_fit(x[64:])
    assert np.array_equal(state0.centers, centers) and np.array_equal(state0.counts, counts)


# --- fit_chunk: one task, a pure function --------------------------------------------------------------------------


def test_fit_chunk_is_pure(store_info) -> None:
    params = FitParams(batch_size=100, seed=3)
    n_chunks = store_info.n_chunks("train")
    assert n_chunks >= 4
    state = first_state(store_info, 6, 1, params)
    state = fit_chunk(state, store_info, params)  # a state with non-zero counts
    before = dataclasses.replace(state, centers=state.centers.copy(), counts=state.counts.copy())

    one = fit_chunk(state, store_info, params)
    clear_cache()  # read from the store again, not from the worker cache
    two = fit_chunk(state, store_info, params)

    assert_states_equal(one, two)
    assert_states_equal(state, before)  # the input was not mutated
    assert not np.shares_memory(one.centers, state.centers)
    assert not np.array_equal(one.centers, state.centers)  # it did advance
    assert (one.epoch, one.chunks_done) == (0, 2)
    assert one.n_steps == state.n_steps + 5  # 500 rows / 100
    # the cached chunk is read-only: no task can change what the next task reads
    x, _ = load_chunk(store_info, "train", 4)
    assert not x.flags.writeable


def test_fit_chunk_fits_the_chunk_its_state_names(store_info) -> None:
    """Position ``chunks_done`` of the epoch's seeded order: partial_fit on that chunk's batches, nothing else."""
    params = FitParams(batch_size=100, seed=3)
    n = store_info.n_chunks("train")
    state = fit_chunk(fit_chunk(first_state(store_info, 5, 1, params), store_info, params), store_info, params)
    order = chunk_order(n, params.seed, 0)
    assert len(set(order)) == n and next_chunk(state, n, params.seed) == order[2]
    x, _ = load_chunk(store_info, "train", order[2])
    model = restore_model(
        state, params, np.random.RandomState(derive_seed(params.seed, Purpose.REASSIGN, 5, 1, 0, order[2]))
    )
    for rows in batches(len(x), params.batch_size):
        model.partial_fit(x[rows])
    assert np.array_equal(fit_chunk(state, store_info, params).centers, model.cluster_centers_)
    other = restore_model(state, params, np.random.RandomState(0))
    other.partial_fit(load_chunk(store_info, "train", order[3])[0])
    assert not np.allclose(other.cluster_centers_, model.cluster_centers_)


def test_the_kmeans_pp_sample_is_seeded_rows_of_the_store(store_info, kgrid_store) -> None:
    _, data = kgrid_store
    rows = sample_rows(store_info.n_train, 700, 3)
    assert len(set(rows.tolist())) == 700 and rows.min() >= 0 and rows.max() < store_info.n_train
    assert np.array_equal(rows, sample_rows(store_info.n_train, 700, 3))
    assert not np.array_equal(rows, sample_rows(store_info.n_train, 700, 4))
    sample = draw_sample(store_info, 700, 3)
    expected = data.train_images.reshape(len(data.train_images), -1)[rows]
    assert sample.dtype == np.float32 and np.array_equal(sample, np.divide(expected, np.float32(255), dtype=np.float32))


def test_init_chain_is_deterministic_and_depends_on_the_restart(store_info) -> None:
    params = FitParams(batch_size=100, seed=3)
    a, b = first_state(store_info, 6, 0, params), first_state(store_info, 6, 0, params)
    assert_states_equal(a, b)
    assert a.centers.shape == (6, store_info.n_features) and a.centers.dtype == np.float32
    assert (a.epoch, a.chunks_done, a.n_steps, a.n_since_last_reassign) == (0, 0, 0, 0) and not a.counts.any()
    assert not np.array_equal(a.centers, first_state(store_info, 6, 1, params).centers)
    assert not np.array_equal(a.centers, first_state(store_info, 6, 0, FitParams(batch_size=100, seed=4)).centers)


# --- batches and chunk order --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "batch_size"),
    [(500, 100), (530, 100), (599, 100), (99, 100), (1, 1), (7, 3), (10_000, 1024), (1024, 1024)],
)
def test_batches_cover_every_row_once(n_rows: int, batch_size: int) -> None:
    parts = batches(n_rows, batch_size)
    rows = np.concatenate([np.arange(n_rows)[s] for s in parts])
    assert np.array_equal(rows, np.arange(n_rows))  # every row once, in order
    assert len(parts) == max(1, n_rows // batch_size)
    if n_rows >= batch_size:
        sizes = [s.stop - s.start for s in parts]
        assert min(sizes) >= batch_size and max(sizes) < 2 * batch_size  # a short tail joins the last batch


@pytest.mark.parametrize("n_chunks", [1, 2, 6, 13])
def test_chunk_order_is_a_seeded_permutation(n_chunks: int) -> None:
    orders = [chunk_order(n_chunks, 7, epoch) for epoch in range(6)]
    for order in orders:
        assert sorted(order) == list(range(n_chunks))
        assert all(type(i) is int for i in order)
    assert orders == [chunk_order(n_chunks, 7, epoch) for epoch in range(6)]  # deterministic
    if n_chunks >= 6:
        assert len({tuple(o) for o in orders}) > 1  # depends on the epoch
        assert chunk_order(n_chunks, 8, 0) != orders[0] or chunk_order(n_chunks, 8, 1) != orders[1]  # and the seed


# --- fit_lane: several chains, one read ---------------------------------------------------------------------------


def test_a_lane_gives_each_chain_what_it_gets_alone(store_info) -> None:
    """Chains of different K and restart at one position share the chunk; each ends exactly as fit_chunk ends it."""
    params = FitParams(batch_size=100, seed=3)
    states = [fit_chunk(first_state(store_info, k, r, params), store_info, params) for k, r in ((4, 0), (7, 2), (4, 1))]
    alone = [fit_chunk(state, store_info, params) for state in states]
    for together in (fit_lane(states, store_info, params), fit_lane(states[::-1], store_info, params)[::-1]):
        assert len(together) == len(states)
        for a, b in zip(alone, together, strict=True):
            assert_states_equal(a, b)
    assert not np.array_equal(alone[0].centers, alone[2].centers)  # the restarts did differ
    with pytest.raises(ValueError, match="one position"):
        fit_lane([states[0], alone[1]], store_info, params)


# --- early stopping (Convergence) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_no_improvement", [1, 3])
def test_convergence_is_scikit_learns_stopping_rule(max_no_improvement: int) -> None:
    """Score by score, the rule stops where ``MiniBatchKMeans._mini_batch_convergence`` stops when its weight
    2 * batch_size / (n_samples + 1) is ours (batch_size 1, n_samples 9), and holds its numbers."""
    assert EWA_WEIGHT == 2 * 1 / (9 + 1)
    scores = np.random.RandomState(5).uniform(1.0, 2.0, size=40) + np.linspace(1.0, 0.0, 40)
    theirs = MiniBatchKMeans(max_no_improvement=max_no_improvement, tol=0.0, verbose=0)
    theirs._batch_size, theirs._tol = 1, 0.0
    theirs._ewa_inertia, theirs._ewa_inertia_min, theirs._no_improvement = None, None, 0
    ours, stops = Convergence(), []
    # scikit-learn ignores its step 0 (the init's inertia), as fit.scored_convergence skips a chain's first chunk
    assert not theirs._mini_batch_convergence(0, 40, 9, 0.0, 99.0)
    for step, score in enumerate(scores, start=1):
        stop = theirs._mini_batch_convergence(step, 40, 9, 0.0, float(score))
        ours = ours.after(float(score), max_no_improvement)
        assert (ours.ewa, ours.best, ours.no_improvement) == (
            theirs._ewa_inertia,
            theirs._ewa_inertia_min,
            theirs._no_improvement,
        )
        assert ours.stopped == stop
        stops.append(stop)
        if stop:
            break
    assert stops[-1] and not any(stops[:-1])  # it did stop, once


def test_a_chain_stops_and_then_only_moves_on(store_info) -> None:
    """With ``max_no_improvement``, each chunk scores the centers before fitting; once stopped, a chain keeps its
    centers and counters and only its position moves, epoch after epoch."""
    params = FitParams(batch_size=100, seed=3, max_no_improvement=1)
    n = store_info.n_chunks("train")
    state = first_state(store_info, 6, 0, params)
    trail = []
    while not state.convergence.stopped:
        assert state.epoch < 3, "the chain never stopped"
        before = state
        state = fit_chunk(state, store_info, params)
        trail.append(state)
        assert state.rows_fitted == before.rows_fitted + 500  # the session store's chunks: 500 rows
        assert not np.array_equal(state.centers, before.centers)
    assert trail[0].convergence == Convergence()  # the first chunk (k-means++ centers) is not scored
    assert trail[1].convergence.ewa is not None and trail[-1].convergence.no_improvement == 1
    stopped = state
    for _ in range(n + 1):
        moved = fit_chunk(state, store_info, params)
        assert (moved.epoch * n + moved.chunks_done) == state.epoch * n + state.chunks_done + 1
        assert_states_equal(moved, dataclasses.replace(stopped, epoch=moved.epoch, chunks_done=moved.chunks_done))
        state = moved


def test_without_max_no_improvement_nothing_is_scored(store_info) -> None:
    params = FitParams(batch_size=100, seed=3)
    state = first_state(store_info, 6, 0, params)
    for _ in range(store_info.n_chunks("train") + 2):
        state = fit_chunk(state, store_info, params)
    assert state.convergence == Convergence() and state.epoch == 1
    assert state.rows_fitted == store_info.n_train + 2 * 500


def test_a_lane_of_stopped_chains_reads_no_chunk(kgrid_store, tmp_path) -> None:
    """The next chunk's file is gone from a copy of the store: a lane whose chains all stopped moves on without it,
    a lane with one chain still fitting fails on it."""
    import shutil

    from mnist_kmeans.data.store import StoreError, open_store

    params = FitParams(batch_size=100, seed=3, max_no_improvement=1)
    copy = tmp_path / "store.zarr"
    shutil.copytree(kgrid_store[0], copy)
    info = open_store(str(copy))
    states = [first_state(info, k, 0, params) for k in (4, 6)]
    while not all(s.convergence.stopped for s in states):
        assert states[0].epoch < 3, "the chains never stopped"
        states = list(fit_lane(states, info, params))
    gone = next_chunk(states[0], info.n_chunks("train"), params.seed)
    for path in (copy / "train" / "images" / "c").glob(f"{gone}/*"):
        path.unlink()
    clear_cache()
    moved = fit_lane(states, info, params)
    assert [s.chunks_done for s in moved] != [s.chunks_done for s in states]
    running = dataclasses.replace(states[1], convergence=Convergence())
    with pytest.raises(StoreError, match=f"chunk {gone}"):
        fit_lane([states[0], running], info, params)
