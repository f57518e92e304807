"""The report's figures: plain data in, PNG bytes out, one function per figure.

Every function builds its own :class:`matplotlib.figure.Figure` on the Agg canvas and never touches
``matplotlib.pyplot``: no global figure registry, no GUI backend, safe to call from any thread.

Image grids (training digits, centroids, misclassified digits) are rasterised directly into one image, with
each distinct title rendered once by Agg, rather than one Axes per tile: a 256-centroid grid then renders in tens
of milliseconds instead of seconds.

The last two figures are the comparison page's (``mnist-kmeans compare``): several runs in one figure, run ``i``
in :func:`run_color` ``(i)`` on every figure and in the page's tables.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator, NullLocator, PercentFormatter
from PIL import Image

DPI = 100
# A small palette that stays readable in print and for common colour-vision deficiencies (Okabe-Ito).
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#8C8C8C"
INK, MUTED, FRAME = "#1f2328", "#57606a", "#d0d7de"
_FRAME_RGB = np.array([int(FRAME[i : i + 2], 16) / 255.0 for i in (1, 3, 5)])


# --------------------------------------------------------------------------------------------------- helpers


def _figure(width_in: float, height_in: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)  # attaches itself to fig
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" metadata: the same data gives the same bytes, whatever matplotlib version wrote it.
    fig.savefig(buf, format="png", facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _style(ax, *, grid_axis: str = "y") -> None:
    """Quiet axes: no top/right spines, a light grid behind the data."""
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(MUTED)
    ax.tick_params(colors=MUTED, labelcolor=INK, labelsize=9)
    ax.grid(True, axis=grid_axis, color="#eaeef2", linewidth=0.8)
    ax.set_axisbelow(True)


def _k_axis(ax, ks: Sequence[int]) -> None:
    """K on a log axis (the grid is roughly geometric) with a tick at every K of the run."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("K, number of clusters (log scale)", color=INK, fontsize=10)


