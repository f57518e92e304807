"""The one atomic writer: every file the project writes goes to a temporary name, is synced and renamed into place,
so nothing half-written ever looks finished. Files get the permissions of an ordinary ``open`` (0666 minus the umask).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mnist_kmeans.errors import UserError


def _umask() -> int:
    try:  # Linux says it without changing it; os.umask() would change it for every thread for a moment
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    payload = data if isinstance(data, bytes) else data.encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
