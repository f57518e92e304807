"""The Python API (docs/contract.md, "Python API"): ``mnist_kmeans.run`` on a notebook's own client, ``open_run`` and
every attribute of ``Run``, checked against the run directory's files and, for the models, against the raw IDX files.

One real run on full MNIST for the module (a LocalCluster of 2 worker processes; the job has no Lloyd step, so the
training evaluation is the pass that also measures the epochs, the GEMM shared with earlier centers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from sklearn.cluster import MiniBatchKMeans

import mnist_kmeans
from mnist_kmeans.config import JobConfig
from mnist_kmeans.data.idx import IdxReader
from mnist_kmeans.data.store import load_chunk, open_store
from mnist_kmeans.errors import ClusterError, UserError
from mnist_kmeans.evaluate import chunk_stats_task
from mnist_kmeans.model import run_model
from tests.helpers import IDX_NAMES, MNIST_DIR, REPO_ROOT

JOB = {
    "name": "api <test>",
    "k_grid": [10, 16],
    "epochs": 2,
    "n_init": 1,
    "lloyd_steps": 0,
    "seed": 3,
    "report": {"centroid_grids": [10]},
}


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def api_run(client: Client, mnist_home: Path, tmp_path_factory: pytest.TempPathFactory) -> mnist_kmeans.Run:
    out = tmp_path_factory.mktemp("api") / "run"
    return mnist_kmeans.run({**JOB, "store": str(mnist_home / "mnist.zarr")}, client=client, out=out)


def read_idx(name: str) -> np.ndarray:
    with open(MNIST_DIR / f"{name}.gz", "rb") as f, IdxReader(f, name, gz=True) as reader:
        return np.concatenate(list(reader.blocks(10_000)))


def test_the_public_names() -> None:
    """``__all__`` is the API, and ``mnist_kmeans.run`` stays the function once the job's module is imported."""
    import mnist_kmeans.pipeline  # noqa: F401

    assert {"run", "open_run", "Run"} <= set(mnist_kmeans.__all__)
    assert callable(mnist_kmeans.run) and mnist_kmeans.run.__module__ == "mnist_kmeans.api"
    code = "import sys, mnist_kmeans; print(sorted(m for m in ('numpy', 'dask', 'distributed') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr  # the command line's first import stays light


def test_run_on_the_callers_client_leaves_it_open(api_run: mnist_kmeans.Run, client: Client) -> None:
    assert client.status == "running" and client.submit(sum, [1, 2]).result() == 3
    assert len(client.scheduler_info()["workers"]) == 2
    manifest = json.loads((api_run.path / "manifest.json").read_text())
    assert manifest["cluster"]["scheduler"] == client.scheduler.address and manifest["job_file"] is None
    assert api_run.report_path == api_run.path / "report.html" and api_run.report_path.is_file()
    assert api_run.job is not None and api_run.job.name == JOB["name"] and api_run.job.k_grid == (10, 16)
    # a job given as a mapping is resumed from the run's own job.yaml, a job file like any other
    assert (api_run.path / "job.yaml").is_file()


def test_a_resume_through_the_api_ends_with_the_same_centroids(
    api_run: mnist_kmeans.Run, client: Client, mnist_home: Path, tmp_path: Path
) -> None:
    """The same dict job resumed in a copy of the finished run (every epoch saved): bit-identical centroids."""
    copy = shutil.copytree(api_run.path, tmp_path / "run")
    again = mnist_kmeans.run({**JOB, "store": str(mnist_home / "mnist.zarr")}, client=client, resume=copy)
    assert again.path == Path(copy)
    for k in (10, 16):
        np.testing.assert_array_equal(again.model(k).cluster_centers_, api_run.model(k).cluster_centers_)
    assert again.metrics["accuracy_test"].tolist() == api_run.metrics["accuracy_test"].tolist()


def test_without_a_client_it_runs_as_the_command_line(
    client: Client, kgrid_store: tuple[str, object], tmp_path: Path
) -> None:
    """No client: the cluster file's embedded cluster is started and closed, as by `mnist-kmeans run`; the centroids
    are those of the same job on the caller's client (one path, any cluster)."""
    job = {"name": "small", "k_grid": [3, 5], "epochs": 1, "n_init": 2, "seed": 1, "store": kgrid_store[0]}
    local = "local:\n  n_workers: 1\n  processes: false\n  dashboard_address: '127.0.0.1:0'\n"
    (tmp_path / "cluster.yaml").write_text(local)
    alone = mnist_kmeans.run(job, cluster=tmp_path / "cluster.yaml", out=tmp_path / "alone")
    manifest = json.loads((alone.path / "manifest.json").read_text())
    assert manifest["cluster"]["embedded"] is True and manifest["cluster"]["n_workers"] == 1
    on_client = mnist_kmeans.run(job, client=client, out=tmp_path / "on-client")
    for k in (3, 5):
        np.testing.assert_array_equal(alone.model(k).cluster_centers_, on_client.model(k).cluster_centers_)


