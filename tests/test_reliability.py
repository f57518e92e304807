"""Faults of shared clusters, each on real processes: what a long job survives, what it keeps, what it says.

- workers SIGKILLed mid-run, in one run: first the ``--no-nanny`` one (gone for good: the job goes on with what
  remains), then the other one, under a nanny that starts a replacement, which finishes the job alone; the centroids
  are those of an undisturbed run on the same cluster shape, bit for bit;
- the ``run`` process SIGKILLed: ``--resume`` on a new cluster finishes with the same centroids and runs no
  ``partial_fit`` task of a saved epoch again (counted in the new scheduler's task stream), leaving the saved
  epochs' checkpoint files untouched; a resume with another job file or store is refused (exit 2);
- the ``dask scheduler`` SIGKILLed: ``run`` exits 3 within the client's reconnect timeout, with one line that holds
  the command to resume, and that very command finishes the job on a new cluster with the same centroids;
- a store chunk lost mid-run: exit 2 naming the store, split, chunk and rows, never a result computed from a chunk
  that is not the one ingested (missing, changed or undecodable chunks in general: ``tests/test_store.py``);
- the run directory's disk full mid-run (a small tmpfs, filled once an epoch is saved): exit 2 with one line naming
  the path, nothing that looks finished, and every epoch saved before it still valid.

The job is small (3,000 rows of 10x10 in chunks of 500; K = 4 and 8, two restarts, 6 epochs of batches of 50) and
slow enough per epoch that a fault lands while chains are mid-epoch; clusters are `dask scheduler` + `dask worker`
processes on 127.0.0.1, shared between tests where a test leaves them intact.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import (
    DaskCluster,
    IdxDataset,
    LiveRun,
    assert_same_centroids,
    chain_progress,
    copy_store,
    final_centroids,
    make_small_store,
    run_cli,
    tree_snapshot,
)

K_GRID = (4, 8)
EPOCHS = 6
RESTARTS = 2
N_CHUNKS = 6  # KGRID_STORE_ARGS: 3,000 training rows in chunks of 500
CONNECT_TIMEOUT = 5  # seconds; also how long a client tries to reconnect to a lost scheduler
RUN_TIMEOUT = 300


def job_text(name: str = "reliability", epochs: int = EPOCHS) -> str:
    return yaml.safe_dump(
        {
            "name": name,
            "k_grid": list(K_GRID),
            "epochs": epochs,
            "batch_size": 50,
            "n_init": RESTARTS,
            "lloyd_steps": 1,
            "seed": 5,
            "report": {"centroid_grids": [8]},
        },
        sort_keys=False,
    )


@dataclass
class Setup:
    root: Path
    job: Path
    cluster_file: Path  # connect_timeout 5 s; its LocalCluster (one process, threads) serves the store-fault run
    store: str

    def args(self, run_dir: Path, *more: str, job: Path | None = None, store: str | None = None) -> list[str]:
        return [
            "run",
            str(job or self.job),
            "--cluster",
            str(self.cluster_file),
            "--store",
            store or self.store,
            "--out",
            str(run_dir),
            *more,
        ]

    def resume_args(self, run_dir: Path, scheduler: str) -> list[str]:
        return [
            "run",
            str(self.job),
            "--cluster",
            str(self.cluster_file),
            "--store",
            self.store,
            "--resume",
            str(run_dir),
            "--scheduler",
            scheduler,
        ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, kgrid_store: tuple[str, IdxDataset]) -> Setup:
    root = tmp_path_factory.mktemp("reliability")
    job = root / "job.yaml"
    job.write_text(job_text())
    cluster_file = root / "cluster.yaml"
    cluster_file.write_text(
        f"connect_timeout: {CONNECT_TIMEOUT}\n"
        "local: {n_workers: 1, threads_per_worker: 2, processes: false, dashboard_address: '127.0.0.1:0'}\n"
    )
    return Setup(root, job, cluster_file, kgrid_store[0])


@pytest.fixture(scope="module")
def new_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DaskCluster]]:
    """``new_cluster(name, n_workers, nanny=False)``: a started cluster (workers not waited for); stopped at the end."""
    started: list[DaskCluster] = []
    root = tmp_path_factory.mktemp("clusters")

    def new(name: str, n_workers: int = 2, nanny: bool = False) -> DaskCluster:
        cluster = DaskCluster(root / name).start_scheduler()
        started.append(cluster)
        for _ in range(n_workers):
            cluster.add_worker(nanny=nanny)
        return cluster

    yield new
    for cluster in started:
        cluster.stop()


def finals(run_dir: Path) -> dict[int, np.ndarray]:
    return final_centroids(run_dir, K_GRID)


def ok(rc: int, out: str, err: str) -> None:
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def mid_run(progress: dict[str, tuple[int, int]]) -> bool:
    """A fault at ``progress`` landed mid-run: an epoch was saved, and some chain still had epochs to go."""
    return any(e >= 1 for e, _ in progress.values()) and (
        len(progress) < len(K_GRID) or any(e < EPOCHS for e, _ in progress.values())
    )


# --- the undisturbed run: the centroids every disturbed run must end with ---------------------------------------------


@pytest.fixture(scope="module")
def cluster_a(new_cluster: Callable[..., DaskCluster]) -> DaskCluster:
    """Two one-thread workers, one ``--no-nanny`` and one under a nanny: the reference run, then the worker faults,
    then the run whose client is killed."""
    cluster = new_cluster("a", 0)
    cluster.add_worker(nanny=False)
    cluster.add_worker(nanny=True)
    cluster.wait_for_workers(2)
    return cluster


@pytest.fixture(scope="module")
def cluster_fresh(new_cluster: Callable[..., DaskCluster]) -> DaskCluster:
    """Two ``--no-nanny`` workers nobody disturbs: the "later, on a new cluster" of every resume."""
    cluster = new_cluster("fresh", 2)
    cluster.wait_for_workers(2)
    with cluster.client() as client:
        client.get_task_stream()  # installs the scheduler's task-stream plugin: every task from now on is recorded
    return cluster


@pytest.fixture(scope="module")
def reference(setup: Setup, cluster_a: DaskCluster) -> dict[int, np.ndarray]:
    run_dir = setup.root / "run-reference"
    proc = run_cli(*setup.args(run_dir, "--scheduler", cluster_a.address), timeout=RUN_TIMEOUT)
    ok(proc.returncode, proc.stdout, proc.stderr)
    return finals(run_dir)


# --- worker loss ------------------------------------------------------------------------------------------------------


def wait_for_progress(run: LiveRun, run_dir: Path, done: Callable[[dict[str, tuple[int, int]]], bool]) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    while run.proc.poll() is None and time.monotonic() < deadline:
        progress = chain_progress(run_dir)
        if done(progress):
            return progress
        time.sleep(0.02)
    return {}


def test_workers_lost_mid_run_one_for_good_one_replaced_same_centroids(
    setup: Setup, cluster_a: DaskCluster, reference: dict[int, np.ndarray]
) -> None:
    """Two faults in one run: at the first saved epoch the ``--no-nanny`` worker is SIGKILLed (gone for good: the job
    goes on with what remains); two epochs later the other worker is SIGKILLed too, and its nanny starts a replacement,
    which — the only worker left — finishes the job. Lost results are recomputed from their lineage; tasks are pure,
    so the centroids are those of the undisturbed run, bit for bit."""
    with cluster_a.client() as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        pids = client.run(os.getpid)
    plain = next(a for a, w in info.items() if not w.get("nanny"))
    nannied = next(a for a, w in info.items() if w.get("nanny"))
    run_dir = setup.root / "run-workers-lost"
    run = LiveRun.start(setup.args(run_dir, "--scheduler", cluster_a.address), setup.root / "workers-lost")

    first = run.wait_for_epoch(run_dir)
    os.kill(pids[plain], signal.SIGKILL)
    top = max((e for e, _ in first.values()), default=0)
    second = wait_for_progress(run, run_dir, lambda p: any(e >= top + 2 for e, _ in p.values()))
    os.kill(pids[nannied], signal.SIGKILL)  # the worker process, not its nanny: the nanny starts a new one

    replacement = None
    with cluster_a.client() as client:
        deadline = time.monotonic() + RUN_TIMEOUT
        while replacement is None and run.proc.poll() is None and time.monotonic() < deadline:
            replacement = next(iter(set(client.scheduler_info(n_workers=-1)["workers"]) - {plain, nannied}), None)
            time.sleep(0.05)
    rc, out, err = run.finish(RUN_TIMEOUT)
    ok(rc, out, err)
    assert mid_run(first) and mid_run(second), f"a kill did not land mid-run: {first} then {second}"
    assert replacement is not None, "the job ended before the nanny's replacement worker registered"
    with cluster_a.client() as client:
        assert set(client.scheduler_info(n_workers=-1)["workers"]) == {replacement}  # the job finished on it
    assert_same_centroids(finals(run_dir), reference)
    assert [row["k"] for row in json.loads((run_dir / "metrics.json").read_text())["results"]] == list(K_GRID)


# --- client loss: SIGKILL of `run`, then --resume on a new cluster ----------------------------------------------------


@dataclass
class ClientKilled:
    run_dir: Path
    progress: dict[str, tuple[int, int]]  # what the checkpoint holds after the kill
    saved_files: dict[str, tuple[bytes, int]]  # the chunk files of every saved epoch: bytes and mtime


def fitted_chains(key: str) -> list[str]:
    """The chains a task of this key advanced by one chunk (docs/contract.md, "Task keys"): one for a restart's
    screening task (``screen_k4-r1-e1-c0-<uuid>``), each K a lane's task names (``fit_k4_k8-e2-c1-<uuid>``: K=4
    and K=8); none for any other task."""
    group = key.split("-")[0]
    if group.startswith("screen_k"):
        return [key]
    if group.startswith("fit_k"):
        return group.removeprefix("fit_").split("_")
    return []


def saved_epoch_files(run_dir: Path, progress: dict[str, tuple[int, int]]) -> dict[str, tuple[bytes, int]]:
    snap = tree_snapshot(run_dir / "centroids.zarr" / "chains")
    keep = {}
    for chain, (epochs_done, _) in progress.items():
        for e in range(epochs_done):
            for name in (f"{chain}/centers/c/{e}/0/0", f"{chain}/counts/c/{e}/0"):
                keep[name] = snap[name]
    return keep


@pytest.fixture(scope="module")
def client_killed(setup: Setup, cluster_a: DaskCluster) -> ClientKilled:
    cluster = cluster_a  # whatever workers it has left
    run_dir = setup.root / "run-client-killed"
    run = LiveRun.start(setup.args(run_dir, "--scheduler", cluster.address), setup.root / "client-killed")
    progress = run.wait_for_epoch(run_dir)
    run.proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: the process is gone
    rc, _, _ = run.finish(60)
    cluster.stop()  # "later, on a new cluster": this one is gone with it
    assert rc == -signal.SIGKILL
    assert mid_run(progress), f"the kill did not land mid-run: {progress}"
    progress = chain_progress(run_dir)
    assert any(e >= 1 for e, _ in progress.values())
    return ClientKilled(run_dir, progress, saved_epoch_files(run_dir, progress))


def test_client_sigkilled_leaves_its_saved_epochs_and_nothing_that_looks_finished(client_killed: ClientKilled) -> None:
    d = client_killed.run_dir
    assert (d / "job.yaml").is_file() and (d / "manifest.json").is_file()
    for name in ("metrics.json", "report.html", "label_maps.json"):
        assert not (d / name).exists(), name
    assert client_killed.saved_files  # at least one epoch of one chain


def test_resume_with_another_job_or_store_is_refused(
    setup: Setup, client_killed: ClientKilled, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any cluster starts, so in this process (``main``), as the command line runs it."""
    from mnist_kmeans.cli import main

    before = tree_snapshot(client_killed.run_dir)
    other_job = tmp_path / "other.yaml"
    other_job.write_text(job_text(epochs=EPOCHS + 1))
    other_store, _ = make_small_store(
        tmp_path / "other-store", chunk_rows=500, n_train=3000, n_test=500, h=10, w=10, n_classes=5, seed=12
    )
    for args, names in (
        (["run", str(other_job), "--store", setup.store, "--resume", str(client_killed.run_dir)], "epochs"),
        (["run", str(setup.job), "--store", other_store, "--resume", str(client_killed.run_dir)], "store"),
    ):
        code = main([*args, "--cluster", str(setup.cluster_file)])
        err = capsys.readouterr().err
        assert code == 2, err
        line = one_line(err)
        assert names in line and "job.yaml" in line, line
    assert tree_snapshot(client_killed.run_dir) == before  # nothing touched


