"""Which data a store holds, and how the report words it (docs/contract.md, "Sources", "Store layout",
"metrics.json", "report.html").

Class names come from a ``classes`` file beside the IDX files (or ``ingest --classes FILE``) and reach the store,
``metrics.json`` and the report; the seed notebook's MNIST table is set beside a run only when the data's md5 sums
are MNIST's and the store is not augmented. Everything is real: IDX files on disk, stores written by ingest, a run
on a LocalCluster through the command line, the report read back as HTML.
"""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pytest
import yaml
import zarr

from mnist_kmeans.data.store import open_store
from mnist_kmeans.report import render_report
from tests.helpers import MNIST_MD5, copy_store, run_cli, write_idx_dataset
from tests.report_data import make_run_dir

NAMES = ["Ankle boot", "T-shirt/top", "Bag"]
CLUSTER_FILE = 'local: {n_workers: 1, threads_per_worker: 1, memory_limit: 2GiB, dashboard_address: "127.0.0.1:0"}\n'
# MNIST's counts: a store of other data with these is what the report used to take for MNIST
MNIST_SHAPED = {"n_train": 60000, "n_test": 10000, "n_classes": 10, "image_shape": [28, 28]}


def _text(html: str) -> str:
    """The page's text, tags dropped, whitespace collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def _titles(html: str) -> list[str]:
    return re.findall(r"<h3>(.*?)</h3>", html)


def _ingest(source: Path, store: Path, *more: str):
    return run_cli("ingest", "--source", str(source), "--store", str(store), *more)


@pytest.fixture(scope="module")
def named_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store of three named classes (a ``classes`` file beside the IDX files), and a tiny run on it."""
    root = tmp_path_factory.mktemp("named")
    data = write_idx_dataset(root / "idx", n_train=600, n_test=200, h=8, w=8, n_classes=3)
    (data.directory / "classes").write_text("".join(f"{name}\n" for name in NAMES) + "\n")
    store = root / "named.zarr"
    assert _ingest(data.directory, store).returncode == 0
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "named", "k_grid": [3], "epochs": 1, "batch_size": 100, "n_init": 1}))
    (root / "cluster.yaml").write_text(CLUSTER_FILE)
    run_dir = root / "run"
    proc = run_cli(
        "run", str(job), "--cluster", str(root / "cluster.yaml"), "--store", str(store), "--out", str(run_dir)
    )
    assert proc.returncode == 0, proc.stderr
    return store, run_dir


def test_class_names_beside_the_source_reach_store_metrics_and_report(named_run: tuple[Path, Path]) -> None:
    store, run_dir = named_run
    assert open_store(str(store)).class_names == tuple(NAMES)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"]["class_names"] == NAMES and metrics["dataset"]["augmented_from"] is None
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    text = _text(html)
    assert "Classes 3: Ankle boot, T-shirt/top, Bag" in text
    assert "The first 9 training images" in _titles(html)
    # three clean clusters: nothing misclassified, and the note says so in the data's words
    assert "Misclassified test images" in _titles(html) or "No misclassified test images to show." in text
    assert "Number " not in html and "digit" not in " ".join(_titles(html))
    # not MNIST: no comparison with the seed notebook's table, no dashed seed lines
    assert "it is not MNIST" in text and "Dashed: the seed notebook" not in text and "this run Δ" not in text


def test_classes_option_wins_and_a_complete_store_keeps_its_names(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "idx", n_classes=3)
    (data.directory / "classes").write_text("a\nb\nc\n")
    given = tmp_path / "names.txt"
    given.write_text("\n".join(NAMES))
    store = tmp_path / "s.zarr"
    assert _ingest(data.directory, store, "--classes", str(given)).returncode == 0
    assert open_store(str(store)).class_names == tuple(NAMES)
    # the same data again: a no-op with the same names; other names need --force
    assert _ingest(data.directory, store, "--classes", str(given)).returncode == 0
    other = _ingest(data.directory, store)
    assert other.returncode == 2 and "other class names" in other.stderr and "--force" in other.stderr
    assert open_store(str(store)).class_names == tuple(NAMES)
    assert _ingest(data.directory, store, "--force").returncode == 0
    assert open_store(str(store)).class_names == ("a", "b", "c")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("a\nb\n", "lists 2 class names, but the labels have 3 classes"),
        ("a\n\nb\nc\n", "line 2: empty class name"),
        ("a\nb\n" + "x" * 65 + "\n", "line 3: class name longer than 64 characters"),
        (b"a\nb\n\xff\n", "not a UTF-8 text file of class names"),
    ],
)
def test_a_bad_classes_file_is_one_line_exit_2_naming_it(tmp_path: Path, content: str | bytes, problem: str) -> None:
    data = write_idx_dataset(tmp_path / "idx", n_classes=3)
    path = data.directory / "classes"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    store = tmp_path / "s.zarr"
    proc = _ingest(data.directory, store)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {path}: {problem}"), proc.stderr
    assert not store.exists() and list(tmp_path.iterdir()) == [tmp_path / "idx"]  # nothing written, no leftovers