def test_a_closed_client_is_a_cluster_error_and_leaves_nothing(
    client: Client, mnist_home: Path, tmp_path: Path
) -> None:
    closed = Client(client.scheduler.address)
    closed.close()
    with pytest.raises(ClusterError, match="the client given is closed"):
        mnist_kmeans.run({**JOB, "store": str(mnist_home / "mnist.zarr")}, client=closed, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_metrics_hold_every_per_k_field(api_run: mnist_kmeans.Run) -> None:
    results = json.loads((api_run.path / "metrics.json").read_text())["results"]
    frame = api_run.metrics
    assert list(frame.index) == [10, 16] and frame.index.name == "k"
    assert set(frame.columns) == {key for row in results for key in row} - {"k"}
    for row in results:
        for key, value in row.items():
            if key != "k":
                assert frame.loc[row["k"], key] == value, key


def test_model_and_label_map_reproduce_the_accuracy_exactly(api_run: mnist_kmeans.Run) -> None:
    """From the raw IDX files: the run's training and test accuracy, to the last row, at every K."""
    group = zarr.open_group(str(api_run.path / "centroids.zarr"), mode="r")
    maps = json.loads((api_run.path / "label_maps.json").read_text())
    for split, (images_name, labels_name) in IDX_NAMES.items():
        images, labels = read_idx(images_name), read_idx(labels_name)
        for k in (10, 16):
            model = api_run.model(k)
            assert isinstance(model, MiniBatchKMeans) and model.n_clusters == k
            np.testing.assert_array_equal(model.cluster_centers_, group[f"final/k{k}"][...])
            mapping = api_run.label_map(k)
            assert mapping.dtype == np.int64 and mapping.tolist() == [-1 if m is None else m for m in maps[str(k)]]
            predicted = api_run.predict_labels(k, images)  # uint8 (n, 28, 28), as stored
            assert float((predicted == labels).mean()) == api_run.metrics.loc[k, f"accuracy_{split}"]
            as_floats = images.reshape(len(images), -1) / 255.0  # float64 in [0, 1], (n, 784)
            np.testing.assert_array_equal(api_run.predict_labels(k, as_floats), predicted)


def test_an_empty_cluster_maps_to_minus_one(api_run: mnist_kmeans.Run, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(api_run.path, tmp_path / "run"))
    maps = json.loads((copy / "label_maps.json").read_text())
    maps["10"][0] = None
    (copy / "label_maps.json").write_text(json.dumps(maps))
    run = mnist_kmeans.open_run(copy)
    assert run.label_map(10)[0] == -1
    images = read_idx(IDX_NAMES["test"][0])[:2000]
    in_zero = run.model(10).predict(images.reshape(len(images), -1) / 255.0) == 0
    assert in_zero.any()
    assert (run.predict_labels(10, images)[in_zero] == -1).all()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((3, 27, 28), np.uint8), "expected shape (n, 28, 28) or (n, 784)"),
        (np.zeros((0, 784), np.uint8), "with n >= 1"),
        (np.zeros(784, np.uint8), "got (784,)"),
        (np.zeros((2, 784), np.int32), "got dtype int32"),
        (np.full((2, 784), 2.0), "in [0, 1]"),
        (np.full((2, 784), np.nan), "finite"),
    ],
)
def test_predict_labels_refuses_what_is_no_image(api_run: mnist_kmeans.Run, images: np.ndarray, message: str) -> None:
    with pytest.raises(UserError, match="^images: ") as caught:
        api_run.predict_labels(10, images)
    assert message in str(caught.value)


def test_model_predict_validates_as_scikit_learn_does(api_run: mnist_kmeans.Run) -> None:
    with pytest.raises(ValueError, match="784 features"):
        api_run.model(10).predict(np.zeros((2, 100), np.float32))


def test_a_k_outside_the_grid_is_refused(api_run: mnist_kmeans.Run) -> None:
    for call in (api_run.model, api_run.label_map, lambda k: api_run.predict_labels(k, np.zeros((1, 784)))):
        with pytest.raises(UserError, match=r"K=12 is not in this run's K grid \[10, 16\]"):
            call(12)


