"""Choosing K without labels (``kselect.py``; docs/contract.md, "metrics.json"): the indices of a real run on full
MNIST against scikit-learn's on the raw IDX files, the sampled silhouette, the knee on synthetic curves, and a
resumed run reporting the same ``k_selection``.

The MNIST run is small (K = 10 and 24, one epoch, two restarts, one Lloyd step) on an embedded LocalCluster of two
workers; scikit-learn then scores the whole 60,000-row training split with the run's labels, in float64.
"""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from sklearn import metrics as skm

from mnist_kmeans.data.ingest import ingest
from mnist_kmeans.data.store import load_chunk, open_store
from mnist_kmeans.evaluate import PassStats, assign, chunk_stats, chunk_stats_task, combine
from mnist_kmeans.kselect import (
    SelectionStats,
    calinski_harabasz,
    cluster_means,
    davies_bouldin,
    inertia_knee,
    k_selection,
    kept_labels,
    rows_in_chunk,
    sample_rows,
    selection_chunk_task,
)
from tests.helpers import MNIST_DIR, blobs, quiet, run_cli

CLUSTER_FILE = "local: {n_workers: 2, threads_per_worker: 1, memory_limit: 3GiB, dashboard_address: '127.0.0.1:0'}\n"
MNIST_JOB = "name: kselect\nk_grid: [10, 24]\nepochs: 1\nbatch_size: 1024\nn_init: 2\nlloyd_steps: 1\nseed: 5\n"
SMALL_JOB = "name: kselect-small\nk_grid: [3, 8]\nepochs: 2\nbatch_size: 100\nn_init: 3\nlloyd_steps: 1\nseed: 9\n"
PER_K = ("calinski_harabasz", "davies_bouldin", "silhouette_sample", "restart_ari_mean", "restart_ari_min")


def run_job(tmp: Path, job_text: str, store: str, *extra: str) -> Path:
    (tmp / "job.yaml").write_text(job_text)
    (tmp / "cluster.yaml").write_text(CLUSTER_FILE)
    run_dir = tmp / "run"
    args = ["run", str(tmp / "job.yaml"), "--cluster", str(tmp / "cluster.yaml"), "--store", store]
    proc = run_cli(*args, "--out", str(run_dir), *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def idx_array(name: str) -> np.ndarray:
    with gzip.open(MNIST_DIR / f"{name}.gz") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=16 if "images" in name else 8)


# --- full MNIST: exactly scikit-learn's ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("kselect-mnist")
    store = str(tmp / "mnist.zarr")
    ingest(str(MNIST_DIR), store, log=quiet)
    return run_job(tmp, MNIST_JOB, store), store


def test_indices_equal_scikit_learn_on_the_whole_training_split(mnist_run) -> None:
    run_dir, store = mnist_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    info = open_store(store)
    x = idx_array("train-images-idx3-ubyte").reshape(60_000, 784).astype(np.float64) / 255
    y = idx_array("train-labels-idx1-ubyte").astype(np.int64)
    finals = zarr.open_group(str(run_dir / "centroids.zarr"), mode="r")["final"]
    sample = sample_rows(info.n_train, 5)
    assert metrics["k_selection"]["silhouette_sample_rows"] == len(sample) == 2000
    for row in metrics["results"]:
        k = row["k"]
        centers = np.asarray(finals[f"k{k}"])
        # the run's labels: the evaluation's own assignment (a float32 GEMM per chunk), checked against its table
        labels = np.concatenate(
            [assign(load_chunk(info, "train", c)[0], centers)[0] for c in range(info.n_chunks("train"))]
        )
        table = np.zeros((k, 10), dtype=np.int64)
        np.add.at(table, (labels, y), 1)
        assert table.tolist() == evaluation["contingency"][str(k)]["train"]
        ch, db = skm.calinski_harabasz_score(x, labels), skm.davies_bouldin_score(x, labels)
        assert row["calinski_harabasz"] == pytest.approx(ch, rel=1e-6), k
        assert row["davies_bouldin"] == pytest.approx(db, rel=1e-6), k
        sil = skm.silhouette_score(x[sample], labels[sample])
        assert row["silhouette_sample"] == pytest.approx(sil, rel=1e-9), k
        assert 0 <= row["restart_ari_min"] <= row["restart_ari_mean"] <= 1
    sel = metrics["k_selection"]
    assert sel["calinski_harabasz"] == max(metrics["results"], key=lambda r: r["calinski_harabasz"])["k"]
    assert sel["davies_bouldin"] == min(metrics["results"], key=lambda r: r["davies_bouldin"])["k"]
    assert sel["recommended"] in {10, 24}


