"""Which data a run is on, and how the report words it: :class:`DataIdentity`.

The report compares a run with the seed notebook's MNIST table, and calls its images digits, only when the data is
MNIST: when ``manifest.json``'s ``data.md5`` holds MNIST's published sums (:func:`mnist_kmeans.reference.is_mnist`).
A store made by ``augment`` from MNIST keeps MNIST's sums but records ``augmented_from``: its images are still
digits, but its numbers are not the seed's. Classes are titled by ``metrics.json``'s ``dataset.class_names`` when
the store had names, else by their label ("Number 3" on MNIST, as the seed notebook does; "class 3" otherwise).

:func:`data_fingerprint` says whether two runs are on the same data, for ``compare``: what the data *is* (its IDX
files' md5 sums, sizes, classes, how it was augmented), not where it is stored or which build of it was read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mnist_kmeans.reference import comparable_with_seed, is_mnist

MNIST, AUGMENTED_MNIST, OTHER, UNKNOWN = "mnist", "augmented from mnist", "other", "unknown"


@dataclass(frozen=True)
class DataIdentity:
    """What the report needs to know about the data set beyond its numbers."""

    kind: str  # MNIST, AUGMENTED_MNIST, OTHER, or UNKNOWN (no md5 sums recorded)
    comparable: bool  # with the seed notebook's table
    class_names: tuple[str, ...] | None  # one per label, when the store named its classes

    @property
    def digits(self) -> bool:
        """Whether the images are MNIST digits (augmented or not)."""
        return self.kind in (MNIST, AUGMENTED_MNIST)

    @property
    def noun(self) -> str:
        """What one image is called in titles: "digit" on MNIST, else "image"."""
        return "digit" if self.digits else "image"

    @property
    def name(self) -> str:
        """The data set's name where it is known ("MNIST", "augmented MNIST"), else ""."""
        return {MNIST: "MNIST", AUGMENTED_MNIST: "augmented MNIST"}.get(self.kind, "")

    def title(self, label: int) -> str:
        """The title of an image of class ``label``: its name, "Number 3" on MNIST, else "class 3"."""
        if self.class_names is not None:
            return self.class_names[label]
        return f"Number {label}" if self.digits else f"class {label}"

    def label(self, label: int) -> str:
        """A class as a short label (axis ticks, lists): its name, else its number."""
        return self.class_names[label] if self.class_names is not None else str(label)

    def why_not_comparable(self) -> str:
        """Why the seed's table is not set beside this run; "" when it is."""
        if self.comparable:
            return ""
        return {
            MNIST: "it is MNIST, but not the full 60,000 training rows of 28 × 28 images and 10 classes",
            AUGMENTED_MNIST: "it is augmented from MNIST (deformed copies of its training digits), not MNIST itself",
            OTHER: "it is not MNIST: the md5 sums of its IDX files are not MNIST's published ones",
            UNKNOWN: "the run directory records no md5 sums of its data (manifest.json data.md5), so it cannot be "
            "told to be MNIST",
        }[self.kind]


def identify(dataset: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> DataIdentity:
    """The identity of a run's data from ``metrics.json``'s ``dataset`` (already checked) and ``manifest.json``."""
    data = manifest.get("data") if isinstance(manifest, Mapping) else None
    md5 = data.get("md5") if isinstance(data, Mapping) else None
    if not md5:
        kind = UNKNOWN
    elif not is_mnist(md5):
        kind = OTHER
    else:
        kind = AUGMENTED_MNIST if dataset.get("augmented_from") else MNIST
    names = dataset.get("class_names")
    return DataIdentity(kind, comparable_with_seed(dataset, md5), tuple(names) if names is not None else None)


_NOT_CONTENT = ("store", "ingest_id")  # where a source store was and which build of it: not what the data is


def data_fingerprint(dataset: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What two runs on the same data share, from ``metrics.json``'s ``dataset`` and ``manifest.json``'s ``data``
    (docs/contract.md, "compare"); None when the run records no md5 sums, so its data cannot be told.

    The store's path, its ``ingest_id`` and ``chunk_rows`` are left out: the same IDX files ingested twice, or
    copied elsewhere, are the same data. ``augmented_from`` is kept (minus its source's path and build), since an
    augmented store keeps its source's md5 sums and differs from another only by its rows, seed and deformation.
    """
    data = manifest.get("data") if isinstance(manifest, Mapping) else None
    md5 = data.get("md5") if isinstance(data, Mapping) else None
    if not isinstance(md5, Mapping) or not md5:
        return None
    augmented = dataset.get("augmented_from")
    if isinstance(augmented, Mapping):
        augmented = {k: v for k, v in augmented.items() if k not in _NOT_CONTENT}
    return {
        "md5": dict(md5),
        "n_train": dataset.get("n_train", data.get("n_train")),
        "n_test": dataset.get("n_test", data.get("n_test")),
        "n_classes": dataset.get("n_classes"),
        "image_shape": dataset.get("image_shape"),
        "class_names": dataset.get("class_names"),
        "augmented_from": augmented,
    }
