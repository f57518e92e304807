"""schedule.run_chains on a real (in-process) LocalCluster: the screening of restarts, the grid's shared passes, and a
resume from a checkpoint whose K's stopped at different stages.

The store is the session's small one (3,000 rows of 10x10 in six chunks of 500); ``screen_rows: 1000`` makes the
restarts compete on their first two chunks.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dask.utils import key_split
from distributed import Client, SchedulerPlugin

from mnist_kmeans.checkpoint import Checkpoint
from mnist_kmeans.cluster import connect, wait_closed
from mnist_kmeans.config import ClusterConfig, LocalClusterConfig
from mnist_kmeans.data.store import StoreInfo, load_chunk, open_store
from mnist_kmeans.evaluate import chunk_stats
from mnist_kmeans.fit import FitParams, draw_sample, fit_chunk, init_chain
from mnist_kmeans.schedule import FitPlan, KResult, lanes_of, run_chains
from tests.helpers import make_small_store

RESTARTS = {3: 3, 5: 1, 8: 2}
EPOCHS, LLOYD = 2, 2


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """The embedded cluster of a cluster file with ``processes: false``: two worker threads in this process."""
    cfg = ClusterConfig(local=LocalClusterConfig(processes=False, dashboard_address="127.0.0.1:0"))
    with connect(cfg) as (c, _):
        yield c
    wait_closed()


@pytest.fixture(scope="module")
def info(kgrid_store) -> StoreInfo:
    return open_store(kgrid_store[0])


def plan_for(info: StoreInfo) -> FitPlan:
    return FitPlan(info, RESTARTS, EPOCHS, LLOYD, FitParams(batch_size=100, seed=4, screen_rows=1000))


@pytest.fixture(scope="module")
def reference(
    client: Client, info: StoreInfo, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[int, KResult]]:
    path = tmp_path_factory.mktemp("schedule") / "centroids.zarr"
    results = run_chains(client, plan_for(info), Checkpoint.create(path, info.image_shape))
    return path, {r.k: r for r in results}


def test_only_the_restart_ahead_at_the_screening_goes_on(reference, info: StoreInfo) -> None:
    path, results = reference
    ckpt = Checkpoint.open(path)
    for k, n_restarts in RESTARTS.items():
        r = results[k]
        assert len(r.restart_inertia) == (n_restarts if n_restarts > 1 else 0)
        if n_restarts > 1:
            assert r.restart == int(np.argmin(r.restart_inertia))
            assert len(set(r.restart_inertia)) == n_restarts  # the restarts did differ
        saved = {restart: ckpt.progress(k, restart) for restart in range(n_restarts)}
        assert saved == {restart: ((EPOCHS, LLOYD) if restart == r.restart else (0, 0)) for restart in saved}
        assert ckpt.chain_attrs(k, r.restart)["screen_inertia"] == r.restart_inertia
        assert len(r.trajectory) == EPOCHS + LLOYD and r.trajectory[-1] == r.train.inertia
        lloyd = r.trajectory[EPOCHS - 1 :]  # a Lloyd step never raises the inertia (up to float32 rounding)
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(lloyd)), (k, r.trajectory)
        assert r.train.counts.sum() == info.n_train and r.test.counts.sum() == info.n_test


def test_screening_inertia_is_the_exact_training_inertia_after_the_first_chunks(reference, info: StoreInfo) -> None:
    """Restart by restart, by hand: k-means++, two fit_chunk tasks, then the inertia over every training chunk."""
    _, results = reference
    params = plan_for(info).params
    assert params.screen_chunks(info) == 2
    k = 3
    sample = draw_sample(info, max(params.init_rows(kk, info.n_train) for kk in RESTARTS), params.seed)
    for restart in range(RESTARTS[k]):
        state = init_chain(sample, k, restart, params)
        for _ in range(2):
            state = fit_chunk(state, info, params)
        assert (state.epoch, state.chunks_done) == (0, 2)
        ssd = 0.0
        for j in range(info.n_chunks("train")):
            x, y = load_chunk(info, "train", j)
            ssd += chunk_stats(x, y.astype(np.int64), [state.centers], info.n_classes)[0].inertia
        # (float32 distances: a GEMM against one set or against all restarts stacked rounds a little differently)
        assert results[k].restart_inertia[restart] == pytest.approx(ssd, rel=1e-6)


def test_resume_from_a_mix_of_stages_gives_the_same_centroids(
    client, reference, info: StoreInfo, tmp_path: Path
) -> None:
    """K=3 resumed after its first Lloyd step, K=5 after its first epoch, K=8 with nothing saved (screened anew):
    the passes of the grid line up differently, the results must not change by a bit."""
    path, results = reference
    copy = tmp_path / "centroids.zarr"
    shutil.copytree(path, copy)
    ckpt = Checkpoint.open(copy)
    g3 = ckpt.group[f"chains/k3/r{results[3].restart}"]
    g3.update_attributes({"lloyd_done": 1, "lloyd_inertia": []})
    ckpt.group["chains/k5/r0"].update_attributes({"epochs_done": 1, "lloyd_done": 0})
    shutil.rmtree(copy / "chains" / "k8")

    resumed = Checkpoint.open(copy)
    assert (resumed.progress(3, results[3].restart), resumed.progress(5, 0)) == ((EPOCHS, 1), (1, 0))
    again = {r.k: r for r in run_chains(client, plan_for(info), resumed)}
    for k, r in results.items():
        assert np.array_equal(again[k].centers, r.centers), k
        assert again[k].restart == r.restart and again[k].restart_inertia == r.restart_inertia
        assert again[k].trajectory == pytest.approx(r.trajectory, rel=1e-12)
        assert np.array_equal(again[k].test.contingency, r.test.contingency)
        assert Checkpoint.open(copy).progress(k, r.restart) == (EPOCHS, LLOYD)


def test_lanes_group_equal_positions_and_balance_their_cost() -> None:
    lanes = lanes_of({10: 0, 16: 0, 36: 0, 64: 0, 144: 0, 256: 0}, 2)
    assert sorted(k for lane in lanes for k in lane) == [10, 16, 36, 64, 144, 256] and len(lanes) == 2
    loads = [sum(k + 80 for k in lane) for lane in lanes]
    assert max(loads) - min(loads) <= 10 + 80  # no move of one K would balance them better
    assert lanes_of({3: 1, 5: 0, 8: 1}, 4) == [[5], [8], [3]]  # one lane per K at most, never across positions
    assert lanes_of({3: 2, 5: 2, 8: 2}, 1) == [[3, 5, 8]]


@pytest.mark.parametrize("lanes", [1, 3])
def test_any_lanes_give_the_same_centroids(client, reference, info: StoreInfo, tmp_path: Path, lanes: int) -> None:
    """The reference ran in two lanes (the client's two threads); one lane for all K's, or one per K: the same."""
    _, results = reference
    plan = dataclasses.replace(plan_for(info), lanes=lanes)
    again = {r.k: r for r in run_chains(client, plan, Checkpoint.create(tmp_path / "c.zarr", info.image_shape))}
    for k, r in results.items():
        assert np.array_equal(again[k].centers, r.centers), k
        assert again[k].trajectory == r.trajectory


def stopping_plan(info: StoreInfo, lanes: int | None = None) -> FitPlan:
    """Three epochs, each chain stopped after one chunk without a new low of its smoothed batch inertia."""
    plan = plan_for(info)
    return dataclasses.replace(
        plan, epochs=3, lanes=lanes, params=dataclasses.replace(plan.params, max_no_improvement=1)
    )


@pytest.fixture(scope="module")
def stopping(client: Client, info: StoreInfo, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("stopping") / "centroids.zarr"
    return path, {r.k: r for r in run_chains(client, stopping_plan(info), Checkpoint.create(path, info.image_shape))}


def test_early_stopping_stops_chains_and_keeps_their_centers(stopping, info: StoreInfo) -> None:
    path, results = stopping
    ckpt = Checkpoint.open(path)
    stopped = [k for k, r in results.items() if r.fit_rows < 3 * info.n_train]
    assert stopped, {k: r.fit_rows for k, r in results.items()}  # the rule did stop some chain
    for k, r in results.items():
        assert r.fit_rows % 500 == 0 and r.fit_rows > 0  # whole chunks (the session store's: 500 rows)
        if r.fit_rows <= 2 * info.n_train:  # stopped before its last epoch: later epochs leave it where it was
            epochs = ckpt.epoch_centers(k, r.restart)
            assert np.array_equal(epochs[2], epochs[1]), k
            # (the same centers at another column of the epochs' stacked product: the same inertia to rounding)
            assert r.trajectory[2] == pytest.approx(r.trajectory[1], rel=1e-7), (k, r.trajectory)


@pytest.mark.parametrize("lanes", [1, 3])
def test_early_stopping_gives_the_same_centroids_on_any_lanes(
    client, stopping, info: StoreInfo, tmp_path: Path, lanes: int
) -> None:
    _, results = stopping
    again = run_chains(client, stopping_plan(info, lanes), Checkpoint.create(tmp_path / "c.zarr", info.image_shape))
    for r in again:
        assert np.array_equal(r.centers, results[r.k].centers), r.k
        assert (r.fit_rows, r.trajectory) == (results[r.k].fit_rows, results[r.k].trajectory)


def test_early_stopping_resumed_after_an_epoch_gives_the_same_centroids(
    client, stopping, info: StoreInfo, tmp_path: Path
) -> None:
    path, results = stopping
    copy = tmp_path / "centroids.zarr"
    shutil.copytree(path, copy)
    ckpt = Checkpoint.open(copy)
    for k, r in results.items():
        ckpt.group[f"chains/k{k}/r{r.restart}"].update_attributes({"epochs_done": 1, "lloyd_done": 0})
    again = {r.k: r for r in run_chains(client, stopping_plan(info), Checkpoint.open(copy))}
    for k, r in results.items():
        assert np.array_equal(again[k].centers, r.centers), k
        assert again[k].fit_rows == r.fit_rows


class _HeldWhenSelecting(SchedulerPlugin):
    """Records, as each selection task starts, the state of the evaluation task of the same chunk."""

    name = "held-when-selecting"

    def __init__(self, scheduler) -> None:
        self.scheduler, self.seen = scheduler, {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "processing" and key_split(key) == "select_pass":
            chunk = key.split("-")[1]
            evaluation = [ts for k, ts in self.scheduler.tasks.items() if k.startswith(f"stats_eval-{chunk}-")]
            self.seen[chunk] = [ts.state for ts in evaluation]


def test_the_selection_pass_holds_only_the_labels_of_the_evaluation(client, info: StoreInfo, tmp_path: Path) -> None:
    """Each evaluation chunk's statistics (with the grid's per-center sums) are released once added up and their
    labels taken out: held to the selection pass, they grew the workers' memory with the number of rows."""
    scheduler = client.cluster.scheduler
    plugin = _HeldWhenSelecting(scheduler)
    scheduler.add_plugin(plugin)
    try:
        run_chains(client, plan_for(info), Checkpoint.create(tmp_path / "c.zarr", info.image_shape))
    finally:
        scheduler.remove_plugin(name=plugin.name)
    assert sorted(plugin.seen) == sorted(f"c{c}" for c in range(info.n_chunks("train")))
    assert all(states in ([], ["released"], ["forgotten"]) for states in plugin.seen.values()), plugin.seen