def test_resume_after_client_sigkill_refits_nothing_saved_and_gives_the_same_centroids(
    setup: Setup, client_killed: ClientKilled, cluster_fresh: DaskCluster, reference: dict[int, np.ndarray]
) -> None:
    t0 = time.time()
    proc = run_cli(*setup.resume_args(client_killed.run_dir, cluster_fresh.address), timeout=RUN_TIMEOUT)
    ok(proc.returncode, proc.stdout, proc.stderr)
    assert_same_centroids(finals(client_killed.run_dir), reference)
    # The saved epochs were read, not refitted: their files are the very ones written before the kill ...
    assert saved_epoch_files(client_killed.run_dir, client_killed.progress) == client_killed.saved_files
    # ... and the new cluster ran exactly the partial_fit tasks of the epochs that were not saved.
    with cluster_fresh.client() as client:
        stream = client.get_task_stream(start=t0)
    fit_tasks = [chain for t in stream for chain in fitted_chains(str(t["key"]))]
    # Only a K's chosen restart saves epochs. A K with nothing saved (no chain, or one whose first save the kill cut
    # short) starts afresh: every restart fits the screening chunks (the whole first epoch: 3,000 rows <
    # screen_rows), then the chosen one its other epochs.
    saved = [(e, lloyd) for e, lloyd in client_killed.progress.values() if e or lloyd]
    expected = sum((EPOCHS - e) * N_CHUNKS for e, lloyd in saved if not lloyd)
    expected += (len(K_GRID) - len(saved)) * (RESTARTS + EPOCHS - 1) * N_CHUNKS
    assert len(fit_tasks) == expected, (len(fit_tasks), expected, client_killed.progress)
    assert len(fit_tasks) < len(K_GRID) * (RESTARTS + EPOCHS - 1) * N_CHUNKS
    assert all(e == EPOCHS for e, _ in chain_progress(client_killed.run_dir).values())


