"""Every target of issue 15, side by side in one run, each peer in its own process: the table the README shows.

    python bench/targets.py [--reps 3] [--big stores/mnist1200k.zarr] [--huge stores/mnist8100k.zarr]
                            [--seeds 0,1,2] [--skip daskml,huge,...] [--json out.json]

Peers, one process each, alternated rep after rep (gemm, loop, warm, cold, scale-big, daskml, scale-huge, ...) so
that all see the same machine state; medians over the reps:

- ``gemm``: the float32 GEMM peak on all cores (an 8192x784 by 784x526 product: the grid's centers), best of 30;
  the table takes the best rep (a peak: a busy moment only ever lowers it, and the floor with it).
- ``loop``: the seed notebook's loop (bench/harness.py's ``seed_loop``) on the 60,000 rows held in memory; its
  timed section, and the wall time of its whole process (start, imports, reading the data, loop, exit).
- ``warm``: ``jobs/mnist_kgrid.yaml``'s fit + evaluate (``run.fit_and_evaluate``) from a new client process on a
  warm external cluster (``dask scheduler`` + 2 ``dask worker --nthreads 1`` on 127.0.0.1, warmed by one run).
- ``cold``: ``mnist-kmeans run jobs/mnist_kgrid.yaml`` end to end (its own embedded cluster, the report).
- ``scale-big`` / ``scale-huge``: ``mnist-kmeans run`` of the grid for one epoch plus evaluation (``epochs: 1,
  n_init: 1, lloyd_steps: 0``) on the 1.2M / 8.1M-row stores; ``fit_s + evaluate_s`` from metrics.json against the
  FLOP floor (two passes of the grid's distance products over the training rows plus one over the test rows, at
  the best rep's GEMM peak), and the peak resident memory of all its processes (sampled every 0.2 s).
- ``scale-big-stop``: ``scale-big`` with early stopping (``max_no_improvement: --stop``, default 3): the same
  ratio, and each K's training inertia and rows fitted against ``scale-big``'s (what stopping costs).
- ``daskml``: dask-ml's ``Incremental(MiniBatchKMeans(k))`` over the 1.2M-row Zarr store, K after K, on a
  2-worker LocalCluster: the fits alone.
- ``quality`` (once, not timed): the default job at every ``--seeds`` seed on the warm cluster, against the seed
  loop at the same ``random_state`` and the converged Lloyd table (``../shared/reference/lloyd_table.json``).

Stores: ``mnist-kmeans ingest``, then ``mnist-kmeans augment --store data/mnist.zarr --out stores/mnist1200k.zarr
--rows 1200000 --seed 5`` (and ``--rows 8100000`` for the huge one); ``stores/`` is git-ignored. A peer whose store
is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
K_GRID = [10, 16, 36, 64, 144, 256]
LLOYD_TABLE = REPO.parent / "shared" / "reference" / "lloyd_table.json"
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SCALE_JOB = "name: scale\nk_grid: [10, 16, 36, 64, 144, 256]\nepochs: 1\nlloyd_steps: 0\nn_init: 1\n"


# --- the peers (each runs as `python bench/targets.py peer NAME ...` and prints one JSON line) ----------------------


def peer_gemm() -> dict:
    from bench.harness import gemm_peak

    return {"gflops": gemm_peak(None)}


def peer_loop(store: str, seed: int) -> dict:
    from bench.harness import load_split, seed_loop
    from mnist_kmeans.data.store import open_store

    info = open_store(store)
    xtr, ytr = load_split(info.url, "train", info.n_train)
    xte, yte = load_split(info.url, "test", info.n_test)
    return seed_loop(xtr, ytr, xte, yte, K_GRID, info.n_classes, seed)


def peer_warm(store: str, address: str, seed: int) -> dict:
    from distributed import Client

    from mnist_kmeans.checkpoint import Checkpoint
    from mnist_kmeans.config import load_job, with_overrides
    from mnist_kmeans.pipeline import ensure_store, fit_and_evaluate

    job = with_overrides(load_job(str(REPO / "jobs/mnist_kgrid.yaml")), store=store, seed=seed)
    info, _ = ensure_store(job.store, log=lambda m: None)
    with Client(address, timeout=60) as client, tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpoint.create(Path(tmp) / "centroids.zarr", info.image_shape)
        t0 = time.perf_counter()
        outcome = fit_and_evaluate(client, job, info, ckpt)
        seconds = time.perf_counter() - t0
    per_k = {r["k"]: {"inertia": r["inertia"], "accuracy_test": r["accuracy_test"]} for r in outcome.rows}
    return {"seconds": seconds, "per_k": per_k}


PEERS: dict[str, Callable[..., dict]] = {"gemm": peer_gemm, "loop": peer_loop, "warm": peer_warm}


def run_peer(name: str, *args: object) -> dict:
    """One peer in a new process; its JSON result plus the process's wall time (start to exit)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "peer", name, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"peer {name} failed: {proc.stderr.strip()[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


