"""Job and cluster files: ``load_job`` / ``load_cluster`` defaults and validation, one row of a table per case.

Every problem is a UserError of one line that names the file and the key at fault
(docs/contract.md, "Exit codes": exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mnist_kmeans.config import (
    ClusterConfig,
    JobConfig,
    LocalClusterConfig,
    SlurmClusterConfig,
    default_store,
    load_cluster,
    load_job,
    with_overrides,
)
from mnist_kmeans.errors import UserError

MINIMAL = "name: j\nk_grid: [3, 6]\n"


def write(tmp_path: Path, text: str, name: str = "file.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_user_error(exc: pytest.ExceptionInfo[UserError], path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for word in words:
        assert word in message, (word, message)


# --- job files ---------------------------------------------------------------------------------------------------


def test_job_defaults(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, MINIMAL))
    assert job == JobConfig(name="j", k_grid=(3, 6), centroid_grids=(3,))
    assert (job.store, job.epochs, job.batch_size, job.n_init, job.lloyd_steps, job.screen_rows, job.seed) == (
        default_store(),
        JobConfig.epochs,
        JobConfig.batch_size,
        "auto",
        JobConfig.lloyd_steps,
        JobConfig.screen_rows,
        0,
    )
    assert job.restarts(3) >= 1 and job.restarts(64) >= 1
    assert job.max_no_improvement is None  # no early stopping unless asked for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL, {"k_grid": (3, 6), "centroid_grids": (3,)}),  # no 36 in the grid: the first K
        ("name: j\nk_grid: [64, 10, 36]\n", {"k_grid": (10, 36, 64), "centroid_grids": (36,)}),  # sorted; 36 shown
        ("name: j\nk_grid: [2]\n", {"k_grid": (2,)}),
        (
            MINIMAL + "epochs: 5\nbatch_size: 1\nseed: 4294967295\nlloyd_steps: 0\n",
            {"epochs": 5, "batch_size": 1, "seed": 2**32 - 1, "lloyd_steps": 0},
        ),
        (MINIMAL + "n_init: 3\n", {"n_init": 3}),
        (MINIMAL + "screen_rows: 500\n", {"screen_rows": 500}),
        (MINIMAL + "max_no_improvement: 10\n", {"max_no_improvement": 10}),
        (MINIMAL + "max_no_improvement:\n", {"max_no_improvement": None}),  # null: never stop
        (MINIMAL + "n_init: auto\n", {"n_init": "auto"}),
        (MINIMAL + "store: s3://bucket/mnist.zarr\n", {"store": "s3://bucket/mnist.zarr"}),
        (MINIMAL + "report:\n  centroid_grids: [6, 3]\n", {"centroid_grids": (6, 3)}),
        (MINIMAL + "report:\n", {"centroid_grids": (3,)}),  # an empty mapping
        ("name: 'any text: <b>&</b> ünï'\nk_grid: [3]\n", {"name": "any text: <b>&</b> ünï"}),
    ],
)
def test_job_values(tmp_path: Path, text: str, expected: dict) -> None:
    job = load_job(write(tmp_path, text))
    for key, value in expected.items():
        assert getattr(job, key) == value, key


def test_job_restarts_and_slug(tmp_path: Path) -> None:
    assert load_job(write(tmp_path, MINIMAL + "n_init: 3\n")).restarts(6) == 3
    auto = load_job(write(tmp_path, MINIMAL))
    counts = [auto.restarts(k) for k in (2, 3, 10, 36, 64, 144, 256, 65_536)]
    assert all(n >= 1 for n in counts) and counts == sorted(counts, reverse=True)  # "auto": more for small K
    assert load_job(write(tmp_path, "name: 'a b/../c'\nk_grid: [3]\n")).slug == "a-b-..-c"
    assert "/" not in load_job(write(tmp_path, "name: '../../x'\nk_grid: [3]\n")).slug
    assert load_job(write(tmp_path, "name: '///'\nk_grid: [3]\n")).slug == "job"


def test_job_as_resolved_loads_back_the_same(tmp_path: Path) -> None:
    import yaml

    job = load_job(write(tmp_path, MINIMAL + "epochs: 3\nn_init: 2\nseed: 9\nreport: {centroid_grids: [6]}\n"))
    again = load_job(write(tmp_path, yaml.safe_dump(job.to_yaml_dict()), "resolved.yaml"))
    assert again == job


def test_overrides() -> None:
    job = JobConfig(name="j", k_grid=(3,))
    assert with_overrides(job, store=None) == job
    assert with_overrides(job, store="other.zarr").store == "other.zarr"


BAD_JOBS = [
    # (file text, words the message must hold besides the file name)
    ("name: j\nk_grid: [3]\nepoch: 2\n", ["epoch", "unknown key"]),
    ("name: j\nk_grid: [3]\nreport:\n  grids: [3]\n", ["report.grids", "unknown key"]),
    ("name: j\nk_grid: ten\n", ["k_grid"]),
    ("name: j\nk_grid: 10\n", ["k_grid"]),
    ("name: j\nk_grid: []\n", ["k_grid"]),
    ("name: j\nk_grid: [3, '6']\n", ["k_grid"]),
    ("name: j\nk_grid: [3, 6.0]\n", ["k_grid"]),
    ("name: j\nk_grid: [3, true]\n", ["k_grid"]),
    ("name: j\nk_grid: [3, 3]\n", ["k_grid"]),
    ("name: j\nk_grid: [1, 3]\n", ["k_grid", ">= 2"]),
    ("name: j\nk_grid: [0]\n", ["k_grid"]),
    ("name: j\nk_grid: [-5]\n", ["k_grid"]),
    ("name: j\nk_grid: [100000000]\n", ["k_grid"]),
    ("name: j\nk_grid: [3]\nepochs: 1.5\n", ["epochs"]),
    ("name: j\nk_grid: [3]\nepochs: true\n", ["epochs"]),
    ("name: j\nk_grid: [3]\nepochs: '2'\n", ["epochs"]),
    ("name: j\nk_grid: [3]\nepochs: 0\n", ["epochs"]),
    ("name: j\nk_grid: [3]\nepochs:\n", ["epochs"]),
    ("name: j\nk_grid: [3]\nbatch_size: 0\n", ["batch_size"]),
    ("name: j\nk_grid: [3]\nbatch_size: -1\n", ["batch_size"]),
    ("name: j\nk_grid: [3]\nn_init: banana\n", ["n_init"]),
    ("name: j\nk_grid: [3]\nn_init: 0\n", ["n_init"]),
    ("name: j\nk_grid: [3]\nn_init: true\n", ["n_init"]),
    ("name: j\nk_grid: [3]\nn_init: 2.5\n", ["n_init"]),
    ("name: j\nk_grid: [3]\nlloyd_steps: -1\n", ["lloyd_steps"]),
    ("name: j\nk_grid: [3]\nscreen_rows: 0\n", ["screen_rows"]),
    ("name: j\nk_grid: [3]\nscreen_rows: many\n", ["screen_rows"]),
    ("name: j\nk_grid: [3]\nmax_no_improvement: 0\n", ["max_no_improvement", ">= 1"]),
    ("name: j\nk_grid: [3]\nmax_no_improvement: 10001\n", ["max_no_improvement", "<= 10000"]),
    ("name: j\nk_grid: [3]\nmax_no_improvement: 2.5\n", ["max_no_improvement", "integer"]),
    ("name: j\nk_grid: [3]\nmax_no_improvement: true\n", ["max_no_improvement", "integer"]),
    ("name: j\nk_grid: [3]\nseed: -1\n", ["seed"]),
    ("name: j\nk_grid: [3]\nseed: 4294967296\n", ["seed"]),
    ("name: j\nk_grid: [3]\nseed: abc\n", ["seed"]),
    ("name: j\nk_grid: [3]\nstore: 5\n", ["store"]),
    ("name: j\nk_grid: [3]\nstore: ''\n", ["store"]),
    ("k_grid: [3]\n", ["name", "missing"]),
    ("name:\nk_grid: [3]\n", ["name"]),
    ("name: ''\nk_grid: [3]\n", ["name"]),
    ("name: 12\nk_grid: [3]\n", ["name"]),
    ("name: [a]\nk_grid: [3]\n", ["name"]),
    (f"name: {'x' * 201}\nk_grid: [3]\n", ["name"]),
    ("name: j\n", ["k_grid", "missing"]),
    ("name: j\nk_grid:\n", ["k_grid"]),
    ("name: j\nk_grid: [3, 6]\nreport:\n  centroid_grids: [10]\n", ["centroid_grids", "10"]),
    ("name: j\nk_grid: [3, 6]\nreport:\n  centroid_grids: []\n", ["centroid_grids"]),
    ("name: j\nk_grid: [3, 6]\nreport:\n  centroid_grids: 6\n", ["centroid_grids"]),
    ("name: j\nk_grid: [3, 6]\nreport: [6]\n", ["report"]),
    ("- name: j\n- k_grid: [3]\n", ["mapping"]),
    ("just text\n", ["mapping"]),
    ("", ["mapping"]),
    ("name: j\nk_grid: [3\n", ["YAML"]),
    ("name: j\n  k_grid: [3]\n", ["YAML"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_JOBS)
def test_bad_job(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text, "job.yaml")
    with pytest.raises(UserError) as exc:
        load_job(path)
    assert_user_error(exc, path, *words)


def test_missing_and_unreadable_job_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_job(tmp_path / "nope.yaml")
    assert_user_error(exc, tmp_path / "nope.yaml", "not found")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(UserError) as exc:
        load_job(binary)
    assert_user_error(exc, binary)
    with pytest.raises(UserError) as exc:
        load_job(tmp_path)  # a directory
    assert_user_error(exc, tmp_path)


def test_store_null_is_not_a_store_named_none(tmp_path: Path) -> None:
    """``store:`` left empty (YAML null) must mean the default store or be an error, never ``store=None``.

    With ``store=None`` the run goes on with ``str(None)``: it ingests MNIST into a directory named ``None``.
    """
    path = write(tmp_path, MINIMAL + "store:\n")
    try:
        job = load_job(path)
    except UserError as exc:
        assert "store" in str(exc) and str(path) in str(exc)
    else:
        assert job.store == default_store()


# --- cluster files ----------------------------------------------------------------------------------------------


def test_cluster_defaults(tmp_path: Path) -> None:
    assert load_cluster(None) == ClusterConfig()
    assert load_cluster(write(tmp_path, "{}\n")) == ClusterConfig()
    assert load_cluster(write(tmp_path, "local:\n")) == ClusterConfig()
    cfg = ClusterConfig()
    assert cfg.scheduler is None and cfg.tls is None and cfg.connect_timeout > 0
    assert cfg.local == LocalClusterConfig() and cfg.local.n_workers >= 1 and cfg.local.processes is True


def test_repo_cluster_file_loads() -> None:
    repo = Path(__file__).resolve().parents[1]
    cfg = load_cluster(repo / "cluster.yaml")
    assert cfg.scheduler is None and cfg.tls is None
    assert cfg.local.dashboard_address.startswith("127.0.0.1:")


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("scheduler: tcp://10.0.0.1:8786\n", lambda c: c.scheduler == "tcp://10.0.0.1:8786"),
        ("scheduler: null\n", lambda c: c.scheduler is None),
        ("connect_timeout: 2\n", lambda c: c.connect_timeout == 2.0 and isinstance(c.connect_timeout, float)),
        ("connect_timeout: 0.5\n", lambda c: c.connect_timeout == 0.5),
        (
            "local: {n_workers: 3, threads_per_worker: 2, memory_limit: 2GiB, dashboard_address: '127.0.0.1:0',"
            " processes: false}\n",
            lambda c: c.local == LocalClusterConfig(3, 2, "2GiB", "127.0.0.1:0", False),
        ),
        ("local: {memory_limit: 1073741824}\n", lambda c: c.local.memory_limit == "1073741824"),
        ("local: {n_workers: 1}\n", lambda c: c.local.n_workers == 1 and c.local.threads_per_worker == 1),
        ("local: {memory_limit: 512MiB}\n", lambda c: c.local.memory_limit == "512MiB"),  # the floor itself
        ("local: {memory_limit: 536870912}\n", lambda c: c.local.memory_limit == "536870912"),
        ("local: {dashboard_address: ':8787'}\n", lambda c: c.local.dashboard_address == ":8787"),
        ("local: {dashboard_address: '[::1]:0'}\n", lambda c: c.local.dashboard_address == "[::1]:0"),
        ("local: {dashboard_address: 'localhost:65535'}\n", lambda c: c.local.dashboard_address == "localhost:65535"),
        ("scheduler: tls://[::1]:8786\n", lambda c: c.scheduler == "tls://[::1]:8786"),
        ("scheduler: tcp://node-7.example.org:1\n", lambda c: c.scheduler == "tcp://node-7.example.org:1"),
        ("connect_timeout: 86400\n", lambda c: c.connect_timeout == 86400.0),
    ],
)
def test_cluster_values(tmp_path: Path, text: str, check) -> None:
    assert check(load_cluster(write(tmp_path, text)))


def test_cluster_tls_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        (tmp_path / "certs" / name).write_text("x")
    absolute = tmp_path / "certs" / "ca.pem"
    path = write(
        tmp_path,
        f"scheduler: tls://h:8786\ntls:\n  ca_file: {absolute}\n"
        "  cert: certs/client.pem\n  key: certs/client-key.pem\n",
    )
    cfg = load_cluster(path)
    assert cfg.tls is not None
    assert Path(cfg.tls.ca_file) == absolute
    assert Path(cfg.tls.cert) == tmp_path / "certs" / "client.pem"
    assert Path(cfg.tls.key) == tmp_path / "certs" / "client-key.pem"


BAD_CLUSTERS = [
    ("workers: 2\n", ["workers", "unknown key"]),
    ("local: {n_worker: 2}\n", ["local.n_worker", "unknown key"]),
    ("local: {n_workers: -1}\n", ["local.n_workers"]),
    ("local: {n_workers: 0}\n", ["local.n_workers"]),
    ("local: {n_workers: two}\n", ["local.n_workers"]),
    ("local: {n_workers: 1.5}\n", ["local.n_workers"]),
    ("local: {threads_per_worker: 0}\n", ["local.threads_per_worker"]),
    ("local: {memory_limit: lots}\n", ["local.memory_limit"]),
    ("local: {memory_limit: true}\n", ["local.memory_limit"]),
    ("local: {memory_limit: 1KB}\n", ["local.memory_limit", "at least 512 MiB"]),  # a worker paused forever
    ("local: {memory_limit: -5GB}\n", ["local.memory_limit", "at least"]),  # dask's parse_bytes takes it
    ("local: {memory_limit: 0}\n", ["local.memory_limit", "at least"]),  # 0 would mean no limit to dask
    ("local: {memory_limit: 1000}\n", ["local.memory_limit", "at least"]),
    ("local: {memory_limit: 256MiB}\n", ["local.memory_limit", "at least"]),
    ("local: {memory_limit: 1e400}\n", ["local.memory_limit"]),  # parse_bytes: OverflowError
    ("local: {memory_limit: 4.5e+9}\n", ["local.memory_limit"]),  # a YAML float, not bytes
    ("local: {dashboard_address: garbage}\n", ["local.dashboard_address", "HOST:PORT"]),
    ("local: {dashboard_address: 'host:99999'}\n", ["local.dashboard_address"]),
    ("local: {dashboard_address: '127.0.0.1:'}\n", ["local.dashboard_address"]),
    ("local: {dashboard_address: 'a b:8787'}\n", ["local.dashboard_address"]),
    ("local: {dashboard_address: ':::'}\n", ["local.dashboard_address"]),
    ("local: {dashboard_address: '[nope]:1'}\n", ["local.dashboard_address"]),
    ("local: {dashboard_address: null}\n", ["local.dashboard_address"]),
    ("local: {processes: 'yes'}\n", ["local.processes"]),
    ("local: {dashboard_address: 8787}\n", ["local.dashboard_address"]),
    ("local: [2]\n", ["local"]),
    ("scheduler: localhost:8786\n", ["scheduler"]),
    ("scheduler: 8786\n", ["scheduler"]),
    ("scheduler: 'tcp://:::'\n", ["scheduler", "tcp://HOST:PORT"]),
    ("scheduler: tcp://host\n", ["scheduler"]),
    ("scheduler: 'tcp://:8786'\n", ["scheduler"]),
    ("scheduler: tcp://host:0\n", ["scheduler"]),
    ("scheduler: tcp://host:99999\n", ["scheduler"]),
    ("scheduler: tcp://host:8786/x\n", ["scheduler"]),
    ("scheduler: inproc://10.0.0.1/1/2\n", ["scheduler"]),
    ("scheduler: ucx://host:8786\n", ["scheduler"]),
    ("scheduler: http://host:8786\n", ["scheduler"]),
    ("connect_timeout: 0\n", ["connect_timeout"]),
    ("connect_timeout: -3\n", ["connect_timeout"]),
    ("connect_timeout: soon\n", ["connect_timeout"]),
    ("connect_timeout: true\n", ["connect_timeout"]),
    ("connect_timeout: .nan\n", ["connect_timeout"]),
    ("connect_timeout: .inf\n", ["connect_timeout"]),
    ("connect_timeout: 1e9\n", ["connect_timeout", "at most 86400"]),
    (
        "tls:\n  ca_file: missing-ca.pem\n  cert: missing.pem\n  key: missing-key.pem\n",
        ["tls.ca_file", "missing-ca.pem"],
    ),
    ("tls:\n  ca_file: ca.pem\n", ["tls.cert"]),
    ("tls:\n  ca: ca.pem\n", ["tls.ca", "unknown key"]),
    ("tls: [a]\n", ["tls"]),
    ("- local\n", ["mapping"]),
    ("local: {n_workers: [1\n", ["YAML"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_CLUSTERS)
def test_bad_cluster(tmp_path: Path, text: str, words: list[str]) -> None:
    (tmp_path / "ca.pem").write_text("x")
    path = write(tmp_path, text, "cluster.yaml")
    with pytest.raises(UserError) as exc:
        load_cluster(path)
    assert_user_error(exc, path, *words)


# --- kind, and the slurm: section ---------------------------------------------------------------------------------

SLURM = "kind: slurm\nslurm:\n"


@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("kind: local\n", lambda c: c.kind == "local" and c.scheduler is None and c.slurm is None),
        ("{}\n", lambda c: c.kind == "local"),  # a file from before there was a kind
        ("scheduler: tcp://h:8786\n", lambda c: c.kind == "address"),  # the same
        ("kind: address\nscheduler: tcp://h:8786\n", lambda c: (c.kind, c.scheduler) == ("address", "tcp://h:8786")),
        ("kind: slurm\n", lambda c: c.kind == "slurm" and c.slurm == SlurmClusterConfig()),
        (
            SLURM + "  n_workers: 4\n  cores: 4\n  processes: 2\n  memory: 8GB\n  walltime: '1-00:30:00'\n"
            "  queue: gpu\n  account: proj-7\n  interface: ib0\n  job_extra_directives: ['--exclusive', '-C avx2']\n"
            "  job_script_prologue: ['module load python']\n  dashboard_address: '127.0.0.1:0'\n",
            lambda c: (
                c.slurm
                == SlurmClusterConfig(
                    4,
                    4,
                    2,
                    "8GB",
                    "1-00:30:00",
                    "gpu",
                    "proj-7",
                    "ib0",
                    ("--exclusive", "-C avx2"),
                    ("module load python",),
                    None,
                    "127.0.0.1:0",
                )
            ),
        ),
        (SLURM + "  walltime: '30'\n", lambda c: c.slurm.walltime == "30"),
    ],
)
def test_cluster_kinds(tmp_path: Path, text: str, check) -> None:
    assert check(load_cluster(write(tmp_path, text)))


def test_slurm_log_directory_is_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_cluster(write(tmp_path, SLURM + "  log_directory: logs\n"))
    assert cfg.slurm is not None and cfg.slurm.log_directory == str(tmp_path / "logs")


BAD_KINDS = [
    ("kind: kubernetes\n", ["kind", "local, address, slurm"]),
    ("kind: address\n", ["scheduler", "required with kind: address"]),
    ("kind: local\nscheduler: tcp://h:8786\n", ["scheduler", "kind is local"]),
    ("kind: slurm\nscheduler: tcp://h:8786\n", ["scheduler", "kind is slurm"]),
    ("slurm: {cores: 2}\n", ["slurm", "kind is local"]),
    ("kind: slurm\nlocal: {n_workers: 2}\n", ["local", "kind: slurm"]),
    (SLURM + "  nodes: 2\n", ["slurm.nodes", "unknown key"]),
    (SLURM + "  n_workers: 0\n", ["slurm.n_workers"]),
    (SLURM + "  cores: 2\n  processes: 3\n", ["slurm.processes", "<= 2"]),
    (SLURM + "  memory: lots\n", ["slurm.memory"]),
    (SLURM + "  processes: 2\n  cores: 2\n  memory: 800MiB\n", ["slurm.memory", "at least 512 MiB"]),
    (SLURM + "  walltime: 'an hour'\n", ["slurm.walltime"]),
    (SLURM + "  walltime: 30\n", ["slurm.walltime"]),  # a YAML number: sexagesimal surprises (1:30 is 90)
    (SLURM + '  queue: "debug\\n#SBATCH --mem=1T"\n', ["slurm.queue"]),  # would add a line to the job script
    (SLURM + "  account: 'a b'\n", ["slurm.account"]),
    (SLURM + "  interface: 'eth0; rm -rf ~'\n", ["slurm.interface"]),
    (SLURM + "  job_extra_directives: --exclusive\n", ["slurm.job_extra_directives", "list"]),
    (SLURM + "  job_extra_directives: ['exclusive']\n", ["slurm.job_extra_directives", "'-'"]),
    (SLURM + '  job_extra_directives: ["-x\\nhostname"]\n', ["slurm.job_extra_directives", "one-line"]),
    (SLURM + "  job_script_prologue: [3]\n", ["slurm.job_script_prologue"]),
    (SLURM + "  dashboard_address: garbage\n", ["slurm.dashboard_address"]),
    ("kind: slurm\nslurm: [2]\n", ["slurm"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_KINDS)
def test_bad_kind_or_slurm_section(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text, "cluster.yaml")
    with pytest.raises(UserError) as exc:
        load_cluster(path)
    assert_user_error(exc, path, *words)


def test_missing_cluster_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        load_cluster(tmp_path / "cluster.yaml")
    assert_user_error(exc, tmp_path / "cluster.yaml", "not found")


# --- bounded input (docs/contract.md, "Job files": limits) -------------------------------------------------------


def alias_bomb(levels: int, key: str = "name") -> str:
    """ "Billion laughs": each level an anchored list of nine aliases of the one before; 9**levels values expanded."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"{key}: [{', '.join(items)}]\nk_grid: [3]\n"


