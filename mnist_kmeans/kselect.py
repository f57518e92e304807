"""Choosing K without labels: Calinski-Harabasz, Davies-Bouldin, a sampled silhouette, the knee of inertia against K,
and how far the restarts of a K agree (docs/contract.md, "metrics.json"; README, "Choosing K without labels").

The data flow, after the evaluation pass (schedule.py, phase 3)::

    evaluation pass (evaluate.chunk_stats, ``evaluation=True``): per K counts and float64 sums; each chunk's labels
        stay on its worker, taken out of that chunk's PassStats by :func:`kept_labels` (the smallest integer type), so
        that the chunk's sums are released once the tree reduction has added them: held to the selection pass,
        they grew with the rows (3.3 MB per chunk for the reference grid, 2.7 GB at 8.1 million rows)
    selection pass, one task per chunk for every K at once: each row's distance to its cluster's *mean*
        (selection_chunk_task) ─▶ tree of combine ─▶ SelectionStats per K
    selection_scores, one task: Calinski-Harabasz and Davies-Bouldin of every K from those sums; the silhouette on
        the sample, from one distance matrix for every K

Both indices are defined around the means of the assigned rows, which are not the mini-batch centroids: the means
come from the evaluation pass, the distances to them need the second pass, which costs one multiply-add per pixel
and K (no GEMM) because the labels are kept. The formulas are scikit-learn's (``sklearn.metrics.cluster.
_unsupervised``), summed in float64 from float32 row distances, so the values equal ``calinski_harabasz_score`` /
``davies_bouldin_score`` on the whole training split with the run's labels to 1e-6 (2e-7 measured on MNIST).

The silhouette is O(n²): it is scikit-learn's ``silhouette_score`` on a seeded sample of ``SAMPLE_ROWS`` training
rows (:func:`sample_rows`), with the run's labels of those rows. The same sample measures restart stability: the
adjusted Rand index between every two restarts' assignments after the screening (:func:`restart_agreement`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mnist_kmeans.data.store import StoreInfo, load_chunk, read_rows_at
from mnist_kmeans.evaluate import PassStats, assign
from mnist_kmeans.fit import Purpose, derive_seed

# Rows of the silhouette sample: its distances (O(n²), float64) take 0.3 s of one core here, then each K's
# silhouette a fraction of that, against tens of seconds of fit (README, "Choosing K without labels").
SAMPLE_ROWS = 2000


# --- the sample ------------------------------------------------------------------------------------------------------


def sample_rows(n_train: int, seed: int, n_rows: int = SAMPLE_ROWS) -> np.ndarray:
    """Training row indices of the selection sample, drawn without replacement, sorted (the order of the chunks)."""
    rng = np.random.RandomState(derive_seed(seed, Purpose.SELECTION_SAMPLE))
    return np.sort(rng.choice(n_train, size=min(n_rows, n_train), replace=False))


def rows_in_chunk(rows: np.ndarray, chunk: int, chunk_rows: int) -> np.ndarray:
    """Positions within training chunk ``chunk`` of the sorted sample ``rows`` that fall in it."""
    start = chunk * chunk_rows
    return rows[(rows >= start) & (rows < start + chunk_rows)] - start


def draw_sample(info: StoreInfo, rows: np.ndarray) -> np.ndarray:
    """One task: the sample's images as float32 in [0, 1], as the chunks hold them (store.load_chunk)."""
    images = read_rows_at(info.url, "train", rows, info.storage_options)
    return np.divide(images, np.float32(255), dtype=np.float32)


# --- restart stability, at the screening -----------------------------------------------------------------------------


def restart_agreement(sample: np.ndarray, centers: Sequence[np.ndarray]) -> list[float]:
    """The adjusted Rand index between the assignments of ``sample`` by every two center sets (the restarts of a K
    after the screening, in restart order; pairs in ``itertools.combinations`` order). The losing restarts' centers
    exist only at the screening, so schedule.screen_outcome measures it there."""
    from sklearn.metrics import adjusted_rand_score

    labels = [assign(sample, c)[0] for c in centers]
    return [float(adjusted_rand_score(a, b)) for a, b in itertools.combinations(labels, 2)]


