"""Published numbers this project is compared against, shipped as package data.

``seed_table.json`` holds the seed notebook's table: inertia, homogeneity and train accuracy for
K = 10, 16, 36, 64, 144, 256 on full MNIST, plus its K=256 test accuracy. :data:`SEED_DATA` says which data set
that was, and :func:`comparable_with_seed` whether a run's numbers can be set beside it.

A data set is MNIST when the md5 sums of its four IDX files, as ingested, are MNIST's published ones: shape and
class count say nothing (Fashion-MNIST has MNIST's), and a store made by ``augment`` keeps its source's sums, so it
is told apart by its ``augmented_from``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.resources import files
from typing import Any

from mnist_kmeans.data.sources import MNIST_MD5

SEED_DATA = {"n_train": 60000, "image_shape": [28, 28], "n_classes": 10}
"""The data set of the seed notebook's table, as ``metrics.json``'s ``dataset`` describes a run's."""


def load_seed_table() -> dict[str, Any]:
    """The seed notebook's published table, parsed from the packaged ``seed_table.json``."""
    # files("mnist_kmeans") rather than this package: works whether or not setuptools treats reference/ as a package
    text = (files("mnist_kmeans") / "reference" / "seed_table.json").read_text(encoding="utf-8")
    return json.loads(text)


def is_mnist(md5: Any) -> bool:
    """Whether ``md5`` (a store's ``md5``: file name -> md5 of its uncompressed bytes) holds MNIST's four sums."""
    return isinstance(md5, Mapping) and all(md5.get(name) == digest for name, digest in MNIST_MD5.items())


def comparable_with_seed(dataset: Mapping[str, Any], md5: Any) -> bool:
    """Whether a run on ``dataset`` (``metrics.json``'s ``dataset``) with the store's sums ``md5`` (``manifest.json``'s
    ``data.md5``) ran on the seed's data: full MNIST as published, not augmented.

    Only then are the run's numbers comparable with the seed notebook's (inertia grows with the number of rows).
    """
    return (
        is_mnist(md5)
        and not dataset.get("augmented_from")
        and all(dataset.get(key) == value for key, value in SEED_DATA.items())
    )
