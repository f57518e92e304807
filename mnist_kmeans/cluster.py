"""connect(): a Client to the embedded LocalCluster of ``cluster.yaml``, or to a running scheduler (TCP or TLS).

Exposure: the embedded cluster's scheduler and workers listen on 127.0.0.1 only, and its dashboard on the address of
``local.dashboard_address`` (default ``127.0.0.1:8787``; a bare ``:8787`` means every interface). A ``tls://``
scheduler is joined with the CA, certificate and key of ``cluster.yaml``; without them, or with a certificate the
scheduler does not trust, the connection is refused (exit 3) before any work is sent.

Loss: a client that loses its scheduler tries to reconnect for ``connect_timeout`` seconds and then closes; every
future it waits on fails, and ``run`` turns that into exit 3 with the ``--resume`` command. Distributed's own log
records in this process are kept to errors, and its "Failed to reconnect ..." is dropped, so that the error stays
one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from distributed import Client, LocalCluster
from distributed.security import Security

from mnist_kmeans.config import ClusterConfig, LocalClusterConfig
from mnist_kmeans.errors import ClusterError, one_line

_closing: list[threading.Thread] = []  # embedded clusters closing in the background (see connect)


def lost_cluster(exc: BaseException, client: Client | None = None) -> str | None:
    """How the cluster was lost, if ``exc`` (raised while waiting on futures) means it was; else None.

    Lost: the client lost its scheduler (whatever surfaced first), a task outlived the workers that died under it
    (``KilledWorker``), a comm failed or timed out, or the futures were cancelled under us.
    """
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    if client is not None and getattr(client, "status", "running") not in ("running", "connecting"):
        return f"lost the scheduler ({one_line(exc, with_type=True, limit=200)})"
    if isinstance(exc, (KilledWorker, FutureCancelledError, OSError, TimeoutError)):  # CommClosedError is an OSError
        return f"lost the cluster ({one_line(exc, with_type=True, limit=200)})"
    return None


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

    ``scheduler`` (the ``--scheduler`` option) overrides ``cfg.scheduler``. A scheduler that does not answer within
    ``cfg.connect_timeout`` seconds, or that has no worker by then, is a :class:`ClusterError` naming the address.
    After a block that ended without an error, the embedded cluster closes in a background thread: call
    :func:`wait_closed` before the process ends.
    """
    address = scheduler or cfg.scheduler
    if address is None:
        yield from _embedded(cfg.local)
    else:
        yield from _remote(cfg, address)


def _embedded(local: LocalClusterConfig) -> Iterator[tuple[Client, ClusterInfo]]:
    """The embedded cluster (see :func:`connect`); worker threads in this process get one BLAS thread each."""
    if local.processes:
        yield from _local(local)
        return
    # One BLAS thread per worker thread, as the nanny gives every worker process. Several would also split a
    # product differently from call to call, and round it differently: results that must not change would change
    # in their last bits.
    from threadpoolctl import threadpool_limits

    blas = threadpool_limits(limits=1)
    try:
        yield from _local(local)
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
                raise ClusterError(f"{address}: the scheduler has no worker after {cfg.connect_timeout:g} s") from None
            yield client, describe(client, embedded=False)
        finally:
            # a client whose scheduler is gone may fail to close cleanly: nothing is left to release
            with contextlib.suppress(Exception):
                client.close(timeout=cfg.connect_timeout)


def _join(cfg: ClusterConfig, address: str) -> Client:
    """A client connected to ``address``; refusals and timeouts are a one-line ClusterError."""
    if address.startswith("tls://") and cfg.tls is None:
        raise ClusterError(
            f"{address}: refused: a tls:// scheduler admits only clients with a certificate it trusts; "
            "set tls (ca_file, cert, key) in the cluster file"
        )
    try:
        return Client(address, timeout=cfg.connect_timeout, security=security_of(cfg))
    except Exception as exc:  # OSError, TimeoutError, a TLS handshake refused, a malformed address ...
        reason = one_line(exc, with_type=True)
        if "SSL" in reason or "certificate" in reason.lower():
            raise ClusterError(
                f"{address}: TLS handshake refused ({reason}); check tls ca_file, cert and key in the cluster file"
            ) from None
        raise ClusterError(f"{address}: scheduler not reachable within {cfg.connect_timeout:g} s ({reason})") from None


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


@contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started in this block ignore SIGINT, for good: a terminal's Ctrl-C reaches every process of
    its group, and each worker would print its KeyboardInterrupt traceback; only ``run`` answers it, and closes them.

    They are forked by multiprocessing's fork server (``distributed.worker.multiprocessing-method``), started with
    SIGINT ignored, a disposition every process it forks keeps (a nanny's restarts too). Its preload makes each
    worker start with distributed and NumPy imported.
    """
    import multiprocessing
    import multiprocessing.forkserver
    import signal

    import dask

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        if threading.current_thread() is threading.main_thread():
            multiprocessing.get_context("forkserver").set_forkserver_preload(["distributed", "numpy"])
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # for the milliseconds of one fork and exec
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                signal.signal(signal.SIGINT, handler)
        yield


def _local(local: LocalClusterConfig) -> Iterator[tuple[Client, ClusterInfo]]:
    """The embedded LocalCluster of ``local``, with its client (see :func:`connect`)."""
    cluster = None
    try:
        with _workers_ignore_ctrl_c():
            cluster = LocalCluster(
                # processes: scheduler and workers listen on loopback only (distributed's default too; said, not
                # assumed). Threads (processes: false) talk in-process and take no host.
                host="127.0.0.1" if local.processes else None,
                **asdict(local),  # n_workers, threads_per_worker, memory_limit, dashboard_address, processes
                # CRITICAL, not ERROR: a task that fails (a damaged store chunk ...) is reported by `run` in one line;
                # the workers' "Compute Failed" records and tracebacks would bury it (they share our stderr).
                silence_logs=logging.CRITICAL,
            )
    except KeyboardInterrupt:  # pressed while it started, raised as the handler came back
        if cluster is not None:
            cluster.close()
        raise
    except Exception as exc:  # a port taken, no memory for the workers, a worker that dies at start ...
        reason = one_line(exc, with_type=True)
        raise ClusterError(f"cannot start the local cluster of the cluster file ({reason})") from None
    try:
        with Client(cluster) as client:
            yield client, describe(client, embedded=True)
    except BaseException:
        cluster.close()
        raise
    # After a good run, the workers stop (half a second of waiting on processes) while the caller goes on
    # with its own work, e.g. the report; ``wait_closed`` joins. On an error the cluster is closed first.
    closing = threading.Thread(target=cluster.close, name="mnist-kmeans-cluster-close")
    closing.start()
    _closing.append(closing)