def test_scikit_learns_predict_can_differ_the_models_does_not(mnist_home: Path, client: Client) -> None:
    """Why ``RunKMeans.predict`` is the evaluation's: with near-ties (each center beside its neighbour one float32 step
    away) scikit-learn's own kernel assigns some MNIST rows elsewhere than the evaluation's pass on the workers; the
    model assigns exactly as that pass did (its contingency table is the pass's). Near-ties also go another way with
    more BLAS threads than a worker's one: the pass runs on the cluster, as in a run."""
    store_info = open_store(str(mnist_home / "mnist.zarr"))
    x, y = zip(*(load_chunk(store_info, "train", i) for i in range(2)), strict=True)
    rows, classes = np.concatenate(x), np.concatenate(y).astype(np.int64)
    rng = np.random.default_rng(0)
    centers = np.stack([rows[rng.choice(len(rows), 20)].mean(axis=0) for _ in range(6)]).astype(np.float32)
    centers = np.concatenate([centers, np.nextafter(centers, np.float32(1))])
    n_classes = store_info.n_classes
    passes = [client.submit(chunk_stats_task, [centers], store_info, "train", i, pure=False) for i in range(2)]
    evaluated = sum(stats[0].contingency for stats in client.gather(passes))
    model = run_model(centers, store_info.chunk_rows, 0.0, seed=0, batch_size=1024)

    def table(assigned: np.ndarray) -> np.ndarray:
        return np.bincount(assigned * n_classes + classes, minlength=len(centers) * n_classes).reshape(-1, n_classes)

    np.testing.assert_array_equal(table(model.predict(rows)), evaluated)
    assert (MiniBatchKMeans.predict(model, rows) != model.predict(rows)).any()


def test_repr_html_is_the_reports_summary_and_table_escaped(api_run: mnist_kmeans.Run) -> None:
    html = api_run._repr_html_()
    assert "Metrics per K" in html and 'aria-label="Summary"' in html
    assert "<test>" not in html  # the job's name, escaped wherever it shows
    assert "<script" not in html and "<html" not in html
    best_k = json.loads((api_run.path / "metrics.json").read_text())["best_k"]
    assert f'<div class="value">{best_k}</div>' in html


def test_repr_html_escapes_what_the_run_directory_says(api_run: mnist_kmeans.Run, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(api_run.path, tmp_path / "run<b>"))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["cluster"]["threads"] = "<img src=x onerror=alert(1)>"
    (copy / "metrics.json").write_text(json.dumps(metrics))
    html = mnist_kmeans.open_run(copy)._repr_html_()
    assert "<img" not in html and "&lt;img src=x" in html and "run&lt;b&gt;" in html


def test_figures(api_run: mnist_kmeans.Run) -> None:
    names = sorted(p.stem for p in (api_run.path / "figures").glob("*.png"))
    assert names
    for name in names:
        figure = api_run.figure(name)
        assert figure._repr_png_().startswith(b"\x89PNG\r\n\x1a\n")
        assert figure.png == (api_run.path / "figures" / f"{name}.png").read_bytes()
    with pytest.raises(UserError, match=f"no figure 'nope'; there are: {names[0]}"):
        api_run.figure("nope")


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"name": "x", "k_grid": [1]}, "job: k_grid: must be >= 2, got 1"),
        ({"name": "x", "k_grid": [4], "epoch": 2}, "job: epoch: unknown key"),
        ({"k_grid": [4]}, "job: name: missing (required)"),
        ({"name": "x", "k_grid": [4], "report": {"centroid_grids": [5]}}, "job: report.centroid_grids: K=5"),
        (JobConfig(name="x", k_grid=(4,), epochs=0), "job: epochs: must be >= 1, got 0"),
        (JobConfig(name="x", k_grid=(4,), centroid_grids=(5,)), "job: report.centroid_grids: K=5"),
        (42, "job: must be a job file's path, a mapping or a JobConfig, got int"),
        ("no-such-job.yaml", "no-such-job.yaml"),
    ],
)
def test_a_bad_job_is_refused_before_any_cluster(job: object, message: str, tmp_path: Path) -> None:
    """Validated exactly as a job file is, before a cluster is started or joined; nothing is written."""
    with pytest.raises(UserError) as caught:
        mnist_kmeans.run(job, out=tmp_path / "run")
    assert message in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_job_config_is_the_job_file_it_would_be(tmp_path: Path) -> None:
    """A JobConfig built by hand resolves to what a job file of the same keys gives (defaults included)."""
    from mnist_kmeans.config import load_job, resolve_job

    (tmp_path / "job.yaml").write_text("name: x\nk_grid: [4, 8]\nseed: 5\nstore: s3://bucket/m.zarr\n")
    from_file = load_job(tmp_path / "job.yaml")
    made = JobConfig(name="x", k_grid=(4, 8), seed=5, store="s3://bucket/m.zarr")
    assert resolve_job(made) == (from_file, None)
    assert resolve_job({"name": "x", "k_grid": [8, 4], "seed": 5, "store": "s3://bucket/m.zarr"}) == (from_file, None)


def test_open_run_refuses_what_is_no_finished_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such run directory"):
        mnist_kmeans.open_run(tmp_path / "nothing")
