"""connect(): a Client to the embedded LocalCluster of ``cluster.yaml``, or to a running scheduler (TCP or TLS)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from distributed import Client, LocalCluster
from distributed.security import Security

from mnist_kmeans.config import ClusterConfig
from mnist_kmeans.errors import ClusterError


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
    """
    address = scheduler or cfg.scheduler
    if address is None:
        local = cfg.local
        cluster = LocalCluster(
            n_workers=local.n_workers,
            threads_per_worker=local.threads_per_worker,
            memory_limit=local.memory_limit,
            dashboard_address=local.dashboard_address,
            processes=local.processes,
            silence_logs=logging.ERROR,
        )
        try:
            with Client(cluster) as client:
                yield client, describe(client, embedded=True)
        finally:
            cluster.close()
        return

    try:
        client = Client(address, timeout=cfg.connect_timeout, security=security_of(cfg))
    except Exception as exc:  # OSError, TimeoutError, a TLS handshake refused, a malformed address ...
        raise ClusterError(
            f"{address}: scheduler not reachable within {cfg.connect_timeout:g} s ({type(exc).__name__}: {exc})"
        ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=cfg.connect_timeout)
        except Exception:
            raise ClusterError(f"{address}: the scheduler has no worker after {cfg.connect_timeout:g} s") from None
        yield client, describe(client, embedded=False)
    finally:
        client.close()