# --- the selection pass ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionStats:
    """Per-cluster sums of each row's distance to its cluster's mean; ``+`` joins two disjoint, consecutive sets of
    rows (the sample's labels are concatenated in row order, as the tree reduction keeps the chunks in order)."""

    sq_dist: np.ndarray  # float64 (K,): sum of squared distances to the cluster's mean (Calinski-Harabasz)
    dist: np.ndarray  # float64 (K,): sum of distances to the cluster's mean (Davies-Bouldin)
    sample_labels: np.ndarray  # int64: the run's label of each sample row in these rows

    def __add__(self, other: SelectionStats) -> SelectionStats:
        labels = np.concatenate([self.sample_labels, other.sample_labels])
        return SelectionStats(self.sq_dist + other.sq_dist, self.dist + other.dist, labels)


def cluster_means(stats: list[PassStats]) -> list[np.ndarray]:
    """One task: each center set's cluster means (float64; rows of an empty cluster are 0, never used)."""
    return [st.sums / np.maximum(st.counts, 1)[:, None] for st in stats]


def kept_labels(chunk_stats: list[PassStats]) -> list[np.ndarray]:
    """One task: the labels one evaluation chunk task kept, for each center set, in the smallest unsigned type that
    holds them (one byte a row up to K=256)."""
    out = []
    for stats in chunk_stats:
        assert stats.labels is not None, "the evaluation pass keeps its labels"
        out.append(stats.labels.astype(np.min_scalar_type(max(len(stats.counts) - 1, 0))))
    return out


def selection_chunk_task(
    chunk_labels: list[np.ndarray], means: list[np.ndarray], info: StoreInfo, chunk: int, sample_at: np.ndarray
) -> list[SelectionStats]:
    """One task: :class:`SelectionStats` of every center set on one training chunk, from the labels its evaluation
    task kept (:func:`kept_labels`) and the means of the whole split; ``sample_at``: the sample's positions in the
    chunk."""
    x, _ = load_chunk(info, "train", chunk)
    x_sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
    out = []
    for labels, mean in zip(chunk_labels, means, strict=True):
        sq = x_sq - 2 * _dot_with_means(x, mean.astype(np.float32), labels) + np.einsum("ij,ij->i", mean, mean)[labels]
        np.maximum(sq, 0, out=sq)
        k = len(mean)
        out.append(
            SelectionStats(
                np.bincount(labels, weights=sq, minlength=k),
                np.bincount(labels, weights=np.sqrt(sq), minlength=k),
                labels[sample_at].astype(np.int64),
            )
        )
    return out


def _dot_with_means(x: np.ndarray, means: np.ndarray, labels: np.ndarray, block: int = 256) -> np.ndarray:
    """Each row's dot product with its cluster's mean (float32 rows and means, float64 result), ``block`` rows at a
    time. ||x||² - 2x·m + ||m||² avoids a chunk-sized x - m per K, and float32 halves the bytes a pass moves: the
    indices stay within 1e-6 of scikit-learn's float64 ones on MNIST (tests/test_kselect.py), errors of single rows
    averaging out in each cluster's sums. The means are gathered into one reused buffer (``take`` with ``out``;
    ``mode="clip"`` because the default buffers it again), which keeps them in cache."""
    out = np.empty(len(x))
    gathered = np.empty((min(block, len(x)), x.shape[1]), dtype=means.dtype)
    for start in range(0, len(x), block):
        rows = labels[start : start + block]
        buffer = gathered[: len(rows)]
        np.take(means, rows, axis=0, out=buffer, mode="clip")
        out[start : start + len(rows)] = np.einsum("ij,ij->i", x[start : start + len(rows)], buffer)
    return out


# --- the scores ------------------------------------------------------------------------------------------------------


def calinski_harabasz(train: PassStats, selection: SelectionStats) -> float | None:
    """scikit-learn's ``calinski_harabasz_score`` from the sums; None where it is undefined (fewer than 2 clusters
    with rows, or as many as rows)."""
    assert train.sums is not None
    counts, nonempty = train.counts, train.counts > 0
    n_rows, n_labels = int(counts.sum()), int(nonempty.sum())
    if not 1 < n_labels < n_rows:
        return None
    mean = train.sums.sum(axis=0) / n_rows
    means = train.sums[nonempty] / counts[nonempty, None]
    extra = float((counts[nonempty] * ((means - mean) ** 2).sum(axis=1)).sum())
    intra = float(selection.sq_dist.sum())
    return 1.0 if intra == 0.0 else extra * (n_rows - n_labels) / (intra * (n_labels - 1.0))


