"""Check a finished MNIST run against an independent recomputation and the seed notebook's table.

    python bench/verify_run.py RUN_DIR [--idx data/mnist]

Reads only ``RUN_DIR/centroids.zarr``, ``metrics.json``, ``label_maps.json`` and the raw IDX files (gzip), computes
every metric again in memory with NumPy (float64) and scikit-learn, and prints the largest differences. Then the
acceptance bars of the project: at every K, inertia <= the seed notebook's, test accuracy >= the seed's training
accuracy - 0.01. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import zarr
from sklearn import metrics as skm

REPO = Path(__file__).resolve().parents[1]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def assign64(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, dists = [], []
    cc = (c * c).sum(1)
    for s in range(0, len(x), 5000):
        xb = x[s : s + 5000]
        d = (xb * xb).sum(1)[:, None] - 2 * xb @ c.T + cc[None]
        lab = d.argmin(1)
        labels.append(lab)
        dists.append(np.maximum(d[np.arange(len(xb)), lab], 0))
    return np.concatenate(labels), np.concatenate(dists)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--idx", default=str(REPO / "data/mnist"))
    args = ap.parse_args()
    run, idx = Path(args.run_dir), Path(args.idx)
    xtr = read_idx(idx / "train-images-idx3-ubyte.gz").reshape(60000, -1).astype(np.float64) / 255
    ytr = read_idx(idx / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = read_idx(idx / "t10k-images-idx3-ubyte.gz").reshape(10000, -1).astype(np.float64) / 255
    yte = read_idx(idx / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    metrics = json.loads((run / "metrics.json").read_text())
    maps = json.loads((run / "label_maps.json").read_text())
    seed = {r["k"]: r for r in json.loads((REPO / "mnist_kmeans/reference/seed_table.json").read_text())["results"]}
    group = zarr.open_group(str(run / "centroids.zarr"), mode="r")
    ok = True
    print("   K   inertia rel.diff  max |metric diff|  label-map same  inertia<=seed  acc_test>=seed-0.01")
    for row in metrics["results"]:
        k = row["k"]
        c = np.asarray(group[f"final/k{k}"][...], dtype=np.float64)
        lab, dist = assign64(xtr, c)
        lab_te, _ = assign64(xte, c)
        mapping = [
            int(np.bincount(ytr[lab == i], minlength=10).argmax()) if (lab == i).any() else None for i in range(k)
        ]
        lookup = np.array([-1 if m is None else m for m in mapping])
        mine = {
            "homogeneity": skm.homogeneity_score(ytr, lab),
            "completeness": skm.completeness_score(ytr, lab),
            "v_measure": skm.v_measure_score(ytr, lab),
            "ari": skm.adjusted_rand_score(ytr, lab),
            "nmi": skm.normalized_mutual_info_score(ytr, lab),
            "accuracy_train": float((lookup[lab] == ytr).mean()),
            "accuracy_test": float((lookup[lab_te] == yte).mean()),
        }
        diff = max(abs(row[key] - v) for key, v in mine.items())
        rel = abs(row["inertia"] - dist.sum()) / dist.sum()
        same_map = maps[str(k)] == mapping
        s = seed.get(k)
        bar_inertia = s is None or row["inertia"] <= s["inertia"]
        bar_acc = s is None or row["accuracy_test"] >= s["accuracy_train"] - 0.01
        ok &= same_map and rel < 1e-5 and diff < 1e-3 and bar_inertia and bar_acc
        print(f"{k:4d}   {rel:16.2e}  {diff:17.2e}  {str(same_map):>14s}  {str(bar_inertia):>13s}  {str(bar_acc):>19s}")
    print("all checks pass" if ok else "SOME CHECKS FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
