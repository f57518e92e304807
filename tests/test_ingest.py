"""Ingest: IDX files (directory or http) -> a store (docs/contract.md, "Store layout"); bad input; interruption;
re-ingest."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from mnist_kmeans.data.ingest import ingest
from mnist_kmeans.data.store import CHECKSUM_ATTR, FORMAT, chunk_checksum, open_store, read_attrs
from mnist_kmeans.errors import UserError
from tests.helpers import (
    ALL_IDX_NAMES,
    IDX_NAMES,
    MNIST_DIR,
    MNIST_MD5,
    IdxDataset,
    idx_bytes,
    make_small_store,
    quiet,
    run_cli,
    tree_snapshot,
    write_idx,
    write_idx_dataset,
    write_md5sums,
)


def rebuilt_md5(store: str, image_shape: tuple[int, int]) -> dict[str, str]:
    """md5 of the IDX files rebuilt from the store (header + data), per standard name."""
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    sums = {}
    for split, (images_name, labels_name) in IDX_NAMES.items():
        images = group[f"{split}/images"][:]
        sums[images_name] = hashlib.md5(idx_bytes(images.reshape(-1, *image_shape))).hexdigest()
        sums[labels_name] = hashlib.md5(idx_bytes(group[f"{split}/labels"][:])).hexdigest()
    return sums


def assert_store_holds(store: str, data: IdxDataset, chunk_rows: int) -> None:
    """The store is complete and holds exactly ``data``, laid out as docs/contract.md, "Store layout", says."""
    info = open_store(store)
    h, w = data.train_images.shape[1:]
    n_classes = int(max(data.train_labels.max(), data.test_labels.max())) + 1
    assert (info.image_shape, info.n_classes, info.chunk_rows) == ((h, w), n_classes, chunk_rows)
    assert info.md5 == data.md5
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    for split in IDX_NAMES:
        images, labels = data.arrays(split)
        stored_images, stored_labels = group[f"{split}/images"], group[f"{split}/labels"]
        assert (stored_images.dtype, stored_labels.dtype) == (np.uint8, np.uint8)
        assert stored_images.chunks == (chunk_rows, h * w) and stored_labels.chunks == (chunk_rows,)
        np.testing.assert_array_equal(stored_images[:], images.reshape(len(images), h * w))
        np.testing.assert_array_equal(stored_labels[:], labels)
    attrs = read_attrs(store)
    assert attrs["format"] == FORMAT and attrs["complete"] is True and attrs["image_shape"] == [h, w]
    assert len(attrs["ingest_id"]) == 32


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- good input -------------------------------------------------------------------------------------------------


def test_mnist_round_trip(tmp_path: Path) -> None:
    logs: list[str] = []
    info = ingest(str(MNIST_DIR), str(tmp_path / "mnist.zarr"), log=logs.append)
    assert (info.n_train, info.n_test, info.image_shape, info.n_classes) == (60000, 10000, (28, 28), 10)
    assert info.chunk_rows == 10_000 and info.md5 == MNIST_MD5
    assert rebuilt_md5(info.url, (28, 28)) == MNIST_MD5
    # The vendored copy is held to MNIST's published sums.
    assert sorted(line.split()[1] for line in logs if line.endswith("md5 ok")) == sorted(ALL_IDX_NAMES)


@pytest.mark.parametrize(
    "chunk_rows, gz, n_classes",
    [
        (None, False, 3),
        (64, True, 3),
        (1000, {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}, 7),  # one chunk larger than the split
    ],
)
def test_small_dataset(tmp_path: Path, chunk_rows: int | None, gz: object, n_classes: int) -> None:
    data = write_idx_dataset(tmp_path / "src", n_train=300, n_test=77, h=12, w=9, n_classes=n_classes, seed=1, gz=gz)
    store = str(tmp_path / "small.zarr")
    info = ingest(str(data.directory), store, chunk_rows=chunk_rows, log=quiet)
    assert (info.n_train, info.n_test, info.n_features) == (300, 77, 108)
    assert_store_holds(store, data, chunk_rows or 10_000)
    assert read_attrs(store)["source"] == str(data.directory)
    assert leftovers(tmp_path) == []


def test_http_source(tmp_path: Path, http_server: Callable[[Path], str]) -> None:
    data = write_idx_dataset(tmp_path / "src", n_train=250, n_test=60, seed=2, gz={"train-images-idx3-ubyte"})
    write_md5sums(data)  # over http too, a checksum list beside the files is enforced
    url = http_server(data.directory)
    logs: list[str] = []
    info = ingest(url, str(tmp_path / "http.zarr"), chunk_rows=100, log=logs.append)
    assert info.source == url
    assert sum(line.endswith("md5 ok") for line in logs) == 4
    assert_store_holds(info.url, data, 100)
    from_dir = ingest(str(data.directory), str(tmp_path / "dir.zarr"), chunk_rows=100, log=quiet)
    assert rebuilt_md5(info.url, (12, 9)) == rebuilt_md5(from_dir.url, (12, 9)) == data.md5


def test_http_missing_file(tmp_path: Path, http_server: Callable[[Path], str]) -> None:
    data = write_idx_dataset(tmp_path / "src", n_train=20, n_test=10)
    data.files["t10k-labels-idx1-ubyte"].unlink()
    url = http_server(data.directory)
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte: not found \(HTTP 404"):
        ingest(url, str(tmp_path / "s.zarr"), log=quiet)
    assert not (tmp_path / "s.zarr").exists() and leftovers(tmp_path) == []


# --- bad input: exit 2, one line naming the file and the fault, nothing overwritten ---------------------------------


def _rewrite(data: IdxDataset, name: str, edit: Callable[[bytes], bytes]) -> None:
    """Replace the uncompressed content of one file of ``data``, keeping its raw or .gz form."""
    path = data.files[name]
    gz = path.suffix == ".gz"
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    write_idx(path.with_suffix("") if gz else path, edit(raw), gz=gz)


def _set_byte(index: int, value: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:index] + bytes([value]) + raw[index + 1 :]


def _flip_middle(raw: bytes) -> bytes:
    middle = len(raw) // 2
    return raw[:middle] + bytes(b ^ 0xFF for b in raw[middle : middle + 8]) + raw[middle + 8 :]


def _edit(name: str, edit: Callable[[bytes], bytes]) -> Callable[[IdxDataset, Path], None]:
    """Break the uncompressed content of one file, keeping its raw or .gz form."""
    return lambda data, tmp: _rewrite(data, name, edit)


def _edit_file_bytes(name: str, edit: Callable[[IdxDataset, bytes], bytes]) -> Callable[[IdxDataset, Path], None]:
    """Break the bytes of one file as they are on disk (its gzip layer, for a .gz)."""

    def apply(data: IdxDataset, tmp: Path) -> None:
        path = data.files[name]
        path.write_bytes(edit(data, path.read_bytes()))

    return apply


def _missing(data: IdxDataset, tmp: Path) -> None:
    data.files["train-labels-idx1-ubyte"].unlink()


def _wrong_md5sums(data: IdxDataset, tmp: Path) -> None:
    write_md5sums(data, {"t10k-labels-idx1-ubyte": "0" * 32})


def _store_under_a_file(data: IdxDataset, tmp: Path) -> str:
    (tmp / "afile").write_text("keep")
    return str(tmp / "afile" / "store.zarr")  # unwritable even for root


def _store_is_other_files(data: IdxDataset, tmp: Path) -> str:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "keep.txt").write_text("keep")
    return str(tmp / "mine")


# Each case breaks a good source (train images .gz, the rest raw), or returns a bad store path to use instead of a
# good, complete store; then names what the one line on stderr must say.
BAD_INPUT = [
    pytest.param(_missing, ["train-labels-idx1-ubyte", "not found"], id="missing file"),
    pytest.param(
        _edit("t10k-images-idx3-ubyte", _set_byte(1, 0x03)),
        ["t10k-images-idx3-ubyte", "magic bytes 00 03 08 03"],
        id="wrong magic",
    ),
    pytest.param(
        _edit("t10k-labels-idx1-ubyte", _set_byte(2, 0x0D)),
        ["t10k-labels-idx1-ubyte", "0x0d (float32) is not supported"],
        id="not unsigned bytes",
    ),
    pytest.param(
        _edit("t10k-images-idx3-ubyte", lambda raw: raw[:10]),
        ["t10k-images-idx3-ubyte", "ends inside its IDX header"],
        id="header cut short",
    ),
    pytest.param(
        _edit("t10k-images-idx3-ubyte", lambda raw: raw[:3] + b"\x02" + raw[4:8] + raw[12:]),
        ["t10k-images-idx3-ubyte", "declares 2 dimensions, expected 3"],
        id="images of 2 dimensions",
    ),
    pytest.param(
        _edit("t10k-images-idx3-ubyte", lambda raw: raw[:-5]),
        ["t10k-images-idx3-ubyte", "truncated", "50x12x9"],
        id="truncated images",
    ),
    pytest.param(
        _edit("train-images-idx3-ubyte", lambda raw: raw[:1000]),
        ["train-images-idx3-ubyte.gz", "truncated", "200x12x9"],
        id="truncated images in gzip",
    ),
    pytest.param(
        _edit("t10k-labels-idx1-ubyte", lambda raw: raw + b"\x00"),
        ["t10k-labels-idx1-ubyte", "trailing data"],
        id="trailing bytes",
    ),
    pytest.param(
        _edit("train-labels-idx1-ubyte", lambda raw: raw[:4] + (199).to_bytes(4, "big") + raw[8:-1]),
        ["train-labels-idx1-ubyte", "199 labels", "200 images"],
        id="count mismatch",
    ),
    pytest.param(
        _edit("t10k-images-idx3-ubyte", lambda raw: raw[:12] + (8).to_bytes(4, "big") + raw[16 : 16 + 50 * 12 * 8]),
        ["t10k-images-idx3-ubyte", "12x8", "12x9"],
        id="train and test image sizes differ",
    ),
    pytest.param(
        _edit_file_bytes("train-images-idx3-ubyte", lambda data, raw: idx_bytes(data.train_images)),
        ["train-images-idx3-ubyte.gz", "not gzip-compressed"],
        id=".gz holding no gzip",
    ),
    pytest.param(
        _edit_file_bytes("train-images-idx3-ubyte", lambda data, raw: _flip_middle(raw)),
        ["train-images-idx3-ubyte.gz", "corrupt gzip stream"],
        id="corrupt gzip stream",
    ),
    pytest.param(
        _edit_file_bytes("train-images-idx3-ubyte", lambda data, raw: raw[:-20]),
        ["train-images-idx3-ubyte.gz", "corrupt gzip stream"],
        id="cut gzip stream",
    ),
    pytest.param(_wrong_md5sums, ["t10k-labels-idx1-ubyte", "md5", "expected " + "0" * 32], id="md5 mismatch"),
    pytest.param(_store_under_a_file, ["afile/store.zarr", "cannot create"], id="store under a regular file"),
    pytest.param(_store_is_other_files, ["mine", "not an mnist-kmeans store"], id="store is other files"),
]


@pytest.mark.parametrize("break_it, expected", BAD_INPUT)
def test_bad_input(tmp_path: Path, break_it: Callable[[IdxDataset, Path], str | None], expected: list[str]) -> None:
    data = write_idx_dataset(tmp_path / "src", n_train=200, n_test=50, gz={"train-images-idx3-ubyte"})
    good = tmp_path / "good.zarr"
    ingest(str(data.directory), str(good), chunk_rows=64, log=quiet)
    store = break_it(data, tmp_path) or str(good)
    before = {p.name: tree_snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir() if p.name != "src"}

    result = run_cli("ingest", "--source", str(data.directory), "--store", store, "--chunk-rows", "32", "--force")

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0]
    after = {p.name: tree_snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir() if p.name != "src"}
    assert after == before  # no new files (temporary directories removed), nothing rewritten


# --- interruption, re-ingest, --force ---------------------------------------------------------------------------


def test_killed_ingest_leaves_no_complete_store_and_the_next_one_finishes(tmp_path: Path) -> None:
    store = tmp_path / "mnist.zarr"
    command = [sys.executable, "-m", "mnist_kmeans", "ingest", "--source", str(MNIST_DIR), "--store", str(store)]
    proc = subprocess.Popen([*command, "--chunk-rows", "500"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("mnist.zarr.tmp-*/train/images/c/*")):  # a few chunks are written
            assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(UserError):
        open_store(str(store))
    assert len(leftovers(tmp_path)) == 1

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted ingest" in again.stderr
    assert leftovers(tmp_path) == []
    assert rebuilt_md5(str(store), (28, 28)) == MNIST_MD5 == open_store(str(store)).md5


def test_reingest_is_a_noop_and_force_rebuilds(tmp_path: Path) -> None:
    store, data = make_small_store(tmp_path, chunk_rows=64)
    first = open_store(store)
    before = tree_snapshot(Path(store))

    # The same data, from the same directory or from a copy elsewhere: nothing is written.
    copy = shutil.copytree(data.directory, tmp_path / "copy")
    for source in (data.directory, copy):
        result = run_cli("ingest", "--source", str(source), "--store", store)
        assert result.returncode == 0 and "nothing to do" in result.stderr.splitlines()[-1], result.stderr
    assert ingest(str(data.directory), store, chunk_rows=64, log=quiet) == first
    assert tree_snapshot(Path(store)) == before

    # Other data, or another chunk size, needs --force.
    other = write_idx_dataset(tmp_path / "other", n_train=120, n_test=30, h=7, w=5, n_classes=4, seed=9)
    for args in (["--source", str(other.directory)], ["--source", str(data.directory), "--chunk-rows", "32"]):
        result = run_cli("ingest", "--store", store, *args)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "use --force" in result.stderr
    assert tree_snapshot(Path(store)) == before

    rebuilt = ingest(str(other.directory), store, chunk_rows=50, force=True, log=quiet)
    assert rebuilt.ingest_id != first.ingest_id
    assert_store_holds(store, other, 50)
    assert leftovers(tmp_path) == []


def test_incomplete_store_is_rebuilt_without_force(tmp_path: Path) -> None:
    store, data = make_small_store(tmp_path)
    zarr.open_group(store, mode="r+", use_consolidated=False).attrs["complete"] = False
    with pytest.raises(UserError, match="incomplete"):
        open_store(store)
    ingest(str(data.directory), store, chunk_rows=64, log=quiet)
    assert_store_holds(store, data, 64)


def test_remote_store_is_written_in_place(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "src", n_train=90, n_test=40, gz=True)
    url = f"memory://ingest-test-{uuid.uuid4().hex}/store.zarr"  # an fsspec store: the remote code path
    first = ingest(str(data.directory), url, chunk_rows=32, log=quiet)
    assert_store_holds(url, data, 32)
    assert ingest(str(data.directory), url, log=quiet) == first
    assert ingest(str(data.directory), url, force=True, chunk_rows=16, log=quiet).ingest_id != first.ingest_id
    assert_store_holds(url, data, 16)


# --- every chunk is written, with its checksum ----------------------------------------------------------------


def test_ingest_writes_every_chunk_and_its_checksum_even_all_zero(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "idx", n_train=128, n_test=64, h=4, w=4, n_classes=2)
    data.train_images[:64] = 0  # the first chunk of images is all zeros ...
    data.train_labels[:64] = 0  # ... and so is the first chunk of labels
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte", idx_bytes(data.train_images))
    write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte", idx_bytes(data.train_labels))
    store = str(tmp_path / "zero.zarr")
    ingest(str(tmp_path / "idx"), store, chunk_rows=64, log=lambda line: None)
    for path in ("train/images/c/0/0", "train/labels/c/0", "train/images/c/1/0", "test/labels/c/0"):
        assert (Path(store) / path).is_file(), path
    info = open_store(store)
    sums = zarr.open_group(store, mode="r").attrs[CHECKSUM_ATTR]
    assert sums["train"]["images"][0] == chunk_checksum(np.zeros((64, 16), np.uint8))
    assert list(info.checksums["test"]["labels"]) == [chunk_checksum(data.test_labels)]


def test_a_one_class_data_set_is_said_in_the_singular(tmp_path: Path) -> None:
    """The summary line says "1 class", not "1 classes"."""
    data = write_idx_dataset(tmp_path / "idx", n_train=20, n_test=5, n_classes=1)
    proc = run_cli("ingest", "--source", str(data.directory), "--store", str(tmp_path / "s.zarr"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 class," in proc.stderr and "1 classes" not in proc.stderr, proc.stderr
