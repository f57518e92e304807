"""One job end to end: run directory, store, cluster, fit and evaluation, results, report; and ``--resume``.

:func:`run_job` is a pipeline of short steps, each passing its result on:

1. :func:`prepare` checks all that can be checked before a cluster starts (job file, cluster file, run directory,
   store) and returns a :class:`JobRun`; nothing is written yet, so a run that never started leaves nothing behind;
2. ``cluster.connect`` starts or joins the cluster (``cluster.given``: the Python API's own client);
3. :func:`start_run_dir` writes a new run's ``job.yaml``, ``manifest.json`` and empty checkpoint (:class:`ClusterRun`);
4. :func:`evaluate_run` fits and evaluates every K and picks the best (:class:`Results`);
5. :func:`write_results` writes every result file; then the performance report and ``report.html``.

The command line (``cli.py``) and the Python API (``api.py``) both call :func:`run_job`; only the connection differs.
Steps 4 and 5 are :func:`run_recorded`, which ``status.json`` follows stage by stage; a submitted job's driver
(``submit.py``) runs the very same steps on the cluster, its client a worker's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import yaml

from mnist_kmeans import __version__
from mnist_kmeans.checkpoint import Checkpoint, CheckpointLayout
from mnist_kmeans.claim import RunDirClaim, claim_run_dir
from mnist_kmeans.config import (
    ClusterConfig,
    JobConfig,
    JobSpec,
    default_source,
    default_store,
    load_cluster,
    local_path_option,
    refuse_memory_store,
    resolve_job,
    with_overrides,
)
from mnist_kmeans.data.staging import local_path
from mnist_kmeans.data.store import FORMAT, StoreInfo, open_store, read_attrs, read_rows
from mnist_kmeans.errors import Cancelled, ClusterError, Log, UserError, count, shorten, to_stderr
from mnist_kmeans.evaluate import accuracy, cluster_metrics, label_map, misclassified_task
from mnist_kmeans.files import write_atomic, write_json
from mnist_kmeans.fit import FitParams
from mnist_kmeans.kselect import CRITERIA, inertia_knee, k_selection, sample_rows
from mnist_kmeans.reading import read_yaml_mapping
from mnist_kmeans.schedule import FitPlan, KResult, Progress, run_chains, task_key
from mnist_kmeans.status import (
    JobStatus,
    State,
    StatusProgress,
    attempts,
    cancel_requested,
    clear_cancel,
    ended,
    write_status,
)

if TYPE_CHECKING:  # cluster.py imports distributed: at run time only once the job has been checked
    from distributed import Client

    from mnist_kmeans.cluster import ClusterInfo

GALLERY_SIZE = 32


def utc_stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --- the steps' results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRun:
    """A job checked and ready to run (:func:`prepare`): what every later step reads."""

    job_file: str | None  # None: a job given to the Python API as a mapping or a JobConfig
    job: JobConfig  # with the command line's overrides
    cluster: ClusterConfig
    store_option: str | None  # ``--store`` as given: the resume command repeats it
    argv: Sequence[str]  # the command line, recorded in the manifest and the performance report
    run_dir: Path
    resuming: bool
    info: StoreInfo | None  # None until the default store is ingested (:func:`ingest_default`)
    ingest_s: float
    checkpoint: Checkpoint | None  # the resumed run's; a new run's is created once the cluster answers
    started: str  # UTC, ISO 8601
    t_start: float  # ``time.perf_counter()`` when the job started, for ``total_s``
    claim: RunDirClaim  # held until the job ends

    @property
    def job_label(self) -> str:
        """How error lines name the job: its file, or ``job`` (the Python API's argument)."""
        return self.job_file or "job"

    @property
    def job_yaml(self) -> str:
        """The job as resolved, as ``job.yaml`` holds it."""
        return yaml.safe_dump(self.job.to_yaml_dict(), sort_keys=False)

    def resume_command(self) -> str:
        """The command line that continues this run (``--store`` too when it was given: a resume must use the same).
        A job without a file (the Python API's mapping) is resumed from the run's own ``job.yaml``, the same job."""
        store = ["--store", local_path_option(self.store_option)] if self.store_option else []
        # absolute, like the rest: it works from any directory
        job_file = os.path.abspath(self.job_file) if self.job_file else str(self.run_dir / "job.yaml")
        return shlex.join(["mnist-kmeans", "run", job_file, "--resume", str(self.run_dir), *store])


@dataclass(frozen=True)
class ClusterRun:
    """A :class:`JobRun` on its connected cluster, its run directory started (:func:`start_run_dir`)."""

    run: JobRun
    client: Client
    cluster_info: ClusterInfo
    checkpoint: Checkpoint
    manifest: dict[str, Any]  # of this start; a resume adds it to the saved one once the results are written
    cluster_start_s: float
    progress: StatusProgress  # the fit's, which writes status.json too


class FitOutcome(NamedTuple):
    """What :func:`fit_and_evaluate` found (a tuple: callers may unpack it)."""

    best: dict[int, KResult]  # the chosen restart of each K
    rows: list[dict]  # metrics.json's ``results``
    label_maps: dict[str, list]  # label_maps.json
    contingency: dict[str, dict]  # evaluation.json's per-K tables


@dataclass(frozen=True)
class Results:
    """Everything the result files hold (:func:`evaluate_run`)."""

    fit: FitOutcome
    best_k: int
    gallery: dict[str, np.ndarray]  # the best model's first misclassified test digits
    timings: dict[str, float]  # metrics.json's; ``report_s`` and ``total_s`` are filled in last
    k_selection: dict[str, Any] = dataclasses.field(default_factory=dict)  # metrics.json's (kselect.k_selection)


# --- before the cluster: prepare ---------------------------------------------------------------------------------


def prepare(
    job_spec: JobSpec,
    cluster: ClusterConfig,
    store: str | None,
    out: str | None,
    resume: str | None,
    argv: Sequence[str],
    log: Log,
    t_start: float,
) -> JobRun:
    """Read the job (``resolve_job``), open the store, claim the run directory; writes nothing else. ``cluster``: the
    cluster file as ``load_cluster`` read it (its storage options open the store).

    The default store, when it is not there yet, is ingested only once the cluster runs (:func:`ingest_default`), so
    that the dashboard line comes first; every other store must be there and complete.
    """
    job, job_file = resolve_job(job_spec)
    job = with_overrides(job, store=local_path_option(store))
    refuse_memory_store(job.store)
    run_dir, resuming = _prepare_run_dir(job, out, resume)
    info = None if _to_ingest(job.store) and not resuming else ensure_store(job.store, log, cluster.storage)[0]
    checkpoint = None
    if info is not None:
        check_job_against_data(job, job_file or "job", info)
    if resuming:
        _check_same_store(run_dir, info)
        checkpoint = Checkpoint.open(run_dir / "centroids.zarr", checkpoint_layout(job, info))
    return JobRun(
        job_file=job_file,
        job=job,
        cluster=cluster,
        store_option=store,
        argv=argv,
        run_dir=run_dir,
        resuming=resuming,
        info=info,
        ingest_s=0.0,
        checkpoint=checkpoint,
        started=_utc_now(),
        t_start=t_start,
        claim=claim_run_dir(run_dir, resuming),  # last: a refusal above leaves nothing to undo
    )


def _to_ingest(url: str) -> bool:
    """Whether ``url`` is the default store (however spelled) and must be ingested first: missing, or unfinished
    (``complete: false``). Any other store must be there and complete, or the job would silently run on other data
    than it names (``open_store``'s error says how to make it); docs/contract.md, "run"."""
    if local_path(url) != local_path(default_store()):
        return False
    attrs = read_attrs(url)
    return attrs is None or (attrs.get("format") == FORMAT and attrs.get("complete") is False)


def ingest_default(run: JobRun, log: Log) -> JobRun:
    """``run`` with its store open: the default store ingested now if :func:`prepare` left it to do."""
    if run.info is not None:
        return run
    info, ingest_s = ensure_store(run.job.store, log, run.cluster.storage)
    check_job_against_data(run.job, run.job_label, info)
    return dataclasses.replace(run, info=info, ingest_s=ingest_s)


def checkpoint_layout(job: JobConfig, info: StoreInfo) -> CheckpointLayout:
    """What the checkpoint of ``job`` on ``info`` must hold; a resume checks the saved one against it."""
    restarts = {k: job.restarts(k) for k in job.k_grid}
    return CheckpointLayout(info.image_shape, restarts, job.epochs, job.lloyd_steps)


def ensure_store(url: str, log: Log, options: dict[str, Any] | None = None) -> tuple[StoreInfo, float]:
    """Open the job's store (with the cluster file's storage options, which travel to the workers in the returned
    StoreInfo), the default store ingested first from the default source if :func:`_to_ingest`."""
    t0 = time.perf_counter()
    if _to_ingest(url):
        from mnist_kmeans.data.ingest import ingest

        # ingest's own progress lines are held back until it succeeds; an error stays one line
        source = default_source()
        ingest(source, url, log=log)
        log(f"ingested {source}/ into {url} (there was no complete store)")
    return open_store(url, options), time.perf_counter() - t0


def check_job_against_data(job: JobConfig, job_label: str, info: StoreInfo) -> None:
    for k in job.k_grid:
        if k > info.n_train:
            raise UserError(f"{job_label}: k_grid: K={k} is larger than the {info.n_train} training rows of {info.url}")


def _prepare_run_dir(job: JobConfig, out: str | None, resume: str | None) -> tuple[Path, bool]:
    """The run directory and whether it is a resume; refuses anything that would mix or overwrite runs."""
    if resume:
        run_dir = Path(os.path.abspath(resume))
        if out is not None and Path(os.path.abspath(out)) != run_dir:
            raise UserError(f"--out {shorten(out)}: a resume writes into its run directory {run_dir}; drop --out")
        return _run_dir_to_resume(job, run_dir), True
    run_dir = Path(os.path.abspath(out)) if out else _default_run_dir(job)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"{run_dir}: run directory exists and is not empty (use --resume {run_dir} to continue it)")
    return run_dir, False


