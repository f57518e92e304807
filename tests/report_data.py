"""A realistic run directory, built in memory in about a second, for testing the report layer on its own.

:func:`make_run_dir` fits scikit-learn ``MiniBatchKMeans`` on the 8x8 digits that ship with scikit-learn (no
download), epoch by epoch with ``partial_fit`` and ``n_init`` restarts, and writes every file of the run-directory
contract that the report reads: ``metrics.json``, ``label_maps.json``, ``evaluation.json``, ``centroids.zarr``,
``samples.zarr``, ``manifest.json``, ``job.yaml`` and ``dask-performance.html``. All numbers are really computed
(metrics with ``sklearn.metrics``), so the figures look like the real thing. No cluster, no store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import yaml
import zarr
from sklearn import metrics as skm
from sklearn.cluster import MiniBatchKMeans
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from mnist_kmeans.kselect import inertia_knee, k_selection

N_TRAIN = 1500  # of the 1797 digits; the rest is the test split
SELECTION_ROWS = 500  # rows of the silhouette sample
BATCH_SIZE = 100


def _inertia_and_assign(x: np.ndarray, centroids: np.ndarray) -> tuple[float, np.ndarray]:
    """Float64 sum of squared distances to the nearest centroid, and the nearest centroid of each row."""
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    # |x|^2 - 2 x.c + |c|^2: no (rows, K, pixels) temporary, so MNIST-sized inputs fit in memory too
    d = (x64**2).sum(axis=1)[:, None] - 2.0 * x64 @ c64.T + (c64**2).sum(axis=1)[None, :]
    assign = d.argmin(axis=1)
    return float(np.maximum(d[np.arange(len(x)), assign], 0.0).sum()), assign


def _fit(
    x: np.ndarray, k: int, epochs: int, n_init: int, seed: int
) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Best of ``n_init`` seeded partial_fit chains: its centroids and training inertia after each epoch, and the
    ARI between every two restarts' assignments after their first epoch (their agreement, as kselect.py has it)."""
    best: tuple[list[np.ndarray], list[float]] | None = None
    first_epoch: list[np.ndarray] = []
    # One thread: on 100-row batches, OpenMP start-up per call costs ~30x the arithmetic.
    with threadpool_limits(1):
        for restart in range(n_init):
            chain = _chain(x, k, epochs, seed, restart)
            first_epoch.append(_inertia_and_assign(x, chain[0][0])[1])
            if best is None or chain[1][-1] < best[1][-1]:
                best = chain
    assert best is not None
    agreement = [float(skm.adjusted_rand_score(a, b)) for a, b in itertools.combinations(first_epoch, 2)]
    return *best, agreement


def _label_free(x: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """The label-free indices of metrics.json, by scikit-learn, the silhouette on a seeded sample."""
    x64 = x.astype(np.float64)
    rows = np.random.default_rng(seed).choice(len(x), size=min(SELECTION_ROWS, len(x)), replace=False)
    return {
        "calinski_harabasz": float(skm.calinski_harabasz_score(x64, labels)),
        "davies_bouldin": float(skm.davies_bouldin_score(x64, labels)),
        "silhouette_sample": float(skm.silhouette_score(x64[rows], labels[rows])),
    }


def _chain(x: np.ndarray, k: int, epochs: int, seed: int, restart: int) -> tuple[list[np.ndarray], list[float]]:
    """One seeded partial_fit chain: centroids and training inertia after each epoch."""
    rng = np.random.default_rng([seed, k, restart])
    batch_size = max(BATCH_SIZE, 2 * k)  # partial_fit's first call needs at least k rows
    model = MiniBatchKMeans(n_clusters=k, batch_size=batch_size, n_init=1, random_state=seed * 1000 + restart)
    snaps, curve = [], []
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(order), batch_size):
            batch = x[order[start : start + batch_size]]
            if hasattr(model, "cluster_centers_") or len(batch) >= k:
                model.partial_fit(batch)
        centroids = model.cluster_centers_.astype(np.float32).copy()
        snaps.append(centroids)
        curve.append(_inertia_and_assign(x, centroids)[0])
    return snaps, curve


