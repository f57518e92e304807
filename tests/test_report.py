"""The report layer alone: ``render_report`` on a run directory built by ``tests/report_data.py``.

No cluster and no store: the fixture fits scikit-learn's 8x8 digits in memory and writes the run-directory files.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mnist_kmeans.errors import UserError
from mnist_kmeans.report import figures, render_report
from mnist_kmeans.report.gallery import confusion_from_contingency
from tests.helpers import run_cli
from tests.report_data import make_run_dir

KS = (4, 8, 16)
HOSTILE = "fixture <script>alert(1)</script> & co"
EXPECTED_FIGURES = {
    "training_digits",
    "inertia_vs_k",
    "scores_vs_k",
    "centroids_k4",
    "centroids_k8",
    "centroids_k16",
    "misclassified",
    "inertia_per_epoch",
    "selection_vs_k",
}  # + confusion_test_k{best}
CHROMIUM = os.environ.get("MNIST_KMEANS_CHROMIUM", "/usr/bin/chromium")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Page(HTMLParser):
    """What the tests look at: tags with attributes, table rows by section, text, and tag balance."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self.doctype = ""
        self.errors: list[str] = []
        self._stack: list[str] = []
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self._section = a.get("id") or ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self._stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self._stack or self._stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self._stack[-1] if self._stack else 'nothing'}>")
        else:
            self._stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, _Page]:
    run = make_run_dir(tmp_path_factory.mktemp("run") / "run", ks=KS, epochs=2, name=HOSTILE, centroid_grids=KS)
    out = render_report(run)
    html = out.read_text(encoding="utf-8")
    return run, html, _parse(html)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------ the HTML file


def test_report_is_written_with_its_figures(rendered: tuple[Path, str, _Page]) -> None:
    run, html, page = rendered
    assert (run / "report.html").is_file()
    best = _metrics(run)["best_k"]
    names = {p.stem for p in (run / "figures").glob("*.png")}
    assert names == EXPECTED_FIGURES | {f"confusion_test_k{best}"}
    # each embedded image is byte for byte the PNG saved beside the report
    embedded = {base64.b64decode(a["src"].split(",", 1)[1]) for t, a in page.tags if t == "img"}
    assert embedded == {p.read_bytes() for p in (run / "figures").glob("*.png")}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def test_report_is_self_contained_html5(rendered: tuple[Path, str, _Page]) -> None:
    _, html, page = rendered
    assert page.doctype.lower() == "doctype html"
    assert ("meta", {"charset": "utf-8"}) in page.tags
    assert page.errors == [], page.errors[:5]
    imgs = [a for t, a in page.tags if t == "img"]
    assert imgs and all((a.get("src") or "").startswith("data:image/png;base64,") for a in imgs)
    assert all(a.get("alt") for a in imgs)
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = (attrs.get(key) or "").strip().lower()
            if tag in ("script", "link", "img", "iframe", "source", "object", "embed"):
                assert not value.startswith(("http:", "https:", "//")), (tag, attrs)
    assert not any(t in ("script", "iframe", "object", "embed") for t, _ in page.tags)
    assert [a for t, a in page.tags if t == "link" and a.get("rel") == "stylesheet"] == []
    assert "@import" not in html and "url(http" not in html


