"""The report layer: ``report.html`` and its figures, from the files of a run directory alone.

:func:`render_report` is the one-call entry point; :func:`load_run`, :func:`build_figures` and
:func:`write_report` are its three steps, for a caller that draws the figures elsewhere (``run`` draws them on the
cluster's workers). The modules, from the bottom up: :mod:`.values` and :mod:`.formatting` (JSON values as text),
:mod:`.rundir` (reading and checking the run directory), :mod:`.figures` (PNG drawing), :mod:`.gallery` (the
figures with their captions), :mod:`.context` (the template's variables) and :mod:`.html` (the page, written).
:mod:`.compare` sets several finished runs side by side on a page of its own.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["build_figures", "compare", "load_run", "render_report", "write_report"]

# Lazy: importing the package must not pull in matplotlib (the CLI imports it only for `report` and `run`).
_HOMES = {
    "build_figures": "mnist_kmeans.report.gallery",
    "compare": "mnist_kmeans.report.compare",
    "load_run": "mnist_kmeans.report.rundir",
    "render_report": "mnist_kmeans.report.html",
    "write_report": "mnist_kmeans.report.html",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