# --- the pure functions on blobs, split into chunks ------------------------------------------------------------------


def test_chunked_sums_give_scikit_learns_indices_with_an_empty_cluster() -> None:
    x, _ = blobs(900, d=12, n_blobs=5, seed=4)
    x = x.astype(np.float32)
    y = np.zeros(len(x), dtype=np.int64)
    centers = x[:6].copy()
    centers[5] = 1e3  # a center no row is nearest to: scikit-learn sees 5 labels
    chunks = [slice(0, 250), slice(250, 700), slice(700, 900)]
    parts = [chunk_stats(x[c], y[c], [centers], 1, evaluation=True) for c in chunks]
    train = combine(*parts)
    assert train[0].labels is None and train[0].counts[5] == 0
    means = cluster_means(train)
    rows = np.array([3, 260, 699, 800])
    at = [rows[(rows >= c.start) & (rows < c.stop)] - c.start for c in chunks]
    selection = combine(*[_selection(part, means, x[c], a) for part, c, a in zip(parts, chunks, at, strict=True)])[0]
    labels = np.concatenate([part[0].labels for part in parts])
    assert np.array_equal(selection.sample_labels, labels[rows])
    x64 = x.astype(np.float64)
    assert calinski_harabasz(train[0], selection) == pytest.approx(skm.calinski_harabasz_score(x64, labels), rel=1e-9)
    assert davies_bouldin(train[0], selection) == pytest.approx(skm.davies_bouldin_score(x64, labels), rel=1e-9)


def _selection(part: list[PassStats], means, x: np.ndarray, at: np.ndarray) -> list[SelectionStats]:
    """selection_chunk_task's arithmetic on rows in memory (the task itself reads a store chunk)."""
    diff = x.astype(np.float64) - means[0][part[0].labels]
    sq = (diff**2).sum(axis=1)
    k = len(means[0])
    labels = part[0].labels
    return [SelectionStats(np.bincount(labels, sq, k), np.bincount(labels, np.sqrt(sq), k), labels[at])]


def test_one_cluster_with_rows_has_no_index() -> None:
    x = np.random.default_rng(0).random((50, 4)).astype(np.float32)
    train = chunk_stats(
        x, np.zeros(50, dtype=np.int64), [np.array([[0.5] * 4, [99.0] * 4], np.float32)], 1, evaluation=True
    )
    sel = SelectionStats(np.zeros(2), np.zeros(2), np.zeros(0, dtype=np.int64))
    assert calinski_harabasz(train[0], sel) is None and davies_bouldin(train[0], sel) is None


def test_selection_task_on_store_chunks_keeps_the_sample_labels_in_row_order(store_info) -> None:
    centers = np.asarray(load_first_rows(store_info, 7))
    n_chunks = store_info.n_chunks("train")
    parts = [chunk_stats_of(store_info, c, centers) for c in range(n_chunks)]
    means = cluster_means(combine(*parts))
    rows = sample_rows(store_info.n_train, 3, n_rows=300)
    sel = combine(
        *[
            selection_chunk_task(
                kept_labels(parts[c]), means, store_info, c, rows_in_chunk(rows, c, store_info.chunk_rows)
            )
            for c in range(n_chunks)
        ]
    )[0]
    labels = np.concatenate([p[0].labels for p in parts])
    assert np.array_equal(sel.sample_labels, labels[rows])
    assert np.array_equal(rows, np.unique(rows)) and len(rows) == 300