class _SumsBeforeParts(SchedulerPlugin):
    """For each first-level sum of a pass (keys of ``group``) as it starts: whether it ranks before every chunk task
    it adds up."""

    name = "sums-before-parts"

    def __init__(self, scheduler, group: str) -> None:
        self.scheduler, self.group, self.first = scheduler, group, []

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "processing" and key_split(key) == self.group:
            ts = self.scheduler.tasks[key]
            chunks = [part for part in ts.dependencies if key_split(part.key) == self.group.removesuffix("_sum")]
            if chunks:  # a first-level sum (the higher ones add sums)
                self.first.append(all(ts.priority < part.priority for part in chunks))


def test_a_pass_adds_up_its_chunks_before_it_computes_more(client, tmp_path: Path) -> None:
    """Each sum of a pass ranks before the chunk tasks it adds up, so that it runs as soon as they exist and frees
    them: at the parts' priority Dask ran every chunk task of a pass first and the workers held all their results
    at once, which grew with the rows (2.7 GB at 8.1M rows; README, "Scale")."""
    store, _ = make_small_store(tmp_path, chunk_rows=20, n_train=1600, n_test=40, h=6, w=6, n_classes=3, seed=2)
    info = open_store(store)
    assert info.n_chunks("train") == 80
    plan = FitPlan(info, {4: 1, 6: 1}, 1, 1, FitParams(batch_size=20, seed=1))
    scheduler = client.cluster.scheduler
    plugins = [_SumsBeforeParts(scheduler, group) for group in ("stats_lloyd1_sum", "stats_eval_sum")]
    for plugin in plugins:
        scheduler.add_plugin(plugin, name=plugin.group)
    try:
        run_chains(client, plan, Checkpoint.create(tmp_path / "c.zarr", info.image_shape))
    finally:
        for plugin in plugins:
            scheduler.remove_plugin(name=plugin.group)
    for plugin in plugins:
        assert len(plugin.first) == 10 and all(plugin.first), (plugin.group, plugin.first)  # 80 chunks, sums of 8
