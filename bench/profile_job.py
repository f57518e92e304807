"""Where a job's time goes, in CPU seconds (robust to a busy machine): fit + evaluate on a fresh LocalCluster.

    python bench/profile_job.py JOB STORE [--set key=value ...] [--workers 2] [--json out.json]

Runs ``run.fit_and_evaluate`` (what ``mnist-kmeans run`` does between cluster start and report) on a LocalCluster
of ``--workers`` processes x 1 thread, and prints: the CPU seconds every worker process used (``getrusage``), the
client's, the wall time, and the task stream's busy seconds per task kind (its key's step). ``--set`` overrides
job keys (``--set epochs=1 --set n_init=1 --set lloyd_steps=0`` is the scale job of bench/scale.py). Wall time on a
shared machine is noise; CPU seconds and the per-kind split are what to compare between commits.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LLOYD_TABLE = REPO.parent / "shared" / "reference" / "lloyd_table.json"  # scikit-learn's Lloyd, converged, on MNIST
sys.path.insert(0, str(REPO))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kind_of(key: object) -> str:
    """The step of a task key without its K's (``fit_k10_k16-e1-c3-…`` is ``fit``; docs/contract.md, "Task keys")."""
    from dask.utils import key_split

    return re.sub(r"_k\d+", "", key_split(key))


def profile(job_file: str, store: str, overrides: dict, workers: int) -> dict:
    from distributed import Client, LocalCluster, get_task_stream

    from mnist_kmeans.checkpoint import Checkpoint
    from mnist_kmeans.config import load_job, with_overrides
    from mnist_kmeans.pipeline import ensure_store, fit_and_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        text = yaml.safe_load(Path(job_file).read_text())
        text.update(overrides)
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(text))
        job = with_overrides(load_job(str(path)), store=store)
        info, _ = ensure_store(job.store, log=lambda m: None)
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, silence_logs=logging.ERROR, dashboard_address="127.0.0.1:0"
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(lambda: __import__("sklearn.cluster"))  # imports are not the job's work
            before, client_before, t0 = client.run(cpu_seconds), cpu_seconds(), time.perf_counter()
            with get_task_stream(client) as task_stream:
                outcome = fit_and_evaluate(client, job, info, Checkpoint.create(Path(tmp) / "c.zarr", info.image_shape))
            wall, client_cpu = time.perf_counter() - t0, cpu_seconds() - client_before
            after = client.run(cpu_seconds)
    busy: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for task in task_stream.data:
        for part in task["startstops"]:
            if part["action"] == "compute":
                busy[kind_of(task["key"])] += part["stop"] - part["start"]
        count[kind_of(task["key"])] += 1
    return {
        "rows": info.n_train,
        "wall_s": wall,
        "worker_cpu_s": sum(after[w] - before[w] for w in after),
        "client_cpu_s": client_cpu,
        "tasks": dict(count),
        "busy_s": dict(busy),
        "per_k": {r["k"]: {"inertia": r["inertia"], "accuracy_test": r["accuracy_test"]} for r in outcome.rows},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job")
    ap.add_argument("store")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    r = profile(args.job, args.store, overrides, args.workers)
    print(
        f"{r['rows']:,} rows: wall {r['wall_s']:.1f} s, worker CPU {r['worker_cpu_s']:.1f} s, "
        f"client CPU {r['client_cpu_s']:.1f} s"
    )
    for kind in sorted(r["busy_s"], key=lambda k: -r["busy_s"][k]):
        print(f"  {kind:24s} {r['tasks'][kind]:6d} tasks  {r['busy_s'][kind]:8.2f} s busy")
    table = json.loads(LLOYD_TABLE.read_text()) if r["rows"] == 60_000 else None  # the table is of MNIST's rows
    lloyd = dict(zip(table["k"], table["inertia"], strict=True)) if table else {}
    for k, v in r["per_k"].items():
        vs = f", {v['inertia'] / lloyd[k]:.4f}x converged Lloyd" if k in lloyd else ""
        print(f"  K={k}: inertia {v['inertia']:,.0f}{vs}, test accuracy {v['accuracy_test']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
