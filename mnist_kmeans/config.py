"""Job and cluster configuration: YAML files -> small frozen dataclasses, validated once, at the edge.

Every problem is a :class:`~mnist_kmeans.errors.UserError` whose one-line message names the file and the key.
Input is bounded before it is believed (docs/contract.md, "Job files"): files are read by :mod:`mnist_kmeans.reading`
(a regular file of bounded size, YAML of bounded nesting and alias expansion).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_kmeans.errors import UserError, shorten, shown
from mnist_kmeans.reading import read_yaml_mapping


def data_home() -> Path:
    """Where the default source and store live: ``$MNIST_KMEANS_DATA``, else ``data/`` of this checkout (like
    scikit-learn's ``get_data_home``), so that a job runs from any working directory (docs/contract.md, "Job files")."""
    return Path(os.environ.get("MNIST_KMEANS_DATA") or Path(__file__).resolve().parent.parent / "data")


def default_store() -> str:
    """The default store: ``mnist.zarr`` in the :func:`data_home`."""
    return str(data_home() / "mnist.zarr")


def default_source() -> str:
    """The default source: ``mnist/`` in the :func:`data_home`, the vendored MNIST files."""
    return str(data_home() / "mnist")


@dataclass(frozen=True)
class JobConfig:
    """One K-grid job (``jobs/*.yaml``). Defaults are the project's best settings for MNIST (see README)."""

    name: str
    k_grid: tuple[int, ...]
    store: str = field(default_factory=default_store)
    epochs: int = 1
    batch_size: int = 1024
    n_init: int | str = "auto"
    lloyd_steps: int = 5  # the fewest that reach 1.01x converged Lloyd at every K for seeds 0-2 (README)
    screen_rows: int = 10_000
    # Early stopping per chain (fit.Convergence), in chunks; None: every chain fits all its epochs (README, "Early
    # stopping": off by default, since it trades inertia for time).
    max_no_improvement: int | None = None
    seed: int = 0
    centroid_grids: tuple[int, ...] = (36,)

    def restarts(self, k: int) -> int:
        """Restarts of K. ``"auto"``: ``256 // K`` (1 to 8), more where the local optimum found varies most (small
        K): 8 restarts for K=10 and 16, 7 for K=36, 4 for K=64, 1 from K=144 up. Restarts are screened after
        ``screen_rows`` rows (schedule.py), so each costs one chunk and one k-means++."""
        if self.n_init == "auto":
            return max(1, min(8, 256 // k))
        return int(self.n_init)

    @property
    def slug(self) -> str:
        """The job name made safe for a directory name (the name itself may hold any text)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.") or "job"

    def to_yaml_dict(self) -> dict[str, Any]:
        """The job as resolved, in the job file's own shape (written to ``job.yaml`` of the run)."""
        return {
            "name": self.name,
            "store": self.store,
            "k_grid": list(self.k_grid),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "n_init": self.n_init,
            "lloyd_steps": self.lloyd_steps,
            "screen_rows": self.screen_rows,
            "max_no_improvement": self.max_no_improvement,
            "seed": self.seed,
            "report": {"centroid_grids": list(self.centroid_grids)},
        }


@dataclass(frozen=True)
class TLSConfig:
    """Files for ``distributed.Security``; all three are needed to join a TLS cluster."""

    ca_file: str
    cert: str
    key: str


@dataclass(frozen=True)
class LocalClusterConfig:
    """Arguments of the embedded ``distributed.LocalCluster``."""

    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"
    dashboard_address: str = "127.0.0.1:8787"
    processes: bool = True


# --- SLURM (kind: slurm) ---
@dataclass(frozen=True)
class SlurmClusterConfig:
    """Settings of the dask-jobqueue ``SLURMCluster`` that ``kind: slurm`` starts (docs/contract.md, "Cluster files").

    ``n_workers`` Dask workers in jobs of ``cores`` cores, ``processes`` workers and ``memory`` each. ``interface``
    None: scheduler and workers listen on 127.0.0.1 only (jobs on this machine, e.g. scripts/slurm.sh)."""

    n_workers: int = 2
    cores: int = 1
    processes: int = 1
    memory: str = "4GiB"
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    interface: str | None = None
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    log_directory: str | None = None
    dashboard_address: str = "127.0.0.1:8787"


# --- end SLURM ---


@dataclass(frozen=True)
class ClusterConfig:
    """Where a job runs (``kind``): the embedded LocalCluster (``local``), a running scheduler at ``scheduler``
    (``address``), or a SLURMCluster started for the job (``slurm``)."""

    scheduler: str | None = None
    connect_timeout: float = 10.0
    local: LocalClusterConfig = field(default_factory=LocalClusterConfig)
    tls: TLSConfig | None = None
    kind: str = "local"
    slurm: SlurmClusterConfig | None = None
    # fsspec storage options for remote stores (``storage:``); may hold secrets: never shown, never written anywhere
    storage: dict[str, Any] = field(default_factory=dict, repr=False)


# --- loading -------------------------------------------------------------------------------------------


class _Checker:
    """Typed access to one mapping of a config file, with errors that name ``file: key``."""

    def __init__(self, path: str | Path, data: dict[str, Any], prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, key: str, what: str) -> UserError:
        return UserError(f"{self.path}: {self.prefix}{key}: {what}")

    def reject_unknown(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.fail(shorten(key), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def require(self, key: str) -> Any:
        if key not in self.data or self.data[key] is None:
            raise self.fail(key, "missing (required)")
        return self.data[key]

    def integer(
        self, key: str, default: int | None = None, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.data.get(key, default) if default is not None else self.require(key)
        return self.check_int(key, value, minimum, maximum)

    def check_int(self, key: str, value: Any, minimum: int | None, maximum: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {shown(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {shown(value)}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {shown(value)}")
        return value

    def optional_integer(self, key: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
        """An integer, or None where the key is absent or null."""
        value = self.data.get(key)
        return None if value is None else self.check_int(key, value, minimum, maximum)

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {shown(value)}")
        return value

    def mapping(self, key: str) -> _Checker:
        value = self.data.get(key, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        return _Checker(self.path, value, f"{self.prefix}{key}.")

    def int_list(
        self, key: str, default: list[int] | None = None, minimum: int | None = None, maximum: int | None = None
    ) -> tuple[int, ...]:
        value = self.data.get(key, default) if default is not None else self.require(key)
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty list of integers, got {shown(value)}")
        out = tuple(self.check_int(key, v, minimum, maximum) for v in value)
        if len(set(out)) != len(out):
            raise self.fail(key, f"holds a value twice: {shown(list(out))}")
        return out


# Bounds that catch typos before they cost a cluster hours; far above anything MNIST-sized needs.
MAX_K = 65_536
MAX_EPOCHS = 10_000
MAX_BATCH = 10_000_000
MAX_N_INIT = 1_000
MAX_ROWS = 10**12


def load_job(path: str | Path) -> JobConfig:
    """Read and validate a job file. Checks that need the data (K <= n_train) happen when the store is open."""
    return job_from_mapping(read_yaml_mapping(path), path, Path(path).parent)


JobSpec = str | os.PathLike | Mapping[str, Any] | JobConfig
"""What the Python API takes as a job: a job file's path, its content as a mapping, or a :class:`JobConfig`."""


def resolve_job(job: JobSpec) -> tuple[JobConfig, str | None]:
    """``job`` validated exactly as a job file is, and the path of its file (None for a mapping or a JobConfig).

    A mapping's errors name ``job: KEY``; its relative ``store`` is taken from the working directory. A JobConfig is
    checked again through its ``to_yaml_dict``, so one built by hand meets the same bounds as a file; left at the
    dataclass's default, its ``centroid_grids`` means "not given" and takes a file's default (which depends on K).
    """
    if isinstance(job, (str, os.PathLike)):
        return load_job(os.fspath(job)), os.fspath(job)
    if isinstance(job, JobConfig):
        unset = job.centroid_grids == JobConfig.centroid_grids
        job = {key: value for key, value in job.to_yaml_dict().items() if not (key == "report" and unset)}
    if not isinstance(job, Mapping):
        raise UserError(f"job: must be a job file's path, a mapping or a JobConfig, got {type(job).__name__}")
    return job_from_mapping(dict(job), "job", Path.cwd()), None


def job_from_mapping(data: dict[str, Any], where: str | Path, base: Path) -> JobConfig:
    """A job file's mapping validated into a JobConfig; errors name ``where: KEY``, a relative ``store`` is taken
    from the directory ``base``."""
    checker = _Checker(where, data)
    checker.reject_unknown(
        {
            *("name", "store", "k_grid", "epochs", "batch_size", "n_init", "lloyd_steps", "screen_rows"),
            *("max_no_improvement", "seed", "report"),
        }
    )
    name = checker.text("name") or ""
    if not name:
        raise checker.fail("name", "missing (required)")
    if len(name) > 200:
        raise checker.fail("name", "longer than 200 characters")
    k_grid = tuple(sorted(checker.int_list("k_grid", minimum=2, maximum=MAX_K)))
    report = checker.mapping("report")
    report.reject_unknown({"centroid_grids"})
    default_grids = [k for k in JobConfig.centroid_grids if k in k_grid] or [k_grid[0]]
    grids = report.int_list("centroid_grids", default=default_grids, minimum=2, maximum=MAX_K)
    for k in grids:
        if k not in k_grid:
            raise report.fail("centroid_grids", f"K={k} is not in k_grid {shown(list(k_grid))}")
    return JobConfig(
        name=name,
        k_grid=k_grid,
        store=_job_store(checker.text("store"), base),
        epochs=checker.integer("epochs", JobConfig.epochs, minimum=1, maximum=MAX_EPOCHS),
        batch_size=checker.integer("batch_size", JobConfig.batch_size, minimum=1, maximum=MAX_BATCH),
        n_init=(
            "auto"
            if checker.data.get("n_init", "auto") == "auto"
            else checker.integer("n_init", 1, minimum=1, maximum=MAX_N_INIT)
        ),
        lloyd_steps=checker.integer("lloyd_steps", JobConfig.lloyd_steps, minimum=0, maximum=MAX_EPOCHS),
        screen_rows=checker.integer("screen_rows", JobConfig.screen_rows, minimum=1, maximum=MAX_ROWS),
        max_no_improvement=checker.optional_integer("max_no_improvement", minimum=1, maximum=MAX_EPOCHS),
        seed=checker.integer("seed", JobConfig.seed, minimum=0, maximum=2**32 - 1),
        centroid_grids=grids,
    )


def _job_store(store: str | None, base: Path) -> str:
    """A job file's ``store:``: a URL as given, a path made absolute from the job file's directory; left out or empty,
    the default store (not a store named None)."""
    if store is None:
        return default_store()
    return store if "://" in store else os.path.abspath(base / os.path.expanduser(store))


def local_path_option(value: str | None) -> str | None:
    """A path or URL given on the command line: a local path made absolute from the working directory, so that it
    means the same on workers that run elsewhere; URLs as given."""
    if value is None or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def refuse_memory_store(url: str) -> None:
    """A ``memory://`` store lives in one process: workers would not see it, and it would vanish with the command."""
    if url.startswith("memory://"):
        raise UserError(f"{shorten(url)}: a memory:// store lives in one process only; use a path or a shared URL")


def with_overrides(job: JobConfig, **overrides: Any) -> JobConfig:
    """Command-line options that a job file also sets override it (``None`` means not given)."""
    return dataclasses.replace(job, **{k: v for k, v in overrides.items() if v is not None})


DEFAULT_CLUSTER_FILE = "cluster.yaml"
# A worker process holds about 250 MiB once the numeric stack is imported (measured: dask, numpy, scikit-learn, zarr
# and one 10,000-row chunk as float32, 31 MB), and Dask pauses a worker at 80 % of its limit: below ~320 MiB it
# pauses before its first task and the run waits forever. 512 MiB leaves room for a few chunks.
MIN_MEMORY_LIMIT = 512 * 2**20
MAX_CONNECT_TIMEOUT = 86_400.0  # a day: any longer wait for a scheduler is a typo
SCHEDULER_SCHEMES = ("tcp", "tls")  # the protocols cluster.py joins (tls:// with the files of `tls`)
_HOST_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")  # a DNS name or an IPv4 address
_PORT = re.compile(r"[0-9]{1,5}")


def load_cluster(path: str | Path | None) -> ClusterConfig:
    """Read a cluster file. ``None`` means ``./cluster.yaml`` when there is one, else the built-in LocalCluster
    defaults (docs/contract.md, "Cluster files")."""
    if path is None:
        if not Path(DEFAULT_CLUSTER_FILE).is_file():
            return ClusterConfig()
        path = DEFAULT_CLUSTER_FILE
    checker = _Checker(path, read_yaml_mapping(path))
    checker.reject_unknown({"scheduler", "connect_timeout", "local", "tls", "storage", "kind", "slurm"})
    scheduler = checker.text("scheduler")
    if scheduler is not None:
        try:
            scheduler_address(scheduler)
        except ValueError as exc:
            raise checker.fail("scheduler", str(exc)) from None
    timeout = checker.data.get("connect_timeout", ClusterConfig.connect_timeout)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout <= MAX_CONNECT_TIMEOUT  # also false for NaN
    ):
        what = f"must be a positive number of seconds, at most {MAX_CONNECT_TIMEOUT:g}"
        raise checker.fail("connect_timeout", f"{what}, got {shown(timeout)}")
    local = _local_section(checker.mapping("local"))
    tls = _tls_section(checker.mapping("tls"), Path(path).parent) if checker.data.get("tls") is not None else None
    storage = _storage_section(checker.mapping("storage"))
    kind = _kind(checker, scheduler)
    slurm = _slurm_section(checker.mapping("slurm"), Path(path).parent) if kind == "slurm" else None
    return ClusterConfig(
        scheduler=scheduler,
        connect_timeout=float(timeout),
        local=local,
        tls=tls,
        kind=kind,
        slurm=slurm,
        storage=storage,
    )


def scheduler_address(text: str) -> str:
    """``text`` if it is an address a client can join, ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (an IPv6 host in
    brackets, port 1 - 65535), else a ValueError saying so. For the cluster file and ``--scheduler``."""
    scheme, sep, rest = text.partition("://")
    parsed = _host_port(rest) if sep and scheme in SCHEDULER_SCHEMES else None
    if parsed is None or not parsed[0] or parsed[1] == 0:
        raise ValueError(
            f"must be tcp://HOST:PORT or tls://HOST:PORT (port 1 - 65535, IPv6 as [::1]), got {shown(text)}"
        )
    return text


def _host_port(text: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (no host) -> (host, port 0 - 65535); ``None`` if it is not one."""
    import ipaddress

    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port = text.rpartition(":")
        if host and not _HOST_NAME.fullmatch(host):
            return None
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        return None
    return host, int(port)


def _local_section(section: _Checker) -> LocalClusterConfig:
    """The ``local:`` section: arguments of the embedded LocalCluster, each defaulting to LocalClusterConfig's."""
    section.reject_unknown({f.name for f in dataclasses.fields(LocalClusterConfig)})
    defaults = LocalClusterConfig()
    processes = section.data.get("processes", defaults.processes)
    if not isinstance(processes, bool):
        raise section.fail("processes", f"must be true or false, got {shown(processes)}")
    return LocalClusterConfig(
        n_workers=section.integer("n_workers", defaults.n_workers, minimum=1, maximum=1024),
        threads_per_worker=section.integer("threads_per_worker", defaults.threads_per_worker, minimum=1, maximum=1024),
        memory_limit=_memory_limit(section, defaults.memory_limit),
        dashboard_address=_dashboard_address(section, defaults.dashboard_address),
        processes=processes,
    )


def _memory_limit(section: _Checker, default: str, key: str = "memory_limit", per_worker: int = 1) -> str:
    """``local.memory_limit`` (or ``key``, a size shared by ``per_worker`` workers): bytes, or a size dask parses
    (``4GiB``), at least MIN_MEMORY_LIMIT per worker; kept as given."""
    from dask.utils import parse_bytes

    memory_limit = section.data.get(key, default)
    wrong = section.fail(key, f"must be a size such as 4GiB, or bytes, got {shown(memory_limit)}")
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (str, int)):
        raise wrong
    try:
        size = parse_bytes(memory_limit) if isinstance(memory_limit, str) else memory_limit
    except (ValueError, TypeError, OverflowError):  # OverflowError: "1e400"
        raise wrong from None
    if size < MIN_MEMORY_LIMIT * per_worker:  # also a negative size, which parse_bytes takes ("-5GB")
        raise section.fail(
            key,
            f"must be at least {MIN_MEMORY_LIMIT >> 20} MiB per worker (a worker holds ~250 MiB before any data), "
            f"got {shown(memory_limit)}",
        )
    return str(memory_limit)


def _dashboard_address(section: _Checker, default: str) -> str:
    """``local.dashboard_address``: ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (port 0: any free one). No ``null``:
    LocalCluster's ``dashboard_address=None`` drops the dashboard's pages but still serves HTTP on port 8787."""
    value = section.data.get("dashboard_address", default)
    if not isinstance(value, str) or _host_port(value) is None:
        what = "must be HOST:PORT or :PORT (port 0 - 65535, IPv6 as [::1])"
        raise section.fail("dashboard_address", f"{what}, got {shown(value)}")
    return value


def _tls_section(section: _Checker, base: Path) -> TLSConfig:
    """The ``tls:`` section: three files that must exist, relative paths taken from the cluster file's directory."""
    section.reject_unknown({"ca_file", "cert", "key"})
    files = {}
    for key in ("ca_file", "cert", "key"):
        value = section.text(key)
        if value is None:
            raise section.fail(key, "missing (required when tls is set)")
        resolved = Path(value) if Path(value).is_absolute() else base / value
        try:
            found = resolved.is_file()
        except OSError as exc:  # a name too long for the file system: is_file raises rather than says False
            raise section.fail(key, f"cannot check {shorten(resolved, 300)}: {exc.strerror}") from None
        if not found:
            raise section.fail(key, f"file not found: {shorten(resolved, 300)}")
        files[key] = str(resolved)
    return TLSConfig(**files)


# --- kind, and the slurm: section -----------------------------------------------------------------------------

CLUSTER_KINDS = ("local", "address", "slurm")
# What SLURM takes in an #SBATCH line: one word each, so that a value cannot end the line and add shell commands.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,:@+=-]{1,128}")
_WALLTIME = re.compile(r"([0-9]{1,4}-)?[0-9]{1,4}(:[0-5][0-9]){0,2}")  # MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS
_INTERFACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _kind(checker: _Checker, scheduler: str | None) -> str:
    """``kind``, checked against the sections it goes with; left out: ``address`` with a scheduler, else ``local``
    (files written before there was a kind)."""
    kind = checker.data.get("kind")
    if kind is None:
        kind = "local" if scheduler is None else "address"
    elif kind not in CLUSTER_KINDS:
        raise checker.fail("kind", f"must be one of {', '.join(CLUSTER_KINDS)}, got {shown(kind)}")
    if kind == "address" and scheduler is None:
        raise checker.fail("scheduler", "missing (required with kind: address)")
    if kind != "address" and scheduler is not None:
        raise checker.fail("scheduler", f"set, but kind is {kind} (an address goes with kind: address)")
    if kind != "slurm" and checker.data.get("slurm") is not None:
        raise checker.fail("slurm", f"set, but kind is {kind} (the slurm section goes with kind: slurm)")
    if kind == "slurm":
        for key in ("local", "tls"):
            if checker.data.get(key) is not None:
                raise checker.fail(key, "not taken with kind: slurm (its settings are in the slurm section)")
    return kind


def _slurm_section(section: _Checker, base: Path) -> SlurmClusterConfig:
    """The ``slurm:`` section: SLURMCluster settings, each defaulting to SlurmClusterConfig's."""
    section.reject_unknown({f.name for f in dataclasses.fields(SlurmClusterConfig)})
    d = SlurmClusterConfig()
    cores = section.integer("cores", d.cores, minimum=1, maximum=4096)
    processes = section.integer("processes", d.processes, minimum=1, maximum=cores)
    log_directory = section.text("log_directory")
    return SlurmClusterConfig(
        n_workers=section.integer("n_workers", d.n_workers, minimum=1, maximum=1024),
        cores=cores,
        processes=processes,
        memory=_memory_limit(section, d.memory, key="memory", per_worker=processes),
        walltime=_matching(section, "walltime", _WALLTIME, "HH:MM:SS, D-HH:MM:SS or minutes", d.walltime),
        queue=_matching(section, "queue", _SLURM_NAME, "a SLURM partition name"),
        account=_matching(section, "account", _SLURM_NAME, "a SLURM account name"),
        interface=_matching(section, "interface", _INTERFACE, "a network interface name such as ib0"),
        job_extra_directives=_one_line_list(section, "job_extra_directives", must_start="-"),
        job_script_prologue=_one_line_list(section, "job_script_prologue"),
        log_directory=None if log_directory is None else os.path.abspath(base / os.path.expanduser(log_directory)),
        dashboard_address=_dashboard_address(section, d.dashboard_address),
    )


def _matching(section: _Checker, key: str, pattern: re.Pattern, what: str, default: str | None = None) -> str | None:
    value = section.data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise section.fail(key, f"must be {what}, got {shown(value)}")
    return value


def _one_line_list(section: _Checker, key: str, must_start: str = "") -> tuple[str, ...]:
    """A list of one-line strings (lines of the job script), each starting with ``must_start``."""
    value = section.data.get(key) or []
    if not isinstance(value, list):
        raise section.fail(key, f"must be a list of strings, got {shown(value)}")
    for item in value:
        if not isinstance(item, str) or not item.strip() or "\n" in item or "\r" in item:
            raise section.fail(key, f"must hold one-line strings, got {shown(item)}")
        if not item.startswith(must_start):
            raise section.fail(key, f"each must be an sbatch option starting with {must_start!r}, got {shown(item)}")
    return tuple(value)


MAX_STORAGE_DEPTH = 3  # fsspec options nest a little (client_kwargs: {region_name: ...}); deeper is a mistake


def _storage_section(section: _Checker, depth: int = 1) -> dict[str, Any]:
    """The ``storage:`` section: fsspec storage options for remote stores (for s3://, s3fs's: ``key``, ``secret``,
    ``endpoint_url``, ``client_kwargs``, ...), passed as they are. Keys are names; values are strings, numbers,
    booleans or mappings of those. A value is never echoed in an error: it may be a secret."""
    out: dict[str, Any] = {}
    for key, value in section.data.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
            raise section.fail(shorten(key), "must be an option name (letters, digits, _)")
        if isinstance(value, dict) and depth < MAX_STORAGE_DEPTH:
            out[key] = _storage_section(section.mapping(key), depth + 1)
        elif isinstance(value, (str, int, float, bool)) and not (isinstance(value, str) and len(value) > 4096):
            out[key] = value
        else:
            what = "a string, number, boolean" + (" or mapping" if depth < MAX_STORAGE_DEPTH else "")
            raise section.fail(key, f"must be {what} (the value is not shown: it may be a secret)")
    return out
