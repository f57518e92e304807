"""``kind: slurm``: workers launched by a real SLURM (scripts/slurm.sh, a single node on this machine) through
dask-jobqueue, as a user runs it: ``mnist-kmeans run`` with a cluster file, in a child process.

The SLURM is the one of ``$SLURM_CONF`` (``.ci/run`` starts it); without it, this module starts its own with the
script, and stops it after. SLURM not installed is a failure, not a skip: ``bash scripts/slurm.sh install``.
Each run's worker jobs are known by their log files (``slurm.log_directory``: ``dask-worker-<job id>.err``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tests.helpers import REPO_ROOT, LiveRun, chain_progress, make_small_store, run_cli

SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm.sh"
K_GRID = (4, 6)
JOB = {"name": "slurm-test", "k_grid": list(K_GRID), "epochs": 12, "batch_size": 100, "n_init": 2, "seed": 3}
# Long enough that a cancelled job is replaced (a second to notice, a few to start one) while the fit goes on.
LONG_JOB = {**JOB, "name": "slurm-long", "epochs": 80}
RUN_TIMEOUT = 180
# A lost worker's job is replaced once distributed has given up on the worker (default 15 s): sooner, for the test.
FAST_REPLACE = {"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "1s"}


def _sinfo_ok() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The SLURM_CONF of a running single-node SLURM: the environment's, or one started here."""
    conf = os.environ.get("SLURM_CONF")
    if conf and Path(conf).is_file() and _sinfo_ok():
        yield conf
        return
    if shutil.which("slurmctld") is None:
        pytest.fail("SLURM is not installed here: bash scripts/slurm.sh install (or run bash .ci/run)")
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(SLURM_SCRIPT), "start", str(state)], check=True, capture_output=True, timeout=60)
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")  # the runs below are children: they inherit it
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop", str(state)], capture_output=True, timeout=60)
        if conf is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = conf