# --- scheduler loss ---------------------------------------------------------------------------------------------------


@dataclass
class SchedulerKilled:
    run_dir: Path
    rc: int
    err: str
    seconds: float  # from the kill to the exit of `run`


@pytest.fixture(scope="module")
def scheduler_killed(setup: Setup, new_cluster: Callable[..., DaskCluster]) -> SchedulerKilled:
    cluster = new_cluster("scheduler-kill", 2)
    cluster.wait_for_workers(2)
    run_dir = setup.root / "run-scheduler-killed"
    run = LiveRun.start(setup.args(run_dir, "--scheduler", cluster.address), setup.root / "scheduler-killed")
    progress = run.wait_for_epoch(run_dir)
    assert cluster.scheduler is not None
    cluster.scheduler.send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    rc, _, err = run.finish(RUN_TIMEOUT)
    seconds = time.monotonic() - t_kill
    cluster.stop()
    assert mid_run(progress), f"the kill did not land mid-run: {progress}"
    return SchedulerKilled(run_dir, rc, err, seconds)


def test_scheduler_sigkilled_exits_3_in_bounded_time_with_how_to_resume(scheduler_killed: SchedulerKilled) -> None:
    assert scheduler_killed.rc == 3, scheduler_killed.err
    line = one_line(scheduler_killed.err)
    assert "scheduler" in line and f"--resume {scheduler_killed.run_dir}" in line, line
    # the client tries to reconnect for connect_timeout seconds, then gives up; the rest is closing down
    assert scheduler_killed.seconds < CONNECT_TIMEOUT + 45, scheduler_killed.seconds
    assert not (scheduler_killed.run_dir / "metrics.json").exists()


