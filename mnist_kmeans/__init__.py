"""mnist-kmeans: mini-batch k-means over a K grid on a Dask cluster, MNIST stored as chunked Zarr.

The package reads like the data flow::

    data/      IDX files -> Zarr store (ingest), larger training sets (augment)
    fit.py     the map side: partial_fit chains on the cluster
    evaluate.py  the reduce side: contingency tables and inertia, reduced on the cluster
    report/    figures and the self-contained HTML report
    run.py     one job end to end; cli.py is a thin layer on top
    submit.py  the same job run by a driver task on the cluster (submit, status, wait, cancel); status.py its state
"""

__version__ = "0.1.0"