def make_run_dir(
    path: str | Path,
    ks: Sequence[int] = (4, 8),
    epochs: int = 2,
    name: str = "fixture <script>alert(1)</script>",
    *,
    n_init: int = 2,
    seed: int = 0,
    centroid_grids: Sequence[int] | None = None,
    performance_report: bool = True,
    data: tuple[np.ndarray, np.ndarray, tuple[int, int], int] | None = None,
    dataset: dict[str, Any] | None = None,
    md5: dict[str, str] | None = None,
) -> Path:
    """Write a complete run directory at ``path`` (created if needed) and return it.

    ``ks``: the K grid; ``epochs``, ``n_init``, ``seed``: as in a job file; ``name``: the job name (user text,
    deliberately hostile by default); ``centroid_grids``: the K values of ``report.centroid_grids`` in
    ``job.yaml`` (default: every K); ``performance_report``: also write a stand-in ``dask-performance.html``;
    ``data``: other images instead of scikit-learn's digits, as ``(uint8 pixels (n, H*W), labels (n,), (H, W),
    n_train)`` — the first ``n_train`` rows are the training split; ``dataset``: keys that replace those of
    ``metrics.json``'s ``dataset`` (e.g. ``class_names``, or MNIST's counts); ``md5``: the sums ``manifest.json``
    records instead of those of the data (e.g. MNIST's, to stand for a run on MNIST).
    """
    t0 = time.perf_counter()
    run = Path(path)
    run.mkdir(parents=True, exist_ok=True)
    ks = sorted(int(k) for k in ks)
    if data is None:
        digits = load_digits()
        (h, w), n_train = digits.images.shape[1:], N_TRAIN
        pixels = np.round(digits.data * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> the uint8 scale of MNIST
        labels = digits.target.astype(np.int64)
    else:
        pixels, labels, (h, w), n_train = np.asarray(data[0], np.uint8), np.asarray(data[1], np.int64), data[2], data[3]
    n_classes = int(labels.max()) + 1
    x_train, y_train = pixels[:n_train].astype(np.float32) / 255.0, labels[:n_train]
    x_test, y_test = pixels[n_train:].astype(np.float32) / 255.0, labels[n_train:]

    results: list[dict[str, Any]] = []
    label_maps: dict[str, list[int | None]] = {}
    contingency: dict[str, dict[str, list[list[int]]]] = {}
    finals: dict[int, np.ndarray] = {}
    epoch_snaps: dict[int, np.ndarray] = {}
    test_pred: dict[int, np.ndarray] = {}
    fit_start = time.perf_counter()
    for k in ks:
        t_k = time.perf_counter()
        snaps, curve, agreement = _fit(x_train, k, epochs, n_init, seed)
        fit_seconds = time.perf_counter() - t_k
        final = snaps[-1]
        inertia, a_train = _inertia_and_assign(x_train, final)
        _, a_test = _inertia_and_assign(x_test, final)
        c_train = np.zeros((k, n_classes), dtype=np.int64)
        c_test = np.zeros((k, n_classes), dtype=np.int64)
        np.add.at(c_train, (a_train, y_train), 1)
        np.add.at(c_test, (a_test, y_test), 1)
        # majority label of the training rows; a cluster without rows stays unmapped (never "digit 0")
        lmap: list[int | None] = [int(row.argmax()) if row.sum() else None for row in c_train]
        lookup = np.array([-1 if v is None else v for v in lmap])
        p_train, p_test = lookup[a_train], lookup[a_test]
        results.append(
            {
                "k": k,
                "inertia": inertia,
                "homogeneity": float(skm.homogeneity_score(y_train, a_train)),
                "completeness": float(skm.completeness_score(y_train, a_train)),
                "v_measure": float(skm.v_measure_score(y_train, a_train)),
                "ari": float(skm.adjusted_rand_score(y_train, a_train)),
                "nmi": float(skm.normalized_mutual_info_score(y_train, a_train)),
                "accuracy_train": float((p_train == y_train).mean()),
                "accuracy_test": float((p_test == y_test).mean()),
                "n_empty_clusters": int(sum(v is None for v in lmap)),
                "epochs": epochs,
                "fit_seconds": round(fit_seconds, 4),
                "inertia_per_epoch": curve,
                "n_init": n_init,
                **_label_free(x_train, a_train, seed),
                "restart_ari_mean": float(np.mean(agreement)) if agreement else None,
                "restart_ari_min": min(agreement) if agreement else None,
            }
        )
        label_maps[str(k)] = lmap
        contingency[str(k)] = {"train": c_train.tolist(), "test": c_test.tolist()}
        finals[k], epoch_snaps[k], test_pred[k] = final, np.stack(snaps), p_test
    fit_s = time.perf_counter() - fit_start
    best = max(results, key=lambda r: (r["accuracy_test"], -r["k"]))
    best_k = int(best["k"])
    knee = inertia_knee([r["k"] for r in results], [r["inertia"] for r in results])
    selection = k_selection(results, knee, min(SELECTION_ROWS, len(y_train)))

    root = zarr.open_group(str(run / "centroids.zarr"), mode="w", zarr_format=3)
    root.attrs["image_shape"] = [h, w]
    final_g, epochs_g = root.require_group("final"), root.require_group("epochs")
    for k in ks:
        final_g.create_array(f"k{k}", data=finals[k])
        epochs_g.create_array(f"k{k}", data=epoch_snaps[k])

    samples = zarr.open_group(str(run / "samples.zarr"), mode="w", zarr_format=3)
    first = samples.create_array("train_first", data=pixels[:9].reshape(9, h, w))
    first.attrs["labels"] = [int(v) for v in y_train[:9]]
    wrong = np.flatnonzero(test_pred[best_k] != y_test)[:32]
    mis = samples.create_array("misclassified", data=pixels[n_train:][wrong].reshape(len(wrong), h, w))
    mis.attrs.update(
        {
            "true": [int(v) for v in y_test[wrong]],
            "pred": [None if test_pred[best_k][i] < 0 else int(test_pred[best_k][i]) for i in wrong],
            "k": best_k,
        }
    )

    store = "data/digits & co.zarr"
    cluster = {
        "scheduler": "tcp://127.0.0.1:40321",
        "n_workers": 2,
        "threads": 4,
        "dashboard": "http://127.0.0.1:8787/status",
    }
    md5_of_data = {
        "train-images-idx3-ubyte": hashlib.md5(pixels[:n_train].tobytes()).hexdigest(),
        "train-labels-idx1-ubyte": hashlib.md5(y_train.astype(np.uint8).tobytes()).hexdigest(),
        "t10k-images-idx3-ubyte": hashlib.md5(pixels[n_train:].tobytes()).hexdigest(),
        "t10k-labels-idx1-ubyte": hashlib.md5(y_test.astype(np.uint8).tobytes()).hexdigest(),
    }
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    metrics = {
        "job": name,
        "started_utc": started,
        "finished_utc": started,
        "best_k": best_k,
        "k_selection": selection,
        "dataset": {
            "store": store,
            "n_train": int(len(y_train)),
            "n_test": int(len(y_test)),
            "n_classes": n_classes,
            "image_shape": [h, w],
            **(dataset or {}),
        },
        "results": results,
        "inertia_per_epoch_note": "exact: a full pass over the training split after each epoch (test fixture)",
        "timings": {
            "cluster_start_s": 0.8,
            "ingest_s": 0.0,
            "fit_s": round(fit_s, 3),
            "evaluate_s": 0.05,
            "report_s": 0.0,
            "total_s": round(time.perf_counter() - t0 + 0.85, 3),
        },
        "cluster": cluster,
    }
    manifest = {
        "versions": {
            "python": platform.python_version(),
            "mnist_kmeans": "0.1.0",
            "dask": "fixture",
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "zarr": zarr.__version__,
        },
        "command": ["mnist-kmeans", "run", "jobs/fixture.yaml", "--out", str(run), "--store", store],
        "cluster": cluster,
        "data": {"store": store, "source": "sklearn.datasets.load_digits", "md5": md5_of_data if md5 is None else md5},
        "started_utc": started,
    }
    job = {
        "name": name,
        "store": store,
        "k_grid": ks,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "n_init": n_init,
        "seed": seed,
        "report": {"centroid_grids": list(centroid_grids if centroid_grids is not None else ks)},
    }

    def dump(name_: str, obj: Any) -> None:
        (run / name_).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    dump("metrics.json", metrics)
    dump("label_maps.json", label_maps)
    dump("evaluation.json", {"n_classes": n_classes, "best_k": best_k, "contingency": contingency})
    dump("manifest.json", manifest)
    (run / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False, allow_unicode=True), encoding="utf-8")
    if performance_report:
        (run / "dask-performance.html").write_text(
            '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Dask performance report</title></head>'
            "<body><p>stand-in for Dask's performance_report</p></body></html>\n",
            encoding="utf-8",
        )
    return run


if __name__ == "__main__":  # python -m tests.report_data DIR [K ...]: a run directory to look at by hand
    import sys

    out = make_run_dir(sys.argv[1], ks=[int(v) for v in sys.argv[2:]] or (4, 8))
    print(out)