BOUNDED_READS = [
    # (file text, words the message must hold): refused while reading, before any value is looked at
    (alias_bomb(9), ["more than 10000 values"]),
    ("name: &a [*a]\nk_grid: [3]\n", ["a cycle"]),
    ("name: [&a0 [x], " + ", ".join(f"&a{i} [*a{i - 1}]" for i in range(1, 40)) + "]\nk_grid: [3]\n", ["deeper"]),
    ("name: j\nk_grid: " + "[" * 10_000 + "]" * 10_000 + "\n", ["nested deeper than 20 levels", "line 2"]),
    ("name: j\nk_grid: [" + ", ".join(["3"] * 10_001) + "]\n", ["more than 10000 values"]),
    (MINIMAL + "seed: " + "9" * 5000 + "\n", ["not a usable YAML value"]),  # int() refuses > 4300 digits
    (MINIMAL + "seed: 2001-13-45\n", ["not a usable YAML value"]),  # a date that is none
    (MINIMAL + "# " + "x" * (1 << 20) + "\n", ["larger than 1048576 bytes"]),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("text", "words"), BOUNDED_READS, ids=range(len(BOUNDED_READS)))
def test_bounded_reads(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text, "job.yaml")
    for load in (load_job, load_cluster):
        with pytest.raises(UserError) as exc:
            load(path)
        assert_user_error(exc, path, *words)


