"""The pure core of the fit and of the evaluation (``fit.py``, ``evaluate.py``): no cluster, real scikit-learn.

The distributed job is only as exact as these functions: a chain continued from a :class:`ChainState` must be the
chain that never left memory (``--resume``, lost workers), a task must be a pure function of its inputs, and the
reduced statistics must be the statistics of the whole split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.cluster import MiniBatchKMeans

from mnist_kmeans.checkpoint import Checkpoint
from mnist_kmeans.data.store import clear_cache, load_chunk, open_store
from mnist_kmeans.evaluate import (
    PassStats,
    accuracy,
    chunk_stats,
    cluster_metrics,
    combine,
    label_map,
    lloyd_update,
)
from mnist_kmeans.fit import (
    Purpose,
    ChainState,
    FitParams,
    batches,
    chunk_order,
    derive_seed,
    fit_chunk,
    next_chunk,
    draw_sample,
    init_chain,
    sample_rows,
    restore_model,
    snapshot,
)

# --- data -----------------------------------------------------------------------------------------------------


def blobs(n: int, d: int = 16, n_blobs: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows in [0, 1] around ``n_blobs`` well separated centers, and the blob of each row."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.2, 0.8, size=(n_blobs, d))
    y = rng.integers(0, n_blobs, size=n)
    x = np.clip(means[y] + rng.normal(0, 0.05, size=(n, d)), 0, 1).astype(np.float32)
    return x, y.astype(np.int64)


def start_state(x: np.ndarray, k: int, seed: int = 1) -> ChainState:
    """A chain before its first ``partial_fit``: K rows of ``x`` as centers, the last one far from every row.

    The far center gets no rows, so scikit-learn's random reassignment (which draws from the chain's random state)
    happens in the first steps: a restore that lost the random state would show.
    """
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(len(x), size=k, replace=False)].copy()
    centers[-1] = 5.0
    return ChainState(
        k=k, restart=0, epoch=0, chunks_done=0, centers=centers, counts=np.zeros(k, np.float32),
        n_since_last_reassign=0, n_steps=0,
    )


def assert_states_equal(a: ChainState, b: ChainState) -> None:
    assert (a.k, a.restart, a.epoch, a.chunks_done) == (b.k, b.restart, b.epoch, b.chunks_done)
    assert a.centers.dtype == b.centers.dtype == np.float32
    assert a.counts.dtype == b.counts.dtype == np.float32
    assert np.array_equal(a.centers, b.centers)
    assert np.array_equal(a.counts, b.counts)
    assert (a.n_since_last_reassign, a.n_steps) == (b.n_since_last_reassign, b.n_steps)


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
        n_clusters=6, init=state0.centers, n_init=1, batch_size=64, compute_labels=False,
        reassignment_ratio=PARAMS.reassignment_ratio, random_state=np.random.RandomState(9),
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


@pytest.fixture(scope="module")
def store_info(kgrid_store):
    return open_store(kgrid_store[0])


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
    order = chunk_order(n, params.seed, 5, 1, 0)
    assert len(set(order)) == n and next_chunk(state, n, params.seed) == order[2]
    x, _ = load_chunk(store_info, "train", order[2])
    model = restore_model(state, params, np.random.RandomState(derive_seed(params.seed, Purpose.REASSIGN, 5, 1, 0, order[2])))
    for rows in batches(len(x), params.batch_size):
        model.partial_fit(x[rows])
    assert np.array_equal(fit_chunk(state, store_info, params).centers, model.cluster_centers_)
    other = restore_model(state, params, np.random.RandomState(0))
    other.partial_fit(load_chunk(store_info, "train", order[3])[0])
    assert not np.allclose(other.cluster_centers_, model.cluster_centers_)


def first_state(info, k: int, restart: int, params: FitParams) -> ChainState:
    """A chain's state before its first ``partial_fit``, as the job makes it: k-means++ on the job's sample."""
    return init_chain(draw_sample(info, params.init_rows(k, info.n_train), params.seed), k, restart, params)


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


def run_epoch(state: ChainState, info, params: FitParams) -> ChainState:
    """One epoch of a chain, task after task in this process, as the cluster runs it."""
    for _ in range(info.n_chunks("train")):
        state = fit_chunk(state, info, params)
    return state


def test_epochs_through_a_checkpoint_continue_exactly(store_info, tmp_path: Path) -> None:
    """Two epochs in a row ≡ one epoch, saved to ``centroids.zarr``, loaded, then the second (what --resume does)."""
    params = FitParams(batch_size=100, seed=3)

    def epoch(state: ChainState) -> ChainState:
        return run_epoch(state, store_info, params)

    s1 = epoch(first_state(store_info, 3, 1, params))
    assert (s1.epoch, s1.chunks_done) == (1, 0)
    straight = epoch(s1)

    ckpt = Checkpoint.create(tmp_path / "centroids.zarr", store_info.image_shape)
    ckpt.save_epoch(s1, 2, 1)
    loaded = Checkpoint.open(tmp_path / "centroids.zarr").load_state(3, 1)
    assert_states_equal(loaded, s1)
    assert_states_equal(epoch(loaded), straight)


class _StoreWriteStopped(Exception):
    """Stands for a Ctrl-C or a kill that lands between two writes of the checkpoint."""


def test_an_epoch_save_cut_short_is_ignored_or_whole(store_info, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop ``save_epoch`` after each of its store writes in turn: what a resume then finds is a whole epoch.

    Either the epoch being saved is ignored (``epochs_done`` as before) or it is complete: ``load_state`` works and
    gives back exactly the state saved. (A save of several attributes must not show ``epochs_done`` before the
    counters it promises.)
    """
    from zarr.storage import LocalStore

    params = FitParams(batch_size=100, seed=3)

    def epoch(state: ChainState) -> ChainState:
        return run_epoch(state, store_info, params)

    s1 = epoch(first_state(store_info, 3, 0, params))
    s2 = epoch(s1)
    original_set = LocalStore.set
    for saved_before, saving in (((), s1), ((s1,), s2)):  # the first epoch (creates the chain's arrays), a later one
        for stop_at in range(200):
            path = tmp_path / f"e{saving.epoch}-stop{stop_at}.zarr"
            ckpt = Checkpoint.create(path, store_info.image_shape)
            for st in saved_before:
                ckpt.save_epoch(st, 3, 1)
            writes = {"n": 0}

            async def stopping_set(self, key, value, *args, _stop=stop_at, _writes=writes, **kwargs):
                if _writes["n"] == _stop:
                    raise _StoreWriteStopped(key)
                _writes["n"] += 1
                return await original_set(self, key, value, *args, **kwargs)

            monkeypatch.setattr(LocalStore, "set", stopping_set)
            try:
                ckpt.save_epoch(saving, 3, 1)
                finished = True
            except _StoreWriteStopped:
                finished = False
            finally:
                monkeypatch.setattr(LocalStore, "set", original_set)
            again = Checkpoint.open(path)  # what --resume finds
            done, _ = again.progress(3, 0)  # an interrupted save is no damaged checkpoint
            assert done in (saving.epoch - 1, saving.epoch), (stop_at, done)
            if finished:
                assert done == saving.epoch
            if done:
                assert_states_equal(again.load_state(3, 0), saving if done == saving.epoch else s1)
            if done < saving.epoch:  # the resume fits the epoch again and saves it: whatever the cut left
                again.save_epoch(saving, 3, 1)
                assert Checkpoint.open(path).progress(3, 0)[0] == saving.epoch
                assert_states_equal(Checkpoint.open(path).load_state(3, 0), saving)
            if finished:
                break
        else:
            pytest.fail("save_epoch did not finish within 200 writes")


