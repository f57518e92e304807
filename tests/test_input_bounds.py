"""Unbounded input and unchecked cluster values, end to end through the command line (docs/contract.md, "Job files",
"Cluster files", "Exit codes").

A job file, a cluster file or a run directory's ``job.yaml`` that is an alias bomb, nested 10,000 deep, larger than
1 MiB, a FIFO or ``/dev/zero`` is refused while it is read: exit 2, one short line, within seconds, and no run
directory. The bad-input cases run the CLI as a child process with a timeout, so that a regression (a read that
blocks, a value that expands to gigabytes) fails the test instead of hanging or exhausting the test process. A bad
cluster value is refused before anything starts, so those cases run ``main()`` in this process and take milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mnist_kmeans import __version__
from mnist_kmeans.cli import main
from tests.helpers import run_cli
from tests.test_config import alias_bomb

JOB = "name: bounds\nk_grid: [3]\n"
SHORT = 1000  # characters of stderr at most: one line naming the file and what is wrong


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def resume_dir(tmp: Path, job_yaml: str) -> Path:
    """A run directory as far as ``--resume`` looks before the store: ``job.yaml`` and ``centroids.zarr/``."""
    run_dir = tmp / "old-run"
    (run_dir / "centroids.zarr").mkdir(parents=True)
    write(run_dir / "job.yaml", job_yaml)
    return run_dir


# (id, the arguments after `run` given the test's directory, fragments of the one line on stderr)
HOSTILE_FILES: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
    ("job: alias bomb", lambda t: [str(write(t / "job.yaml", alias_bomb(9)))], ("job.yaml", "more than 10000 values")),
    (
        "job: nested 10000 deep",
        lambda t: [str(write(t / "job.yaml", "name: j\nk_grid: " + "[" * 10_000 + "]" * 10_000 + "\n"))],
        ("job.yaml", "nested deeper than 20 levels"),
    ),
    (
        "job: larger than 1 MiB",
        lambda t: [str(write(t / "job.yaml", JOB + "# " + "x" * (2 << 20) + "\n"))],
        ("job.yaml", "larger than 1048576 bytes"),
    ),
    ("job: /dev/zero", lambda t: ["/dev/zero"], ("/dev/zero", "not a regular file")),
    ("job: a FIFO", lambda t: [str(fifo(t / "job.yaml"))], ("job.yaml", "not a regular file")),
    (
        "cluster: alias bomb",
        lambda t: [str(write(t / "job.yaml", JOB)), "--cluster", str(write(t / "cluster.yaml", alias_bomb(9, "x")))],
        ("cluster.yaml", "more than 10000 values"),
    ),
    (
        "cluster: a FIFO",
        lambda t: [str(write(t / "job.yaml", JOB)), "--cluster", str(fifo(t / "cluster.yaml"))],
        ("cluster.yaml", "not a regular file"),
    ),
    (
        "resume: job.yaml an alias bomb",
        lambda t: [str(write(t / "job.yaml", JOB)), "--resume", str(resume_dir(t, alias_bomb(9)))],
        ("old-run/job.yaml", "more than 10000 values"),
    ),
]


@pytest.mark.parametrize(("make", "says"), [c[1:] for c in HOSTILE_FILES], ids=[c[0] for c in HOSTILE_FILES])
def test_hostile_files_are_refused_fast(tmp_path: Path, make: Callable[[Path], list[str]], says: tuple[str, ...]):
    args = make(tmp_path)
    out = [] if "--resume" in args else ["--out", str(tmp_path / "run")]  # a resume writes into its own directory
    proc = run_cli("run", *args, *out, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr) < SHORT and "Traceback" not in proc.stderr, proc.stderr[:2000]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in says:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "run").exists()


# --- cluster values: refused before anything starts -------------------------------------------------------------

BAD_CLUSTER_VALUES = [
    # (cluster file text, the key the line names)
    ("local: {memory_limit: 1KB}\n", "local.memory_limit"),  # accepted before: the worker paused forever
    ("local: {memory_limit: -5GB}\n", "local.memory_limit"),
    ("local: {memory_limit: 1000}\n", "local.memory_limit"),
    ("local: {dashboard_address: garbage}\n", "local.dashboard_address"),
    ("local: {dashboard_address: 'host:99999'}\n", "local.dashboard_address"),
    ("connect_timeout: .nan\n", "connect_timeout"),
    ("connect_timeout: .inf\n", "connect_timeout"),
    ("scheduler: 'tcp://:::'\n", "scheduler"),  # exit 3 "not reachable" before
    ("scheduler: tcp://127.0.0.1:99999\n", "scheduler"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CLUSTER_VALUES, ids=[t.strip() for t, _ in BAD_CLUSTER_VALUES])
def test_bad_cluster_values_exit_2_before_anything_starts(
    tmp_path: Path, text: str, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cluster = write(tmp_path / "cluster.yaml", text)
    code = main(["run", str(write(tmp_path / "job.yaml", JOB)), "--cluster", str(cluster), "--out", "run"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"{cluster}: {key}: " in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "augment"])
@pytest.mark.parametrize("address", ["tcp://:::", "garbage", "tcp://host:99999", "inproc://x"])
def test_bad_scheduler_option(
    tmp_path: Path, command: str, address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--scheduler`` is checked where it is read, like the cluster file's ``scheduler``: exit 2 naming the option."""
    monkeypatch.chdir(tmp_path)
    job = str(write(tmp_path / "job.yaml", JOB))
    args = [job, "--out", "run"] if command == "run" else ["--store", "s.zarr", "--out", "run", "--rows", "3"]
    code = main([command, *args, "--scheduler", address])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "--scheduler" in lines[0] and "tcp://HOST:PORT" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


