"""``report.html``: one self-contained page rendered from the files of a run directory, and nothing else.

:func:`render_report` reads the run directory (SPEC "The run directory"; no cluster, no store), draws the figures
(:mod:`mnist_kmeans.report.figures`), saves each as ``figures/<name>.png`` and renders the Jinja template with
autoescaping on, the PNGs embedded as ``data:`` URIs. The page loads nothing from anywhere: inline CSS, no script,
no font, no external link. Every file is written to a temporary name first and then renamed into place, so a
reader never sees half a report.

A missing or malformed input is a :class:`~mnist_kmeans.errors.UserError` whose one-line message names the file
(and key) and what is wrong with it.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shlex
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

import mnist_kmeans
from mnist_kmeans.errors import UserError
from mnist_kmeans.reference import load_seed_table
from mnist_kmeans.report import figures

# The seed notebook ran on full MNIST; only then are its inertia values comparable with a run's.
SEED_DATA = {"n_train": 60000, "image_shape": [28, 28], "n_classes": 10}
_METRIC_KEYS = ("inertia", "homogeneity", "ari", "nmi", "accuracy_train", "accuracy_test")  # needed by figures


# ------------------------------------------------------------------------------------------ reading the run


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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing (is this a finished run directory?)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object at the top, found {type(obj).__name__}")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(obj: Mapping[str, Any], key: str, path: Path, where: str, check: Callable[[Any], bool], what: str) -> Any:
    """``obj[key]`` if present and ``check`` passes; otherwise a UserError naming ``path`` and ``where.key``."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise UserError(f"{path}: key '{name}' is missing")
    value = obj[key]
    if not check(value):
        raise UserError(f"{path}: key '{name}' must be {what}, got {json.dumps(value)[:60]}")
    return value


