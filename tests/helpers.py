"""Shared test helpers: where things are, small IDX data sets made on the spot, small stores, the CLI as a subprocess,
real Dask processes, and the chain states of the fit tests.

Everything here is real: files on disk, Zarr stores written by the package's own ingest, the command line run as a
child process. Plain functions and classes, imported as ``from tests.helpers import ...``; the fixtures built on them
live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mnist_kmeans.fit import ChainState, FitParams, draw_sample, init_chain

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT / "data" / "mnist"
# The four names of docs/contract.md, split -> (images, labels). Written out, not imported: the tests state the
# contract.
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_IDX_NAMES = tuple(n for pair in IDX_NAMES.values() for n in pair)
# MNIST's published md5 sums of the uncompressed files.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


# --- IDX files --------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic ``00 00 08 ndim``, big-endian uint32 sizes, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, data: bytes, gz: bool = False) -> Path:
    """Write IDX bytes to ``path`` (``path + '.gz'``, gzip-compressed, when ``gz``); return the file written."""
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if gz else data)
    return path


@dataclass
class IdxDataset:
    """A small data set written as the four IDX files; arrays as written, images ``(n, h, w)``."""

    directory: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)  # standard name -> the file written (raw or .gz)
    md5: dict[str, str] = field(default_factory=dict)  # standard name -> md5 of the uncompressed bytes

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return (self.train_images, self.train_labels) if split == "train" else (self.test_images, self.test_labels)


def write_idx_dataset(
    directory: Path,
    n_train: int = 300,
    n_test: int = 100,
    h: int = 12,
    w: int = 9,
    n_classes: int = 3,
    seed: int = 0,
    gz: bool | Collection[str] = False,
) -> IdxDataset:
    """Write a small MNIST-format data set into ``directory`` and return it.

    Each class is a random template image plus noise, so the classes are real clusters; every class occurs in both
    splits when the split has at least ``n_classes`` rows. ``gz``: ``True`` compresses all four files, ``False``
    none, or a collection of standard names compresses those.
    """
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(n_classes, h, w))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = IdxDataset(directory, *_split(rng, templates, n_train), *_split(rng, templates, n_test))
    for split, (images_name, labels_name) in IDX_NAMES.items():
        for name, array in zip((images_name, labels_name), data.arrays(split), strict=True):
            raw = idx_bytes(array)
            compress = gz if isinstance(gz, bool) else name in gz
            data.files[name] = write_idx(directory / name, raw, gz=compress)
            data.md5[name] = hashlib.md5(raw).hexdigest()
    return data


def _split(rng: np.random.Generator, templates: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % len(templates)).astype(np.uint8)
    noise = rng.integers(-40, 41, size=(n, *templates.shape[1:]))
    return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels


def write_md5sums(dataset: IdxDataset, overrides: dict[str, str] | None = None) -> Path:
    """An ``MD5SUMS`` file beside the data set's files (``md5sum`` format), with some sums replaced if asked."""
    sums = {**dataset.md5, **(overrides or {})}
    path = dataset.directory / "MD5SUMS"
    path.write_text("".join(f"{sums[name]}  {name}\n" for name in ALL_IDX_NAMES))
    return path


# --- stores and the command line --------------------------------------------------------------------------------


def make_small_store(directory: Path, chunk_rows: int = 64, **dataset_args) -> tuple[str, IdxDataset]:
    """A complete store of a small data set (see :func:`write_idx_dataset`), made by the package's own ingest."""
    from mnist_kmeans.data.ingest import ingest

    data = write_idx_dataset(Path(directory) / "idx", **dataset_args)
    store = str(Path(directory) / "small.zarr")
    ingest(str(data.directory), store, chunk_rows=chunk_rows, log=lambda line: None)
    return store, data