def _as_unit_images(images: np.ndarray, image_shape: Sequence[int] | None = None) -> np.ndarray:
    """Images as float (n, H, W) in [0, 1]: uint8 is divided by 255, flat rows are reshaped."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        if image_shape is None:
            raise ValueError("flat image rows need image_shape")
        arr = arr.reshape(arr.shape[0], int(image_shape[0]), int(image_shape[1]))
    if arr.ndim != 3:
        raise ValueError(f"expected images of shape (n, H, W), got {arr.shape}")
    out = arr.astype(np.float64)
    if arr.dtype == np.uint8:
        out /= 255.0
    return np.clip(out, 0.0, 1.0)


@lru_cache(maxsize=256)
def _text_bitmap(text: str, fontsize: float, color: str, dpi: int) -> np.ndarray:
    """``text`` rendered once by Agg: a tight float RGBA array (straight alpha). Cached: grids repeat few titles."""
    fig = Figure(figsize=(8, 2), dpi=dpi)
    fig.patch.set_alpha(0.0)
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, text, ha="center", va="center", ma="center", fontsize=fontsize, color=color, linespacing=1.1)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float64) / 255.0
    rows, cols = np.nonzero(rgba[..., 3] > 0)
    if rows.size == 0:
        return np.zeros((1, 1, 4))
    out = rgba[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].copy()
    out.flags.writeable = False  # shared through the cache
    return out


def _paste(canvas: np.ndarray, bitmap: np.ndarray, cx: int, bottom: int) -> None:
    """Alpha-blend ``bitmap`` onto ``canvas`` (float RGB), centred on column ``cx``, its last row at ``bottom - 1``."""
    bh, bw = bitmap.shape[:2]
    y0, x0 = max(0, bottom - bh), max(0, cx - bw // 2)
    y1, x1 = min(canvas.shape[0], y0 + bh), min(canvas.shape[1], x0 + bw)
    part = bitmap[: y1 - y0, : x1 - x0]
    alpha = part[..., 3:4]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1.0 - alpha) + part[..., :3] * alpha


def _mosaic(
    images: np.ndarray,
    titles: Sequence[str],
    colors: Sequence[str],
    *,
    ncols: int,
    tile_in: float,
    fontsize: float,
    dpi: int,
    title_lines: int = 1,
) -> bytes:
    """A grid of grey-scale tiles (dark ink on white, like the seed's ``cmap=binary``), each with a title above.

    ``images`` is float (n, H, W) in [0, 1]. ``tile_in`` is the printed width of one tile in inches;
    ``title_lines`` the number of lines a title may take.

    Rasterised directly with numpy (tiles scaled by a whole factor, so pixels stay square and crisp) and each
    distinct title drawn once by Agg: a 256-tile grid takes tens of milliseconds instead of seconds of text layout.
    """
    n_tiles, height, width = images.shape
    ncols = max(1, min(ncols, n_tiles))
    nrows = max(1, math.ceil(n_tiles / ncols))
    scale = max(1, round(tile_in * dpi / width))  # output pixels per image pixel
    tile_h, tile_w = height * scale, width * scale
    pad = max(3, round(0.12 * tile_w))
    band = math.ceil((fontsize * 1.3 * title_lines + 5) * dpi / 72)  # room for the title above each tile
    cell_w, cell_h = tile_w + 2 * pad, band + tile_h + pad
    top = pad  # a margin above the first row of titles
    canvas = np.ones((top + nrows * cell_h + pad, ncols * cell_w, 3), dtype=np.float64)
    gap = max(2, round(2.5 * dpi / 72))
    for i in range(n_tiles):
        row, col = divmod(i, ncols)
        y0, x0 = top + row * cell_h + band, col * cell_w + pad
        _put_tile(canvas, images[i], y0, x0, scale)
        if i < len(titles):
            _paste(canvas, _text_bitmap(titles[i], float(fontsize), colors[i], dpi), x0 + tile_w // 2, y0 - gap)
    return _rgb_png(canvas, dpi)


def _put_tile(canvas: np.ndarray, image: np.ndarray, y0: int, x0: int, scale: int) -> None:
    """``image`` (float (H, W) in [0, 1]) as dark ink on white at row ``y0``, column ``x0``, each pixel
    ``scale`` x ``scale``, with a 1-pixel frame just outside it."""
    tile = 1.0 - np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    tile_h, tile_w = tile.shape
    canvas[y0 - 1 : y0 + tile_h + 1, x0 - 1 : x0 + tile_w + 1] = _FRAME_RGB
    canvas[y0 : y0 + tile_h, x0 : x0 + tile_w] = tile[..., None]


def _cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis: a title must not run into the next tile."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _wrap(text: str, width: int) -> str:
    """``text`` on at most two lines of about ``width`` characters (a class name as a tile's title)."""
    return "\n".join(textwrap.wrap(text, width, max_lines=2, placeholder="\u2026", break_on_hyphens=False)) or text


def _rgb_png(canvas: np.ndarray, dpi: int) -> bytes:
    """A float RGB array in [0, 1] as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.round(canvas * 255.0).astype(np.uint8), mode="RGB").save(buf, format="png", dpi=(dpi, dpi))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the figures


def training_digits(
    images: np.ndarray, labels: Sequence[int], *, titles: Sequence[str] | None = None, dpi: int = DPI
) -> bytes:
    """(a) The first training images (up to nine) in a 3x3 grid, each titled "Number d" as in the seed notebook.

    ``images``: uint8 or [0, 1] float, shape (n, H, W); ``labels``: the n true labels; ``titles``: the title of
    each class by label (e.g. its name), instead of "Number d".
    """
    imgs = _as_unit_images(images)[:9]
    shown = list(labels)[: len(imgs)]
    names = [titles[int(v)] if titles is not None else f"Number {int(v)}" for v in shown]
    names = [_wrap(name, 16) for name in names]
    lines = max((name.count("\n") + 1 for name in names), default=1)
    return _mosaic(imgs, names, [INK] * len(names), ncols=3, tile_in=1.4, fontsize=11, dpi=dpi, title_lines=lines)


def inertia_vs_k(
    ks: Sequence[int],
    inertia: Sequence[float],
    *,
    seed: Mapping[int, float] | None = None,
    dpi: int = DPI,
) -> bytes:
    """(b) Inertia (sum of squared distances to the nearest centroid, training split) against K.

    ``seed``: optional {K: inertia} of the seed notebook, drawn dashed for comparison (only meaningful on the
    same data set, so the caller decides whether to pass it).
    """
    fig = _figure(7.6, 4.2, dpi)
    ax = fig.add_subplot()
    _style(ax)
    ax.plot(ks, inertia, marker="o", color=BLUE, linewidth=2, label="this run")
    if seed:
        sk = sorted(seed)
        ax.plot(sk, [seed[k] for k in sk], marker="s", linestyle="--", color=GREY, label="seed notebook")
        ax.legend(frameon=False, fontsize=9)
    _k_axis(ax, sorted(set(ks) | set(seed or ())))
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylabel("inertia (training split)", color=INK, fontsize=10)
    ax.set_title("Inertia of each K", loc="left", fontsize=12, color=INK)
    fig.tight_layout()
    return _png(fig)


def scores_vs_k(
    ks: Sequence[int],
    homogeneity: Sequence[float],
    accuracy_train: Sequence[float],
    accuracy_test: Sequence[float],
    ari: Sequence[float],
    nmi: Sequence[float],
    *,
    seed: Mapping[int, tuple[float, float]] | None = None,
    dpi: int = DPI,
) -> bytes:
    """(c) Homogeneity and accuracy (train, test) against K, beside ARI and NMI.

    Left: the seed notebook's view. Homogeneity and majority-vote accuracy rise with K by construction (K = number
    of rows would score 1.0), so they do not pick a K. Right: ARI and NMI, which do not reward more clusters for
    free and are fair across K. ``seed``: optional {K: (homogeneity, train accuracy)} drawn dashed.
    """
    fig = _figure(11.0, 4.3, dpi)
    left, right = fig.subplots(1, 2, sharey=True)
    for ax in (left, right):
        _style(ax)
        _k_axis(ax, sorted(set(ks) | set(seed or ())))
        ax.set_ylim(0, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    _homogeneity_panel(left, ks, homogeneity, accuracy_train, accuracy_test, seed)
    _agreement_panel(right, ks, ari, nmi)
    fig.tight_layout()
    return _png(fig)


def _homogeneity_panel(
    ax,
    ks: Sequence[int],
    homogeneity: Sequence[float],
    accuracy_train: Sequence[float],
    accuracy_test: Sequence[float],
    seed: Mapping[int, tuple[float, float]] | None,
) -> None:
    """The left panel of :func:`scores_vs_k`: the scores that rise with K by construction."""
    ax.plot(ks, homogeneity, marker="o", color=BLUE, linewidth=2, label="homogeneity")
    ax.plot(ks, accuracy_train, marker="^", color=ORANGE, linewidth=2, label="accuracy, train")
    ax.plot(ks, accuracy_test, marker="v", color=RED, linewidth=2, label="accuracy, test")
    if seed:
        sk = sorted(seed)
        ax.plot(sk, [seed[k][0] for k in sk], linestyle="--", color=BLUE, alpha=0.5, label="seed homogeneity")
        ax.plot(sk, [seed[k][1] for k in sk], linestyle="--", color=ORANGE, alpha=0.5, label="seed accuracy, train")
    _panel_note(ax, "both rise with K by construction")
    # pad leaves a line between the title and the note under it
    ax.set_title("Homogeneity and accuracy", loc="left", fontsize=12, color=INK, pad=16)
    ax.legend(frameon=False, fontsize=9, loc="best")


def _panel_note(ax, text: str) -> None:
    """A muted italic note just above a panel, under its title."""
    ax.text(0, 1.01, text, transform=ax.transAxes, fontsize=9, color=MUTED, style="italic", va="bottom")


def _agreement_panel(ax, ks: Sequence[int], ari: Sequence[float], nmi: Sequence[float]) -> None:
    """The right panel of :func:`scores_vs_k`: ARI and NMI, fair across K."""
    ax.plot(ks, ari, marker="o", color=GREEN, linewidth=2, label="adjusted Rand index (ARI)")
    ax.plot(ks, nmi, marker="s", color=PURPLE, linewidth=2, label="normalized mutual information (NMI)")
    ax.set_title("ARI and NMI", loc="left", fontsize=12, color=INK, pad=16)
    _panel_note(ax, "fair across K: more clusters are not rewarded for free")
    ax.legend(frameon=False, fontsize=9, loc="best")


def selection_vs_k(
    ks: Sequence[int],
    curves: Mapping[str, Sequence[float | None]],
    chosen: Mapping[str, int | None],
    *,
    dpi: int = DPI,
) -> bytes:
    """(h) The label-free criteria against K, one panel each (inertia, Calinski-Harabasz, Davies-Bouldin, silhouette
    on a sample), the K each chooses ringed (the knee, for inertia).

    ``curves``: {panel title: one value per K, None where undefined}; ``chosen``: {panel title: K or None}.
    """
    fig = _figure(11.0, 6.4, dpi)
    axes = fig.subplots(2, 2).ravel()
    colors = (BLUE, GREEN, ORANGE, PURPLE)
    for ax, color, (title, values) in zip(axes, colors, curves.items(), strict=False):
        _style(ax)
        ys = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        ax.plot(ks, ys, marker="o", color=color, linewidth=2)
        k = chosen.get(title)
        if k is not None and k in ks:
            ax.plot([k], [ys[list(ks).index(k)]], marker="o", markersize=14, markerfacecolor="none", color=RED)
            _panel_note(ax, f"chooses K={k}")
        else:
            _panel_note(ax, "no knee" if "knee" in title else "chooses no K")
        _k_axis(ax, ks)
        ax.set_title(title, loc="left", fontsize=12, color=INK, pad=16)
    fig.tight_layout()
    return _png(fig)


def centroid_grid(
    centroids: np.ndarray,
    labels: Sequence[int | None],
    image_shape: Sequence[int],
    *,
    names: Sequence[str] | None = None,
    dpi: int = DPI,
) -> bytes:
    """(d) The K centroid images, each titled "Inferred label: d" ("Inferred label: none" for an unmapped cluster),
    or with the name of its inferred class when ``names`` (one per label) are given.

    ``centroids``: (K, H*W) or (K, H, W), pixel scale [0, 1]; ``labels``: the label map, one entry per centroid.
    The grid is about square (6x6 for K=36, 16x16 for K=256).
    """
    imgs = _as_unit_images(centroids, image_shape)
    k = len(imgs)
    if len(labels) != k:
        raise ValueError(f"{k} centroids but {len(labels)} labels")
    colors = [GREY if v is None else BLUE for v in labels]  # the seed titles its centroids in blue
    ncols = math.ceil(math.sqrt(k))
    # Fit the grid into about 11.5 in (the report's column at 100 dpi), tiles at most 1.25 in. Narrow tiles
    # cannot hold "Inferred label: 7" on one line at a legible size, so they break it after "Inferred".
    tile_in = min(1.25, 11.5 / (ncols * 1.24))
    one_line = tile_in >= 0.85
    sep = " " if one_line else "\n"
    if names is not None:  # named classes: the name alone, on up to two lines
        titles = ["none" if v is None else _wrap(names[int(v)], 14 if one_line else 9) for v in labels]
        one_line = all("\n" not in t for t in titles)
    else:
        titles = [f"Inferred{sep}label: {'none' if v is None else int(v)}" for v in labels]
    fontsize = min(9.5, 9.0 * tile_in) if one_line else min(8.5, 14.0 * tile_in)
    return _mosaic(
        imgs, titles, colors, ncols=ncols, tile_in=tile_in, fontsize=fontsize, dpi=dpi, title_lines=1 if one_line else 2
    )


def confusion_matrix(
    counts: np.ndarray,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    *,
    title: str = "Confusion matrix, test split",
    dpi: int = DPI,
) -> bytes:
    """(e) A confusion matrix: rows are true classes, columns predicted labels, cells hold row counts.

    Cells are shaded by their share of the true class's rows, so a class's recall reads as the darkness of its
    diagonal cell whatever the class sizes. Counts are written in the cells while the matrix is small enough.
    """
    matrix = np.asarray(counts, dtype=np.int64)
    n_true, n_pred = matrix.shape
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(9.0, max(4.5, 0.55 * max(n_true, n_pred) + 1.8))
    fig = _figure(side + 0.9, side, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", norm=Normalize(0.0, 1.0), interpolation="nearest", aspect="equal")
    ax.set_xticks(range(n_pred))
    # names longer than a digit or two would overlap side by side: slant them
    slant = max((len(n) for n in pred_names), default=0) > 4
    ax.set_xticklabels(list(pred_names), fontsize=9, rotation=40 if slant else 0, ha="right" if slant else "center")
    ax.set_yticks(range(n_true))
    ax.set_yticklabels(list(true_names), fontsize=9)
    ax.set_xlabel("predicted label (the cluster's inferred label)", color=INK, fontsize=10)
    ax.set_ylabel("true label", color=INK, fontsize=10)
    ax.xaxis.set_ticks_position("bottom")
    ax.tick_params(length=0, labelcolor=INK)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if max(n_true, n_pred) <= 20:
        _write_counts(ax, matrix, share)
    _share_colorbar(fig, ax, im)
    ax.set_title(title, loc="left", fontsize=12, color=INK)
    fig.tight_layout()
    return _png(fig)


def _write_counts(ax, matrix: np.ndarray, share: np.ndarray) -> None:
    """Each non-zero count in its cell, white on the dark cells."""
    n_true, n_pred = matrix.shape
    fontsize = 8 if max(n_true, n_pred) > 12 else 9
    for i in range(n_true):
        for j in range(n_pred):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if share[i, j] > 0.55 else INK,
                )


def _share_colorbar(fig: Figure, ax, image) -> None:
    """The colour bar of a confusion matrix: the share of the true class's rows, in percent."""
    cbar = fig.colorbar(image, ax=ax, fraction=0.045, pad=0.03, format=PercentFormatter(xmax=1.0, decimals=0))
    cbar.ax.tick_params(labelsize=8, colors=MUTED, labelcolor=INK)
    cbar.set_label("share of the true class's rows", fontsize=9, color=INK)
    cbar.outline.set_visible(False)


def misclassified_gallery(
    images: np.ndarray,
    true: Sequence[int],
    pred: Sequence[int | None],
    *,
    names: Sequence[str] | None = None,
    dpi: int = DPI,
) -> bytes:
    """(f) Misclassified test images, each titled with its true label and the label the clustering gave it.

    ``images``: uint8 or [0, 1] float (n, H, W); ``pred`` entries may be ``None`` (the row fell in an unmapped
    cluster); ``names``: one per label, shown instead of the labels, on two lines ("Coat" over "→ Shirt").
    """
    imgs = _as_unit_images(images)
    pairs = list(zip(true, pred, strict=False))
    if names is None:
        titles = [f"true {int(t)} \u2192 {'none' if p is None else int(p)}" for t, p in pairs]
    else:
        titles = [
            f"{_cut(names[int(t)], 14)}\n\u2192 {_cut('none' if p is None else names[int(p)], 12)}" for t, p in pairs
        ]
    lines = 1 if names is None else 2
    return _mosaic(imgs, titles, [RED] * len(titles), ncols=8, tile_in=1.1, fontsize=9, dpi=dpi, title_lines=lines)


def inertia_per_epoch(curves: Mapping[int, Sequence[float]], *, epochs: int | None = None, dpi: int = DPI) -> bytes:
    """(g) Inertia after each pass over the training data, one line per K: absolute (left) and relative to the
    last pass (right).

    ``curves``: {K: [inertia after pass 1, after pass 2, ...]}. The right panel shows how far each pass was from
    the final model, which makes the convergence of all K comparable on one scale. ``epochs``: the number of
    mini-batch epochs; when a curve is longer (later passes were refinement steps of another kind), a dotted line
    marks where the epochs end.
    """
    fig = _figure(11.0, 4.2, dpi)
    left, right = fig.subplots(1, 2)
    ks = sorted(curves)
    n_max = _plot_curves(left, right, curves)
    extended = epochs is not None and n_max > epochs
    for ax in (left, right):
        _pass_axis(ax, n_max, epochs if extended else None)
    left.yaxis.set_major_formatter(EngFormatter(sep=""))
    left.set_ylabel("inertia (training split)", color=INK, fontsize=10)
    left.set_title(f"Inertia after each {'pass' if extended else 'epoch'}", loc="left", fontsize=12, color=INK)
    right.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))
    right.set_ylabel("above the last value", color=INK, fontsize=10)
    right.set_title("Relative to the last value", loc="left", fontsize=12, color=INK)
    right.legend(frameon=False, fontsize=8, ncols=2 if len(ks) > 4 else 1, loc="upper right")
    fig.tight_layout()
    return _png(fig)