def test_the_printed_resume_command_finishes_on_a_new_cluster_with_the_same_centroids(
    setup: Setup, scheduler_killed: SchedulerKilled, cluster_fresh: DaskCluster, reference: dict[int, np.ndarray]
) -> None:
    command = shlex.split(one_line(scheduler_killed.err).split("continue on any cluster with: ", 1)[1])
    assert command[:2] == ["mnist-kmeans", "run"], command
    proc = run_cli(
        *command[1:], "--cluster", str(setup.cluster_file), "--scheduler", cluster_fresh.address, timeout=RUN_TIMEOUT
    )
    ok(proc.returncode, proc.stdout, proc.stderr)
    assert_same_centroids(finals(scheduler_killed.run_dir), reference)


# --- storage faults ---------------------------------------------------------------------------------------------------


def test_store_chunk_lost_mid_run_exits_2_naming_the_chunk(setup: Setup, tmp_path: Path) -> None:
    store = copy_store(setup.store, tmp_path / "store.zarr")
    run_dir = tmp_path / "run"
    # No chunk cache: every task reads its chunk from the store, as on a cluster whose workers keep little memory.
    run = LiveRun.start(setup.args(run_dir, store=store), tmp_path / "run", env={"MNIST_KMEANS_CHUNK_CACHE_MB": "0"})
    progress = run.wait_for_epoch(run_dir)
    (Path(store) / "train" / "images" / "c" / "3" / "0").unlink()  # Zarr would read it as zeros, silently
    rc, out, err = run.finish(RUN_TIMEOUT)
    assert mid_run(progress), f"the fault did not land mid-run: {progress}"
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    line = one_line(err)
    assert f"{store}: train chunk 3 (rows 1500-1999)" in line and "missing" in line, line
    for name in ("metrics.json", "report.html"):
        assert not (run_dir / name).exists(), name


