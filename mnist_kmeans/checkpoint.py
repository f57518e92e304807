"""``centroids.zarr`` of a run directory: the epoch checkpoints that ``--resume`` continues from, and the results.

Layout (Zarr v3; only the client process writes it)::

    final/k{K}                    float32 (K, H*W)          the chosen model of each K (docs/contract.md)
    epochs/k{K}                   float32 (epochs, K, H*W)  its centroids after each epoch (docs/contract.md)
    chains/k{K}/r{R}/centers      float32 (epochs, K, H*W)  the chosen restart R of K after each epoch ...
    chains/k{K}/r{R}/counts       float32 (epochs, K)       ... with the rest of its MiniBatchKMeans state
    chains/k{K}/r{R}/lloyd        float32 (lloyd_steps, K, H*W)  centers after each full-batch Lloyd step

Only the restart of a K that won the screening (``schedule.py``) has a chain here. A chain's attributes say how much
of it is saved (``epochs_done``, ``lloyd_done``), hold the rest of its state per epoch (the integer counters, the rows
fitted, the early-stopping rule's state) and keep every restart's inertia at the screening (``screen_inertia``) and
the agreement of the restarts there (``screen_agreement``, kselect.py). An epoch's arrays are written first and the
attributes after, all in one write of ``zarr.json`` (atomic on a local store), so an interrupted write is ignored on
resume rather than half-used. Nothing here is a pickle: arrays and JSON only.

A write that fails (a full or read-only disk) is a one-line :class:`UserError` naming the path; what was saved before
stays valid. What a resume reads back is checked against the arrays it indexes, so a damaged or foreign
``centroids.zarr`` is a UserError too, never an IndexError deep in the fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from mnist_kmeans.errors import UserError, one_line, shorten
from mnist_kmeans.fit import ChainState, Convergence


@dataclass(frozen=True)
class CheckpointLayout:
    """What the checkpoint of one job must hold: a resume checks the saved one against it (:meth:`Checkpoint.open`).

    ``restarts`` maps every K of the job to its number of restarts.
    """

    image_shape: tuple[int, int]
    restarts: dict[int, int]
    epochs: int
    lloyd_steps: int

    def check_group(self, group: zarr.Group, path: str | Path | None) -> None:
        shape = group.attrs.get("image_shape")
        if shape != list(self.image_shape):
            raise UserError(
                f"{path}: attribute image_shape is {shorten(shape)}, the store's images are "
                f"{self.image_shape[0]}x{self.image_shape[1]}; start a new run"
            )

    def check_chain(self, chain: zarr.Group, k: int, restart: int, done: tuple[int, int], where: str) -> None:
        """One saved chain: of a (K, restart) of the job, its arrays of the job's shape, its saved numbers finite."""
        name = f"{where}/k{k}/r{restart}"
        if restart >= self.restarts.get(k, 0):
            raise UserError(f"{name}: not a chain of this job (K={k} restart {restart}); start a new run")
        n_features = self.image_shape[0] * self.image_shape[1]
        epochs_done, lloyd_done = done
        expected = {
            "centers": ((self.epochs, k, n_features), epochs_done),
            "counts": ((self.epochs, k), epochs_done),
            "lloyd": ((max(self.lloyd_steps, 1), k, n_features), lloyd_done),
        }
        if epochs_done == 0 and lloyd_done == 0 and not all(a in chain for a in expected):
            return  # made in part by a failed write: nothing of it is used
        for array_name, (shape, n_saved) in expected.items():
            array = chain[array_name]
            if array.shape != shape:
                raise UserError(f"{name}/{array_name}: shape {array.shape}, this job's is {shape}; start a new run")
            saved = np.asarray(array[:n_saved])
            if not np.isfinite(saved).all() or (array_name == "counts" and (saved < 0).any()):
                raise UserError(f"{name}/{array_name}: damaged checkpoint (holds NaN, infinity or a negative count)")
        attrs = dict(chain.attrs)
        for key in ("screen_inertia", "screen_agreement", "epoch_inertia", "lloyd_inertia"):
            values = attrs.get(key, [])
            if not isinstance(values, list) or not all(_finite_number(v) for v in values):
                raise UserError(f"{name}: damaged checkpoint (attribute {key} holds a value that is not finite)")
        for key in _COUNTERS:
            if any(v < 0 for v in attrs[key][:epochs_done]):
                raise UserError(f"{name}: damaged checkpoint (attribute {key} holds a negative count)")


