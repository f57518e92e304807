"""Stores on S3 object storage (README, "Object storage"): a real SeaweedFS S3 gateway on loopback (the session's
``s3_server``, started by scripts/s3-server.sh), the command line in child processes, real ``dask worker`` processes.

The credentials reach the client through a cluster file's ``storage:`` section only (no ``AWS_*`` variable is set
for any process of these tests), and the workers get them with the tasks: they are started without any. The secret
must then appear in no output: every file of the run directory, stdout, stderr and the workers' logs are searched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tests.helpers import REPO_ROOT, DaskCluster, IdxDataset, LiveRun, S3Server, chain_progress, write_idx_dataset

K_GRID = (3, 5)
EPOCHS = 4
JOB = {"name": "s3", "k_grid": list(K_GRID), "epochs": EPOCHS, "batch_size": 100, "n_init": 1, "lloyd_steps": 1}
TIMEOUT = 240
# the standard places of credentials and endpoint, none of which these tests set (AWS_CA_BUNDLE may stay)
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE")
NO_AWS = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}


def cli(*args: str, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """The command line without any AWS_* variable: credentials come from the cluster file or not at all."""
    env = {**NO_AWS, "PYTHONUNBUFFERED": "1", "HOME": str(cwd)}  # no ~/.aws either
    return subprocess.run(
        [sys.executable, "-m", "mnist_kmeans", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def cluster_file(path: Path, server: S3Server, scheduler: str | None = None, **creds: str) -> Path:
    data: dict = {"storage": server.options(**creds)}
    if scheduler:
        data["scheduler"] = scheduler
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def finals(run_dir: Path) -> dict[int, np.ndarray]:
    group = zarr.open_group(str(run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    return {k: np.asarray(group[f"final/k{k}"][...]) for k in K_GRID}


def assert_same_centroids(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    for k in K_GRID:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), f"K={k}"


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@dataclass
class S3Setup:
    root: Path
    data: IdxDataset
    url: str  # the data ingested to S3
    local: str  # the same data ingested to a local store
    cfg: Path  # a cluster file of the server's storage options


@pytest.fixture(scope="module")
def s3(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Setup:
    root = tmp_path_factory.mktemp("object-storage")
    data = write_idx_dataset(root / "idx", n_train=1200, n_test=200, h=8, w=8, n_classes=4, seed=3)
    cfg = cluster_file(root / "storage.yaml", s3_server)
    url, local = "s3://test/small.zarr", str(root / "small.zarr")
    for store in (url, local):
        proc = cli("ingest", "--source", str(data.directory), "--store", store, "--chunk-rows", "200", "--cluster",
                   str(cfg), cwd=root)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    return S3Setup(root, data, url, local, cfg)


def test_ingest_to_s3_with_the_cluster_files_storage_options(s3: S3Setup, s3_server: S3Server) -> None:
    """The store on S3 is complete and holds the data; ingesting it again is a no-op, other data is refused."""
    from mnist_kmeans.data.store import open_store, read_rows

    info = open_store(s3.url, s3_server.options())
    assert (info.n_train, info.n_test, info.chunk_rows, info.n_classes) == (1200, 200, 200, 4)
    images, labels = read_rows(s3.url, "train", 0, 1200, s3_server.options())
    assert np.array_equal(images, s3.data.train_images.reshape(1200, 64))
    assert np.array_equal(labels, s3.data.train_labels)
    again = cli("ingest", "--source", str(s3.data.directory), "--store", s3.url, "--cluster", str(s3.cfg), cwd=s3.root)
    assert again.returncode == 0 and "already holds this data" in again.stderr, again.stderr
    other = write_idx_dataset(s3.root / "other", n_train=300, n_test=50, h=8, w=8, n_classes=4, seed=4)
    proc = cli("ingest", "--source", str(other.directory), "--store", s3.url, "--cluster", str(s3.cfg), cwd=s3.root)
    assert proc.returncode == 2 and "use --force" in one_error_line(proc)
    assert open_store(s3.url, s3_server.options()).ingest_id == info.ingest_id  # untouched


def _aws_variables() -> tuple[str, ...]:
    return tuple(k for k in os.environ if k in CREDENTIALS)


@pytest.fixture(scope="module")
def workers(s3: S3Setup) -> Iterator[DaskCluster]:
    """Two workers in their own directories, without credentials and without a chunk cache: every task reads S3."""
    cluster = DaskCluster(s3.root / "cluster").start_scheduler(env={"HOME": str(s3.root)})
    for _ in range(2):
        cluster.add_worker(env={"MNIST_KMEANS_CHUNK_CACHE_MB": "0", "HOME": str(s3.root / "cluster")})
    cluster.wait_for_workers(2)
    with cluster.client() as client:  # they inherit this process's environment: it must hold no credentials
        assert set(client.run(_aws_variables).values()) == {()}
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def job(s3: S3Setup) -> Path:
    path = s3.root / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


@pytest.fixture(scope="module")
def reference(s3: S3Setup, job: Path, workers: DaskCluster) -> dict[int, np.ndarray]:
    """The job on the local store, on the same workers."""
    run_dir = s3.root / "run-local"
    proc = cli("run", str(job), "--store", s3.local, "--scheduler", workers.address, "--out", str(run_dir), cwd=s3.root)
    assert proc.returncode == 0, proc.stderr
    return finals(run_dir)


def test_run_from_s3_on_external_workers_matches_the_local_store_and_shows_no_secret(
    s3: S3Setup, s3_server: S3Server, job: Path, workers: DaskCluster, reference: dict[int, np.ndarray]
) -> None:
    """The workers get the URL and, with the tasks, the storage options: the centroids are those of the local store,
    bit for bit, and the secret is in no file of the run, no output line and no worker's log."""
    run_dir = s3.root / "run-s3"
    cfg = cluster_file(s3.root / "cluster-s3.yaml", s3_server, scheduler=workers.address)
    proc = cli("run", str(job), "--cluster", str(cfg), "--store", s3.url, "--out", str(run_dir), cwd=s3.root)
    assert proc.returncode == 0, proc.stderr
    assert_same_centroids(finals(run_dir), reference)
    assert (run_dir / "dask-performance.html").is_file()
    assert s3.url in (run_dir / "manifest.json").read_text()
    for text in (proc.stdout, proc.stderr):
        assert s3_server.secret not in text
    assert files_holding(run_dir, s3_server.secret) == []
    assert files_holding(workers.root, s3_server.secret) == []