def run_cli(*args: str, timeout: float = 120, cwd: Path | str = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m mnist_kmeans ARGS`` in a child process, output captured as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mnist_kmeans", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def tree_snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root``: relative path -> (bytes, mtime_ns); equal snapshots mean nothing was rewritten."""
    root = Path(root)
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def quiet(line: str) -> None:
    """A ``log`` that drops every line."""


def copy_store(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


class QuietHTTPHandler(SimpleHTTPRequestHandler):
    """Serves a directory without logging each request to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the signature of the base class
        pass


# --- the K-grid fit (tests/test_fit.py, tests/test_run.py, ...) ------------------------------------------------

# 3,000 + 500 images of 10x10, 5 classes, chunks of 500 rows: six training chunks, one test chunk.
KGRID_STORE_ARGS = {"chunk_rows": 500, "n_train": 3000, "n_test": 500, "h": 10, "w": 10, "n_classes": 5, "seed": 11}


# --- real Dask processes and runs to disturb (tests/test_reliability.py, tests/test_cluster.py) -----------------------


def loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_session(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and whatever it started (TERM, then KILL)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


# One BLAS/OpenMP thread per worker process, as the nanny sets it (``--no-nanny`` workers do not get it).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker_args(address: str, local_directory: Path) -> list[str]:
    """``dask worker`` arguments for one worker process of one thread and 2 GiB on loopback (a nanny unless the
    caller adds ``--no-nanny``)."""
    return [
        "worker",
        address,
        "--nthreads",
        "1",
        "--nworkers",
        "1",
        "--memory-limit",
        "2GiB",
        "--host",
        "127.0.0.1",
        "--dashboard-address",
        "127.0.0.1:0",
        "--death-timeout",
        "120",
        "--local-directory",
        str(local_directory),
    ]


class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, each in its own session so that a test can
    kill one alone; ``tls`` = ``{"ca_file", "cert", "key"}`` makes every process speak ``tls://`` with those files."""

    def __init__(self, root: Path, tls: dict[str, str] | None = None, connect_timeout: float = 60):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.address = ""  # known once the scheduler has chosen its port (start_scheduler)
        self.scheduler_file = self.root / "scheduler.json"
        self.connect_timeout = connect_timeout
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._n = 0

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--tls-ca-file", self.tls["ca_file"], "--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]]

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - the child holds it
        try:
            return subprocess.Popen(
                [str(Path(sys.executable).parent / "dask"), *args],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **ONE_THREAD_ENV, **(env or {})},
            )
        finally:
            log.close()

    def start_scheduler(self, timeout: float = 120, env: dict[str, str] | None = None) -> DaskCluster:
        """Start the scheduler on a port it chooses itself (no race for a port picked in advance) and wait for the
        address it writes to its scheduler file; ``env``: extra environment (e.g. ``DASK_...`` settings)."""
        import json
        import time

        args = [
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--idle-timeout",
            "900",
            "--scheduler-file",
            str(self.scheduler_file),
        ]
        if self.tls:
            args += ["--protocol", "tls", *self._tls_args()]
        self.scheduler_file.unlink(missing_ok=True)
        self.scheduler = self._spawn("scheduler", args, env)
        deadline = time.monotonic() + timeout
        while not self.address:
            try:
                self.address = json.loads(self.scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                if self.scheduler.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the scheduler did not start; see {self.root / 'scheduler.log'}") from None
                time.sleep(0.05)
        return self

    def add_worker(
        self, nanny: bool = False, env: dict[str, str] | None = None, extra: Sequence[str] = ()
    ) -> subprocess.Popen:
        """One worker process of one thread (``nanny``: under a nanny, which restarts it when it dies); ``extra``
        arguments come last, e.g. ``["--memory-limit", "200MB"]`` overriding worker_args' 2 GiB."""
        self._n += 1
        args = [*worker_args(self.address, self.root / f"worker{self._n}"), *self._tls_args(), *extra]
        if not nanny:
            args.append("--no-nanny")
        proc = self._spawn(f"worker{self._n}", args, env)
        self.workers.append(proc)
        return proc

    def security(self) -> Any:
        if not self.tls:
            return None
        from distributed.security import Security

        return Security(
            tls_ca_file=self.tls["ca_file"],
            tls_client_cert=self.tls["cert"],
            tls_client_key=self.tls["key"],
            require_encryption=True,
        )

    def client(self) -> Any:
        from distributed import Client

        return Client(self.address, timeout=self.connect_timeout, security=self.security())

    def wait_for_workers(self, n: int, timeout: float = 120) -> dict[str, int]:
        """Block until ``n`` workers are registered; return ``{worker address: pid}``."""
        with self.client() as client:
            client.wait_for_workers(n, timeout=timeout)
            return client.run(os.getpid)

    def stop(self) -> None:
        for proc in [*reversed(self.workers), *([self.scheduler] if self.scheduler else [])]:
            stop_session(proc)


def chain_progress(run_dir: Path) -> dict[str, tuple[int, int]]:
    """``k{K}/r{R}`` -> (epochs_done, lloyd_done) saved so far in a live run's ``centroids.zarr``, files read
    directly."""
    import json

    out = {}
    for meta in (Path(run_dir) / "centroids.zarr" / "chains").glob("k*/r*/zarr.json"):
        try:
            attrs = json.loads(meta.read_text())["attributes"]
            out[f"{meta.parent.parent.name}/{meta.parent.name}"] = (int(attrs["epochs_done"]), int(attrs["lloyd_done"]))
        except (OSError, ValueError, KeyError):
            continue  # being written
    return out


@dataclass
class LiveRun:
    """``python -m mnist_kmeans ARGS`` started in its own session, output to files, for a test to disturb."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, args: list[str], logs: Path, env: dict[str, str] | None = None) -> LiveRun:
        """The run; it takes SIGINT as a terminal's Ctrl-C even when this process ignores it (a background shell's
        tests: a child would inherit that, and Python would never raise KeyboardInterrupt in it)."""
        import signal

        logs.parent.mkdir(parents=True, exist_ok=True)
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = cls._popen(args, out, err, env)
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        return cls(proc, out, err)

    @staticmethod
    def _popen(args: list[str], out: Path, err: Path, env: dict[str, str] | None) -> subprocess.Popen:
        with open(out, "w") as fo, open(err, "w") as fe:
            return subprocess.Popen(
                [sys.executable, "-m", "mnist_kmeans", *args],
                cwd=REPO_ROOT,
                stdout=fo,
                stderr=fe,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )

    def wait_for_epoch(self, run_dir: Path, timeout: float = 240) -> dict[str, tuple[int, int]]:
        """Poll until some chain has saved an epoch; return the progress then (empty if the run ended first)."""
        import time

        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            progress = chain_progress(run_dir)
            if any(e >= 1 for e, _ in progress.values()):
                return progress
            time.sleep(0.02)
        return {}

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        """Wait for the exit; return (exit code, stdout, stderr). The session is stopped in any case."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            stop_session(self.proc)
        return self.proc.returncode, self.out.read_text(), self.err.read_text()


