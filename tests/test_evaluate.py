"""The evaluation (``evaluate.py``): a real run against an independent in-memory recomputation, then the pure core.

One real job on a LocalCluster; then, from the run's ``centroids.zarr`` and the raw arrays written as IDX files,
every number of ``metrics.json`` and ``label_maps.json`` is computed again in memory and compared. The pure functions
underneath, with no cluster: the reduced statistics must be the statistics of the whole split, and the metrics those
scikit-learn computes from the per-row labels.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from sklearn import metrics as skm
from sklearn.metrics import pairwise_distances_argmin_min

from mnist_kmeans.data.store import load_chunk
from mnist_kmeans.evaluate import (
    PassStats,
    accuracy,
    chunk_stats,
    cluster_metrics,
    combine,
    label_map,
    lloyd_update,
)
from tests.helpers import KGRID_STORE_ARGS, blobs, run_cli

JOB_NAME = "eval <script>alert(1)</script> & co"


# --- a real run, recomputed in memory --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_run(kgrid_store, tmp_path_factory) -> tuple[Path, object]:
    store, data = kgrid_store
    tmp = tmp_path_factory.mktemp("eval-run")
    job = tmp / "job.yaml"
    job.write_text(
        "name: " + json.dumps(JOB_NAME) + "\n"
        "k_grid: [3, 7, 12]\nepochs: 1\nbatch_size: 100\nn_init: 2\nlloyd_steps: 1\nseed: 3\n"
        "report: {centroid_grids: [7]}\n"
    )
    cluster = tmp / "cluster.yaml"
    cluster.write_text(
        "local: {n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB, dashboard_address: '127.0.0.1:0'}\n"
    )
    run_dir = tmp / "run"
    proc = run_cli("run", str(job), "--cluster", str(cluster), "--store", store, "--out", str(run_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run_dir, data


def in_memory(data, centers: np.ndarray) -> dict:
    """Everything metrics.json says about one K, recomputed from the raw arrays with scikit-learn, float64."""
    h, w = KGRID_STORE_ARGS["h"], KGRID_STORE_ARGS["w"]
    out = {}
    for split in ("train", "test"):
        images, labels = data.arrays(split)
        x = images.reshape(-1, h * w).astype(np.float64) / 255
        pred, dist = pairwise_distances_argmin_min(x, centers.astype(np.float64))
        out[split] = (labels.astype(np.int64), pred, float((dist**2).sum()))
    y, pred, inertia = out["train"]
    k, n_classes = len(centers), KGRID_STORE_ARGS["n_classes"]
    mapping = [
        int(np.bincount(y[pred == c], minlength=n_classes).argmax()) if (pred == c).any() else None for c in range(k)
    ]
    lookup = np.array([-1 if m is None else m for m in mapping])
    y_test, pred_test, _ = out["test"]
    return {
        "label_map": mapping,
        "inertia": inertia,
        "homogeneity": skm.homogeneity_score(y, pred),
        "completeness": skm.completeness_score(y, pred),
        "v_measure": skm.v_measure_score(y, pred),
        "ari": skm.adjusted_rand_score(y, pred),
        "nmi": skm.normalized_mutual_info_score(y, pred),
        "accuracy_train": skm.accuracy_score(y, lookup[pred]),
        "accuracy_test": skm.accuracy_score(y_test, lookup[pred_test]),
        "n_empty_clusters": sum(m is None for m in mapping),
    }


def test_metrics_equal_an_in_memory_recomputation(evaluated_run) -> None:
    run_dir, data = evaluated_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    maps = json.loads((run_dir / "label_maps.json").read_text())
    group = zarr.open_group(str(run_dir / "centroids.zarr"), mode="r")
    assert [r["k"] for r in metrics["results"]] == [3, 7, 12]
    for row in metrics["results"]:
        k = row["k"]
        centers = np.asarray(group[f"final/k{k}"][...])
        assert centers.dtype == np.float32 and centers.shape == (k, KGRID_STORE_ARGS["h"] * KGRID_STORE_ARGS["w"])
        expect = in_memory(data, centers)
        assert maps[str(k)] == expect["label_map"]
        assert row["n_empty_clusters"] == expect["n_empty_clusters"]
        # float32 distances on the cluster, float64 here: equal to float32 rounding, summed
        assert row["inertia"] == pytest.approx(expect["inertia"], rel=1e-5)
        for key in ("homogeneity", "completeness", "v_measure", "ari", "nmi", "accuracy_train", "accuracy_test"):
            assert abs(row[key] - expect[key]) <= 1e-9, (k, key, row[key], expect[key])


def test_inertia_per_epoch_ends_at_the_final_inertia_and_never_rises_in_lloyd_steps(evaluated_run) -> None:
    run_dir, _ = evaluated_run
    for row in json.loads((run_dir / "metrics.json").read_text())["results"]:
        curve = row["inertia_per_epoch"]
        assert len(curve) == row["epochs"] + row["lloyd_steps"]
        assert curve[-1] == pytest.approx(row["inertia"], rel=1e-12)
        # a full-batch Lloyd step never increases the inertia (up to float32 rounding of the distances)
        lloyd = curve[row["epochs"] - 1 :]
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(lloyd))


def test_user_text_is_escaped_in_the_report(evaluated_run) -> None:
    run_dir, _ = evaluated_run
    html = (run_dir / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "eval &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html


def test_report_rebuilds_from_the_run_directory_alone(evaluated_run, tmp_path) -> None:
    """`report RUN_DIR` on a copy of the run directory, with the store gone from reach: same report body."""
    import shutil

    run_dir, _ = evaluated_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    proc = run_cli("report", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("report.html")
    figures = sorted(p.name for p in (copy / "figures").glob("*.png"))
    for name in ("training_digits", "inertia_vs_k", "scores_vs_k", "centroids_k7", "inertia_per_epoch"):
        assert f"{name}.png" in figures
    # every figure written is embedded (this data set is too clean for a gallery of misclassified digits)
    assert (copy / "report.html").read_bytes().count(b"data:image/png;base64,") == len(figures)


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
    for h, ssd in zip(history, whole.ssd[:-1], strict=True):
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
    for centers, hist, got, half in zip(sets, histories, together, halves, strict=True):
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


def sklearn_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """sklearn.metrics' scores of the label vectors, each capped at 1 as metrics.json caps them."""
    h, c, v = skm.homogeneity_completeness_v_measure(y_true, y_pred)
    scores = {
        "homogeneity": h,
        "completeness": c,
        "v_measure": v,
        "ari": skm.adjusted_rand_score(y_true, y_pred),
        "nmi": skm.normalized_mutual_info_score(y_true, y_pred),
    }
    return {name: min(float(value), 1.0) for name, value in scores.items()}


