"""The checkpoint (``checkpoint.py``): a chain saved epoch by epoch to ``centroids.zarr`` and loaded back exactly.

An interrupted run resumes from what ``Checkpoint`` saved: loading must give the very state saved, a save cut short
must leave a whole epoch or none, and a chain made only in part must count as nothing saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_kmeans.checkpoint import Checkpoint, CheckpointLayout
from mnist_kmeans.fit import ChainState, FitParams, fit_chunk
from tests.helpers import assert_states_equal, first_state


def run_epoch(state: ChainState, info, params: FitParams) -> ChainState:
    """One epoch of a chain, task after task in this process, as the cluster runs it."""
    for _ in range(info.n_chunks("train")):
        state = fit_chunk(state, info, params)
    return state


def test_epochs_through_a_checkpoint_continue_exactly(store_info, tmp_path: Path) -> None:
    """Two epochs in a row ≡ one epoch, saved to ``centroids.zarr``, loaded, then the second (what --resume does)."""
    params = FitParams(batch_size=100, seed=3)

    def epoch(state: ChainState) -> ChainState:
        return run_epoch(state, store_info, params)

    s1 = epoch(first_state(store_info, 3, 1, params))
    assert (s1.epoch, s1.chunks_done) == (1, 0)
    straight = epoch(s1)

    ckpt = Checkpoint.create(tmp_path / "centroids.zarr", store_info.image_shape)
    ckpt.save_epoch(s1, 2, 1)
    loaded = Checkpoint.open(tmp_path / "centroids.zarr").load_state(3, 1)
    assert_states_equal(loaded, s1)
    assert_states_equal(epoch(loaded), straight)


class _StoreWriteStopped(Exception):
    """Stands for a Ctrl-C or a kill that lands between two writes of the checkpoint."""


def test_an_epoch_save_cut_short_is_ignored_or_whole(
    store_info, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop ``save_epoch`` after each of its store writes in turn: what a resume then finds is a whole epoch.

    Either the epoch being saved is ignored (``epochs_done`` as before) or it is complete: ``load_state`` works and
    gives back exactly the state saved. (A save of several attributes must not show ``epochs_done`` before the
    counters it promises.)
    """
    from zarr.storage import LocalStore

    params = FitParams(batch_size=100, seed=3)

    def epoch(state: ChainState) -> ChainState:
        return run_epoch(state, store_info, params)

    s1 = epoch(first_state(store_info, 3, 0, params))
    s2 = epoch(s1)
    original_set = LocalStore.set
    for saved_before, saving in (((), s1), ((s1,), s2)):  # the first epoch (creates the chain's arrays), a later one
        for stop_at in range(200):
            path = tmp_path / f"e{saving.epoch}-stop{stop_at}.zarr"
            ckpt = Checkpoint.create(path, store_info.image_shape)
            for st in saved_before:
                ckpt.save_epoch(st, 3, 1)
            writes = {"n": 0}

            async def stopping_set(self, key, value, *args, _stop=stop_at, _writes=writes, **kwargs):
                if _writes["n"] == _stop:
                    raise _StoreWriteStopped(key)
                _writes["n"] += 1
                return await original_set(self, key, value, *args, **kwargs)

            monkeypatch.setattr(LocalStore, "set", stopping_set)
            try:
                ckpt.save_epoch(saving, 3, 1)
                finished = True
            except _StoreWriteStopped:
                finished = False
            finally:
                monkeypatch.setattr(LocalStore, "set", original_set)
            again = Checkpoint.open(path)  # what --resume finds
            done, _ = again.progress(3, 0)  # an interrupted save is no damaged checkpoint
            assert done in (saving.epoch - 1, saving.epoch), (stop_at, done)
            if finished:
                assert done == saving.epoch
            if done:
                assert_states_equal(again.load_state(3, 0), saving if done == saving.epoch else s1)
            if done < saving.epoch:  # the resume fits the epoch again and saves it: whatever the cut left
                again.save_epoch(saving, 3, 1)
                assert Checkpoint.open(path).progress(3, 0)[0] == saving.epoch
                assert_states_equal(Checkpoint.open(path).load_state(3, 0), saving)
            if finished:
                break
        else:
            pytest.fail("save_epoch did not finish within 200 writes")


def test_a_chain_made_in_part_counts_as_nothing_saved(tmp_path: Path) -> None:
    """A full disk or a SIGKILL can stop ``centroids.zarr`` between a chain's group and its arrays (both seen in the
    runs of tests/test_reliability.py): a resume counts that chain as nothing saved and starts it anew."""
    ckpt = Checkpoint.create(tmp_path / "centroids.zarr", (10, 10))
    ckpt.group.create_group(
        "chains/k3/r0", attributes={"epochs_done": 0, "lloyd_done": 0, "n_since_last_reassign": [], "n_steps": []}
    )
    ckpt = Checkpoint.open(tmp_path / "centroids.zarr")
    assert ckpt.progress(3, 0) == (0, 0) and ckpt.epoch_centers(3, 0).shape[0] == 0
    state = ChainState(3, 0, 1, 0, np.ones((3, 100), np.float32), np.ones(3, np.float32), 2, 5)
    ckpt.save_epoch(state, 2, 1)
    again = Checkpoint.open(tmp_path / "centroids.zarr")
    assert again.progress(3, 0) == (1, 0) and again.load_state(3, 0).n_steps == 5


