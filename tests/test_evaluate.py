"""The distributed evaluation against an independent in-memory recomputation with scikit-learn.

One real job on a LocalCluster; then, from the run's ``centroids.zarr`` and the raw arrays written as IDX files,
every number of ``metrics.json`` and ``label_maps.json`` is computed again in memory and compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from sklearn import metrics as skm
from sklearn.metrics import pairwise_distances_argmin_min

from conftest import KGRID_STORE_ARGS, run_cli

JOB_NAME = "eval <script>alert(1)</script> & co"


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
    cluster.write_text("local: {n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB, dashboard_address: '127.0.0.1:0'}\n")
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
    mapping = [int(np.bincount(y[pred == c], minlength=n_classes).argmax()) if (pred == c).any() else None for c in range(k)]
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
        assert all(b <= a * (1 + 1e-6) for a, b in zip(lloyd, lloyd[1:]))


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
