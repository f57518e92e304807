"""``centroids.zarr`` of a run directory: the epoch checkpoints that ``--resume`` continues from, and the results.

Layout (Zarr v3; only the client process writes it)::

    final/k{K}                    float32 (K, H*W)          the chosen model of each K (SPEC)
    epochs/k{K}                   float32 (epochs, K, H*W)  its centroids after each epoch (SPEC)
    chains/k{K}/r{R}/centers      float32 (epochs, K, H*W)  every (K, restart) chain after each epoch ...
    chains/k{K}/r{R}/counts       float32 (epochs, K)       ... with the rest of its MiniBatchKMeans state
    chains/k{K}/r{R}/lloyd        float32 (lloyd_steps, K, H*W)  centers after each full-batch Lloyd step

A chain's attributes say how much of it is saved (``epochs_done``, ``lloyd_done``, and the two integer counters of
the mini-batch state per epoch). An epoch's arrays are written first and the attribute after, so an interrupted
write is ignored on resume rather than half-used. Nothing here is a pickle: arrays and JSON only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from mnist_kmeans.fit import ChainState


class Checkpoint:
    """Reads and writes ``centroids.zarr``; create with :meth:`create` or :meth:`open`."""

    def __init__(self, group: zarr.Group):
        self.group = group

    @classmethod
    def create(cls, path: str | Path, image_shape: tuple[int, int]) -> Checkpoint:
        group = zarr.create_group(store=str(path), zarr_format=3, attributes={"image_shape": list(image_shape)})
        return cls(group)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        return cls(zarr.open_group(store=str(path), mode="r+", use_consolidated=False))

    # --- chains ---------------------------------------------------------------------------------------

    def _chain(self, k: int, restart: int, epochs: int, lloyd_steps: int, n_features: int) -> zarr.Group:
        name = f"chains/k{k}/r{restart}"
        if name in self.group:
            return self.group[name]
        g = self.group.create_group(name, attributes={"epochs_done": 0, "lloyd_done": 0, "n_since_last_reassign": [], "n_steps": []})
        g.create_array("centers", shape=(epochs, k, n_features), dtype="float32", chunks=(1, k, n_features))
        g.create_array("counts", shape=(epochs, k), dtype="float32", chunks=(1, k))
        g.create_array("lloyd", shape=(max(lloyd_steps, 1), k, n_features), dtype="float32", chunks=(1, k, n_features))
        return g

    def save_epoch(self, state: ChainState, epochs: int, lloyd_steps: int) -> None:
        """Save a chain's state at the end of epoch ``state.epoch`` (1-based count of epochs done)."""
        g = self._chain(state.k, state.restart, epochs, lloyd_steps, state.centers.shape[1])
        e = state.epoch - 1
        g["centers"][e] = state.centers
        g["counts"][e] = state.counts
        attrs = dict(g.attrs)
        g.attrs.update(
            {
                "epochs_done": state.epoch,
                "n_since_last_reassign": attrs["n_since_last_reassign"][:e] + [state.n_since_last_reassign],
                "n_steps": attrs["n_steps"][:e] + [state.n_steps],
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
        g["lloyd"][step - 1] = centers
        g.attrs.update({"epoch_inertia": epoch_inertia, "lloyd_inertia": lloyd_inertia, "lloyd_done": step})

    def chain_attrs(self, k: int, restart: int) -> dict:
        return dict(self.group[f"chains/k{k}/r{restart}"].attrs)

    def progress(self, k: int, restart: int) -> tuple[int, int]:
        """(epochs_done, lloyd_done) saved for a chain; (0, 0) when nothing is."""
        name = f"chains/k{k}/r{restart}"
        if name not in self.group:
            return 0, 0
        a = self.group[name].attrs
        return int(a["epochs_done"]), int(a["lloyd_done"])

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
        )

    def epoch_centers(self, k: int, restart: int) -> np.ndarray:
        """float32 (epochs_done, K, H*W): the chain's centers after each saved epoch."""
        name = f"chains/k{k}/r{restart}"
        if name not in self.group:
            return np.zeros((0, k, 0), dtype=np.float32)
        g = self.group[name]
        return np.asarray(g["centers"][: int(g.attrs["epochs_done"])])

    def lloyd_centers(self, k: int, restart: int) -> np.ndarray:
        g = self.group[f"chains/k{k}/r{restart}"]
        return np.asarray(g["lloyd"][: int(g.attrs["lloyd_done"])])

    # --- results ----------------------------------------------------------------------------------------

    def save_result(self, k: int, final: np.ndarray, epochs: np.ndarray) -> None:
        """SPEC's arrays for the chosen model of K: ``final/k{K}`` and ``epochs/k{K}``."""
        for name, data in ((f"final/k{k}", final), (f"epochs/k{k}", epochs)):
            self.group.create_array(name, data=np.asarray(data, dtype=np.float32), overwrite=True)

    def finals(self) -> dict[int, np.ndarray]:
        if "final" not in self.group:
            return {}
        return {int(name[1:]): np.asarray(arr[...]) for name, arr in self.group["final"].arrays()}
