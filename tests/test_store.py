"""The store (``data/store.py``): a chunk read is the chunk ingested, or an error that names it.

Each test damages a copy of the session's store (3,000 + 500 rows of 10x10 in chunks of 500) the way a shared file
system can: a changed, missing or undecodable chunk is refused with the store, split, chunk and rows, never read as
valid data; the check itself costs little beside decoding.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from mnist_kmeans.data.chunk_cache import clear_cache
from mnist_kmeans.data.store import CHECKSUM_ATTR, StoreError, chunk_checksum, load_chunk, open_store, read_rows_at
from mnist_kmeans.errors import UserError
from tests.helpers import IdxDataset, copy_store


@pytest.fixture
def store_copy(kgrid_store: tuple[str, IdxDataset], tmp_path: Path) -> str:
    """A copy of the session's store, for the test to damage."""
    return copy_store(kgrid_store[0], tmp_path / "store.zarr")


def load_error(store: str, split: str = "train", chunk: int = 3) -> str:
    clear_cache()
    info = open_store(store)
    with pytest.raises(StoreError) as caught:
        load_chunk(info, split, chunk)
    return str(caught.value)


def test_a_changed_chunk_fails_its_checksum(store_copy: str) -> None:
    group = zarr.open_group(store_copy, mode="r+", use_consolidated=False)
    block = group["train/images"][1500:2000]
    block[17, 3] ^= 1  # one bit of one pixel: decodes fine, reads as a valid image
    group["train/images"][1500:2000] = block
    message = load_error(store_copy)
    assert message.startswith(
        f"{store_copy}: train chunk 3 (rows 1500-1999): the images chunk does not match its checksum"
    )
    assert "ingest --force" in message


def test_an_undecodable_chunk_is_named(store_copy: str) -> None:
    (Path(store_copy) / "test" / "labels" / "c" / "0").write_bytes(b"\x00garbage" * 10)
    message = load_error(store_copy, "test", 0)
    assert message.startswith(f"{store_copy}: test chunk 0 (rows 0-499): cannot read: "), message


def test_a_sample_read_across_chunks_names_the_undecodable_one(store_copy: str) -> None:
    """The k-means++ sample is read row by row across chunks (``read_rows_at``): its error names the chunk too."""
    (Path(store_copy) / "train" / "images" / "c" / "4" / "0").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(StoreError, match=r"train chunk 4 \(rows 2000-2499\): cannot read: "):
        read_rows_at(store_copy, "train", np.array([3, 700, 2100, 2900]))


def test_a_missing_labels_chunk_is_named(store_copy: str) -> None:
    (Path(store_copy) / "train" / "labels" / "c" / "5").unlink()
    assert "train chunk 5 (rows 2500-2999): the labels chunk is missing from the store" in load_error(
        store_copy, chunk=5
    )


def test_a_store_without_checksums_still_detects_a_missing_images_chunk(store_copy: str) -> None:
    """Stores ingested before checksums existed are read (verified when present); a lost images chunk is caught."""
    group = zarr.open_group(store_copy, mode="r+", use_consolidated=False)
    attrs = dict(group.attrs)
    del attrs[CHECKSUM_ATTR]
    group.attrs.put(attrs)
    clear_cache()
    info = open_store(store_copy)
    assert info.checksums == {}
    load_chunk(info, "train", 3)  # intact: read as before
    clear_cache()
    (Path(store_copy) / "train" / "images" / "c" / "3" / "0").unlink()
    message = load_error(store_copy)
    assert "train chunk 3 (rows 1500-1999): the images chunk is missing" in message and "--force" in message


def test_store_error_travels_between_processes_as_itself() -> None:
    """Dask pickles a task's exception on the worker and raises it on the client: it must stay a StoreError."""
    err = StoreError("s.zarr: train chunk 3 (rows 1500-1999): the images chunk is missing from the store")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StoreError and isinstance(back, UserError) and str(back) == str(err)


def test_checksum_costs_little_beside_decoding() -> None:
    """The check runs on every cache miss: on a 10,000-row MNIST-sized chunk it must stay in the milliseconds."""
    block = np.random.default_rng(0).integers(0, 256, size=(10_000, 784), dtype=np.uint8)
    t0 = time.perf_counter()
    for _ in range(5):
        chunk_checksum(block)
    assert (time.perf_counter() - t0) / 5 < 0.05  # ~7 ms here; generous for a loaded machine


def test_a_chunk_reads_as_exactly_its_bytes_over_255_in_float32(kgrid_store: tuple[str, IdxDataset]) -> None:
    """Every result depends on these bits: each stored byte b becomes float32(b) / float32(255), correctly rounded."""
    clear_cache()
    info = open_store(kgrid_store[0])
    x, _ = load_chunk(info, "train", 1)
    stored = kgrid_store[1].train_images.reshape(len(kgrid_store[1].train_images), -1)[500:1000]
    assert x.dtype == np.float32 and len(np.unique(stored)) > 100
    expected = (stored.astype(np.float64) / 255).astype(np.float32)  # the float64 quotient, rounded once
    assert np.array_equal(x.view(np.uint32), expected.view(np.uint32))