# --- a full disk under the run directory ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the full-disk test needs root in a VM")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_run_directory_disk_full_mid_run_exits_2_keeps_what_was_saved_and_resumes(
    setup: Setup, small_disk: Path, cluster_fresh: DaskCluster, reference: dict[int, np.ndarray]
) -> None:
    from mnist_kmeans.checkpoint import Checkpoint

    run_dir = small_disk / "run"
    run = LiveRun.start(setup.args(run_dir, "--scheduler", cluster_fresh.address), small_disk.parent / "disk-full")
    progress = run.wait_for_epoch(run_dir)
    filler = fill(small_disk)
    rc, out, err = run.finish(RUN_TIMEOUT)
    assert mid_run(progress), f"the disk filled too late: {progress}"
    assert rc == 2, f"exit {rc}\n{out}\n{err}"
    line = one_line(err)
    assert f"{run_dir}/centroids.zarr" in line and "No space left on device" in line, line
    for name in ("metrics.json", "report.html", "label_maps.json"):
        assert not (run_dir / name).exists(), name
    assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"
    # every epoch saved before the disk filled is still whole: a later --resume starts from it
    saved = chain_progress(run_dir)
    assert any(e >= 1 for e, _ in saved.values())
    ckpt = Checkpoint.open(run_dir / "centroids.zarr")
    for chain, (epochs_done, _) in saved.items():
        k, r = (int(part[1:]) for part in chain.split("/"))
        assert ckpt.progress(k, r)[0] == epochs_done
        state = ckpt.load_state(k, r) if epochs_done else None
        assert state is None or (state.centers.shape == (k, 100) and np.isfinite(state.centers).all())
    # room again: the same run continues from its saved epochs to the centroids of the undisturbed run
    filler.unlink()
    proc = run_cli(*setup.resume_args(run_dir, cluster_fresh.address), timeout=RUN_TIMEOUT)
    ok(proc.returncode, proc.stdout, proc.stderr)
    assert_same_centroids(finals(run_dir), reference)