@pytest.mark.parametrize("damage", ["0.9", [0.9, "x"], [float("nan")]])
def test_the_restarts_agreement_is_kept_and_checked(tmp_path: Path, damage: object) -> None:
    """``screen_agreement`` (kselect.py) is saved with the winning chain and read back as saved; a value that is not a
    list of finite numbers is a damaged checkpoint (UserError), never a number passed on to metrics.json."""
    from mnist_kmeans.errors import UserError

    path = tmp_path / "centroids.zarr"
    ckpt = Checkpoint.create(path, (10, 10))
    state = ChainState(3, 1, 1, 0, np.ones((3, 100), np.float32), np.ones(3, np.float32), 2, 5)
    ckpt.save_epoch(state, 2, 1, screen_inertia=[5.0, 4.0, 6.0], screen_agreement=[0.5, 0.25, 1.0])
    assert Checkpoint.open(path).chain_attrs(3, 1)["screen_agreement"] == [0.5, 0.25, 1.0]
    ckpt.group["chains/k3/r1"].update_attributes({"screen_agreement": damage})
    with pytest.raises(UserError, match="screen_agreement"):
        Checkpoint.open(path, CheckpointLayout((10, 10), {3: 3}, 2, 1))


def test_early_stopping_state_goes_through_a_checkpoint(store_info, tmp_path: Path) -> None:
    """With ``max_no_improvement`` the rule's state (and the rows fitted) are saved per epoch: the loaded chain
    stops where the one that never left memory stops."""
    params = FitParams(batch_size=100, seed=3, max_no_improvement=2)
    s1 = run_epoch(first_state(store_info, 5, 0, params), store_info, params)
    assert s1.convergence.ewa is not None
    straight = run_epoch(run_epoch(s1, store_info, params), store_info, params)
    ckpt = Checkpoint.create(tmp_path / "centroids.zarr", store_info.image_shape)
    ckpt.save_epoch(s1, 3, 1)
    loaded = Checkpoint.open(tmp_path / "centroids.zarr").load_state(5, 0)
    assert_states_equal(loaded, s1)
    assert_states_equal(run_epoch(run_epoch(loaded, store_info, params), store_info, params), straight)
    assert straight.convergence.stopped and straight.rows_fitted < 3 * store_info.n_train  # it did stop


@pytest.mark.parametrize(
    ("key", "damage"),
    [
        ("rows_fitted", [-3]),
        ("rows_fitted", ["7"]),
        ("convergence", [{"ewa": 1.0}]),
        ("convergence", [{"ewa": None, "best": 2.0, "no_improvement": 0, "stopped": False}]),
        ("convergence", [{"ewa": 1.0, "best": 1.0, "no_improvement": -1, "stopped": False}]),
        ("convergence", [{"ewa": 1.0, "best": 1.0, "no_improvement": 0, "stopped": "no"}]),
        ("convergence", []),
    ],
)
def test_a_damaged_early_stopping_state_is_refused(tmp_path: Path, key: str, damage: object) -> None:
    from mnist_kmeans.errors import UserError

    path = tmp_path / "centroids.zarr"
    state = ChainState(3, 0, 1, 0, np.ones((3, 100), np.float32), np.ones(3, np.float32), 2, 5, 640)
    Checkpoint.create(path, (10, 10)).save_epoch(state, 2, 1)
    assert Checkpoint.open(path).load_state(3, 0).rows_fitted == 640
    Checkpoint.open(path).group["chains/k3/r0"].update_attributes({key: damage})
    with pytest.raises(UserError, match=f"chains/k3/r0: damaged checkpoint .*{key}"):
        Checkpoint.open(path, CheckpointLayout((10, 10), {3: 1}, 2, 1))


def test_a_chain_saved_before_early_stopping_existed_is_refused(tmp_path: Path) -> None:
    """A chain of an earlier version has no rows_fitted and convergence: a resume says so, it does not guess them."""
    from mnist_kmeans.errors import UserError

    path = tmp_path / "centroids.zarr"
    state = ChainState(3, 0, 1, 0, np.ones((3, 100), np.float32), np.ones(3, np.float32), 2, 5, 640)
    Checkpoint.create(path, (10, 10)).save_epoch(state, 2, 1)
    group = Checkpoint.open(path).group["chains/k3/r0"]
    attrs = {key: value for key, value in group.attrs.items() if key not in ("rows_fitted", "convergence")}
    group.attrs.clear()
    group.update_attributes(attrs)
    with pytest.raises(UserError, match="chains/k3/r0: saved by an earlier version .*start a new run"):
        Checkpoint.open(path).progress(3, 0)
