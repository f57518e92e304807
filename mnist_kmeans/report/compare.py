"""``mnist-kmeans compare``: finished runs of the same data side by side on one self-contained page.

The data flow (docs/contract.md, "compare"): each run directory is read and checked by
:func:`~mnist_kmeans.report.rundir.load_run`, which also refuses a run that did not finish, and its ``job.yaml``
is read as the job file it is; :func:`check_same_data` refuses runs whose data differ
(:func:`~mnist_kmeans.report.identity.data_fingerprint`); :func:`comparison_figures` and
:func:`comparison_context` turn the runs into the figures and the variables of ``compare.html.j2``;
:func:`compare` writes the page through :func:`mnist_kmeans.files.write_atomic`, never into a run directory.

The metrics shown are every per-K number that all runs have, in ``metrics.json``'s order, so a field that a later
version adds to ``results`` shows up without a change here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mnist_kmeans
from mnist_kmeans.errors import UserError, count
from mnist_kmeans.files import write_atomic
from mnist_kmeans.reading import read_text, read_yaml_mapping
from mnist_kmeans.report import figures
from mnist_kmeans.report.formatting import MISSING, flatten, fmt_big, fmt_int, fmt_num, fmt_pct, fmt_secs, fmt_value
from mnist_kmeans.report.gallery import ReportFigure
from mnist_kmeans.report.html import environment
from mnist_kmeans.report.identity import data_fingerprint
from mnist_kmeans.report.rundir import RunData, load_run
from mnist_kmeans.report.values import is_int, is_num

MIN_RUNS = 2
DEFAULT_OUT = "compare.html"
GENERATOR = "mnist_kmeans compare"
"""The page's ``<meta name="generator">``: an existing ``--out`` file is overwritten only if it holds this."""

MAX_PAGE_BYTES = 256 << 20  # an earlier comparison page: figures of a few runs, a few MB

SETTING_FIELDS = ("epochs", "lloyd_steps", "n_init", "restart")
"""Per-K numbers that are settings, not measurements: in the tables, not drawn as curves."""

RunRef = Any
"""A run directory: a path (``str`` or ``os.PathLike``), or an object with a ``path`` (a ``Run`` of the Python API)."""


@dataclass(frozen=True)
class ComparedRun:
    """One run on the page: its label and colour (the same in every table and figure), its files and its job."""

    label: str
    color: str
    data: RunData
    job: dict[str, Any]

    def results_by_k(self) -> dict[int, dict[str, Any]]:
        return {r["k"]: r for r in self.data.results}


# ------------------------------------------------------------------------------------------------ the runs


def _run_dir(ref: RunRef) -> Path:
    path = getattr(ref, "path", ref)
    try:
        return Path(path)
    except TypeError:
        raise UserError(f"compare: {type(ref).__name__} is not a run directory (a path, or a run with .path)") from None


