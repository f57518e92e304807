"""Submits the job's graph to the cluster as futures, saves checkpoints as results arrive, shows progress.

The graph of one chain (K, restart); every chain is independent, so all of them run at once::

    init_chain ─▶ fit_chunk ─▶ … ─▶ fit_chunk            epochs × n_chunks sequential tasks (map, fit.py)
          ─▶ [chunk_stats × n_chunks ─▶ tree of combine ─▶ lloyd_update] × lloyd_steps    (evaluate.py)
          ─▶ chunk_stats × n_chunks of train and of test ─▶ tree of combine           the evaluation (reduce)

Futures rather than one delayed graph: the chains run eagerly, every epoch end is saved the moment it exists,
progress is exact, and a Ctrl-C cancels what is left. The client holds one future per chain and step in
flight, and only small results (a chain's state, a reduced table) ever come back to it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed

from mnist_kmeans.checkpoint import Checkpoint
from mnist_kmeans.data.store import StoreInfo
from mnist_kmeans.evaluate import PassStats, chunk_stats_task, combine, lloyd_update
from mnist_kmeans.fit import ChainState, FitParams, chunk_order, fit_chunk, init_chain


@dataclass(frozen=True)
class FitPlan:
    """What to compute: the chains of a K grid over one store."""

    info: StoreInfo
    restarts: dict[int, int]  # K -> number of restarts
    epochs: int
    lloyd_steps: int
    params: FitParams

    @property
    def chains(self) -> list[tuple[int, int]]:
        # Largest K first: the longest chains start first, so they do not finish alone at the end.
        return [(k, r) for k in sorted(self.restarts, reverse=True) for r in range(self.restarts[k])]


@dataclass
class ChainResult:
    """One chain, fitted and evaluated."""

    k: int
    restart: int
    centers: np.ndarray
    train: PassStats
    test: PassStats
    trajectory: list[float]  # training inertia after each epoch, then after each Lloyd step
    fit_seconds: float


def centers_of(state: ChainState) -> np.ndarray:
    return state.centers


def tree_reduce(client: Client, parts: Sequence[Future], fan_in: int = 4) -> Future:
    """Sum ``PassStats`` futures on the cluster, ``fan_in`` at a time, until one is left."""
    parts = list(parts)
    while len(parts) > 1:
        parts = [client.submit(combine, *parts[i : i + fan_in], pure=False) for i in range(0, len(parts), fan_in)]
    return parts[0]


@dataclass
class _Chain:
    k: int
    restart: int
    fit_tasks: int  # partial_fit tasks in total (epochs x chunks), for progress
    fit_done: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_fit_end: float | None = None
    lloyd_inertia: list[float] = field(default_factory=list)
    train: PassStats | None = None
    test: PassStats | None = None
    centers: np.ndarray | None = None


class Progress:
    """One status line on a terminal (stderr); silent when stderr is not a terminal."""

    def __init__(self, stream: Any = None, min_interval: float = 0.2):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval, self.last = min_interval, 0.0

    def update(self, chains: dict[tuple[int, int], _Chain], epochs: int, stage: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.min_interval):
            return
        self.last = now
        parts = []
        for (k, r), c in sorted(chains.items()):
            done = epochs * c.fit_done // max(c.fit_tasks, 1)
            parts.append(f"K={k}{'' if r == 0 else f'.{r}'} {done}/{epochs}")
        total = sum(c.fit_tasks for c in chains.values())
        pct = 100 * sum(c.fit_done for c in chains.values()) // max(total, 1)
        self.stream.write(f"\r{stage}: {pct:3d}% epochs | " + "  ".join(parts) + "\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def run_chains(
    client: Client,
    plan: FitPlan,
    ckpt: Checkpoint,
    progress: Progress | None = None,
    on_epoch: Callable[[ChainState], None] | None = None,
) -> list[ChainResult]:
    """Fit and evaluate every chain of ``plan`` on the cluster, continuing from what ``ckpt`` holds.

    Blocks until all chains are done. On ``KeyboardInterrupt`` the remaining work is cancelled and the exception
    propagates; every epoch saved so far stays in ``ckpt``.
    """
    info, params, E, L = plan.info, plan.params, plan.epochs, plan.lloyd_steps
    n_chunks = info.n_chunks("train")
    progress = progress or Progress()
    chains: dict[tuple[int, int], _Chain] = {}
    events: dict[Future, tuple[str, tuple[int, int], int]] = {}

    def submit(kind: str, chain: tuple[int, int], n: int, func: Callable, *args: Any, **kwargs: Any) -> Future:
        fut = client.submit(func, *args, pure=False, **kwargs)
        if kind:
            events[fut] = (kind, chain, n)
        return fut

    for k, r in plan.chains:
        epochs_done, lloyd_done = ckpt.progress(k, r)
        c = chains[(k, r)] = _Chain(k, r, fit_tasks=E * n_chunks, fit_done=epochs_done * n_chunks)
        history: list[Any] = list(ckpt.epoch_centers(k, r)[: min(epochs_done, E - 1)])
        # 1. mini-batch epochs: one partial_fit task per chunk
        if epochs_done == 0:
            state: Any = submit("", (k, r), 0, init_chain, info, k, r, params)
        else:
            state = ckpt.load_state(k, r)
        for epoch in range(epochs_done, E):
            for i, chunk in enumerate(chunk_order(n_chunks, params.seed, k, r, epoch)):
                last = i == n_chunks - 1
                state = submit("epoch" if last else "chunk", (k, r), epoch + 1, fit_chunk, state, info, chunk, n_chunks, params)
            if epoch < E - 1:
                history.append(submit("", (k, r), 0, centers_of, state))
        # 2. full-batch Lloyd steps from the last epoch's centers
        if lloyd_done:
            centers: Any = ckpt.lloyd_centers(k, r)[-1]
            c.lloyd_inertia = list(ckpt.group[f"chains/k{k}/r{r}"].attrs.get("lloyd_inertia", []))[:lloyd_done]
        else:
            centers = submit("", (k, r), 0, centers_of, state)
        for step in range(lloyd_done, L):
            parts = [submit("", (k, r), 0, chunk_stats_task, centers, info, "train", j, with_sums=True) for j in range(n_chunks)]
            stats = tree_reduce(client, parts)
            events[stats] = ("lloyd-stats", (k, r), step + 1)
            centers = submit("lloyd", (k, r), step + 1, lloyd_update, centers, stats)
        # 3. evaluation of the final centers on both splits, with the inertia of the earlier epochs
        for split in ("train", "test"):
            hist = tuple(history) if split == "train" else ()
            parts = [
                submit("", (k, r), 0, chunk_stats_task, centers, info, split, j, history=hist)
                for j in range(info.n_chunks(split))
            ]
            events[tree_reduce(client, parts)] = (f"eval-{split}", (k, r), 0)
        events[submit("", (k, r), 0, _identity, centers)] = ("final", (k, r), 0)

    pending = as_completed(list(events))
    try:
        for fut in pending:
            kind, key, n = events.pop(fut)
            c = chains[key]
            if kind == "chunk":
                c.fit_done += 1
            elif kind == "epoch":
                c.fit_done += 1
                state = fut.result()
                ckpt.save_epoch(state, E, L)
                if on_epoch is not None:
                    on_epoch(state)
                if n == E:
                    c.t_fit_end = time.perf_counter()
            elif kind == "lloyd-stats":
                c.lloyd_inertia.append(fut.result().inertia)
            elif kind == "lloyd":
                ckpt.save_lloyd(c.k, c.restart, n, fut.result(), E, L)
                ckpt.group[f"chains/k{c.k}/r{c.restart}"].attrs["lloyd_inertia"] = c.lloyd_inertia[:n]
                c.t_fit_end = time.perf_counter()
            elif kind == "eval-train":
                c.train = fut.result()
            elif kind == "eval-test":
                c.test = fut.result()
            elif kind == "final":
                c.centers = fut.result()
            del fut
            progress.update(chains, E, "fit")
    except BaseException:
        client.cancel(list(events), force=True)
        raise
    finally:
        progress.update(chains, E, "fit", force=True)
        progress.close()

    results = []
    for (k, r), c in chains.items():
        assert c.train is not None and c.test is not None and c.centers is not None
        history_ssd = list(c.train.ssd[:-1])
        trajectory = [float(v) for v in history_ssd + c.lloyd_inertia[:L] + [c.train.inertia]]
        end = c.t_fit_end or time.perf_counter()
        results.append(ChainResult(k, r, c.centers, c.train, c.test, trajectory, end - c.t_start))
    return results


def _identity(x: Any) -> Any:
    return x
