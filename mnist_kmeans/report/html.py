"""``report.html``: one self-contained page rendered from the files of a run directory, and nothing else.

:func:`render_report` reads the run directory (:mod:`.rundir`; no cluster, no store), draws the figures
(:mod:`.gallery`, :mod:`.figures`), saves each as ``figures/<name>.png`` and renders the Jinja template with
autoescaping on, the PNGs embedded as ``data:`` URIs. The page loads nothing from anywhere: inline CSS, no script,
no font, no external link. Every file goes through :func:`mnist_kmeans.files.write_atomic`, so a reader never sees
half a report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from mnist_kmeans.errors import UserError
from mnist_kmeans.files import write_atomic
from mnist_kmeans.reference import load_seed_table
from mnist_kmeans.report.context import build_context
from mnist_kmeans.report.gallery import ReportFigure, build_figures
from mnist_kmeans.report.rundir import RunData, load_run

Timings = Callable[[], Mapping[str, Any]]


def environment() -> Environment:
    """The templates' Jinja environment: the report's and the comparison page's (:mod:`.compare`)."""
    return Environment(
        loader=PackageLoader("mnist_kmeans.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt variable is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(context: Mapping[str, Any]) -> str:
    """The report page for a context made by :func:`~mnist_kmeans.report.context.build_context`."""
    return environment().get_template("report.html.j2").render(**context)


def render_blocks(context: Mapping[str, Any], names: Sequence[str]) -> str:
    """Some blocks of the report page alone, escaped as the page is: the Python API's ``Run._repr_html_`` shows the
    summary and the metrics table inline in Jupyter."""
    template = environment().get_template("report.html.j2")
    variables = template.new_context(dict(context))
    return "".join("".join(template.blocks[name](variables)) for name in names)


def render_report(run_dir: str | Path, final_timings: Timings | None = None) -> Path:
    """Render ``<run_dir>/report.html`` (and ``<run_dir>/figures/*.png``) from the run directory alone.

    Returns the path of the report. Raises :class:`~mnist_kmeans.errors.UserError` when a required file is
    missing or malformed; nothing is written in that case.
    """
    run = load_run(run_dir)
    seed_table = load_seed_table()
    figs, notes = build_figures(run, seed_table)
    return write_report(run, figs, notes, seed_table, final_timings)


def write_report(
    run: RunData,
    figs: Sequence[ReportFigure],
    notes: Iterable[str],
    seed_table: Mapping[str, Any],
    final_timings: Timings | None = None,
) -> Path:
    """Write the figures and ``report.html`` of ``run``; returns the path of the report.

    ``final_timings``, if given, is called just before the page is rendered and returns the timings it shows instead
    of those ``run`` was loaded with: ``run`` uses it to show the report's own time and the total.
    """
    if final_timings is not None:
        run = dataclasses.replace(run, metrics={**run.metrics, "timings": dict(final_timings())})
    # what the page says of the directory is true of it now: `run` renames dask-performance.html into place last
    run = dataclasses.replace(run, has_performance=(run.run_dir / "dask-performance.html").is_file())
    html = render_html(build_context(run, figs, notes, seed_table))
    fig_dir = run.run_dir / "figures"
    try:
        fig_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{exc.filename or run.run_dir}: cannot write the report: {exc.strerror or exc}") from None
    for fig in figs:
        write_atomic(fig_dir / f"{fig.name}.png", fig.png)
    out = run.run_dir / "report.html"
    write_atomic(out, html)
    return out
