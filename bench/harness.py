"""Side-by-side benchmark: the seed notebook's in-memory loop against this project's job, same data, same run.

    python bench/harness.py [--reps 3] [--job jobs/mnist_kgrid.yaml] [--cold] [--json out.json]

(a) the seed notebook's method, in its own process: scikit-learn ``MiniBatchKMeans(n_clusters=k).fit`` on the
    training split held in memory, sequentially over the grid, then its labels, the test predictions, and the
    metrics (timed inside that process, from the data in memory to the last metric);
(b) this project's fit + evaluation of the job on a warm ``LocalCluster`` (2 workers x 1 thread), the same code path
    as ``mnist-kmeans run`` minus cluster start-up and the report.
Repetitions alternate a, b, a, b ... so that both see the same machine state; medians and the ratio b/a are
printed. ``--cold`` also times ``mnist-kmeans run`` end to end (process start to report written, its own embedded
cluster) in the same alternation, against (a).
Also printed: the job's effective GFLOP/s of distance products against a measured float32 GEMM peak.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mnist_kmeans.checkpoint import Checkpoint  # noqa: E402
from mnist_kmeans.config import load_job, with_overrides  # noqa: E402
from mnist_kmeans.data.store import read_rows  # noqa: E402
from mnist_kmeans.pipeline import ensure_store, fit_and_evaluate, plan_of  # noqa: E402


def load_split(url: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_rows(url, split, 0, n)
    return np.divide(images, np.float32(255), dtype=np.float32), labels.astype(np.int64)


def seed_loop(xtr, ytr, xte, yte, k_grid, n_classes, seed: int = 0) -> dict:
    """The seed notebook's loop (docs/seed-notebook.md) with today's scikit-learn defaults and ``random_state=seed``."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import homogeneity_score

    t0 = time.perf_counter()
    out = {}
    for k in k_grid:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed).fit(xtr)
        cont = np.zeros((k, n_classes), np.int64)
        np.add.at(cont, (km.labels_, ytr), 1)
        lmap = cont.argmax(1)
        out[k] = {
            "inertia": float(km.inertia_),
            "homogeneity": float(homogeneity_score(ytr, km.labels_)),
            "accuracy_train": float((lmap[km.labels_] == ytr).mean()),
            "accuracy_test": float((lmap[km.predict(xte)] == yte).mean()),
        }
    return {"seconds": time.perf_counter() - t0, "per_k": out}


