"""One job end to end: run directory, store, cluster, fit and evaluation, results, report; and ``--resume``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mnist_kmeans import __version__
from mnist_kmeans.checkpoint import Checkpoint
from mnist_kmeans.config import DEFAULT_SOURCE, JobConfig, load_cluster, load_job, with_overrides
from mnist_kmeans.data.store import StoreInfo, is_remote, open_store, read_attrs, read_rows
from mnist_kmeans.errors import ClusterError, UserError
from mnist_kmeans.evaluate import accuracy, cluster_metrics, label_map, misclassified_task
from mnist_kmeans.files import write_atomic, write_json
from mnist_kmeans.fit import FitParams
from mnist_kmeans.schedule import KResult, FitPlan, Progress, run_chains

GALLERY_SIZE = 32


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def ensure_store(url: str, log: Any) -> tuple[StoreInfo, float]:
    """Open the job's store; a missing or unfinished local store is first ingested from ``data/mnist/``."""
    t0 = time.perf_counter()
    attrs = read_attrs(url)
    if attrs is None or attrs.get("complete") is not True:
        if is_remote(url):
            return open_store(url), 0.0  # raises the "no store / incomplete" error: we never write a remote store here
        if attrs is not None and attrs.get("format") not in (None, "mnist-kmeans/1"):
            return open_store(url), 0.0  # a store of another format: refuse, do not overwrite
        from mnist_kmeans.data.ingest import ingest

        # ingest's own progress lines are held back until it succeeds; an error stays one line
        ingest(DEFAULT_SOURCE, url, log=log)
        log(f"ingested {DEFAULT_SOURCE}/ into {url} (there was no complete store)")
    return open_store(url), time.perf_counter() - t0


def check_job_against_data(job: JobConfig, job_file: str, info: StoreInfo) -> None:
    for k in job.k_grid:
        if k > info.n_train:
            raise UserError(f"{job_file}: k_grid: K={k} is larger than the {info.n_train} training rows of {info.url}")


def _versions() -> dict[str, str]:
    from importlib import metadata

    import dask
    import distributed
    import zarr

    def version(dist: str) -> str:  # from the metadata: importing scikit-learn or dask-ml here would cost seconds
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "mnist_kmeans": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "dask_ml": version("dask-ml"),
        "scikit-learn": version("scikit-learn"),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


def _prepare_run_dir(job: JobConfig, out: str | None, resume: str | None, info_url: str) -> tuple[Path, bool]:
    """The run directory and whether it is a resume; refuses anything that would mix or overwrite runs.

    Only checks: nothing is created until the cluster answers, so a run that never started leaves nothing behind.
    """
    if resume:
        run_dir = Path(resume)
        saved = run_dir / "job.yaml"
        if not saved.is_file() or not (run_dir / "centroids.zarr").is_dir():
            raise UserError(f"{run_dir}: not a run directory to resume (no job.yaml or centroids.zarr)")
        try:
            before = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            raise UserError(f"{saved}: not valid YAML") from None
        now = job.to_yaml_dict()
        if not isinstance(before, dict):
            raise UserError(f"{saved}: must hold a YAML mapping")
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                raise UserError(
                    f"{saved}: the run was made with {key}={before.get(key)!r}, this job has {key}={now.get(key)!r}; "
                    "resume with the same job and store, or start a new run"
                )
        return run_dir, True
    run_dir = Path(out) if out else Path("runs") / f"{job.slug}-{utc_stamp()}"
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"{run_dir}: run directory exists and is not empty (use --resume {run_dir} to continue it)")
    return run_dir, False


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create run directory: {exc.strerror or exc}") from None


