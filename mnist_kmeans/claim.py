"""Exclusive claims: one process at a time writes a run directory (docs/contract.md, "Run directory").

A claim is an ``fcntl.flock`` on a lock file, taken before anything is written and held until the writer ends. The
kernel drops it when its process ends, even by SIGKILL, so a claim never outlives its writer and a later run can
take it again without any clean-up. The lock file stays: removing it would let a second process lock a file that
a third no longer sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from mnist_kmeans.errors import UserError

RUN_LOCK = ".lock"  # in the run directory; held by the process that writes it


@dataclass
class Lock:
    """An ``flock`` held on ``path`` through the open descriptor ``fd``; ``created``: this claim made the file."""

    path: Path
    fd: int
    created: bool

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def take_lock(path: Path, busy: str) -> Lock:
    """Create (or open) ``path`` and lock it exclusively; a lock held elsewhere is a UserError saying ``busy``."""
    created = True
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            created, fd = False, os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot write there: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{path.parent}: {busy}") from None
    return Lock(path, fd, created)


@dataclass
class RunDirClaim:
    """The run directory of this process: locked, and empty but for the lock when a new run claimed it."""

    run_dir: Path
    lock: Lock
    made: list[Path] = field(default_factory=list)  # directories this claim created, the deepest first

    def release(self) -> None:
        """Release the claim. A run directory that holds nothing but the lock (the run never started writing) is
        removed again, with the directories made for it: a run that did not start leaves nothing behind."""
        try:
            if self.lock.created and [p.name for p in self.run_dir.iterdir()] == [RUN_LOCK]:
                self.lock.path.unlink()
                for directory in self.made:
                    directory.rmdir()
        except OSError:
            pass  # something else appeared there meanwhile: leave it all
        finally:
            self.lock.release()


def claim_run_dir(run_dir: Path, resuming: bool) -> RunDirClaim:
    """Claim ``run_dir`` for this process before anything is written to it.

    A new run needs an empty (or no) directory; a resume, its existing run directory. A directory another process is
    writing is refused either way, and so is one that cannot be written (a read-only file system): the UserError
    comes before any cluster starts.
    """
    made = [] if resuming else _make_dirs(run_dir)
    try:
        lock = take_lock(run_dir / RUN_LOCK, "another mnist-kmeans run is writing this run directory")
    except UserError:
        _remove_dirs(made)
        raise
    claim = RunDirClaim(run_dir, lock, made)
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


def _remove_dirs(made: list[Path]) -> None:
    with contextlib.suppress(OSError):
        for directory in made:
            directory.rmdir()
