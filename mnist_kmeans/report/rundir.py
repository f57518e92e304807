"""Reading a finished run directory: :func:`load_run` checks every file the report needs once, into a :class:`RunData`.

The report reads nothing else (no cluster, no store); ``docs/contract.md`` describes the files. Required:
``metrics.json``, ``evaluation.json``, ``label_maps.json``, ``centroids.zarr`` and ``samples.zarr``; optional, and
said to be missing by the report: ``job.yaml``, ``manifest.json`` and ``dask-performance.html``. A missing or
malformed input is a :class:`~mnist_kmeans.errors.UserError` whose one-line message names the file (and key) and
what is wrong with it. Files are checked in a fixed order, so a directory broken in several places always gets the
same message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mnist_kmeans.data.classes import valid_class_names
from mnist_kmeans.errors import UserError
from mnist_kmeans.reading import load_yaml, read_text
from mnist_kmeans.report.identity import DataIdentity, identify
from mnist_kmeans.report.values import is_int, is_num

METRIC_KEYS = ("inertia", "homogeneity", "ari", "nmi", "accuracy_train", "accuracy_test")
"""The numbers every entry of ``metrics.json``'s ``results`` must hold: the figures draw them."""


@dataclass
class RunData:
    """Everything the report shows, read and checked once from a run directory."""

    run_dir: Path
    metrics: dict[str, Any]
    results: list[dict[str, Any]]  # ascending K
    best_k: int
    n_classes: int
    image_shape: tuple[int, int]
    label_maps: dict[int, list[int | None]]
    test_contingency: np.ndarray  # (best_k, n_classes) rows per (cluster, true class), test split
    centroids: dict[int, np.ndarray]  # K -> (K, H*W), only the K values the report draws
    centroid_note: str
    train_first: tuple[np.ndarray, list[int]]
    misclassified: tuple[np.ndarray, list[int], list[int | None], int | None]
    manifest: dict[str, Any] | None
    job_yaml: str | None
    has_performance: bool
    identity: DataIdentity  # which data, how to word it, whether the seed's table applies


# ----------------------------------------------------------------------------------------------- JSON files


MAX_JSON_BYTES = 64 << 20  # the largest, evaluation.json, holds K x classes counts per K: a few MB at most


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: missing (is this a finished run directory?)")
    text = read_text(path, MAX_JSON_BYTES)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise UserError(f"{path}: not valid JSON for a run directory: nested too deeply") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object at the top, found {type(obj).__name__}")
    return obj


def _need(obj: Mapping[str, Any], key: str, path: Path, where: str, check: Callable[[Any], bool], what: str) -> Any:
    """``obj[key]`` if present and ``check`` passes; otherwise a UserError naming ``path`` and ``where.key``."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise UserError(f"{path}: key '{name}' is missing")
    value = obj[key]
    if not check(value):
        raise UserError(f"{path}: key '{name}' must be {what}, got {json.dumps(value)[:60]}")
    return value


def _check_result(entry: Any, path: Path, where: str) -> None:
    """One entry of ``metrics.json``'s ``results``: an object with a positive ``k`` and every metric a number."""
    if not isinstance(entry, dict):
        raise UserError(f"{path}: '{where}' must be an object")
    _need(entry, "k", path, where, lambda v: is_int(v) and v >= 1, "a positive integer")
    for key in METRIC_KEYS:
        _need(entry, key, path, where, is_num, "a number")
    if "inertia_per_epoch" in entry:
        _need(
            entry,
            "inertia_per_epoch",
            path,
            where,
            lambda v: isinstance(v, list) and all(is_num(x) for x in v),
            "a list of numbers",
        )


