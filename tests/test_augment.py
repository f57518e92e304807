"""augment: a training set of deformed digits written by the cluster (docs/contract.md, "Commands" and "Store layout").

The deformation is tested as a pure function first (no cluster), then the stores that real LocalClusters write from
a small store of real MNIST digits, then the command line, ending with a `run` on an augmented store.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from scipy import ndimage

from mnist_kmeans.cli import main
from mnist_kmeans.data.augment import augment, source_rows
from mnist_kmeans.data.deform import DeformParams, bilinear, deform, n_uniforms, row_uniforms
from mnist_kmeans.data.ingest import ingest
from mnist_kmeans.data.store import FORMAT, open_store, read_attrs
from tests.helpers import IDX_NAMES, MNIST_DIR, idx_bytes, quiet, run_cli, tree_snapshot, write_idx

N_TRAIN, N_TEST, CHUNK_ROWS = 600, 600, 250
# Not a multiple of the chunk size (a short last chunk), nor of the 256 rows of a random stream; > 4 x N_TRAIN.
N_ROWS = 2_890


def mnist_digits(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images ``(n, 28, 28)`` and labels of a split of the MNIST copy in the repository."""
    images_name, labels_name = IDX_NAMES[split]
    with gzip.open(MNIST_DIR / f"{images_name}.gz") as f:
        images = np.frombuffer(f.read(16 + n * 784)[16:], np.uint8).reshape(n, 28, 28)
    with gzip.open(MNIST_DIR / f"{labels_name}.gz") as f:
        labels = np.frombuffer(f.read(8 + n)[8:], np.uint8)
    return images, labels


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of the pixels of each pair of rows."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def split_arrays(store: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return group[f"{split}/images"][:], group[f"{split}/labels"][:]


# --- the deformation, a pure function ---------------------------------------------------------------------------


def test_row_uniforms_depend_only_on_seed_and_row():
    d = 11
    whole = row_uniforms(5, 0, 700, d)
    assert whole.shape == (700, d) and whole.min() >= 0 and whole.max() < 1
    # Any split of the rows into calls (across the 256-row streams too) gives the same numbers.
    pieces = [row_uniforms(5, a, b - a, d) for a, b in [(0, 100), (100, 511), (511, 512), (512, 700)]]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    np.testing.assert_array_equal(row_uniforms(5, 300, 1, d)[0], whole[300])
    assert not np.isclose(row_uniforms(6, 0, 700, d), whole).any(axis=1).all()
    assert len({tuple(row) for row in whole}) == 700  # rows do not repeat one another


def test_deform_is_pure_and_independent_of_batching():
    images, _ = mnist_digits("train", 300)
    a = deform(images, seed=3, start=1_000)
    assert a.dtype == np.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(deform(images, seed=3, start=1_000), a)
    np.testing.assert_array_equal(deform(images, seed=3, start=1_000, batch_rows=7), a)
    np.testing.assert_array_equal(deform(images[50:80], seed=3, start=1_050), a[50:80])
    other = deform(images, seed=4, start=1_000)
    assert (other != a).any(axis=(1, 2)).mean() > 0.95


def test_zero_strength_is_the_identity():
    images, _ = mnist_digits("train", 100)
    none = DeformParams(alpha=0, max_rotation=0, max_scale=1, max_shear=0, max_shift=0)
    np.testing.assert_array_equal(deform(images, seed=0, start=0, params=none), images)