def davies_bouldin(train: PassStats, selection: SelectionStats) -> float | None:
    """scikit-learn's ``davies_bouldin_score`` from the sums; None where it is undefined (as above)."""
    from sklearn.metrics import pairwise_distances

    assert train.sums is not None
    counts, nonempty = train.counts, train.counts > 0
    n_rows, n_labels = int(counts.sum()), int(nonempty.sum())
    if not 1 < n_labels < n_rows:
        return None
    means = train.sums[nonempty] / counts[nonempty, None]
    intra = selection.dist[nonempty] / counts[nonempty]
    between = pairwise_distances(means)
    if np.allclose(intra, 0) or np.allclose(between, 0):  # scikit-learn's isclose tests, same tolerances
        return 0.0
    between[between == 0] = np.inf
    return float(np.mean(np.max((intra[:, None] + intra) / between, axis=1)))


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float | None:
    """scikit-learn's ``silhouette_score`` of the sample, given its distance matrix, with these labels; None if
    undefined (fewer than 2 distinct labels, or as many as rows)."""
    from sklearn.metrics import silhouette_score

    if not 1 < len(np.unique(labels)) < len(labels):
        return None
    return float(silhouette_score(distances, labels, metric="precomputed"))


def sample_distances(sample: np.ndarray) -> np.ndarray:
    """The sample's pairwise Euclidean distances, by scikit-learn as ``silhouette_score(X, labels)`` computes them,
    on the stored bytes / 255 in float64 as the training split's images are. Computed once for every K: the
    silhouette of one K alone costs little more than these distances."""
    from sklearn.metrics import pairwise_distances

    images = np.rint(sample * 255).astype(np.float64) / 255  # exact: the sample was stored as uint8 / 255
    return pairwise_distances(images)


def selection_scores(
    train: list[PassStats], selection: list[SelectionStats], sample: np.ndarray
) -> list[dict[str, float | None]]:
    """One task: the per-K fields of metrics.json this module adds, for every center set of the evaluation."""
    distances = sample_distances(sample)
    return [
        {
            "calinski_harabasz": calinski_harabasz(stats, sel),
            "davies_bouldin": davies_bouldin(stats, sel),
            "silhouette_sample": silhouette(distances, sel.sample_labels),
        }
        for stats, sel in zip(train, selection, strict=True)
    ]


# --- from the per-K scores to a choice of K --------------------------------------------------------------------------

# Each criterion's choice: the K where it is best (highest CH and silhouette, lowest DB). Names as in metrics.json.
CRITERIA = {"calinski_harabasz": max, "davies_bouldin": min, "silhouette_sample": max}


def inertia_knee(ks: Sequence[int], inertia: Sequence[float]) -> int | None:
    """The knee of inertia against K by Kneedle (``kneed``, convex and decreasing, sensitivity S=1); None: no knee
    (a straight or too short curve)."""
    from kneed import KneeLocator

    if len(ks) < 3:
        return None
    knee = KneeLocator(list(ks), list(inertia), curve="convex", direction="decreasing", S=1.0).knee
    return None if knee is None else int(knee)


def k_selection(rows: Sequence[dict], knee: int | None, sample_size: int) -> dict:
    """metrics.json's ``k_selection`` from its per-K rows and the knee: each criterion's K (null where no K has a
    value), the recommendation (the K most criteria choose; ties: the smaller K) and whether they all agree."""
    choices: dict[str, int | None] = {}
    for name, best in CRITERIA.items():
        scored = [(row[name], row["k"]) for row in rows if row.get(name) is not None]
        choices[name] = best(scored, key=lambda vk: (vk[0], -vk[1] if best is max else vk[1]))[1] if scored else None
    choices["inertia_knee"] = knee
    chosen = [k for k in choices.values() if k is not None]
    votes = {k: chosen.count(k) for k in chosen}
    recommended = min(votes, key=lambda k: (-votes[k], k)) if votes else None
    return {
        **choices,
        "recommended": recommended,
        "agree": len(votes) == 1,
        "silhouette_sample_rows": sample_size,
    }