def test_report_holds_every_part(rendered: tuple[Path, str, _Page]) -> None:
    run, html, page = rendered
    metrics = _metrics(run)
    text = " ".join(" ".join(page.text).split())
    # summary
    assert f"Best clustering: K {metrics['best_k']} highest ARI" in text
    top = max(metrics["results"], key=lambda r: (r["accuracy_test"], -r["k"]))
    assert f"Most accurate: K={top['k']} {100 * top['accuracy_test']:.2f} %" in text
    best = next(r for r in metrics["results"] if r["k"] == metrics["best_k"])
    assert f"{100 * best['accuracy_test']:.2f} %" in text
    assert metrics["cluster"]["dashboard"] in text and metrics["cluster"]["scheduler"] in text
    # metrics table: one row per K, every metric shown
    rows = [r for r in page.rows["metrics"] if r and r[0].split()[0].isdigit()]
    assert [int(r[0].split()[0]) for r in rows] == list(KS)
    for r, res in zip(rows, metrics["results"], strict=True):
        assert f"{res['homogeneity']:.4f}" in r and f"{res['ari']:.4f}" in r and f"{res['nmi']:.4f}" in r
        assert f"{100 * res['accuracy_train']:.2f} %" in r and f"{100 * res['accuracy_test']:.2f} %" in r
    # scikit-learn's 8x8 digits are not MNIST (md5 sums): the seed notebook's table is not set beside them
    assert "This run's data is not the seed's: it is not MNIST" in text
    assert not [r for r in page.rows.get("seed", []) if r and r[0].isdigit()]
    # every figure, with a caption
    figure_ids = {a["id"] for t, a in page.tags if t == "figure"}
    assert figure_ids == {f"fig-{n}" for n in EXPECTED_FIGURES | {f"confusion_test_k{metrics['best_k']}"}}
    assert html.count("<figcaption>") == len(figure_ids)
    assert "Inferred label" in text and "rise with K by construction" in text
    # choosing K without labels: the headline, each criterion's choice, the words, the per-K table
    sel = metrics["k_selection"]
    assert f"Without labels: K {sel['recommended']}" in text
    names = {
        "calinski_harabasz": "Calinski–Harabasz",
        "davies_bouldin": "Davies–Bouldin",
        "silhouette_sample": "The sampled silhouette",
        "inertia_knee": "The knee of inertia",
    }
    choosing = page.rows["choosing"]
    for key, name in names.items():
        assert [name, f"K={sel[key]}" if sel[key] is not None else "no K"] in choosing
    agree = len({sel[key] for key in names}) == 1
    assert ("All four criteria agree" in text) == agree and ("The criteria disagree" in text) == (not agree)
    assert f"Recommended without labels: K={sel['recommended']}" in text
    per_k = [r for r in choosing if r and r[0].split()[0].isdigit()]
    assert [int(r[0].split()[0]) for r in per_k] == list(KS)
    for r, res in zip(per_k, metrics["results"], strict=True):
        assert f"{res['davies_bouldin']:.4f}" in r and f"{res['silhouette_sample']:.4f}" in r
        assert f"{res['restart_ari_mean']:.3f}" in r and f"{res['restart_ari_min']:.3f}" in r
        assert ("label-free" in r[0]) == (res["k"] == sel["recommended"])
    # run facts
    assert ("a", {"href": "dask-performance.html"}) in page.tags
    manifest = json.loads((run / "manifest.json").read_text())
    for digest in manifest["data"]["md5"].values():
        assert digest in text
    for version in manifest["versions"].values():
        assert version in text
    assert "mnist-kmeans run jobs/fixture.yaml" in text  # the command line, as one shell line
    job_yaml = (run / "job.yaml").read_text()
    assert " ".join(job_yaml.split()) in text
    for step in ("cluster start", "fit", "evaluate", "total"):
        assert step in text


def test_user_text_is_escaped(rendered: tuple[Path, str, _Page]) -> None:
    _, html, page = rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert "fixture &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html  # title, h1
    assert "data/digits &amp; co.zarr" in html
    assert HOSTILE in " ".join(page.text)  # and reads back as the user wrote it


def test_missing_performance_report_is_said_not_linked(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", ks=(3, 5), epochs=1, performance_report=False, centroid_grids=(36,))
    html = render_report(run).read_text(encoding="utf-8")
    assert 'href="dask-performance.html"' not in html
    assert "dask-performance.html is missing" in html
    # K=36 of report.centroid_grids is not in the grid: the best K is shown instead, and the report says so
    assert "not in this run&#39;s K grid" in html
    assert f'id="fig-centroids_k{_metrics(run)["best_k"]}"' in html


def test_optional_parts_missing_still_render(rendered: tuple[Path, str, _Page], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(rendered[0], run)
    for name in ("manifest.json", "job.yaml", "dask-performance.html"):
        (run / name).unlink()
    metrics = _metrics(run)
    for key in ("timings", "cluster", "dataset", "started_utc", "inertia_per_epoch_note", "k_selection"):
        del metrics[key]
    for entry in metrics["results"]:
        for key in ("completeness", "v_measure", "fit_seconds", "inertia_per_epoch", "calinski_harabasz"):
            del entry[key]
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = _parse(render_report(run).read_text(encoding="utf-8"))
    text = " ".join(" ".join(page.text).split())
    assert page.errors == []
    for name in ("manifest.json", "job.yaml", "dask-performance.html"):
        assert f"{name} is missing" in text
    assert "no 'inertia_per_epoch'" in text
    # a run made before the label-free criteria: no "Choosing K" section, no headline card, and the page says why
    assert "choosing" not in page.rows and "Without labels" not in text and "holds no 'k_selection'" in text


# --------------------------------------------------------------------------------------------- bad input


def _break(run: Path, what: str) -> None:
    if what == "no metrics":
        (run / "metrics.json").unlink()
    elif what == "bad json":
        (run / "metrics.json").write_text("{ not json")
    elif what == "no results":
        m = _metrics(run)
        del m["results"]
        (run / "metrics.json").write_text(json.dumps(m))
    elif what == "short label map":
        lm = json.loads((run / "label_maps.json").read_text())
        lm["4"] = lm["4"][:-1]
        (run / "label_maps.json").write_text(json.dumps(lm))
    elif what == "no centroids":
        shutil.rmtree(run / "centroids.zarr" / "final" / "k4")
    elif what == "no samples":
        shutil.rmtree(run / "samples.zarr")


@pytest.mark.parametrize(
    ("what", "names"),
    [
        ("no metrics", "metrics.json: missing"),
        ("bad json", "metrics.json: not valid JSON"),
        ("no results", "metrics.json: key 'results' is missing"),
        ("short label map", "label_maps.json: key '4'"),
        ("no centroids", "centroids.zarr: array 'final/k4' is missing"),
        ("no samples", "samples.zarr: missing"),
    ],
)
def test_bad_run_directory_is_a_one_line_user_error(
    rendered: tuple[Path, str, _Page], tmp_path: Path, what: str, names: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(rendered[0], run)
    (run / "report.html").unlink()
    _break(run, what)
    with pytest.raises(UserError) as info:
        render_report(run)
    message = str(info.value)
    assert names in message and "\n" not in message
    assert not (run / "report.html").exists()


# ------------------------------------------------------------------------------------------------- pieces


def test_confusion_matrix_from_contingency_keeps_unmapped_rows_apart() -> None:
    cont = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 0]])  # 3 clusters x 3 classes
    m, names = confusion_from_contingency(cont, [0, 1, None], 3)
    assert names == ["0", "1", "2", "none"]
    assert m.tolist() == [[5, 0, 0, 1], [1, 4, 0, 0], [0, 2, 0, 0]]
    m, names = confusion_from_contingency(cont[:2], [0, 2], 3)
    assert names == ["0", "1", "2"] and m.tolist() == [[5, 0, 0], [1, 0, 4], [0, 0, 2]]


