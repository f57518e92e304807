"""connect(): a Client to the embedded LocalCluster of ``cluster.yaml``, to a running scheduler (TCP or TLS), or to a
dask-jobqueue SLURMCluster started for the block (``kind: slurm``).

Exposure: the embedded cluster's scheduler and workers listen on 127.0.0.1 only, and its dashboard on the address of
``local.dashboard_address`` (default ``127.0.0.1:8787``; a bare ``:8787`` means every interface). A ``tls://``
scheduler is joined with the CA, certificate and key of ``cluster.yaml``; without them, or with a certificate the
scheduler does not trust, the connection is refused (exit 3) before any work is sent.

SLURM: the scheduler runs in this process (on 127.0.0.1, or on ``slurm.interface``), each worker in a SLURM job
that runs this environment's Python. The worker job is first checked with ``sbatch --test-only``, so that a request
SLURM refuses is one line with its reason rather than a wait; ``adapt`` keeps ``n_workers``, replacing jobs that end.
Every job is cancelled when the block ends, however it ends.

Loss: a client that loses its scheduler tries to reconnect for ``connect_timeout`` seconds and then closes; every
future it waits on fails, and ``run`` turns that into exit 3 with the ``--resume`` command. Distributed's own log
records in this process are kept to errors, and its "Failed to reconnect ..." is dropped, so that the error stays
one line.

Workers that cannot run the job: while the block of :func:`connect` runs, :mod:`mnist_kmeans.watch` watches them
and ends the wait on a cluster where none can take a task; ``watch.lost_cluster`` says why.

Ctrl-C: the embedded cluster's start is not cut in half (a half-started ``LocalCluster`` fails distributed's atexit
handlers with tracebacks): an interrupt then is raised once it has started, and closes it. Its worker processes
ignore SIGINT (a terminal sends it to them too; ``run`` closes them), and what they write to stderr goes to
``/dev/null``: this process's stderr carries ``run``'s lines only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from distributed import Client, LocalCluster
from distributed.security import Security

from mnist_kmeans.config import ClusterConfig, LocalClusterConfig, SlurmClusterConfig
from mnist_kmeans.errors import ClusterError, one_line, shorten, to_stderr
from mnist_kmeans.watch import Memory, Watch, watched

_closing: list[threading.Thread] = []  # embedded clusters closing in the background (see connect)


def wait_closed() -> None:
    """Wait until every embedded cluster that ``connect`` left closing in the background has closed."""
    while _closing:
        _closing.pop().join()


@dataclass(frozen=True)
class ClusterInfo:
    """What the run directory records about where the job ran."""

    scheduler: str
    dashboard: str | None
    n_workers: int
    threads: int
    embedded: bool

    def as_dict(self) -> dict:
        return {
            "scheduler": self.scheduler,
            "n_workers": self.n_workers,
            "threads": self.threads,
            "dashboard": self.dashboard,
            "embedded": self.embedded,
        }


def security_of(cfg: ClusterConfig) -> Security | None:
    if cfg.tls is None:
        return None
    return Security(
        tls_ca_file=cfg.tls.ca_file,
        tls_client_cert=cfg.tls.cert,
        tls_client_key=cfg.tls.key,
        require_encryption=True,
    )


def describe(client: Client, embedded: bool) -> ClusterInfo:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return ClusterInfo(
        scheduler=client.scheduler.address,
        dashboard=client.dashboard_link if client.dashboard_link else None,
        n_workers=len(workers),
        threads=sum(w.get("nthreads", 0) for w in workers.values()),
        embedded=embedded,
    )


@contextmanager
def connect(cfg: ClusterConfig, scheduler: str | None = None) -> Iterator[tuple[Client, ClusterInfo]]:
    """A connected client and a description of its cluster; the embedded cluster is closed on exit.

    ``scheduler`` (the ``--scheduler`` option) overrides ``cfg.scheduler`` and ``cfg.kind``. A scheduler that does
    not answer within ``cfg.connect_timeout`` seconds, or that has no worker by then, is a :class:`ClusterError`
    naming the address.
    While the block runs, a :class:`~mnist_kmeans.watch.Watch` closes the client once no worker has been able to
    take tasks for ``cfg.connect_timeout`` seconds (see :func:`mnist_kmeans.watch.lost_cluster`). After a block that
    ended without an error, the embedded cluster closes in a background thread: call :func:`wait_closed` before the
    process ends.
    """
    address = scheduler or cfg.scheduler
    if address is None and cfg.slurm is not None:
        yield from _slurm(cfg.slurm, cfg.connect_timeout)
    elif address is None:
        yield from _embedded(cfg.local, cfg.connect_timeout)
    else:
        yield from _remote(cfg, address)


@contextmanager
def given(client: Client) -> Iterator[tuple[Client, ClusterInfo]]:
    """The Python API's own client (``mnist_kmeans.run(..., client=)``), described and left open: the caller's
    cluster is the caller's to close. It is not watched (a :class:`~mnist_kmeans.watch.Watch` closes the client it
    gives up on): on a cluster that loses every worker the run waits, as Dask does, until interrupted."""
    if client.status != "running":
        raise ClusterError(f"the client given is {client.status}, not running: connect it again")
    yield client, describe(client, embedded=False)


def _embedded(local: LocalClusterConfig, patience: float) -> Iterator[tuple[Client, ClusterInfo]]:
    """The embedded cluster (see :func:`connect`); worker threads in this process get one BLAS thread each."""
    if local.processes:
        yield from _local(local, patience)
        return
    # One BLAS thread per worker thread, as the nanny gives every worker process. Several would also split a
    # product differently from call to call, and round it differently: results that must not change would change
    # in their last bits.
    from threadpoolctl import threadpool_limits

    blas = threadpool_limits(limits=1)
    try:
        yield from _local(local, patience)
    finally:
        blas.restore_original_limits()


def _remote(cfg: ClusterConfig, address: str) -> Iterator[tuple[Client, ClusterInfo]]:
    """A client of the running scheduler at ``address``, once it has a worker (see :func:`connect`)."""
    client = _join(cfg, address)
    with _quiet_client_logs():
        try:
            try:
                client.wait_for_workers(1, timeout=cfg.connect_timeout)
            except Exception:
                why = Watch(client, cfg.connect_timeout, _remote_memory(client)).why_no_worker()
                raise ClusterError(
                    f"{address}: the scheduler has no worker able to run tasks after {cfg.connect_timeout:g} s{why}"
                ) from None
            with watched(client, cfg.connect_timeout, _remote_memory(client)):
                yield client, describe(client, embedded=False)
        finally:
            # a client whose scheduler is gone may fail to close cleanly: nothing is left to release
            with contextlib.suppress(Exception):
                client.close(timeout=cfg.connect_timeout)


def _remote_memory(client: Client) -> Memory:
    """The memory limits of a remote scheduler's workers, as the scheduler reports them."""
    from dask.utils import format_bytes

    try:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
    except Exception:  # a scheduler gone already: the error is said elsewhere
        workers = []
    limits = sorted({format_bytes(w["memory_limit"]) for w in workers if w.get("memory_limit")})
    return Memory(", ".join(limits) or "their --memory-limit", "give the workers more memory (--memory-limit)")