def _read_metrics(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``metrics.json`` and its ``results``, checked and sorted by K."""
    path = run_dir / "metrics.json"
    metrics = _read_json(path)
    results = _need(metrics, "results", path, "", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list")
    for i, entry in enumerate(results):
        _check_result(entry, path, f"results[{i}]")
    ks = [r["k"] for r in results]
    if len(set(ks)) != len(ks):
        raise UserError(f"{path}: 'results' holds K={sorted(k for k in set(ks) if ks.count(k) > 1)} more than once")
    for key in ("dataset", "timings", "cluster"):
        if key in metrics and not isinstance(metrics[key], dict):
            raise UserError(f"{path}: key '{key}' must be an object")
    return metrics, sorted(results, key=lambda r: r["k"])


@dataclass(frozen=True)
class _Evaluation:
    """What the report takes from ``evaluation.json`` (and ``metrics.json``), checked against the K grid."""

    best_k: int
    n_classes: int
    test_contingency: np.ndarray


def _read_evaluation(run_dir: Path, metrics: Mapping[str, Any], ks: Sequence[int]) -> _Evaluation:
    """The best K, the number of classes and the best K's test contingency table."""
    path = run_dir / "evaluation.json"
    evaluation = _read_json(path)
    best_k = metrics.get("best_k", evaluation.get("best_k"))
    if not is_int(best_k) or best_k not in ks:
        raise UserError(
            f"{run_dir / 'metrics.json'}: key 'best_k' must be one of the K values of 'results' {ks}, got {best_k!r}"
        )
    n_classes = evaluation.get("n_classes", metrics.get("dataset", {}).get("n_classes"))
    if not is_int(n_classes) or n_classes < 1:
        raise UserError(f"{path}: key 'n_classes' must be a positive integer, got {n_classes!r}")
    tables = _need(evaluation, "contingency", path, "", lambda v: isinstance(v, dict), "an object")
    try:
        test = np.asarray(tables[str(best_k)]["test"], dtype=np.int64)
    except (KeyError, TypeError):
        raise UserError(f"{path}: key 'contingency.{best_k}.test' (the best K) is missing") from None
    except ValueError:
        raise UserError(f"{path}: 'contingency.{best_k}.test' is not a table of integers") from None
    if test.shape != (best_k, n_classes):
        raise UserError(f"{path}: 'contingency.{best_k}.test' has shape {test.shape}, expected ({best_k}, {n_classes})")
    return _Evaluation(best_k, n_classes, test)


def _read_label_maps(run_dir: Path, ks: Sequence[int], n_classes: int) -> dict[int, list[int | None]]:
    """``label_maps.json``: for each K, the class each cluster stands for (``None``: a cluster with no rows)."""
    path = run_dir / "label_maps.json"
    raw_maps = _read_json(path)
    label_maps: dict[int, list[int | None]] = {}
    for k in ks:
        label_map = raw_maps.get(str(k))
        if not isinstance(label_map, list) or len(label_map) != k:
            raise UserError(
                f"{path}: key '{k}' must be a list of {k} entries (one per cluster), "
                f"got {'nothing' if label_map is None else json.dumps(label_map)[:40]}"
            )
        if not all(v is None or (is_int(v) and 0 <= v < n_classes) for v in label_map):
            raise UserError(f"{path}: key '{k}' holds an entry that is neither null nor a class in 0..{n_classes - 1}")
        label_maps[k] = label_map
    return label_maps


def _check_class_names(run_dir: Path, dataset: Mapping[str, Any], n_classes: int) -> None:
    """``metrics.json``'s ``dataset.class_names``, when present and not null: one name per class."""
    names = dataset.get("class_names")
    if names is not None and not valid_class_names(names, n_classes):
        raise UserError(
            f"{run_dir / 'metrics.json'}: key 'dataset.class_names' must be null or a list of {n_classes} short "
            f"names, got {json.dumps(names)[:60]}"
        )


# ----------------------------------------------------------------------------------------------- Zarr groups


def _open_zarr(path: Path) -> Any:
    import zarr  # local: only needed here, and importing zarr costs a few hundred ms

    if not path.is_dir():
        raise UserError(f"{path}: missing (is this a finished run directory?)")
    try:
        return zarr.open_group(store=str(path), mode="r")
    except Exception as exc:
        raise UserError(f"{path}: cannot open as a Zarr group: {type(exc).__name__}: {exc}") from None


def _zarr_array(group: Any, name: str, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        array = group[name]
        return np.asarray(array[...]), dict(array.attrs)
    except KeyError:
        raise UserError(f"{path}: array '{name}' is missing") from None
    except Exception as exc:
        raise UserError(f"{path}: cannot read array '{name}': {type(exc).__name__}: {exc}") from None


def _images(array: np.ndarray, shape: tuple[int, int], path: Path, name: str) -> np.ndarray:
    """(n, H, W) images from an array stored as (n, H, W) or (n, H*W)."""
    height, width = shape
    if array.ndim == 3 and array.shape[1:] == (height, width):
        return array
    if array.ndim == 2 and array.shape[1] == height * width:
        return array.reshape(len(array), height, width)
    raise UserError(f"{path}: array '{name}' has shape {array.shape}, expected (n, {height}, {width})")


def _image_shape(group: Any, dataset: Mapping[str, Any], path: Path) -> tuple[int, int]:
    """[H, W] of the images: the centroid group's attribute, else ``metrics.json``'s ``dataset.image_shape``."""
    shape = group.attrs.get("image_shape", dataset.get("image_shape"))
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(v) and v > 0 for v in shape)):
        raise UserError(f"{path}: group attribute 'image_shape' must be [H, W], got {shape!r}")
    return int(shape[0]), int(shape[1])


