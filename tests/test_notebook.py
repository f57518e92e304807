"""examples/quickstart.ipynb, executed headless in a real ipykernel (nbclient), and checked by its outputs: the run
inline, the progress bar a widget (no terminal control characters), a few test images classified as the run
directory's model classifies them, the centroids and a figure drawn. Committed without outputs."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import mnist_kmeans
from mnist_kmeans.data.store import read_rows
from tests.helpers import REPO_ROOT

NOTEBOOK = REPO_ROOT / "examples" / "quickstart.ipynb"


def outputs(cell: dict, output_type: str | None = None) -> list[dict]:
    return [out for out in cell["outputs"] if output_type is None or out["output_type"] == output_type]


def cell_with(nb: nbformat.NotebookNode, text: str) -> dict:
    (cell,) = [cell for cell in nb.cells if cell.cell_type == "code" and text in cell.source]
    return cell


def test_the_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_quickstart_runs_in_a_kernel(mnist_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel's working directory stands for examples/: "../jobs/smoke.yaml" is the repository's job, its default
    # store the session's MNIST (the kernel inherits MNIST_KMEANS_DATA), its run directory under the test's runs/.
    (tmp_path / "jobs").symlink_to(REPO_ROOT / "jobs")
    workdir = tmp_path / "examples"
    workdir.mkdir()
    monkeypatch.setenv("MNIST_KMEANS_DATA", str(mnist_home))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()

    (run_dir,) = (workdir / "runs").glob("smoke-*")
    run = mnist_kmeans.open_run(run_dir)

    ran = cell_with(nb, "mnist_kmeans.run(")
    shown = [out["data"] for out in outputs(ran, "execute_result")]
    assert len(shown) == 1 and "Metrics per K" in shown[0]["text/html"]
    assert f'<div class="value">{run.metrics["ari"].idxmax()}</div>' in shown[0]["text/html"]
    widgets = [out for out in outputs(ran, "display_data") if "application/vnd.jupyter.widget-view+json" in out["data"]]
    assert widgets, "the fit's progress is a notebook widget"
    for cell in nb.cells:
        for out in outputs(cell, "stream") if cell.cell_type == "code" else []:
            assert "\x1b[" not in out["text"] and "\r" not in out["text"], out["text"]

    table = cell_with(nb, "run.metrics[")
    assert "accuracy_test" in outputs(table, "execute_result")[0]["data"]["text/html"]

    classified = "".join(out["text"] for out in outputs(cell_with(nb, "predict_labels("), "stream"))
    images, labels = read_rows(str(mnist_home / "mnist.zarr"), "test", 0, 12)
    true, predicted = re.findall(r"\[[^\]]*\]", classified)
    assert true == str(labels.tolist()) and predicted == str(run.predict_labels(10, images).tolist())

    drawn = cell_with(nb, "cluster_centers_")
    assert any("image/png" in out["data"] for out in outputs(drawn, "display_data"))
    figure = outputs(cell_with(nb, "run.figure("), "execute_result")[0]["data"]["image/png"]
    assert base64.b64decode(figure) == (run_dir / "figures" / "inertia_vs_k.png").read_bytes()