@pytest.mark.timeout(20)
def test_only_regular_files_are_read(tmp_path: Path) -> None:
    """A FIFO would block the open (or the read) until a writer comes, a device is endless: neither is read."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    cases = ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"), (tmp_path, "directory"))
    for path, says in cases:
        for load in (load_job, load_cluster):
            with pytest.raises(UserError) as exc:
                load(path)
            assert_user_error(exc, path, says)


def test_harmless_aliases_load(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, "name: j\nk_grid: &grid [3, 6]\nreport: {centroid_grids: *grid}\n"))
    assert job.k_grid == (3, 6) and job.centroid_grids == (3, 6)


LONG = "x" * 100_000
WIDE_GRID = ", ".join(map(str, range(3, 5000)))
ECHOED = [
    # (file text, key): a value echoed in the message is cut to errors.MAX_VALUE characters
    (f"name: j\nk_grid: [3]\nepochs: '{LONG}'\n", "epochs"),
    (f"name: [{LONG}]\nk_grid: [3]\n", "name"),
    ("name: j\nk_grid: [" + ", ".join(["3"] * 5000) + "]\n", "k_grid"),
    (f"name: j\nk_grid: [3]\nseed: {'9' * 4000}\n", "seed"),  # 4000 digits: int() still takes it
    (f"name: j\nk_grid: [{WIDE_GRID}]\nreport: {{centroid_grids: [2]}}\n", "centroid_grids"),
    (f"name: j\nk_grid: [3]\n? {LONG}\n: 1\n", "unknown key"),
    (f"local: {{processes: '{LONG}'}}\n", "local.processes"),
    (f"local: {{memory_limit: '{LONG}'}}\n", "local.memory_limit"),
    (f"local: {{dashboard_address: '{LONG}'}}\n", "local.dashboard_address"),
    (f"scheduler: 'tcp://{LONG}'\n", "scheduler"),
    (f"connect_timeout: '{LONG}'\n", "connect_timeout"),
    (f"tls: {{ca_file: '{LONG}'}}\n", "tls.ca_file"),
]


@pytest.mark.parametrize(("text", "key"), ECHOED, ids=[key for _, key in ECHOED])
def test_echoed_values_are_short(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text, "file.yaml")
    load = load_cluster if text.startswith(("local", "scheduler", "connect", "tls")) else load_job
    with pytest.raises(UserError) as exc:
        load(path)
    assert_user_error(exc, path, key)
    assert len(str(exc.value)) < len(str(path)) + 400, len(str(exc.value))