def test_bilinear_is_map_coordinates_order_1():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 12, 9)).astype(np.float32)
    rows = rng.uniform(-3, 15, size=(5, 12, 9))  # points outside the image too
    cols = rng.uniform(-3, 12, size=(5, 12, 9))
    k = np.broadcast_to(np.arange(5.0)[:, None, None], rows.shape)
    expected = ndimage.map_coordinates(images, [k, rows, cols], order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(bilinear(images, rows, cols), expected, atol=1e-3)


def test_deformation_is_a_small_real_deformation():
    """Most digits change, stay digits of the same shape and ink, and stay far closer to their source than to
    another digit: a deformation, not noise."""
    images, _ = mnist_digits("train", 1_000)
    out = deform(images, seed=0, start=0)
    assert (out != images).any(axis=(1, 2)).mean() > 0.99
    own = correlation(out, images)
    other = correlation(out, np.roll(images, 1, axis=0))
    assert own.mean() > 0.5 and np.median(own) > 0.5
    assert own.mean() > other.mean() + 0.3
    ink = out.reshape(len(out), -1).sum(1) / images.reshape(len(images), -1).sum(1)
    assert 0.9 < ink.mean() < 1.15
    shift = [
        np.subtract(ndimage.center_of_mass(o), ndimage.center_of_mass(i)) for o, i in zip(out, images, strict=True)
    ]
    assert np.linalg.norm(shift, axis=1).mean() < 2.5  # pixels


def test_rows_cycle_through_the_source():
    np.testing.assert_array_equal(source_rows(5, 12, 4), [1, 2, 3, 0, 1, 2, 3])
    assert n_uniforms((28, 28)) == 5 + 2 * 784


# --- stores written by real clusters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A complete store of the first 600 training and 600 test MNIST digits, chunks of 250 rows."""
    root = tmp_path_factory.mktemp("source")
    (root / "idx").mkdir()
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = mnist_digits(split, n)
        for name, array in zip(IDX_NAMES[split], (images, labels), strict=True):
            write_idx(root / "idx" / name, idx_bytes(array))
    store = str(root / "src.zarr")
    ingest(str(root / "idx"), store, chunk_rows=CHUNK_ROWS, log=quiet)
    return store


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def built(source, client, tmp_path_factory) -> str:
    """The reference: N_ROWS rows, seed 0, written by two workers."""
    out = str(tmp_path_factory.mktemp("built") / "aug.zarr")
    augment(source, out, N_ROWS, seed=0, client=client, log=quiet)
    return out


def test_store_has_the_layout_and_attributes_of_an_ingested_one(source, built):
    src, info = open_store(source), open_store(built)
    assert (info.n_train, info.n_test, info.chunk_rows) == (N_ROWS, N_TEST, CHUNK_ROWS)
    for attr in ("image_shape", "n_classes", "md5", "source"):  # the source's, with the md5 of its IDX files
        assert getattr(info, attr) == getattr(src, attr), attr
    assert len(info.ingest_id) == 32 and info.ingest_id != src.ingest_id
    attrs = read_attrs(built)
    assert set(attrs) == set(read_attrs(source)) | {"augmented_from"}  # an ingested store's keys, and one more
    assert attrs["format"] == FORMAT and attrs["complete"] is True and attrs["chunk_rows"] == CHUNK_ROWS
    assert attrs["augmented_from"]["store"] == source
    assert attrs["label_max"] == {split: int(split_arrays(built, split)[1].max()) for split in ("train", "test")}
    assert (attrs["augmented_from"]["seed"], attrs["augmented_from"]["rows"]) == (0, N_ROWS)
    group = zarr.open_group(built, mode="r", use_consolidated=False)
    for split, n in (("train", N_ROWS), ("test", N_TEST)):
        assert group[f"{split}/images"].dtype == np.uint8 and group[f"{split}/images"].shape == (n, 784)
        assert group[f"{split}/images"].chunks == (CHUNK_ROWS, 784) and group[f"{split}/labels"].chunks == (CHUNK_ROWS,)
    assert [p.name for p in Path(built).parent.iterdir()] == ["aug.zarr"]  # no temporary directory left


def test_rows_are_the_pure_deformations_of_their_sources(source, built):
    images, labels = split_arrays(built, "train")
    src_images, src_labels = split_arrays(source, "train")
    idx = np.arange(N_ROWS) % N_TRAIN
    np.testing.assert_array_equal(labels, src_labels[idx])
    # The workers wrote exactly what the pure function computes here.
    expected = deform(src_images[idx].reshape(-1, 28, 28), seed=0, start=0).reshape(N_ROWS, 784)
    np.testing.assert_array_equal(images, expected)
    assert (images != src_images[idx]).any(axis=1).mean() > 0.99
    assert correlation(images, src_images[idx]).mean() > 0.5


def test_test_split_is_copied_unchanged(source, built):
    for got, want in zip(split_arrays(built, "test"), split_arrays(source, "test"), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_same_seed_same_bytes_on_another_cluster_shape_other_seed_differs(source, built, client, tmp_path):
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as one_worker,
    ):
        augment(source, str(tmp_path / "one.zarr"), N_ROWS, seed=0, client=one_worker, log=quiet)
    augment(source, str(tmp_path / "seed1.zarr"), N_ROWS, seed=1, client=client, log=quiet)
    augment(source, str(tmp_path / "prefix.zarr"), 700, seed=0, client=client, log=quiet)
    reference = split_arrays(built, "train")[0]
    np.testing.assert_array_equal(split_arrays(tmp_path / "one.zarr", "train")[0], reference)
    # Rows do not depend on --rows either: a smaller set is a prefix of a larger one.
    np.testing.assert_array_equal(split_arrays(tmp_path / "prefix.zarr", "train")[0], reference[:700])
    assert (split_arrays(tmp_path / "seed1.zarr", "train")[0] != reference).any(axis=1).mean() > 0.99


def test_a_failed_build_leaves_nothing_behind(source, client, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(source, broken)
    chunk = next(p for p in sorted((broken / "train" / "images").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"not a blosc frame")  # every task that reads it fails, on the worker
    with pytest.raises(Exception, match="blosc"):
        augment(str(broken), str(tmp_path / "out.zarr"), N_ROWS, seed=0, client=client, log=quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.zarr"]  # no store, no temporary directory


# --- the command line -------------------------------------------------------------------------------------------


def test_bad_inputs_exit_2_with_one_line(source, built, tmp_path, capsys):
    incomplete = str(tmp_path / "incomplete.zarr")
    ingest(str(Path(source).parent / "idx"), incomplete, chunk_rows=CHUNK_ROWS, log=quiet)
    zarr.open_group(incomplete, mode="r+", use_consolidated=False).attrs["complete"] = False
    fresh = str(tmp_path / "fresh.zarr")
    cases = {
        "no source": ["--store", str(tmp_path / "missing.zarr"), "--out", fresh, "--rows", "10"],
        "incomplete source": ["--store", incomplete, "--out", fresh, "--rows", "10"],
        "rows 0": ["--store", source, "--out", fresh, "--rows", "0"],
        "negative seed": ["--store", source, "--out", fresh, "--rows", "10", "--seed", "-1"],
        "out is store": ["--store", source, "--out", str(Path(source).parent / "." / "src.zarr/"), "--rows", "10"],
        "out inside store": ["--store", source, "--out", str(Path(source) / "train"), "--rows", "10"],
        "out complete": ["--store", source, "--out", built, "--rows", "10"],
    }
    before = tree_snapshot(Path(built))
    for what, args in cases.items():  # in this process (fast): the command line's own entry point
        assert main(["augment", *args]) == 2, what
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", (what, captured)
    # and once as a real process: exit status, one line, no traceback
    proc = run_cli("augment", *cases["out complete"])
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and "complete store is already there" in proc.stderr
    assert tree_snapshot(Path(built)) == before
    assert not Path(fresh).exists()


def test_command_then_run_on_the_augmented_store(source, built, tmp_path):
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(
        "local:\n  n_workers: 2\n  threads_per_worker: 1\n  memory_limit: 2GiB\n  dashboard_address: 127.0.0.1:0\n"
    )
    out = tmp_path / "cli.zarr"
    args = ["--store", source, "--out", str(out), "--rows", str(N_ROWS), "--seed", "0", "--cluster", str(cluster_file)]
    proc = run_cli("augment", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dashboard: http://127.0.0.1:"), proc.stdout
    assert "Traceback" not in proc.stderr
    # The command's cluster wrote the same bytes as the fixture's.
    for got, want in zip(split_arrays(out, "train"), split_arrays(built, "train"), strict=True):
        np.testing.assert_array_equal(got, want)

    job = tmp_path / "job.yaml"
    job.write_text("name: augmented\nk_grid: [3, 5]\nepochs: 1\nbatch_size: 256\nn_init: 1\n")
    run_dir = tmp_path / "run"
    args = ["--cluster", str(cluster_file), "--store", str(out), "--out", str(run_dir)]
    proc = run_cli("run", str(job), *args, timeout=240)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["dataset"]["n_train"], metrics["dataset"]["n_test"]) == (N_ROWS, N_TEST)
    assert [r["k"] for r in metrics["results"]] == [3, 5]
