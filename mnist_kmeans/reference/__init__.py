"""Published numbers this project is compared against, shipped as package data.

``seed_table.json`` holds the seed notebook's table: inertia, homogeneity and train accuracy for
K = 10, 16, 36, 64, 144, 256 on full MNIST, plus its K=256 test accuracy. :data:`SEED_DATA` says which data set
that was, and :func:`comparable_with_seed` whether a run's numbers can be set beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.resources import files
from typing import Any

SEED_DATA = {"n_train": 60000, "image_shape": [28, 28], "n_classes": 10}
"""The data set of the seed notebook's table, as ``metrics.json``'s ``dataset`` describes a run's."""


def load_seed_table() -> dict[str, Any]:
    """The seed notebook's published table, parsed from the packaged ``seed_table.json``."""
    # files("mnist_kmeans") rather than this package: works whether or not setuptools treats reference/ as a package
    text = (files("mnist_kmeans") / "reference" / "seed_table.json").read_text(encoding="utf-8")
    return json.loads(text)


def comparable_with_seed(dataset: Mapping[str, Any]) -> bool:
    """Whether a run on ``dataset`` (``metrics.json``'s ``dataset``) ran on the seed's data: full MNIST.

    Only then are inertia values comparable with the seed notebook's (inertia grows with the number of rows).
    """
    return all(dataset.get(key) == value for key, value in SEED_DATA.items())
