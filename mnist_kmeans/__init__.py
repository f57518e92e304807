"""mnist-kmeans: mini-batch k-means over a K grid on a Dask cluster, MNIST stored as chunked Zarr.

The package reads like the data flow::

    data/      IDX files -> Zarr store (ingest), larger training sets (augment)
    fit.py     the map side: partial_fit chains on the cluster
    evaluate.py  the reduce side: contingency tables and inertia, reduced on the cluster
    report/    figures and the self-contained HTML report
    run.py     one job end to end; cli.py is a thin layer on top

The Python API: :func:`compare` sets finished runs of the same data side by side (docs/contract.md, "compare").
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["compare"]

# Lazy: `import mnist_kmeans` (and the CLI's --help) must not pull in dask, zarr or matplotlib.
_HOMES = {"compare": "mnist_kmeans.report.compare"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