def _check_same_store(run_dir: Path, info: StoreInfo) -> None:
    manifest = run_dir / "manifest.json"
    try:
        saved = json.loads(manifest.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{manifest}: missing or unreadable; cannot check that the store is the same") from None
    if saved.get("ingest_id") != info.ingest_id or saved.get("md5") != info.md5:
        raise UserError(f"{manifest}: the run was made on another store than {info.url}; resume with the same store")


def results_table(
    best: dict[int, KResult], job: JobConfig, scores: dict[int, dict[str, float]]
) -> tuple[list[dict], dict[str, list], dict]:
    """metrics.json's ``results``, label_maps.json, and evaluation.json's per-K tables; ``scores``: the
    :func:`~mnist_kmeans.evaluate.cluster_metrics` of each K."""
    rows, maps, tables = [], {}, {}
    for k, r in best.items():
        mapping = label_map(r.train.contingency)
        maps[str(k)] = mapping
        tables[str(k)] = {"train": r.train.contingency.tolist(), "test": r.test.contingency.tolist()}
        rows.append(
            {
                "k": k,
                "inertia": r.train.inertia,
                **scores[k],
                "accuracy_train": accuracy(r.train.contingency, mapping),
                "accuracy_test": accuracy(r.test.contingency, mapping),
                "n_empty_clusters": int(sum(m is None for m in mapping)),
                "epochs": job.epochs,
                "lloyd_steps": job.lloyd_steps,
                "n_init": job.restarts(k),
                "restart": r.restart,
                "restart_inertia": r.restart_inertia,
                "inertia_test": r.test.inertia,
                "inertia_per_epoch": r.trajectory,
                "fit_seconds": round(r.fit_seconds, 3),
            }
        )
    return rows, maps, tables


def plan_of(job: JobConfig, info: StoreInfo) -> FitPlan:
    return FitPlan(
        info=info,
        restarts={k: job.restarts(k) for k in job.k_grid},
        epochs=job.epochs,
        lloyd_steps=job.lloyd_steps,
        params=FitParams(batch_size=job.batch_size, seed=job.seed, screen_rows=job.screen_rows),
    )


def fit_and_evaluate(client: Any, job: JobConfig, info: StoreInfo, ckpt: Checkpoint, progress: Progress | None = None):
    """The distributed part of a job: every K fitted and evaluated, its best restart chosen.

    Returns the result per K, metrics.json's rows, the label maps and the contingency tables.
    """
    best = {r.k: r for r in run_chains(client, plan_of(job, info), ckpt, progress or Progress())}
    # on the cluster, where scikit-learn is imported already (this process never imports it)
    futures = {k: client.submit(cluster_metrics, r.train.contingency, pure=False) for k, r in best.items()}
    rows, maps, tables = results_table(best, job, {k: f.result() for k, f in futures.items()})
    return best, rows, maps, tables


def pick_best_k(rows: list[dict]) -> int:
    """The K with the highest adjusted Rand index on the training split.

    Not the highest accuracy: majority-label accuracy (like homogeneity) rises with K by construction, so it would
    always pick the largest K. ARI is adjusted for chance and comparable across K.
    """
    return max(rows, key=lambda row: (row["ari"], -row["k"]))["k"]


def run_job(
    job_file: str,
    cluster_file: str | None = None,
    scheduler: str | None = None,
    store: str | None = None,
    out: str | None = None,
    resume: str | None = None,
    argv: Sequence[str] = (),
    log: Any = None,
) -> Path:
    """Run a job file end to end and return the path of its report."""
    try:
        return _run_job(job_file, cluster_file, scheduler, store, out, resume, argv, log)
    finally:
        if "mnist_kmeans.cluster" in sys.modules:  # an embedded cluster may still be closing behind the report
            sys.modules["mnist_kmeans.cluster"].wait_closed()


def _run_job(
    job_file: str,
    cluster_file: str | None,
    scheduler: str | None,
    store: str | None,
    out: str | None,
    resume: str | None,
    argv: Sequence[str],
    log: Any,
) -> Path:
    t_total = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    job = with_overrides(load_job(job_file), store=store)
    if cluster_file is None and Path("cluster.yaml").is_file():
        cluster_file = "cluster.yaml"
    cluster_cfg = load_cluster(cluster_file)
    run_dir, resuming = _prepare_run_dir(job, out, resume, job.store)
    info, ingest_s = ensure_store(job.store, log)
    check_job_against_data(job, job_file, info)
    if resuming:
        _check_same_store(run_dir, info)
        ckpt = Checkpoint.open(run_dir / "centroids.zarr")  # validated before any cluster starts
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    from mnist_kmeans.cluster import connect

    t_cluster = time.perf_counter()
    with connect(cluster_cfg, scheduler) as (client, cinfo):
        cluster_start_s = time.perf_counter() - t_cluster
        print(f"dashboard: {cinfo.dashboard}", flush=True)
        manifest = {
            "started_utc": started,
            "command": list(argv),
            "job_file": str(job_file),
            "versions": _versions(),
            "platform": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
            "cluster": cinfo.as_dict(),
            "data": {
                "store": info.url,
                "source": info.source,
                "md5": info.md5,
                "ingest_id": info.ingest_id,
                "n_train": info.n_train,
                "n_test": info.n_test,
                "chunk_rows": info.chunk_rows,
            },
            "resumed": resuming,
        }
        if not resuming:
            _make_run_dir(run_dir)
            write_atomic(run_dir / "job.yaml", yaml.safe_dump(job.to_yaml_dict(), sort_keys=False))
            write_json(run_dir / "manifest.json", manifest)
            ckpt = Checkpoint.create(run_dir / "centroids.zarr", info.image_shape)
        t_fit = time.perf_counter()
        try:
            # written under a temporary name and renamed: a cut-short run never leaves a truncated report
            partial_report = run_dir / ".dask-performance.html.partial"
            code = shlex.join(argv) + "\n\n" + yaml.safe_dump(job.to_yaml_dict(), sort_keys=False)
            with _performance_report(str(partial_report), code):
                best, rows, maps, tables = fit_and_evaluate(client, job, info, ckpt)
                best_k = pick_best_k(rows)
                gallery = _gallery(client, info, best[best_k], maps[str(best_k)])
                t_done = time.perf_counter()
                fit_end = max(r.fit_seconds for r in best.values()) + t_fit
                timings = {
                    "cluster_start_s": round(cluster_start_s, 3),
                    "ingest_s": round(ingest_s, 3),
                    "fit_s": round(min(fit_end, t_done) - t_fit, 3),
                    "evaluate_s": round(max(t_done - fit_end, 0.0), 3),
                    "report_s": 0.0,
                    "total_s": 0.0,
                }
                metrics = _write_results(run_dir, ckpt, job, info, cinfo, best, rows, maps, tables, best_k, gallery,
                                         timings, started)
                if resuming:
                    manifest["resumed_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                    previous = json.loads((run_dir / "manifest.json").read_text())
                    write_json(run_dir / "manifest.json", {**previous, "resumed": manifest})
                t_report = time.perf_counter()
                report = _Report(run_dir, client)  # figures drawn by the workers while this `with` ends (perf. report)
            os.replace(partial_report, run_dir / "dask-performance.html")
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted: finished epochs are saved; continue with: {_resume_command(job_file, run_dir, store)}"
            ) from None
        except (UserError, ClusterError):
            raise
        except Exception as exc:
            _raise_cluster_or_data_error(exc, run_dir, job_file, store=store, client=client)
            raise

        def final_timings() -> dict[str, float]:
            """Called by the report just before its page is rendered: the rest (a few writes) takes milliseconds."""
            metrics["timings"]["report_s"] = round(time.perf_counter() - t_report, 3)
            metrics["timings"]["total_s"] = round(time.perf_counter() - t_total, 3)
            write_json(run_dir / "metrics.json", metrics)
            return metrics["timings"]

        return report.write(final_timings)


def _write_results(
    run_dir: Path,
    ckpt: Checkpoint,
    job: JobConfig,
    info: StoreInfo,
    cinfo: Any,
    best: dict[int, KResult],
    rows: list[dict],
    maps: dict[str, list],
    tables: dict,
    best_k: int,
    gallery: dict[str, np.ndarray],
    timings: dict[str, float],
    started: str,
) -> dict[str, Any]:
    """Every file of the run directory but the two reports; returns metrics.json's content (written too)."""
    for k, r in best.items():
        ckpt.save_result(k, r.centers, ckpt.epoch_centers(k, r.restart))
    _write_samples(run_dir, info, gallery, best_k)
    write_json(run_dir / "label_maps.json", maps)
    write_json(run_dir / "evaluation.json", {"n_classes": info.n_classes, "best_k": best_k, "contingency": tables})
    metrics = {
        "job": job.name,
        "dataset": {
            "store": info.url,
            "n_train": info.n_train,
            "n_test": info.n_test,
            "n_classes": info.n_classes,
            "image_shape": list(info.image_shape),
        },
        "results": rows,
        "best_k": best_k,
        "inertia_per_epoch_note": (
            "exact training inertia after each of the epochs mini-batch epochs, then after each full-batch Lloyd step"
        ),
        "restart_inertia_note": (
            "exact training inertia of each restart after its first screen_rows rows; only the lowest (restart) went on"
        ),
        "timings": timings,
        "cluster": {k: v for k, v in cinfo.as_dict().items() if k != "embedded"},
        "started_utc": started,
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics


class _Report:
    """report.html of a finished run. Its figures are drawn on the cluster's workers, idle by then, one task each,
    while this process writes the performance report (each takes a second or two alone); here if that fails."""

    def __init__(self, run_dir: Path, client: Any):
        from mnist_kmeans.report.html import build_figures, load_run, load_seed_table

        self.run, self.seed_table = load_run(run_dir), load_seed_table()

        def submit(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return client.submit(fn, *args, pure=False, **kwargs)

        self.figs, self.notes = build_figures(self.run, self.seed_table, draw=submit)

    def write(self, final_timings: Any) -> Path:
        from mnist_kmeans.report.html import build_figures, write_report

        try:
            figs, notes = [dataclasses.replace(f, png=f.png.result()) for f in self.figs], self.notes
        except Exception:  # a worker without matplotlib, a cluster gone: the figures do not need one
            figs, notes = build_figures(self.run, self.seed_table)
        return write_report(self.run, figs, notes, self.seed_table, final_timings)


def _performance_report(filename: str, code: str) -> Any:
    """distributed's ``performance_report``, inline (it opens offline), whose "calling code" is ``code`` (the job):
    by default it finds its caller's source with ``inspect``, a third of a second in a process of this size."""
    from distributed import get_client, performance_report

    class Report(performance_report):
        def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
            get_client().sync(self.__aexit__, exc_type, exc_value, traceback, code=code)

    return Report(filename=filename, mode="inline")


def _gallery(client: Any, info: StoreInfo, best: KResult, mapping: list[int | None]) -> dict[str, np.ndarray]:
    """The first misclassified test digits of the best model, found on the workers."""
    futures = [
        client.submit(misclassified_task, best.centers, mapping, info, j, GALLERY_SIZE, pure=False)
        for j in range(info.n_chunks("test"))
    ]
    images, true, pred = [], [], []
    for fut in futures:
        im, t, p = fut.result()
        images.append(im), true.append(t), pred.append(p)
        if sum(len(t) for t in true) >= GALLERY_SIZE:
            break
    client.cancel(futures)
    return {
        "images": np.concatenate(images)[:GALLERY_SIZE],
        "true": np.concatenate(true)[:GALLERY_SIZE],
        "pred": np.concatenate(pred)[:GALLERY_SIZE],
    }


def _write_samples(run_dir: Path, info: StoreInfo, gallery: dict[str, np.ndarray], best_k: int) -> None:
    """``samples.zarr``: the first nine training digits and the misclassified gallery, for the report."""
    import zarr

    h, w = info.image_shape
    images, labels = read_rows(info.url, "train", 0, min(9, info.n_train))  # nine rows: fine on the client
    path = run_dir / "samples.zarr"
    try:
        group = zarr.create_group(store=str(path), zarr_format=3, overwrite=True)
        group.create_array("train_first", data=images.reshape(-1, h, w), attributes={"labels": [int(v) for v in labels]})
        group.create_array(
            "misclassified",
            data=gallery["images"].reshape(-1, h, w).astype(np.uint8),
            attributes={"true": [int(v) for v in gallery["true"]], "pred": [int(v) for v in gallery["pred"]], "k": best_k},
        )
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _resume_command(job_file: str, run_dir: Path, store: str | None) -> str:
    """The command line that continues this run (``--store`` too when it was given: a resume must use the same)."""

    parts = ["mnist-kmeans", "run", str(job_file), "--resume", str(run_dir)] + (["--store", store] if store else [])
    return shlex.join(parts)


def _raise_cluster_or_data_error(
    exc: Exception, run_dir: Path, job_file: str, store: str | None = None, client: Any = None
) -> None:
    """Turn what a lost cluster raises into a ClusterError that says how to resume; leave other errors alone.

    A cluster is lost when the client lost its scheduler (whatever the exception that surfaced first), or when a
    task could not survive the workers that died under it (``KilledWorker``), or a comm failed. A file system error
    of the run directory is not a lost cluster: the checkpoint and ``files.py`` already raise it as a UserError.
    """
    import errno

    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    cause = exc.__context__  # e.g. the checkpoint's UserError, then dask-performance.html failing on the same disk
    while cause is not None:
        if isinstance(cause, (UserError, ClusterError)):
            raise cause from None
        cause = cause.__context__
    disk_errnos = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}
    in_run_dir = isinstance(exc, OSError) and bool(exc.filename) and os.path.abspath(str(exc.filename)).startswith(
        os.path.abspath(run_dir) + os.sep
    )
    if isinstance(exc, OSError) and not isinstance(exc, CommClosedError) and (in_run_dir or exc.errno in disk_errnos):
        # e.g. dask-performance.html on a full disk; nothing written so far is passed off as complete
        raise UserError(f"{exc.filename or run_dir}: cannot write: {exc.strerror or exc}") from None
    lost_scheduler = client is not None and getattr(client, "status", "running") not in ("running", "connecting")
    if lost_scheduler or isinstance(exc, (KilledWorker, FutureCancelledError, OSError, TimeoutError)):
        what = "lost the scheduler" if lost_scheduler else "lost the cluster"
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ClusterError(
            f"{what} ({reason}); finished epochs are saved in {run_dir}, continue on any cluster with: "
            f"{_resume_command(job_file, run_dir, store)}"
        ) from None