def _default_run_dir(job: JobConfig) -> Path:
    """``runs/<job>-<UTC timestamp>``, with a suffix when a run of the same second has taken that name."""
    base = Path(os.path.abspath("runs")) / f"{job.slug}-{utc_stamp()}"
    for n in range(1, 100):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not candidate.exists():
            return candidate
    return base  # refused by the caller as not empty


def _run_dir_to_resume(job: JobConfig, run_dir: Path) -> Path:
    """``run_dir`` if it is a run directory of this very job (its saved ``job.yaml`` equal to ``job``)."""
    saved = run_dir / "job.yaml"
    if not saved.is_file() or not (run_dir / "centroids.zarr").is_dir():
        raise UserError(f"{run_dir}: not a run directory to resume (no job.yaml or centroids.zarr)")
    before = read_yaml_mapping(saved)  # bounded like the job file: the run directory may come from anyone
    now = job.to_yaml_dict()
    for key in sorted(set(before) | set(now), key=str):
        if before.get(key) != now.get(key):
            was, has = shorten(f"{key}={before.get(key)!r}"), shorten(f"{key}={now.get(key)!r}")
            raise UserError(
                f"{saved}: the run was made with {was}, this job has {has}; "
                "resume with the same job and store, or start a new run"
            )
    return run_dir


