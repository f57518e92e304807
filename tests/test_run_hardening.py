"""`run` as a user meets it from anywhere, and when two meet on one target (issue 11): every report states only what
is true of its finished directory, files honour the umask, a job runs from any directory, paths mean the same on
workers elsewhere, two runs never share a run directory, and an interrupted report phase leaves nothing that looks
finished. Real processes throughout: the command line as a child process, embedded and external Dask clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, DaskCluster, IdxDataset, LiveRun, run_cli, write_idx_dataset

JOB = {"name": "hard", "k_grid": [3, 5], "epochs": 2, "batch_size": 100, "n_init": 1, "lloyd_steps": 1, "seed": 1}
CLUSTER = 'local: {n_workers: 1, threads_per_worker: 2, memory_limit: 2GiB, dashboard_address: "127.0.0.1:0"}\n'
UMASK = 0o027


def write_job(directory: Path, **changes: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, **changes}, sort_keys=False))
    return path


def cluster_file(directory: Path) -> Path:
    path = directory / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, umask: int | None = None
) -> subprocess.CompletedProcess:
    """The command line in ``cwd``, stdout and stderr in one stream (their order is part of what is tested)."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_kmeans", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


# --- a first run from another directory, on the default store -------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, IdxDataset]:
    """A job file that names no store, run from a directory that is neither the job's nor the repository, with a
    data home (``MNIST_KMEANS_DATA``) that has IDX files but no store yet: the default store is ingested on demand."""
    root = tmp_path_factory.mktemp("first-run")
    data = write_idx_dataset(root / "home" / "mnist", n_train=600, n_test=200, h=6, w=6, n_classes=3)
    job = write_job(root / "jobs")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    cluster_file(elsewhere)  # ./cluster.yaml of the working directory
    env = {"MNIST_KMEANS_DATA": str(root / "home")}
    proc = cli("run", str(job), "--out", "out/run", cwd=elsewhere, env=env, umask=UMASK)
    assert proc.returncode == 0, proc.stdout
    return elsewhere / "out" / "run", proc, data


def test_a_job_runs_from_any_directory_and_says_its_dashboard_before_the_ingest(first_run) -> None:
    run_dir, proc, data = first_run
    lines = proc.stdout.splitlines()
    dashboard = next(i for i, line in enumerate(lines) if line.startswith("dashboard: "))
    ingested = next(i for i, line in enumerate(lines) if line.startswith("ingested "))
    assert dashboard < ingested, proc.stdout
    store = json.loads((run_dir / "manifest.json").read_text())["data"]["store"]
    assert store == str(data.directory.parent / "mnist.zarr")  # the data home's, absolute
    assert Path(lines[-1]) == run_dir / "report.html"


def test_the_report_of_a_run_says_only_what_is_true_of_its_directory(first_run) -> None:
    run_dir, _, _ = first_run
    html = (run_dir / "report.html").read_text()
    assert (run_dir / "dask-performance.html").is_file()
    assert "is missing from this run directory" not in html
    assert 'href="dask-performance.html"' in html
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["timings"]["total_s"] > 0 and isinstance(metrics["finished_utc"], str)
    note = metrics["inertia_per_epoch_note"]
    assert "each of the 2 mini-batch epochs" in note and "the 1 full-batch Lloyd step" in note, note
    assert not list(run_dir.glob(".*partial*"))


def test_every_file_of_the_run_directory_honours_the_umask(first_run) -> None:
    run_dir, _, _ = first_run
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o777 for p in run_dir.rglob("*")}
    files = {name: mode for name, mode in modes.items() if (run_dir / name).is_file()}
    dirs = {name: mode for name, mode in modes.items() if (run_dir / name).is_dir()}
    assert {"metrics.json", "job.yaml", "manifest.json", "report.html", "dask-performance.html"} <= set(files)
    assert any(name.startswith("centroids.zarr/") for name in files) and any(
        name.startswith("figures/") for name in files
    )
    assert set(files.values()) == {0o666 & ~UMASK}, files
    assert set(dirs.values()) == {0o777 & ~UMASK}, dirs


def test_relative_paths_in_a_job_file_are_the_job_files_own(first_run, tmp_path: Path) -> None:
    """``store:`` relative to the job file's directory, whatever the working directory: here ``../home/mnist.zarr``
    from ``jobs/``; and the run fails on nothing that the first run's working directory held."""
    run_dir, _, data = first_run
    root = data.directory.parents[1]
    job = write_job(tmp_path / "jobs", store="../store.zarr")
    shutil.copytree(data.directory.parent / "mnist.zarr", tmp_path / "store.zarr")
    cluster = cluster_file(tmp_path)
    proc = cli("run", str(job), "--cluster", str(cluster), "--out", str(tmp_path / "run"), cwd=root)
    assert proc.returncode == 0, proc.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["store"] == str(tmp_path / "store.zarr")


