"""Scale runs: the K grid for one epoch plus evaluation on stores of growing size, memory watched all along.

    python bench/scale.py STORE [STORE ...] [--json out.json]

For each store: ``mnist-kmeans run`` (a fresh embedded LocalCluster, 2 workers x 1 thread) of the reference grid with
``epochs: 1, lloyd_steps: 0, n_init: 1`` — one mini-batch epoch over every training row for every K, then the
evaluation of both splits — while a sampler adds up the resident memory (RSS) of the run process and all its
children (the cluster's scheduler, nannies and workers) every 0.2 s. Prints rows, wall time, seconds per million
rows per K-epoch, and the peak of that sum.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.targets import watched  # noqa: E402 - after the path that makes the repository importable

K_GRID = [10, 16, 36, 64, 144, 256]


def measure(store: str) -> dict:
    from mnist_kmeans.data.store import open_store

    info = open_store(store)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "scale.yaml"
        job.write_text(
            f"name: scale-{info.n_train}\nk_grid: {K_GRID}\nepochs: 1\nlloyd_steps: 0\nn_init: 1\n"
            "report: {centroid_grids: [36]}\n"
        )
        cmd = [sys.executable, "-m", "mnist_kmeans", "run", str(job), "--store", store, "--out", f"{tmp}/run"]
        wall, memory, _ = watched(cmd)  # bench/targets.py's sampler: the run's process tree every 0.2 s
        peak = memory["peak_rss"]
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    k_epochs = len(K_GRID)  # one epoch for each K
    t = metrics["timings"]
    return {
        "store": store,
        "rows": info.n_train,
        "wall_s": round(wall, 1),
        "fit_s": t["fit_s"],
        "evaluate_s": t["evaluate_s"],
        "s_per_million_rows_per_k_epoch": round((t["fit_s"] + t["evaluate_s"]) / (info.n_train / 1e6) / k_epochs, 3),
        "peak_rss_gb": round(peak / 2**30, 2),
        "inertia_k256": next(r["inertia"] for r in metrics["results"] if r["k"] == 256),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    print("rows        wall s   fit+eval s/M rows/K-epoch   peak RSS (all processes)")
    for store in args.stores:
        r = measure(store)
        rows.append(r)
        print(
            f"{r['rows']:>10,}  {r['wall_s']:7.1f}   {r['s_per_million_rows_per_k_epoch']:25.3f}   "
            f"{r['peak_rss_gb']:.2f} GB",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