# --- chain states (tests/test_fit.py, tests/test_checkpoint.py, tests/test_evaluate.py) -----------------------------


def blobs(n: int, d: int = 16, n_blobs: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows in [0, 1] around ``n_blobs`` well separated centers, and the blob of each row."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.2, 0.8, size=(n_blobs, d))
    y = rng.integers(0, n_blobs, size=n)
    x = np.clip(means[y] + rng.normal(0, 0.05, size=(n, d)), 0, 1).astype(np.float32)
    return x, y.astype(np.int64)


def assert_states_equal(a: ChainState, b: ChainState) -> None:
    assert (a.k, a.restart, a.epoch, a.chunks_done) == (b.k, b.restart, b.epoch, b.chunks_done)
    assert a.centers.dtype == b.centers.dtype == np.float32
    assert a.counts.dtype == b.counts.dtype == np.float32
    assert np.array_equal(a.centers, b.centers)
    assert np.array_equal(a.counts, b.counts)
    assert (a.n_since_last_reassign, a.n_steps) == (b.n_since_last_reassign, b.n_steps)
    assert (a.rows_fitted, a.convergence) == (b.rows_fitted, b.convergence)


def first_state(info, k: int, restart: int, params: FitParams) -> ChainState:
    """A chain's state before its first ``partial_fit``, as the job makes it: k-means++ on the job's sample."""
    return init_chain(draw_sample(info, params.init_rows(k, info.n_train), params.seed), k, restart, params)


# --- an S3 server on loopback (tests/test_object_storage.py) ----------------------------------------------------------

S3_PORTS = 14  # scripts/s3-server.sh: S3 on PORT, weed's other servers on PORT+1 .. PORT+13


def free_port_range(n: int, low: int = 20_000, high: int = 50_000) -> int:
    """A port ``p`` such that ``p .. p + n - 1`` are all free on 127.0.0.1 right now."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(low, high - n)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


@dataclass
class S3Server:
    """SeaweedFS's S3 gateway started by ``scripts/s3-server.sh`` in ``root``: an admin identity (``key``/``secret``)
    and a read-only one (``ro_key``, same secret). ``stop`` and ``start`` again keep the data (it is in ``root``)."""

    root: Path
    port: int
    key: str = "mnist-test"
    secret: str = "s3cr3t-never-shown-0a1b2c"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ro_key(self) -> str:
        return f"{self.key}-ro"

    def _script(self, *args: str) -> None:
        env = {**os.environ, "S3_ACCESS_KEY": self.key, "S3_SECRET_KEY": self.secret}
        subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "s3-server.sh"), *args], check=True, env=env, capture_output=True
        )

    def start(self) -> S3Server:
        self._script("start", str(self.root), str(self.port))
        return self

    def stop(self) -> None:
        self._script("stop", str(self.root))

    def env(self, key: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The standard variables that give a process these credentials and this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": key or self.key,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def options(self, key: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The same as fsspec storage options (a cluster file's ``storage:``)."""
        return {"key": key or self.key, "secret": secret or self.secret, "endpoint_url": self.endpoint}

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options(), skip_instance_cache=True)


def final_centroids(run_dir: Path, ks) -> dict[int, np.ndarray]:
    """The final centroids of each K in ``ks`` from a run directory's ``centroids.zarr``."""
    group = zarr.open_group(str(run_dir / "centroids.zarr"), mode="r", use_consolidated=False)
    return {k: np.asarray(group[f"final/k{k}"][...]) for k in ks}


def assert_same_centroids(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> None:
    """Bit-identical float32 centroids for every K of ``want``."""
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
        assert np.array_equal(got[k], want[k]), f"K={k}: max difference {np.abs(got[k] - want[k]).max()}"
