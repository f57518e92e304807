"""The Python API (docs/contract.md, "Python API"): :func:`run` a job, :func:`open_run` a run directory, and the
:class:`Run` they return, for a notebook.

Thin on purpose: :func:`run` is ``mnist-kmeans run`` (``pipeline.run_job``, the same path; only the connection
differs when a client is given), and a :class:`Run` reads its directory as ``mnist-kmeans report`` does
(``report.rundir.load_run``). Errors are the package's own: :class:`~mnist_kmeans.errors.UserError` for bad input
(the command line's exit 2), :class:`~mnist_kmeans.errors.ClusterError` for a cluster lost (exit 3), and
``KeyboardInterrupt`` whose message says how to resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_kmeans.config import JobConfig, JobSpec, load_job
from mnist_kmeans.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    from distributed import Client

    from mnist_kmeans.model import RunKMeans
    from mnist_kmeans.report.rundir import RunData


def run(
    job: JobSpec,
    *,
    client: Client | None = None,
    cluster: str | os.PathLike | None = None,
    store: str | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
) -> Run:
    """Run a job end to end, as ``mnist-kmeans run`` does, and return its :class:`Run`.

    Parameters
    ----------
    job
        A job file's path, a mapping with a job file's keys (validated exactly as a file is; errors name
        ``job: KEY``, a relative ``store`` is taken from the working directory), or a :class:`JobConfig`.
    client
        A connected ``distributed.Client``: the job runs on its cluster, which is left open (nothing started or
        closed). Without it, the cluster of ``cluster`` is started or joined as the command line does.
    cluster
        A cluster file (``--cluster``; default ``./cluster.yaml`` if there is one). With ``client`` only its
        ``storage:`` options are used.
    store, out, resume
        As ``--store``, ``--out`` and ``--resume``.

    Raises
    ------
    UserError
        Bad input: the job, the cluster file, the run directory, the store. Nothing existing is overwritten.
    ClusterError
        The cluster cannot be reached or was lost; the message says how to resume.
    KeyboardInterrupt
        Interrupted; finished epochs are kept and the message says how to resume.
    """
    from mnist_kmeans.pipeline import run_job  # dask is imported once the job is checked, as on the command line

    report = run_job(
        job,
        cluster_file=_path_or_none(cluster),
        store=store,
        out=_path_or_none(out),
        resume=_path_or_none(resume),
        client=client,
    )
    return open_run(report.parent)


def open_run(path: str | os.PathLike) -> Run:
    """The :class:`Run` of a finished run directory; a UserError names the file at fault if it is not one."""
    from mnist_kmeans.report import load_run

    return Run(load_run(os.fspath(path)))


def _path_or_none(value: str | os.PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)


@dataclass(frozen=True)
class Figure:
    """One figure of a run (``figures/<name>.png``); a notebook shows it as the image."""

    name: str
    path: Path

    @property
    def png(self) -> bytes:
        return self.path.read_bytes()

    def _repr_png_(self) -> bytes:
        return self.png


class Run:
    """A finished run directory, read and checked once (docs/contract.md, "Run directory")."""

    def __init__(self, data: RunData):
        self._data = data

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def path(self) -> Path:
        """The run directory."""
        return self._data.run_dir

    @property
    def report_path(self) -> Path:
        """``report.html`` of the run."""
        return self.path / "report.html"

    @cached_property
    def job(self) -> JobConfig | None:
        """The job as it ran (``job.yaml``), or None when the directory has none."""
        job_file = self.path / "job.yaml"
        return load_job(job_file) if job_file.is_file() else None

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Every per-K field of ``metrics.json``'s ``results``, one row per K (the index), ascending."""
        import pandas as pd

        return pd.DataFrame(self._data.results).set_index("k").sort_index()

    def label_map(self, k: int) -> np.ndarray:
        """The class each cluster of K stands for (int64, one per cluster), -1 for a cluster with no training row."""
        return np.array([-1 if c is None else c for c in self._data.label_maps[self._k(k)]], dtype=np.int64)

    def model(self, k: int) -> RunKMeans:
        """A fitted scikit-learn ``MiniBatchKMeans`` of K: ``cluster_centers_`` the final centroids, ``predict`` the
        evaluation's assignment (``model.RunKMeans``). Each call returns a new model."""
        from mnist_kmeans.model import run_model
        from mnist_kmeans.report.rundir import load_centroids

        k = self._k(k)
        seed, batch_size = (self.job.seed, self.job.batch_size) if self.job else (JobConfig.seed, JobConfig.batch_size)
        inertia = next(r["inertia"] for r in self._data.results if r["k"] == k)
        return run_model(load_centroids(self._data, k), self._chunk_rows, inertia, seed, batch_size)

    def predict_labels(self, k: int, images: Any) -> np.ndarray:
        """The class (int64; -1 for an empty cluster) the model of K gives each image.

        ``images``: ``(n, H, W)`` or ``(n, H*W)``; uint8 as stored (0-255, divided by 255 as the store's reader
        does) or float in [0, 1]. Anything else is a UserError saying what is wrong.
        """
        x = self._pixels(images)
        return self.label_map(k)[self.model(k).predict(x)]

    def figure(self, name: str) -> Figure:
        """The report's figure ``name`` (``figures/<name>.png``); a UserError lists the names there are."""
        names = sorted(p.stem for p in (self.path / "figures").glob("*.png"))
        if name not in names:
            raise UserError(f"{self.path / 'figures'}: no figure {name!r}; there are: {', '.join(names) or 'none'}")
        return Figure(name, self.path / "figures" / f"{name}.png")

    def _repr_html_(self) -> str:
        """The report's summary and metrics table (the page's own blocks, escaped as the page is)."""
        from mnist_kmeans.reference import load_seed_table
        from mnist_kmeans.report.context import build_context
        from mnist_kmeans.report.html import render_blocks

        context = build_context(self._data, [], [], load_seed_table())
        blocks = render_blocks(context, ["summary", "metrics"])
        return f'<div class="mnist-kmeans-run">{blocks}<p><code>{escape(str(self.report_path))}</code></p></div>'

    # --- checks at the edge ---------------------------------------------------------------------------------------

    def _k(self, k: Any) -> int:
        ks = [r["k"] for r in self._data.results]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) not in ks:
            raise UserError(f"{self.path}: K={k!r} is not in this run's K grid {ks}")
        return int(k)

    @property
    def _chunk_rows(self) -> int:
        """Rows of one chunk of the run's store (the manifest's), the block of the evaluation's assignment."""
        from mnist_kmeans.data.store import DEFAULT_CHUNK_ROWS

        rows = ((self._data.manifest or {}).get("data") or {}).get("chunk_rows")
        return rows if isinstance(rows, int) and rows > 0 else DEFAULT_CHUNK_ROWS

    def _pixels(self, images: Any) -> np.ndarray:
        """``images`` as the store's reader gives rows: float32 in [0, 1], (n, H*W)."""
        h, w = self._data.image_shape
        array = np.asarray(images)
        if array.ndim not in (2, 3) or array.shape[1:] not in ((h * w,), (h, w)) or len(array) == 0:
            raise UserError(f"images: expected shape (n, {h}, {w}) or (n, {h * w}) with n >= 1, got {array.shape}")
        rows = array.reshape(len(array), h * w)
        if rows.dtype == np.uint8:
            return np.divide(rows, np.float32(255), dtype=np.float32)  # exactly as data.store.load_chunk
        if not np.issubdtype(rows.dtype, np.floating):
            raise UserError(f"images: expected uint8 (0-255) or float in [0, 1], got dtype {rows.dtype}")
        if not np.isfinite(rows).all() or rows.min() < 0 or rows.max() > 1:
            raise UserError("images: float pixels must be finite and in [0, 1] (uint8 images are divided by 255)")
        return rows.astype(np.float32)