def test_s3_server_stopped_mid_run_then_resume_gives_the_same_centroids(
    s3: S3Setup, s3_server: S3Server, job: Path, workers: DaskCluster, reference: dict[int, np.ndarray]
) -> None:
    run_dir = s3.root / "run-outage"
    cfg = cluster_file(s3.root / "cluster-outage.yaml", s3_server, scheduler=workers.address)
    args = ["run", str(job), "--cluster", str(cfg), "--store", s3.url]
    run = LiveRun.start([*args, "--out", str(run_dir)], s3.root / "outage", env={"HOME": str(s3.root)})
    try:
        progress = run.wait_for_epoch(run_dir)
        s3_server.stop()
        rc, _, err = run.finish(TIMEOUT)
    finally:
        s3_server.start()
    assert progress and any(e < EPOCHS for e, _ in progress.values()), f"the outage did not land mid-run: {progress}"
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("dashboard", "progress"))]
    assert rc in (2, 3), err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert s3.url in lines[0] and s3_server.secret not in err, lines[0]
    assert any(e < EPOCHS for e, _ in chain_progress(run_dir).values())
    proc = cli(*args, "--resume", str(run_dir), cwd=s3.root)
    assert proc.returncode == 0, proc.stderr
    assert_same_centroids(finals(run_dir), reference)
    assert files_holding(run_dir, s3_server.secret) == []