def _read_centroids(group: Any, ks: Sequence[int], image_shape: tuple[int, int], path: Path) -> dict[int, np.ndarray]:
    """The final (K, H*W) centroids of each K in ``ks``."""
    n_pixels = image_shape[0] * image_shape[1]
    centroids: dict[int, np.ndarray] = {}
    for k in ks:
        array, _ = _zarr_array(group, f"final/k{k}", path)
        if array.shape != (k, n_pixels):
            raise UserError(f"{path}: array 'final/k{k}' has shape {array.shape}, expected ({k}, {n_pixels})")
        centroids[k] = array
    return centroids


def load_centroids(run: RunData, k: int) -> np.ndarray:
    """The final (K, H*W) float32 centroids of one K of ``run`` (``centroids.zarr``, ``final/k{K}``), checked as the
    report's are; a K that is not in the run's grid is a UserError (the Python API's ``Run.model``)."""
    ks = [r["k"] for r in run.results]
    if not is_int(k) or k not in ks:
        raise UserError(f"{run.run_dir}: K={k!r} is not in this run's K grid {ks}")
    path = run.run_dir / "centroids.zarr"
    return _read_centroids(_open_zarr(path), [k], run.image_shape, path)[k]


@dataclass(frozen=True)
class _Samples:
    """The sample digits of ``samples.zarr``, as :class:`RunData` holds them."""

    train_first: tuple[np.ndarray, list[int]]
    misclassified: tuple[np.ndarray, list[int], list[int | None], int | None]


def _read_samples(run_dir: Path, image_shape: tuple[int, int]) -> _Samples:
    """The first training digits with their labels, and misclassified test digits with true and predicted labels."""
    path = run_dir / "samples.zarr"
    group = _open_zarr(path)
    first, first_attrs = _zarr_array(group, "train_first", path)
    first = _images(first, image_shape, path, "train_first")
    first_labels = first_attrs.get("labels")
    if not isinstance(first_labels, list) or len(first_labels) != len(first):
        raise UserError(f"{path}: array 'train_first' needs attribute 'labels' with {len(first)} entries")
    wrong, wrong_attrs = _zarr_array(group, "misclassified", path)
    wrong = _images(wrong, image_shape, path, "misclassified")
    true, pred = wrong_attrs.get("true"), wrong_attrs.get("pred")
    if not (isinstance(true, list) and isinstance(pred, list) and len(true) == len(pred) == len(wrong)):
        raise UserError(
            f"{path}: array 'misclassified' needs attributes 'true' and 'pred' with {len(wrong)} entries each"
        )
    wrong_k = wrong_attrs.get("k")
    return _Samples(
        train_first=(first, [int(v) for v in first_labels]),
        # an unmapped prediction may be written as null or as a negative class
        misclassified=(
            wrong,
            [int(v) for v in true],
            [None if v is None or int(v) < 0 else int(v) for v in pred],
            int(wrong_k) if is_int(wrong_k) else None,
        ),
    )