# --- batches and chunk order --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "batch_size"), [(500, 100), (530, 100), (599, 100), (99, 100), (1, 1), (7, 3), (10_000, 1024), (1024, 1024)]
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
    orders = [chunk_order(n_chunks, 7, 10, 0, epoch) for epoch in range(6)]
    for order in orders:
        assert sorted(order) == list(range(n_chunks))
        assert all(type(i) is int for i in order)
    assert orders == [chunk_order(n_chunks, 7, 10, 0, epoch) for epoch in range(6)]  # deterministic
    if n_chunks >= 6:
        assert len({tuple(o) for o in orders}) > 1  # depends on the epoch
        assert chunk_order(n_chunks, 8, 10, 0, 0) != orders[0] or chunk_order(n_chunks, 8, 10, 0, 1) != orders[1]
        assert any(chunk_order(n_chunks, 7, 10, 1, e) != orders[e] for e in range(6))  # and on the restart


# --- chunk statistics, reduction, Lloyd --------------------------------------------------------------------------


def reference_stats(x: np.ndarray, y: np.ndarray, centers: np.ndarray, n_classes: int) -> tuple[np.ndarray, float]:
    """Nearest centers and inertia in float64, the slow obvious way."""
    d = ((x.astype(np.float64)[:, None, :] - centers.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    labels = d.argmin(1)
    return labels, float(d[np.arange(len(x)), labels].sum())


def stats_of(x, y, centers, n_classes, *, with_sums=False, history=()) -> PassStats:
    """:func:`chunk_stats` of one center set."""
    (out,) = chunk_stats(x, y, [centers], n_classes, with_sums=with_sums, histories=[tuple(history)])
    return out


def combine_one(*parts: PassStats) -> PassStats:
    """:func:`combine` of the statistics of one center set."""
    (out,) = combine(*[[p] for p in parts])
    return out


def test_chunk_stats_combined_over_chunks_equal_the_whole() -> None:
    x, y = blobs(1000, d=20, n_blobs=5, seed=7)
    rng = np.random.default_rng(8)
    centers = x[rng.choice(len(x), 7, replace=False)].copy()
    history = (centers + 0.01, centers[::-1].copy())
    whole = stats_of(x, y, centers, 5, with_sums=True, history=history)
    bounds = [(0, 300), (300, 650), (650, 1000)]
    total = combine_one(*[stats_of(x[a:b], y[a:b], centers, 5, with_sums=True, history=history) for a, b in bounds])

    assert np.array_equal(total.counts, whole.counts) and total.counts.dtype == np.int64
    assert np.array_equal(total.contingency, whole.contingency) and total.contingency.shape == (7, 5)
    assert total.ssd.shape == whole.ssd.shape == (3,)
    # Distances are float32 (one GEMM); BLAS rounds a row differently depending on where it falls in the matrix, so
    # chunked and whole passes agree to float32 precision, not to 1e-9 (per-chunk sums are float64: no drift).
    np.testing.assert_allclose(total.ssd, whole.ssd, rtol=1e-6)
    np.testing.assert_allclose(total.sums, whole.sums, rtol=1e-6)
    assert total.counts.sum() == total.contingency.sum() == len(x)
    # and the statistics are the right ones
    labels, inertia = reference_stats(x, y, centers, 5)
    assert np.array_equal(whole.counts, np.bincount(labels, minlength=7))
    assert np.array_equal(whole.contingency, np.bincount(labels * 5 + y, minlength=35).reshape(7, 5))
    assert whole.inertia == pytest.approx(inertia, rel=1e-5)
    for h, ssd in zip(history, whole.ssd[:-1]):
        assert ssd == pytest.approx(reference_stats(x, y, h, 5)[1], rel=1e-5)
    sums = np.zeros((7, x.shape[1]))
    np.add.at(sums, labels, x.astype(np.float64))
    np.testing.assert_allclose(whole.sums, sums, rtol=1e-5)
    # without sums, combine keeps None
    assert combine_one(stats_of(x[:10], y[:10], centers, 5), stats_of(x[10:], y[10:], centers, 5)).sums is None


def test_chunk_stats_of_several_center_sets_equal_one_at_a_time() -> None:
    """The restarts of a K are measured in one pass: each set's statistics are those of a pass of its own."""
    x, y = blobs(800, d=10, n_blobs=4, seed=9)
    rng = np.random.default_rng(10)
    sets = [x[rng.choice(len(x), k, replace=False)].copy() for k in (3, 5, 5)]
    histories = [(sets[0] + 0.02,), (), (sets[2] * 0.9, sets[2] * 0.95)]
    together = chunk_stats(x, y, sets, 4, with_sums=True, histories=histories)
    halves = combine(
        chunk_stats(x[:333], y[:333], sets, 4, with_sums=True, histories=histories),
        chunk_stats(x[333:], y[333:], sets, 4, with_sums=True, histories=histories),
    )
    assert len(together) == len(halves) == 3
    for centers, hist, got, half in zip(sets, histories, together, halves):
        alone = stats_of(x, y, centers, 4, with_sums=True, history=hist)
        for st in (got, half):
            assert np.array_equal(st.counts, alone.counts)
            assert np.array_equal(st.contingency, alone.contingency)
            assert st.ssd.shape == (len(hist) + 1,)
            np.testing.assert_allclose(st.ssd, alone.ssd, rtol=1e-6)
            np.testing.assert_allclose(st.sums, alone.sums, rtol=1e-6)
    # no histories at all: one ssd per set
    assert [st.ssd.shape for st in chunk_stats(x, y, sets, 4)] == [(1,)] * 3


def test_chunk_stats_on_store_chunks_equal_the_split(store_info, kgrid_store) -> None:
    _, data = kgrid_store
    x_all = data.train_images.reshape(len(data.train_images), -1).astype(np.float32) / np.float32(255)
    y_all = data.train_labels.astype(np.int64)
    centers = x_all[[0, 10, 20, 30, 40, 50]]
    parts = []
    for i in range(store_info.n_chunks("train")):
        x, y = load_chunk(store_info, "train", i)
        assert np.array_equal(x, x_all[i * 500 : (i + 1) * 500])  # x / 255 in float32, exactly
        parts.append(stats_of(x, y.astype(np.int64), centers, store_info.n_classes))
    total = combine_one(*parts)
    whole = stats_of(x_all, y_all, centers, store_info.n_classes)
    assert np.array_equal(total.contingency, whole.contingency)
    np.testing.assert_allclose(total.ssd, whole.ssd, rtol=1e-6)


def test_lloyd_never_increases_inertia_and_keeps_empty_centers() -> None:
    x, y = blobs(2000, d=12, n_blobs=6, seed=2)
    centers = x[:8].copy()
    centers[3] = 9.0  # no row is nearest to it
    previous = np.inf
    for _ in range(6):
        stats = stats_of(x, y, centers, 6, with_sums=True)
        assert stats.inertia <= previous * (1 + 1e-6)
        assert stats.counts[3] == 0
        new = lloyd_update(centers, stats)
        assert new.dtype == np.float32 and new.shape == centers.shape
        assert np.array_equal(new[3], centers[3])  # an empty center stays put
        nonempty = stats.counts > 0
        np.testing.assert_allclose(new[nonempty], stats.sums[nonempty] / stats.counts[nonempty, None], rtol=1e-6)
        previous, centers = stats.inertia, new
    assert stats_of(x, y, centers, 6).inertia <= previous * (1 + 1e-6)


# --- label map and metrics ------------------------------------------------------------------------------------------


def contingency_of(y_true: np.ndarray, y_pred: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    return np.bincount(y_pred * n_classes + y_true, minlength=k * n_classes).reshape(k, n_classes)


def test_label_map_leaves_empty_clusters_unmapped() -> None:
    table = np.array([[0, 5, 1], [0, 0, 0], [3, 3, 0], [0, 0, 9], [0, 0, 0]])
    assert label_map(table) == [1, None, 0, 2, None]  # ties: the smallest class; empty: None, never "0"
    assert accuracy(table, label_map(table)) == pytest.approx((5 + 3 + 9) / 21)
    assert accuracy(np.zeros((2, 3), np.int64), [None, None]) != accuracy(np.zeros((2, 3), np.int64), [None, None])  # nan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn_on_the_label_vectors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k, n_classes = 3000, 12, 7
    y_true = rng.integers(0, n_classes, n)
    # clusters correlated with the classes, and clusters 4 and 9 never used: empty, unmapped
    used = np.array([c for c in range(k) if c not in (4, 9)])
    y_pred = np.where(rng.random(n) < 0.7, used[y_true % len(used)], rng.choice(used, n))
    table = contingency_of(y_true, y_pred, k, n_classes)

    mapping = label_map(table)
    assert mapping[4] is None and mapping[9] is None
    assert sum(m is None for m in mapping) == 2
    lookup = np.array([-1 if m is None else m for m in mapping])
    assert accuracy(table, mapping) == pytest.approx(float(np.mean(lookup[y_pred] == y_true)), abs=1e-12)

    got = cluster_metrics(table)
    h, c, v = skm.homogeneity_completeness_v_measure(y_true, y_pred)
    want = {
        "homogeneity": h,
        "completeness": c,
        "v_measure": v,
        "ari": skm.adjusted_rand_score(y_true, y_pred),
        "nmi": skm.normalized_mutual_info_score(y_true, y_pred),
    }
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9, rel=1e-9), key

    # the test split scored with the map of the training split: rows of a cluster unmapped in training are wrong
    y_test = rng.integers(0, n_classes, 500)
    p_test = rng.integers(0, k, 500)  # also uses clusters 4 and 9
    test_table = contingency_of(y_test, p_test, k, n_classes)
    assert accuracy(test_table, mapping) == pytest.approx(float(np.mean(lookup[p_test] == y_test)), abs=1e-12)


def test_metrics_from_store_chunks_equal_sklearn(store_info) -> None:
    """End to end on the store: per-chunk tables, combined, give sklearn's metrics of the per-row assignments."""
    centers = np.stack([load_chunk(store_info, "train", 0)[0][i] for i in (0, 1, 2, 3, 5, 8, 13)])
    parts, y_true, y_pred = [], [], []
    for i in range(store_info.n_chunks("train")):
        x, y = load_chunk(store_info, "train", i)
        parts.append(stats_of(x, y.astype(np.int64), centers, store_info.n_classes))
        y_true.append(y.astype(np.int64))
        y_pred.append(reference_stats(x, y, centers, store_info.n_classes)[0])
    total = combine_one(*parts)
    yt, yp = np.concatenate(y_true), np.concatenate(y_pred)
    got = cluster_metrics(total.contingency)
    assert got["homogeneity"] == pytest.approx(skm.homogeneity_score(yt, yp), abs=1e-9)
    assert got["completeness"] == pytest.approx(skm.completeness_score(yt, yp), abs=1e-9)
    assert got["v_measure"] == pytest.approx(skm.v_measure_score(yt, yp), abs=1e-9)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(yt, yp), abs=1e-9)
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(yt, yp), abs=1e-9)
    mapping = label_map(total.contingency)
    lookup = np.array([-1 if m is None else m for m in mapping])
    assert accuracy(total.contingency, mapping) == pytest.approx(float(np.mean(lookup[yp] == yt)), abs=1e-12)