@pytest.mark.parametrize("command", ["ingest", "run"])
def test_wrong_secret_is_exit_2_one_line_without_the_secret(
    command: str, s3: S3Setup, s3_server: S3Server, job: Path, tmp_path: Path
) -> None:
    wrong = "not-the-secret-9f8e7d"
    cfg = cluster_file(tmp_path / "wrong.yaml", s3_server, secret=wrong)
    if command == "ingest":
        proc = cli("ingest", "--source", str(s3.data.directory), "--store", s3.url, "--cluster", str(cfg), cwd=tmp_path)
    else:
        proc = cli(
            "run", str(job), "--cluster", str(cfg), "--store", s3.url, "--out", str(tmp_path / "r"), cwd=tmp_path
        )
    line = one_error_line(proc)
    assert proc.returncode == 2, proc.stderr
    assert line.startswith(f"error: {s3.url}: access denied") and "storage: section" in line, line
    assert wrong not in proc.stderr + proc.stdout and s3_server.secret not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_read_only_credentials_refuse_writes_and_change_nothing(
    s3: S3Setup, s3_server: S3Server, tmp_path: Path
) -> None:
    from mnist_kmeans.data.store import open_store, read_attrs

    ro = cluster_file(tmp_path / "ro.yaml", s3_server, key=s3_server.ro_key)
    before = open_store(s3.url, s3_server.options()).ingest_id
    for store, more in (("s3://test/new-ro.zarr", []), (s3.url, ["--force"])):
        proc = cli("ingest", "--source", str(s3.data.directory), "--store", store, "--cluster", str(ro), *more,
                   cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert one_error_line(proc).endswith("these credentials may not write"), proc.stderr
    assert read_attrs("s3://test/new-ro.zarr", s3_server.options()) is None
    assert open_store(s3.url, s3_server.options()).ingest_id == before  # still complete, the same build


def test_a_second_writer_rebuilding_the_store_stops_the_first_before_complete(s3: S3Setup, s3_server: S3Server) -> None:
    """Object stores have no lock: writer A's store (its ingest_id) is rebuilt in place by writer B (an ingest of an
    incomplete store); A's check before ``complete: true`` sees that and refuses, and B's store is complete."""
    from mnist_kmeans.data.store import check_writer, create_store, open_store
    from mnist_kmeans.errors import UserError

    url, opts = "s3://test/raced.zarr", s3_server.options()
    create_store(url, {"ingest_id": "a" * 32}, options=opts)  # writer A has begun
    check_writer(url, "a" * 32, opts)  # still A's own
    proc = cli("ingest", "--source", str(s3.data.directory), "--store", url, "--cluster", str(s3.cfg), cwd=s3.root)
    assert proc.returncode == 0 and "rebuilding" in proc.stderr, proc.stderr  # writer B
    with pytest.raises(UserError, match="another ingest or augment wrote this store meanwhile"):
        check_writer(url, "a" * 32, opts)
    assert open_store(url, opts).ingest_id != "a" * 32


def test_s3_server_script_binds_loopback_only(s3_server: S3Server) -> None:
    import psutil

    pid = int((s3_server.root / "weed.pid").read_text())
    listening = {
        (c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"
    }
    assert (("127.0.0.1", s3_server.port)) in listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert (REPO_ROOT / "scripts" / "s3-server.sh").is_file()


def test_augment_from_s3_to_s3_on_workers_given_the_options_with_the_tasks(
    s3: S3Setup, s3_server: S3Server, workers: DaskCluster
) -> None:
    """Each chunk is read and written on a worker without credentials of its own; the new store is complete."""
    from mnist_kmeans.data.store import open_store

    out = "s3://test/augmented.zarr"
    cfg = cluster_file(s3.root / "cluster-augment.yaml", s3_server, scheduler=workers.address)
    proc = cli("augment", "--store", s3.url, "--out", out, "--rows", "500", "--cluster", str(cfg), cwd=s3.root)
    assert proc.returncode == 0, proc.stderr
    info = open_store(out, s3_server.options())
    assert (info.n_train, info.n_test, info.augmented_from["store"]) == (500, 200, s3.url)
    assert s3_server.secret not in proc.stdout + proc.stderr
    again = cli("augment", "--store", s3.url, "--out", out, "--rows", "500", "--cluster", str(cfg), cwd=s3.root)
    assert again.returncode == 2 and "a complete store is already there" in one_error_line(again)


def test_cluster_file_storage_values_are_checked_and_never_echoed(tmp_path: Path) -> None:
    from mnist_kmeans.config import load_cluster
    from mnist_kmeans.errors import UserError

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"storage": {"key": "k", "client_kwargs": {"region_name": "x"}}}))
    assert load_cluster(path).storage == {"key": "k", "client_kwargs": {"region_name": "x"}}
    assert "'k'" not in repr(load_cluster(path))  # the options are left out of its repr
    path.write_text(yaml.safe_dump({"storage": {"secret": ["hidden-value-123"]}}))
    with pytest.raises(UserError, match=r"storage\.secret: must be a string") as caught:
        load_cluster(path)
    assert "hidden-value-123" not in str(caught.value)