def load_first_rows(info, n: int) -> np.ndarray:
    return load_chunk(info, "train", 0)[0][:n]


def chunk_stats_of(info, chunk: int, centers: np.ndarray) -> list[PassStats]:
    return chunk_stats_task([centers], info, "train", chunk, evaluation=True)


# --- the knee and the choice -----------------------------------------------------------------------------------------


def test_knee_of_an_elbow_curve() -> None:
    ks = [2, 4, 6, 8, 10, 12, 14, 16]
    inertia = [100, 60, 25, 22, 20, 18.5, 17, 16]  # drops steeply to K=6, then nearly flat
    assert inertia_knee(ks, inertia) == 6


def test_no_knee_on_a_straight_line_or_a_short_grid() -> None:
    ks = [2, 4, 6, 8, 10]
    assert inertia_knee(ks, [100 - 5 * k for k in ks]) is None
    assert inertia_knee([2, 4], [10.0, 5.0]) is None


def test_k_selection_votes_and_ties_go_to_the_smaller_k() -> None:
    rows = [
        {"k": 4, "calinski_harabasz": 50.0, "davies_bouldin": 1.2, "silhouette_sample": 0.30},
        {"k": 8, "calinski_harabasz": 60.0, "davies_bouldin": 0.9, "silhouette_sample": 0.25},
        {"k": 16, "calinski_harabasz": 40.0, "davies_bouldin": 1.5, "silhouette_sample": None},
    ]
    sel = k_selection(rows, None, 2000)
    assert (sel["calinski_harabasz"], sel["davies_bouldin"], sel["silhouette_sample"]) == (8, 8, 4)
    assert sel["inertia_knee"] is None and sel["recommended"] == 8 and sel["agree"] is False
    tie = k_selection(rows[:2], 4, 10)
    assert tie["recommended"] == 4 and tie["silhouette_sample_rows"] == 10  # 8 twice, 4 twice: the smaller
    assert k_selection([rows[0]], 4, 10)["agree"] is True


# --- a resumed run reports the same numbers --------------------------------------------------------------------------


def test_a_resumed_run_reports_the_same_k_selection(kgrid_store, tmp_path: Path) -> None:
    """The second run resumes a copy of the first after its first epoch: no restart is screened again (the losing
    restarts' centers are gone), yet every per-K index and the restarts' agreement come out the same."""
    store = kgrid_store[0]
    first = run_job(tmp_path, SMALL_JOB, store)
    copy = tmp_path / "again"
    copy.mkdir()
    for name in ("job.yaml", "manifest.json"):
        shutil.copy(first / name, copy / name)
    shutil.copytree(first / "centroids.zarr", copy / "centroids.zarr")
    chains = zarr.open_group(str(copy / "centroids.zarr"), mode="r+")["chains"]
    for k in (3, 8):
        (restart,) = list(chains[f"k{k}"].group_keys())
        chains[f"k{k}/{restart}"].update_attributes({"epochs_done": 1, "lloyd_done": 0})
    again = _resume(tmp_path, store, copy)
    before = json.loads((first / "metrics.json").read_text())
    after = json.loads((again / "metrics.json").read_text())
    assert after["k_selection"] == before["k_selection"]
    for a, b in zip(before["results"], after["results"], strict=True):
        assert {key: a[key] for key in PER_K} == {key: b[key] for key in PER_K}
        assert a["restart_ari_mean"] is not None and len(a["restart_inertia"]) == 3
    pairs = len(list(itertools.combinations(range(3), 2)))
    attrs = dict(chains[f"k3/{next(iter(chains['k3'].group_keys()))}"].attrs)
    assert len(attrs["screen_agreement"]) == pairs


def _resume(tmp: Path, store: str, run_dir: Path) -> Path:
    args = ["run", str(tmp / "job.yaml"), "--cluster", str(tmp / "cluster.yaml"), "--store", store]
    proc = run_cli(*args, "--resume", str(run_dir), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "manifest.json").read_text()).get("resumed")
    return run_dir