def _join(cfg: ClusterConfig, address: str) -> Client:
    """A client connected to ``address``; refusals and timeouts are a one-line ClusterError."""
    if address.startswith("tls://") and cfg.tls is None:
        raise ClusterError(
            f"{address}: refused: a tls:// scheduler admits only clients with a certificate it trusts; "
            "set tls (ca_file, cert, key) in the cluster file"
        )
    try:
        _handshake(cfg, address)
        return Client(address, timeout=cfg.connect_timeout, security=security_of(cfg))
    except TimeoutError:
        raise ClusterError(
            f"{address}: no answer as a Dask scheduler within {2 * cfg.connect_timeout:g} s (something else holds "
            "that port, or the scheduler is stuck)"
        ) from None
    except Exception as exc:  # OSError, a TLS handshake refused, a malformed address ...
        reason = one_line(exc, with_type=True)
        if "SSL" in reason or "certificate" in reason.lower():
            raise ClusterError(
                f"{address}: TLS handshake refused ({reason}); check tls ca_file, cert and key in the cluster file"
            ) from None
        raise ClusterError(f"{address}: scheduler not reachable within {cfg.connect_timeout:g} s ({reason})") from None


def _handshake(cfg: ClusterConfig, address: str) -> None:
    """Open and close one comm to ``address`` in bounded time (TimeoutError if not): ``Client`` waits for
    the scheduler's handshake without a limit, so a port held by another program would hang ``run`` for ever."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect as open_comm

    args = (security_of(cfg) or Security()).get_connection_args("client")

    async def probe() -> None:
        # twice: connecting alone may take connect_timeout, and then fails as OSError (unreachable) by itself
        comm = await asyncio.wait_for(open_comm(address, timeout=cfg.connect_timeout, **args), 2 * cfg.connect_timeout)
        await comm.close()

    with ThreadPoolExecutor(1) as pool:  # an event loop of its own: the caller may be running one (a notebook)
        pool.submit(asyncio.run, probe()).result()


@contextmanager
def _quiet_client_logs() -> Iterator[None]:
    """The client's share of distributed's logging goes to our stderr: keep it to errors (no INFO records with
    tracebacks when a comm closes), and drop the reconnect error that ``run`` reports itself, with how to resume."""
    dist_log, quiet = logging.getLogger("distributed"), _DropReconnectNoise()
    client_log, level = logging.getLogger("distributed.client"), dist_log.level
    dist_log.setLevel(max(level, logging.ERROR))
    client_log.addFilter(quiet)
    try:
        yield
    finally:
        client_log.removeFilter(quiet)
        dist_log.setLevel(level)


class _DropReconnectNoise(logging.Filter):
    """Drops the client's "Failed to reconnect to scheduler ..." record (``run`` says it, with how to resume) and the
    tracebacks of the reconnect coroutines that closing the client then cancels."""

    def filter(self, record: logging.LogRecord) -> bool:
        cancelled = record.exc_info is not None and isinstance(record.exc_info[1], asyncio.CancelledError)
        return not (cancelled or str(record.msg).startswith("Failed to reconnect"))


def _local(local: LocalClusterConfig, patience: float) -> Iterator[tuple[Client, ClusterInfo]]:
    """The embedded LocalCluster of ``local``, with its client (see :func:`connect`)."""
    with interrupts_deferred() as interrupted:
        try:
            cluster = _start_local(local)
        except ClusterError:
            if interrupted:  # workers that took the same Ctrl-C (from a terminal) and died starting
                raise KeyboardInterrupt from None
            raise
    try:
        if interrupted:
            raise KeyboardInterrupt
        memory = Memory(shorten(local.memory_limit), "raise local.memory_limit in the cluster file")
        with Client(cluster) as client, watched(client, patience, memory, embedded=True):
            yield client, describe(client, embedded=True)
    except BaseException:
        cluster.close()
        raise
    # After a good run, the workers stop (half a second of waiting on processes) while the caller goes on
    # with its own work, e.g. the report; ``wait_closed`` joins. On an error the cluster is closed first.
    closing = threading.Thread(target=cluster.close, name="mnist-kmeans-cluster-close")
    closing.start()
    _closing.append(closing)


def _start_local(local: LocalClusterConfig) -> LocalCluster:
    """A started LocalCluster; what keeps it from starting is a one-line ClusterError, its warnings one line each."""
    with warnings.catch_warnings(record=True) as caught, _children_stderr_to_devnull():
        warnings.simplefilter("always")
        try:
            cluster = LocalCluster(
                # processes: scheduler and workers listen on loopback only (distributed's default too; said, not
                # assumed). Threads (processes: false) talk in-process and take no host.
                host="127.0.0.1" if local.processes else None,
                **asdict(local),  # n_workers, threads_per_worker, memory_limit, dashboard_address, processes
                # CRITICAL, not ERROR: a task that fails (a damaged store chunk ...) is reported by `run` in one line;
                # the workers' "Compute Failed" records and tracebacks would bury it (they share our stderr).
                silence_logs=logging.CRITICAL,
                # this module's dask_setup, in each worker process: SIGINT ignored
                preload=[__name__] if local.processes else [],
            )
        except Exception as exc:  # a port taken, no memory for the workers, a worker that dies at start ...
            reason = one_line(exc, with_type=True)
            raise ClusterError(f"cannot start the local cluster of the cluster file ({reason})") from None
    for warning in caught:  # e.g. "Port 8787 is already in use ... Hosting the HTTP server on port N instead"
        to_stderr(f"notice: local cluster: {one_line(Exception(warning.message), limit=300)}")
    return cluster


def dask_setup(worker: Any) -> None:
    """Preload hook of the embedded cluster's worker processes: Ctrl-C reaches them from a terminal too, but it is
    ``run``'s to handle (it closes them); a worker that took it would die with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Ctrl-C within the block is noted in the list yielded, not raised: the caller raises it once the block is done.

    Only where Python raises KeyboardInterrupt for SIGINT (not where it is ignored, e.g. a background job)."""
    pressed: list[int] = []
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _children_stderr_to_devnull() -> Iterator[None]:
    """Processes started in the block (the embedded cluster's workers, multiprocessing's resource tracker) write
    to ``/dev/null`` instead of our stderr: their tracebacks when they are interrupted or killed, their warnings
    about what a killed worker leaked, would follow ``run``'s one line. This process's own stderr is back after."""
    import sys

    with contextlib.suppress(Exception):  # a stderr without a file descriptor (an embedding host): leave it be
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --- kind: slurm, a dask-jobqueue SLURMCluster started for the block ----------------------------------------------


def _slurm(slurm: SlurmClusterConfig, patience: float) -> Iterator[tuple[Client, ClusterInfo]]:
    """A SLURMCluster of ``n_workers`` workers kept at that number (``adapt``: a job that ends, e.g. ``scancel``, is
    replaced), with its client; its jobs are cancelled when the block ends, however it ends."""
    with interrupts_deferred() as interrupted:
        cluster = _start_slurm(slurm)
    # a submission that fails later (jobqueue retries it) logs a traceback there: the watch and squeue say it instead
    tornado_log = logging.getLogger("tornado.application")
    level = tornado_log.level
    tornado_log.setLevel(logging.CRITICAL)
    try:
        if interrupted:
            raise KeyboardInterrupt
        _check_job(cluster)
        cluster.adapt(minimum=slurm.n_workers, maximum=slurm.n_workers)
        memory = Memory(shorten(slurm.memory), "raise slurm.memory in the cluster file")
        with Client(cluster) as client, _quiet_client_logs():
            _wait_for_jobs(client, cluster, slurm.n_workers, patience)
            with watched(client, patience, memory):
                yield client, describe(client, embedded=False)
    finally:
        cluster.close()  # scancel of every job
        tornado_log.setLevel(level)


def _wait_for_jobs(client: Client, cluster: Any, n_workers: int, patience: float) -> None:
    """Up to ``patience`` seconds for all ``n_workers`` (the job starts on all it asked for when SLURM gives them
    soon); after that, at least one, or a ClusterError saying what squeue says of the jobs."""
    with contextlib.suppress(Exception):
        client.wait_for_workers(n_workers, timeout=patience)
    if not client.scheduler_info(n_workers=-1)["workers"]:
        raise ClusterError(f"SLURM: no worker joined within {patience:g} s ({_jobs_state(cluster)})")


def _start_slurm(slurm: SlurmClusterConfig) -> Any:
    """The SLURMCluster's scheduler, started here, with no job yet; its failures are a one-line ClusterError."""
    import sys

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError("kind: slurm needs dask-jobqueue: pip install 'mnist-kmeans[slurm]'") from None
    # No interface: everything on loopback, for SLURM on this machine. With one, the scheduler and the workers listen
    # on it: the compute nodes must reach the scheduler there.
    host = {} if slurm.interface else {"host": "127.0.0.1"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cluster = SLURMCluster(
                n_workers=0,
                cores=slurm.cores,
                processes=slurm.processes,
                memory=slurm.memory,
                walltime=slurm.walltime,
                queue=slurm.queue,
                account=slurm.account,
                interface=slurm.interface,
                job_extra_directives=list(slurm.job_extra_directives),
                job_script_prologue=list(slurm.job_script_prologue),
                log_directory=slurm.log_directory,
                python=sys.executable,  # this environment's, with the package: the jobs run the same code
                worker_extra_args=[] if slurm.interface else ["--host", "127.0.0.1"],
                scheduler_options={**host, "dashboard_address": slurm.dashboard_address},
                silence_logs=logging.CRITICAL,  # as the embedded cluster: `run` reports failed tasks in one line
            )
        except Exception as exc:  # a port taken, an interface this machine lacks ...
            reason = one_line(exc, with_type=True)
            raise ClusterError(f"cannot start the SLURM cluster's scheduler ({reason})") from None
    for warning in caught:
        to_stderr(f"notice: slurm cluster: {one_line(Exception(warning.message), limit=300)}")
    return cluster


def _check_job(cluster: Any) -> None:
    """``sbatch --test-only`` of the worker job: a request SLURM can never satisfy (more memory or cores than a node
    has, a partition that does not exist ...) is a ClusterError with SLURM's reason, before anything waits for it."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="mnist-kmeans-job-") as script:
        script.write(cluster.job_script())
        script.flush()
        try:
            proc = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise ClusterError("kind: slurm needs SLURM's sbatch on the PATH of this machine") from None
        except subprocess.TimeoutExpired:
            raise ClusterError("SLURM: sbatch --test-only gave no answer within 60 s") from None
    if proc.returncode != 0:
        reasons = [line.removeprefix("sbatch: error: ") for line in proc.stderr.splitlines() if line.strip()]
        # what was asked: SLURM's reason may not say which of it is too much
        asked = [line.removeprefix("#SBATCH ") for line in cluster.job_header.splitlines() if _asked(line)]
        raise ClusterError(
            f"SLURM refused the worker job ({shorten(' '.join(asked), 200)}): "
            f"{shorten('; '.join(reasons) or 'no reason given', 300)}"
        )


def _asked(header_line: str) -> bool:
    """An ``#SBATCH`` line of the job that asks for resources (not its name or its log files)."""
    return header_line.startswith("#SBATCH ") and not header_line.startswith(("#SBATCH -J", "#SBATCH -e", "#SBATCH -o"))


def _jobs_state(cluster: Any) -> str:
    """The SLURM state of the cluster's jobs, as squeue says it, e.g. "job 12: PENDING (Resources)"."""
    import subprocess

    ids = [job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)]
    if not ids:
        return "no job submitted"
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", ",".join(ids), "-o", "job %i: %T (%r)"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return shorten("; ".join(out.split("\n")).strip("; ") or f"jobs {', '.join(ids)} not in squeue", 300)
