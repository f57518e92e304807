"""`mnist-kmeans run`: the distributed K-grid job end to end, on real clusters (docs/contract.md, "Commands",
"Run directory").

Everything is real: a Zarr store made by the package's ingest, the command line in a child process, an embedded
``LocalCluster`` or a ``dask scheduler`` + two ``dask worker`` processes on 127.0.0.1, run directories in tmp_path.
The job is tiny (3,000 rows of 10x10, K = 3 and 6, two restarts each) so that the whole module takes about two
minutes on two cores; most of that is starting Python, the cluster and the workers' imports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from sklearn import metrics as skm

from mnist_kmeans.cli import main
from tests.helpers import (
    REPO_ROOT,
    IdxDataset,
    chain_progress,
    loopback_port,
    run_cli,
    stop_session,
    tree_snapshot,
    worker_args,
)

K_GRID = (3, 6)
EPOCHS = 4
RESTARTS = 2
LLOYD_STEPS = 1
SCREEN_ROWS = 1000  # restarts compared after 2 of the 6 training chunks
SEED = 3
CLUSTER_FILE = 'local: {n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB, dashboard_address: "127.0.0.1:0"}\n'
CONTRACT_RESULT_KEYS = {
    "k",
    "inertia",
    "homogeneity",
    "completeness",
    "v_measure",
    "ari",
    "nmi",
    "accuracy_train",
    "accuracy_test",
    "n_empty_clusters",
    "epochs",
    "fit_seconds",
    "fit_rows",
    "calinski_harabasz",
    "davies_bouldin",
    "silhouette_sample",
    "restart_ari_mean",
    "restart_ari_min",
}
CONTRACT_FLOAT_KEYS = sorted(CONTRACT_RESULT_KEYS - {"k", "n_empty_clusters", "epochs", "fit_rows"})
CONTRACT_K_SELECTION = {
    "calinski_harabasz",
    "davies_bouldin",
    "silhouette_sample",
    "inertia_knee",
    "recommended",
    "agree",
    "silhouette_sample_rows",
}
CONTRACT_TIMINGS = {"cluster_start_s", "ingest_s", "fit_s", "evaluate_s", "report_s", "total_s"}
CONTRACT_CLUSTER = {"scheduler", "n_workers", "threads", "dashboard"}
RUN_TIMEOUT = 240


def job_text(name: str = "kgrid-test", epochs: int = EPOCHS, **extra: object) -> str:
    job = {
        "name": name,
        "k_grid": list(K_GRID),
        "epochs": epochs,
        "batch_size": 100,
        "n_init": RESTARTS,
        "lloyd_steps": LLOYD_STEPS,
        "screen_rows": SCREEN_ROWS,
        "seed": SEED,
        "report": {"centroid_grids": [6]},
        **extra,
    }
    return yaml.safe_dump(job, sort_keys=False)


@dataclass
class Setup:
    root: Path
    job: Path
    cluster: Path
    store: str
    data: IdxDataset

    def run_args(self, job: Path | None = None, *more: str) -> list[str]:
        return ["run", str(job or self.job), "--cluster", str(self.cluster), "--store", self.store, *more]


@dataclass
class Run:
    run_dir: Path
    proc: subprocess.CompletedProcess[str]
    seconds: float


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, kgrid_store: tuple[str, IdxDataset]) -> Setup:
    root = tmp_path_factory.mktemp("kgrid-run")
    job = root / "job.yaml"
    job.write_text(job_text())
    cluster = root / "cluster.yaml"
    cluster.write_text(CLUSTER_FILE)
    return Setup(root, job, cluster, kgrid_store[0], kgrid_store[1])


def run_job_cli(setup: Setup, run_dir: Path, *more: str, job: Path | None = None) -> Run:
    t0 = time.perf_counter()
    proc = run_cli(*setup.run_args(job, "--out", str(run_dir), *more), timeout=RUN_TIMEOUT)
    return Run(run_dir, proc, time.perf_counter() - t0)


def finals(run_dir: Path) -> dict[int, np.ndarray]:
    group = zarr.open_group(str(run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    return {k: np.asarray(group[f"final/k{k}"][...]) for k in K_GRID}


def assert_ok(run: Run) -> None:
    assert run.proc.returncode == 0, (
        f"exit {run.proc.returncode}\nstdout:\n{run.proc.stdout}\nstderr:\n{run.proc.stderr}"
    )


def assert_same_centroids(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> None:
    assert set(a) == set(b) == set(K_GRID)
    for k in K_GRID:
        assert a[k].dtype == b[k].dtype == np.float32
        assert np.array_equal(a[k], b[k]), f"K={k}: max difference {np.abs(a[k] - b[k]).max()}"


@pytest.fixture(scope="module")
def local_run(setup: Setup) -> Run:
    """(a) The job on the embedded LocalCluster of a cluster file, through the command line."""
    run = run_job_cli(setup, setup.root / "run-local")
    assert_ok(run)
    return run


# --- (a) one run on a LocalCluster: output, files, schemas --------------------------------------------------------


def test_run_prints_dashboard_then_report_path(local_run: Run) -> None:
    lines = local_run.proc.stdout.strip().splitlines()
    assert Path(lines[-1]) == local_run.run_dir / "report.html"  # the last line: the report's path
    dash = [i for i, line in enumerate(lines) if line.startswith("dashboard: http://")]
    assert dash and dash[0] < len(lines) - 1, lines
    url = lines[dash[0]].split(" ", 1)[1]
    metrics = json.loads((local_run.run_dir / "metrics.json").read_text())
    assert metrics["cluster"]["dashboard"] == url
    assert "Traceback" not in local_run.proc.stderr


def test_run_directory_holds_every_file(local_run: Run, setup: Setup) -> None:
    d = local_run.run_dir
    for name in (
        "report.html",
        "metrics.json",
        "label_maps.json",
        "dask-performance.html",
        "job.yaml",
        "manifest.json",
    ):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    assert (d / "centroids.zarr").is_dir()
    pngs = sorted((d / "figures").glob("*.png"))
    assert pngs, "no figures"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png.name
    assert not list(d.rglob("*.tmp")), "a temporary file was left behind"
    report = (d / "report.html").read_text(encoding="utf-8")
    assert "<html" in report.lower() and "dask-performance.html" in report
    perf = (d / "dask-performance.html").read_text(encoding="utf-8")
    assert "<html" in perf.lower() and "Bokeh" in perf
    # inline: opens offline (no script or style sheet fetched from a server; a favicon link does not matter)
    assert not re.search(r"<script\b[^>]*\bsrc=[\"']?(https?:)?//", perf, re.IGNORECASE)
    assert not re.search(r"<link\b[^>]*\brel=[\"']?stylesheet[^>]*\bhref=[\"']?(https?:)?//", perf, re.IGNORECASE)


def test_centroids_zarr_layout(local_run: Run, setup: Setup) -> None:
    group = zarr.open_group(str(local_run.run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    n_features = setup.data.train_images.shape[1] * setup.data.train_images.shape[2]
    metrics = json.loads((local_run.run_dir / "metrics.json").read_text())
    chosen = {row["k"]: row["restart"] for row in metrics["results"]}
    for k in K_GRID:
        final, epochs = group[f"final/k{k}"], group[f"epochs/k{k}"]
        assert final.dtype == np.float32 and final.shape == (k, n_features)
        assert epochs.dtype == np.float32 and epochs.shape == (EPOCHS, k, n_features)
        f, e = final[...], epochs[...]
        assert np.isfinite(f).all() and f.min() >= 0 and f.max() <= 1  # pixel scale [0, 1]
        assert np.isfinite(e).all() and e.min() >= 0 and e.max() <= 1
        # epochs/k{K} is the chosen restart's checkpoint after each epoch, and the final model follows from it
        assert np.array_equal(e, group[f"chains/k{k}/r{chosen[k]}/centers"][...])
        assert not np.array_equal(e[0], e[-1])
        # only the restart that won the screening went on: it alone has a chain, with every epoch and Lloyd step
        assert sorted(name for name, _ in group[f"chains/k{k}"].groups()) == [f"r{chosen[k]}"]
        attrs = group[f"chains/k{k}/r{chosen[k]}"].attrs
        assert attrs["epochs_done"] == EPOCHS and attrs["lloyd_done"] == LLOYD_STEPS
        screen = next(row["restart_inertia"] for row in metrics["results"] if row["k"] == k)
        assert len(screen) == RESTARTS and attrs["screen_inertia"] == screen
        assert chosen[k] == int(np.argmin(screen))


def nearest(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = ((x[:, None, :] - centers.astype(np.float64)[None]) ** 2).sum(-1)
    labels = d.argmin(1)
    return labels, d[np.arange(len(x)), labels]


def test_metrics_json_schema_and_values(local_run: Run, setup: Setup) -> None:
    d = local_run.run_dir
    metrics = json.loads((d / "metrics.json").read_text())
    data = setup.data
    assert metrics["job"] == "kgrid-test"
    assert metrics["dataset"]["store"] == setup.store
    assert (metrics["dataset"]["n_train"], metrics["dataset"]["n_test"], metrics["dataset"]["n_classes"]) == (
        3000,
        500,
        5,
    )
    results = metrics["results"]
    assert [row["k"] for row in results] == sorted(K_GRID)  # one entry per K, ascending
    for row in results:
        assert set(row) >= CONTRACT_RESULT_KEYS, CONTRACT_RESULT_KEYS - set(row)
        assert type(row["k"]) is int and type(row["n_empty_clusters"]) is int and row["epochs"] == EPOCHS
        assert row["fit_rows"] == EPOCHS * 3000  # no early stopping by default: every epoch, every row
        for key in CONTRACT_FLOAT_KEYS:
            assert isinstance(row[key], float) and np.isfinite(row[key]), key
        for key in ("homogeneity", "completeness", "v_measure", "nmi", "accuracy_train", "accuracy_test"):
            assert -1e-9 <= row[key] <= 1 + 1e-9, key  # (sklearn's entropies can round to 1 + 1e-16)
        assert -1 <= row["ari"] <= 1 + 1e-9 and row["inertia"] > 0 and row["fit_seconds"] >= 0
        assert row["calinski_harabasz"] > 0 and row["davies_bouldin"] > 0 and -1 <= row["silhouette_sample"] <= 1
    selection = metrics["k_selection"]
    assert set(selection) == CONTRACT_K_SELECTION
    assert selection["recommended"] in K_GRID and selection["silhouette_sample_rows"] == 2000
    assert set(metrics["timings"]) >= CONTRACT_TIMINGS
    assert all(isinstance(v, (int, float)) and v >= 0 for v in metrics["timings"].values())
    assert metrics["timings"]["total_s"] >= metrics["timings"]["fit_s"]
    assert metrics["timings"]["total_s"] <= local_run.seconds
    assert set(metrics["cluster"]) >= CONTRACT_CLUSTER
    assert metrics["cluster"]["scheduler"].startswith("tcp://127.0.0.1:")
    assert (metrics["cluster"]["n_workers"], metrics["cluster"]["threads"]) == (2, 2)
    assert metrics["cluster"]["dashboard"].startswith("http://")

    # The numbers are those docs/contract.md defines, recomputed here from the data and the saved centroids in float64.
    maps = json.loads((d / "label_maps.json").read_text())
    assert set(maps) == {str(k) for k in K_GRID}
    cents = finals(d)
    x = data.train_images.reshape(len(data.train_images), -1) / 255.0
    xt = data.test_images.reshape(len(data.test_images), -1) / 255.0
    for row in results:
        k = row["k"]
        mapping = maps[str(k)]
        assert len(mapping) == k and all(m is None or 0 <= m < 5 for m in mapping)
        assert row["n_empty_clusters"] == sum(m is None for m in mapping)
        labels, dist = nearest(x, cents[k])
        assert row["inertia"] == pytest.approx(dist.sum(), rel=1e-5)
        y = data.train_labels.astype(np.int64)
        for c in range(k):  # the map: the most frequent class of each cluster's rows; unmapped when it has none
            rows = y[labels == c]
            assert mapping[c] == (int(np.bincount(rows, minlength=5).argmax()) if len(rows) else None)
        lookup = np.array([-1 if m is None else m for m in mapping])
        assert row["accuracy_train"] == pytest.approx(np.mean(lookup[labels] == y), abs=1e-12)
        test_labels, _ = nearest(xt, cents[k])
        assert row["accuracy_test"] == pytest.approx(np.mean(lookup[test_labels] == data.test_labels), abs=1e-12)
        assert row["homogeneity"] == pytest.approx(skm.homogeneity_score(y, labels), abs=1e-9)
        assert row["completeness"] == pytest.approx(skm.completeness_score(y, labels), abs=1e-9)
        assert row["v_measure"] == pytest.approx(skm.v_measure_score(y, labels), abs=1e-9)
        assert row["ari"] == pytest.approx(skm.adjusted_rand_score(y, labels), abs=1e-9)
        assert row["nmi"] == pytest.approx(skm.normalized_mutual_info_score(y, labels), abs=1e-9)
    # five well separated classes: six centers find them all
    assert results[-1]["accuracy_train"] >= 0.99


def test_job_yaml_and_manifest(local_run: Run, setup: Setup) -> None:
    d = local_run.run_dir
    resolved = yaml.safe_load((d / "job.yaml").read_text())
    assert resolved["name"] == "kgrid-test" and resolved["store"] == setup.store  # --store overrides the job file
    assert resolved["k_grid"] == list(K_GRID) and resolved["epochs"] == EPOCHS and resolved["seed"] == SEED
    assert resolved["batch_size"] == 100 and resolved["n_init"] == RESTARTS
    assert resolved["report"]["centroid_grids"] == [6]
    manifest = json.loads((d / "manifest.json").read_text())
    for key in ("versions", "cluster", "data", "command"):
        assert key in manifest, key
    for package in ("dask", "distributed", "scikit-learn", "numpy", "zarr"):
        assert manifest["versions"].get(package), package
    assert manifest["data"]["md5"] == setup.data.md5  # data checksums
    assert manifest["cluster"]["n_workers"] == 2
    assert "run" in manifest["command"] and str(setup.job) in manifest["command"]


# --- (c) determinism -------------------------------------------------------------------------------------------------


def test_early_stopping_from_the_job_file(setup: Setup, tmp_path: Path) -> None:
    """``max_no_improvement`` of a job file reaches every chain: some stop before their last epoch, metrics.json and
    the report say how many rows each fitted, job.yaml keeps the setting for --resume."""
    job = tmp_path / "stop.yaml"
    job.write_text(job_text("stop-test", epochs=3, max_no_improvement=1))
    run = run_job_cli(setup, tmp_path / "run", job=job)
    assert_ok(run)
    rows = {r["k"]: r["fit_rows"] for r in json.loads((run.run_dir / "metrics.json").read_text())["results"]}
    assert any(n < 3 * 3000 for n in rows.values()) and all(0 < n <= 3 * 3000 for n in rows.values()), rows
    assert yaml.safe_load((run.run_dir / "job.yaml").read_text())["max_no_improvement"] == 1
    page = (run.run_dir / "report.html").read_text()
    assert "rows fitted" in page and all(f"<td>{n:,}</td>" in page for n in rows.values())


def test_same_job_same_seed_same_centroids(local_run: Run, setup: Setup) -> None:
    again = run_job_cli(setup, setup.root / "run-local-again")
    assert_ok(again)
    assert_same_centroids(finals(again.run_dir), finals(local_run.run_dir))
    a = zarr.open_group(str(local_run.run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    b = zarr.open_group(str(again.run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    for k in K_GRID:
        assert np.array_equal(a[f"epochs/k{k}"][...], b[f"epochs/k{k}"][...])
    ma = json.loads((local_run.run_dir / "metrics.json").read_text())["results"]
    mb = json.loads((again.run_dir / "metrics.json").read_text())["results"]
    drop = {"fit_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == [
        {k: v for k, v in r.items() if k not in drop} for r in mb
    ]


# --- (b) an external cluster: `dask scheduler` + `dask worker` processes --------------------------------------------


@dataclass
class ExternalCluster:
    address: str
    processes: list[subprocess.Popen]


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalCluster]:
    from distributed import Client

    root = tmp_path_factory.mktemp("dask-cluster")
    bindir = Path(sys.executable).parent
    port = loopback_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append(
            subprocess.Popen(
                [str(bindir / "dask"), *args],
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    try:
        start(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            "127.0.0.1:0",
            "--idle-timeout",
            "900",
        )
        for i in range(2):
            start(f"worker{i}", *worker_args(address, root / f"worker{i}"))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        yield ExternalCluster(address, procs)
    finally:
        for proc in reversed(procs):
            stop_session(proc)


def test_external_cluster_gives_the_same_centroids(
    local_run: Run, setup: Setup, external_cluster: ExternalCluster
) -> None:
    run = run_job_cli(setup, setup.root / "run-external", "--scheduler", external_cluster.address)
    assert_ok(run)
    assert_same_centroids(finals(run.run_dir), finals(local_run.run_dir))
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert metrics["cluster"]["scheduler"] == external_cluster.address  # --scheduler overrides the cluster file
    assert (metrics["cluster"]["n_workers"], metrics["cluster"]["threads"]) == (2, 2)
    lines = run.proc.stdout.strip().splitlines()
    assert lines[0].startswith("dashboard: http://") and Path(lines[-1]) == run.run_dir / "report.html"
    # the job leaves a cluster it did not start running
    assert all(p.poll() is None for p in external_cluster.processes)


# --- (d) Ctrl-C, then --resume ----------------------------------------------------------------------------------------


@dataclass
class Interrupted:
    epochs: int
    job: Path
    run_dir: Path
    returncode: int
    stdout: str
    stderr: str
    progress: dict[str, tuple[int, int]]  # what the checkpoint holds after the interrupt


def interrupt_after_first_epoch(setup: Setup, job: Path, run_dir: Path) -> Interrupted:
    out, err = setup.root / f"{run_dir.name}.out", setup.root / f"{run_dir.name}.err"
    # A test run started in the background by a non-interactive shell has SIGINT ignored, and a child inherits that:
    # Python would then never raise KeyboardInterrupt in it. With a handler here, the child starts with the default.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mnist_kmeans", *setup.run_args(job, "--out", str(run_dir))],
            cwd=REPO_ROOT,
            stdout=fo,
            stderr=fe,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if any(e >= 1 for e, _ in chain_progress(run_dir).values()):
                os.killpg(proc.pid, signal.SIGINT)  # to the whole process group, as a terminal sends Ctrl-C
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        stop_session(proc)
    epochs = yaml.safe_load(job.read_text())["epochs"]
    return Interrupted(epochs, job, run_dir, proc.returncode, out.read_text(), err.read_text(), chain_progress(run_dir))


@pytest.fixture(scope="module")
def interrupted(setup: Setup) -> Interrupted:
    """A run stopped by SIGINT once a chain has saved its first epoch, with fit work left to do.

    If the run got further than that before the signal landed (a fast machine), it is retried with a longer job,
    so that the resume test never passes without resuming anything.
    """
    for epochs in (EPOCHS, 3 * EPOCHS, 8 * EPOCHS):
        job = setup.root / f"job-e{epochs}.yaml"
        job.write_text(job_text(epochs=epochs))
        got = interrupt_after_first_epoch(setup, job, setup.root / f"run-interrupted-e{epochs}")
        unfinished = len(K_GRID) - sum(e == epochs for e, _ in got.progress.values())  # one chain per K saves
        if got.returncode != 0 and unfinished > 0:
            return got
    pytest.fail(f"could not interrupt a run before its fit was done (last: exit {got.returncode}, {got.progress})")


def test_interrupt_exits_130_with_one_line(interrupted: Interrupted) -> None:
    assert interrupted.returncode == 130, interrupted.stderr
    lines = [line for line in interrupted.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{interrupted.stderr}"
    assert "--resume" in lines[0] and "Traceback" not in interrupted.stderr


def test_interrupted_run_keeps_its_epochs(interrupted: Interrupted) -> None:
    assert any(e >= 1 for e, _ in interrupted.progress.values())
    for name in ("job.yaml", "manifest.json"):
        assert (interrupted.run_dir / name).is_file()
    assert not (interrupted.run_dir / "metrics.json").exists()  # nothing looks finished


def test_resume_continues_exactly(interrupted: Interrupted, setup: Setup, local_run: Run) -> None:
    assert interrupted.returncode == 130
    resumed = run_cli(*setup.run_args(interrupted.job, "--resume", str(interrupted.run_dir)), timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert Path(resumed.stdout.strip().splitlines()[-1]) == interrupted.run_dir / "report.html"
    progress = chain_progress(interrupted.run_dir)
    assert len(progress) == len(K_GRID)  # the chosen restart of each K
    assert all(progress == (interrupted.epochs, LLOYD_STEPS) for progress in progress.values()), progress
    if interrupted.epochs == EPOCHS:
        reference = finals(local_run.run_dir)
    else:  # the longer job of a retry: its own uninterrupted run
        ref = run_job_cli(setup, setup.root / f"run-reference-e{interrupted.epochs}", job=interrupted.job)
        assert_ok(ref)
        reference = finals(ref.run_dir)
    assert_same_centroids(finals(interrupted.run_dir), reference)
    group = zarr.open_group(str(interrupted.run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    for k in K_GRID:
        assert group[f"epochs/k{k}"].shape[0] == interrupted.epochs
    metrics = json.loads((interrupted.run_dir / "metrics.json").read_text())
    assert [row["k"] for row in metrics["results"]] == sorted(K_GRID)
    assert json.loads((interrupted.run_dir / "manifest.json").read_text()).get("resumed")


# --- (e) bad input: exit 2, one line, nothing touched -----------------------------------------------------------------


def call_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert "Traceback" not in err
    return lines[0]


BAD_JOB_FILES = [
    # (job file text, what the message names besides the file)
    (job_text(extra_key=1), "extra_key"),
    (job_text(k_grid="ten"), "k_grid"),
    (job_text(epochs=1.5), "epochs"),
    (job_text(epochs=True), "epochs"),
    (job_text(k_grid=[1, 6]), "k_grid"),
    (job_text(batch_size=0), "batch_size"),
    (job_text(n_init="banana"), "n_init"),
    (job_text(report={"centroid_grids": [10]}), "centroid_grids"),
    ("k_grid: [3, 6]\n", "name"),
    ("name: x\n", "k_grid"),
    ("- name: x\n- k_grid: [3]\n", "mapping"),
    ("name: x\nk_grid: [3, 6\n", "YAML"),
]


@pytest.mark.parametrize(("text", "key"), BAD_JOB_FILES)
def test_bad_job_file_exits_2(
    text: str,
    key: str,
    setup: Setup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "bad-job.yaml"
    job.write_text(text)
    out = tmp_path / "run"
    code, stdout, err = call_main(setup.run_args(job, "--out", str(out)), capsys)
    assert code == 2
    line = one_line(err)
    assert str(job) in line and key in line, line
    assert stdout == "" and not out.exists()


def test_k_larger_than_the_training_split_exits_2(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "big-k.yaml"
    job.write_text(job_text(k_grid=[3, 3001], report={"centroid_grids": [3]}))
    out = tmp_path / "run"
    code, _, err = call_main(setup.run_args(job, "--out", str(out)), capsys)
    assert code == 2
    line = one_line(err)
    assert str(job) in line and "k_grid" in line and "3001" in line, line
    assert not (out / "job.yaml").exists() and not (out / "centroids.zarr").exists()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (CLUSTER_FILE + "workers: 2\n", "workers"),
        ('local: {n_workers: -1, dashboard_address: "127.0.0.1:0"}\n', "n_workers"),
        (
            "scheduler: tls://127.0.0.1:8786\ntls: {ca_file: nope-ca.pem, cert: nope.pem, key: nope-key.pem}\n",
            "ca_file",
        ),
    ],
)
def test_bad_cluster_file_exits_2(
    text: str,
    key: str,
    setup: Setup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    cluster = tmp_path / "bad-cluster.yaml"
    cluster.write_text(text)
    out = tmp_path / "run"
    args = ["run", str(setup.job), "--cluster", str(cluster), "--store", setup.store, "--out", str(out)]
    code, _, err = call_main(args, capsys)
    assert code == 2
    line = one_line(err)
    assert str(cluster) in line and key in line, line
    assert not out.exists()


def test_bad_input_in_a_real_process_is_one_line(setup: Setup, tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text(job_text(epochs=True))
    proc = run_cli(*setup.run_args(job, "--out", str(tmp_path / "run")))
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_line(proc.stderr)
    assert str(job) in line and "epochs" in line
    assert not (tmp_path / "run").exists()


def test_out_pointing_at_a_non_empty_directory_exits_2_and_touches_nothing(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "taken"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "metrics.json").write_text("{}")
    before = tree_snapshot(out)
    code, _, err = call_main(setup.run_args(None, "--out", str(out)), capsys)
    assert code == 2
    assert str(out) in one_line(err)
    assert tree_snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


def test_resume_with_another_job_exits_2_and_touches_nothing(
    local_run: Run, setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree_snapshot(local_run.run_dir)
    for change in ({"epochs": EPOCHS + 1}, {"seed": SEED + 1}, {"batch_size": 50}):
        job = tmp_path / "changed.yaml"
        job.write_text(job_text(**change))
        code, _, err = call_main(setup.run_args(job, "--resume", str(local_run.run_dir)), capsys)
        assert code == 2, change
        line = one_line(err)
        assert next(iter(change)) in line, line
    # a directory that is no run at all
    code, _, err = call_main(setup.run_args(None, "--resume", str(tmp_path)), capsys)
    assert code == 2 and str(tmp_path) in one_line(err)
    assert tree_snapshot(local_run.run_dir) == before


# --- exit 3: no cluster there ---------------------------------------------------------------------------------------


def unreachable_args(setup: Setup, cluster: Path, address: str, *more: str) -> list[str]:
    return ["run", str(setup.job), "--cluster", str(cluster), "--scheduler", address, "--store", setup.store, *more]


@dataclass
class Unreachable:
    cluster: Path
    address: str
    out: Path
    proc: subprocess.CompletedProcess[str]
    seconds: float


@pytest.fixture(scope="module")
def unreachable(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Unreachable:
    """``run --scheduler`` at a closed port (nothing listens there), with ``connect_timeout: 2``."""
    root = tmp_path_factory.mktemp("unreachable")
    cluster = root / "cluster.yaml"
    cluster.write_text("connect_timeout: 2\n")
    address = f"tcp://127.0.0.1:{loopback_port()}"
    out = root / "run"
    t0 = time.perf_counter()
    proc = run_cli(*unreachable_args(setup, cluster, address, "--out", str(out)), timeout=60)
    return Unreachable(cluster, address, out, proc, time.perf_counter() - t0)


def test_unreachable_scheduler_exits_3(unreachable: Unreachable) -> None:
    assert unreachable.proc.returncode == 3, unreachable.proc.stderr
    assert unreachable.address in one_line(unreachable.proc.stderr)
    assert unreachable.seconds < 30


def test_after_an_unreachable_scheduler_the_run_can_be_retried(
    unreachable: Unreachable, setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 3 must not leave a run directory that neither a second try nor ``--resume`` accepts.

    The retry meets the same closed port, so the expected answer is exit 3 again, not exit 2. (In this process, to
    save a Python start: the first run above was a real one.)
    """
    assert unreachable.proc.returncode == 3
    monkeypatch.chdir(unreachable.out.parent)
    args = unreachable_args(setup, unreachable.cluster, unreachable.address)
    code, _, err = call_main([*args, "--out", str(unreachable.out)], capsys)
    if code == 2:  # the directory is kept for --resume: then --resume must take it
        code, _, err = call_main([*args, "--resume", str(unreachable.out)], capsys)
    assert code == 3, err


def test_the_client_never_imports_scikit_learn() -> None:
    """`run`'s process only submits the fit's functions and renders the report: importing scikit-learn (or dask-ml)
    there would cost about two seconds of every run (README, "Performance"). A child process, for a clean import."""
    code = (
        "import sys\n"
        "import mnist_kmeans.cli, mnist_kmeans.pipeline, mnist_kmeans.schedule, mnist_kmeans.cluster\n"
        "import mnist_kmeans.report.html\n"
        "from mnist_kmeans.pipeline import _versions\n"
        "assert _versions()['scikit-learn'][0].isdigit()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'dask_ml')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
