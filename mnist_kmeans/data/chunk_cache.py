"""The process-wide cache of decoded chunks that ``store.load_chunk`` keeps on each worker.

Every (K, restart) chain visits every chunk once per epoch. Without a cache, a worker would read and decode the
same chunk once per chain; with it, once per worker while it fits in the budget. An LRU bounded in bytes, so that
a store of millions of rows streams through at constant memory: ``MNIST_KMEANS_CHUNK_CACHE_MB`` (default 256, read
when this module is first imported; 0 turns the cache off). ``load_chunk`` keys entries by the store's
``ingest_id``, so that a rebuilt store is never served from a stale cache.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

CACHE_BYTES = int(os.environ.get("MNIST_KMEANS_CHUNK_CACHE_MB", "256")) * 2**20

Chunk = tuple[np.ndarray, np.ndarray]  # images and labels of one chunk, as load_chunk returns them


class ChunkCache:
    """A least-recently-used cache of chunks bounded by their bytes; safe to share between a worker's threads.

    Parameters
    ----------
    max_bytes : int
        Budget for the arrays of all chunks held; a chunk larger than it is never kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[Hashable, Chunk] = OrderedDict()
        self._lock = threading.Lock()
        self._nbytes = 0

    def get(self, key: Hashable) -> Chunk | None:
        """The chunk kept under ``key`` (now the most recently used), or None."""
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
        return None

    def put(self, key: Hashable, chunk: Chunk) -> None:
        """Keep ``chunk`` under ``key`` unless it is there already, dropping the least recently used to fit."""
        images, labels = chunk
        nbytes = images.nbytes + labels.nbytes
        with self._lock:
            if nbytes <= self.max_bytes and key not in self._chunks:
                self._chunks[key] = chunk
                self._nbytes += nbytes
                while self._nbytes > self.max_bytes:
                    _, (old_images, old_labels) = self._chunks.popitem(last=False)
                    self._nbytes -= old_images.nbytes + old_labels.nbytes

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._nbytes = 0


CACHE = ChunkCache(CACHE_BYTES)  # this process's: one per worker


def clear_cache() -> None:
    """Empty this process's cache, so that the next reads go to the store."""
    CACHE.clear()
