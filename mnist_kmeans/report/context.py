"""The template's variables: :func:`build_context` turns a run and its figures into what ``report.html.j2`` shows.

Every number is already formatted here (:mod:`.formatting`), so the template only places text; every text is
left raw for the template to escape. The page's sections each have one helper: the metrics table, the comparison
with the seed notebook, the cluster and data set, the timings and the run's provenance (``manifest.json``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import mnist_kmeans
from mnist_kmeans.report.formatting import MISSING, flatten, fmt_big, fmt_int, fmt_num, fmt_pct, fmt_secs, fmt_value
from mnist_kmeans.report.gallery import ReportFigure
from mnist_kmeans.report.identity import AUGMENTED_MNIST, MNIST, OTHER
from mnist_kmeans.report.rundir import RunData
from mnist_kmeans.report.values import is_int, is_num


def _metric_row(result: Mapping[str, Any], best_k: int) -> dict[str, Any]:
    """One row of the metrics table: the numbers of one K."""
    return {
        "k": result["k"],
        "best": result["k"] == best_k,
        "inertia": fmt_big(result["inertia"]),
        "homogeneity": fmt_num(result["homogeneity"]),
        "completeness": fmt_num(result.get("completeness")),
        "v_measure": fmt_num(result.get("v_measure")),
        "ari": fmt_num(result["ari"]),
        "nmi": fmt_num(result["nmi"]),
        "accuracy_train": fmt_pct(result["accuracy_train"]),
        "accuracy_test": fmt_pct(result["accuracy_test"]),
        "n_empty_clusters": fmt_int(result.get("n_empty_clusters")),
        "epochs": fmt_int(result.get("epochs")),
        "fit_rows": fmt_int(result.get("fit_rows")),
        "n_init": fmt_int(result.get("n_init")),
        "fit_seconds": fmt_secs(result.get("fit_seconds")),
    }


def _most_accurate(results: list[dict]) -> dict[str, Any]:
    """The K with the highest test accuracy: what a reader who wants a classifier looks for."""
    top = max(results, key=lambda r: (r["accuracy_test"], -r["k"]))
    return {"k": top["k"], "accuracy_test": fmt_pct(top["accuracy_test"])}


def _best_scores(run: RunData) -> dict[str, str]:
    """The headline numbers of the best K."""
    best = next(r for r in run.results if r["k"] == run.best_k)
    return {
        "accuracy_test": fmt_pct(best["accuracy_test"]),
        "accuracy_train": fmt_pct(best["accuracy_train"]),
        "ari": fmt_num(best["ari"], 3),
        "nmi": fmt_num(best["nmi"], 3),
    }


# ------------------------------------------------------------------------------------------ choosing K

# The label-free criteria as the page names them, by their key in metrics.json's k_selection (docs/contract.md).
CRITERION_NAMES = {
    "calinski_harabasz": "Calinski–Harabasz",
    "davies_bouldin": "Davies–Bouldin",
    "silhouette_sample": "the sampled silhouette",
    "inertia_knee": "the knee of inertia",
}


def _agreement_text(choices: Mapping[str, int | None]) -> list[str]:
    """Sentences saying which criteria choose which K, and which choose none."""
    by_k: dict[int, list[str]] = {}
    for key, k in choices.items():
        if k is not None:
            by_k.setdefault(k, []).append(CRITERION_NAMES[key])
    none = [CRITERION_NAMES[key] for key, k in choices.items() if k is None]
    if len(by_k) == 1 and not none:
        return [f"All four criteria agree: K={next(iter(by_k))}."]
    lines = [
        f"{_and(names)} {'chooses' if len(names) == 1 else 'choose'} K={k}."
        for k, names in sorted(by_k.items(), key=lambda item: (-len(item[1]), item[0]))
    ]
    if none:
        lines.append(f"{_and(none)} {'finds' if len(none) == 1 else 'find'} no K (no knee, or undefined).")
    if len(by_k) > 1:
        lines[0] = "The criteria disagree. " + lines[0]
    return lines


def _and(names: Sequence[str]) -> str:
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:]


def _stability_row(result: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "k": result["k"],
        "calinski_harabasz": fmt_big(result.get("calinski_harabasz")),
        "davies_bouldin": fmt_num(result.get("davies_bouldin")),
        "silhouette_sample": fmt_num(result.get("silhouette_sample")),
        "n_init": fmt_int(result.get("n_init")),
        "restart_ari_mean": fmt_num(result.get("restart_ari_mean"), 3),
        "restart_ari_min": fmt_num(result.get("restart_ari_min"), 3),
    }


def _k_of(value: Any, ks: set[int]) -> int | None:
    """``value`` if it is one of the run's K, else None (metrics.json may come from anyone)."""
    return value if is_int(value) and value in ks else None


