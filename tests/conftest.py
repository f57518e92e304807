"""Fixtures shared by the test modules, built on the plain helpers of ``tests/helpers.py``."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from mnist_kmeans.data.store import StoreInfo, open_store
from tests.helpers import (
    KGRID_STORE_ARGS,
    MNIST_DIR,
    S3_PORTS,
    IdxDataset,
    QuietHTTPHandler,
    S3Server,
    free_port_range,
    make_small_store,
)


@pytest.fixture
def http_server() -> Iterator[Callable[..., str]]:
    """``serve(directory, handler_class=QuietHTTPHandler) -> base URL``: a real HTTP server on 127.0.0.1 for the test's
    duration (``handler_class``: a subclass of QuietHTTPHandler, e.g. one that holds a file back)."""
    servers: list[ThreadingHTTPServer] = []

    def serve(directory: Path, handler_class: type[QuietHTTPHandler] = QuietHTTPHandler) -> str:
        handler = functools.partial(handler_class, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def kgrid_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, IdxDataset]:
    """One store for the whole session (see ``KGRID_STORE_ARGS``) and the data it holds; tests only read it."""
    return make_small_store(tmp_path_factory.mktemp("kgrid-store"), **KGRID_STORE_ARGS)


@pytest.fixture(scope="module")
def store_info(kgrid_store: tuple[str, IdxDataset]) -> StoreInfo:
    """``open_store`` of the session's store."""
    return open_store(kgrid_store[0])


@pytest.fixture(scope="session")
def mnist_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data home (``MNIST_KMEANS_DATA``) for the session: ``mnist/`` the repository's MNIST files (a link),
    ``mnist.zarr`` the default store ingested from them; tests only read it."""
    from mnist_kmeans.data.ingest import ingest

    home = tmp_path_factory.mktemp("mnist-home")
    (home / "mnist").symlink_to(MNIST_DIR)
    ingest(str(home / "mnist"), str(home / "mnist.zarr"), log=lambda line: None)
    return home


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server on loopback for the session (scripts/s3-server.sh), with a bucket ``test``."""
    server = S3Server(tmp_path_factory.mktemp("s3"), free_port_range(S3_PORTS)).start()
    try:
        server.filesystem().mkdir("test")
        yield server
    finally:
        server.stop()