# A chain's attributes with one entry per saved epoch: the integer counters of its state, and its Convergence.
_COUNTERS = ("n_since_last_reassign", "n_steps", "rows_fitted")
_PER_EPOCH = (*_COUNTERS, "convergence")


def _per_epoch(state: ChainState) -> dict[str, object]:
    """The values of :data:`_PER_EPOCH` for the epoch ``state`` ends (JSON: the Convergence as a mapping)."""
    return {
        "n_since_last_reassign": state.n_since_last_reassign,
        "n_steps": state.n_steps,
        "rows_fitted": state.rows_fitted,
        "convergence": dataclasses.asdict(state.convergence),
    }


def _convergence(saved: object) -> Convergence:
    """A saved Convergence (see :func:`_per_epoch`); ValueError if it is not one."""
    if isinstance(saved, dict) and set(saved) == {"ewa", "best", "no_improvement", "stopped"}:
        ewa, best, count, stopped = saved["ewa"], saved["best"], saved["no_improvement"], saved["stopped"]
        averages = (ewa is None and best is None) or (_finite_number(ewa) and _finite_number(best))
        counted = isinstance(count, int) and not isinstance(count, bool) and count >= 0
        if averages and counted and isinstance(stopped, bool):
            return Convergence(ewa, best, count, stopped)
    raise ValueError(f"convergence holds {shorten(saved)}")


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextlib.contextmanager
def _writing(path: str | Path | None) -> Iterator[None]:
    """OSError (no space left, read-only file system, permissions) -> a one-line UserError naming the path."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        raise UserError(f"{where}: cannot write the checkpoint: {exc.strerror or exc}") from None


class Checkpoint:
    """Reads and writes ``centroids.zarr``; create with :meth:`create` or :meth:`open`."""

    def __init__(self, group: zarr.Group, path: str | Path | None = None):
        self.group = group
        self.path = path

    @classmethod
    def create(cls, path: str | Path, image_shape: tuple[int, int]) -> Checkpoint:
        with _writing(path):
            group = zarr.create_group(store=str(path), zarr_format=3, attributes={"image_shape": list(image_shape)})
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, layout: CheckpointLayout | None = None) -> Checkpoint:
        """The checkpoint at ``path``, validated (:meth:`check`): against ``layout`` too when given."""
        try:
            group = zarr.open_group(store=str(path), mode="r+", use_consolidated=False, zarr_format=3)
        except Exception as exc:
            raise UserError(f"{path}: cannot open the checkpoint: {one_line(exc, with_type=True)}") from None
        ckpt = cls(group, path)
        ckpt.check(layout)
        return ckpt

    def check(self, layout: CheckpointLayout | None = None) -> None:
        """Validate every saved chain now, before a cluster starts or anything is written: what its attributes claim
        against the arrays they index (:meth:`progress`), and with ``layout``, that it belongs to that job and that
        every saved number is finite (a resume would otherwise fit on, then fail writing its results)."""
        if layout is not None:
            layout.check_group(self.group, self.path)
        chains = self.group.get("chains")
        if chains is None:
            return
        with warnings.catch_warnings():  # a directory left without its zarr.json by a failed write is skipped
            warnings.simplefilter("ignore", category=UserWarning)
            names = [(kname, rname) for kname, kgroup in chains.groups() for rname, _ in kgroup.groups()]
        for kname, rname in names:
            if not (kname[:1] == "k" and kname[1:].isdigit() and rname[:1] == "r" and rname[1:].isdigit()):
                raise UserError(f"{self.path}/chains/{shorten(kname)}/{shorten(rname)}: not a chain of this project")
            k, restart = int(kname[1:]), int(rname[1:])
            done = self.progress(k, restart)
            if layout is not None:
                layout.check_chain(self.group[f"chains/{kname}/{rname}"], k, restart, done, f"{self.path}/chains")

    # --- chains ---------------------------------------------------------------------------------------

    _ARRAYS = ("centers", "counts", "lloyd")

    def _chain(self, k: int, restart: int, epochs: int, lloyd_steps: int, n_features: int) -> zarr.Group:
        name = f"chains/k{k}/r{restart}"
        if name in self.group and all(a in self.group[name] for a in self._ARRAYS):
            return self.group[name]
        with _writing(self.path):  # new, or made only in part (the disk filled while it was created): make it again
            return self._new_chain(name, k, epochs, lloyd_steps, n_features)

    def _new_chain(self, name: str, k: int, epochs: int, lloyd_steps: int, n_features: int) -> zarr.Group:
        g = self.group.create_group(
            name,
            attributes={"epochs_done": 0, "lloyd_done": 0, **{key: [] for key in _PER_EPOCH}},
            overwrite=True,
        )
        g.create_array("centers", shape=(epochs, k, n_features), dtype="float32", chunks=(1, k, n_features))
        g.create_array("counts", shape=(epochs, k), dtype="float32", chunks=(1, k))
        g.create_array("lloyd", shape=(max(lloyd_steps, 1), k, n_features), dtype="float32", chunks=(1, k, n_features))
        return g

    def save_epoch(
        self,
        state: ChainState,
        epochs: int,
        lloyd_steps: int,
        screen_inertia: list[float] | None = None,
        screen_agreement: list[float] | None = None,
    ) -> None:
        """Save a chain's state at the end of epoch ``state.epoch`` (1-based count of epochs done).

        Only the restart chosen by the screening saves epochs; ``screen_inertia`` (every restart's inertia at the
        screening) and ``screen_agreement`` (the ARI of every two restarts on the selection sample, kselect.py) are
        kept with it, for metrics.json after a resume.
        """
        g = self._chain(state.k, state.restart, epochs, lloyd_steps, state.centers.shape[1])
        e = state.epoch - 1
        with _writing(self.path):
            g["centers"][e] = state.centers
            g["counts"][e] = state.counts
            attrs = dict(g.attrs)
            # One write of zarr.json (``g.attrs.update`` would write once per key: a kill between two writes left
            # epochs_done advanced without its counters).
            g.update_attributes(
                {
                    "epochs_done": state.epoch,
                    **{key: attrs[key][:e] + [value] for key, value in _per_epoch(state).items()},
                    "screen_inertia": [float(v) for v in screen_inertia or []],
                    "screen_agreement": [float(v) for v in screen_agreement or []],
                }
            )

    def save_lloyd(
        self,
        k: int,
        restart: int,
        step: int,
        centers: np.ndarray,
        epochs: int,
        lloyd_steps: int,
        epoch_inertia: list[float],
        lloyd_inertia: list[float],
    ) -> None:
        """Save the chosen restart's centers after Lloyd step ``step`` (1-based), with the inertia curve so far.

        Only the chosen restart of a K has Lloyd steps: ``lloyd_done > 0`` marks it.
        """
        g = self._chain(k, restart, epochs, lloyd_steps, centers.shape[1])
        with _writing(self.path):
            g["lloyd"][step - 1] = centers
            g.update_attributes({"epoch_inertia": epoch_inertia, "lloyd_inertia": lloyd_inertia, "lloyd_done": step})

    def chain_attrs(self, k: int, restart: int) -> dict:
        return dict(self.group[f"chains/k{k}/r{restart}"].attrs)

    def progress(self, k: int, restart: int) -> tuple[int, int]:
        """(epochs_done, lloyd_done) saved for a chain; (0, 0) when nothing is.

        Checks what the attributes claim against the arrays they index (a damaged or foreign checkpoint is a
        UserError naming the chain, not an IndexError later).
        """
        name = f"chains/k{k}/r{restart}"
        if name not in self.group:
            return 0, 0
        try:
            g = self.group[name]
            a = dict(g.attrs)
            epochs_done, lloyd_done = a["epochs_done"], a["lloyd_done"]
            if epochs_done == 0 and lloyd_done == 0 and not all(x in g for x in self._ARRAYS):
                return 0, 0  # created in part when a write failed (a full disk): nothing of it was saved
            if any(key not in a for key in _PER_EPOCH):  # every chain saved since early stopping has them all
                raise UserError(
                    f"{self.path or 'centroids.zarr'}/{name}: saved by an earlier version (no rows_fitted or "
                    "convergence); start a new run"
                )
            centers, counts, lloyd = g["centers"], g["counts"], g["lloyd"]
            for key, value, top in (
                ("epochs_done", epochs_done, centers.shape[0]),
                ("lloyd_done", lloyd_done, lloyd.shape[0]),
            ):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                    raise ValueError(f"{key} = {value!r}, the arrays hold {top}")
            if (
                centers.ndim != 3
                or centers.shape[1] != k
                or counts.shape != centers.shape[:2]
                or lloyd.shape[1:] != centers.shape[1:]
            ):
                raise ValueError(
                    f"arrays of shapes {centers.shape}, {counts.shape}, {lloyd.shape} do not hold K={k} centers"
                )
            for key in _PER_EPOCH:
                values = a[key]
                if not isinstance(values, list) or len(values) < epochs_done:
                    raise ValueError(f"{key} does not hold a value for each of the {epochs_done} saved epochs")
            for key in _COUNTERS:
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in a[key][:epochs_done]):
                    raise ValueError(f"{key} does not hold an integer for each of the {epochs_done} saved epochs")
            for value in a["convergence"][:epochs_done]:
                _convergence(value)
            for key in ("screen_inertia", "screen_agreement"):
                screen = a.get(key, [])
                if not isinstance(screen, list) or not all(isinstance(v, (int, float)) for v in screen):
                    raise ValueError(f"{key} is not a list of numbers")
            if lloyd_done:
                for key in ("epoch_inertia", "lloyd_inertia"):
                    if not isinstance(a.get(key), list):
                        raise ValueError(f"{key} is missing")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(
                f"{self.path or 'centroids.zarr'}/{name}: damaged checkpoint ({exc}); start a new run"
            ) from None
        return epochs_done, lloyd_done

    def load_state(self, k: int, restart: int) -> ChainState:
        """The chain's state after its last saved epoch."""
        g = self.group[f"chains/k{k}/r{restart}"]
        done = int(g.attrs["epochs_done"])
        return ChainState(
            k=k,
            restart=restart,
            epoch=done,
            chunks_done=0,
            centers=np.asarray(g["centers"][done - 1]),
            counts=np.asarray(g["counts"][done - 1]),
            n_since_last_reassign=int(g.attrs["n_since_last_reassign"][done - 1]),
            n_steps=int(g.attrs["n_steps"][done - 1]),
            rows_fitted=int(g.attrs["rows_fitted"][done - 1]),
            convergence=_convergence(g.attrs["convergence"][done - 1]),
        )

    def epoch_centers(self, k: int, restart: int) -> np.ndarray:
        """float32 (epochs_done, K, H*W): the chain's centers after each saved epoch."""
        epochs_done, _ = self.progress(k, restart)
        if epochs_done == 0:
            return np.zeros((0, k, 0), dtype=np.float32)
        return np.asarray(self.group[f"chains/k{k}/r{restart}/centers"][:epochs_done])

    def lloyd_centers(self, k: int, restart: int) -> np.ndarray:
        g = self.group[f"chains/k{k}/r{restart}"]
        return np.asarray(g["lloyd"][: int(g.attrs["lloyd_done"])])

    # --- results ----------------------------------------------------------------------------------------

    def save_result(self, k: int, final: np.ndarray, epochs: np.ndarray) -> None:
        """The result arrays of the chosen model of K: ``final/k{K}`` and ``epochs/k{K}`` (docs/contract.md,
        "Run directory")."""
        with _writing(self.path):
            for name, data in ((f"final/k{k}", final), (f"epochs/k{k}", epochs)):
                self.group.create_array(name, data=np.asarray(data, dtype=np.float32), overwrite=True)

    def finals(self) -> dict[int, np.ndarray]:
        if "final" not in self.group:
            return {}
        return {int(name[1:]): np.asarray(arr[...]) for name, arr in self.group["final"].arrays()}
