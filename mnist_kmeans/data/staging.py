"""Where a new store is built: what is at the target, a temporary sibling directory, and the swap into place.

Shared by ``ingest`` and ``augment``. A local store is built in ``<store>.tmp-<hex>`` and renamed into place only once
complete, so an error or a kill leaves what was there untouched, and the next build removes the leftovers. A remote
store (URL) is written in place: until ``complete: true`` is written it is incomplete, which ``open_store`` refuses.
One writer at a time: a local store is claimed (:func:`claimed`) before anything at its path is read; a remote one
has no lock, and its writer checks that the store is still its own (``store.check_writer``) before marking it
complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mnist_kmeans.claim import lock_file, unlock_file
from mnist_kmeans.data.store import FORMAT, Options, is_remote, read_attrs
from mnist_kmeans.errors import Log, UserError


def local_path(store: str) -> Path | None:
    """The absolute path of a local store (``file://`` included), ``None`` for a remote one."""
    if store.startswith("file://"):
        return Path(os.path.abspath(store[len("file://") :]))
    return None if is_remote(store) else Path(os.path.abspath(store))


@contextlib.contextmanager
def claimed(local: Path | None, store: str) -> Iterator[None]:
    """Hold the store for one writer (ingest or augment) from before its target is read until it is in place.

    The claim (``claim.lock_file``) is an exclusive ``flock`` on the sibling file ``<store>.lock``: a second writer
    gets a UserError and has changed nothing; the holder removes the file when done. A remote store cannot be claimed,
    nor a place where no lock file can be made (read-only, a file where the parent should be): nothing can be written
    there either, and the write reports why.
    """
    lock = None if local is None else local.with_name(f"{local.name}.lock")
    fd = None if lock is None else _locked(lock, store)
    try:
        yield
    finally:
        if fd is not None:
            unlock_file(lock, fd)


def _locked(lock: Path, store: str) -> int | None:
    """The descriptor holding ``lock``, or ``None`` when no lock file can be made; a UserError when another process
    holds it."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return lock_file(lock)
    except BlockingIOError:
        raise UserError(
            f"{store}: another ingest or augment is writing it; run this again once that has finished"
        ) from None
    except OSError:
        return None


def existing_store(store: str, local: Path | None, options: Options = None) -> dict[str, Any] | None:
    """The attributes of the mnist-kmeans store at the target, ``None`` when the target is free; refuse the rest."""
    nonempty_dir = False
    if local is not None and local.exists():
        if not local.is_dir():
            raise UserError(f"{store}: exists and is not a directory; will not overwrite it")
        nonempty_dir = any(local.iterdir())
        if not nonempty_dir:
            return None
    attrs = read_attrs(store, options)
    if attrs is None:
        if nonempty_dir:
            raise UserError(f"{store}: exists and is not an mnist-kmeans store; will not overwrite it")
        return None
    if attrs.get("format") != FORMAT:
        raise UserError(
            f"{store}: holds a Zarr group of format {attrs.get('format')!r}, not {FORMAT!r}; will not overwrite it"
        )
    return attrs


@contextlib.contextmanager
def staging(local: Path | None, store: str, log: Log) -> Iterator[str]:
    """Yield where to build the new store; on success, put it in place of the old one.

    A remote store is built in place. A local one is built in ``<store>.tmp-<hex>``, which holds an exclusive
    ``flock`` while in use: the kernel drops it when its process dies, even by SIGKILL, so a later ingest can tell
    a leftover from a directory another ingest is still writing.
    """
    if local is None:
        yield store
        return
    _remove_leftovers(local, log)
    tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex}")
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        lock = os.open(tmp, os.O_RDONLY)
    except OSError as exc:
        raise UserError(f"{store}: cannot create the store there: {_why_unwritable(local, exc)}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield str(tmp)
        _move_into_place(tmp, local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _why_unwritable(local: Path, exc: OSError) -> str:
    """The reason to tell: a file where a parent directory should be, else the system's message."""
    ancestor = local.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    return exc.strerror or str(exc)


def _move_into_place(tmp: Path, local: Path) -> None:
    try:
        if local.is_dir() and any(local.iterdir()):
            # The old store goes only now that the new one is complete: aside, swap, delete.
            old = local.with_name(f"{local.name}.old-{uuid.uuid4().hex}")
            os.rename(local, old)
            try:
                os.rename(tmp, local)
            except OSError:
                os.rename(old, local)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, local)  # rename(2) replaces an empty directory
    except OSError as exc:
        raise UserError(f"{local}: cannot move the new store into place: {exc.strerror or exc}") from None


def _remove_leftovers(local: Path, log: Log) -> None:
    """Delete the temporary directories that interrupted ingests into ``local`` left behind."""
    prefix = glob.escape(local.name)
    for leftover in sorted(local.parent.glob(f"{prefix}.tmp-*")) + sorted(local.parent.glob(f"{prefix}.old-*")):
        if leftover.is_dir() and (leftover.name.startswith(f"{local.name}.old-") or _unlocked(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)
            log(f"ingest: removed {leftover}, left by an interrupted ingest")


def _unlocked(path: Path) -> bool:
    """Whether no live process holds the ``flock`` of directory ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
