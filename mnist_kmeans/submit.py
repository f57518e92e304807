"""Jobs that outlive the client: ``submit``, ``status``, ``wait``, ``cancel`` (docs/contract.md, "submit").

``submit`` does what ``run`` does up to the start of the run directory (:func:`~mnist_kmeans.pipeline.prepare`,
``cluster.connect``, :func:`~mnist_kmeans.pipeline.start_run_dir`), writes ``status.json`` as ``queued`` and hands
the rest to a *driver*: one task (:func:`drive`) kept alive without any client (``fire_and_forget``) that secedes
from its worker's threads (``worker_client``) and runs :func:`~mnist_kmeans.pipeline.run_recorded`, the very steps
of ``run``, as ``run --resume`` of the directory would. So the driver needs nothing of the submitting machine but
the run directory, which the workers must be able to write (a shared path), and the cluster file's storage options,
which travel with its task in memory.

Faults: a driver whose worker dies is run again by the scheduler on another worker (or on the one its nanny starts),
and continues from the checkpoints like ``--resume``; it takes the run directory's claim (``claim.py``) first, which
the dead process no longer holds. While a driver holds the claim, a second ``submit`` (or ``run``) is refused.
``cancel`` writes ``cancel.request``; a running driver stops at its next result and says ``cancelled``; a job no
driver holds (queued, or between workers) is marked cancelled by ``cancel`` itself, and a driver that starts later
stops before fitting anything.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_kmeans.claim import RunDirBusy, claim_run_dir
from mnist_kmeans.config import ClusterConfig, load_cluster
from mnist_kmeans.errors import Cancelled, Log, UserError, to_stderr
from mnist_kmeans.pipeline import JobRun, ingest_default, prepare, run_recorded, start_run_dir
from mnist_kmeans.status import JobStatus, State, attempts, ended, read_status, request_cancel, write_status

if TYPE_CHECKING:
    from distributed import Client

CLAIM_PATIENCE = 30.0  # seconds a driver waits for the run directory's claim: its submit, or a cancel, may hold it
CANCEL_PATIENCE = 60.0  # seconds ``cancel`` waits for a running driver to say it stopped
POLL = 0.25  # seconds between two looks at status.json (``wait``, ``cancel``) or at the claim (a starting driver)


@dataclass(frozen=True)
class DriverOrder:
    """What a driver task is given: the run directory, and the cluster file as read (its storage options may hold
    credentials: in the task's memory only, never in a file)."""

    run_dir: str
    cluster: ClusterConfig
    argv: tuple[str, ...]
    resumed: bool  # the submit continued a run: the manifest records it as a resume


@dataclass(frozen=True)
class Submitted:
    """What ``submit`` prints."""

    run_dir: Path
    dashboard: str | None
    key: str  # the driver's task key, as the dashboard shows it

    def lines(self) -> list[str]:
        follow = shlex.join(["mnist-kmeans", "wait", str(self.run_dir)])
        return [
            f"run directory: {self.run_dir}",
            f"dashboard: {self.dashboard}",
            f"driver: {self.key}",
            f"follow it with: {follow} (or status, cancel)",
        ]


# --- submit ---------------------------------------------------------------------------------------------------------


def submit_job(
    job_file: str,
    cluster_file: str | None = None,
    scheduler: str | None = None,
    store: str | None = None,
    out: str | None = None,
    resume: str | None = None,
    argv: Sequence[str] = (),
    log: Log | None = None,
) -> Submitted:
    """Check the job as ``run`` does, start its run directory and its driver on the cluster, and return."""
    log = log or to_stderr
    cluster = load_cluster(cluster_file)
    _refuse_client_bound(cluster, cluster_file, scheduler)
    run = prepare(job_file, cluster, store, out, resume, argv, log, time.perf_counter())
    from mnist_kmeans.cluster import connect, interrupts_deferred

    try:
        _refuse_queued(run)
        t_connect = time.perf_counter()
        with connect(run.cluster, scheduler) as (client, cluster_info):
            run = ingest_default(run, log)
            with interrupts_deferred() as interrupted:  # a Ctrl-C waits until the directory and its driver are started
                start_run_dir(run, client, cluster_info, time.perf_counter() - t_connect)
                queued = JobStatus(State.QUEUED, f"on {cluster_info.scheduler}", None, attempts(run.run_dir))
                write_status(run.run_dir, queued)
                key = _start_driver(client, run)
            if interrupted:
                raise KeyboardInterrupt(f"interrupted; the job is submitted: mnist-kmeans status {run.run_dir}")
            return Submitted(run.run_dir, cluster_info.dashboard, key)
    finally:
        run.claim.release()  # the driver takes it (it waits for it: CLAIM_PATIENCE)


def _refuse_client_bound(cluster: ClusterConfig, cluster_file: str | None, scheduler: str | None) -> None:
    """Only a scheduler that runs on its own outlives this command; an embedded or SLURM cluster's lives in it."""
    if scheduler or cluster.scheduler:
        return
    where = cluster_file or "the cluster file (./cluster.yaml or the defaults)"
    lives = "the SLURMCluster's scheduler" if cluster.kind == "slurm" else "the embedded LocalCluster"
    raise UserError(
        f"{where}: kind: {cluster.kind}: submit needs a cluster that outlives this command, and {lives} would end "
        "with it; give a running scheduler (kind: address with scheduler:, or --scheduler ADDR), or use run"
    )


def _refuse_queued(run: JobRun) -> None:
    """A job submitted to this directory whose driver has not started yet owns it as much as a running one."""
    status = read_status(run.run_dir) if run.resuming else None
    if status is not None and status.state is State.QUEUED:
        raise UserError(
            f"{run.run_dir}: a job submitted to this directory is queued (its driver has not started); "
            f"follow it with: mnist-kmeans status {run.run_dir}, or cancel it first"
        )


def _start_driver(client: Client, run: JobRun) -> str:
    """Submit the driver's task and let it go (``fire_and_forget``: it runs on when this client closes)."""
    from distributed import fire_and_forget

    from mnist_kmeans.schedule import task_key

    order = DriverOrder(str(run.run_dir), run.cluster, tuple(run.argv), run.resuming)
    future = client.submit(drive, order, key=task_key(f"driver_{run.job.slug}"))
    fire_and_forget(future)
    return str(future.key)


# --- the driver, on a worker ---------------------------------------------------------------------------------------


def drive(order: DriverOrder) -> str:
    """The task of a submitted job: the job run as ``run --resume RUN_DIR`` (docs/contract.md, "submit"), its client
    the worker's, its thread given back to the worker while it waits. Returns the state it ended in; every error is
    in ``status.json``, not raised (the task itself never fails: a failed job is not retried)."""
    from distributed import worker_client

    from mnist_kmeans.cluster import describe

    run_dir = Path(order.run_dir)
    try:
        run = _claim(order)
    except RunDirBusy:  # another driver (or a run) owns the directory and says its state
        return "not the owner"
    except Exception as exc:  # e.g. the store, unreadable from this worker
        write_status(run_dir, ended(exc, attempts(run_dir) + 1))
        return State.FAILED.value
    try:
        with worker_client() as client:
            session = start_run_dir(run, client, describe(client, embedded=False), 0.0, cancels=False)
            # the first driver of a new run is no resume, for the manifest; one that runs again after a lost worker is
            session = replace(session, run=replace(run, resuming=order.resumed or session.progress.attempt > 1))
            run_recorded(session)
    except Exception as exc:  # run_recorded has said it in status.json; anything before it is said here
        status = read_status(run_dir)
        if status is None or not status.state.finished:
            write_status(run_dir, ended(exc, attempts(run_dir) + 1), strict=False)
    finally:
        run.claim.release()
    status = read_status(run_dir)
    return status.state.value if status else State.FAILED.value


def _claim(order: DriverOrder) -> JobRun:
    """``prepare`` of the job in the run directory as a resume; waits up to CLAIM_PATIENCE for the claim."""
    run_dir = Path(order.run_dir)
    deadline = time.monotonic() + CLAIM_PATIENCE
    while True:
        try:
            return prepare(
                str(run_dir / "job.yaml"), order.cluster, None, None, str(run_dir), order.argv, to_stderr, 0.0
            )
        except RunDirBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL)