@dataclass
class Setup:
    root: Path
    job: Path
    long_job: Path
    store: str

    def cluster_file(self, name: str, **slurm: object) -> tuple[Path, Path]:
        """A ``kind: slurm`` cluster file, and the directory its jobs log to."""
        logs = self.root / f"{name}-logs"
        section = {"n_workers": 2, "cores": 1, "memory": "1GiB", "walltime": "00:10:00", **slurm}
        text = {"kind": "slurm", "connect_timeout": 60, "slurm": {**section, "log_directory": str(logs)}}
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(text))
        return path, logs

    def args(self, cluster: Path, run_dir: Path, job: Path | None = None) -> list[str]:
        job_file = str(job or self.job)
        return ["run", job_file, "--cluster", str(cluster), "--store", self.store, "--out", str(run_dir)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("slurm-runs")
    store, _ = make_small_store(root)
    job, long_job = root / "job.yaml", root / "long.yaml"
    job.write_text(yaml.safe_dump(JOB))
    long_job.write_text(yaml.safe_dump(LONG_JOB))
    return Setup(root, job, long_job, store)


def embedded_run(setup: Setup, name: str, job: Path | None = None) -> dict[int, np.ndarray]:
    """A job's final centroids on the embedded LocalCluster (two worker processes, as the SLURM runs have)."""
    cluster = setup.root / "local.yaml"
    cluster.write_text(yaml.safe_dump({"local": {"n_workers": 2, "memory_limit": "1GiB", "dashboard_address": ":0"}}))
    run_dir = setup.root / name
    proc = run_cli(*setup.args(cluster, run_dir, job), timeout=RUN_TIMEOUT, cwd=setup.root)
    assert proc.returncode == 0, proc.stderr
    return finals(run_dir)


@pytest.fixture(scope="module")
def embedded_finals(setup: Setup) -> dict[int, np.ndarray]:
    return embedded_run(setup, "run-local")


def finals(run_dir: Path) -> dict[int, np.ndarray]:
    group = zarr.open_group(str(run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    return {k: np.asarray(group[f"final/k{k}"][...]) for k in K_GRID}


def assert_same_centroids(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> None:
    for k in K_GRID:
        assert a[k].dtype == b[k].dtype == np.float32
        assert np.array_equal(a[k], b[k]), f"K={k}: max difference {np.abs(a[k] - b[k]).max()}"


def job_ids(logs: Path) -> set[str]:
    """The SLURM jobs that ran a worker, from their log files."""
    return {p.stem.rpartition("-")[2] for p in logs.glob("dask-worker-*.err")}


def queued(ids: set[str]) -> set[str]:
    """Which of ``ids`` squeue still lists (running, pending or completing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30, check=True).stdout
    return ids & set(out.split())


def assert_jobs_leave(ids: set[str], within: float = 20) -> None:
    """Every job of ``ids`` leaves squeue within ``within`` seconds (a cancelled job is "completing" for a moment)."""
    deadline = time.monotonic() + within
    while queued(ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not queued(ids), f"jobs left in squeue: {sorted(queued(ids))}"


def test_slurm_workers_give_the_centroids_of_the_embedded_cluster(
    slurm: str, setup: Setup, embedded_finals: dict[int, np.ndarray]
) -> None:
    cluster, logs = setup.cluster_file("plain", dashboard_address="127.0.0.1:0")
    run_dir = setup.root / "run-slurm"
    proc = run_cli(*setup.args(cluster, run_dir), timeout=RUN_TIMEOUT, cwd=setup.root)
    assert proc.returncode == 0, proc.stderr
    assert_same_centroids(finals(run_dir), embedded_finals)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("dashboard: http://127.0.0.1:"), lines  # the dashboard on loopback, said first
    metrics = yaml.safe_load((run_dir / "metrics.json").read_text())
    assert (metrics["cluster"]["n_workers"], metrics["cluster"]["threads"]) == (2, 2)
    ids = job_ids(logs)
    assert len(ids) == 2, ids  # one job per worker (cores: 1, processes: 1)
    assert_jobs_leave(ids)  # run closed its cluster: no job left behind


def test_a_cancelled_worker_job_is_replaced_and_the_centroids_stay(slurm: str, setup: Setup) -> None:
    cluster, logs = setup.cluster_file("scancel", dashboard_address="127.0.0.1:0")
    run_dir = setup.root / "run-scancel"
    live = LiveRun.start(setup.args(cluster, run_dir, setup.long_job), setup.root / "scancel-run", env=FAST_REPLACE)
    try:
        assert live.wait_for_epoch(run_dir, timeout=RUN_TIMEOUT), "the run ended before its first epoch"
        first = job_ids(logs)
        assert len(first) == 2, first
        victim = min(first)
        subprocess.run(["scancel", victim], check=True, timeout=30)
        unfinished = [k for k, (e, _) in chain_progress(run_dir).items() if e < LONG_JOB["epochs"]]
        deadline = time.monotonic() + 60
        while not job_ids(logs) - first and live.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        replaced = job_ids(logs) - first
    finally:
        code, out, err = live.finish(timeout=RUN_TIMEOUT)
    assert unfinished, "the fit was done before the scancel: make the job longer"
    assert replaced, f"no job replaced the cancelled {victim} while the run went on (exit {code}: {err})"
    assert code == 0, err
    assert_same_centroids(finals(run_dir), embedded_run(setup, "run-local-long", setup.long_job))
    assert_jobs_leave(first | replaced)


def test_a_request_slurm_refuses_exits_3_with_one_line(slurm: str, setup: Setup) -> None:
    cluster, logs = setup.cluster_file("refused", memory="100000GiB")  # more than the node has
    run_dir = setup.root / "run-refused"
    proc = run_cli(*setup.args(cluster, run_dir), timeout=RUN_TIMEOUT, cwd=setup.root)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "SLURM refused" in lines[0] and "--mem=100000G" in lines[0], lines[0]
    assert "Requested node configuration is not available" in lines[0], lines[0]  # SLURM's reason
    assert not job_ids(logs)  # nothing was submitted


def test_a_bad_slurm_section_exits_2_naming_the_key(setup: Setup) -> None:
    cluster, _ = setup.cluster_file("bad", walltime="half an hour")
    proc = run_cli(*setup.args(cluster, setup.root / "run-bad"), cwd=setup.root)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{cluster}: slurm.walltime" in lines[0], lines
    assert not (setup.root / "run-bad").exists()


def test_augment_on_slurm_workers_writes_the_bytes_of_the_embedded_cluster(slurm: str, setup: Setup) -> None:
    cluster, logs = setup.cluster_file("augment", dashboard_address="127.0.0.1:0")
    local = setup.root / "local-augment.yaml"  # one worker: another cluster shape, and still the same bytes
    local.write_text(yaml.safe_dump({"local": {"n_workers": 1, "memory_limit": "1GiB", "dashboard_address": ":0"}}))
    stores = {}
    for name, file in (("slurm", cluster), ("local", local)):
        out = setup.root / f"augmented-{name}.zarr"
        args = ["augment", "--store", setup.store, "--out", str(out), "--rows", "300", "--cluster", str(file)]
        proc = run_cli(*args, timeout=RUN_TIMEOUT, cwd=setup.root)
        assert proc.returncode == 0, proc.stderr
        stores[name] = zarr.open_group(str(out), mode="r")
    assert np.array_equal(stores["slurm"]["train/images"][...], stores["local"]["train/images"][...])
    assert len(job_ids(logs)) == 2  # the deformations were made on the SLURM jobs' workers
    assert_jobs_leave(job_ids(logs))


def test_store_on_s3_workers_from_slurm_together(
    slurm: str, setup: Setup, embedded_finals: dict[int, np.ndarray], s3_server
) -> None:
    """The issue's whole path: the store in object storage, the workers SLURM jobs, the credentials only in the
    cluster file's ``storage:`` section (the jobs get them with the tasks). Same centroids as the embedded cluster
    on a local store of the same data, and the secret in no file of the run directory nor any output."""
    cluster, logs = setup.cluster_file("s3", dashboard_address="127.0.0.1:0")
    text = yaml.safe_load(cluster.read_text())
    cluster.write_text(yaml.safe_dump({**text, "storage": s3_server.options()}))
    url = "s3://test/slurm-run.zarr"
    source = ["--source", str(setup.root / "idx"), "--chunk-rows", "64"]  # as make_small_store chunks it
    ingest = run_cli("ingest", *source, "--store", url, "--cluster", str(cluster))
    assert ingest.returncode == 0, ingest.stderr
    run_dir = setup.root / "run-s3-slurm"
    args = ["run", str(setup.job), "--cluster", str(cluster), "--store", url, "--out", str(run_dir)]
    proc = run_cli(*args, timeout=RUN_TIMEOUT, cwd=setup.root)
    assert proc.returncode == 0, proc.stderr
    assert_same_centroids(finals(run_dir), embedded_finals)
    secret = s3_server.secret
    assert secret not in proc.stdout + proc.stderr + ingest.stderr
    written = [p for root in (run_dir, logs) for p in root.rglob("*") if p.is_file()]  # the jobs' logs too
    leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert_jobs_leave(job_ids(logs))