def test_label_map_leaves_empty_clusters_unmapped() -> None:
    table = np.array([[0, 5, 1], [0, 0, 0], [3, 3, 0], [0, 0, 9], [0, 0, 0]])
    assert label_map(table) == [1, None, 0, 2, None]  # ties: the smallest class; empty: None, never "0"
    assert accuracy(table, label_map(table)) == pytest.approx((5 + 3 + 9) / 21)
    assert accuracy(np.zeros((2, 3), np.int64), [None, None]) != accuracy(
        np.zeros((2, 3), np.int64), [None, None]
    )  # nan


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

    assert cluster_metrics(table) == sklearn_scores(y_true, y_pred)  # the same arithmetic: the same bits

    # the test split scored with the map of the training split: rows of a cluster unmapped in training are wrong
    y_test = rng.integers(0, n_classes, 500)
    p_test = rng.integers(0, k, 500)  # also uses clusters 4 and 9
    test_table = contingency_of(y_test, p_test, k, n_classes)
    assert accuracy(test_table, mapping) == pytest.approx(float(np.mean(lookup[p_test] == y_test)), abs=1e-12)


@pytest.mark.parametrize(
    ("n", "k", "n_classes", "seed"),
    [(1, 3, 4, 0), (50, 1, 5, 1), (50, 6, 1, 2), (400, 30, 10, 3), (2, 2, 2, 4), (5000, 40, 3, 5)],
)
def test_metrics_from_the_table_are_sklearns_bits_in_corner_cases(n: int, k: int, n_classes: int, seed: int) -> None:
    """One row, one cluster, one class, more clusters than rows can fill: cluster_metrics works from the table
    alone and must give exactly what sklearn.metrics gives on the label vectors."""
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, n_classes, n), rng.integers(0, k, n)
    assert cluster_metrics(contingency_of(y_true, y_pred, k, n_classes)) == sklearn_scores(y_true, y_pred)


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


def test_scores_never_exceed_one() -> None:
    """Pure clusters, one per class present: entropy ratios round to 1.0000000000000002 in sklearn; a score of
    metrics.json is at most 1 by definition."""
    contingency = np.zeros((5, 10), dtype=np.int64)
    for cluster, (cls, rows) in enumerate([(2, 24), (3, 1), (9, 21), (0, 32), (4, 21)]):
        contingency[cluster, cls] = rows
    scores = cluster_metrics(contingency)
    assert scores["completeness"] == 1.0 and scores["v_measure"] == 1.0
    assert all(value <= 1.0 for value in scores.values())


def test_evaluation_sums_are_exact_for_stored_bytes_and_float64_otherwise() -> None:
    """The evaluation's per-center sums (kselect.py's means): from the bytes themselves when the rows are bytes / 255
    (the integer sums are exact), else a float64 sum of the rows."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(3000, 16), dtype=np.uint8)
    raw[:, 0] = 255  # columns whose float32 sums of x / 255 round
    x = np.divide(raw, np.float32(255), dtype=np.float32)
    centers = x[:5].copy()
    (stats,) = chunk_stats(x, np.zeros(len(x), dtype=np.int64), [centers], 1, evaluation=True)
    exact = np.zeros((5, 16))
    np.add.at(exact, stats.labels, raw.astype(np.float64))
    assert np.array_equal(stats.sums, exact / 255)
    floats = rng.random((3000, 16)).astype(np.float32)  # not bytes / 255: summed in float64
    (stats,) = chunk_stats(floats, np.zeros(len(x), dtype=np.int64), [centers], 1, evaluation=True)
    ref = np.zeros((5, 16))
    np.add.at(ref, stats.labels, floats.astype(np.float64))
    assert np.allclose(stats.sums, ref, rtol=1e-12, atol=0)