def loop_process(store: str, k_grid: list[int]) -> dict:
    """:func:`seed_loop` in a new process (``python bench/harness.py --loop-peer STORE K,K,...``): its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--loop-peer", store, ",".join(map(str, k_grid))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": result["seconds"], "per_k": {int(k): v for k, v in result["per_k"].items()}}


def loop_peer(store: str, k_grid: str) -> None:
    from mnist_kmeans.data.store import open_store

    info = open_store(store)
    xtr, ytr = load_split(info.url, "train", info.n_train)
    xte, yte = load_split(info.url, "test", info.n_test)
    print(json.dumps(seed_loop(xtr, ytr, xte, yte, [int(k) for k in k_grid.split(",")], info.n_classes)))


def project_job(client, job, info) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpoint.create(Path(tmp) / "centroids.zarr", info.image_shape)
        t0 = time.perf_counter()
        _, rows, _, _ = fit_and_evaluate(client, job, info, ckpt)
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "per_k": {r["k"]: {key: r[key] for key in ("inertia", "accuracy_train", "accuracy_test")} for r in rows},
    }


def job_flops(job, info) -> float:
    """Distance products of the job, 2·d flops per (row, center) pair, counted as the job does them (schedule.py)."""
    params = plan_of(job, info).params
    n, screen_rows = info.n_train, min(params.screen_chunks(info) * info.chunk_rows, info.n_train)
    pairs = 0.0
    for k in job.k_grid:
        r = job.restarts(k)
        init_rows = params.init_rows(k, n)
        pairs += r * init_rows * k * (2 + np.log(k))  # k-means++: K steps of 2 + ln K candidates against the sample
        if r > 1:  # screening: every restart fits its first chunks, then one pass compares them
            pairs += r * screen_rows * k + r * n * k
        pairs += (job.epochs * n - (screen_rows if r > 1 else 0)) * k  # the chosen restart's other partial_fits
        pairs += (job.epochs - 1) * n * k  # the inertia after each earlier epoch
        pairs += (1 + max(job.lloyd_steps - 1, 0) + (1 if job.lloyd_steps else 0)) * n * k  # Lloyd and evaluation
        pairs += info.n_test * k
    return 2 * info.n_features * pairs


def gemm_peak(threads: int | None = None, repeats: int = 30) -> float:
    """float32 GEMM GFLOP/s of an 8192x784 by 784x526 product (the whole grid's centers), best of ``repeats``.

    A peak, so the best: on this shared machine the best of 5 ran from 55 to 153 GFLOP/s within
    minutes (2026-12-04), and 5 repeats often caught none of the fast ones."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((8192, 784), dtype=np.float32)
    b = np.random.default_rng(1).random((784, 526), dtype=np.float32)
    with threadpool_limits(threads):
        best = min(_timeit(lambda: a @ b) for _ in range(repeats))
    return 2 * 8192 * 784 * 526 / best / 1e9


def _timeit(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def cold_run(job_file: str, store: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mnist_kmeans", "run", job_file, "--store", store, "--out", f"{tmp}/run"],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - t


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--loop-peer":
        loop_peer(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default=str(REPO / "jobs/mnist_kgrid.yaml"))
    ap.add_argument("--store", default=str(REPO / "data/mnist.zarr"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also time `mnist-kmeans run` end to end")
    ap.add_argument("--json", default=None, help="write all measurements here")
    args = ap.parse_args()

    os.chdir(REPO)
    job = with_overrides(load_job(args.job), store=args.store)
    info, _ = ensure_store(job.store, log=lambda m: print(m, file=sys.stderr))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )
    peak1, peak_all = gemm_peak(1), gemm_peak(None)
    print(f"float32 GEMM peak: {peak1:.1f} GFLOP/s on 1 thread, {peak_all:.1f} GFLOP/s on all cores")

    from distributed import Client, LocalCluster

    runs: dict[str, list[dict]] = {"loop": [], "job": [], "cold": []}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, silence_logs=logging.ERROR, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        project_job(client, job, info)  # warm-up: imports and chunk caches on the workers, as on a warm cluster
        for rep in range(args.reps):
            # the loop in its own process, as a user runs it: next to this process's client and cluster it ran
            # 25% slower (issue 15), which flattered the job
            runs["loop"].append(loop_process(info.url, job.k_grid))
            runs["job"].append(project_job(client, job, info))
            line = f"rep {rep}: loop {runs['loop'][-1]['seconds']:.2f} s, job {runs['job'][-1]['seconds']:.2f} s"
            if args.cold:  # in the same alternation, so that the ratio compares runs made under the same load
                runs["cold"].append({"seconds": cold_run(args.job, info.url)})
                line += f", cold run {runs['cold'][-1]['seconds']:.2f} s"
            print(line, flush=True)

    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items() if rs}
    flops = job_flops(job, info)
    print()
    print(
        f"fit+evaluate, median of {args.reps}: loop {med['loop']:.2f} s, job {med['job']:.2f} s, "
        f"ratio job/loop {med['job'] / med['loop']:.2f}"
    )
    if "cold" in med:
        print(
            f"cold `mnist-kmeans run` (process start to report written): {med['cold']:.2f} s, "
            f"ratio cold/loop {med['cold'] / med['loop']:.2f}"
        )
    print(
        f"job: {flops / 1e9:.1f} GFLOP of distance products, {flops / 1e9 / med['job']:.1f} GFLOP/s effective "
        f"({100 * flops / 1e9 / med['job'] / peak_all:.0f}% of the all-core GEMM peak)"
    )
    print()
    print("   K  inertia loop   inertia job   job/loop   test acc loop  test acc job")
    last_loop, last_job = runs["loop"][-1]["per_k"], runs["job"][-1]["per_k"]
    for k in job.k_grid:
        a, b = last_loop[k], last_job[k]
        print(
            f"{k:4d}  {a['inertia']:12,.0f}  {b['inertia']:12,.0f}   {b['inertia'] / a['inertia']:8.4f}   "
            f"{a['accuracy_test']:13.4f}  {b['accuracy_test']:12.4f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"runs": runs, "median_s": med, "gemm_peak": [peak1, peak_all], "flops": flops}, indent=1, default=str
            )
        )


if __name__ == "__main__":
    main()