def _plot_curves(left, right, curves: Mapping[int, Sequence[float]]) -> int:
    """Each K's inertia after each pass on ``left``, relative to its last one on ``right``; returns the most passes."""
    ks = sorted(curves)
    colors = colormaps["viridis"](np.linspace(0.0, 0.85, max(len(ks), 1)))
    n_max = 1
    for color, k in zip(colors, ks, strict=False):  # one colour even for no curve
        ys = np.asarray(curves[k], dtype=np.float64)
        if ys.size == 0:
            continue
        xs = np.arange(1, ys.size + 1)
        n_max = max(n_max, ys.size)
        marker = {"marker": "o", "markersize": 4} if ys.size <= 30 else {}
        left.plot(xs, ys, color=color, linewidth=1.8, label=f"K={k}", **marker)
        rel = ys / ys[-1] - 1.0 if ys[-1] else np.zeros_like(ys)
        right.plot(xs, rel, color=color, linewidth=1.8, label=f"K={k}", **marker)
    return n_max


def _pass_axis(ax, n_max: int, epochs: int | None) -> None:
    """Whole passes 1..``n_max`` on the x axis; ``epochs``, when given, marks where the epochs end."""
    _style(ax, grid_axis="both")
    ax.set_xlabel("pass over the training split" if epochs is not None else "epoch", color=INK, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.7, n_max + 0.3)
    if epochs is not None:
        ax.axvline(epochs + 0.5, color=GREY, linestyle=":", linewidth=1.2)
        ax.text(
            epochs + 0.6, 1.0, "after the epochs", transform=ax.get_xaxis_transform(), fontsize=8, color=MUTED, va="top"
        )


