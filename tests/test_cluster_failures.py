"""Workers that cannot run the job, and Ctrl-C at any moment of ``run``: exit 3 or 130 with one line, never a hang,
never a traceback (docs/contract.md, "Exit codes").

Real processes throughout: ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 whose memory is too small
for the job (a worker the nanny restarts for memory, one paused at distributed's memory pause threshold), and
``mnist-kmeans run`` on its embedded LocalCluster interrupted by SIGINT while the cluster starts, and sent to its
whole process group once it runs, as a terminal's Ctrl-C is: the cluster's worker processes get it too.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import DaskCluster, IdxDataset, LiveRun, run_cli

JOB = {"name": "failures", "k_grid": [3], "epochs": 2, "batch_size": 100, "n_init": 1, "lloyd_steps": 0, "seed": 1}
PATIENCE = 3  # connect_timeout: how long a run waits for a worker able to take tasks
NO_SPILL = {  # a worker that pauses at 80 % of its limit and never spills or is terminated: nothing ends the pause
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "False",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("failures")
    (root / "job.yaml").write_text(yaml.safe_dump(JOB))
    (root / "long.yaml").write_text(yaml.safe_dump({**JOB, "name": "long", "epochs": 40}))
    (root / "cluster.yaml").write_text(
        f"connect_timeout: {PATIENCE}\n"
        'local: {n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB, dashboard_address: "127.0.0.1:0"}\n'
    )
    return root


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[Callable[..., DaskCluster]]:
    """``new_cluster(*worker_extra, nanny=..., env=...)``: a scheduler and one worker with those arguments."""
    started: list[DaskCluster] = []

    def new(*extra: str, nanny: bool = True, env: dict[str, str] | None = None) -> DaskCluster:
        # one death is enough to give a task up (KilledWorker): the test needs no four restarts
        cluster = DaskCluster(tmp_path / f"cluster{len(started)}")
        started.append(cluster)
        cluster.start_scheduler(env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
        cluster.add_worker(nanny=nanny, env=env, extra=extra)
        return cluster

    yield new
    for cluster in started:
        cluster.stop()


def run_args(files: Path, store: str, run_dir: Path, *more: str, job: str = "job.yaml") -> list[str]:
    cluster = str(files / "cluster.yaml")
    return ["run", str(files / job), "--cluster", cluster, "--store", store, "--out", str(run_dir), *more]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, f"stderr is not one line:\n{stderr}"
    return lines[0]


def assert_nothing_finished(run_dir: Path) -> None:
    for name in ("metrics.json", "report.html", "dask-performance.html"):
        assert not (run_dir / name).exists(), name


# --- workers that cannot run the job: exit 3 with the reason ---------------------------------------------------------


def test_tasks_killed_with_workers_out_of_memory_say_so_and_what_to_raise(
    files: Path, kgrid_store: tuple[str, IdxDataset], new_cluster: Callable[..., DaskCluster], tmp_path: Path
) -> None:
    """A worker that fits in 200 MB until the job's first task: the nanny restarts it for memory, the task is given
    up. ``--resume`` on that cluster would die the same way: the line says to give the workers memory first."""
    cluster = new_cluster("--memory-limit", "200MB")
    cluster.wait_for_workers(1)
    run_dir = tmp_path / "run"
    proc = run_cli(*run_args(files, kgrid_store[0], run_dir, "--scheduler", cluster.address), timeout=120)
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("cluster error: workers exceeded their memory limit (190.73 MiB)"), line
    assert "give the workers more memory (--memory-limit), then continue with: mnist-kmeans run" in line, line
    assert f"--resume {run_dir}" in line
    assert_nothing_finished(run_dir)


def test_workers_restarted_for_memory_at_start_exit_3_saying_so(
    files: Path, kgrid_store: tuple[str, IdxDataset], new_cluster: Callable[..., DaskCluster], tmp_path: Path
) -> None:
    """A limit below what a worker process needs to start: the nanny restarts it over and over, whether it has
    registered by then (the run's watch finds no worker left) or not (none joins within connect_timeout)."""
    cluster = new_cluster("--memory-limit", "1MB")
    t0 = time.monotonic()
    proc = run_cli(*run_args(files, kgrid_store[0], tmp_path / "run", "--scheduler", cluster.address), timeout=120)
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("cluster error: "), line
    assert "workers exceeded their memory limit" in line and "give the workers more memory" in line, line
    assert time.monotonic() - t0 < 60
    assert_nothing_finished(tmp_path / "run")


def test_every_worker_paused_mid_run_exits_3_instead_of_waiting_forever(
    files: Path, kgrid_store: tuple[str, IdxDataset], new_cluster: Callable[..., DaskCluster], tmp_path: Path
) -> None:
    """The one worker passes its memory pause threshold once the job runs (ballast this test puts in it): it runs
    no task any more, and nothing (no spilling, no nanny) will end that; the run gives up after connect_timeout."""
    cluster = new_cluster("--memory-limit", "1GiB", nanny=False, env=NO_SPILL)
    cluster.wait_for_workers(1)
    run_dir = tmp_path / "run"
    args = run_args(files, kgrid_store[0], run_dir, "--scheduler", cluster.address, job="long.yaml")
    run = LiveRun.start(args, tmp_path / "logs" / "run")
    wait_for_stdout(run, "dashboard:")
    with cluster.client() as client:
        client.run(exec, BALLAST)
    t0 = time.monotonic()
    returncode, _, stderr = run.finish(timeout=60)
    assert returncode == 3, stderr
    line = one_line(stderr)
    assert line.startswith(f"cluster error: every worker has been paused for {PATIENCE} s"), line
    assert "give the workers more memory (--memory-limit), then continue with: mnist-kmeans run" in line, line
    assert time.monotonic() - t0 < 30
    assert_nothing_finished(run_dir)


# Run on a worker (by exec: the worker cannot import this module): 900 MiB held for the life of its process,
# touched, so that they count as its memory.
BALLAST = "import builtins, numpy; builtins.mnist_kmeans_test_ballast = numpy.ones(900 * 2**20, dtype=numpy.uint8)"


def wait_for_stdout(run: LiveRun, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.out.read_text():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.err.read_text()
        time.sleep(0.02)


# --- Ctrl-C: exit 130, one line --------------------------------------------------------------------------------------


def cluster_starting(run: LiveRun) -> None:
    """Until the run has started its first child process (multiprocessing's resource tracker, as the LocalCluster
    makes its nannies, before their worker processes): the LocalCluster is starting."""
    import psutil

    deadline = time.monotonic() + 120
    while not psutil.Process(run.proc.pid).children():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.err.read_text()
        time.sleep(0.01)


def send_sigint(run: LiveRun, group: bool) -> None:
    if group:
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        run.proc.send_signal(signal.SIGINT)


@pytest.mark.parametrize(
    ("moment", "wait", "group"),
    [
        # `kill -INT` of the run alone while its LocalCluster starts (it used to be cut in half)
        ("cluster starting", cluster_starting, False),
        # a terminal's Ctrl-C, to the process group: the cluster's worker processes get it too
        ("dashboard shown", lambda run: wait_for_stdout(run, "dashboard:"), True),
    ],
)
def test_ctrl_c_exits_130_with_one_line(
    moment: str,
    wait: Callable[[LiveRun], None],
    group: bool,
    files: Path,
    kgrid_store: tuple[str, IdxDataset],
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    run = LiveRun.start(run_args(files, kgrid_store[0], run_dir, job="long.yaml"), tmp_path / "logs" / "run")
    wait(run)
    send_sigint(run, group)
    returncode, _, stderr = run.finish(timeout=60)
    assert returncode == 130, f"{moment}: exit {returncode}\n{stderr}"
    assert one_line(stderr).startswith("interrupted"), stderr
    assert_nothing_finished(run_dir)


def test_a_port_held_by_another_program_is_exit_3_not_a_hang(
    files: Path, kgrid_store: tuple[str, IdxDataset], tmp_path: Path
) -> None:
    """Something accepts connections there but never speaks Dask: distributed's client would wait for its handshake
    for ever; `run` gives up after connect_timeout."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        proc = run_cli(*run_args(files, kgrid_store[0], tmp_path / "run", "--scheduler", address), timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr
    assert address in lines[0] and "no answer as a Dask scheduler" in lines[0]
    assert time.monotonic() - t0 < 30 and not (tmp_path / "run").exists()