def _check_same_store(run_dir: Path, info: StoreInfo) -> None:
    manifest = run_dir / "manifest.json"
    try:
        saved = json.loads(manifest.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{manifest}: missing or unreadable; cannot check that the store is the same") from None
    if saved.get("ingest_id") != info.ingest_id or saved.get("md5") != info.md5:
        raise UserError(f"{manifest}: the run was made on another store than {info.url}; resume with the same store")


# --- on the cluster: the run directory, fit and evaluation, results ----------------------------------------------


def run_job(
    job: JobSpec,
    cluster_file: str | None = None,
    scheduler: str | None = None,
    store: str | None = None,
    out: str | None = None,
    resume: str | None = None,
    argv: Sequence[str] = (),
    log: Log | None = None,
    client: Client | None = None,
) -> Path:
    """Run a job end to end and return the path of its report: ``mnist-kmeans run`` and ``mnist_kmeans.run``.

    ``job``: a job file, or for the Python API a mapping or JobConfig (``config.resolve_job``). ``client``: the
    Python API's own client, used and left open (``cluster.given``); without it the cluster of ``cluster_file`` and
    ``scheduler`` is joined or started as the command line does (``cluster.connect``). Nothing else differs.
    """
    t_start, log = time.perf_counter(), log or to_stderr
    run = prepare(job, load_cluster(cluster_file), store, out, resume, argv, log, t_start)
    # only now: a bad job file answers without importing dask
    from mnist_kmeans.cluster import connect, given, interrupts_deferred, wait_closed

    try:
        t_connect = time.perf_counter()
        connection = given(client) if client is not None else connect(run.cluster, scheduler)
        with connection as (client, cluster_info):
            cluster_start_s = time.perf_counter() - t_connect
            print(f"dashboard: {cluster_info.dashboard}", flush=True)
            run = ingest_default(run, log)
            with interrupts_deferred() as interrupted:  # a run directory is started whole, or not at all
                session = start_run_dir(run, client, cluster_info, cluster_start_s)
            if interrupted:
                raise KeyboardInterrupt(f"interrupted; continue with: {run.resume_command()}")
            return run_recorded(session)
    finally:
        run.claim.release()
        wait_closed()  # an embedded cluster may still be closing behind the report


def start_run_dir(
    run: JobRun, client: Client, cluster_info: ClusterInfo, cluster_start_s: float, cancels: bool = True
) -> ClusterRun:
    """Once the cluster answered: a new run's directory, ``job.yaml``, ``manifest.json`` and empty checkpoint.

    A start on purpose (``run``, ``submit``: ``cancels``) drops an earlier ``cancel`` of the job; a submitted job's
    driver, which starts the job again on its own, honours it.
    """
    manifest = _manifest(run, cluster_info)
    checkpoint = run.checkpoint
    if not run.resuming:
        write_atomic(run.run_dir / "job.yaml", run.job_yaml)
        write_json(run.run_dir / "manifest.json", manifest)
        checkpoint = Checkpoint.create(run.run_dir / "centroids.zarr", run.info.image_shape)
    if cancels:
        clear_cancel(run.run_dir)
    progress = StatusProgress(run.run_dir, attempts(run.run_dir) + 1)
    return ClusterRun(run, client, cluster_info, checkpoint, manifest, cluster_start_s, progress)


def run_recorded(session: ClusterRun) -> Path:
    """Fit, evaluate, write the results and the reports, saying each stage in ``status.json`` (docs/contract.md,
    "status.json"), the end too, however it comes; returns the report's path. What ``run`` and a driver share."""
    run, attempt = session.run, session.progress.attempt
    try:
        if cancel_requested(run.run_dir):
            raise Cancelled(f"cancelled before it started; continue with: {run.resume_command()}")
        write_status(run.run_dir, JobStatus(State.FITTING, "starting", attempt=attempt))
        final_timings, report = _results_and_reports(session)
        path = report.write(final_timings)
    except BaseException as exc:
        write_status(run.run_dir, ended(exc, attempt), strict=False)  # the error, not a failed write of it, is said
        raise
    write_status(run.run_dir, JobStatus(State.DONE, str(path), 0, attempt))
    return path


def _manifest(run: JobRun, cluster_info: ClusterInfo) -> dict[str, Any]:
    info = run.info
    return {
        "started_utc": run.started,
        "command": list(run.argv),
        "job_file": run.job_file,  # null for the Python API's mapping or JobConfig
        "versions": _versions(),
        "platform": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
        "cluster": cluster_info.as_dict(),
        "data": {
            "store": info.url,
            "source": info.source,
            "md5": info.md5,
            "ingest_id": info.ingest_id,
            "n_train": info.n_train,
            "n_test": info.n_test,
            "chunk_rows": info.chunk_rows,
        },
        "resumed": run.resuming,
    }


def _versions() -> dict[str, str]:
    import dask
    import distributed
    import zarr

    return {
        "python": platform.python_version(),
        "mnist_kmeans": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "dask_ml": _installed_version("dask-ml"),
        "scikit-learn": _installed_version("scikit-learn"),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


def _installed_version(dist: str) -> str:
    """From the package metadata: importing scikit-learn or dask-ml here would cost seconds."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _results_and_reports(session: ClusterRun) -> tuple[_FinalTimings, _Report]:
    """Fit, evaluate and write the results, under a performance report; the figures are left drawing."""
    run = session.run
    _import_report_modules()
    t_fit = time.perf_counter()
    # written under a temporary name and renamed: a cut-short run never leaves a truncated report, nor the partial one
    partial_report = run.run_dir / ".dask-performance.html.partial"
    try:
        with _one_line_errors(session):
            with _performance_report(str(partial_report), shlex.join(run.argv) + "\n\n" + run.job_yaml):
                results = evaluate_run(session, t_fit)
                metrics = write_results(session, results)
                if run.resuming:
                    _record_resume(session)
                t_report = time.perf_counter()
                report = _Report(run.run_dir, session.client)  # figures drawn by the workers while this `with` ends
            os.replace(partial_report, run.run_dir / "dask-performance.html")
    finally:
        partial_report.unlink(missing_ok=True)
    return _FinalTimings(run.run_dir / "metrics.json", metrics, t_report, run.t_start), report


def _import_report_modules() -> None:
    """Import now what the report phase needs: a Ctrl-C that lands inside an import can leave an import lock held, and
    the event loop thread, which imports fsspec's file system to write dask-performance.html, would wait on it."""
    import fsspec.implementations.local  # noqa: F401

    from mnist_kmeans.reference import load_seed_table  # noqa: F401
    from mnist_kmeans.report import html  # noqa: F401


def evaluate_run(session: ClusterRun, t_fit: float) -> Results:
    """Every K fitted and evaluated, the best K picked and its gallery found; ``t_fit``: when the fit started."""
    run, client = session.run, session.client
    fit = fit_and_evaluate(client, run.job, run.info, session.checkpoint, session.progress)
    best_k = pick_best_k(fit.rows)
    selection = choose_k(client, fit.rows, run.job.seed, run.info)
    gallery = _gallery(client, run.info, fit.best[best_k], fit.label_maps[str(best_k)])
    t_done = time.perf_counter()
    fit_end = max(result.fit_seconds for result in fit.best.values()) + t_fit
    timings = {
        "cluster_start_s": round(session.cluster_start_s, 3),
        "ingest_s": round(run.ingest_s, 3),
        "fit_s": round(min(fit_end, t_done) - t_fit, 3),
        "evaluate_s": round(max(t_done - fit_end, 0.0), 3),
        "report_s": 0.0,
        "total_s": 0.0,
    }
    return Results(fit, best_k, gallery, timings, selection)


def plan_of(job: JobConfig, info: StoreInfo) -> FitPlan:
    return FitPlan(
        info=info,
        restarts={k: job.restarts(k) for k in job.k_grid},
        epochs=job.epochs,
        lloyd_steps=job.lloyd_steps,
        params=FitParams(
            batch_size=job.batch_size,
            seed=job.seed,
            screen_rows=job.screen_rows,
            max_no_improvement=job.max_no_improvement,
        ),
    )


def fit_and_evaluate(
    client: Client, job: JobConfig, info: StoreInfo, ckpt: Checkpoint, progress: Progress | None = None
) -> FitOutcome:
    """The distributed part of a job: every K fitted and evaluated, its best restart chosen."""
    best = {result.k: result for result in run_chains(client, plan_of(job, info), ckpt, progress or Progress())}
    # on the cluster, where scikit-learn is imported already (this process never imports it)
    futures = {
        k: client.submit(cluster_metrics, result.train.contingency, key=task_key(f"metrics_k{k}"))
        for k, result in best.items()
    }
    rows, maps, tables = results_table(best, job, {k: future.result() for k, future in futures.items()})
    return FitOutcome(best, rows, maps, tables)


def results_table(
    best: dict[int, KResult], job: JobConfig, scores: dict[int, dict[str, float]]
) -> tuple[list[dict], dict[str, list], dict]:
    """metrics.json's ``results``, label_maps.json, and evaluation.json's per-K tables; ``scores``: the
    :func:`~mnist_kmeans.evaluate.cluster_metrics` of each K."""
    rows, maps, tables = [], {}, {}
    for k, result in best.items():
        mapping = label_map(result.train.contingency)
        maps[str(k)] = mapping
        tables[str(k)] = {"train": result.train.contingency.tolist(), "test": result.test.contingency.tolist()}
        rows.append(_result_row(result, job, scores[k], mapping))
    return rows, maps, tables


def _result_row(result: KResult, job: JobConfig, scores: dict[str, float], mapping: list[int | None]) -> dict:
    """One K's row of metrics.json's ``results``."""
    return {
        "k": result.k,
        "inertia": result.train.inertia,
        **scores,
        "accuracy_train": accuracy(result.train.contingency, mapping),
        "accuracy_test": accuracy(result.test.contingency, mapping),
        "n_empty_clusters": int(sum(m is None for m in mapping)),
        "epochs": job.epochs,
        "lloyd_steps": job.lloyd_steps,
        "n_init": job.restarts(result.k),
        "restart": result.restart,
        "restart_inertia": result.restart_inertia,
        "inertia_test": result.test.inertia,
        "inertia_per_epoch": result.trajectory,
        "fit_seconds": round(result.fit_seconds, 3),
        "fit_rows": result.fit_rows,
        **{name: result.selection.get(name) for name in CRITERIA},
        # how far the restarts agree at the screening (kselect.restart_agreement); null with one restart
        "restart_ari_mean": float(np.mean(result.restart_agreement)) if result.restart_agreement else None,
        "restart_ari_min": min(result.restart_agreement) if result.restart_agreement else None,
    }


def pick_best_k(rows: list[dict]) -> int:
    """The K with the highest adjusted Rand index on the training split.

    Not the highest accuracy: majority-label accuracy (like homogeneity) rises with K by construction, so it would
    always pick the largest K. ARI is adjusted for chance and comparable across K.
    """
    return max(rows, key=lambda row: (row["ari"], -row["k"]))["k"]


def choose_k(client: Client, rows: list[dict], seed: int, info: StoreInfo) -> dict[str, Any]:
    """metrics.json's ``k_selection``: each label-free criterion's K and the recommendation (kselect.k_selection);
    the knee is found on the cluster, where kneed and scipy are imported anyway."""
    ks, inertia = [row["k"] for row in rows], [row["inertia"] for row in rows]
    knee = client.submit(inertia_knee, ks, inertia, key=task_key("knee")).result()
    return k_selection(rows, knee, len(sample_rows(info.n_train, seed)))


def _gallery(client: Client, info: StoreInfo, best: KResult, mapping: list[int | None]) -> dict[str, np.ndarray]:
    """The first misclassified test digits of the best model, found on the workers."""
    futures = [
        client.submit(
            misclassified_task, best.centers, mapping, info, chunk, GALLERY_SIZE, key=task_key("gallery", f"c{chunk}")
        )
        for chunk in range(info.n_chunks("test"))
    ]
    images, true, pred = [], [], []
    for future in futures:
        chunk_images, chunk_true, chunk_pred = future.result()
        images.append(chunk_images)
        true.append(chunk_true)
        pred.append(chunk_pred)
        if sum(len(labels) for labels in true) >= GALLERY_SIZE:
            break
    client.cancel(futures)
    return {
        "images": np.concatenate(images)[:GALLERY_SIZE],
        "true": np.concatenate(true)[:GALLERY_SIZE],
        "pred": np.concatenate(pred)[:GALLERY_SIZE],
    }


def write_results(session: ClusterRun, results: Results) -> dict[str, Any]:
    """Every file of the run directory but the two reports; returns metrics.json's content (written too)."""
    run_dir, info, ckpt = session.run.run_dir, session.run.info, session.checkpoint
    for k, result in results.fit.best.items():
        ckpt.save_result(k, result.centers, ckpt.epoch_centers(k, result.restart))
    _write_samples(run_dir, info, results.gallery, results.best_k)
    write_json(run_dir / "label_maps.json", results.fit.label_maps)
    evaluation = {"n_classes": info.n_classes, "best_k": results.best_k, "contingency": results.fit.contingency}
    write_json(run_dir / "evaluation.json", evaluation)
    metrics = _metrics(session, results)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _metrics(session: ClusterRun, results: Results) -> dict[str, Any]:
    """metrics.json's content."""
    info = session.run.info
    return {
        "job": session.run.job.name,
        "dataset": {
            "store": info.url,
            "n_train": info.n_train,
            "n_test": info.n_test,
            "n_classes": info.n_classes,
            "image_shape": list(info.image_shape),
            # what the report words and compares by (docs/contract.md, "report.html"); null when the store has none
            "class_names": list(info.class_names) if info.class_names is not None else None,
            "augmented_from": info.augmented_from,
        },
        "results": results.fit.rows,
        "best_k": results.best_k,
        "k_selection": results.k_selection,
        "inertia_per_epoch_note": _inertia_note(session.run.job),
        "restart_inertia_note": (
            "exact training inertia of each restart after its first screen_rows rows; only the lowest (restart) went on"
        ),
        "timings": results.timings,
        "cluster": {key: value for key, value in session.cluster_info.as_dict().items() if key != "embedded"},
        "started_utc": session.run.started,
    }


def _inertia_note(job: JobConfig) -> str:
    """metrics.json's ``inertia_per_epoch_note``, in this job's numbers."""
    note = f"exact training inertia after each of the {count(job.epochs, 'mini-batch epoch')}"
    if job.lloyd_steps:
        note += f", then after each of the {count(job.lloyd_steps, 'full-batch Lloyd step')}"
    return note.replace("each of the 1 ", "the 1 ")


def _write_samples(run_dir: Path, info: StoreInfo, gallery: dict[str, np.ndarray], best_k: int) -> None:
    """``samples.zarr``: the first nine training digits and the misclassified gallery, for the report."""
    import zarr

    h, w = info.image_shape
    # nine rows: fine on the client
    images, labels = read_rows(info.url, "train", 0, min(9, info.n_train), info.storage_options)
    path = run_dir / "samples.zarr"
    try:
        group = zarr.create_group(store=str(path), zarr_format=3, overwrite=True)
        group.create_array(
            "train_first", data=images.reshape(-1, h, w), attributes={"labels": [int(v) for v in labels]}
        )
        group.create_array(
            "misclassified",
            data=gallery["images"].reshape(-1, h, w).astype(np.uint8),
            attributes={
                "true": [int(v) for v in gallery["true"]],
                "pred": [int(v) for v in gallery["pred"]],
                "k": best_k,
            },
        )
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _record_resume(session: ClusterRun) -> None:
    """A resume keeps the first start's manifest and records its own under ``resumed``."""
    manifest_file = session.run.run_dir / "manifest.json"
    resumed = {**session.manifest, "resumed_utc": _utc_now()}
    previous = json.loads(manifest_file.read_text())
    write_json(manifest_file, {**previous, "resumed": resumed})


# --- the reports -------------------------------------------------------------------------------------------------


def _performance_report(filename: str, code: str) -> Any:
    """distributed's ``performance_report``, inline (it opens offline), whose "calling code" is ``code`` (the job):
    by default it finds its caller's source with ``inspect``, a third of a second in a process of this size."""
    from distributed import get_client, performance_report

    class Report(performance_report):
        def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
            if exc_type is None:  # a run cut short keeps no performance report: nothing more to wait for
                get_client().sync(self.__aexit__, exc_type, exc_value, traceback, code=code)

    return Report(filename=filename, mode="inline")


class _Report:
    """report.html of a finished run. Its figures are drawn on the cluster's workers, idle by then, one task each,
    while this process writes the performance report (each takes a second or two alone); here if that fails."""

    def __init__(self, run_dir: Path, client: Client):
        from mnist_kmeans.reference import load_seed_table
        from mnist_kmeans.report import build_figures, load_run

        self.run, self.seed_table = load_run(run_dir, unfinished=True), load_seed_table()
        self.figs, self.notes = build_figures(self.run, self.seed_table, draw=partial(client.submit, pure=False))

    def write(self, final_timings: _FinalTimings) -> Path:
        from mnist_kmeans.report import build_figures, write_report

        try:
            figs, notes = [dataclasses.replace(f, png=f.png.result()) for f in self.figs], self.notes
        except Exception:  # a worker without matplotlib, a cluster gone: the figures do not need one
            figs, notes = build_figures(self.run, self.seed_table)
        return write_report(self.run, figs, notes, self.seed_table, final_timings)


@dataclass(frozen=True)
class _FinalTimings:
    """Called by the report just before its page is rendered: the report's time, the total and ``finished_utc``, into
    metrics.json (the rest, a few writes, takes milliseconds)."""

    metrics_file: Path
    metrics: dict[str, Any]
    t_report: float  # ``time.perf_counter()`` when the report started
    t_start: float

    def __call__(self) -> dict[str, float]:
        timings = self.metrics["timings"]
        timings["report_s"] = round(time.perf_counter() - self.t_report, 3)
        timings["total_s"] = round(time.perf_counter() - self.t_start, 3)
        self.metrics["finished_utc"] = _utc_now()  # the mark of a finished run (docs/contract.md, "metrics.json")
        write_json(self.metrics_file, self.metrics)
        return timings


# --- errors ------------------------------------------------------------------------------------------------------


@contextmanager
def _one_line_errors(session: ClusterRun) -> Iterator[None]:
    """An interrupt, a lost cluster or a full disk while the job runs becomes an error that says how to resume."""
    run = session.run
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted: finished epochs are saved; continue with: {run.resume_command()}"
        ) from None
    except Cancelled:
        raise Cancelled(f"cancelled: finished epochs are saved; continue with: {run.resume_command()}") from None
    except (UserError, ClusterError):
        raise
    except Exception as exc:
        _raise_cluster_or_data_error(exc, run, session.client)
        raise


def _raise_cluster_or_data_error(exc: Exception, run: JobRun, client: Client | None = None) -> None:
    """Turn what a lost cluster raises into a ClusterError that says how to resume; leave other errors alone.

    The cluster is lost as :func:`mnist_kmeans.watch.lost_cluster` says. A file system error of the run
    directory is not a lost cluster: the checkpoint and ``files.py`` already raise it as a UserError.
    """
    from mnist_kmeans.watch import lost_cluster

    _raise_our_cause(exc)
    if _is_write_error(exc, run.run_dir):
        # e.g. dask-performance.html on a full disk; nothing written so far is passed off as complete
        raise UserError(f"{exc.filename or run.run_dir}: cannot write: {exc.strerror or exc}") from None
    lost = lost_cluster(exc, client)
    if lost is not None and lost.fix is not None:  # the same cluster would fail the same way: say what to change
        raise ClusterError(
            f"{lost}; {lost.fix}, then continue with: {run.resume_command()} (finished epochs are saved)"
        ) from None
    if lost is not None:
        raise ClusterError(
            f"{lost}; finished epochs are saved in {run.run_dir}, continue on any cluster with: {run.resume_command()}"
        ) from None


def _raise_our_cause(exc: Exception) -> None:
    """Raise the first of our own errors ``exc`` arose from, e.g. the checkpoint's UserError, then
    dask-performance.html failing on the same disk."""
    cause = exc.__context__
    while cause is not None:
        if isinstance(cause, (UserError, ClusterError)):
            raise cause from None
        cause = cause.__context__


def _is_write_error(exc: Exception, run_dir: Path) -> bool:
    """Whether ``exc`` failed a write: an OSError on a file of ``run_dir``, or of a full or read-only disk."""
    import errno

    from distributed.comm.core import CommClosedError

    if not isinstance(exc, OSError) or isinstance(exc, CommClosedError):
        return False
    disk_errnos = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}
    in_run_dir = bool(exc.filename) and os.path.abspath(str(exc.filename)).startswith(os.path.abspath(run_dir) + os.sep)
    return in_run_dir or exc.errno in disk_errnos
