"""A store is trusted only as far as it checks out (docs/contract.md, "Store layout", "ingest", "run").

- Every group attribute is checked against the arrays when the store is opened, so a store that misdescribes itself
  is exit 2 with one line naming the store and the attribute, before any cluster starts or any run directory exists;
  labels changed after the store was written are caught by the worker that reads them.
- Only the default store is ingested on demand: a store named by ``--store`` or a job's ``store:`` that is missing,
  unfinished or untrusted is exit 2, and nothing is written in its place.
- One writer per store: a second ingest (or augment) into a store that another one is writing is exit 2 and changes
  nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
import zarr

from mnist_kmeans.cli import main
from mnist_kmeans.data.chunk_cache import clear_cache
from mnist_kmeans.data.store import StoreError, load_chunk, open_store, read_attrs
from mnist_kmeans.errors import UserError
from tests.helpers import IdxDataset, QuietHTTPHandler, copy_store, run_cli, tree_snapshot, write_idx_dataset

JOB = {"name": "trust", "k_grid": [3], "epochs": 1, "batch_size": 100, "n_init": 1, "lloyd_steps": 0, "seed": 0}
# Threads in this process: should a bad store get past the checks, the job fails fast instead of waiting on processes.
THREADS_CLUSTER = "local: {n_workers: 1, threads_per_worker: 2, processes: false, dashboard_address: '127.0.0.1:0'}\n"
DROP = object()  # as a value in `with_attrs`: remove the attribute


def with_attrs(store: str, dst: Path, **changes: object) -> str:
    """A copy of ``store`` at ``dst`` whose group attributes are changed (``DROP`` removes one), through Zarr."""
    copy = copy_store(store, dst)
    group = zarr.open_group(copy, mode="r+", use_consolidated=False)
    attrs = {**dict(group.attrs), **changes}
    group.attrs.put({k: v for k, v in attrs.items() if v is not DROP})
    return copy


def run_argv(tmp: Path, store: str | None, job: dict = JOB) -> list[str]:
    """``run`` of ``job`` (written to ``tmp/job.yaml``) on a threads cluster, into ``tmp/run``."""
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp / "cluster.yaml").write_text(THREADS_CLUSTER)
    store_args = ["--store", store] if store is not None else []
    job_and_cluster = [str(tmp / "job.yaml"), "--cluster", str(tmp / "cluster.yaml")]
    return ["run", *job_and_cluster, *store_args, "--out", str(tmp / "run")]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ") and len(lines[0]) < 400, lines[0]
    return lines[0]


# --- class 3: every attribute is checked against the arrays, before a cluster starts -----------------------------

# The session's store: 3,000 + 500 rows of 10x10 in chunks of 500, labels 0..4, n_classes 5.
BAD_ATTRIBUTES = [
    ("n_classes", 2, "is 2, but the store holds label 4"),
    ("n_classes", 257, "must be an integer in 1..256"),  # 1e9: in a child process below (it could exhaust memory)
    ("n_classes", "5", "got '5'"),
    ("n_classes", True, "got True"),
    ("n_classes", 5.0, "got 5.0"),
    ("label_max", {"train": 4}, "must be {train: L, test: L}"),
    ("label_max", {"train": 4, "test": 300}, "labels in 0..255"),
    ("image_shape", [10, 11], "10x11 does not match the 100 pixels per row"),
    ("image_shape", [10.0, 10.0], "must be [H, W] of two positive integers"),
    ("image_shape", [100], "must be [H, W]"),
    ("chunk_rows", 250, "is 250, but the arrays' chunks say 500"),
    ("chunk_rows", DROP, "is nothing (missing)"),
    ("md5", {"train-images-idx3-ubyte": 5}, "must map file names to md5 sums"),
    ("md5", {"train-images-idx3-ubyte": "not-hex"}, "must map file names to md5 sums"),
    ("md5", ["a"], "must map file names"),
    ("source", 5, "must be a string, got 5"),
    ("ingest_id", "", "must be 32 hex digits"),
    ("ingest_id", 7, "must be 32 hex digits, got 7"),
    ("ingest_id", "y" * 5000, "must be 32 hex digits, got 'yyy"),
    ("complete", "yes", "must be true or false, got 'yes'"),
    ("complete", DROP, "must be true or false, got nothing (missing)"),
    ("format", 1, "the store format is 1"),
    ("chunk_crc32", {"train": "nope"}, "must be a list of 6 CRC-32 values"),
]


BAD_IDS = [f"{n}={'missing' if v is DROP else str(v)[:12]}" for n, v, _ in BAD_ATTRIBUTES]


@pytest.mark.parametrize("name, value, says", BAD_ATTRIBUTES, ids=BAD_IDS)
def test_a_wrong_attribute_is_refused_before_a_cluster_starts(
    name: str,
    value: object,
    says: str,
    kgrid_store: tuple[str, IdxDataset],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = with_attrs(kgrid_store[0], tmp_path / "changed.zarr", **{name: value})
    before = tree_snapshot(Path(store))
    code = main(run_argv(tmp_path, store))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{store}: attribute {name}: " in line and says in line, line
    assert not (tmp_path / "run").exists()  # no run directory: nothing started
    assert tree_snapshot(Path(store)) == before


def test_absurd_n_classes_through_the_command_line(kgrid_store: tuple[str, IdxDataset], tmp_path: Path) -> None:
    """The reported case, as a user meets it: ``n_classes: 1e9`` is one line and exit 2, no run directory."""
    store = with_attrs(kgrid_store[0], tmp_path / "huge.zarr", n_classes=10**9)
    done = run_cli(*run_argv(tmp_path, store), cwd=tmp_path)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and f"{store}: attribute n_classes: must be an integer in 1..256" in line
    assert not (tmp_path / "run").exists()


def test_a_store_without_label_max_is_checked_from_its_labels(
    kgrid_store: tuple[str, IdxDataset], tmp_path: Path
) -> None:
    """A store ingested before ``label_max`` existed: its labels are read once on the client instead."""
    old = with_attrs(kgrid_store[0], tmp_path / "old.zarr", label_max=DROP)
    assert open_store(old).n_classes == 5
    lying = with_attrs(old, tmp_path / "lying.zarr", n_classes=4)
    with pytest.raises(UserError, match=r"attribute n_classes: is 4, but the store holds label 4"):
        open_store(lying)


def test_a_worker_refuses_labels_beyond_n_classes(kgrid_store: tuple[str, IdxDataset], tmp_path: Path) -> None:
    """Attributes that agree with each other but not with the labels (changed afterwards): the chunk is named."""
    store = with_attrs(kgrid_store[0], tmp_path / "relabelled.zarr", n_classes=3, label_max={"train": 2, "test": 2})
    info = open_store(store)
    clear_cache()
    with pytest.raises(StoreError) as caught:
        load_chunk(info, "train", 2)
    assert str(caught.value).startswith(
        f"{store}: train chunk 2 (rows 1000-1499): holds label 4, but the store says n_classes is 3"
    )


def test_ingest_records_label_max(kgrid_store: tuple[str, IdxDataset]) -> None:
    store, data = kgrid_store
    attrs = read_attrs(store)
    assert attrs["label_max"] == {"train": int(data.train_labels.max()), "test": int(data.test_labels.max())}
    assert attrs["n_classes"] == 5


# --- class 4: only the default store is ingested on demand --------------------------------------------------------
# These run from the repository, where data/mnist exists: a store that were filled on demand would be filled there.


def test_an_explicit_missing_store_is_refused_not_filled(tmp_path: Path) -> None:
    missing = tmp_path / "x" / "nostore.zarr"
    done = run_cli(*run_argv(tmp_path, str(missing)))
    line = one_error_line(done.stderr)
    assert done.returncode == 2
    assert f"{missing}: no store there" in line and f"mnist-kmeans ingest --store {missing}" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "run").exists()


def test_a_job_files_missing_store_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "typo.zarr"
    done = run_cli(*run_argv(tmp_path, None, job={**JOB, "store": str(missing)}))
    assert done.returncode == 2 and f"{missing}: no store there" in one_error_line(done.stderr)
    assert not missing.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "complete, says", [(False, "store is incomplete"), ("yes", "attribute complete"), (1, "attribute complete")]
)
def test_a_named_unfinished_or_untrusted_store_is_not_rebuilt(
    complete: object, says: str, kgrid_store: tuple[str, IdxDataset], tmp_path: Path
) -> None:
    store = with_attrs(kgrid_store[0], tmp_path / "named.zarr", complete=complete)
    before = tree_snapshot(Path(store))
    done = run_cli(*run_argv(tmp_path, store))
    assert done.returncode == 2 and says in one_error_line(done.stderr)
    assert tree_snapshot(Path(store)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.yaml", "job.yaml", "named.zarr"]


def test_the_default_store_is_ingested_on_demand_only_when_missing_or_unfinished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default store ``<data home>/mnist.zarr`` is made from ``<data home>/mnist`` when missing or
    ``complete: false``; with a ``complete`` that is neither, it is refused and left as it is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_KMEANS_DATA", str(tmp_path / "data"))
    data = write_idx_dataset(tmp_path / "data" / "mnist", n_train=60, n_test=20, h=4, w=4)
    too_big = {**JOB, "k_grid": [500]}  # refused once the store is open: no cluster needed to see the ingest
    argv = run_argv(tmp_path, None, job=too_big)
    store = tmp_path / "data" / "mnist.zarr"

    assert main(argv) == 2 and "K=500 is larger than the 60 training rows" in capsys.readouterr().err
    assert open_store(str(store)).md5 == data.md5
    first = read_attrs(str(store))["ingest_id"]

    group = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    group.attrs["complete"] = "yes"
    before = tree_snapshot(store)
    assert main(argv) == 2 and "attribute complete" in one_error_line(capsys.readouterr().err)
    assert tree_snapshot(store) == before

    group.attrs["complete"] = False
    assert main(argv) == 2 and "there was no complete store" in capsys.readouterr().err
    assert read_attrs(str(store))["ingest_id"] != first and open_store(str(store)).md5 == data.md5


def test_ingest_rebuilds_an_untrusted_store_only_with_force(
    tmp_path: Path, kgrid_store: tuple[str, IdxDataset]
) -> None:
    store = with_attrs(kgrid_store[0], tmp_path / "s.zarr", complete=1)
    data = write_idx_dataset(tmp_path / "idx", n_train=50, n_test=10)
    before = tree_snapshot(Path(store))
    done = run_cli("ingest", "--source", str(data.directory), "--store", store, cwd=tmp_path)
    assert done.returncode == 2 and f"{store}: attribute complete: must be true or false, got 1" in one_error_line(
        done.stderr
    )
    assert tree_snapshot(Path(store)) == before
    forced = run_cli("ingest", "--source", str(data.directory), "--store", store, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert open_store(store).md5 == data.md5


# --- class 5b: one writer per store --------------------------------------------------------------------------------


class _HeldBack(QuietHTTPHandler):
    """Sends the first 4 kB of ``train-images-idx3-ubyte`` (its header and a little), then waits for ``release``."""

    release = threading.Event()

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001 - the signature of the base class
        if self.path.endswith("/train-images-idx3-ubyte"):
            outputfile.write(source.read(4096))
            outputfile.flush()
            self.release.wait(60)
        shutil.copyfileobj(source, outputfile)


def test_two_ingests_into_one_new_store(tmp_path: Path, http_server: Callable[..., str]) -> None:
    """Ingest A (held mid-stream by its HTTP source) is writing the store when ingest B of other data starts: B is
    refused and changes nothing; A finishes, and the store holds A's data."""
    a = write_idx_dataset(tmp_path / "a", n_train=500, n_test=50, seed=1)
    b = write_idx_dataset(tmp_path / "b", n_train=400, n_test=40, seed=2)
    store = tmp_path / "race.zarr"
    _HeldBack.release.clear()
    url = http_server(a.directory, _HeldBack)
    command = [sys.executable, "-m", "mnist_kmeans", "ingest", "--store", str(store), "--chunk-rows", "100"]
    first = subprocess.Popen([*command, "--source", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("race.zarr.tmp-*")):  # A has claimed the store and is writing it
            assert first.poll() is None and time.monotonic() < deadline, "ingest A did not start writing"
            time.sleep(0.02)
        listing = sorted(p.name for p in tmp_path.iterdir())
        second = run_cli("ingest", "--store", str(store), "--chunk-rows", "100", "--source", str(b.directory))
        assert sorted(p.name for p in tmp_path.iterdir()) == listing  # B wrote nothing, not even beside the store
    finally:
        _HeldBack.release.set()
        out, err = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"{store}: another ingest or augment is writing it" in one_error_line(second.stderr)
    assert first.returncode == 0 and "ingest: wrote" in err, err
    assert open_store(str(store)).md5 == a.md5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "race.zarr"]  # the lock file went with A


def test_a_lock_file_left_by_a_killed_ingest_blocks_nobody(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "idx", n_train=50, n_test=10)
    (tmp_path / "s.zarr.lock").write_text("")  # as SIGKILL leaves it: the file, without its flock
    done = run_cli("ingest", "--source", str(data.directory), "--store", str(tmp_path / "s.zarr"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "s.zarr"]


def test_augment_into_a_store_being_written_is_refused_before_a_cluster_starts(
    kgrid_store: tuple[str, IdxDataset], tmp_path: Path
) -> None:
    out = tmp_path / "aug.zarr"
    (tmp_path / "cluster.yaml").write_text(THREADS_CLUSTER)
    lock = os.open(tmp_path / "aug.zarr.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a writer of aug.zarr holds it (docs/contract.md, "ingest")
    try:
        done = run_cli(
            "augment", "--store", kgrid_store[0], "--out", str(out), "--rows", "600", "--cluster", "cluster.yaml",
            cwd=tmp_path,
        )  # fmt: skip
    finally:
        os.close(lock)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and f"{out}: another ingest or augment is writing it" in line
    assert "dashboard" not in done.stdout and not out.exists()
