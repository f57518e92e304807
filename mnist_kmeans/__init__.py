"""mnist-kmeans: mini-batch k-means over a K grid on a Dask cluster, MNIST stored as chunked Zarr.

The package reads like the data flow::

    data/        IDX files -> Zarr store (ingest), larger training sets (augment)
    fit.py       the map side: partial_fit chains on the cluster
    evaluate.py  the reduce side: contingency tables and inertia, reduced on the cluster
    report/      figures and the self-contained HTML report
    pipeline.py  one job end to end; cli.py (the command line) and api.py (the Python API) are thin layers on top
    submit.py    the same job run by a driver task on the cluster (submit, status, wait, cancel); status.py its state

The Python API (docs/contract.md, "Python API")::

    run = mnist_kmeans.run("jobs/smoke.yaml", client=client)   # or open_run("runs/smoke-…")
    run.metrics, run.model(10), run.predict_labels(10, images)
    mnist_kmeans.compare(["runs/a", "runs/b"])                 # runs of the same data side by side, one page
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

__all__ = ["Run", "compare", "open_run", "run"]

# Lazy, as in report/: `import mnist_kmeans` (the command line's first import) must not pull in numpy or dask.
# The module of the job's steps is pipeline.py, not run.py: a submodule `run` would shadow the function `run`.
_HOMES = {
    "Run": "mnist_kmeans.api",
    "compare": "mnist_kmeans.report.compare",
    "open_run": "mnist_kmeans.api",
    "run": "mnist_kmeans.api",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
