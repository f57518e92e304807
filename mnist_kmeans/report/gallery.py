"""The report's figures in reading order, each with its title, caption and alternative text: :func:`build_figures`.

One step per figure turns a :class:`~mnist_kmeans.report.rundir.RunData` into the arguments of a drawing function
of :mod:`mnist_kmeans.report.figures` and the words around it; a figure the run has no data for becomes a note
that the page shows instead. Where the run is on the seed notebook's data (full MNIST, told by its md5 sums:
:mod:`.identity`), the seed's published values are drawn beside the run's. Titles and captions word the data as
it is: digits on MNIST, else images, each class by its name when the store named them. The drawing itself is
left to a ``draw`` callable, so that a caller may draw the figures on a cluster's workers at once.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_kmeans.report import figures
from mnist_kmeans.report.formatting import fmt_pct
from mnist_kmeans.report.identity import DataIdentity
from mnist_kmeans.report.rundir import RunData
from mnist_kmeans.report.values import is_int, is_num

Draw = Callable[..., Any]
"""``draw(fn, *args, **kwargs)``: what stands in for the call ``fn(*args, **kwargs)`` of a figure function."""

SeedRows = Mapping[int, Mapping[str, Any]]
"""The seed notebook's table by K, given only when the run is comparable with it."""


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
        """The PNG as a ``data:`` URI, for the ``src`` of its ``<img>``."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def size(self) -> tuple[int, int]:
        """Width and height of the PNG in pixels, from its IHDR chunk."""
        return struct.unpack(">II", self.png[16:24])


def confusion_from_contingency(
    contingency: np.ndarray, label_map: Sequence[int | None], n_classes: int
) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix (true class x predicted label) implied by a per-cluster contingency table.

    ``contingency[cluster, true_class]`` counts rows; each cluster predicts ``label_map[cluster]``. Rows in
    unmapped clusters (``None``) go to a last "none" column, which exists only when such rows exist.
    Returns the matrix and the names of its columns.
    """
    cont = np.asarray(contingency, dtype=np.int64)
    matrix = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    for cluster, label in enumerate(label_map):
        matrix[:, n_classes if label is None else label] += cont[cluster]
    names = [str(c) for c in range(n_classes)]
    if matrix[:, n_classes].sum() == 0:
        return matrix[:, :n_classes], names
    return matrix, names + ["none"]


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _column(run: RunData, key: str) -> list[Any]:
    return [r[key] for r in run.results]


def _seed_note(seed: SeedRows | None) -> str:
    return " Dashed: the seed notebook's published values." if seed is not None else ""


# ------------------------------------------------------------------------------------- one step per figure
# Each step returns its figure, or the note the page shows instead when the run has nothing to draw.


def _names(run: RunData) -> list[str] | None:
    """The class names to title images with, when the store named its classes."""
    names = run.identity.class_names
    return list(names) if names is not None else None


def _training_digits(run: RunData, draw: Draw) -> ReportFigure | str:
    images, labels = run.train_first
    noun = run.identity.noun
    if not len(images):
        return f"samples.zarr holds no training {noun}s to show."
    titles = [run.identity.title(c) for c in range(run.n_classes)]
    how = "'Number' and its label" if titles[0].startswith("Number ") else "with its class"
    return ReportFigure(
        "training_digits",
        f"The first {len(images)} training {noun}s",
        "The first rows of the training split with their true labels, as the seed notebook shows them.",
        f"Grid of the first training {noun}s, each titled {how}.",
        draw(figures.training_digits, images, labels, titles=titles),
    )


def _inertia_vs_k(run: RunData, seed: SeedRows | None, draw: Draw) -> ReportFigure:
    return ReportFigure(
        "inertia_vs_k",
        "Inertia against K",
        "Sum over all training rows of the squared distance to the nearest centroid (pixels scaled to [0, 1]). "
        "It falls as K grows whatever the data; a bend (“elbow”) hints at a natural number of clusters."
        + _seed_note(seed),
        "Line chart of inertia against K.",
        draw(
            figures.inertia_vs_k,
            _column(run, "k"),
            _column(run, "inertia"),
            seed={k: r["inertia"] for k, r in seed.items()} if seed is not None else None,
        ),
    )