# --- status, wait, cancel: from the run directory alone -------------------------------------------------------------


def job_status(run_dir: str | Path) -> JobStatus:
    """The job's status, or a UserError when ``run_dir`` holds none."""
    status = read_status(Path(run_dir))
    if status is None:
        raise UserError(f"{run_dir}: no status.json: not the run directory of a job (or it never started)")
    return status


def wait_job(run_dir: str | Path) -> Path:
    """Block until the job is finished; its report's path, or the error it ended with (exit codes as ``run``)."""
    try:
        while not (status := job_status(run_dir)).state.finished:
            time.sleep(POLL)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; the job goes on: mnist-kmeans wait {run_dir}") from None
    if status.state is State.DONE:
        return Path(status.detail)
    raise status.error()


def cancel_job(run_dir: str | Path) -> JobStatus:
    """Stop the job in ``run_dir``, keeping its finished epochs; returns its status afterwards.

    The flag is written first, so that a driver starting at any later moment stops. Then: a directory no process
    holds (the job queued, or its driver between workers, or lost with its cluster) is marked cancelled here; one a
    driver holds is left to it, which stops at its next result and says so (waited for up to CANCEL_PATIENCE).
    """
    run_dir = Path(run_dir).absolute()
    status = job_status(run_dir)
    if status.state.finished:
        return status
    request_cancel(run_dir)
    try:
        claim = claim_run_dir(run_dir, resuming=True)
    except RunDirBusy:
        return _wait_until_finished(run_dir, CANCEL_PATIENCE)
    try:
        resume = shlex.join(["mnist-kmeans", "run", str(run_dir / "job.yaml"), "--resume", str(run_dir)])
        detail = f"cancelled while {status.state.value}: finished epochs are saved; continue with: {resume}"
        write_status(run_dir, JobStatus(State.CANCELLED, detail, Cancelled.exit_code, status.attempt))
    finally:
        claim.release()
    return job_status(run_dir)


def _wait_until_finished(run_dir: Path, patience: float) -> JobStatus:
    deadline = time.monotonic() + patience
    while not (status := job_status(run_dir)).state.finished and time.monotonic() < deadline:
        time.sleep(POLL)
    return status