def test_every_figure_is_a_png() -> None:
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8)
    pngs = [
        figures.training_digits(digits, list(range(9))),
        figures.inertia_vs_k([10, 16, 36], [3e6, 2.5e6, 2e6], seed={10: 2.38e6, 16: 2.2e6}),
        figures.scores_vs_k([10, 16], [0.4, 0.5], [0.5, 0.6], [0.5, 0.6], [0.3, 0.3], [0.4, 0.5]),
        figures.centroid_grid(rng.random((256, 784), dtype=np.float32), [None] + [1] * 255, (28, 28)),
        figures.confusion_matrix(rng.integers(0, 50, (10, 11)), list("0123456789"), [*"0123456789", "none"]),
        figures.misclassified_gallery(digits[:0], [], []),
        figures.misclassified_gallery(digits, [1] * 9, [2] * 8 + [None]),
        figures.inertia_per_epoch({10: [3.0, 2.0], 16: [2.5]}),
        figures.selection_vs_k(
            [4, 8, 16], {"a knee": [3.0, 2.0, 1.9], "b": [0.2, None, 0.1]}, {"a knee": None, "b": 4}
        ),
    ]
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)


# -------------------------------------------------------------------------------------- in a real browser


def test_report_opens_in_headless_chromium(rendered: tuple[Path, str, _Page]) -> None:
    # Not skipped when Chromium is missing: scripts/setup.sh --test installs it, and CI must not pass without it.
    assert Path(CHROMIUM).exists(), (
        f"no Chromium at {CHROMIUM}: run `bash scripts/setup.sh --test` (or set MNIST_KMEANS_CHROMIUM)"
    )
    from playwright import sync_api

    run = rendered[0]
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((run / "report.html").resolve().as_uri(), wait_until="load")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.naturalWidth,"
                " i.naturalHeight, i.alt])"
            )
            title = page.title()
        finally:
            browser.close()
    assert len(images) == len(EXPECTED_FIGURES) + 1
    assert all(ok and w > 0 and h > 0 for ok, w, h, _ in images), images
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert title.startswith(HOSTILE)


# -------------------------------------------------------------------------------------------- the command


def test_report_command_renders_again(rendered: tuple[Path, str, _Page], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(rendered[0], run)
    (run / "report.html").unlink()
    shutil.rmtree(run / "figures")
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report.html")

    # the same page as render_report gave (the copy differs only in its own path; manifest.json keeps the original)
    def norm(html: str) -> str:
        return html.replace(str(run), "RUN").replace(str(rendered[0]), "RUN")

    assert norm((run / "report.html").read_text(encoding="utf-8")) == norm(rendered[1])
    assert len(list((run / "figures").glob("*.png"))) == len(EXPECTED_FIGURES) + 1


def test_report_command_on_a_broken_run_exits_2_with_one_line(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", ks=(3,), epochs=1)
    (run / "metrics.json").unlink()
    proc = run_cli("report", str(run))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.json" in lines[0] and "Traceback" not in proc.stderr
    assert not (run / "report.html").exists()