def test_classes_file_at_an_http_source(tmp_path: Path, http_server) -> None:
    data = write_idx_dataset(tmp_path / "idx", n_classes=3, gz=True)
    (data.directory / "classes").write_text("\n".join(NAMES))
    store = tmp_path / "s.zarr"
    proc = run_cli("ingest", "--source", http_server(data.directory), "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert open_store(str(store)).class_names == tuple(NAMES)


def test_a_store_with_malformed_class_names_is_refused(named_run: tuple[Path, Path], tmp_path: Path) -> None:
    store = copy_store(str(named_run[0]), tmp_path / "copy.zarr")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    group.attrs["class_names"] = ["only one"]
    with pytest.raises(Exception, match="attribute class_names: must be a list of 3 short names"):
        open_store(store)


# ------------------------------------------------------------------------------ the report on run directories


def test_mnist_shaped_data_that_is_not_mnist_is_not_compared(tmp_path: Path) -> None:
    """Fashion-MNIST has MNIST's counts and shape but other md5 sums: no seed comparison, no digits."""
    run = make_run_dir(tmp_path / "run", ks=(4, 8), epochs=1, n_init=1, dataset=MNIST_SHAPED)
    html = render_report(run).read_text(encoding="utf-8")
    text = _text(html)
    assert "it is not MNIST: the md5 sums of its IDX files are not MNIST's published ones" in text
    assert "this run Δ" not in text and "Dashed: the seed notebook" not in text
    assert "The first 9 training images" in _titles(html) and "Number " not in html


def test_augmented_mnist_is_not_compared_and_says_so(tmp_path: Path) -> None:
    augmented = {**MNIST_SHAPED, "augmented_from": {"store": "data/mnist.zarr", "rows": 60000, "seed": 0}}
    run = make_run_dir(tmp_path / "run", ks=(4, 8), epochs=1, n_init=1, dataset=augmented, md5=MNIST_MD5)
    text = _text(render_report(run).read_text(encoding="utf-8"))
    assert "it is augmented from MNIST" in text and "augmented from MNIST (data/mnist.zarr)" in text
    assert "this run Δ" not in text and "Dashed: the seed notebook" not in text


def test_mnist_is_still_compared_with_the_seed(tmp_path: Path) -> None:
    """A run whose manifest records MNIST's md5 sums (as a run on data/mnist does) keeps the comparison."""
    run = make_run_dir(tmp_path / "run", ks=(4, 16), epochs=1, n_init=1, dataset=MNIST_SHAPED, md5=MNIST_MD5)
    html = render_report(run).read_text(encoding="utf-8")
    text = _text(html)
    assert "The seed notebook beside this run" in text and "not the seed's" not in text
    inertia_16 = json.loads((run / "metrics.json").read_text())["results"][1]["inertia"]
    seed_section = text.split("The seed notebook beside this run", 1)[1].split("Figures", 1)[0]
    assert "seed this run Δ" in seed_section and f"{inertia_16:,.1f}" in seed_section
    assert text.count("Dashed: the seed notebook's published values.") == 2
    assert "The first 9 training digits" in _titles(html) and "MNIST (its md5 sums are MNIST's published ones)" in text


def test_class_names_of_metrics_json_are_checked(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", ks=(4,), epochs=1, n_init=1, dataset={"class_names": ["a", "b"]})
    proc = run_cli("report", str(run))
    assert proc.returncode == 2
    assert "metrics.json: key 'dataset.class_names' must be null or a list of 10 short names" in proc.stderr