def _choosing_k(run: RunData) -> dict[str, Any] | None:
    """The "Choosing K" section: each label-free criterion's K, in words where they agree and where not, the
    recommendation beside the label-based best K, and per K the indices and how far the restarts agree; None for a
    run made before these (no ``k_selection`` in metrics.json)."""
    selection = run.metrics.get("k_selection")
    if not isinstance(selection, dict):
        return None
    ks = {r["k"] for r in run.results}
    choices = {key: _k_of(selection.get(key), ks) for key in CRITERION_NAMES}
    recommended = _k_of(selection.get("recommended"), ks)
    return {
        "recommended": recommended,
        "criteria": [(_and([CRITERION_NAMES[key]]), k) for key, k in choices.items()],
        "agreement": _agreement_text(choices),
        "matches_best": recommended == run.best_k,
        "sample_rows": fmt_int(selection.get("silhouette_sample_rows")),
        "rows": [_stability_row(r) for r in run.results],
    }


# ------------------------------------------------------------------------------------ the seed notebook


def _delta(run: float | None, seed: float | None, *, higher_is_better: bool, pct: bool, relative: bool) -> dict:
    """A signed difference (run - seed) for the comparison table, with a class saying whether it is an improvement."""
    if run is None or seed is None:
        return {"text": MISSING, "cls": ""}
    diff = (run - seed) / seed if relative else run - seed
    text = f"{100 * diff:+.1f} %" if relative else (f"{100 * diff:+.2f} pp" if pct else f"{diff:+.4f}")
    better = diff > 0 if higher_is_better else diff < 0
    return {"text": text, "cls": "" if abs(diff) < 1e-12 else ("better" if better else "worse")}


