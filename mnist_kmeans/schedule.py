"""Submits the job's graph to the cluster as futures, saves checkpoints as results arrive, shows progress.

The graph, in three phases::

    1. every K's start        restart r: init_chain ─▶ fit_chunk × S      S chunks: the first ``screen_rows`` rows
                              chunk_stats × n_chunks ─▶ tree of combine     every restart of every K, in one pass
                              screen_outcome per K (lowest inertia; how far restarts agree)   the best goes on
    2. every K's epochs       fit_lane × (epochs · n_chunks - S)          the chosen chains, a few K's per lane (fit.py)
    3. the grid's passes      [chunk_stats × n_chunks ─▶ tree of combine ─▶ lloyd_update per K] × lloyd_steps
                              chunk_stats × n_chunks of train and of test ─▶ tree of combine    the evaluation
                              selection_chunk_task × n_chunks ─▶ tree of combine ─▶ selection_scores
                                                                          the label-free indices (kselect.py)

Restarts are screened as scikit-learn's ``MiniBatchKMeans`` screens its ``n_init`` initialisations: every restart
runs only its first chunk(s), they are compared by their exact training inertia, and only the best runs its epochs
and Lloyd steps. So restarts cost one chunk each whatever the size of the data set, and the K's with the most
restarts (the small ones, where the local optimum found varies most) do not multiply the work of the rest. With
one restart there is no screening. The screening also measures how far the restarts agree on the selection sample
(:func:`screen_outcome`): the losing restarts' centers exist only then, so that agreement is saved with the
winner's chain, like its inertia, and a resumed run reports the same numbers. (Comparing them on the next
``screen_rows`` rows only, as scikit-learn compares on a validation sample, cost a tenth as much but picked a
restart of K=16 at seed 2 that ended 1.2% above converged Lloyd: README, "Performance".)

Every statistics pass serves the whole grid at once: each chunk task reads its rows once for every K that needs the
pass, a sixth of the tasks of a pass per K. The restarts of a K share one GEMM (small-K products alone use a fraction
of the machine); different K's do not, so that a K's result never depends on which others share its pass
(evaluate.chunk_stats).

Futures rather than one delayed graph: the chains run eagerly, every epoch end is saved the moment it exists,
progress is exact, and a Ctrl-C cancels what is left. The client holds one future per chain and step in
flight, and only small results (a chain's state, reduced tables) ever come back to it. Each task's key names its
step and K (:func:`task_key`), so that the dashboard shows one progress bar per K and phase.

On the client, :func:`run_chains` submits the three phases in that order, then handles each result it watches for
(a ``Watched``: its ``ResultKind``, its K, its step, its part of the future's result) as it arrives, one handler per
kind: the checkpoint's saves, the inertia curve, the restart chosen, the statistics and centers of each K's result.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed

from mnist_kmeans.checkpoint import Checkpoint
from mnist_kmeans.data.store import StoreInfo
from mnist_kmeans.errors import UserError
from mnist_kmeans.evaluate import PassStats, chunk_stats_task, combine, lloyd_update
from mnist_kmeans.fit import ChainState, FitParams, draw_sample, fit_chunk, fit_lane, init_chain
from mnist_kmeans.kselect import (
    cluster_means,
    kept_labels,
    restart_agreement,
    rows_in_chunk,
    sample_rows,
    selection_chunk_task,
    selection_scores,
)
from mnist_kmeans.kselect import draw_sample as draw_selection_sample
from mnist_kmeans.progress import Progress

# Every K's start (phase 1) runs before any epoch: the small K, whose many restarts make long sequences of short
# tasks, would otherwise start last and finish alone.
START_PRIORITY = 1


@dataclass(frozen=True)
class FitPlan:
    """What to compute: the chains of a K grid over one store."""

    info: StoreInfo
    restarts: dict[int, int]  # K -> number of restarts
    epochs: int
    lloyd_steps: int
    params: FitParams
    lanes: int | None = None  # chains fitted side by side over each chunk read; None: the cluster's worker threads


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
    restart_agreement: list[float] = field(default_factory=list)  # ARI of each pair of restarts (Screening)
    selection: dict[str, float | None] = field(default_factory=dict)  # kselect.selection_scores
    fit_rows: int = 0  # training rows the chosen chain's partial_fit saw (fewer than epochs * n_train if it stopped)


# --- the tasks this module adds (module-level: they run on the workers) ----------------------------------------------


def task_key(group: str, *words: object) -> str:
    """A task key unique on any cluster (a random token last) whose dashboard group is ``group``.

    The dashboard's progress bars are per ``dask.utils.key_split`` of the key, which keeps the first word and then
    only purely alphabetic ones: ``fit-k256-...`` would join every K under ``fit``. So the K or the step is joined
    with ``_`` (``fit_k256``, ``stats_lloyd1``) and the other words, which never make a group, follow:
    ``task_key("fit_k256", "e2", "c3")`` is ``fit_k256-e2-c3-<uuid4 hex>`` (docs/contract.md, "Task keys").
    """
    return "-".join([group, *map(str, words), uuid.uuid4().hex])


def centers_of(state: ChainState) -> np.ndarray:
    return state.centers


def lane_centers(states: Sequence[ChainState], index: int) -> np.ndarray:
    return states[index].centers


# The fixed cost of one partial_fit call, in centers' worth of distance products (1,024 rows of MNIST on one thread:
# about 1.8 ms fixed, 0.022 ms per center; README, "Performance").
FIXED_COST_CENTERS = 80


def lanes_of(positions: dict[int, int], n_lanes: int) -> list[list[int]]:
    """The K's (each at chunk position ``positions[K]``) grouped into lanes of equal position, at most ``n_lanes`` per
    position, balanced by their cost per chunk (largest first, each into the lightest lane). Lanes of K's in
    increasing order, largest-cost lane first."""
    out: list[list[int]] = []
    for position in sorted(set(positions.values())):
        ks = sorted((k for k, p in positions.items() if p == position), reverse=True)
        lanes: list[list[int]] = [[] for _ in range(min(n_lanes, len(ks)))]
        loads = [0] * len(lanes)
        for k in ks:
            lightest = loads.index(min(loads))
            lanes[lightest].append(k)
            loads[lightest] += k + FIXED_COST_CENTERS
        out += [sorted(lane) for _, lane in sorted(zip(loads, lanes, strict=True), key=lambda pair: -pair[0])]
    return out


def tree_reduce(
    client: Client, parts: Sequence[Future], fan_in: int = 8, priority: int = 0, group: str = "combine"
) -> Future:
    """Sum ``PassStats`` futures on the cluster, ``fan_in`` at a time, until one is left; keys of ``group``.

    The sums run one priority above their parts, as soon as their parts exist, so that a pass holds a few parts at a
    time: at the parts' priority Dask runs the earlier submissions first, every part of a pass, and the workers held
    them all (3.3 MB per chunk for the reference grid's sums: 2.7 GB at 8.1 million rows). The tree's shape, and so
    every sum's bits, does not depend on the order."""
    parts = list(parts)
    level = 0
    while len(parts) > 1:
        level += 1
        parts = [
            client.submit(
                combine,
                *parts[i : i + fan_in],
                key=task_key(group, f"l{level}", f"p{i // fan_in}"),
                priority=priority + 1,
            )
            for i in range(0, len(parts), fan_in)
        ]
    return parts[0]


def select_restart(stats: list[PassStats], start: int, stop: int) -> int:
    """Index, counted from ``start``, of the set in ``stats[start:stop]`` (the restarts of one K) with the lowest
    training inertia (ties: the first)."""
    return int(np.argmin([st.inertia for st in stats[start:stop]]))


@dataclass(frozen=True)
class Screening:
    """The outcome of a K's screening: the restart that goes on, and the adjusted Rand index of each pair of
    restarts' assignments of the selection sample (pairs in ``itertools.combinations`` order)."""

    index: int
    agreement: list[float]


def screen_outcome(
    stats: list[PassStats], start: int, stop: int, sample: np.ndarray, *centers: np.ndarray
) -> Screening:
    """:func:`select_restart`, and how far the restarts (``centers``, in restart order) agree on ``sample``."""
    return Screening(select_restart(stats, start, stop), restart_agreement(sample, centers))


def winner(screening: Screening, chains: Sequence[Any]) -> Any:
    return chains[screening.index]


def lloyd_step(index: int, centers: Sequence[np.ndarray], stats: list[PassStats]) -> np.ndarray:
    """A Lloyd step of ``centers[index]`` from its statistics ``stats[index]``."""
    return lloyd_update(centers[index], stats[index])


# --- what the client watches for -------------------------------------------------------------------------------------


class ResultKind(Enum):
    """What a watched result is, and so what the client does with it when it arrives."""

    CHUNK = "chunk"  # a fit_chunk or fit_lane task within an epoch: counted for progress (once per K of a lane)
    EPOCH = "epoch"  # a fit_lane task that ends epoch ``step``: counted, and the K's chain state saved
    SAVE = "save"  # the screening's winner, which ended epoch 1: saved (its chunks were counted as they ran)
    SCREEN = "screen"  # the screening pass: each restart's training inertia
    SELECT = "select"  # the Screening: the restart that won and how far the restarts agree
    EPOCHS = "epochs"  # the grid pass after the epochs: the inertia after each epoch
    LLOYD_STATS = "lloyd-stats"  # the grid pass before Lloyd step ``step``: the inertia after step ``step - 1``
    LLOYD = "lloyd"  # the centers after Lloyd step ``step``: saved
    EVAL_TRAIN = "eval-train"  # the statistics of the final centers over the training split
    EVAL_TEST = "eval-test"  # ... over the test split
    FINAL = "final"  # the final centers
    SELECTION = "selection"  # the label-free indices of the final centers (kselect.selection_scores)


@dataclass(frozen=True)
class Watched:
    """A result the client waits for: what it is, of which K, and where the K's part of the future's result lies."""

    kind: ResultKind
    k: int
    step: int = 0  # the epoch (EPOCH, SAVE) or the Lloyd step (EPOCHS, LLOYD_STATS, LLOYD); else 0
    index: int | slice | None = None  # the K's part of a result shared by several (a pass); None: all of it


@dataclass(frozen=True)
class GridPass:
    """One statistics pass over the training split that a K takes part in (phase 3)."""

    kind: ResultKind  # EPOCHS, LLOYD_STATS or EVAL_TRAIN
    lloyd_step: int  # the Lloyd step made from the pass's per-center sums; 0: none, the pass needs no sums

    @property
    def with_sums(self) -> bool:
        return self.lloyd_step > 0


class _Result:
    """A future's result, fetched once and only if asked for (a chunk's chain state, counted for progress, is not)."""

    def __init__(self, future: Future):
        self.future, self.value, self.fetched = future, None, False

    def part(self, index: int | slice | None) -> Any:
        """The result, or its part ``index``."""
        if not self.fetched:
            self.value, self.fetched = self.future.result(), True
        return self.value if index is None else self.value[index]


@dataclass
class _Start:
    """Where a K's continuation starts (phase 2): a chain state (a future, or loaded from the checkpoint) after
    ``chunks_done`` chunks, with its centers after each earlier epoch; or, resumed in the Lloyd steps (``state`` is
    None), the centers after step ``lloyd_done``."""

    state: Any
    chunks_done: int
    epoch_centers: list[Any]
    centers: Any = None
    lloyd_done: int = 0


@dataclass
class _KRecord:
    """The client's record of one K while its tasks run (what ``Progress`` shows, what ``KResult`` is made of)."""

    k: int
    restarts: int
    fit_tasks: int  # partial_fit tasks in total (the chosen chain's epochs, the other restarts' screening chunks)
    fit_done: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_fit_end: float | None = None
    chosen: int | None = None
    restart_inertia: dict[int, float] = field(default_factory=dict)  # each restart's, at the screening
    restart_agreement: list[float] = field(default_factory=list)  # Screening.agreement
    selection: dict[str, float | None] = field(default_factory=dict)
    fit_rows: int = 0  # of the chosen chain, as of its last epoch end seen
    epoch_inertia: list[float] = field(default_factory=list)  # after epochs 1..E-1, then after epoch E
    lloyd_inertia: list[float] = field(default_factory=list)  # after Lloyd steps 1..L-1 (inputs of later passes)
    train: PassStats | None = None
    test: PassStats | None = None
    centers: np.ndarray | None = None

    @property
    def epochs_measured(self) -> bool:
        return bool(self.epoch_inertia)

    @property
    def evaluated(self) -> bool:
        return self.test is not None

    def screen_inertia(self) -> list[float]:
        """Each restart's training inertia at the screening, in restart order."""
        return [self.restart_inertia[r] for r in sorted(self.restart_inertia)]

    def result(self, lloyd_steps: int) -> KResult:
        """The K's result, once every result watched for it has arrived."""
        assert self.train is not None and self.test is not None and self.centers is not None
        assert self.chosen is not None
        lloyd = self.lloyd_inertia[: max(lloyd_steps - 1, 0)] + ([self.train.inertia] if lloyd_steps > 0 else [])
        seconds = (self.t_fit_end or time.perf_counter()) - self.t_start
        return KResult(
            self.k,
            self.chosen,
            self.screen_inertia(),
            self.centers,
            self.train,
            self.test,
            self.epoch_inertia + lloyd,
            seconds,
            self.restart_agreement,
            self.selection,
            self.fit_rows,
        )


Handler = Callable[[_KRecord, Watched, _Result], None]


def _pass_group(grid: list[tuple[int, GridPass]]) -> str:
    """The dashboard group of a grid pass: ``stats_lloyd{s}`` when it makes Lloyd step ``s`` (of its K's furthest
    behind), else ``stats_eval`` (the evaluation over the training split)."""
    steps = [grid_pass.lloyd_step for _, grid_pass in grid if grid_pass.with_sums]
    return f"stats_lloyd{min(steps)}" if steps else "stats_eval"


class _Scheduler:
    """One call of :func:`run_chains`: submits the graph phase by phase, then handles the results it watches for."""

    def __init__(self, client: Client, plan: FitPlan, ckpt: Checkpoint):
        self.client, self.plan, self.ckpt, self.info = client, plan, ckpt, plan.info
        self.n_chunks = plan.info.n_chunks("train")
        self.screen_chunks = plan.params.screen_chunks(plan.info)
        self.records: dict[int, _KRecord] = {}
        self.sample: Future | None = None  # the k-means++ sample, drawn only if some chain starts afresh
        self.selection_rows = sample_rows(plan.info.n_train, plan.params.seed)
        self.selection_images: Future | None = None  # those rows' images, drawn once
        self.evaluation: tuple[list[Future], Future] | None = None  # the evaluation pass: its chunks' and its sum
        self.starts: dict[int, _Start] = {}  # phase 1's ends, where each K's phase 2 starts
        self.centers: dict[int, Any] = {}  # each K's current centers (a future, or an array read from the checkpoint)
        self.epoch_centers: dict[int, tuple] = {}  # each K's centers after each epoch but the last
        self.passes: dict[int, list[GridPass]] = {}  # each K's grid passes still to make
        self.watched: dict[Future, list[Watched]] = {}  # what to do with each future's result when it arrives
        self.handlers: dict[ResultKind, Handler] = {
            ResultKind.CHUNK: self.on_chunk,
            ResultKind.EPOCH: self.on_epoch,
            ResultKind.SAVE: self.on_save,
            ResultKind.SCREEN: self.on_screen,
            ResultKind.SELECT: self.on_select,
            ResultKind.EPOCHS: self.on_epochs,
            ResultKind.LLOYD_STATS: self.on_lloyd_stats,
            ResultKind.LLOYD: self.on_lloyd,
            ResultKind.EVAL_TRAIN: self.on_eval_train,
            ResultKind.EVAL_TEST: self.on_eval_test,
            ResultKind.FINAL: self.on_final,
            ResultKind.SELECTION: self.on_selection,
        }

    # --- submitting ---------------------------------------------------------------------------------------------

    def watch(self, future: Future, *watched: Watched) -> None:
        self.watched.setdefault(future, []).extend(watched)

    def submit(
        self, func: Callable, *args: Any, key: tuple[object, ...], watch: Watched | None = None, **kwargs: Any
    ) -> Future:
        """``func(*args)`` on the cluster, its key made of the words of ``key`` (:func:`task_key`)."""
        future = self.client.submit(func, *args, key=task_key(*key), **kwargs)
        if watch is not None:
            self.watch(future, watch)
        return future

    def stats_pass(
        self,
        group: str,
        split: str,
        center_sets: list[Any],
        with_sums: bool | list[bool],
        histories: Sequence = (),
        gemm_groups: Sequence[int] = (),
        priority: int = 0,
    ) -> Future:
        """Statistics of each center set over a split, one task per chunk: a future of ``list[PassStats]``; the tasks'
        keys are of ``group`` (e.g. ``stats_lloyd1``), their sums' of ``group_sum``."""
        parts = self.chunk_stats(group, split, center_sets, with_sums, histories, gemm_groups, priority)
        return tree_reduce(self.client, parts, priority=priority, group=f"{group}_sum")

    def chunk_stats(
        self,
        group: str,
        split: str,
        center_sets: list[Any],
        with_sums: bool | list[bool],
        histories: Sequence = (),
        gemm_groups: Sequence[int] = (),
        priority: int = 0,
        evaluation: bool = False,
    ) -> list[Future]:
        """The chunk tasks of :meth:`stats_pass`: a future of ``list[PassStats]`` per chunk."""
        return [
            self.submit(
                chunk_stats_task,
                center_sets,
                self.info,
                split,
                chunk,
                with_sums=with_sums,
                histories=histories,
                gemm_groups=gemm_groups,
                evaluation=evaluation,
                priority=priority,
                key=(group, f"c{chunk}"),
            )
            for chunk in range(self.info.n_chunks(split))
        ]

    def screening_chunks(self, state: Any, k: int, restart: int) -> Future:
        """A restart's screening: ``fit_chunk`` on its first ``screen_chunks`` chunks (never saved; the winner's
        state is, if the screening ended its first epoch). Keys: ``screen_k{K}-r{restart}-e1-c{chunk}-…``."""
        counted = Watched(ResultKind.CHUNK, k)
        for chunk in range(self.screen_chunks):  # at most one epoch
            key = (f"screen_k{k}", f"r{restart}", "e1", f"c{chunk}")
            state = self.submit(
                fit_chunk, state, self.info, self.plan.params, watch=counted, priority=START_PRIORITY, key=key
            )
        return state

    # --- phase 1: every K's start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Every K resumed from the checkpoint, or started: k-means++ and the screening of its restarts.

        Largest K first: the longest work starts first.
        """
        screened: dict[int, list[Future]] = {}  # K -> the state of each restart after the screening chunks
        for k in sorted(self.plan.restarts, reverse=True):
            n_restarts = self.plan.restarts[k]
            saved = self.saved_restart(k)
            screening = saved is None and n_restarts > 1
            others = (n_restarts - 1) * self.screen_chunks if screening else 0
            record = self.records[k] = _KRecord(k, n_restarts, self.plan.epochs * self.n_chunks + others)
            if saved is not None:
                self.starts[k] = self.resume(record, *saved)
            elif screening:
                screened[k] = self.start_restarts(k, n_restarts)
            else:
                record.chosen = 0
                sample, params = self.kmeans_sample(), self.plan.params
                chain = self.submit(init_chain, sample, k, 0, params, priority=START_PRIORITY, key=(f"init_k{k}", "r0"))
                self.starts[k] = _Start(chain, 0, [])
        if screened:
            self.screen(screened)

    def saved_restart(self, k: int) -> tuple[int, int, int] | None:
        """(restart, epochs done, Lloyd steps done) of K's restart with a saved chain; None if none has."""
        saved = [self.ckpt.progress(k, r) for r in range(self.plan.restarts[k])]
        started = [r for r, (epochs_done, lloyd_done) in enumerate(saved) if epochs_done or lloyd_done]
        if len(started) > 1:  # only the restart that won the screening ever saves anything
            raise UserError(
                f"{self.ckpt.path}/chains/k{k}: {len(started)} restarts have saved epochs; "
                "this checkpoint was made by another version, start a new run"
            )
        return (started[0], *saved[started[0]]) if started else None

    def resume(self, record: _KRecord, restart: int, epochs_done: int, lloyd_done: int) -> _Start:
        """Where a K with a saved chain goes on: after its last saved Lloyd step, else after its last saved epoch."""
        k, epochs, ckpt = record.k, self.plan.epochs, self.ckpt
        record.chosen, record.fit_done = restart, epochs_done * self.n_chunks
        attrs = ckpt.chain_attrs(k, restart)
        record.restart_inertia = dict(enumerate(attrs.get("screen_inertia", [])))
        record.restart_agreement = list(attrs.get("screen_agreement", []))
        record.fit_rows = int(attrs["rows_fitted"][epochs_done - 1])
        if lloyd_done:
            record.epoch_inertia = list(attrs["epoch_inertia"])
            record.lloyd_inertia = list(attrs["lloyd_inertia"])[: lloyd_done - 1]
            return _Start(None, epochs * self.n_chunks, [], ckpt.lloyd_centers(k, restart)[-1], lloyd_done)
        earlier = list(ckpt.epoch_centers(k, restart)[: min(epochs_done, epochs - 1)])
        return _Start(ckpt.load_state(k, restart), epochs_done * self.n_chunks, earlier)

    def kmeans_sample(self) -> Future:
        """The k-means++ sample, drawn once for all chains (as many rows as the largest K needs)."""
        if self.sample is None:
            rows = max(self.plan.params.init_rows(k, self.info.n_train) for k in self.plan.restarts)
            seed = self.plan.params.seed
            self.sample = self.submit(draw_sample, self.info, rows, seed, priority=START_PRIORITY, key=("sample",))
        return self.sample

    def selection_sample(self) -> Future:
        """The images of the selection sample (kselect.sample_rows), drawn once for the screening and the silhouette."""
        if self.selection_images is None:
            self.selection_images = self.submit(
                draw_selection_sample, self.info, self.selection_rows, priority=START_PRIORITY, key=("select_sample",)
            )
        return self.selection_images

    def start_restarts(self, k: int, n_restarts: int) -> list[Future]:
        """Every restart of K: k-means++, then its screening chunks (not saved); each restart's state after them."""
        sample, params = self.kmeans_sample(), self.plan.params
        inits = [
            self.submit(init_chain, sample, k, r, params, priority=START_PRIORITY, key=(f"init_k{k}", f"r{r}"))
            for r in range(n_restarts)
        ]
        return [self.screening_chunks(chain, k, r) for r, chain in enumerate(inits)]

    def screen(self, screened: dict[int, list[Future]]) -> None:
        """One pass measures every restart of every screened K; each K's best restart goes on from there."""
        center_sets = [
            self.submit(centers_of, chain, priority=START_PRIORITY, key=(f"centers_k{k}", f"r{r}"))
            for k, chains in screened.items()
            for r, chain in enumerate(chains)
        ]
        stats = self.stats_pass(
            "stats_screen",
            "train",
            center_sets,
            False,
            gemm_groups=[len(chains) for chains in screened.values()],
            priority=START_PRIORITY,
        )
        first = 0
        for k, chains in screened.items():
            restarts = slice(first, first + len(chains))  # K's restarts among the pass's center sets
            first = restarts.stop
            self.watch(stats, Watched(ResultKind.SCREEN, k, index=restarts))
            screening = self.submit(
                screen_outcome,
                stats,
                restarts.start,
                restarts.stop,
                self.selection_sample(),
                *center_sets[restarts],
                watch=Watched(ResultKind.SELECT, k),
                priority=START_PRIORITY,
                key=(f"select_k{k}",),
            )
            chosen = self.submit(winner, screening, chains, priority=START_PRIORITY, key=(f"pick_k{k}",))
            self.starts[k] = _Start(chosen, self.screen_chunks, [])
            if self.screen_chunks == self.n_chunks:  # the screening ended the first epoch: save the winner's
                self.watch(chosen, Watched(ResultKind.SAVE, k, step=1))
                if self.plan.epochs > 1:
                    self.starts[k].epoch_centers.append(self.submit(centers_of, chosen, key=(f"centers_k{k}", "e1")))

    # --- phase 2: every K's epochs -------------------------------------------------------------------------------

    def fit_epochs(self) -> None:
        """The chosen chain of every K fits the rest of its epochs, in lanes; then each K's grid passes are planned."""
        lloyd_steps = self.plan.lloyd_steps
        fitting = [k for k, start in self.starts.items() if start.state is not None]
        for lane in lanes_of({k: self.starts[k].chunks_done for k in fitting}, self.n_lanes()):
            self.finish_lane(lane)
        for k, start in self.starts.items():
            if start.state is None:  # resumed in its Lloyd steps
                self.centers[k], self.epoch_centers[k] = start.centers, ()
                lloyd_done, passes = start.lloyd_done, []
            else:
                # the pass after the epochs gives their inertia and, with the sums, the first Lloyd step
                lloyd_done, passes = min(lloyd_steps, 1), [GridPass(ResultKind.EPOCHS, min(lloyd_steps, 1))]
            passes += [GridPass(ResultKind.LLOYD_STATS, step) for step in range(lloyd_done + 1, lloyd_steps + 1)]
            self.passes[k] = passes + ([GridPass(ResultKind.EVAL_TRAIN, 0)] if lloyd_steps > 0 else [])

    def n_lanes(self) -> int:
        """The plan's lanes, else as many as the cluster has worker threads now (at least one): enough to keep it
        busy, and each more lane reads every chunk once more. Lanes change no result (fit.py): any cluster shape may."""
        return self.plan.lanes or max(1, sum(self.client.nthreads().values()))

    def finish_lane(self, ks: list[int]) -> None:
        """Submit the rest of the epochs of the K's of one lane (all at the same position; each epoch end saved):
        each K's centers after them, and after each earlier epoch.

        Keys: ``fit_k{K1}_k{K2}…-e{epoch}-c{chunk}-…``, the lane's K's joined by ``_`` in the first word, so that the
        dashboard shows one bar per lane (``fit_k10_k16``; ``fit_k256`` for a lane of one K) (docs/contract.md,
        "Task keys")."""
        starts = [self.starts[k] for k in ks]
        n_chunks, epochs = self.n_chunks, self.plan.epochs
        end = epochs * n_chunks
        lane: Any = [start.state for start in starts]
        group = "fit_" + "_".join(f"k{k}" for k in ks)
        for chunk in range(starts[0].chunks_done, end):
            step = (chunk + 1) // n_chunks
            words = (group, f"e{chunk // n_chunks + 1}", f"c{chunk % n_chunks}")
            lane = self.submit(fit_lane, lane, self.info, self.plan.params, key=words)
            epoch_end = (chunk + 1) % n_chunks == 0
            for index, k in enumerate(ks):
                kind = ResultKind.EPOCH if epoch_end else ResultKind.CHUNK
                self.watch(lane, Watched(kind, k, step, index) if epoch_end else Watched(kind, k))
                if epoch_end and chunk + 1 < end:  # the centers after every epoch but the last, for their inertia
                    key = (f"centers_k{k}", f"e{step}")
                    starts[index].epoch_centers.append(self.submit(lane_centers, lane, index, key=key))
        for index, (k, start) in enumerate(zip(ks, starts, strict=True)):
            key = (f"centers_k{k}", f"e{epochs}")
            if isinstance(lane, Future):
                self.centers[k] = self.submit(lane_centers, lane, index, key=key)
            else:  # nothing left to fit: the screening ended the last epoch
                self.centers[k] = self.submit(centers_of, start.state, key=key)
            self.epoch_centers[k] = tuple(start.epoch_centers)

    # --- phase 3: the grid's passes ------------------------------------------------------------------------------

    def grid_passes(self) -> None:
        """The grid's passes, aligned at the end: every K takes part in the last (the evaluation), and a K resumed
        in its Lloyd steps joins when its remaining steps begin. Then the test split's pass."""
        n_passes = max(len(passes) for passes in self.passes.values())
        aligned = {k: [None] * (n_passes - len(passes)) + passes for k, passes in self.passes.items()}
        for position in range(n_passes):
            grid = [(k, line[position]) for k, line in aligned.items() if line[position] is not None]
            self.grid_pass(grid, evaluation=position == n_passes - 1)
        self.test_pass()
        self.selection_pass()

    def grid_pass(self, grid: list[tuple[int, GridPass]], evaluation: bool = False) -> None:
        """One pass over the training split for the K's of ``grid``, and the Lloyd steps made from its sums.

        ``evaluation``: the last pass, which every K takes part in: its chunks keep their labels for the selection
        pass."""
        center_sets = [self.centers[k] for k, _ in grid]
        histories = [self.epoch_centers[k] if grid_pass.kind is ResultKind.EPOCHS else () for k, grid_pass in grid]
        with_sums = [grid_pass.with_sums for _, grid_pass in grid]
        group = _pass_group(grid)
        parts = self.chunk_stats(group, "train", center_sets, with_sums, histories, evaluation=evaluation)
        stats = tree_reduce(self.client, parts, group=f"{group}_sum")
        if evaluation:  # only the labels are held to the selection pass; each chunk's sums go with the reduction
            labels = [
                self.submit(kept_labels, part, key=("eval_labels", f"c{chunk}"), priority=1)  # as tree_reduce's sums
                for chunk, part in enumerate(parts)
            ]
            self.evaluation = labels, stats
        for index, (k, grid_pass) in enumerate(grid):
            self.watch(stats, Watched(grid_pass.kind, k, grid_pass.lloyd_step, index))
            if grid_pass.kind is ResultKind.EPOCHS and self.plan.lloyd_steps == 0:
                self.watch(stats, Watched(ResultKind.EVAL_TRAIN, k, 0, index))  # no Lloyd step: the evaluation
            if grid_pass.with_sums:
                step = grid_pass.lloyd_step
                self.centers[k] = self.submit(
                    lloyd_step,
                    index,
                    center_sets,
                    stats,
                    watch=Watched(ResultKind.LLOYD, k, step),
                    key=(f"lloyd_k{k}", f"s{step}"),
                )

    def test_pass(self) -> None:
        """Every K's final centers over the test split, in one pass."""
        stats = self.stats_pass("stats_test", "test", [self.centers[k] for k in self.passes], False)
        for index, k in enumerate(self.passes):
            self.watch(stats, Watched(ResultKind.EVAL_TEST, k, index=index))
            if isinstance(self.centers[k], Future):
                self.watch(self.centers[k], Watched(ResultKind.FINAL, k))
            else:  # resumed after its last Lloyd step
                self.records[k].centers = self.centers[k]

    def selection_pass(self) -> None:
        """The label-free indices of every K's final centers (kselect.py): one pass over the training split that
        reads the labels the evaluation's chunks kept, then one task that scores every K."""
        assert self.evaluation is not None
        labels, stats = self.evaluation
        means = self.submit(cluster_means, stats, key=("select_means",))
        chunk_rows = self.info.chunk_rows
        tasks = [
            self.submit(
                selection_chunk_task,
                chunk_labels,
                means,
                self.info,
                chunk,
                rows_in_chunk(self.selection_rows, chunk, chunk_rows),
                key=("select_pass", f"c{chunk}"),
            )
            for chunk, chunk_labels in enumerate(labels)
        ]
        selection = tree_reduce(self.client, tasks, group="select_pass_sum")
        scores = self.submit(selection_scores, stats, selection, self.selection_sample(), key=("select_scores",))
        for index, k in enumerate(self.passes):
            self.watch(scores, Watched(ResultKind.SELECTION, k, index=index))
        self.evaluation = None  # the chunks' labels are released once the selection pass has run

    # --- collecting ----------------------------------------------------------------------------------------------

    def collect(self, progress: Progress) -> None:
        """Handle every watched result as it arrives, and update ``progress`` after each future."""
        epochs = self.plan.epochs
        try:
            for future in as_completed(list(self.watched)):
                result = _Result(future)
                for watched in self.watched.pop(future):
                    self.handlers[watched.kind](self.records[watched.k], watched, result)
                del future, result
                progress.update(self.records, epochs)
        except BaseException:
            # Drop the references and let closing the client release the work: cancelling futures whose
            # intermediate results have no holder trips an assertion in the scheduler (distributed 2026.8).
            self.watched.clear()
            raise
        finally:
            progress.update(self.records, epochs, force=True)
            progress.close()

    def results(self) -> list[KResult]:
        return sorted((record.result(self.plan.lloyd_steps) for record in self.records.values()), key=lambda r: r.k)

    def on_chunk(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.fit_done += 1

    def on_epoch(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.fit_done += 1
        self.on_save(record, watched, result)

    def on_save(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        state: ChainState = result.part(watched.index)
        record.fit_rows = state.rows_fitted
        self.ckpt.save_epoch(
            state,
            self.plan.epochs,
            self.plan.lloyd_steps,
            screen_inertia=record.screen_inertia(),
            screen_agreement=record.restart_agreement,
        )

    def on_screen(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.restart_inertia = {r: stats.inertia for r, stats in enumerate(result.part(watched.index))}

    def on_select(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        screening: Screening = result.part(watched.index)
        record.chosen, record.restart_agreement = screening.index, list(screening.agreement)

    def on_epochs(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.epoch_inertia = [float(v) for v in result.part(watched.index).ssd]
        record.t_fit_end = time.perf_counter()

    def on_lloyd_stats(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.lloyd_inertia.append(result.part(watched.index).inertia)

    def on_lloyd(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        assert record.chosen is not None
        step, plan = watched.step, self.plan
        self.ckpt.save_lloyd(
            record.k,
            record.chosen,
            step,
            result.part(watched.index),
            plan.epochs,
            plan.lloyd_steps,
            record.epoch_inertia,
            record.lloyd_inertia[: step - 1],
        )
        record.t_fit_end = time.perf_counter()

    def on_eval_train(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.train = result.part(watched.index)

    def on_eval_test(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.test = result.part(watched.index)

    def on_final(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.centers = result.part(watched.index)

    def on_selection(self, record: _KRecord, watched: Watched, result: _Result) -> None:
        record.selection = result.part(watched.index)


def run_chains(
    client: Client,
    plan: FitPlan,
    ckpt: Checkpoint,
    progress: Progress | None = None,
) -> list[KResult]:
    """Fit and evaluate every K of ``plan`` on the cluster, continuing from what ``ckpt`` holds.

    Blocks until all are done. On ``KeyboardInterrupt`` (or any error) the remaining work is cancelled and the
    exception propagates; every epoch and Lloyd step saved so far stays in ``ckpt``.

    Returns one result per K, in increasing K.
    """
    progress = progress or Progress()
    scheduler = _Scheduler(client, plan, ckpt)
    scheduler.start()
    scheduler.fit_epochs()
    scheduler.grid_passes()
    scheduler.collect(progress)
    return scheduler.results()