# --- the bare command line --------------------------------------------------------------------------------------


def test_version() -> None:
    proc = run_cli("--version", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"mnist-kmeans {__version__}\n"


def test_no_command_prints_the_usage_with_the_commands() -> None:
    proc = run_cli(timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: mnist-kmeans")
    for command in ("ingest", "run", "report", "augment"):
        assert f"\n    {command} " in proc.stderr, command  # each command with its one-line help


# --- a run directory handed to `report` -----------------------------------------------------------------------------


def _bomb_job_yaml(run_dir: Path) -> None:
    (run_dir / "job.yaml").write_text(alias_bomb(9))


def _fifo_job_yaml(run_dir: Path) -> None:
    (run_dir / "job.yaml").unlink()
    fifo(run_dir / "job.yaml")


def _deep_metrics(run_dir: Path) -> None:
    (run_dir / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)


def _huge_evaluation(run_dir: Path) -> None:
    with open(run_dir / "evaluation.json", "w") as f:
        f.truncate(65 << 20)


@pytest.mark.parametrize(
    ("damage", "code", "says"),
    [
        (_bomb_job_yaml, 0, ()),  # job.yaml is shown as text; its centroid_grids cannot be read: the best K is shown
        (_fifo_job_yaml, 2, ("job.yaml", "not a regular file")),
        (_deep_metrics, 2, ("metrics.json", "nested too deeply")),
        (_huge_evaluation, 2, ("evaluation.json", "larger than")),
    ],
    ids=["job.yaml an alias bomb", "job.yaml a FIFO", "metrics.json nested 100,000 deep", "evaluation.json of 65 MiB"],
)
def test_report_of_a_hostile_run_directory(tmp_path: Path, damage, code: int, says: tuple[str, ...]) -> None:
    from tests.report_data import make_run_dir

    run_dir = tmp_path / "run"
    make_run_dir(run_dir)
    damage(run_dir)
    proc = run_cli("report", str(run_dir), timeout=60, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(proc.stderr) < SHORT and "Traceback" not in proc.stderr, proc.stderr[:2000]
    if code == 2:
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1 and all(fragment in line for fragment in says), line
        assert not (run_dir / "report.html").exists()