def _labels(dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, numbered when two names are the same."""
    names = [d.resolve().name or str(d) for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{i + 1}: {name}" for i, name in enumerate(names)]


def load_runs(refs: Iterable[RunRef]) -> list[ComparedRun]:
    """Read and check every run directory, in the order given.

    Raises :class:`UserError` (one line, naming the run directory or file) for fewer than :data:`MIN_RUNS` runs,
    a directory given twice, a run that did not finish, a missing or malformed file.
    """
    dirs = [_run_dir(ref) for ref in refs]
    if len(dirs) < MIN_RUNS:
        raise UserError(f"compare: needs at least {MIN_RUNS} run directories, got {len(dirs)}")
    seen: dict[Path, Path] = {}
    for d in dirs:
        if d.resolve() in seen:
            raise UserError(f"{d}: given twice (as {seen[d.resolve()]}); compare each run once")
        seen[d.resolve()] = d
    runs = []
    for i, (d, label) in enumerate(zip(dirs, _labels(dirs), strict=True)):
        data = load_run(d)
        if data.manifest is None:
            raise UserError(f"{d / 'manifest.json'}: missing: compare needs it to tell which data the run is on")
        job = read_yaml_mapping(d / "job.yaml")  # the job as resolved: its keys are what the runs may differ in
        runs.append(ComparedRun(label, figures.run_color(i), data, job))
    return runs


def _first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """The first key (dotted) whose values differ between two fingerprints."""
    for key in dict.fromkeys([*a, *b]):
        if isinstance(a.get(key), Mapping) and isinstance(b.get(key), Mapping):
            inner = _first_difference(a[key], b[key])
            if inner:
                return f"{key}.{inner}"
        elif a.get(key) != b.get(key):
            return key
    return ""


def check_same_data(runs: Sequence[ComparedRun]) -> None:
    """Refuse runs that are not all on the data of the first: one line naming the run directory and what differs."""
    first = runs[0]
    reference = _fingerprint(first)
    for run in runs[1:]:
        other = _fingerprint(run)
        if other != reference:
            raise UserError(
                f"{run.data.run_dir}: not on the same data as {first.data.run_dir} "
                f"(their data's {_first_difference(reference, other)} differs); compare sets runs of the same data "
                "side by side"
            )


def _fingerprint(run: ComparedRun) -> dict[str, Any]:
    fingerprint = data_fingerprint(run.data.metrics.get("dataset", {}), run.data.manifest)
    if fingerprint is None:
        raise UserError(
            f"{run.data.run_dir / 'manifest.json'}: key 'data.md5' is missing: cannot tell which data the run is on"
        )
    return fingerprint


# --------------------------------------------------------------------------------------- what they hold


def per_k_fields(runs: Sequence[ComparedRun]) -> tuple[list[str], list[str]]:
    """The per-K numeric fields of ``results`` that every run has (first run's order), and those only some have."""
    held = [
        list(dict.fromkeys(key for r in run.data.results for key, v in r.items() if key != "k" and is_num(v)))
        for run in runs
    ]
    common = [key for key in held[0] if all(key in h for h in held[1:])]
    some = [key for key in dict.fromkeys(k for h in held for k in h) if key not in common]
    return common, some


def _fmt_field(key: str, value: Any) -> str:
    """A per-K value as the report shows its kind: accuracies in percent, seconds as durations, counts as integers."""
    if key.startswith("accuracy"):
        return fmt_pct(value)
    if key.endswith("_seconds"):
        return fmt_secs(value)
    if is_int(value):
        return fmt_int(value)
    if is_num(value) and abs(value) >= 1000:
        return fmt_big(value)
    return fmt_num(value)


def _cell(results: Mapping[int, Mapping[str, Any]], k: int, key: str) -> str:
    return _fmt_field(key, results[k].get(key)) if k in results else MISSING


def _metric_tables(runs: Sequence[ComparedRun], fields: Sequence[str]) -> list[dict[str, Any]]:
    """One table per K of any run: a row per field, a cell per run (a dash where the K is not in the run's grid)."""
    by_k = [run.results_by_k() for run in runs]
    ks = sorted({k for results in by_k for k in results})
    return [
        {
            "k": k,
            "absent": [run.label for run, results in zip(runs, by_k, strict=True) if k not in results],
            "rows": [{"key": key, "cells": [_cell(results, k, key) for results in by_k]} for key in fields],
        }
        for k in ks
    ]


def _settings(run: ComparedRun) -> dict[str, str]:
    """What a run was asked to do and where, as (dotted key -> text): its job, then the facts of its data build,
    cluster and software that may differ between runs of the same data."""
    manifest = run.data.manifest or {}
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    cluster = run.data.metrics.get("cluster", {})
    rows = flatten(run.job)
    rows += [(f"data.{key}", fmt_value(data.get(key))) for key in ("chunk_rows", "ingest_id") if key in data]
    rows += [(f"cluster.{key}", fmt_value(cluster.get(key))) for key in ("n_workers", "threads") if key in cluster]
    if isinstance(manifest.get("versions"), dict) and manifest["versions"]:
        rows += flatten(manifest["versions"], "versions")
    rows.append(("resumed", "yes" if manifest.get("resumed") else "no"))
    return dict(rows)


def _settings_tables(runs: Sequence[ComparedRun]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The settings as rows of one cell per run: those whose values differ between runs, and those all share."""
    settings = [_settings(run) for run in runs]
    keys = dict.fromkeys(key for s in settings for key in s)
    rows = [{"key": key, "cells": [s.get(key, MISSING) for s in settings]} for key in keys]
    differ = [row for row in rows if len(set(row["cells"])) > 1]
    return differ, [row for row in rows if len(set(row["cells"])) == 1]


def _step_name(key: str) -> str:
    """A key of ``timings`` as the page names its step: ``cluster_start_s`` -> "cluster start"."""
    return key.removesuffix("_s").replace("_", " ")


def _step_seconds(run: ComparedRun) -> dict[str, float]:
    """The run's timings (``metrics.json`` ``timings``) by step name, without the total."""
    timings = run.data.metrics.get("timings", {})
    return {_step_name(k): v for k, v in timings.items() if k != "total_s" and is_num(v)}


def _timings_table(runs: Sequence[ComparedRun]) -> list[dict[str, Any]]:
    """A row per step (and the total last), a cell per run."""
    timings = [run.data.metrics.get("timings", {}) for run in runs]
    keys = [k for k in dict.fromkeys(k for t in timings for k in t) if k != "total_s"] + ["total_s"]
    return [{"key": _step_name(k), "cells": [fmt_secs(t.get(k)) for t in timings]} for k in keys]


def _k_selection_table(runs: Sequence[ComparedRun]) -> list[dict[str, Any]]:
    """``metrics.json``'s ``best_k`` and, where a run has it, its ``k_selection`` (each criterion's choice)."""
    flat = []
    for run in runs:
        selection = run.data.metrics.get("k_selection")
        flat.append(dict(flatten({"best_k": run.data.best_k, **({"k_selection": selection} if selection else {})})))
    keys = dict.fromkeys(key for f in flat for key in f)
    return [{"key": key, "cells": [f.get(key, MISSING) for f in flat]} for key in keys]


def _run_row(run: ComparedRun) -> dict[str, Any]:
    metrics = run.data.metrics
    top = max(run.data.results, key=lambda r: (r["accuracy_test"], -r["k"]))
    return {
        "label": run.label,
        "color": run.color,
        "run_dir": str(run.data.run_dir),
        "job": fmt_value(metrics.get("job")),
        "started": fmt_value(metrics.get("started_utc")),
        "ks": ", ".join(str(r["k"]) for r in run.data.results),
        "best_k": run.data.best_k,
        "most_accurate": f"{top['k']} ({fmt_pct(top['accuracy_test'])})",
        "total": fmt_secs(metrics.get("timings", {}).get("total_s")),
    }


def _dataset(run: ComparedRun) -> dict[str, Any]:
    """The shared data set, as the first run records it."""
    dataset = run.data.metrics.get("dataset", {})
    return {
        "name": run.data.identity.name,
        "n_train": fmt_int(dataset.get("n_train")),
        "n_test": fmt_int(dataset.get("n_test")),
        "n_classes": fmt_int(run.data.n_classes),
        "image_shape": " × ".join(str(v) for v in run.data.image_shape),
        "md5": [(str(k), fmt_value(v)) for k, v in run.data.manifest["data"]["md5"].items()],
    }


# ------------------------------------------------------------------------------------------------- figures


def _lines(runs: Sequence[ComparedRun], key: str) -> dict[str, dict[int, float]]:
    return {run.label: {r["k"]: float(r[key]) for r in run.data.results if is_num(r.get(key))} for run in runs}


def _above_lowest(lines: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """Each run's value relative to the lowest of all runs at that K (0 for the lowest): inertia differences
    between runs are a fraction of a percent, invisible on the absolute scale."""
    lowest: dict[int, float] = {}
    for line in lines.values():
        for k, v in line.items():
            lowest[k] = min(v, lowest.get(k, v))
    return {label: {k: v / lowest[k] - 1.0 for k, v in line.items() if lowest[k] > 0} for label, line in lines.items()}


def comparison_figures(runs: Sequence[ComparedRun], fields: Sequence[str]) -> list[ReportFigure]:
    """The page's figures: inertia (absolute and above the lowest run), every other per-K field, and the timings."""
    labels = [run.label for run in runs]
    names = ", ".join(labels)
    curves = [key for key in fields if key not in SETTING_FIELDS and key != "inertia"]
    out = []
    if "inertia" in fields:
        inertia = _lines(runs, "inertia")
        panels = [
            figures.Panel("inertia (training split)", inertia),
            figures.Panel("inertia above the lowest run at that K", _above_lowest(inertia), percent=True),
        ]
        out.append(
            ReportFigure(
                "inertia_vs_k",
                "Inertia of each K, run by run",
                "Left: each run's training inertia against K. Right: how far above the lowest of the runs it is at "
                "that K (0 for the lowest), which shows differences too small for the left panel.",
                f"Inertia against K for the runs {names}",
                figures.runs_vs_k(panels, labels, ncols=2),
            )
        )
    if curves:
        panels = [figures.Panel(key, _lines(runs, key), percent=key.startswith("accuracy")) for key in curves]
        out.append(
            ReportFigure(
                "metrics_vs_k",
                "Every per-K metric, run by run",
                "One panel per field of metrics.json's results that every run has, one line per run. Homogeneity "
                "and accuracy rise with K by construction; ARI and NMI are fair across K.",
                f"{len(curves)} metrics against K for the runs {names}",
                figures.runs_vs_k(panels, labels),
            )
        )
    seconds = {run.label: _step_seconds(run) for run in runs}
    steps = list(dict.fromkeys(step for s in seconds.values() for step in s))
    out.append(
        ReportFigure(
            "timings",
            "Where each run's time went",
            "Each run's steps (metrics.json timings), end to end. Runs on different clusters or machines are not "
            "comparable in time.",
            f"Timings of the runs {names}",
            figures.timings_by_run(seconds, labels, steps),
        )
    )
    return out


# ------------------------------------------------------------------------------------------------ the page


def comparison_context(runs: Sequence[ComparedRun], figs: Sequence[ReportFigure]) -> dict[str, Any]:
    """The variables of ``compare.html.j2``: every number already formatted, every text left raw to be escaped."""
    fields, only_some = per_k_fields(runs)
    differ, shared = _settings_tables(runs)
    return {
        "runs": [_run_row(run) for run in runs],
        "dataset": _dataset(runs[0]),
        "differ": differ,
        "shared": shared,
        "tables": _metric_tables(runs, fields),
        "only_some": only_some,
        "k_selection": _k_selection_table(runs),
        "timings": _timings_table(runs),
        "figures": figs,
        "generator": GENERATOR,
        "version": mnist_kmeans.__version__,
        "n_runs": count(len(runs), "run"),
    }


def _check_out(out: Path, runs: Sequence[ComparedRun]) -> None:
    """Refuse an ``--out`` inside a run directory, or one that is an existing file other than a comparison page."""
    target = out.resolve()
    for run in runs:
        if target.is_relative_to(run.data.run_dir.resolve()):
            raise UserError(f"{out}: inside the run directory {run.data.run_dir}; compare writes no file into a run")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the page to write")
    if out.exists() and f'name="generator" content="{GENERATOR}' not in read_text(out, MAX_PAGE_BYTES)[:2000]:
        raise UserError(f"{out}: exists and is not a comparison page; will not overwrite it")


def compare(runs: Iterable[RunRef], *, out: str | os.PathLike[str] | None = None) -> Path:
    """Write one self-contained HTML page comparing finished runs of the same data; returns its path.

    ``runs``: at least two run directories (paths, or runs of the Python API), shown in that order. ``out``: the
    page to write, by default ``compare.html`` in the working directory; an earlier comparison page there is
    replaced, any other file is refused. Raises :class:`~mnist_kmeans.errors.UserError` (nothing written) for
    fewer than two runs, a run that did not finish, a missing or malformed file, runs of different data, or an
    ``out`` inside a run directory.
    """
    compared = load_runs(runs)
    check_same_data(compared)
    target = Path(out if out is not None else DEFAULT_OUT)
    _check_out(target, compared)
    fields, _ = per_k_fields(compared)
    context = comparison_context(compared, comparison_figures(compared, fields))
    write_atomic(target, environment().get_template("compare.html.j2").render(**context))
    return target
