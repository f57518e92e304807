"""glibc's malloc thresholds for the processes that compute on chunks (README, "Performance": the workers' allocator).

A Dask nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (distributed's ``nanny.pre-spawn-environ``),
which returns freed memory to the system early but, being set explicitly, also switches off glibc's adaptive
thresholds: every block above 128 KiB — a chunk's distance matrix, its float32 rows, a partial_fit's 256-row
distance block at K=256 — is then a fresh ``mmap`` whose pages are faulted in and zeroed on every use. The
statistics passes ran 10-15% slower on workers than in a plain process for that alone.

:func:`tune` raises the mmap threshold to 4 MiB (and the trim threshold to 8 MiB), once per process: the per-call
temporaries of ``partial_fit`` and the selection pass's blocks come from the heap again, while chunk-sized arrays
(a cached chunk is 31 MB of float32) stay mappings that go back to the system when freed. Measured on the 1.2M-row
scale job (README, "Performance"; single runs, so only roughly): glibc's 32 MiB maximum made it 11% faster than the
nanny's setting but held 0.6 GB more at its peak (fragmented heaps); 4 MiB kept part of the gain (4%) for 0.06 GB.
Tasks call it on entry (``store.load_chunk``), so it holds on every kind of worker — nanny or not, embedded, remote
or SLURM — without a plugin or a worker option. Only the speed changes: no result depends on where memory comes from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The trim threshold is twice the mmap threshold, as glibc's own adaptation sets it.
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_state: dict[str, bool] = {}


def tune() -> bool:
    """Set this process's malloc thresholds (once; later calls return the first outcome). False where the C library
    is not glibc or refuses a value: nothing changes there."""
    if "tuned" not in _state:
        _state["tuned"] = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _state["tuned"]


def tuned() -> bool:
    """Whether :func:`tune` ran in this process and glibc took both values."""
    return _state.get("tuned", False)


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