# --- a relative --store on workers whose working directory is elsewhere ---------------------------------------


def test_a_relative_store_means_the_same_on_workers_that_run_elsewhere(tmp_path: Path, first_run) -> None:
    _, _, data = first_run
    shutil.copytree(data.directory.parent / "mnist.zarr", tmp_path / "here" / "s.zarr")
    cluster = DaskCluster(tmp_path / "dask")  # scheduler and worker run in tmp/dask and tmp/dask/worker1
    try:
        cluster.start_scheduler()
        cluster.add_worker()
        cluster.wait_for_workers(1)
        job = write_job(tmp_path / "jobs")
        proc = cli(
            "run", str(job), "--scheduler", cluster.address, "--store", "s.zarr", "--out", "r", cwd=tmp_path / "here"
        )
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "here" / "r" / "report.html").is_file()


# --- two runs into one --out ------------------------------------------------------------------------------------


def test_two_runs_into_one_out_directory_one_wins_the_other_changes_nothing(tmp_path: Path, first_run) -> None:
    _, _, data = first_run
    store = shutil.copytree(data.directory.parent / "mnist.zarr", tmp_path / "s.zarr")
    job, cluster, out = write_job(tmp_path / "jobs"), cluster_file(tmp_path), tmp_path / "shared-run"
    args = ["run", str(job), "--cluster", str(cluster), "--store", str(store), "--out", str(out)]
    runs = [LiveRun.start(args, tmp_path / f"logs/run{i}") for i in range(2)]
    results = [run.finish() for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser_err = next(err for code, _, err in results if code == 2)
    lines = [line for line in loser_err.splitlines() if line.strip()]
    assert len(lines) == 1 and ("another mnist-kmeans run" in lines[0] or "not empty" in lines[0]), loser_err
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert manifest["cluster"]["scheduler"] == metrics["cluster"]["scheduler"]
    assert isinstance(metrics["finished_utc"], str)


# --- Ctrl-C in the report phase ---------------------------------------------------------------------------------


def test_ctrl_c_in_the_report_phase_leaves_nothing_that_looks_finished(tmp_path: Path, first_run) -> None:
    """SIGINT as soon as metrics.json appears (the results are written, the report is being made): exit 130 and one
    line, no partial performance report, and `report` refuses the unfinished run instead of showing zero timings."""
    _, _, data = first_run
    store = shutil.copytree(data.directory.parent / "mnist.zarr", tmp_path / "s.zarr")
    job, cluster, out = write_job(tmp_path / "jobs"), cluster_file(tmp_path), tmp_path / "run"
    args = ["run", str(job), "--cluster", str(cluster), "--store", str(store), "--out", str(out)]
    live = LiveRun.start(args, tmp_path / "logs/run")
    deadline = time.monotonic() + 240
    while not (out / "metrics.json").exists() and live.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(live.proc.pid, signal.SIGINT)
    code, _, err = live.finish()
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 130, err  # the report phase takes seconds (performance report, figures); the poll, milliseconds
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.tmp"))
    assert "finished_utc" not in metrics
    report = run_cli("report", str(out))
    assert report.returncode == 2, report.stderr
    assert "did not finish" in report.stderr and len(report.stderr.strip().splitlines()) == 1
    assert not (out / "report.html").exists()


CUT_SHORT_ZARR_READ = """
import asyncio, sys
from mnist_kmeans import cli

def interrupted(args):
    from zarr.core.sync import _get_loop
    asyncio.run_coroutine_threadsafe(asyncio.sleep(3600), _get_loop())  # a zarr read still pending at Ctrl-C
    raise KeyboardInterrupt("interrupted: the one line")

cli._COMMANDS["status"] = interrupted
sys.argv = ["mnist-kmeans", "status", "run-dir"]
sys.exit(cli.main())
"""


def test_ctrl_c_with_a_zarr_task_pending_is_still_one_line(tmp_path: Path) -> None:
    """An interrupt that cuts a zarr read short leaves a task pending on zarr's event loop; asyncio's "Task was
    destroyed but it is pending!" at exit must not add lines to exit 130 (seen once in the report phase)."""
    proc = subprocess.run(
        [sys.executable, "-c", CUT_SHORT_ZARR_READ], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines() == ["interrupted: the one line"], proc.stderr


CTRL_C_IN_A_FINALIZER = """
import sys, time
from mnist_kmeans import cli

class Finalized:
    def __del__(self):
        raise KeyboardInterrupt  # what a Ctrl-C does when it lands in a finalizer (a Dask future's __del__)

def interrupted(args):
    Finalized()
    time.sleep(30)  # the run goes on unless the interrupt is raised again

cli._COMMANDS["status"] = interrupted
sys.argv = ["mnist-kmeans", "status", "run-dir"]
sys.exit(cli.main())
"""


def test_ctrl_c_that_lands_in_a_finalizer_still_interrupts_in_one_line(tmp_path: Path) -> None:
    """A second Ctrl-C while the run unwinds once landed in ``distributed.Future.__del__``: Python printed "Exception
    ignored in …" with a traceback and dropped it. The command's process raises it again: exit 130, one line."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_A_FINALIZER], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["interrupted"], proc.stderr
    assert time.monotonic() - t0 < 25  # interrupted, not run to its end


def test_report_of_a_run_cut_short_before_its_results_exits_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(yaml.safe_dump(JOB))
    proc = run_cli("report", str(run_dir), cwd=REPO_ROOT)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_default_store_and_source_do_not_depend_on_the_working_directory() -> None:
    """Without ``MNIST_KMEANS_DATA``, the checkout's ``data/`` (what `run <repo>/jobs/smoke.yaml` needs elsewhere)."""
    code = "from mnist_kmeans.config import load_job, default_source; import sys; j = load_job(sys.argv[1]); "
    code += "print(j.store); print(default_source())"
    env = {k: v for k, v in os.environ.items() if k != "MNIST_KMEANS_DATA"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "jobs" / "smoke.yaml")],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == [str(REPO_ROOT / "data" / "mnist.zarr"), str(REPO_ROOT / "data" / "mnist")]


@pytest.mark.parametrize(
    "argv",
    [
        ["ingest", "--source", "{idx}", "--store", "memory://mnist.zarr"],
        ["augment", "--store", "memory://mnist.zarr", "--out", "{tmp}/aug.zarr", "--rows", "10"],
        ["augment", "--store", "{tmp}/nothing.zarr", "--out", "memory://aug.zarr", "--rows", "10"],
    ],
    ids=["ingest", "augment-from", "augment-into"],
)
def test_memory_stores_are_refused_by_every_command(argv: list[str], tmp_path: Path, capsys) -> None:
    """A memory:// store would "succeed" and vanish with the process (and no worker could read it)."""
    from mnist_kmeans.cli import main

    idx = write_idx_dataset(tmp_path / "idx", n_train=20, n_test=10).directory
    code = main([arg.format(idx=idx, tmp=tmp_path) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "memory://" in err and "one process" in err and len(err.splitlines()) == 1, err


def test_ctrl_c_while_the_cluster_starts_is_one_line_and_leaves_nothing(tmp_path: Path, first_run) -> None:
    """SIGINT to the whole process group, as a terminal sends it, as soon as the run directory is claimed (the
    embedded cluster is starting then): exit 130, one line, and the run directory that was made for it is gone."""
    _, _, data = first_run
    store = shutil.copytree(data.directory.parent / "mnist.zarr", tmp_path / "s.zarr")
    job, cluster, out = write_job(tmp_path / "jobs"), cluster_file(tmp_path), tmp_path / "runs" / "run"
    live = LiveRun.start(
        ["run", str(job), "--cluster", str(cluster), "--store", str(store), "--out", str(out)], tmp_path / "logs/run"
    )
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() and live.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)
    os.killpg(live.proc.pid, signal.SIGINT)
    code, stdout, err = live.finish()
    assert code == 130, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "runs").exists(), sorted(p.name for p in (tmp_path / "runs").rglob("*"))


def test_a_second_ctrl_c_while_the_run_exits_changes_nothing(tmp_path: Path, first_run) -> None:
    """Users press Ctrl-C twice: the second, while the run closes its cluster, still ends in exit 130 and one line."""
    _, _, data = first_run
    store = shutil.copytree(data.directory.parent / "mnist.zarr", tmp_path / "s.zarr")
    job, cluster, out = write_job(tmp_path / "jobs", epochs=200), cluster_file(tmp_path), tmp_path / "run"
    args = ["run", str(job), "--cluster", str(cluster), "--store", str(store), "--out", str(out)]
    live = LiveRun.start(args, tmp_path / "logs/run")
    live.wait_for_epoch(out, timeout=120)
    for _ in range(2):
        os.killpg(live.proc.pid, signal.SIGINT)
        time.sleep(0.3)
    code, _, err = live.finish()
    assert code == 130, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
