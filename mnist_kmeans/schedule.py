"""Submits the job's graph to the cluster as futures, saves checkpoints as results arrive, shows progress.

The graph of one K; every K is independent, so all of them run at once::

    restart r:  init_chain ─▶ fit_chunk ─▶ … ─▶ fit_chunk     epochs × n_chunks sequential tasks (map, fit.py)
                     ─▶ chunk_stats × n_chunks ─▶ tree of combine       the exact training inertia of restart r
    select_restart (lowest inertia) ─▶ lloyd_update                      … the first full-batch Lloyd step
          ─▶ [chunk_stats × n_chunks ─▶ tree of combine ─▶ lloyd_update] × (lloyd_steps - 1)   (evaluate.py)
          ─▶ chunk_stats × n_chunks of train and of test ─▶ tree of combine     the evaluation (reduce)

The restarts of a K are compared by their exact training inertia right after their mini-batch epochs, and only the
best continues: the pass that measures it is also the first Lloyd step's, so the choice costs nothing extra, and
restarts (cheap at small K, where the local optimum found varies most) do not multiply the Lloyd and evaluation work.

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
from mnist_kmeans.fit import ChainState, FitParams, chunk_order, draw_sample, fit_chunk, init_chain


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
class KResult:
    """The chosen model of one K, fitted and evaluated."""

    k: int
    restart: int  # the restart chosen (lowest training inertia after the mini-batch epochs)
    restart_inertia: list[float]  # each restart's training inertia after its mini-batch epochs (empty on resume)
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


def select_restart(stats: list[PassStats]) -> int:
    """Index of the restart with the lowest training inertia (ties: the first)."""
    return int(np.argmin([st.inertia for st in stats]))


def pick(index: int, items: Sequence[Any]) -> Any:
    return items[index]


def lloyd_step(index: int, centers: Sequence[np.ndarray], stats: list[PassStats]) -> np.ndarray:
    """A Lloyd step of ``centers[index]`` from its statistics ``stats[index]``."""
    return lloyd_update(centers[index], stats[index])


@dataclass
class _K:
    """The client's record of one K while its tasks run."""

    k: int
    restarts: int
    fit_tasks: int  # partial_fit tasks in total (restarts x epochs x chunks), for progress
    fit_done: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_fit_end: float | None = None
    chosen: int | None = None
    restart_inertia: dict[int, float] = field(default_factory=dict)
    restart_epoch_inertia: dict[int, list[float]] = field(default_factory=dict)
    epoch_inertia: list[float] = field(default_factory=list)  # after epochs 1..E-1, then after epoch E
    lloyd_inertia: list[float] = field(default_factory=list)  # after Lloyd steps 1..L-1 (inputs of later passes)
    train: PassStats | None = None
    test: PassStats | None = None
    centers: np.ndarray | None = None


