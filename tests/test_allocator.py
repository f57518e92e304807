"""The workers' malloc thresholds (allocator.py): a 1 MiB temporary comes from a fresh mmap under the nanny's
``MALLOC_TRIM_THRESHOLD_`` and from the heap once ``allocator.tune`` ran, in a plain process and on a real worker."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
from distributed import Client, LocalCluster

from mnist_kmeans import allocator
from mnist_kmeans.data.store import load_chunk


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def mmapped_blocks_of_a_temporary(nbytes: int = 1 << 20) -> int:
    """How many blocks glibc maps for one live ``nbytes`` numpy temporary (0: it came from the heap)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    before = libc.mallinfo2().hblks
    temporary = np.ones(nbytes, dtype=np.uint8)
    during = libc.mallinfo2().hblks
    del temporary
    return int(during - before)


def test_tune_moves_temporaries_from_fresh_mappings_to_the_heap() -> None:
    script = (
        "from tests.test_allocator import mmapped_blocks_of_a_temporary as blocks\n"
        "from mnist_kmeans import allocator\n"
        "before = blocks(); ok = allocator.tune(); print(before, ok, allocator.tune(), blocks())\n"
    )
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # what a Dask nanny gives its worker
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "True", "True", "0"]


def test_a_task_tunes_its_worker(store_info) -> None:
    """A nanny's worker starts with the adaptive thresholds off; the first chunk a task reads tunes it."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        assert list(client.run(mmapped_blocks_of_a_temporary).values()) == [1]
        assert list(client.run(allocator.tuned).values()) == [False]
        client.submit(load_chunk, store_info, "train", 0).result()
        assert list(client.run(allocator.tuned).values()) == [True]
        assert list(client.run(mmapped_blocks_of_a_temporary).values()) == [0]