# ------------------------------------------------------------------------------------------- runs compared

_RUN_COLORS = (BLUE, ORANGE, GREEN, RED, PURPLE, GREY, "#56B4E9", "#F0E442")
_RUN_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
_LEGEND_IN = 0.45  # inches above the panels for the runs' legend


def run_color(index: int) -> str:
    """The colour of the run at ``index`` (from 0) on the comparison page: its lines and its swatch in the tables."""
    return _RUN_COLORS[index % len(_RUN_COLORS)]


@dataclass(frozen=True)
class Panel:
    """One panel of :func:`runs_vs_k`: its title and, per run label, ``{K: value}`` (a run absent: no line)."""

    title: str
    lines: Mapping[str, Mapping[int, float]]
    percent: bool = False  # the values are fractions, shown as percentages


def runs_vs_k(panels: Sequence[Panel], runs: Sequence[str], *, ncols: int = 3, dpi: int = DPI) -> bytes:
    """Small multiples against K (log scale): one panel per metric, one line per run, the runs' legend once on top.

    ``runs``: the run labels in page order; run ``i`` is drawn in :func:`run_color` ``(i)``. Non-finite values are
    left out of their line.
    """
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    height = 2.9 * nrows + _LEGEND_IN
    fig = _figure(3.8 * ncols, height, dpi)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    ks = sorted({k for panel in panels for line in panel.lines.values() for k in line})
    for ax, panel in zip(axes, panels, strict=False):
        _run_lines(ax, panel, runs)
        _k_axis(ax, ks)
        ax.set_xlabel("K (log scale)", color=INK, fontsize=9)
        ax.set_title(panel.title, loc="left", fontsize=10.5, color=INK)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    _runs_legend(fig, axes[0], len(runs))
    fig.tight_layout(rect=(0, 0, 1, 1 - _LEGEND_IN / height))
    return _png(fig)