# --- peers that are whole commands, timed and watched from here -------------------------------------------------------


def tree_rss(pid: int, peaks: dict[int, int]) -> int:
    """RSS of ``pid`` and all its descendants now; ``peaks`` keeps each process's largest."""
    import psutil

    total = 0
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
    return total


def watched(cmd: list[str], env: dict | None = None) -> tuple[float, dict, str]:
    """Run ``cmd``; its wall time, the peak RSS of its process tree and the largest single-process peak (sampled
    every 0.2 s), its stdout."""
    import threading

    peak, peaks = 0, {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid, peaks))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {err.strip()[-2000:]}")
    memory = {"peak_rss": peak, "client_rss": peaks.get(proc.pid, 0), "max_process_rss": max(peaks.values(), default=0)}
    return wall, memory, out


def cold_run(job_file: Path, store: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mnist_kmeans", "run", str(job_file), "--store", store, "--out", f"{tmp}/run"]
        wall, memory, _ = watched(cmd)
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    t = metrics["timings"]
    per_k = {str(r["k"]): {"inertia": r["inertia"], "fit_rows": r.get("fit_rows")} for r in metrics["results"]}
    return {"wall_s": wall, **memory, "fit_eval_s": t["fit_s"] + t["evaluate_s"], "per_k": per_k}


def scale_run(store: str, max_no_improvement: int | None = None) -> dict:
    """The scale job on ``store``; with ``max_no_improvement``, with early stopping (README, "Early stopping")."""
    stop = "" if max_no_improvement is None else f"max_no_improvement: {max_no_improvement}\n"
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "scale.yaml"
        job.write_text(SCALE_JOB + stop)
        return cold_run(job, store)


DASKML = """
import sys, time, logging, json
import dask.array as da
from distributed import Client, LocalCluster
from dask_ml.wrappers import Incremental
from sklearn.cluster import MiniBatchKMeans
store, K_GRID = sys.argv[1], json.loads(sys.argv[2])
with LocalCluster(n_workers=2, threads_per_worker=1, silence_logs=logging.ERROR,
                  dashboard_address="127.0.0.1:0") as cluster, Client(cluster):
    x = da.from_zarr(store, component="train/images").astype("float32") / 255
    t0 = time.perf_counter()
    inertia = {}
    for k in K_GRID:
        model = Incremental(MiniBatchKMeans(n_clusters=k, random_state=0), shuffle_blocks=False).fit(x)
        inertia[k] = float(model.estimator_.inertia_)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def daskml_run(store: str) -> dict:
    wall, memory, out = watched([sys.executable, "-c", DASKML, store, json.dumps(K_GRID)])
    return {**json.loads(out.strip().splitlines()[-1]), "wall_s": wall, **memory}


# --- the warm external cluster ------------------------------------------------------------------------------------


class ExternalCluster:
    """``dask scheduler`` + ``dask worker`` processes on 127.0.0.1, each in its own working directory."""

    def __init__(self, root: Path, n_workers: int = 2):
        dask = str(Path(sys.executable).parent / "dask")
        env = {**os.environ, **ONE_THREAD_ENV}
        scheduler_file = root / "scheduler.json"
        (root / "scheduler").mkdir(parents=True)
        self.procs = [
            subprocess.Popen(
                [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                 "--scheduler-file", str(scheduler_file)],
                cwd=root / "scheduler", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        ]  # fmt: skip
        deadline = time.monotonic() + 120
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if time.monotonic() > deadline:
                raise SystemExit("the dask scheduler did not start")
            time.sleep(0.1)
        time.sleep(0.2)
        self.address = json.loads(scheduler_file.read_text())["address"]
        for i in range(n_workers):
            workdir = root / f"worker{i}"
            workdir.mkdir()
            self.procs.append(
                subprocess.Popen(
                    [dask, "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                     "--dashboard-address", "127.0.0.1:0", "--local-directory", str(workdir)],
                    cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=120)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- the table ------------------------------------------------------------------------------------------------------


def floor_seconds(store: str, gflops: float) -> float:
    """Two passes of the grid's distance products over the training rows and one over the test rows, at the peak."""
    from mnist_kmeans.data.store import open_store

    info = open_store(store)
    flops = 2 * info.n_features * sum(K_GRID) * (2 * info.n_train + info.n_test)
    return flops / (gflops * 1e9)


def med(values: list[float]) -> float:
    return statistics.median(values)


def report(runs: dict[str, list[dict]], args: argparse.Namespace, quality: dict | None) -> list[str]:
    gflops = max(r["gflops"] for r in runs["gemm"])
    lines = [
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"commit {git_commit()}; medians of {args.reps} rep(s); float32 GEMM peak {gflops:.0f} GFLOP/s (best rep)",
        "",
        "| target | measured | bar | met |",
        "|---|---|---|---|",
    ]

    def row(name: str, value: str, bar: str, met: bool) -> None:
        lines.append(f"| {name} | {value} | {bar} | {'yes' if met else '**no**'} |")

    per_row = {}
    for size in ("big", "huge"):
        if runs.get(f"scale-{size}"):
            store = getattr(args, size)
            rs = runs[f"scale-{size}"]
            fit_eval, floor = med([r["fit_eval_s"] for r in rs]), floor_seconds(store, gflops)
            from mnist_kmeans.data.store import open_store

            n = open_store(store).n_train
            per_row[size] = fit_eval / n
            peak = max(r["peak_rss"] for r in rs) / 1e9
            bar, met = ("≤ 2.0x", fit_eval / floor <= 2.0) if size == "big" else ("(per row: below)", True)
            row(f"{n:,} rows: fit_s + evaluate_s / FLOP floor", f"{fit_eval:.1f} s / {floor:.1f} s = "
                f"{fit_eval / floor:.2f}x", bar, met)  # fmt: skip
            client = max(r["client_rss"] for r in rs) / 1e9
            row(f"{n:,} rows: peak memory, all processes (the `run` process alone)", f"{peak:.2f} GB ({client:.2f} GB)",
                "≤ 3 GB", peak <= 3.0)  # fmt: skip
    if runs.get("scale-big-stop") and runs.get("scale-big"):
        fit_eval, floor = med([r["fit_eval_s"] for r in runs["scale-big-stop"]]), floor_seconds(args.big, gflops)
        ratio = fit_eval / floor
        row(f"1.2M job with early stopping (`max_no_improvement: {args.stop}`): fit_s + evaluate_s / FLOP floor",
            f"{fit_eval:.1f} s / {floor:.1f} s = {ratio:.2f}x", "≤ 2.0x", ratio <= 2.0)  # fmt: skip
    if "big" in per_row and "huge" in per_row:
        ratio = per_row["huge"] / per_row["big"]
        row("8.1M / 1.2M cost per row", f"{ratio:.2f}x", "≤ 1.1x", ratio <= 1.1)
    if runs.get("warm") and runs.get("loop"):
        warm, loop = med([r["seconds"] for r in runs["warm"]]), med([r["seconds"] for r in runs["loop"]])
        row("60k kgrid, warm external cluster: fit + evaluate / loop process", f"{warm:.2f} s / {loop:.2f} s = "
            f"{warm / loop:.2f}x", "≤ 0.6x", warm / loop <= 0.6)  # fmt: skip
    if runs.get("cold") and runs.get("loop"):
        cold, loop_wall = med([r["wall_s"] for r in runs["cold"]]), med([r["process_s"] for r in runs["loop"]])
        row("60k kgrid, cold `run` / loop process wall", f"{cold:.2f} s / {loop_wall:.2f} s = "
            f"{cold / loop_wall:.2f}x", "≤ 1.4x", cold / loop_wall <= 1.4)  # fmt: skip
    if runs.get("daskml") and runs.get("scale-big"):
        dml = med([r["seconds"] for r in runs["daskml"]])
        ours = med([r["fit_eval_s"] for r in runs["scale-big"]])
        from mnist_kmeans.data.store import open_store

        n = open_store(args.big).n_train
        row(f"{n:,} rows: dask-ml Incremental fits alone / this job's fit + evaluate", f"{dml:.1f} s / {ours:.1f} s",
            "shown", True)  # fmt: skip
    if runs.get("scale-big-stop") and runs.get("scale-big"):
        lines += ["", stopping_table(runs)]
    if quality:
        lines += ["", quality_table(quality)]
    return lines


def stopping_table(runs: dict[str, list[dict]]) -> str:
    """What early stopping cost each K: rows fitted and training inertia of the stopping peer's first rep against
    scale-big's (both runs are deterministic: every rep gives the same centroids)."""
    full, stop = runs["scale-big"][0]["per_k"], runs["scale-big-stop"][0]["per_k"]
    out = ["| K | rows fitted, stopping / all | training inertia, stopping / all |", "|---|---|---|"]
    for k in K_GRID:
        a, b = full[str(k)], stop[str(k)]
        out.append(f"| {k} | {b['fit_rows']:,} / {a['fit_rows']:,} | {b['inertia'] / a['inertia']:.4f} |")
    return "\n".join(out)


def quality_table(quality: dict) -> str:
    lloyd = json.loads(LLOYD_TABLE.read_text())
    ref = dict(zip(lloyd["k"], lloyd["inertia"], strict=True))
    out = ["| seed | K | job / Lloyd | job / loop | test acc job | test acc loop | met |", "|---" * 7 + "|"]
    for seed, (job, loop) in quality.items():
        for k in K_GRID:
            j, lo = job["per_k"][str(k)], loop["per_k"][str(k)]
            vs_lloyd, vs_loop = j["inertia"] / ref[k], j["inertia"] / lo["inertia"]
            met = vs_lloyd <= 1.01 and vs_loop <= 1 and j["accuracy_test"] >= lo["accuracy_test"]
            out.append(
                f"| {seed} | {k} | {vs_lloyd:.4f} | {vs_loop:.4f} | {j['accuracy_test']:.4f} | "
                f"{lo['accuracy_test']:.4f} | {'yes' if met else '**no**'} |"
            )
    return "\n".join(out)


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "peer":
        name, *rest = sys.argv[2:]
        result = PEERS[name](*(int(a) if a.isdigit() else a for a in rest))
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--store", default=str(REPO / "data/mnist.zarr"))
    ap.add_argument("--big", default=str(REPO / "stores/mnist1200k.zarr"))
    ap.add_argument("--huge", default=str(REPO / "stores/mnist8100k.zarr"))
    ap.add_argument("--seeds", default="0,1,2", help="job seeds of the quality table ('' for none)")
    ap.add_argument("--stop", type=int, default=3, help="max_no_improvement of the scale-big-stop peer")
    ap.add_argument(
        "--skip", default="", help="peers to leave out: loop,warm,cold,scale-big,scale-big-stop,daskml,scale-huge"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    for size, peer in (("big", "scale-big"), ("huge", "scale-huge")):
        if not Path(getattr(args, size), "zarr.json").exists() and peer not in skip:
            print(f"note: {getattr(args, size)} does not exist: {peer} skipped", file=sys.stderr)
            skip.add(peer)
    if "scale-big" in skip:
        skip |= {"daskml", "scale-big-stop"}

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = ExternalCluster(Path(tmp) / "cluster") if not {"warm"} <= skip or args.seeds else None
        try:
            if cluster is not None:
                run_peer("warm", args.store, cluster.address, 0)  # warms the workers (imports, chunk caches)
            peers: dict[str, Callable[[], dict]] = {
                "gemm": lambda: run_peer("gemm"),
                "loop": lambda: run_peer("loop", args.store, 0),
                "warm": lambda: run_peer("warm", args.store, cluster.address, 0),
                "cold": lambda: cold_run(REPO / "jobs/mnist_kgrid.yaml", args.store),
                "scale-big": lambda: scale_run(args.big),
                "scale-big-stop": lambda: scale_run(args.big, args.stop),
                "daskml": lambda: daskml_run(args.big),
                "scale-huge": lambda: scale_run(args.huge),
            }
            for rep in range(args.reps):
                for name, peer in peers.items():
                    if name not in skip:
                        runs.setdefault(name, []).append(peer())
                        print(f"rep {rep} {name}: {short(runs[name][-1])}", file=sys.stderr, flush=True)
            quality = {}
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                job = run_peer("warm", args.store, cluster.address, seed)
                quality[seed] = (job, run_peer("loop", args.store, seed))
        finally:
            if cluster is not None:
                cluster.stop()
    print("\n".join(report(runs, args, json.loads(json.dumps(quality)) if quality else None)))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "quality": quality}, indent=1, default=str))


def short(result: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float))


if __name__ == "__main__":
    main()
