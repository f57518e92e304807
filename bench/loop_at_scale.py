"""What the seed notebook's in-memory loop does on a training split too large for memory (MNIST8M's 8.1 million rows).

    python bench/loop_at_scale.py STORE [--limit-gb G] [--k-grid 10,16,...]

The child process does what the seed notebook does, on the store's whole training split: read it into memory
(uint8), convert it to float32 / 255, then ``MiniBatchKMeans(n_clusters=k).fit`` for each K. The parent runs it in
a memory cgroup limited to ``--limit-gb`` (default: this machine's RAM), so that if the kernel has to kill it, it
kills the loop and nothing else, and reports how it ended: its exit, its last error line, wall time and peak
resident memory (sampled every 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1 memory controller, as on this project's machines


def child(store: str, k_grid: list[int]) -> None:
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    sys.path.insert(0, str(REPO))
    from mnist_kmeans.data.store import open_store, read_rows

    info = open_store(store)
    t = time.perf_counter()
    images, _ = read_rows(info.url, "train", 0, info.n_train)
    print(f"read {images.shape} uint8 ({images.nbytes / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    x = images.astype(np.float32) / 255.0  # the seed notebook's conversion
    print(f"float32 copy: {x.nbytes / 1e9:.2f} GB", flush=True)
    for k in k_grid:
        t = time.perf_counter()
        km = MiniBatchKMeans(n_clusters=k, random_state=0).fit(x)
        print(f"K={k}: inertia {km.inertia_:.0f}, {time.perf_counter() - t:.1f} s", flush=True)


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def own_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / path.lstrip("/")
    return None


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument(
        "--limit-gb", type=float, default=None, help="memory limit of the loop (default: the machine's RAM)"
    )
    ap.add_argument("--k-grid", default="10,16,36,64,144,256")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    k_grid = [int(k) for k in args.k_grid.split(",")]
    if args.child:
        child(args.store, k_grid)
        return

    limit = int(args.limit_gb * 2**30) if args.limit_gb else mem_total_bytes()
    parent = own_cgroup()
    group = None
    if parent is not None and parent.is_dir():
        group = parent / f"mnist-kmeans-loop-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))

    def enter_group() -> None:  # in the child, before exec: the loop and only the loop is limited
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, args.store, "--k-grid", args.k_grid, "--child"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=enter_group,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_bytes(proc.pid))
        time.sleep(0.1)
    output = proc.stdout.read().strip().splitlines() if proc.stdout else []
    oom_kills = None
    if group is not None:
        for line in (group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                oom_kills = int(line.split()[1])
        group.rmdir()
    print(
        json.dumps(
            {
                "store": args.store,
                "limit_gb": round(limit / 2**30, 2),
                "cgroup": str(group) if group else None,
                "exit": proc.returncode,
                "oom_kills": oom_kills,
                "seconds": round(time.perf_counter() - t0, 1),
                "peak_rss_gb": round(peak / 2**30, 2),
                "output": output[-6:],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