def _run_lines(ax, panel: Panel, runs: Sequence[str]) -> None:
    """Each run's line of ``panel`` on ``ax``, with the y axis formatted for its values."""
    _style(ax, grid_axis="both")
    values = []
    for i, label in enumerate(runs):
        line = panel.lines.get(label) or {}
        xs = sorted(k for k, v in line.items() if math.isfinite(v))
        values += [line[k] for k in xs]
        marker = _RUN_MARKERS[i % len(_RUN_MARKERS)]
        ax.plot(xs, [line[k] for k in xs], marker=marker, markersize=4, linewidth=1.6, color=run_color(i), label=label)
    if panel.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=1))
    elif values and max(abs(v) for v in values) >= 1e4:
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))


def _runs_legend(fig: Figure, ax, n_runs: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=max(1, min(n_runs, 4)), frameon=False, fontsize=9)


def timings_by_run(
    seconds: Mapping[str, Mapping[str, float]], runs: Sequence[str], steps: Sequence[str], *, dpi: int = DPI
) -> bytes:
    """One horizontal bar per run, its length the run's time and its parts the steps (``seconds[run][step]``).

    ``runs``: the run labels, top to bottom; ``steps``: the step names in order (a run without a step: no part).
    """
    fig = _figure(11.0, 0.9 + 0.5 * len(runs) + _LEGEND_IN, dpi)
    ax = fig.add_subplot()
    _style(ax, grid_axis="x")
    colors = colormaps["viridis"](np.linspace(0.05, 0.9, max(len(steps), 1)))
    rows = np.arange(len(runs))
    left = np.zeros(len(runs))
    for color, step in zip(colors, steps, strict=False):
        width = np.array([max(0.0, seconds.get(run, {}).get(step, 0.0)) for run in runs])
        ax.barh(rows, width, left=left, height=0.6, color=color, label=step)
        left += width
    ax.set_yticks(rows)
    ax.set_yticklabels([_cut(run, 28) for run in runs], fontsize=9)
    ax.invert_yaxis()  # the first run on top, as in the page's tables
    ax.set_xlabel("seconds", color=INK, fontsize=10)
    ncols = max(1, min(len(steps), 6))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=ncols, frameon=False, fontsize=9)
    fig.tight_layout()
    return _png(fig)
