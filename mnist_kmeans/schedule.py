"""Submits the job's graph to the cluster as futures, saves checkpoints as results arrive, shows progress.

The graph of one K; every K is independent, so all of them run at once::

    restart r:  init_chain ─▶ fit_chunk × S                  S chunks: the first ``screen_rows`` rows (fit.py, map)
        ─▶ chunk_stats × n_chunks ─▶ tree of combine          the training inertia of every restart, in one pass
    select_restart (lowest inertia) ─▶ fit_chunk × (epochs · n_chunks - S)      only the best restart goes on
        ─▶ chunk_stats × n_chunks ─▶ tree of combine ─▶ lloyd_update           the first full-batch Lloyd step
        ─▶ [chunk_stats × n_chunks ─▶ tree of combine ─▶ lloyd_update] × (lloyd_steps - 1)   (evaluate.py)
        ─▶ chunk_stats × n_chunks of train and of test ─▶ tree of combine     the evaluation (reduce)

Restarts are screened as scikit-learn's ``MiniBatchKMeans`` screens its ``n_init`` initialisations: every restart
runs only its first chunk(s), they are compared by their exact training inertia (one pass, one GEMM per chunk for all
of them), and only the best runs its epochs and Lloyd steps. So restarts cost one chunk each whatever the size of
the data set, and the K's with the most restarts (the small ones, where the local optimum found varies most) do not
multiply the work of the rest. With one restart there is no screening.

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
from mnist_kmeans.errors import UserError
from mnist_kmeans.evaluate import PassStats, chunk_stats_task, combine, lloyd_update
from mnist_kmeans.fit import ChainState, FitParams, draw_sample, fit_chunk, init_chain


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
    restart: int  # the restart chosen (lowest training inertia at the screening)
    restart_inertia: list[float]  # each restart's training inertia at the screening (empty with one restart)
    centers: np.ndarray
    train: PassStats
    test: PassStats
    trajectory: list[float]  # training inertia after each epoch, then after each Lloyd step
    fit_seconds: float


def centers_of(state: ChainState) -> np.ndarray:
    return state.centers


def tree_reduce(client: Client, parts: Sequence[Future], fan_in: int = 8, priority: int = 0) -> Future:
    """Sum ``PassStats`` futures on the cluster, ``fan_in`` at a time, until one is left."""
    parts = list(parts)
    while len(parts) > 1:
        parts = [
            client.submit(combine, *parts[i : i + fan_in], pure=False, priority=priority)
            for i in range(0, len(parts), fan_in)
        ]
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
class _Start:
    """Where a K's continuation starts: a chain state (a future, or loaded from the checkpoint) after ``done``
    chunks, with its centers after each earlier epoch; or, resumed in the Lloyd steps, the centers after step
    ``lloyd_done``."""

    state: Any
    done: int
    history: list[Any]
    centers: Any = None
    lloyd_done: int = 0


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
    restart_inertia: dict[int, float] = field(default_factory=dict)  # each restart's, at the screening
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
            state = "done" if g.test is not None else ("lloyd" if g.epoch_inertia else f"{done}/{epochs} ep")
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

    def train_pass(center_sets: list[Any], with_sums: bool, histories: list[tuple] | None = None, priority: int = 0) -> Future:
        """Statistics of each center set over the training split: a future of ``list[PassStats]``."""
        parts = [
            submit(chunk_stats_task, center_sets, info, "train", j, with_sums=with_sums, histories=histories or (),
                   priority=priority)
            for j in range(n_chunks)
        ]
        return tree_reduce(client, parts, priority=priority)

    sample: Future | None = None  # the k-means++ sample, drawn once for all chains, only if some chain starts afresh
    sample_rows = max(params.init_rows(k, info.n_train) for k in plan.restarts)
    S = params.screen_chunks(info)

    def fit_chunks(state: Any, k: int, done: int, n_tasks: int, save: bool = True, priority: int = 0) -> Any:
        """``n_tasks`` fit_chunk tasks after ``done`` chunks of the chain: epoch ends are saved if ``save``."""
        for i in range(done, done + n_tasks):
            end_of_epoch = save and (i + 1) % n_chunks == 0
            kind, epoch = ("epoch", (i + 1) // n_chunks) if end_of_epoch else ("chunk", 0)
            state = submit(fit_chunk, state, info, params, event=(kind, k, epoch), priority=priority)
        return state

    # Phase 1, every K's start: resume from the checkpoint, or k-means++ and the screening of its restarts. These
    # tasks are submitted first and run first: the small K, whose many restarts make long sequences of short tasks,
    # would otherwise start last and finish alone.
    FIRST = 1
    starts: dict[int, _Start] = {}
    for k in sorted(plan.restarts, reverse=True):  # largest K first: the longest work starts first
        R = plan.restarts[k]
        saved = [ckpt.progress(k, r) for r in range(R)]
        started = [r for r, (e, lloyd) in enumerate(saved) if e or lloyd]
        if len(started) > 1:  # only the restart that won the screening ever saves anything
            raise UserError(f"{ckpt.path}/chains/k{k}: {len(started)} restarts have saved epochs; "
                            "this checkpoint was made by another version, start a new run")
        screening = not started and R > 1
        g = groups[k] = _K(k, R, fit_tasks=E * n_chunks + (R - 1) * S * screening)
        if started:
            g.chosen = started[0]
            epochs_done, lloyd_done = saved[g.chosen]
            g.fit_done = epochs_done * n_chunks
            attrs = ckpt.chain_attrs(k, g.chosen)
            g.restart_inertia = dict(enumerate(attrs.get("screen_inertia", [])))
            if lloyd_done:  # resume in the Lloyd steps
                g.epoch_inertia = list(attrs["epoch_inertia"])
                g.lloyd_inertia = list(attrs["lloyd_inertia"])[: lloyd_done - 1]
                starts[k] = _Start(None, E * n_chunks, [], ckpt.lloyd_centers(k, g.chosen)[-1], lloyd_done)
            else:
                history = list(ckpt.epoch_centers(k, g.chosen)[: min(epochs_done, E - 1)])
                starts[k] = _Start(ckpt.load_state(k, g.chosen), epochs_done * n_chunks, history)
            continue
        sample = sample or submit(draw_sample, info, sample_rows, params.seed, priority=FIRST)
        if not screening:
            g.chosen = 0
            starts[k] = _Start(submit(init_chain, sample, k, 0, params, priority=FIRST), 0, [])
            continue
        heads = [fit_chunks(submit(init_chain, sample, k, r, params, priority=FIRST), k, 0, S, False, FIRST) for r in range(R)]
        screen = train_pass([submit(centers_of, h, priority=FIRST) for h in heads], False, priority=FIRST)
        events[screen] = ("screen", k, 0)
        index = submit(select_restart, screen, event=("select", k, 0), priority=FIRST)
        state = submit(pick, index, heads, priority=FIRST)  # the winner goes on from its chunk S
        starts[k] = _Start(state, S, [])
        if S == n_chunks:  # the screening ended the first epoch: save the winner's
            events[state] = ("save", k, 1)
            if E > 1:
                starts[k].history.append(submit(centers_of, state))

    # Phase 2, every K's continuation: the rest of its epochs, the Lloyd steps, the evaluation.
    for k, st in starts.items():
        lloyd_done, centers = st.lloyd_done, st.centers
        if st.state is not None:
            state, done, history = st.state, st.done, st.history
            for epoch in range(done // n_chunks, E):
                first = max(done, epoch * n_chunks)
                state = fit_chunks(state, k, first, (epoch + 1) * n_chunks - first)
                if epoch < E - 1:  # the centers after every epoch but the last, for their inertia
                    history.append(submit(centers_of, state))
            final = submit(centers_of, state)
            stats = train_pass([final], with_sums=L > 0, histories=[tuple(history)])
            events[stats] = ("epochs", k, 0)
            if L == 0:
                centers = final
                events[submit(pick, 0, stats)] = ("eval-train", k, 0)
            else:
                centers = submit(lloyd_step, 0, [final], stats, event=("lloyd", k, 1))
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
            if kind in ("epoch", "save"):
                screen = [g.restart_inertia[r] for r in sorted(g.restart_inertia)]
                ckpt.save_epoch(fut.result(), E, L, screen_inertia=screen)
            elif kind == "screen":
                g.restart_inertia = {r: st.inertia for r, st in enumerate(fut.result())}
            elif kind == "select":
                g.chosen = int(fut.result())
            elif kind == "epochs":
                g.epoch_inertia = [float(v) for v in fut.result()[0].ssd]
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
