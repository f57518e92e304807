"""Workers that cannot run the job, and how a cluster was lost (docs/contract.md, "Exit codes").

While the block of ``cluster.connect`` runs, a thread watches the scheduler's workers. When none of them can take a
task (all paused at the memory pause threshold, or, on the embedded cluster or after memory restarts, none there at
all) for ``connect_timeout`` seconds, it closes the client, so that every wait on the cluster fails at once instead of
forever; :func:`lost_cluster` then says why. Tasks that died with workers which exceeded their memory limit (the
nanny's ``worker-restart-memory`` events) are said to be that, with what to raise.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from distributed import Client

from mnist_kmeans.errors import one_line

_watches: list[Watch] = []  # one per open connect block
WATCH_PERIOD = 1.0  # seconds between two looks at the scheduler's workers
MEMORY_EVENTS = "worker-restart-memory"  # the topic of a nanny's "exceeded 95% memory budget. Restarting"


@dataclass(frozen=True)
class Lost:
    """How the cluster was lost (``str()``), and ``fix``: what to change first when the same cluster would fail the
    same way again (None: resuming on any cluster helps)."""

    how: str
    fix: str | None = None

    def __str__(self) -> str:
        return self.how


def lost_cluster(exc: BaseException, client: Client | None = None) -> Lost | None:
    """How the cluster was lost, if ``exc`` (raised while waiting on futures) means it was; else None.

    Lost: the watch of :func:`connect` found no worker able to run tasks (its verdict comes first: it closed the
    client), the client lost its scheduler (whatever surfaced first), a task outlived the workers that died under it
    (``KilledWorker``; said to be memory when their nannies restarted them for it), a comm failed or timed out, or
    the futures were cancelled under us.
    """
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    watch = _watch_of(client)
    if watch is not None and watch.verdict is not None:
        return watch.verdict
    if client is not None and getattr(client, "status", "running") not in ("running", "connecting"):
        return Lost(f"lost the scheduler ({one_line(exc, with_type=True, limit=200)})")
    if isinstance(exc, KilledWorker) and watch is not None and watch.memory_restarts():
        return watch.out_of_memory()
    if isinstance(exc, (KilledWorker, FutureCancelledError, OSError, TimeoutError)):  # CommClosedError is an OSError
        return Lost(f"lost the cluster ({one_line(exc, with_type=True, limit=200)})")
    return None


def _watch_of(client: Client | None) -> Watch | None:
    """The watch of ``client``'s connect block (with None: of the one open block, as augment has)."""
    for watch in _watches:
        if client is None or watch.client is client:
            return watch
    return None


@dataclass(frozen=True)
class Memory:
    """What to say of the workers' memory: their limit, and how to give them more."""

    limit: str
    fix: str


@contextmanager
def watched(client: Client, patience: float, memory: Memory, embedded: bool = False) -> Iterator[None]:
    """A :class:`Watch` on ``client`` for the block."""
    watch = Watch(client, patience, memory, embedded)
    _watches.append(watch)
    watch.start()
    try:
        yield
    finally:
        watch.stop()
        _watches.remove(watch)


class Watch:
    """Looks at the scheduler's workers every second from a thread; when no worker has been able to take a task for
    ``patience`` seconds, records why in ``verdict`` and closes the client, which fails every wait on it.

    Able: status ``running``. Not: ``paused`` (memory above distributed's pause threshold; without a nanny, or
    below its terminate threshold, nothing ends that), or no worker at all, which counts only on the embedded
    cluster (nothing else adds workers to it) or after memory restarts: a remote cluster may be scaling up.
    """

    def __init__(self, client: Client, patience: float, memory: Memory, embedded: bool = False):
        self.client, self.patience, self.memory, self.embedded = client, patience, memory, embedded
        self.verdict: Lost | None = None
        self._since = self._last_memory_event()  # restarts before this job are not its own
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mnist-kmeans-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        able_at = time.monotonic()
        while not self._done.wait(WATCH_PERIOD):
            try:
                workers = self.client.scheduler_info(n_workers=-1)["workers"]
            except Exception:  # the client closed or lost its scheduler: whoever waits on it fails already
                return
            if self._able(workers):
                able_at = time.monotonic()
            elif time.monotonic() - able_at >= self.patience and not self._done.is_set():
                self.verdict = self._why(workers)
                with contextlib.suppress(Exception):
                    self.client.close(timeout=self.patience)
                return

    def _able(self, workers: dict[str, dict]) -> bool:
        if any(w.get("status") == "running" for w in workers.values()):
            return True
        return not workers and not self.embedded and not self.memory_restarts()

    def _why(self, workers: dict[str, dict]) -> Lost:
        if self.memory_restarts():
            return self.out_of_memory()
        if workers:
            return Lost(
                f"every worker has been paused for {self.patience:g} s: its memory is above the pause threshold of "
                f"its limit ({self.memory.limit})",
                self.memory.fix,
            )
        return Lost(f"no worker left for {self.patience:g} s")

    def why_no_worker(self) -> str:
        """What keeps a scheduler's workers from registering as able, as "": none, or ": <reason>"."""
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:
            return ""
        if self.memory_restarts(since=0.0):
            return f": {self.out_of_memory(since=0.0).how}; {self.memory.fix}"
        paused = sum(w.get("status") == "paused" for w in workers.values())
        return f": {paused} paused (memory above their pause threshold); {self.memory.fix}" if paused else ""

    def out_of_memory(self, since: float | None = None) -> Lost:
        n = self.memory_restarts(since)
        return Lost(
            f"workers exceeded their memory limit ({self.memory.limit}) and were restarted ({n} times)", self.memory.fix
        )

    def memory_restarts(self, since: float | None = None) -> int:
        """How many times a nanny restarted its worker for memory since the watch began (or since ``since``)."""
        since = self._since if since is None else since
        return sum(t > since for t, _ in self._memory_events())

    def _last_memory_event(self) -> float:
        return max((t for t, _ in self._memory_events()), default=0.0)

    def _memory_events(self) -> list[tuple[float, Any]]:
        try:
            return list(self.client.get_events(MEMORY_EVENTS))
        except Exception:  # the client closed or lost its scheduler
            return []