def _scores_vs_k(run: RunData, seed: SeedRows | None, draw: Draw) -> ReportFigure:
    scores = [_column(run, key) for key in ("homogeneity", "accuracy_train", "accuracy_test", "ari", "nmi")]
    return ReportFigure(
        "scores_vs_k",
        "Homogeneity and accuracy against K",
        "Left, the seed notebook's view: homogeneity and accuracy (each cluster votes for the most frequent label of "
        "its training rows) rise with K by construction — with one cluster per row both reach 100 % — so they show "
        f"how well clusters separate {run.identity.noun}s by class, not which K is best. Right: ARI and NMI on the "
        "training split, which do not reward extra clusters for free and are fair across K." + _seed_note(seed),
        "Two line charts: homogeneity and train and test accuracy against K; ARI and NMI against K.",
        draw(
            figures.scores_vs_k,
            _column(run, "k"),
            *scores,
            seed={k: (r["homogeneity"], r["accuracy_train"]) for k, r in seed.items()} if seed is not None else None,
        ),
    )


# The panels of the "Choosing K" figure: each criterion's key in metrics.json and its k_selection key.
SELECTION_PANELS = {
    "Inertia (knee)": ("inertia", "inertia_knee"),
    "Calinski–Harabasz (higher is better)": ("calinski_harabasz", "calinski_harabasz"),
    "Davies–Bouldin (lower is better)": ("davies_bouldin", "davies_bouldin"),
    "Silhouette on a sample (higher is better)": ("silhouette_sample", "silhouette_sample"),
}


def _number(value: Any) -> float | None:
    return float(value) if is_num(value) else None


def _selection_vs_k(run: RunData, draw: Draw) -> ReportFigure | str:
    selection = run.metrics.get("k_selection")
    if not isinstance(selection, dict):
        return "metrics.json holds no 'k_selection' (a run made before the label-free criteria): no “Choosing K”."
    return ReportFigure(
        "selection_vs_k",
        "Label-free criteria against K",
        "Each criterion of the “Choosing K” section against K, computed without the labels; the K it chooses ringed "
        "in red (for inertia, the knee of the curve).",
        "Four line charts against K: inertia, Calinski–Harabasz, Davies–Bouldin and the sampled silhouette.",
        draw(
            figures.selection_vs_k,
            _column(run, "k"),
            {title: [_number(r.get(key)) for r in run.results] for title, (key, _) in SELECTION_PANELS.items()},
            {title: selection.get(choice) for title, (_, choice) in SELECTION_PANELS.items()},
        ),
    )


def _coverage(label_map: Sequence[int | None], n_classes: int, identity: DataIdentity) -> str:
    """The sentences under a centroid grid: which classes no centroid stands for, how many clusters are empty."""
    covered = {v for v in label_map if v is not None}
    missing = [c for c in range(n_classes) if c not in covered]
    n_empty = sum(v is None for v in label_map)
    detail = (
        f" No centroid stands for class {', '.join(map(identity.label, missing))}."
        if missing
        else f" Every one of the {n_classes} classes has at least one centroid."
    )
    if n_empty:
        detail += f" {n_empty} cluster{'s' if n_empty > 1 else ''} received no training rows (“none”)."
    return detail


def _centroid_grids(run: RunData, draw: Draw) -> list[ReportFigure]:
    names = _names(run)
    how, alt = (
        ("with the name of its inferred class", "with its inferred class")
        if names
        else ("“Inferred label: d”", "'Inferred label' and its label")
    )
    return [
        ReportFigure(
            f"centroids_k{k}",
            f"The K={k} centroids",
            f"Each centroid drawn as an image and titled {how}, the most frequent true label of the "
            f"training rows nearest to it.{_coverage(run.label_maps[k], run.n_classes, run.identity)}",
            f"Grid of the {k} centroid images, each titled {alt}.",
            draw(figures.centroid_grid, centroids, run.label_maps[k], run.image_shape, names=names),
        )
        for k, centroids in run.centroids.items()
    ]