def _seed_row(seed: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """One K of the comparison: (seed, this run, difference) for inertia, homogeneity and train accuracy."""
    return {
        "k": seed["k"],
        "in_run": bool(result),
        "inertia": (
            fmt_big(seed["inertia"]),
            fmt_big(result.get("inertia")),
            _delta(result.get("inertia"), seed["inertia"], higher_is_better=False, pct=False, relative=True),
        ),
        "homogeneity": (
            fmt_num(seed["homogeneity"]),
            fmt_num(result.get("homogeneity")),
            _delta(result.get("homogeneity"), seed["homogeneity"], higher_is_better=True, pct=False, relative=False),
        ),
        "accuracy": (
            fmt_pct(seed["accuracy_train"]),
            fmt_pct(result.get("accuracy_train")),
            _delta(
                result.get("accuracy_train"), seed["accuracy_train"], higher_is_better=True, pct=True, relative=False
            ),
        ),
    }


def _comparison(run: RunData, seed_table: Mapping[str, Any]) -> dict[str, Any]:
    """The section comparing this run with the seed notebook's published table: only on the seed's data (full
    MNIST by its md5 sums); otherwise just why not."""
    common = {"source": seed_table.get("source", ""), "split": seed_table.get("split", "")}
    if not run.identity.comparable:
        return {**common, "comparable": False, "why_not": run.identity.why_not_comparable()}
    by_k = {r["k"]: r for r in run.results}
    seed_results = seed_table.get("results", [])
    seed_test = seed_table.get("test_accuracy_k256")
    return {
        **common,
        "rows": [_seed_row(s, by_k.get(int(s["k"]), {})) for s in sorted(seed_results, key=lambda r: r["k"])],
        "note": seed_table.get("note", ""),
        "comparable": True,
        "only_in_run": [k for k in by_k if k not in {int(s["k"]) for s in seed_results}],
        "test_k256": (fmt_pct(seed_test), fmt_pct(by_k.get(256, {}).get("accuracy_test"))) if seed_test else None,
    }


# ------------------------------------------------------------------------------------------ the run's facts


def _timings(timings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """One bar per step, its width the step's share of the total, and the total as text."""
    total = timings.get("total_s")
    steps = [(k, v) for k, v in timings.items() if k != "total_s"]
    scale = total if is_num(total) and total > 0 else sum(v for _, v in steps if is_num(v)) or 1.0
    rows = [
        {
            "name": k.removesuffix("_s").replace("_", " "),
            "text": fmt_secs(v),
            "width": f"{min(100.0, max(0.0, 100.0 * v / scale)):.1f}" if is_num(v) else "0",
        }
        for k, v in steps
    ]
    return rows, fmt_secs(total)


def _cluster_facts(cluster: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "scheduler": fmt_value(cluster.get("scheduler")),
        "n_workers": fmt_int(cluster.get("n_workers")),
        "threads": fmt_int(cluster.get("threads")),
        "dashboard": fmt_value(cluster.get("dashboard")),
        "rows": flatten(cluster),
    }


def _object(parent: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]`` if it is a JSON object, else an empty one."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _dataset_facts(run: RunData, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The data set, from ``metrics.json`` with ``manifest.json``'s ``data`` (store path, checksums) beside it."""
    dataset = run.metrics.get("dataset", {})
    data = _object(manifest, "data")
    shape = dataset.get("image_shape") or list(run.image_shape)
    return {
        "store": fmt_value(dataset.get("store", data.get("store"))),
        "n_train": fmt_int(dataset.get("n_train")),
        "n_test": fmt_int(dataset.get("n_test")),
        "n_classes": fmt_int(dataset.get("n_classes", run.n_classes)),
        "image_shape": " × ".join(str(v) for v in shape),
        "md5": [(str(k), fmt_value(v)) for k, v in _object(data, "md5").items()],
        "name": run.identity.name,
        "identity": _identity_text(run),
        "class_names": [run.identity.label(c) for c in range(run.n_classes)] if run.identity.class_names else [],
    }


def _identity_text(run: RunData) -> str:
    """What the data is, in a few words, for the run facts."""
    origin = _object(run.metrics.get("dataset", {}), "augmented_from").get("store")
    return {
        MNIST: "MNIST (its md5 sums are MNIST's published ones)",
        AUGMENTED_MNIST: f"augmented from MNIST ({fmt_value(origin)})" if origin else "augmented from MNIST",
        OTHER: "not MNIST (its md5 sums are not MNIST's)",
    }.get(run.identity.kind, "unknown (no md5 sums recorded)")


def _provenance(manifest: Mapping[str, Any] | None) -> list[tuple[str, str]] | None:
    """``manifest.json`` as (dotted key, text) rows, its ``versions`` left to their own table; None if missing."""
    return flatten({k: v for k, v in manifest.items() if k != "versions"}) if manifest is not None else None


def _job_name(run: RunData) -> str:
    """The job's name, or the run directory's when ``metrics.json`` names none."""
    name = run.metrics.get("job")
    return name if isinstance(name, str) and name else run.run_dir.name


# ------------------------------------------------------------------------------------------------ the page


def build_context(
    run: RunData, figs: Sequence[ReportFigure], fig_notes: Iterable[str], seed_table: Mapping[str, Any]
) -> dict[str, Any]:
    """The template's variables: every number already formatted, every text left raw for the template to escape."""
    metrics = run.metrics
    manifest = run.manifest or {}
    timing_rows, total = _timings(metrics.get("timings", {}))
    epoch_note = metrics.get("inertia_per_epoch_note")
    return {
        "job": _job_name(run),
        "run_dir": str(run.run_dir),
        "started": fmt_value(metrics.get("started_utc")),
        "best_k": run.best_k,
        "most_accurate": _most_accurate(run.results),
        "best": _best_scores(run),
        "total_time": total,
        "cluster": _cluster_facts(metrics.get("cluster", {})),
        "dataset": _dataset_facts(run, manifest),
        "rows": [_metric_row(r, run.best_k) for r in run.results],
        "choosing_k": _choosing_k(run),
        "selection_figure": next((f for f in figs if f.name == "selection_vs_k"), None),
        "seed": _comparison(run, seed_table),
        "figures": [f for f in figs if f.name != "selection_vs_k"],  # that one is shown in "Choosing K"
        "figure_notes": [*fig_notes, *([run.centroid_note] if run.centroid_note else [])],
        "timings": timing_rows,
        "versions": [(str(k), fmt_value(v)) for k, v in _object(manifest, "versions").items()],
        "manifest": _provenance(run.manifest),
        "job_yaml": run.job_yaml,
        "has_performance": run.has_performance,
        "epoch_note": fmt_value(epoch_note) if epoch_note else "",
        "version": mnist_kmeans.__version__,
    }
