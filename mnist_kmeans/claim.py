"""Exclusive claims: one process at a time writes a run directory (docs/contract.md, "Run directory") or builds a
store (``data/staging.py``).

A claim is an ``fcntl.flock`` on a lock file, taken without waiting before anything is written and held until the
writer is done; a second writer gets a UserError and has changed nothing. The kernel drops the lock when its process
dies, even by SIGKILL, so a lock file left behind blocks nobody. The holder removes the file while it still holds the
lock; a writer that opened the old file meanwhile sees that it is gone (:func:`lock_file`) and locks a new one, so no
two writers ever hold locks on files of one name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from mnist_kmeans.errors import UserError

RUN_LOCK = ".lock"  # in the run directory, while a process writes it


class RunDirBusy(UserError):
    """The run directory is claimed by another process (a ``run``, a submitted job's driver, a ``cancel``)."""


def lock_file(path: Path) -> int:
    """An open descriptor of ``path`` (created if need be) holding its exclusive ``flock``.

    Raises ``BlockingIOError`` when another process holds it, ``OSError`` when the file cannot be made.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            on_disk, held = os.stat(path), os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the previous holder removed this file on its way out: lock the new one


def unlock_file(path: Path, fd: int) -> None:
    """Remove the lock file, then drop its lock (in this order: see the module docstring)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass
class RunDirClaim:
    """The run directory of this process: locked, and empty but for the lock when a new run claimed it."""

    run_dir: Path
    fd: int
    made: list[Path] = field(default_factory=list)  # directories this claim created, the deepest first

    def release(self) -> None:
        """Release the claim. A run directory this claim made that holds nothing else (the run never started
        writing) is removed again, with its parents made for it: a run that did not start leaves nothing behind."""
        unlock_file(self.run_dir / RUN_LOCK, self.fd)
        _remove_empty(self.made)


def claim_run_dir(run_dir: Path, resuming: bool) -> RunDirClaim:
    """Claim ``run_dir`` for this process before anything is written to it.

    A new run needs an empty (or no) directory; a resume, its existing run directory. A directory another process is
    writing is refused either way, and so is one that cannot be written (a read-only file system): the UserError
    comes before any cluster starts.
    """
    made = [] if resuming else _make_dirs(run_dir)
    try:
        fd = lock_file(run_dir / RUN_LOCK)
    except OSError as exc:
        _remove_empty(made)
        if isinstance(exc, BlockingIOError):
            raise RunDirBusy(f"{run_dir}: another mnist-kmeans run is writing this run directory") from None
        raise UserError(f"{run_dir}: cannot write there: {exc.strerror or exc}") from None
    claim = RunDirClaim(run_dir, fd, made)
    if not resuming and any(p.name != RUN_LOCK for p in run_dir.iterdir()):
        claim.release()
        raise UserError(f"{run_dir}: run directory exists and is not empty (use --resume {run_dir} to continue it)")
    return claim


def _make_dirs(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and its missing parents; return those created, the deepest first."""
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{run_dir}: cannot create run directory: {exc.strerror or exc}") from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove each directory in turn while it is empty (``rmdir`` refuses the others)."""
    with contextlib.suppress(OSError):
        for directory in directories:
            directory.rmdir()
