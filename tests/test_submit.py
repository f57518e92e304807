"""Jobs that outlive the client, on real processes: ``submit``, ``status``, ``wait``, ``cancel`` (docs/contract.md,
"submit").

One ``dask scheduler`` and two ``dask worker --nanny`` processes on 127.0.0.1, each worker with its own local
directory, serve every test; the job is small (3,000 rows of 10x10 in chunks of 500; K = 4 and 8, two restarts, six
epochs, batches of 50, one Lloyd step) long enough that "mid-fit" exists. Every mid-fit moment is found by
polling the checkpoint until an epoch is saved, never by sleeping. The centroids every submitted job must end with
are those of ``run`` of the same job on the same cluster.

- ``submit`` returns while the job runs, its process gone; ``wait`` from a new process prints the report, and
  ``status`` says each stage on the way (queued or fitting, fitting with each K's progress, evaluating, done);
- the worker holding the driver SIGKILLed mid-fit: the driver runs again (attempt 2), the centroids are identical,
  and no partial_fit task of an epoch saved before the kill runs again (the scheduler's task stream, by task key);
- ``cancel`` mid-fit: the job stops with its epochs saved, ``wait`` exits 130, ``run --resume`` finishes it with the
  same centroids; while the driver owns the directory a second ``submit`` (or ``run``) is refused;
- a store chunk missing, found by the workers: ``status`` and ``wait`` say the one-line reason (exit 2);
- ``submit`` refuses a cluster that lives in its own process (embedded LocalCluster, SLURM): exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from dask.utils import key_split

from tests.helpers import (
    DaskCluster,
    IdxDataset,
    LiveRun,
    assert_same_centroids,
    chain_progress,
    copy_store,
    final_centroids,
    run_cli,
    tree_snapshot,
)

K_GRID = (4, 8)
EPOCHS = 8
TIMEOUT = 240


@dataclass
class Setup:
    root: Path
    job: Path
    store: str
    cluster: DaskCluster

    def submit_args(self, run_dir: Path, *more: str, store: str | None = None) -> list[str]:
        return ["submit", str(self.job), "--store", store or self.store, "--scheduler", self.cluster.address, *more] + (
            ["--out", str(run_dir)] if "--resume" not in more else []
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, kgrid_store: tuple[str, IdxDataset]) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("submit")
    job = root / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "submitted",
                "k_grid": list(K_GRID),
                "epochs": EPOCHS,
                "batch_size": 50,
                "n_init": 2,
                "lloyd_steps": 1,
                "seed": 5,
                "report": {"centroid_grids": [8]},
            }
        )
    )
    cluster = DaskCluster(root / "cluster").start_scheduler()
    try:
        for _ in range(2):
            cluster.add_worker(nanny=True)
        cluster.wait_for_workers(2)
        with cluster.client() as client:
            client.get_task_stream()  # installs the scheduler's task-stream plugin: every task from now on is recorded
        yield Setup(root, job, kgrid_store[0], cluster)
    finally:
        cluster.stop()


def finals(run_dir: Path) -> dict[int, np.ndarray]:
    return final_centroids(run_dir, K_GRID)


def ok(proc_or_rc, out: str = "", err: str = "") -> str:
    if not isinstance(proc_or_rc, int):
        proc_or_rc, out, err = proc_or_rc.returncode, proc_or_rc.stdout, proc_or_rc.stderr
    assert proc_or_rc == 0, f"exit {proc_or_rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def status_file(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def submit(setup: Setup, run_dir: Path, *more: str, store: str | None = None) -> str:
    """``submit`` in a process of its own, which has exited when this returns; the driver's task key."""
    out = ok(run_cli(*setup.submit_args(run_dir, *more, store=store), timeout=TIMEOUT))
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["run directory"] == str(run_dir), out
    assert lines["dashboard"].startswith("http://127.0.0.1:"), out
    assert f"mnist-kmeans wait {run_dir}" in lines["follow it with"], out
    return lines["driver"]


