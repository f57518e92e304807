"""The reduce side: per-chunk statistics of a set of centers, summed over chunks by a tree reduction.

One pass over a split computes, for one chain's centers and each chunk: the nearest center of every row, the sum of
squared distances (inertia), the number of rows per center, per (center, class) counts (the contingency table) and,
when asked, the per-center sums of rows. Summed over the chunks these give everything the job reports (inertia, the
label map, every metric of metrics.json, docs/contract.md) and a full-batch Lloyd update (sums / counts), with no
per-row result ever leaving a worker. Every label metric reported depends on the label vectors only through that
table, so :func:`cluster_metrics` computes them from it with scikit-learn's own arithmetic: the values equal
``sklearn.metrics`` on the original vectors, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mnist_kmeans.data.store import StoreInfo, load_chunk

# scipy and scikit-learn are imported where they are used: on the workers (and, for the metrics, in a task), not
# in the client, which only submits these functions (see fit.py).


@dataclass(frozen=True)
class PassStats:
    """Statistics of one chain's centers over some rows; ``+`` combines two disjoint sets of rows."""

    ssd: np.ndarray  # float64 (n_sets,): sum of squared distances for each center set (the last is the current one)
    counts: np.ndarray  # int64 (K,): rows nearest to each center
    contingency: np.ndarray  # int64 (K, n_classes): rows per (nearest center, true class)
    sums: np.ndarray | None = field(default=None)  # float64 (K, n_features): per-center sum of its rows
    # The evaluation pass's label of each row, kept only in one chunk's own statistics (``+`` drops it): the
    # selection pass reads it on the worker (kselect.py).
    labels: np.ndarray | None = field(default=None)

    def __add__(self, other: PassStats) -> PassStats:
        sums = None if self.sums is None or other.sums is None else self.sums + other.sums
        return PassStats(self.ssd + other.ssd, self.counts + other.counts, self.contingency + other.contingency, sums)

    @property
    def inertia(self) -> float:
        return float(self.ssd[-1])


