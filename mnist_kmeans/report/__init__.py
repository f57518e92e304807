"""The report layer: figures (:mod:`.figures`) and the self-contained ``report.html`` (:mod:`.html`).

``render_report(run_dir)`` is the one entry point; it reads only the run directory.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_report"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in matplotlib (the CLI imports it only for `report` and `run`).
    if name == "render_report":
        from mnist_kmeans.report.html import render_report

        return render_report
    raise AttributeError(name)
