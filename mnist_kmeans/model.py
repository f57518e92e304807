"""A run's K as a fitted scikit-learn ``MiniBatchKMeans`` (the Python API's ``Run.model``): its final centroids, and a
``predict`` that assigns every row exactly as the run's evaluation did.

scikit-learn's own ``predict`` computes the same nearest centroid with another kernel (``||c||²`` added inside the
GEMM, blocks of 256 rows under OpenMP), which rounds differently: a row that is nearly as close to two centroids can
land in the other one, and the run's accuracy would not be reproduced exactly. So ``predict``
calls the evaluation's own :func:`mnist_kmeans.evaluate.assign`, on blocks of the store's chunk rows and with one
BLAS thread, as a worker runs it (README, "From a notebook"); whatever that function becomes, ``predict`` follows.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from mnist_kmeans.evaluate import assign


class RunKMeans(MiniBatchKMeans):
    """A fitted ``MiniBatchKMeans`` holding one K's final centroids of a run; made by :func:`run_model`.

    ``predict(X)`` takes rows as the run saw them: float pixels in [0, 1], one row per image (``Run.predict_labels``
    also takes uint8 images). Besides scikit-learn's fitted attributes it has ``chunk_rows_``, the rows of one
    evaluation block. Everything but ``predict`` (``transform``, ``score``, a new ``fit``) is scikit-learn's.
    """

    def predict(self, X: object) -> np.ndarray:
        """The nearest centroid of each row, as the run's evaluation assigned it (see the module docstring)."""
        check_is_fitted(self)
        x = validate_data(self, X, reset=False, dtype=np.float32, order="C")
        return assign_blocks(x, self.cluster_centers_, self.chunk_rows_)


def assign_blocks(x: np.ndarray, centers: np.ndarray, chunk_rows: int) -> np.ndarray:
    """:func:`~mnist_kmeans.evaluate.assign`'s labels of float32 rows ``x``, ``chunk_rows`` rows at a time and with
    one BLAS thread: a worker's pass over a store's chunks (several BLAS threads may split a product, and round it,
    differently)."""
    blocks = range(0, len(x), chunk_rows)
    with threadpool_limits(limits=1):
        return np.concatenate([assign(x[start : start + chunk_rows], centers)[0] for start in blocks])


def run_model(centers: np.ndarray, chunk_rows: int, inertia: float, seed: int, batch_size: int) -> RunKMeans:
    """A fitted :class:`RunKMeans` of ``centers`` (K, H·W) whose training inertia was ``inertia``."""
    from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

    model = RunKMeans(n_clusters=len(centers), batch_size=batch_size, random_state=seed)
    model.cluster_centers_ = np.ascontiguousarray(centers, dtype=np.float32)
    model.n_features_in_ = centers.shape[1]
    model.inertia_ = float(inertia)
    model.chunk_rows_ = int(chunk_rows)
    model._n_threads = _openmp_effective_n_threads()  # what fit would set: scikit-learn's score and transform use it
    return model