def _confusion(run: RunData, draw: Draw) -> ReportFigure:
    n_classes, best_k = run.n_classes, run.best_k
    matrix, pred_names = confusion_from_contingency(run.test_contingency, run.label_maps[best_k], n_classes)
    total = int(matrix.sum())
    correct = int(np.trace(matrix[:, :n_classes]))
    unmapped = int(matrix[:, n_classes].sum()) if len(pred_names) > n_classes else 0
    return ReportFigure(
        f"confusion_test_k{best_k}",
        f"Confusion matrix of the test split, K={best_k}",
        f"Rows: true label; columns: the inferred label of the cluster each test row falls in (label map learned on "
        f"the training split only). {correct:,} of {total:,} test rows are right "
        f"({fmt_pct(correct / total if total else float('nan'))})."
        + (f" {unmapped:,} rows fall in clusters without a label (column “none”)." if unmapped else "")
        + " Cells are shaded by their share of the row.",
        f"Confusion matrix of the test split for K={best_k}.",
        draw(
            figures.confusion_matrix,
            matrix,
            [run.identity.label(c) for c in range(n_classes)],
            [run.identity.label(c) for c in range(n_classes)] + pred_names[n_classes:],
            title=f"Test split, K={best_k}",
        ),
    )


def _misclassified(run: RunData, draw: Draw) -> ReportFigure | str:
    images, true, pred, k = run.misclassified
    noun = run.identity.noun
    if not len(images):
        return f"No misclassified test {noun}s to show."
    return ReportFigure(
        "misclassified",
        f"Misclassified test {noun}s",
        f"The first {len(images)} test {noun}s whose cluster's inferred label is wrong at K={k or run.best_k}, "
        "titled “true → predicted”.",
        f"Grid of misclassified test {noun}s with their true and predicted labels.",
        draw(figures.misclassified_gallery, images, true, pred, names=_names(run)),
    )


def _common_epochs(results: Sequence[Mapping[str, Any]]) -> int | None:
    """The number of mini-batch epochs when every K ran the same number, else None."""
    values = {r.get("epochs") for r in results}
    return values.pop() if len(values) == 1 and is_int(next(iter(values))) else None


def _inertia_per_epoch(run: RunData, draw: Draw) -> ReportFigure | str:
    curves = {r["k"]: r["inertia_per_epoch"] for r in run.results if r.get("inertia_per_epoch")}
    if not curves:
        return "metrics.json holds no 'inertia_per_epoch' for any K."
    how = run.metrics.get("inertia_per_epoch_note")
    return ReportFigure(
        "inertia_per_epoch",
        "Inertia per epoch",
        "Training inertia after each epoch, one line per K; right, the same relative to the last epoch, so "
        "convergence reads on one scale for every K." + (f" Measured: {how}." if isinstance(how, str) else ""),
        "Line charts of inertia after each epoch for every K.",
        draw(figures.inertia_per_epoch, curves, epochs=_common_epochs(run.results)),
    )


# ---------------------------------------------------------------------------------------------- all of them


def build_figures(
    run: RunData, seed_table: Mapping[str, Any], draw: Draw | None = None
) -> tuple[list[ReportFigure], list[str]]:
    """All figures of the report, in reading order, and notes about figures that could not be drawn.

    Parameters
    ----------
    run : RunData
        The run directory, as :func:`~mnist_kmeans.report.rundir.load_run` read it.
    seed_table : mapping
        The seed notebook's table (:func:`mnist_kmeans.reference.load_seed_table`), drawn dashed when the run is on
        the seed's data set.
    draw : callable, default=None
        Called as ``draw(fn, *args, **kwargs)`` instead of each figure function ``fn(*args, **kwargs)``: e.g.
        ``Client.submit``, to draw the figures on a cluster's workers at once. Each figure's ``png`` is then what
        ``draw`` returned (a future), for the caller to resolve.
    """
    draw = draw or _call
    seed_rows = {int(r["k"]): r for r in seed_table.get("results", [])}
    seed = seed_rows if run.identity.comparable else None
    steps = (
        _training_digits(run, draw),
        _inertia_vs_k(run, seed, draw),
        _scores_vs_k(run, seed, draw),
        _selection_vs_k(run, draw),
        *_centroid_grids(run, draw),
        _confusion(run, draw),
        _misclassified(run, draw),
        _inertia_per_epoch(run, draw),
    )
    figs = [made for made in steps if isinstance(made, ReportFigure)]
    notes = [made for made in steps if isinstance(made, str)]
    return figs, notes