def assign(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center of each row and its squared distance, from one float32 GEMM (||x||² - 2x·c + ||c||²)."""
    labels, dist = _assign_many(x, [centers])[0]
    return labels, dist


def _assign_many(
    x: np.ndarray, center_sets: Sequence[np.ndarray], x_sq: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`assign` for several center sets at once: one GEMM against all of them stacked, which is several times
    faster than one small GEMM per set (the restarts of a small K, the earlier epochs of a chain)."""
    stacked = np.concatenate(center_sets) if len(center_sets) > 1 else center_sets[0]
    d = x @ (-2 * stacked.T)
    d += np.einsum("ij,ij->i", stacked, stacked)[None, :]
    x_sq = np.einsum("ij,ij->i", x, x) if x_sq is None else x_sq
    rows = np.arange(len(x))
    out, start = [], 0
    for centers in center_sets:
        block = d[:, start : start + len(centers)]
        labels = block.argmin(axis=1)
        best = block[rows, labels] + x_sq
        np.maximum(best, 0, out=best)  # rounding can make a tiny distance negative
        out.append((labels, best))
        start += len(centers)
    return out


def chunk_stats(
    x: np.ndarray,
    y: np.ndarray,
    center_sets: Sequence[np.ndarray],
    n_classes: int,
    *,
    with_sums: bool | Sequence[bool] = False,
    histories: Sequence[Sequence[np.ndarray]] = (),
    gemm_groups: Sequence[int] = (),
    evaluation: bool = False,
) -> list[PassStats]:
    """Statistics of each center set (every K of the grid, the restarts of a K ...) on the rows ``x`` (float32) with
    classes ``y``, read once for all of them.

    ``with_sums``: for every set, or one flag per set. ``histories[i]`` are earlier center sets of the same chain as
    ``center_sets[i]`` (its centers after each earlier epoch) whose inertia is wanted too: only their squared
    distances are kept, as the leading entries of ``ssd``. ``gemm_groups``: how many consecutive sets share one GEMM
    (default: one each, with its history). Sharing is faster for small K, but BLAS rounds a column of a product
    differently depending on the other columns: only sets that always travel together (the restarts of one K) may
    share, or a set's labels would depend on what else its pass holds, and a resumed run, whose passes hold other
    sets, could end with other centroids. ``evaluation``: the job's evaluation pass, whose statistics also hold the
    sums in float64 (the means of kselect.py) and the labels. A pure function.
    """
    n = len(center_sets)
    histories = list(histories) or [()] * n
    sums = [with_sums] * n if isinstance(with_sums, bool) else list(with_sums)
    sizes = list(gemm_groups) or [1] * n
    if sum(sizes) != n:
        raise ValueError(f"gemm_groups {sizes} do not cover the {n} center sets")
    x_sq = np.einsum("ij,ij->i", x, x)
    assigned_sets: list[tuple[np.ndarray, np.ndarray]] = []
    first = 0
    for size in sizes:
        group = [m for i in range(first, first + size) for m in (*histories[i], center_sets[i])]
        assigned_sets += _assign_many(x, group, x_sq)
        first += size
    assigned = iter(assigned_sets)
    # The evaluation's sums are the means of kselect.py, compared with scikit-learn's float64 ones to 1e-6.
    rows = _ExactRows.of(x) if evaluation else x
    out = []
    for centers, hist, want_sums in zip(center_sets, histories, sums, strict=True):
        ssd = [float(next(assigned)[1].sum(dtype=np.float64)) for _ in hist]
        labels, dist = next(assigned)
        ssd.append(float(dist.sum(dtype=np.float64)))
        stats = _tables(rows, y, labels, len(centers), n_classes, ssd, want_sums or evaluation)
        out.append(dataclasses.replace(stats, labels=labels) if evaluation else stats)
    return out


@dataclass(frozen=True)
class _ExactRows:
    """Rows whose per-center sums are wanted exact (float64 means), at the cost of float32 sums.

    The store's rows are bytes / 255 (store.load_chunk): the sums of the bytes themselves are integers, exact in
    float32 while below 2**24 (65,793 rows of 255), so ``sums / 255`` is as exact as a float64 sum of the rows and
    costs a float32 sparse product. Other rows (tests' floats, very long chunks) are summed in float64.
    """

    values: np.ndarray  # the bytes as float32 integers, or the rows in float64
    scale: float  # sums of ``values`` / scale = sums of the rows

    @classmethod
    def of(cls, x: np.ndarray) -> _ExactRows:
        pixels = np.rint(x * np.float32(255))
        if len(x) * 255 < 2**24 and np.array_equal(np.divide(pixels, np.float32(255), dtype=np.float32), x):
            return cls(pixels, 255.0)
        return cls(x.astype(np.float64), 1.0)


def _tables(x, y, labels, k: int, n_classes: int, ssd: list[float], with_sums: bool) -> PassStats:
    """``x``: float32 rows (a Lloyd step's sums), or :class:`_ExactRows` (the evaluation's)."""
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    contingency = np.bincount(labels * n_classes + y, minlength=k * n_classes).reshape(k, n_classes).astype(np.int64)
    sums = None
    if with_sums:
        values, scale = (x.values, x.scale) if isinstance(x, _ExactRows) else (x, 1.0)
        sums = _onehot_sums(values, labels, k)
        if scale != 1.0:
            sums /= scale
    return PassStats(np.asarray(ssd, dtype=np.float64), counts, contingency, sums)


def _onehot_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-center sums of the rows of ``x`` as float64, from a sparse one-hot (K x n) product: one add per pixel
    whatever K is, where a dense one-hot GEMM costs as much as the distances and np.add.at/reduceat are 5-10x slower.
    Built column-wise (CSC: row i's one entry in column i), so the product reads x in order: 2.9 ms for 10,000 MNIST
    rows against 6.7 ms for the row-wise (CSR) product, with the same bits (each center's rows are added in row order
    either way). Float32 sums of a chunk (at most chunk_rows values in [0, 1]) are exact enough for a Lloyd step;
    chunks are summed in float64."""
    import scipy.sparse

    n = len(labels)
    onehot = scipy.sparse.csc_matrix((np.ones(n, dtype=x.dtype), labels, np.arange(n + 1)), shape=(k, n))
    return np.asarray(onehot @ x, dtype=np.float64)


def chunk_stats_task(
    center_sets: Sequence[np.ndarray],
    info: StoreInfo,
    split: str,
    chunk: int,
    *,
    with_sums: bool | Sequence[bool] = False,
    histories: Sequence[Sequence[np.ndarray]] = (),
    gemm_groups: Sequence[int] = (),
    evaluation: bool = False,
) -> list[PassStats]:
    """One task: :func:`chunk_stats` on one chunk of the store, read on the worker."""
    x, y = load_chunk(info, split, chunk)
    if y.size and int(y.max()) >= info.n_classes:
        raise ValueError(f"{info.url}: {split} chunk {chunk} holds label {int(y.max())} >= n_classes={info.n_classes}")
    return chunk_stats(
        x,
        y.astype(np.int64),
        center_sets,
        info.n_classes,
        with_sums=with_sums,
        histories=histories,
        gemm_groups=gemm_groups,
        evaluation=evaluation,
    )


def combine(*parts: list[PassStats]) -> list[PassStats]:
    """Sum the statistics of disjoint sets of rows, center set by center set (one node of the tree reduction)."""
    return [sum(group[1:], start=group[0]) for group in zip(*parts, strict=True)]


def lloyd_update(centers: np.ndarray, stats: PassStats) -> np.ndarray:
    """One full-batch Lloyd step: each center moves to the mean of its rows; a center with no rows stays put."""
    assert stats.sums is not None
    new = centers.astype(np.float64, copy=True)
    nonempty = stats.counts > 0
    new[nonempty] = stats.sums[nonempty] / stats.counts[nonempty, None]
    return new.astype(np.float32)


# --- from reduced tables to the metrics of metrics.json (tables are K x n_classes) ---------------------------


def label_map(contingency_train: np.ndarray) -> list[int | None]:
    """Each cluster takes the most frequent true class of its training rows; a cluster with no rows is unmapped.

    Ties go to the smallest class, as ``np.argmax`` (and the seed notebook) do.
    """
    return [int(row.argmax()) if row.sum() > 0 else None for row in contingency_train]


def accuracy(contingency: np.ndarray, mapping: list[int | None]) -> float:
    """Share of rows whose cluster's mapped class is their true class (rows of unmapped clusters count as wrong)."""
    total = contingency.sum()
    hits = sum(int(contingency[c, m]) for c, m in enumerate(mapping) if m is not None)
    return float(hits / total) if total else float("nan")


def cluster_metrics(contingency_train: np.ndarray) -> dict[str, float]:
    """The label-based metrics of metrics.json (docs/contract.md) on the training split, from its table alone.

    scikit-learn's own arithmetic, step for step, on the table where ``sklearn.metrics`` first builds it from the
    label vectors: its ``mutual_info_score`` of the same sparse table, its entropy formula on the table's margins,
    its pair counts for the adjusted Rand index. The values equal ``sklearn.metrics`` on the rows' label vectors
    (tests/test_evaluate.py), without building vectors of one entry per training row (a second per K at 1.2
    million rows).
    """
    import scipy.sparse
    from sklearn.metrics import mutual_info_score

    table = np.asarray(contingency_train, dtype=np.int64).T  # scikit-learn's orientation: classes x clusters
    n = int(table.sum())
    if n == 0:  # scikit-learn's value for empty label vectors
        return dict.fromkeys(("homogeneity", "completeness", "v_measure", "ari", "nmi"), 1.0)
    sparse = scipy.sparse.csr_matrix(table)
    sparse.eliminate_zeros()
    mi = float(mutual_info_score(None, None, contingency=sparse))
    h_true, h_pred = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    homogeneity = mi / h_true if h_true else 1.0
    completeness = mi / h_pred if h_pred else 1.0
    total = homogeneity + completeness
    scores = {
        "homogeneity": homogeneity,
        "completeness": completeness,
        "v_measure": 0.0 if total == 0.0 else 2 * homogeneity * completeness / total,
        "ari": _adjusted_rand(sparse, n),
        "nmi": _normalized_mutual_info(table, mi, h_true, h_pred),
    }
    # Each is at most 1 by definition; ratios of entropies can round to 1.0000000000000009 (one cluster per class).
    return {name: min(float(value), 1.0) for name, value in scores.items()}


def _entropy(margin: np.ndarray) -> float:
    """``sklearn.metrics.cluster.entropy`` of label vectors with these counts per label."""
    pi = margin[margin > 0].astype(np.float64)
    if pi.size <= 1:
        return 0.0
    pi_sum = np.sum(pi)
    return float(-np.sum((pi / pi_sum) * (np.log(pi) - np.log(pi_sum))))


def _normalized_mutual_info(table: np.ndarray, mi: float, h_true: float, h_pred: float) -> float:
    """``normalized_mutual_info_score`` (arithmetic mean normaliser), with its special cases."""
    n_classes, n_clusters = int((table.sum(axis=1) > 0).sum()), int((table.sum(axis=0) > 0).sum())
    if n_classes == n_clusters == 1:
        return 1.0
    if mi == 0:
        return 0.0
    return mi / np.mean([h_true, h_pred])


def _adjusted_rand(sparse, n: int) -> float:
    """``adjusted_rand_score`` from its pair confusion matrix (``pair_confusion_matrix``'s sums, in int64)."""
    n_c = np.ravel(sparse.sum(axis=1)).astype(np.int64)
    n_k = np.ravel(sparse.sum(axis=0)).astype(np.int64)
    sum_squares = int((sparse.data.astype(np.int64) ** 2).sum())
    tp = sum_squares - n
    fp = int(sparse.dot(n_k).sum()) - sum_squares
    fn = int(sparse.T.dot(n_c).sum()) - sum_squares
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def misclassified_task(
    centers: np.ndarray, mapping: list[int | None], info: StoreInfo, chunk: int, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``limit`` misclassified rows of a test chunk: images as stored (uint8), true and predicted classes.

    The predicted class of a row in an unmapped cluster is -1.
    """
    x, y = load_chunk(info, "test", chunk)
    labels, _ = assign(x, centers)
    lookup = np.array([-1 if m is None else m for m in mapping])
    pred = lookup[labels]
    wrong = np.flatnonzero(pred != y)[:limit]
    images = np.rint(x[wrong] * 255).astype(np.uint8)  # exact: x was stored as uint8 / 255
    return images, y[wrong].astype(np.int64), pred[wrong]
