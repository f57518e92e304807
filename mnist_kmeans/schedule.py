"""Submits the job's graph to the cluster as futures, saves checkpoints as results arrive, shows progress.

The graph, in three phases::

    1. every K's start        restart r: init_chain ─▶ fit_chunk × S      S chunks: the first ``screen_rows`` rows
                              chunk_stats × n_chunks ─▶ tree of combine     every restart of every K, in one pass
                              select_restart per K (lowest inertia)        only the best restart goes on
    2. every K's epochs       fit_chunk × (epochs · n_chunks - S)         the chosen chain (fit.py, map)
    3. the grid's passes      [chunk_stats × n_chunks ─▶ tree of combine ─▶ lloyd_update per K] × lloyd_steps
                              chunk_stats × n_chunks of train and of test ─▶ tree of combine    the evaluation

Restarts are screened as scikit-learn's ``MiniBatchKMeans`` screens its ``n_init`` initialisations: every restart
runs only its first chunk(s), they are compared by their exact training inertia, and only the best runs its epochs
and Lloyd steps. So restarts cost one chunk each whatever the size of the data set, and the K's with the most
restarts (the small ones, where the local optimum found varies most) do not multiply the work of the rest. With
one restart there is no screening.

Every statistics pass serves the whole grid at once: each chunk task reads its rows once for every K that needs the
pass, a sixth of the tasks of a pass per K. The restarts of a K share one GEMM (small-K products alone use a fraction
of the machine); different K's do not, so that a K's result never depends on which others share its pass
(evaluate.chunk_stats).

Futures rather than one delayed graph: the chains run eagerly, every epoch end is saved the moment it exists,
progress is exact, and a Ctrl-C cancels what is left. The client holds one future per chain and step in
flight, and only small results (a chain's state, reduced tables) ever come back to it.
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


def select_restart(stats: list[PassStats], start: int, stop: int) -> int:
    """Index, counted from ``start``, of the set in ``stats[start:stop]`` (the restarts of one K) with the lowest
    training inertia (ties: the first)."""
    return int(np.argmin([st.inertia for st in stats[start:stop]]))


def pick(index: int, items: Sequence[Any]) -> Any:
    return items[index]


def lloyd_step(index: int, centers: Sequence[np.ndarray], stats: list[PassStats]) -> np.ndarray:
    """A Lloyd step of ``centers[index]`` from its statistics ``stats[index]``."""
    return lloyd_update(centers[index], stats[index])


class _Result:
    """A future's result, fetched once and only if asked for (a chunk's chain state, counted for progress, is not)."""

    def __init__(self, fut: Future):
        self.fut, self.value, self.fetched = fut, None, False

    def __call__(self, index: Any = None) -> Any:
        if not self.fetched:
            self.value, self.fetched = self.fut.result(), True
        return self.value if index is None else self.value[index]


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
    # What to do with each future's result when it arrives: (kind, K, step, index into the result or None).
    events: dict[Future, list[tuple[str, int, int, Any]]] = {}

    def on(fut: Future, *happenings: tuple[str, int, int, Any]) -> None:
        events.setdefault(fut, []).extend(happenings)

    def submit(func: Callable, *args: Any, event: tuple[str, int, int] | None = None, **kwargs: Any) -> Future:
        fut = client.submit(func, *args, pure=False, **kwargs)
        if event is not None:
            on(fut, (*event, None))
        return fut

    def stats_pass(
        split: str, center_sets: list[Any], with_sums: Any, histories: Sequence = (), gemm_groups: Sequence[int] = (),
        priority: int = 0,
    ) -> Future:
        """Statistics of each center set over a split, one task per chunk: a future of ``list[PassStats]``."""
        parts = [
            submit(chunk_stats_task, center_sets, info, split, j, with_sums=with_sums, histories=histories,
                   gemm_groups=gemm_groups, priority=priority)
            for j in range(info.n_chunks(split))
        ]
        return tree_reduce(client, parts, priority=priority)

    def fit_chunks(state: Any, k: int, done: int, n_tasks: int, save: bool = True, priority: int = 0) -> Any:
        """``n_tasks`` fit_chunk tasks after ``done`` chunks of the chain: epoch ends are saved if ``save``."""
        for i in range(done, done + n_tasks):
            end_of_epoch = save and (i + 1) % n_chunks == 0
            kind, epoch = ("epoch", (i + 1) // n_chunks) if end_of_epoch else ("chunk", 0)
            state = submit(fit_chunk, state, info, params, event=(kind, k, epoch), priority=priority)
        return state

    sample: Future | None = None  # the k-means++ sample, drawn once for all chains, only if some chain starts afresh
    sample_rows = max(params.init_rows(k, info.n_train) for k in plan.restarts)
    S = params.screen_chunks(info)

    # Phase 1, every K's start: resume from the checkpoint, or k-means++ and the screening of its restarts. These
    # tasks are submitted first and run first: the small K, whose many restarts make long sequences of short tasks,
    # would otherwise start last and finish alone.
    FIRST = 1
    starts: dict[int, _Start] = {}
    screened: list[tuple[int, list[Future]]] = []  # (K, the state of each restart after the screening chunks)
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
        if screening:
            inits = [submit(init_chain, sample, k, r, params, priority=FIRST) for r in range(R)]
            heads = [fit_chunks(state, k, 0, S, save=False, priority=FIRST) for state in inits]
            screened.append((k, heads))
        else:
            g.chosen = 0
            starts[k] = _Start(submit(init_chain, sample, k, 0, params, priority=FIRST), 0, [])
    if screened:
        screen = stats_pass("train", [submit(centers_of, h, priority=FIRST) for _, heads in screened for h in heads],
                            False, gemm_groups=[len(heads) for _, heads in screened], priority=FIRST)
        first = 0
        for k, heads in screened:
            on(screen, ("screen", k, 0, slice(first, first + len(heads))))
            index = submit(select_restart, screen, first, first + len(heads), event=("select", k, 0), priority=FIRST)
            first += len(heads)
            state = submit(pick, index, heads, priority=FIRST)  # the winner goes on from its chunk S
            starts[k] = _Start(state, S, [])
            if S == n_chunks:  # the screening ended the first epoch: save the winner's
                on(state, ("save", k, 1, None))
                if E > 1:
                    starts[k].history.append(submit(centers_of, state))

    # Phase 2, every K's epochs: the chosen chain fits the rest of them.
    centers: dict[int, Any] = {}  # each K's current centers (a future, or an array read from the checkpoint)
    todo: dict[int, list[tuple[str, int, bool]]] = {}  # each K's passes still to make: (kind, Lloyd step, sums)
    histories: dict[int, tuple] = {}
    for k, st in starts.items():
        if st.state is None:
            centers[k], histories[k], done_lloyd, passes = st.centers, (), st.lloyd_done, []
        else:
            state = st.state
            for epoch in range(st.done // n_chunks, E):
                first = max(st.done, epoch * n_chunks)
                state = fit_chunks(state, k, first, (epoch + 1) * n_chunks - first)
                if epoch < E - 1:  # the centers after every epoch but the last, for their inertia
                    st.history.append(submit(centers_of, state))
            centers[k], histories[k] = submit(centers_of, state), tuple(st.history)
            # the pass after the epochs gives their inertia and, with the sums, the first Lloyd step
            done_lloyd, passes = min(L, 1), [("epochs", 1 if L else 0, L > 0)]
        passes += [("lloyd-stats", step, True) for step in range(done_lloyd + 1, L + 1)]
        todo[k] = passes + ([("eval-train", 0, False)] if L > 0 else [])

    # Phase 3, the grid's passes, aligned at the end: every K takes part in the last (the evaluation), and a K
    # resumed in its Lloyd steps joins when its remaining steps begin.
    T = max(len(p) for p in todo.values())
    for t in range(T):
        grid = [(k, todo[k][t - T + len(todo[k])]) for k in todo if len(todo[k]) >= T - t]
        sets = [centers[k] for k, _ in grid]
        stats = stats_pass("train", sets, [sums for _, (_, _, sums) in grid],
                           [histories[k] if kind == "epochs" else () for k, (kind, _, _) in grid])
        for i, (k, (kind, step, sums)) in enumerate(grid):
            on(stats, (kind, k, step, i))
            if kind == "epochs" and L == 0:
                on(stats, ("eval-train", k, 0, i))  # no Lloyd step: this pass is the evaluation
            if sums:
                centers[k] = submit(lloyd_step, i, sets, stats, event=("lloyd", k, step))
    test = stats_pass("test", [centers[k] for k in todo], False)
    for i, k in enumerate(todo):
        on(test, ("eval-test", k, 0, i))
        if isinstance(centers[k], Future):
            on(centers[k], ("final", k, 0, None))
        else:  # resumed after its last Lloyd step
            groups[k].centers = centers[k]

    try:
        for fut in as_completed(list(events)):
            result = _Result(fut)
            for kind, k, n, index in events.pop(fut):
                g = groups[k]
                if kind in ("chunk", "epoch"):
                    g.fit_done += 1
                if kind in ("epoch", "save"):
                    screen_inertia = [g.restart_inertia[r] for r in sorted(g.restart_inertia)]
                    ckpt.save_epoch(result(index), E, L, screen_inertia=screen_inertia)
                elif kind == "screen":
                    g.restart_inertia = {r: st.inertia for r, st in enumerate(result(index))}
                elif kind == "select":
                    g.chosen = int(result(index))
                elif kind == "epochs":
                    g.epoch_inertia = [float(v) for v in result(index).ssd]
                    g.t_fit_end = time.perf_counter()
                elif kind == "lloyd-stats":
                    g.lloyd_inertia.append(result(index).inertia)
                elif kind == "lloyd":
                    assert g.chosen is not None
                    ckpt.save_lloyd(k, g.chosen, n, result(index), E, L, g.epoch_inertia, g.lloyd_inertia[: n - 1])
                    g.t_fit_end = time.perf_counter()
                elif kind == "eval-train":
                    g.train = result(index)
                elif kind == "eval-test":
                    g.test = result(index)
                elif kind == "final":
                    g.centers = result(index)
            del fut, result
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