def wait_for_epoch(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Poll the checkpoint until some chain has saved an epoch; fail if the job finishes first."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        progress = chain_progress(run_dir)
        if any(e >= 1 for e, _ in progress.values()):
            return progress
        assert not (run_dir / "metrics.json").exists(), "the job finished before an epoch was seen saved"
        time.sleep(0.02)
    raise AssertionError("no epoch saved in time")


def mid_fit(progress: dict[str, tuple[int, int]]) -> bool:
    return any(e >= 1 for e, _ in progress.values()) and (
        len(progress) < len(K_GRID) or any(e < EPOCHS for e, _ in progress.values())
    )


@pytest.fixture(scope="module")
def reference(setup: Setup) -> dict[int, np.ndarray]:
    """``run`` of the job on the same cluster, in the foreground."""
    run_dir = setup.root / "run-reference"
    ok(
        run_cli(
            "run", str(setup.job), "--store", setup.store, "--scheduler", setup.cluster.address, "--out", str(run_dir)
        )
    )
    assert status_file(run_dir)["state"] == "done"  # run writes the status too
    return finals(run_dir)


# --- submit, then wait from another process --------------------------------------------------------------------------


def test_submit_returns_while_the_job_runs_and_wait_gives_the_report_with_the_centroids_of_run(
    setup: Setup, reference: dict[int, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    """``status`` is asked in this process (``cli.main``) as often as it answers, so that every stage is seen."""
    from mnist_kmeans.cli import main

    run_dir = setup.root / "run-submitted"
    key = submit(setup, run_dir)
    # the submitting process has exited; the job goes on without it
    assert status_file(run_dir)["state"] in ("queued", "fitting") and not (run_dir / "metrics.json").exists()
    assert key_split(key) == "driver_submitted"
    waiting = LiveRun.start(["wait", str(run_dir)], setup.root / "wait-submitted")

    seen: list[str] = []  # each state `status` says, in order
    mid_line = ""
    while waiting.proc.poll() is None:
        saved = any(e >= 1 for e, _ in chain_progress(run_dir).values())
        assert main(["status", str(run_dir)]) == 0
        line = capsys.readouterr().out.strip()
        state = line.split(":")[0]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "fitting" and saved and "%" in line:
            mid_line = line
        time.sleep(0.01)
    rc, out, err = waiting.finish(TIMEOUT)
    ok(rc, out, err)
    assert out.strip() == str(run_dir / "report.html") and (run_dir / "report.html").is_file()
    assert_same_centroids(finals(run_dir), reference)

    assert seen[-1] == "done" and "fitting" in seen and "evaluating" in seen, seen
    order = ["queued", "fitting", "evaluating", "done"]
    assert [s for s in order if s in seen] == seen, seen  # no stage twice, none backwards, nothing else
    assert mid_line.startswith("fitting: fit ") and "K=4 " in mid_line and "K=8 " in mid_line, mid_line
    assert "ep" in mid_line and "(attempt 1, updated " in mid_line, mid_line
    assert ok(run_cli("status", str(run_dir))).strip() == f"done: {run_dir / 'report.html'}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["command"][1:3] == ["submit", str(setup.job)] and manifest["resumed"] is False


def test_task_keys_name_their_step_and_k(setup: Setup, reference: dict[int, np.ndarray]) -> None:
    """The dashboard's progress bars are per key_split group: one per K and phase, unique keys per task."""
    with setup.cluster.client() as client:
        keys = [str(t["key"]) for t in client.get_task_stream(start=0)]
    groups = {key_split(key) for key in keys}
    for k in K_GRID:
        assert {f"init_k{k}", f"screen_k{k}", f"fit_k{k}", f"lloyd_k{k}"} <= groups, sorted(groups)
    assert {"sample", "stats_screen", "stats_lloyd1", "stats_eval", "stats_test"} <= groups, sorted(groups)
    assert {"select_sample", "select_pass", "select_scores"} <= groups, sorted(groups)
    assert "fit_chunk" not in groups and "fit" not in groups
    assert len(keys) == len(set(keys))  # two runs (reference and submitted) on one cluster: no key shared
    assert any(key.startswith("fit_k8-e6-c5-") for key in keys)  # epoch and chunk in the key, 1-based epochs


# --- the worker holding the driver dies -----------------------------------------------------------------------------


def saved_epoch_files(run_dir: Path, progress: dict[str, tuple[int, int]]) -> dict[str, tuple[bytes, int]]:
    snap = tree_snapshot(run_dir / "centroids.zarr" / "chains")
    return {
        name: snap[name]
        for chain, (epochs_done, _) in progress.items()
        for e in range(epochs_done)
        for name in (f"{chain}/centers/c/{e}/0/0", f"{chain}/counts/c/{e}/0")
    }


def test_driver_worker_sigkilled_mid_fit_the_driver_runs_again_and_refits_no_saved_epoch(
    setup: Setup, reference: dict[int, np.ndarray]
) -> None:
    run_dir = setup.root / "run-driver-killed"
    key = submit(setup, run_dir)
    wait_for_epoch(run_dir)
    with setup.cluster.client() as client:
        holder = next(w for w, keys in client.processing().items() if key in keys)
        pid = client.run(os.getpid, workers=[holder])[holder]
    before = chain_progress(run_dir)  # saved before the kill: a lower bound of what the new driver finds
    files = saved_epoch_files(run_dir, before)
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)  # the worker process, not its nanny: the nanny starts a new one

    rc, out, err = LiveRun.start(["wait", str(run_dir)], setup.root / "wait-killed").finish(TIMEOUT)
    ok(rc, out, err)
    assert mid_fit(before), f"the kill did not land mid-fit: {before}"
    assert_same_centroids(finals(run_dir), reference)
    assert status_file(run_dir)["attempt"] == 2  # the driver ran again, elsewhere or on the nanny's new worker
    assert json.loads((run_dir / "manifest.json").read_text())["resumed"]["resumed_utc"]
    # No saved epoch was refitted: its files are those written before the kill ...
    assert saved_epoch_files(run_dir, before) == files
    # ... and the new driver submitted no partial_fit task of an epoch a K had saved. Its keys are new: a key that
    # also ran before the kill is the scheduler recomputing the dead driver's lost results until it drops them.
    with setup.cluster.client() as client:
        stream = client.get_task_stream(start=0)
        assert holder not in client.scheduler_info(n_workers=-1)["workers"]
    ran_before = {str(t["key"]) for t in stream if t["startstops"][0]["start"] < t_kill}
    new_keys = [str(t["key"]) for t in stream if t["startstops"][0]["start"] >= t_kill]
    new_keys = [key_ for key_ in new_keys if key_ not in ran_before]
    refit = []
    for chain, (epochs_done, _) in before.items():
        k = int(chain.split("/")[0][1:])
        for key_ in new_keys:
            group, *words = key_.split("-")  # a lane's first word names each of its K's: fit_k4_k8-e2-c1-…
            in_lane = group.startswith("fit_k") and f"k{k}" in group.removeprefix("fit_").split("_")
            fitted = in_lane and int(words[0][1:]) <= epochs_done
            started = epochs_done and key_.startswith((f"screen_k{k}-", f"init_k{k}-"))
            if fitted or started:
                refit.append(key_)
    assert not refit, (before, refit[:5])
    assert any(key_.startswith("fit_k") for key_ in new_keys)  # the new driver did fit the rest


# --- cancel, refused second submit, resume ----------------------------------------------------------------------------


def test_cancel_mid_fit_then_run_resume_gives_the_same_centroids_and_a_second_submit_is_refused(
    setup: Setup, reference: dict[int, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusals and the cancel are asked in this process (``cli.main``): they answer in milliseconds, well
    within the fit (a new process would take a second to import)."""
    from mnist_kmeans.cli import main

    run_dir = setup.root / "run-cancelled"
    submit(setup, run_dir)
    wait_for_epoch(run_dir)

    # while its driver owns the directory: no second submit, no run, whatever the options
    for args in (
        setup.submit_args(run_dir, "--resume", str(run_dir)),
        ["run", str(setup.job), "--store", setup.store, "--resume", str(run_dir)],
        setup.submit_args(run_dir),
    ):
        assert main(args) == 2
        line = one_line(capsys.readouterr().err)
        if "--resume" in args:
            assert line == f"error: {run_dir}: another mnist-kmeans run is writing this run directory", line
        else:
            assert line.startswith(f"error: {run_dir}: run directory exists and is not empty"), line

    assert main(["cancel", str(run_dir)]) == 0
    out = capsys.readouterr().out
    progress = chain_progress(run_dir)
    resume = f"mnist-kmeans run {run_dir / 'job.yaml'} --resume {run_dir}"
    assert out.strip() == f"cancelled: finished epochs are saved; continue with: {resume}", out
    assert mid_fit(progress), progress  # stopped with epochs saved and epochs to go
    assert not (run_dir / "metrics.json").exists()
    proc = run_cli("wait", str(run_dir))
    assert proc.returncode == 130 and one_line(proc.stderr) == out.strip(), proc.stderr
    assert run_cli("status", str(run_dir)).stdout.strip() == out.strip()

    # the printed command, as given, finishes the job (the cluster's scheduler now on the command line)
    ok(run_cli(*resume.split()[1:], "--scheduler", setup.cluster.address, timeout=TIMEOUT))
    assert_same_centroids(finals(run_dir), reference)
    assert status_file(run_dir)["state"] == "done" and not (run_dir / "cancel.request").exists()


# --- a failed job -----------------------------------------------------------------------------------------------------


def test_status_and_wait_of_a_job_whose_store_the_workers_find_damaged(setup: Setup, tmp_path: Path) -> None:
    store = copy_store(setup.store, tmp_path / "store.zarr")
    (Path(store) / "train" / "images" / "c" / "3" / "0").unlink()  # only a worker reading the chunk notices
    run_dir = setup.root / "run-failed"
    submit(setup, run_dir, store=store)
    proc = run_cli("wait", str(run_dir), timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"error: {store}: train chunk 3 (rows 1500-1999)") and "missing" in line, line
    status = run_cli("status", str(run_dir))
    assert status.returncode == 0 and status.stdout.strip() == f"failed (exit 2): {line.removeprefix('error: ')}"
    assert not (run_dir / "metrics.json").exists()


def test_cancel_of_a_queued_job_and_the_driver_that_starts_later_stops_before_fitting(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both worker threads held by tasks that wait on an Event: the driver cannot start, the job is queued. ``cancel``
    then finds no process holding the directory and records the cancel itself; once the threads are free, the driver
    starts, sees the request and stops before any task of the fit."""
    from distributed import Event

    from mnist_kmeans.cli import main

    run_dir = setup.root / "run-queued"
    with setup.cluster.client() as client:
        release = Event("test-submit-release", client=client)
        blockers = [client.submit(release.wait, key=f"blocker-{i}", pure=False) for i in range(2)]
        deadline = time.monotonic() + TIMEOUT
        while sum(len(keys) for keys in client.processing().values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            submit(setup, run_dir)
            assert main(["status", str(run_dir)]) == 0
            assert capsys.readouterr().out.startswith(f"queued: on {setup.cluster.address} (attempt 0, updated ")
            assert main(setup.submit_args(run_dir, "--resume", str(run_dir))) == 2  # the queued job owns it
            line = one_line(capsys.readouterr().err)
            assert line.startswith(f"error: {run_dir}: a job submitted to this directory is queued"), line
            assert main(["cancel", str(run_dir)]) == 0
            resume = f"mnist-kmeans run {run_dir / 'job.yaml'} --resume {run_dir}"
            out = capsys.readouterr().out.strip()
            assert out == f"cancelled while queued: finished epochs are saved; continue with: {resume}", out
        finally:
            release.set()
            client.gather(blockers)
        while "before it started" not in status_file(run_dir)["detail"] and time.monotonic() < deadline:
            time.sleep(0.05)
    status = status_file(run_dir)
    assert status["detail"] == f"cancelled before it started; continue with: {resume}", status
    assert (status["state"], status["exit_code"], status["attempt"]) == ("cancelled", 130, 1)
    assert chain_progress(run_dir) == {}  # nothing was fitted
    proc = run_cli("wait", str(run_dir))
    assert proc.returncode == 130 and one_line(proc.stderr) == status["detail"], proc.stderr


# --- refusals --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster_text", "lives"),
    [
        ("local: {n_workers: 1}\n", "the embedded LocalCluster"),
        ("kind: slurm\nslurm: {n_workers: 1}\n", "the SLURMCluster's scheduler"),
    ],
)
def test_submit_refuses_a_cluster_that_lives_in_its_process(
    setup: Setup, tmp_path: Path, cluster_text: str, lives: str
) -> None:
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(cluster_text)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "submit", str(setup.job), "--cluster", str(cluster_file), "--store", setup.store, "--out", str(run_dir)
    )
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"error: {cluster_file}: kind: ") and "submit needs a cluster that outlives" in line, line
    assert lives in line and "--scheduler" in line, line
    assert not run_dir.exists()


def test_status_of_a_directory_without_a_job_is_exit_2(tmp_path: Path) -> None:
    for command in ("status", "wait", "cancel"):
        proc = run_cli(command, str(tmp_path))
        assert (
            proc.returncode == 2
            and one_line(proc.stderr)
            == f"error: {tmp_path}: no status.json: not the run directory of a job (or it never started)"
        ), proc.stderr
