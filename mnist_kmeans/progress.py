"""The fit's status line: one line on a terminal (stderr), rewritten as results arrive (``schedule.run_chains``);
in a Jupyter kernel, a notebook progress bar instead (``tqdm.auto``: a widget where ipywidgets is installed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol


class KStatus(Protocol):
    """What the status line reads of one K's record while its tasks run."""

    @property
    def fit_tasks(self) -> int:
        """partial_fit tasks of the K in all, its screening's included."""

    @property
    def fit_done(self) -> int:
        """partial_fit tasks of the K finished."""

    @property
    def epochs_measured(self) -> bool:
        """Whether the inertia after its epochs is known (its Lloyd steps, if any, are under way)."""

    @property
    def evaluated(self) -> bool:
        """Whether its test statistics are known."""


class Progress:
    """One status line on a terminal (stderr); silent when stderr is not a terminal. In a Jupyter kernel (and no
    ``stream`` given), a progress bar of the same content: terminal control characters would garble a notebook.

    The line shows the share of the grid's partial_fit tasks finished and each K's stage: epochs done
    (``"1/2 ep"``), ``"lloyd"`` once its epochs are measured, ``"done"`` once it is evaluated. It is rewritten at
    most every ``min_interval`` seconds, unless forced.
    """

    def __init__(self, stream: Any = None, min_interval: float = 0.2):
        self.notebook = stream is None and in_notebook()
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.notebook or bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval, self.last = min_interval, 0.0
        self.bar: Any = None  # the notebook's tqdm bar, made at the first update

    def update(self, records: Mapping[int, KStatus], epochs: int, force: bool = False) -> None:
        """Rewrite the line from each K's record (``records``: K -> record) of a fit of ``epochs`` epochs."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.min_interval):
            return
        self.last = now
        if self.notebook:
            self._draw_bar(records, epochs)
            return
        self.stream.write(f"\r{progress_line(records, epochs)}\033[K")
        self.stream.flush()

    def _draw_bar(self, records: Mapping[int, KStatus], epochs: int) -> None:
        """The notebook's bar: partial_fit tasks done of all, each K's stage beside it."""
        from tqdm.auto import tqdm

        total = sum(record.fit_tasks for record in records.values())
        if self.bar is None:
            self.bar = tqdm(total=total, desc="fit", unit="task", dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = sum(record.fit_done for record in records.values())
        self.bar.set_postfix_str("  ".join(f"K={k} {_stage(r, epochs)}" for k, r in sorted(records.items())))

    def close(self) -> None:
        """End the line (a terminal's next output starts below it), or the notebook's bar."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and not self.notebook:
            self.stream.write("\n")
            self.stream.flush()


def progress_line(records: Mapping[int, KStatus], epochs: int) -> str:
    """``fit  42% of epochs | K=4 1/2 ep  K=8 lloyd``: the share of partial_fit tasks done and each K's stage (the
    terminal's line, and a submitted job's status: ``status.py``)."""
    stages = "  ".join(f"K={k} {_stage(record, epochs)}" for k, record in sorted(records.items()))
    total = sum(record.fit_tasks for record in records.values())
    percent = 100 * sum(record.fit_done for record in records.values()) // max(total, 1)
    return f"fit {percent:3d}% of epochs | {stages}"


def _stage(record: KStatus, epochs: int) -> str:
    if record.evaluated:
        return "done"
    if record.epochs_measured:
        return "lloyd"
    return f"{epochs * record.fit_done // max(record.fit_tasks, 1)}/{epochs} ep"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (an IPython shell with a kernel), where stderr is no terminal."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has imported it already
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None