class Progress:
    """One status line on a terminal (stderr); silent when stderr is not a terminal."""

    def __init__(self, stream: Any = None, min_interval: float = 0.2):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval, self.last = min_interval, 0.0

    def update(self, groups: dict[int, _K], epochs: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.min_interval):
            return
        self.last = now
        parts = []
        for k, g in sorted(groups.items()):
            done = epochs * g.fit_done // max(g.fit_tasks, 1)
            state = "done" if g.test is not None else ("lloyd" if g.chosen is not None else f"{done}/{epochs} ep")
            parts.append(f"K={k} {state}")
        total = sum(g.fit_tasks for g in groups.values())
        pct = 100 * sum(g.fit_done for g in groups.values()) // max(total, 1)
        self.stream.write(f"\rfit {pct:3d}% of epochs | " + "  ".join(parts) + "\033[K")
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
) -> list[KResult]:
    """Fit and evaluate every K of ``plan`` on the cluster, continuing from what ``ckpt`` holds.

    Blocks until all are done. On ``KeyboardInterrupt`` (or any error) the remaining work is cancelled and the
    exception propagates; every epoch and Lloyd step saved so far stays in ``ckpt``.
    """
    info, params, E, L = plan.info, plan.params, plan.epochs, plan.lloyd_steps
    n_chunks = info.n_chunks("train")
    progress = progress or Progress()
    groups: dict[int, _K] = {}
    events: dict[Future, tuple[str, int, int]] = {}

    def submit(func: Callable, *args: Any, event: tuple[str, int, int] | None = None, **kwargs: Any) -> Future:
        fut = client.submit(func, *args, pure=False, **kwargs)
        if event is not None:
            events[fut] = event
        return fut

    def train_pass(center_sets: list[Any], with_sums: bool, histories: list[tuple] | None = None) -> Future:
        """Statistics of each center set over the training split: a future of ``list[PassStats]``."""
        parts = [
            submit(chunk_stats_task, center_sets, info, "train", j, with_sums=with_sums, histories=histories or ())
            for j in range(n_chunks)
        ]
        return tree_reduce(client, parts)

    sample: Future | None = None  # the k-means++ sample, drawn once for all chains, only if some chain starts afresh
    sample_rows = max(params.init_rows(k, info.n_train) for k in plan.restarts)

    for k in sorted(plan.restarts, reverse=True):  # largest K first: the longest work starts first
        R = plan.restarts[k]
        saved = [ckpt.progress(k, r) for r in range(R)]
        g = groups[k] = _K(k, R, fit_tasks=R * E * n_chunks, fit_done=sum(e for e, _ in saved) * n_chunks)
        chosen = next((r for r, (_, lloyd_done) in enumerate(saved) if lloyd_done), None)
        if chosen is not None:  # resume after the choice: continue the chosen restart's Lloyd steps
            lloyd_done = saved[chosen][1]
            attrs = ckpt.chain_attrs(k, chosen)
            g.chosen, g.epoch_inertia = chosen, list(attrs["epoch_inertia"])
            g.lloyd_inertia = list(attrs["lloyd_inertia"])[: lloyd_done - 1]
            centers: Any = ckpt.lloyd_centers(k, chosen)[-1]
        else:
            lloyd_done = 0
            finals, histories = [], []
            for r in range(R):
                epochs_done = saved[r][0]
                history: list[Any] = list(ckpt.epoch_centers(k, r)[: min(epochs_done, E - 1)])
                if epochs_done == 0:
                    sample = sample or submit(draw_sample, info, sample_rows, params.seed)
                    state: Any = submit(init_chain, sample, k, r, params)
                else:
                    state = ckpt.load_state(k, r)
                for epoch in range(epochs_done, E):
                    order = chunk_order(n_chunks, params.seed, k, r, epoch)
                    for i, chunk in enumerate(order):
                        kind = "epoch" if i == n_chunks - 1 else "chunk"
                        state = submit(fit_chunk, state, info, chunk, n_chunks, params, event=(kind, k, epoch + 1))
                    if epoch < E - 1:
                        history.append(submit(centers_of, state))
                finals.append(submit(centers_of, state))
                histories.append(tuple(history))
            # all restarts of K in one pass: one GEMM per chunk against every restart's centers
            passes = train_pass(finals, with_sums=L > 0, histories=histories)
            events[passes] = ("restarts", k, 0)
            index = submit(select_restart, passes, event=("select", k, 0))
            if L == 0:
                centers = submit(pick, index, finals)
                events[submit(pick, index, passes)] = ("eval-train", k, 0)
            else:
                centers = submit(lloyd_step, index, finals, passes, event=("lloyd", k, 1))
                lloyd_done = 1
        for step in range(lloyd_done, L):
            stats = train_pass([centers], with_sums=True)
            events[stats] = ("lloyd-stats", k, step + 1)
            centers = submit(lloyd_step, 0, [centers], stats, event=("lloyd", k, step + 1))
        if L > 0:
            events[submit(pick, 0, train_pass([centers], with_sums=False))] = ("eval-train", k, 0)
        test_parts = [submit(chunk_stats_task, [centers], info, "test", j) for j in range(info.n_chunks("test"))]
        events[submit(pick, 0, tree_reduce(client, test_parts))] = ("eval-test", k, 0)
        events[submit(_identity, centers)] = ("final", k, 0)

    try:
        for fut in as_completed(list(events)):
            kind, k, n = events.pop(fut)
            g = groups[k]
            if kind in ("chunk", "epoch"):
                g.fit_done += 1
                if kind == "epoch":
                    state = fut.result()
                    ckpt.save_epoch(state, E, L)
            elif kind == "restarts":
                for r, st in enumerate(fut.result()):
                    g.restart_inertia[r] = st.inertia
                    g.restart_epoch_inertia[r] = [float(v) for v in st.ssd]
            elif kind == "select":
                g.chosen = int(fut.result())
                g.epoch_inertia = g.restart_epoch_inertia[g.chosen]
                g.t_fit_end = time.perf_counter()
            elif kind == "lloyd-stats":
                g.lloyd_inertia.append(fut.result()[0].inertia)
            elif kind == "lloyd":
                assert g.chosen is not None
                ckpt.save_lloyd(k, g.chosen, n, fut.result(), E, L, g.epoch_inertia, g.lloyd_inertia[: n - 1])
                g.t_fit_end = time.perf_counter()
            elif kind == "eval-train":
                g.train = fut.result()
            elif kind == "eval-test":
                g.test = fut.result()
            elif kind == "final":
                g.centers = fut.result()
            del fut
            progress.update(groups, E)
    except BaseException:
        # Drop the references and let closing the client release the work: cancelling futures whose
        # intermediate results have no holder trips an assertion in the scheduler (distributed 2026.8).
        events.clear()
        raise
    finally:
        progress.update(groups, E, force=True)
        progress.close()

    results = []
    for k, g in groups.items():
        assert g.train is not None and g.test is not None and g.centers is not None and g.chosen is not None
        trajectory = g.epoch_inertia + g.lloyd_inertia[: max(L - 1, 0)] + ([g.train.inertia] if L > 0 else [])
        restart_inertia = [g.restart_inertia[r] for r in sorted(g.restart_inertia)]
        end = g.t_fit_end or time.perf_counter()
        results.append(KResult(k, g.chosen, restart_inertia, g.centers, g.train, g.test, trajectory, end - g.t_start))
    return sorted(results, key=lambda r: r.k)


def _identity(x: Any) -> Any:
    return x
