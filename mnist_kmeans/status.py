"""A job's state in its run directory (docs/contract.md, "status.json"): what ``status`` and ``wait`` read, so that
they need nothing but the directory; and ``cancel.request``, the flag by which ``cancel`` asks the job to stop.

The process that runs the job (``run``, or a submitted job's driver on the cluster) writes ``status.json`` at each
stage: ``queued`` (by ``submit``), ``fitting`` with each K's progress (:class:`StatusProgress`, at most twice a
second), ``evaluating``, then ``done``, ``failed`` or ``cancelled`` with the one-line reason and the exit code ``run``
has for it. Each write replaces the file whole (``files.write_atomic``): a reader never sees half of one.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from mnist_kmeans.errors import Cancelled, ClusterError, UserError, one_line
from mnist_kmeans.files import write_atomic, write_json
from mnist_kmeans.progress import KStatus, Progress, progress_line
from mnist_kmeans.reading import read_text

STATUS_FILE = "status.json"
CANCEL_FILE = "cancel.request"
STATUS_INTERVAL = 0.5  # seconds between two writes of the fit's progress (and looks at the cancel flag)


class State(Enum):
    QUEUED = "queued"  # submitted; no driver has started on the run directory yet
    FITTING = "fitting"
    EVALUATING = "evaluating"  # every K fitted and evaluated; the results and the report are being written
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by ``cancel``, or by Ctrl-C of ``run``

    @property
    def finished(self) -> bool:
        return self in (State.DONE, State.FAILED, State.CANCELLED)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JobStatus:
    """The content of ``status.json``."""

    state: State
    # queued: where; fitting: the progress line; done: the report's path; failed, cancelled: the one-line reason
    detail: str = ""
    exit_code: int | None = None  # once finished: what ``run`` exited with, and ``wait`` exits with
    attempt: int = 0  # how many processes have started the job in this directory (a driver run again counts)
    updated_utc: str = field(default_factory=_utc_now)

    def line(self) -> str:
        """What ``status`` prints: ``fitting: fit  42% of epochs | K=4 1/2 ep (attempt 1, updated 12:01:02Z)``."""
        head = f"{self.state.value} (exit {self.exit_code})" if self.state is State.FAILED else self.state.value
        text = f"{head}: {self.detail}" if self.detail else head
        if self.state is State.CANCELLED and self.detail.startswith(State.CANCELLED.value):
            text = self.detail  # "cancelled: finished epochs are saved; ...", as run said it
        if self.state.finished:
            return text
        return f"{text} (attempt {self.attempt}, updated {self.updated_utc})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "detail": self.detail,
            "exit_code": self.exit_code,
            "attempt": self.attempt,
            "updated_utc": self.updated_utc,
        }

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> JobStatus:
        try:
            code = data["exit_code"]
            status = cls(
                State(data["state"]), str(data["detail"]), code, int(data["attempt"]), str(data["updated_utc"])
            )
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: not a status file of mnist-kmeans") from None
        if code is not None and not isinstance(code, int):
            raise UserError(f"{path}: exit_code: not an integer")
        return status

    def error(self) -> Exception:
        """A finished, unsuccessful job's reason as the error ``run`` ended with (cli.main says it and exits)."""
        if self.exit_code == Cancelled.exit_code:
            return Cancelled(self.detail)
        if self.exit_code == UserError.exit_code:
            return UserError(self.detail)
        return ClusterError(self.detail)


def read_status(run_dir: Path) -> JobStatus | None:
    """The job's status; None when the directory has none (nothing has started a job there)."""
    path = Path(run_dir) / STATUS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(read_text(path, limit=64 * 1024))
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None
    return JobStatus.from_dict(data, path)


def write_status(run_dir: Path, status: JobStatus, strict: bool = True) -> None:
    """Replace ``status.json``. Not ``strict``: a failed write is let go, for a status said while the job's own writes
    go on (or have just failed): a full disk is theirs to report, naming their file."""
    try:
        write_json(Path(run_dir) / STATUS_FILE, status.as_dict())
    except UserError:
        if strict:
            raise


def attempts(run_dir: Path) -> int:
    """How many processes have started the job in ``run_dir`` so far (0 for a new run)."""
    try:
        status = read_status(run_dir)
    except UserError:
        return 0
    return status.attempt if status is not None else 0


def ended(exc: BaseException, attempt: int) -> JobStatus:
    """The status of a job that ``exc`` ended: failed with the exit code of its class, or cancelled. An error of no
    class of ours is said with its type, as exit 3 (on the cluster, most likely its environment)."""
    if isinstance(exc, Cancelled | KeyboardInterrupt):
        return JobStatus(State.CANCELLED, one_line(exc) or "interrupted", Cancelled.exit_code, attempt)
    if isinstance(exc, UserError | ClusterError):
        return JobStatus(State.FAILED, one_line(exc), exc.exit_code, attempt)
    return JobStatus(State.FAILED, one_line(exc, with_type=True), ClusterError.exit_code, attempt)


# --- the cancel flag ----------------------------------------------------------------------------------------------


def cancel_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / CANCEL_FILE).exists()


def request_cancel(run_dir: Path) -> None:
    write_atomic(Path(run_dir) / CANCEL_FILE, _utc_now() + "\n")


def clear_cancel(run_dir: Path) -> None:
    """Drop an earlier cancel: a process that (re)starts the job on purpose (``run``, ``submit``) does."""
    (Path(run_dir) / CANCEL_FILE).unlink(missing_ok=True)


class StatusProgress(Progress):
    """The terminal's :class:`~mnist_kmeans.progress.Progress`, which also writes each K's progress to
    ``status.json`` and stops the fit (:class:`Cancelled`) once ``cancel.request`` is there."""

    def __init__(self, run_dir: Path, attempt: int, stream: Any = None):
        super().__init__(stream)
        self.run_dir, self.attempt = Path(run_dir), attempt
        self.written = 0.0
        self.all_evaluated = False

    def update(self, records: Mapping[int, KStatus], epochs: int, force: bool = False) -> None:
        super().update(records, epochs, force)
        now = time.perf_counter()
        if not force and now - self.written < STATUS_INTERVAL:
            return
        self.written = now
        # not on the forced last update: that one comes while the fit ends, maybe with an error of its own
        if not force and cancel_requested(self.run_dir):
            raise Cancelled("cancelled")  # the run adds how to continue (run._one_line_errors)
        self.all_evaluated = all(record.evaluated for record in records.values())
        line = progress_line(records, epochs)
        write_status(self.run_dir, JobStatus(State.FITTING, line, attempt=self.attempt), strict=False)

    def close(self) -> None:
        super().close()
        if self.all_evaluated:
            evaluating = JobStatus(State.EVALUATING, "writing the results and the report", None, self.attempt)
            write_status(self.run_dir, evaluating, strict=False)