def _read_metrics(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = run_dir / "metrics.json"
    metrics = _read_json(path)
    results = _need(metrics, "results", path, "", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list")
    for i, entry in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{path}: '{where}' must be an object")
        _need(entry, "k", path, where, lambda v: _is_int(v) and v >= 1, "a positive integer")
        for key in _METRIC_KEYS:
            _need(entry, key, path, where, _is_num, "a number")
        if "inertia_per_epoch" in entry:
            _need(entry, "inertia_per_epoch", path, where,
                  lambda v: isinstance(v, list) and all(_is_num(x) for x in v), "a list of numbers")
    ks = [r["k"] for r in results]
    if len(set(ks)) != len(ks):
        raise UserError(f"{path}: 'results' holds K={sorted(k for k in set(ks) if ks.count(k) > 1)} more than once")
    for key in ("dataset", "timings", "cluster"):
        if key in metrics and not isinstance(metrics[key], dict):
            raise UserError(f"{path}: key '{key}' must be an object")
    return metrics, sorted(results, key=lambda r: r["k"])


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
        arr = group[name]
        return np.asarray(arr[...]), dict(arr.attrs)
    except KeyError:
        raise UserError(f"{path}: array '{name}' is missing") from None
    except Exception as exc:
        raise UserError(f"{path}: cannot read array '{name}': {type(exc).__name__}: {exc}") from None


def _images(arr: np.ndarray, shape: tuple[int, int], path: Path, name: str) -> np.ndarray:
    """(n, H, W) images from an array stored as (n, H, W) or (n, H*W)."""
    h, w = shape
    if arr.ndim == 3 and arr.shape[1:] == (h, w):
        return arr
    if arr.ndim == 2 and arr.shape[1] == h * w:
        return arr.reshape(len(arr), h, w)
    raise UserError(f"{path}: array '{name}' has shape {arr.shape}, expected (n, {h}, {w})")


def _job_centroid_grids(job_yaml: str | None, ks: Sequence[int], best_k: int) -> tuple[list[int], str]:
    """The K values whose centroid images to draw (``report.centroid_grids`` of job.yaml), and a note on fallbacks."""
    wanted: list[int] = []
    try:
        job = yaml.safe_load(job_yaml) if job_yaml else None
        grids = job.get("report", {}).get("centroid_grids") if isinstance(job, dict) else None
        if isinstance(grids, list):
            wanted = [int(v) for v in grids if _is_int(v)]
    except (yaml.YAMLError, AttributeError):
        pass  # job.yaml is shown as text anyway; a broken one only costs the choice of grids
    shown = [k for k in dict.fromkeys(wanted) if k in ks]
    skipped = [k for k in wanted if k not in ks]
    if not shown:
        why = f"K={', '.join(map(str, skipped))} of report.centroid_grids is not in this run's K grid" if skipped \
            else "job.yaml names no report.centroid_grids"
        return [best_k], f"{why}; showing the best K instead."
    if skipped:
        return shown, f"K={', '.join(map(str, skipped))} of report.centroid_grids is not in this run's K grid."
    return shown, ""


def load_run(run_dir: str | Path) -> RunData:
    """Read and check every file of ``run_dir`` the report needs. Raises UserError on anything missing or malformed.

    Required: ``metrics.json``, ``label_maps.json``, ``evaluation.json``, ``centroids.zarr``, ``samples.zarr``.
    Optional (the report says when they are missing): ``manifest.json``, ``job.yaml``, ``dask-performance.html``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    metrics, results = _read_metrics(run)
    ks = [r["k"] for r in results]
    mpath = run / "metrics.json"

    epath = run / "evaluation.json"
    evaluation = _read_json(epath)
    best_k = metrics.get("best_k", evaluation.get("best_k"))
    if not _is_int(best_k) or best_k not in ks:
        raise UserError(f"{mpath}: key 'best_k' must be one of the K values of 'results' {ks}, got {best_k!r}")
    dataset = metrics.get("dataset", {})
    n_classes = evaluation.get("n_classes", dataset.get("n_classes"))
    if not _is_int(n_classes) or n_classes < 1:
        raise UserError(f"{epath}: key 'n_classes' must be a positive integer, got {n_classes!r}")
    cont = _need(evaluation, "contingency", epath, "", lambda v: isinstance(v, dict), "an object")
    try:
        test = np.asarray(cont[str(best_k)]["test"], dtype=np.int64)
    except (KeyError, TypeError):
        raise UserError(f"{epath}: key 'contingency.{best_k}.test' (the best K) is missing") from None
    except ValueError:
        raise UserError(f"{epath}: 'contingency.{best_k}.test' is not a table of integers") from None
    if test.shape != (best_k, n_classes):
        raise UserError(f"{epath}: 'contingency.{best_k}.test' has shape {test.shape}, "
                        f"expected ({best_k}, {n_classes})")

    lpath = run / "label_maps.json"
    raw_maps = _read_json(lpath)
    label_maps: dict[int, list[int | None]] = {}
    for k in ks:
        lm = raw_maps.get(str(k))
        if not isinstance(lm, list) or len(lm) != k:
            raise UserError(f"{lpath}: key '{k}' must be a list of {k} entries (one per cluster), "
                            f"got {'nothing' if lm is None else json.dumps(lm)[:40]}")
        if not all(v is None or (_is_int(v) and 0 <= v < n_classes) for v in lm):
            raise UserError(f"{lpath}: key '{k}' holds an entry that is neither null nor a class in 0..{n_classes - 1}")
        label_maps[k] = lm

    cpath = run / "centroids.zarr"
    cgroup = _open_zarr(cpath)
    shape = cgroup.attrs.get("image_shape", dataset.get("image_shape"))
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
        raise UserError(f"{cpath}: group attribute 'image_shape' must be [H, W], got {shape!r}")
    image_shape = (int(shape[0]), int(shape[1]))

    job_path = run / "job.yaml"
    job_yaml = job_path.read_text(encoding="utf-8", errors="replace") if job_path.is_file() else None
    grid_ks, centroid_note = _job_centroid_grids(job_yaml, ks, best_k)
    centroids: dict[int, np.ndarray] = {}
    for k in grid_ks:
        arr, _ = _zarr_array(cgroup, f"final/k{k}", cpath)
        if arr.shape != (k, image_shape[0] * image_shape[1]):
            raise UserError(f"{cpath}: array 'final/k{k}' has shape {arr.shape}, "
                            f"expected ({k}, {image_shape[0] * image_shape[1]})")
        centroids[k] = arr

    spath = run / "samples.zarr"
    sgroup = _open_zarr(spath)
    first, first_attrs = _zarr_array(sgroup, "train_first", spath)
    first = _images(first, image_shape, spath, "train_first")
    first_labels = first_attrs.get("labels")
    if not isinstance(first_labels, list) or len(first_labels) != len(first):
        raise UserError(f"{spath}: array 'train_first' needs attribute 'labels' with {len(first)} entries")
    mis, mis_attrs = _zarr_array(sgroup, "misclassified", spath)
    mis = _images(mis, image_shape, spath, "misclassified")
    true, pred = mis_attrs.get("true"), mis_attrs.get("pred")
    if not (isinstance(true, list) and isinstance(pred, list) and len(true) == len(pred) == len(mis)):
        raise UserError(f"{spath}: array 'misclassified' needs attributes 'true' and 'pred' "
                        f"with {len(mis)} entries each")
    mis_k = mis_attrs.get("k")

    manifest_path = run / "manifest.json"
    manifest = _read_json(manifest_path) if manifest_path.exists() else None

    return RunData(
        run_dir=run,
        metrics=metrics,
        results=results,
        best_k=best_k,
        n_classes=n_classes,
        image_shape=image_shape,
        label_maps=label_maps,
        test_contingency=test,
        centroids=centroids,
        centroid_note=centroid_note,
        train_first=(first, [int(v) for v in first_labels]),
        # an unmapped prediction may be written as null or as a negative class
        misclassified=(mis, [int(v) for v in true], [None if v is None or int(v) < 0 else int(v) for v in pred],
                       int(mis_k) if _is_int(mis_k) else None),
        manifest=manifest,
        job_yaml=job_yaml,
        has_performance=(run / "dask-performance.html").is_file(),
    )


# ----------------------------------------------------------------------------------------- derived numbers


def confusion_from_contingency(
    contingency: np.ndarray, label_map: Sequence[int | None], n_classes: int
) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix (true class x predicted label) implied by a per-cluster contingency table.

    ``contingency[cluster, true_class]`` counts rows; each cluster predicts ``label_map[cluster]``. Rows in
    unmapped clusters (``None``) go to a last "none" column, which exists only when such rows exist.
    Returns the matrix and the names of its columns.
    """
    cont = np.asarray(contingency, dtype=np.int64)
    m = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    for cluster, label in enumerate(label_map):
        m[:, n_classes if label is None else label] += cont[cluster]
    names = [str(c) for c in range(n_classes)]
    if m[:, n_classes].sum() == 0:
        return m[:, :n_classes], names
    return m, names + ["none"]


# ------------------------------------------------------------------------------------------------ formatting


def _fmt_num(v: Any, digits: int = 4) -> str:
    if not _is_num(v) or (isinstance(v, float) and not math.isfinite(v)):
        return "—" if v is None else str(v)
    return f"{v:.{digits}f}"


def _fmt_pct(v: Any, digits: int = 2) -> str:
    return f"{100 * v:.{digits}f} %" if _is_num(v) and math.isfinite(v) else "—"


def _fmt_big(v: Any) -> str:
    """Inertia-like numbers: thousands separators, a decimal only while the number is small."""
    if not _is_num(v) or not math.isfinite(v):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:,.1f}"


def _fmt_int(v: Any) -> str:
    return f"{v:,}" if _is_int(v) else ("—" if v is None else str(v))


def _fmt_secs(v: Any) -> str:
    if not _is_num(v) or not math.isfinite(v):
        return "—"
    if v < 10:
        return f"{v:.2f} s"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(round(v), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _fmt_value(v: Any) -> str:
    """Any JSON value as one line of text (the template escapes it)."""
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or _is_num(v):
        return json.dumps(v)
    return json.dumps(v, ensure_ascii=False)


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A nested JSON object as (dotted key, text) rows; a command line (list of strings) as one shell line."""
    if not prefix and isinstance(obj, dict) and not obj:
        return []
    if isinstance(obj, dict) and obj:
        rows: list[tuple[str, str]] = []
        for key, value in obj.items():
            rows.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(obj, list) and obj and all(isinstance(v, str) for v in obj) and "command" in prefix.lower():
        return [(prefix, shlex.join(obj))]
    return [(prefix, _fmt_value(obj))]


def _delta(run: float | None, seed: float | None, *, higher_is_better: bool, pct: bool, relative: bool) -> dict:
    """A signed difference (run - seed) for the comparison table, with a class saying whether it is an improvement."""
    if run is None or seed is None:
        return {"text": "—", "cls": ""}
    d = (run - seed) / seed if relative else run - seed
    text = f"{100 * d:+.1f} %" if relative else (f"{100 * d:+.2f} pp" if pct else f"{d:+.4f}")
    better = d > 0 if higher_is_better else d < 0
    return {"text": text, "cls": "" if abs(d) < 1e-12 else ("better" if better else "worse")}


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height of a PNG from its IHDR chunk."""
    return struct.unpack(">II", png[16:24])


# ------------------------------------------------------------------------------------------------- figures


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


@dataclass
class ReportFigure:
    """One figure of the report: saved as ``figures/<name>.png`` and embedded in the page."""

    name: str
    title: str
    caption: str
    alt: str
    png: bytes

    @property
    def src(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def size(self) -> tuple[int, int]:
        return _png_size(self.png)


def _seed_comparable(dataset: Mapping[str, Any]) -> bool:
    return all(dataset.get(k) == v for k, v in SEED_DATA.items())


def _common_epochs(results: Sequence[Mapping[str, Any]]) -> int | None:
    """The number of mini-batch epochs when every K ran the same number, else None."""
    values = {r.get("epochs") for r in results}
    return values.pop() if len(values) == 1 and _is_int(next(iter(values))) else None


def build_figures(
    run: RunData, seed_table: Mapping[str, Any], draw: Callable[..., Any] | None = None
) -> tuple[list[ReportFigure], list[str]]:
    """All figures of the report, in reading order, and notes about figures that could not be drawn.

    ``draw(fn, *args, **kwargs)``, if given, is called instead of each figure function ``fn(*args, **kwargs)``:
    e.g. ``Client.submit``, to draw the figures on a cluster's workers at once. Each figure's ``png`` is then what
    ``draw`` returned (a future), for the caller to resolve.
    """
    draw = draw or _call
    res = run.results
    ks = [r["k"] for r in res]
    col = {key: [r[key] for r in res] for key in _METRIC_KEYS}
    comparable = _seed_comparable(run.metrics.get("dataset", {}))
    seed_rows = {int(r["k"]): r for r in seed_table.get("results", [])}
    figs: list[ReportFigure] = []
    notes: list[str] = []

    images, labels = run.train_first
    if len(images):
        figs.append(ReportFigure(
            "training_digits", f"The first {len(images)} training digits",
            "The first rows of the training split with their true labels, as the seed notebook shows them.",
            "Grid of the first training digits, each titled 'Number' and its label.",
            draw(figures.training_digits, images, labels)))
    else:
        notes.append("samples.zarr holds no training digits to show.")

    figs.append(ReportFigure(
        "inertia_vs_k", "Inertia against K",
        "Sum over all training rows of the squared distance to the nearest centroid (pixels scaled to [0, 1]). "
        "It falls as K grows whatever the data; a bend (“elbow”) hints at a natural number of clusters."
        + (" Dashed: the seed notebook's published values." if comparable else ""),
        "Line chart of inertia against K.",
        draw(figures.inertia_vs_k, ks, col["inertia"],
                             seed={k: r["inertia"] for k, r in seed_rows.items()} if comparable else None)))

    figs.append(ReportFigure(
        "scores_vs_k", "Homogeneity and accuracy against K",
        "Left, the seed notebook's view: homogeneity and accuracy (each cluster votes for the most frequent label of "
        "its training rows) rise with K by construction — with one cluster per row both reach 100 % — so they show "
        "how well clusters separate digits, not which K is best. Right: ARI and NMI on the training split, which do "
        "not reward extra clusters for free and are fair across K."
        + (" Dashed: the seed notebook's published values." if comparable else ""),
        "Two line charts: homogeneity and train and test accuracy against K; ARI and NMI against K.",
        draw(figures.scores_vs_k, ks, col["homogeneity"], col["accuracy_train"], col["accuracy_test"], col["ari"],
                            col["nmi"],
                            seed={k: (r["homogeneity"], r["accuracy_train"]) for k, r in seed_rows.items()}
                            if comparable else None)))

    for k, cents in run.centroids.items():
        lm = run.label_maps[k]
        covered = {v for v in lm if v is not None}
        missing = [c for c in range(run.n_classes) if c not in covered]
        n_empty = sum(v is None for v in lm)
        detail = (f" No centroid stands for class {', '.join(map(str, missing))}." if missing
                  else f" Every one of the {run.n_classes} classes has at least one centroid.")
        if n_empty:
            detail += f" {n_empty} cluster{'s' if n_empty > 1 else ''} received no training rows (“none”)."
        figs.append(ReportFigure(
            f"centroids_k{k}", f"The K={k} centroids",
            f"Each centroid drawn as an image and titled “Inferred label: d”, the most frequent true label of the "
            f"training rows nearest to it.{detail}",
            f"Grid of the {k} centroid images, each titled 'Inferred label' and its label.",
            draw(figures.centroid_grid, cents, lm, run.image_shape)))

    matrix, pred_names = confusion_from_contingency(run.test_contingency, run.label_maps[run.best_k], run.n_classes)
    total = int(matrix.sum())
    correct = int(np.trace(matrix[:, : run.n_classes]))
    unmapped = int(matrix[:, run.n_classes].sum()) if len(pred_names) > run.n_classes else 0
    figs.append(ReportFigure(
        f"confusion_test_k{run.best_k}", f"Confusion matrix of the test split, K={run.best_k}",
        f"Rows: true label; columns: the inferred label of the cluster each test row falls in (label map learned on "
        f"the training split only). {correct:,} of {total:,} test rows are right "
        f"({_fmt_pct(correct / total if total else float('nan'))})."
        + (f" {unmapped:,} rows fall in clusters without a label (column “none”)." if unmapped else "")
        + " Cells are shaded by their share of the row.",
        f"Confusion matrix of the test split for K={run.best_k}.",
        draw(figures.confusion_matrix, matrix, [str(c) for c in range(run.n_classes)], pred_names,
                                 title=f"Test split, K={run.best_k}")))

    mis, true, pred, mis_k = run.misclassified
    if len(mis):
        figs.append(ReportFigure(
            "misclassified", "Misclassified test digits",
            f"The first {len(mis)} test digits whose cluster's inferred label is wrong at K={mis_k or run.best_k}, "
            "titled “true → predicted”.",
            "Grid of misclassified test digits with their true and predicted labels.",
            draw(figures.misclassified_gallery, mis, true, pred)))
    else:
        notes.append("No misclassified test digits to show.")

    curves = {r["k"]: r["inertia_per_epoch"] for r in res if r.get("inertia_per_epoch")}
    if curves:
        how = run.metrics.get("inertia_per_epoch_note")
        figs.append(ReportFigure(
            "inertia_per_epoch", "Inertia per epoch",
            "Training inertia after each epoch, one line per K; right, the same relative to the last epoch, so "
            "convergence reads on one scale for every K." + (f" Measured: {how}." if isinstance(how, str) else ""),
            "Line charts of inertia after each epoch for every K.",
            draw(figures.inertia_per_epoch, curves, epochs=_common_epochs(res))))
    else:
        notes.append("metrics.json holds no 'inertia_per_epoch' for any K.")
    return figs, notes


# ------------------------------------------------------------------------------------------------- context


def _comparison(run: RunData, seed_table: Mapping[str, Any]) -> dict[str, Any]:
    by_k = {r["k"]: r for r in run.results}
    rows = []
    for s in sorted(seed_table.get("results", []), key=lambda r: r["k"]):
        r = by_k.get(int(s["k"]), {})
        rows.append({
            "k": s["k"],
            "in_run": bool(r),
            "inertia": (_fmt_big(s["inertia"]), _fmt_big(r.get("inertia")),
                        _delta(r.get("inertia"), s["inertia"], higher_is_better=False, pct=False, relative=True)),
            "homogeneity": (_fmt_num(s["homogeneity"]), _fmt_num(r.get("homogeneity")),
                            _delta(r.get("homogeneity"), s["homogeneity"], higher_is_better=True, pct=False,
                                   relative=False)),
            "accuracy": (_fmt_pct(s["accuracy_train"]), _fmt_pct(r.get("accuracy_train")),
                         _delta(r.get("accuracy_train"), s["accuracy_train"], higher_is_better=True, pct=True,
                                relative=False)),
        })
    seed_test = seed_table.get("test_accuracy_k256")
    return {
        "rows": rows,
        "source": seed_table.get("source", ""),
        "split": seed_table.get("split", ""),
        "note": seed_table.get("note", ""),
        "comparable": _seed_comparable(run.metrics.get("dataset", {})),
        "only_in_run": [k for k in by_k if k not in {int(s["k"]) for s in seed_table.get("results", [])}],
        "test_k256": (_fmt_pct(seed_test), _fmt_pct(by_k.get(256, {}).get("accuracy_test"))) if seed_test else None,
    }


def _timings(timings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    total = timings.get("total_s")
    steps = [(k, v) for k, v in timings.items() if k != "total_s"]
    scale = total if _is_num(total) and total > 0 else sum(v for _, v in steps if _is_num(v)) or 1.0
    rows = [{
        "name": k.removesuffix("_s").replace("_", " "),
        "text": _fmt_secs(v),
        "width": f"{min(100.0, max(0.0, 100.0 * v / scale)):.1f}" if _is_num(v) else "0",
    } for k, v in steps]
    return rows, _fmt_secs(total)


def build_context(
    run: RunData, figs: Sequence[ReportFigure], fig_notes: Iterable[str], seed_table: Mapping[str, Any]
) -> dict[str, Any]:
    """The template's variables: every number already formatted, every text left raw for the template to escape."""
    m = run.metrics
    dataset, cluster, timings = m.get("dataset", {}), m.get("cluster", {}), m.get("timings", {})
    manifest = run.manifest or {}
    best = next(r for r in run.results if r["k"] == run.best_k)
    rows = [{
        "k": r["k"],
        "best": r["k"] == run.best_k,
        "inertia": _fmt_big(r["inertia"]),
        "homogeneity": _fmt_num(r["homogeneity"]),
        "completeness": _fmt_num(r.get("completeness")),
        "v_measure": _fmt_num(r.get("v_measure")),
        "ari": _fmt_num(r["ari"]),
        "nmi": _fmt_num(r["nmi"]),
        "accuracy_train": _fmt_pct(r["accuracy_train"]),
        "accuracy_test": _fmt_pct(r["accuracy_test"]),
        "n_empty_clusters": _fmt_int(r.get("n_empty_clusters")),
        "epochs": _fmt_int(r.get("epochs")),
        "n_init": _fmt_int(r.get("n_init")),
        "fit_seconds": _fmt_secs(r.get("fit_seconds")),
    } for r in run.results]
    timing_rows, total = _timings(timings)
    shape = dataset.get("image_shape") or list(run.image_shape)
    data = manifest.get("data", {}) if isinstance(manifest.get("data"), dict) else {}
    md5 = data.get("md5") if isinstance(data.get("md5"), dict) else {}
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    job_name = m.get("job")
    if not isinstance(job_name, str) or not job_name:
        job_name = run.run_dir.name
    return {
        "job": job_name,
        "run_dir": str(run.run_dir),
        "started": _fmt_value(m.get("started_utc")),
        "best_k": run.best_k,
        "most_accurate": _most_accurate(run.results),
        "best": {"accuracy_test": _fmt_pct(best["accuracy_test"]), "accuracy_train": _fmt_pct(best["accuracy_train"]),
                 "ari": _fmt_num(best["ari"], 3), "nmi": _fmt_num(best["nmi"], 3)},
        "total_time": total,
        "cluster": {
            "scheduler": _fmt_value(cluster.get("scheduler")),
            "n_workers": _fmt_int(cluster.get("n_workers")),
            "threads": _fmt_int(cluster.get("threads")),
            "dashboard": _fmt_value(cluster.get("dashboard")),
            "rows": _flatten(cluster),
        },
        "dataset": {
            "store": _fmt_value(dataset.get("store", data.get("store"))),
            "n_train": _fmt_int(dataset.get("n_train")),
            "n_test": _fmt_int(dataset.get("n_test")),
            "n_classes": _fmt_int(dataset.get("n_classes", run.n_classes)),
            "image_shape": " × ".join(str(v) for v in shape),
            "md5": [(str(k), _fmt_value(v)) for k, v in md5.items()],
        },
        "rows": rows,
        "seed": _comparison(run, seed_table),
        "figures": figs,
        "figure_notes": [*fig_notes, *([run.centroid_note] if run.centroid_note else [])],
        "timings": timing_rows,
        "versions": [(str(k), _fmt_value(v)) for k, v in versions.items()],
        "manifest": _flatten({k: v for k, v in manifest.items() if k != "versions"}) if run.manifest is not None else None,
        "job_yaml": run.job_yaml,
        "has_performance": run.has_performance,
        "epoch_note": _fmt_value(m.get("inertia_per_epoch_note")) if m.get("inertia_per_epoch_note") else "",
        "version": mnist_kmeans.__version__,
    }


# ------------------------------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    # open(..., "xb") rather than mkstemp: the file gets the usual umask permissions, not 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("mnist_kmeans.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt variable is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(context: Mapping[str, Any]) -> str:
    """The report page for a context made by :func:`build_context`."""
    return _environment().get_template("report.html.j2").render(**context)


def render_report(run_dir: str | Path, final_timings: Callable[[], Mapping[str, Any]] | None = None) -> Path:
    """Render ``<run_dir>/report.html`` (and ``<run_dir>/figures/*.png``) from the run directory alone.

    Returns the path of the report. Raises :class:`~mnist_kmeans.errors.UserError` when a required file is
    missing or malformed; nothing is written in that case.
    """
    run = load_run(run_dir)
    seed_table = load_seed_table()
    figs, notes = build_figures(run, seed_table)
    return write_report(run, figs, notes, seed_table, final_timings)


def write_report(
    run: RunData,
    figs: Sequence[ReportFigure],
    notes: Iterable[str],
    seed_table: Mapping[str, Any],
    final_timings: Callable[[], Mapping[str, Any]] | None = None,
) -> Path:
    """Write the figures and ``report.html`` of ``run``; returns the path of the report.

    ``final_timings``, if given, is called just before the page is rendered and returns the timings it shows instead
    of those ``run`` was loaded with: ``run`` uses it to show the report's own time and the total.
    """
    if final_timings is not None:
        run = dataclasses.replace(run, metrics={**run.metrics, "timings": dict(final_timings())})
    html = render_html(build_context(run, figs, notes, seed_table))
    fig_dir = run.run_dir / "figures"
    try:
        fig_dir.mkdir(exist_ok=True)
        for fig in figs:
            _write_atomic(fig_dir / f"{fig.name}.png", fig.png)
        out = run.run_dir / "report.html"
        _write_atomic(out, html.encode("utf-8"))
    except OSError as exc:
        raise UserError(f"{exc.filename or run.run_dir}: cannot write the report: {exc.strerror or exc}") from None
    return out


def _most_accurate(results: list[dict]) -> dict[str, Any]:
    """The K with the highest test accuracy: what a reader who wants a classifier looks for."""
    top = max(results, key=lambda r: (r["accuracy_test"], -r["k"]))
    return {"k": top["k"], "accuracy_test": _fmt_pct(top["accuracy_test"])}
