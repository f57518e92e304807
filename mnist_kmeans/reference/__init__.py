"""Published numbers this project is compared against, shipped as package data.

``seed_table.json`` holds the seed notebook's table (reference/seed-notebook.txt): inertia, homogeneity and
train accuracy for K = 10, 16, 36, 64, 144, 256 on full MNIST, plus its K=256 test accuracy.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any


def load_seed_table() -> dict[str, Any]:
    """The seed notebook's published table, parsed from the packaged ``seed_table.json``."""
    # files("mnist_kmeans") rather than this package: works whether or not setuptools treats reference/ as a package
    text = (files("mnist_kmeans") / "reference" / "seed_table.json").read_text(encoding="utf-8")
    return json.loads(text)