# ----------------------------------------------------------------------------------------------- job.yaml


def _job_centroid_grids(job_yaml: str | None, ks: Sequence[int], best_k: int) -> tuple[list[int], str]:
    """The K values whose centroid images to draw (``report.centroid_grids`` of job.yaml), and a note on fallbacks."""
    wanted: list[int] = []
    try:
        job = load_yaml(job_yaml) if job_yaml else None
        grids = job.get("report", {}).get("centroid_grids") if isinstance(job, dict) else None
        if isinstance(grids, list):
            wanted = [int(v) for v in grids if is_int(v)]
    except (yaml.YAMLError, AttributeError, ValueError):
        pass  # job.yaml is shown as text anyway; a broken one only costs the choice of grids
    shown = [k for k in dict.fromkeys(wanted) if k in ks]
    skipped = [k for k in wanted if k not in ks]
    if not shown:
        why = (
            f"K={', '.join(map(str, skipped))} of report.centroid_grids is not in this run's K grid"
            if skipped
            else "job.yaml names no report.centroid_grids"
        )
        return [best_k], f"{why}; showing the best K instead."
    if skipped:
        return shown, f"K={', '.join(map(str, skipped))} of report.centroid_grids is not in this run's K grid."
    return shown, ""


def _read_optional_text(path: Path) -> str | None:
    """The text of ``path``, bounded as a job file is; None when there is none."""
    return read_text(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------- the whole run


def load_run(run_dir: str | Path, unfinished: bool = False) -> RunData:
    """Read and check every file of ``run_dir`` the report needs.

    ``unfinished``: accept a run whose ``metrics.json`` has no ``finished_utc`` yet (``run`` draws its figures
    before it finishes); otherwise such a run is refused, since its page would pass off a cut-short run as done.

    Raises
    ------
    UserError
        When ``run_dir`` is not a directory, the run did not finish, or a required file is missing or malformed.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    metrics, results = _read_metrics(run)
    if not unfinished and not isinstance(metrics.get("finished_utc"), str):
        raise UserError(
            f"{run}: the run did not finish (metrics.json has no finished_utc); "
            f"continue it with: mnist-kmeans run JOB.yaml --resume {run}"
        )
    ks = [r["k"] for r in results]
    evaluation = _read_evaluation(run, metrics, ks)
    label_maps = _read_label_maps(run, ks, evaluation.n_classes)
    _check_class_names(run, metrics.get("dataset", {}), evaluation.n_classes)
    centroid_path = run / "centroids.zarr"
    centroid_group = _open_zarr(centroid_path)
    image_shape = _image_shape(centroid_group, metrics.get("dataset", {}), centroid_path)
    job_yaml = _read_optional_text(run / "job.yaml")
    grid_ks, centroid_note = _job_centroid_grids(job_yaml, ks, evaluation.best_k)
    centroids = _read_centroids(centroid_group, grid_ks, image_shape, centroid_path)
    samples = _read_samples(run, image_shape)
    manifest_path = run / "manifest.json"
    manifest = _read_json(manifest_path) if manifest_path.exists() else None
    return RunData(
        run_dir=run,
        metrics=metrics,
        results=results,
        best_k=evaluation.best_k,
        n_classes=evaluation.n_classes,
        image_shape=image_shape,
        label_maps=label_maps,
        test_contingency=evaluation.test_contingency,
        centroids=centroids,
        centroid_note=centroid_note,
        train_first=samples.train_first,
        misclassified=samples.misclassified,
        manifest=manifest,
        job_yaml=job_yaml,
        has_performance=(run / "dask-performance.html").is_file(),
        identity=identify(metrics.get("dataset", {}), manifest),
    )
