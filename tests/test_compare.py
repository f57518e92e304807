"""`mnist-kmeans compare` and `mnist_kmeans.compare`: finished runs of the same data on one page (docs/contract.md,
"compare").

Real runs: three tiny jobs that differ in seed, epochs, batch size and K grid on one tiny store (300 rows of 12 x 9),
and one on another store of the same shape, each run by ``run_job`` on one real ``LocalCluster`` (two workers, a
thread each, the scheduler on 127.0.0.1) that the module shares; the page is parsed, and opened in headless Chromium.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from distributed import LocalCluster

import mnist_kmeans
from mnist_kmeans.cli import main
from mnist_kmeans.errors import UserError
from mnist_kmeans.pipeline import run_job
from tests.helpers import make_small_store, run_cli, tree_snapshot
from tests.test_report import CHROMIUM

BASE_JOB = {"k_grid": [2, 3], "epochs": 1, "batch_size": 32, "n_init": 1, "lloyd_steps": 1, "seed": 3}
# run name -> what its job changes; a differs from b in the seed only, c in epochs, batch size and K grid
JOBS = {
    "a": {},
    "b": {"seed": 4},
    "c": {"epochs": 2, "batch_size": 64, "k_grid": [2, 3, 5]},
}
DIFFERING = {"name", "seed", "epochs", "batch_size", "k_grid"}
HOSTILE = ' <img src=x onerror="alert(1)">&amp;'  # in run c's job name: shown as text, never as markup


@dataclass
class Runs:
    root: Path
    dirs: dict[str, Path]  # a, b, c: on the session's store; other: on another store of the same shape
    page: Path  # the comparison page of a, b and c
    html: str


def _run(root: Path, cluster: LocalCluster, store: str, name: str, **changes: object) -> Path:
    job = root / f"{name}.yaml"
    title = f"compare-{name}" + (HOSTILE if name == "c" else "")
    job.write_text(yaml.safe_dump({"name": title, **BASE_JOB, **changes}, sort_keys=False))
    out = root / name
    run_job(str(job), scheduler=cluster.scheduler_address, store=store, out=str(out), log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("compare")
    store, _ = make_small_store(root / "store", seed=1)
    other_store, _ = make_small_store(root / "other-store", seed=2)  # same shape, other images: other md5 sums
    # worker threads in this process: no worker process to start and import the numeric stack, which was half of
    # this module's time
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        dirs = {name: _run(root, cluster, store, name, **changes) for name, changes in JOBS.items()}
        dirs["other"] = _run(root, cluster, other_store, "other", k_grid=[2])
    page = mnist_kmeans.compare([dirs["a"], dirs["b"], dirs["c"]], out=root / "page.html")
    return Runs(root, dirs, page, page.read_text())


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


class _Tables(HTMLParser):
    """The text of every table cell, row by row, and the page's images and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src"):
            if key in values and tag != "img":
                self.links.append(values[key] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tables(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


# ------------------------------------------------------------------------------------------------ the page


def test_page_names_every_run_and_every_k(runs: Runs) -> None:
    page = _tables(runs.html)
    for name in ("a", "b", "c"):
        assert str(runs.dirs[name]) in runs.html
        assert f"compare-{name}" in runs.html
    assert "other" not in [row[0] for row in page.rows if row]
    for k in (2, 3, 5):
        assert f'id="k{k}"' in runs.html
    assert "K = 5 is not in the K grid of a, b." in runs.html


def test_metrics_per_k_hold_each_runs_numbers(runs: Runs) -> None:
    rows = _tables(runs.html).rows
    for name, column in (("a", 1), ("b", 2), ("c", 3)):
        results = {r["k"]: r for r in _metrics(runs.dirs[name])["results"]}
        # the ARI rows, one per K table in K order: this run's value in its column, a dash where it has no such K
        ari_rows = [row for row in rows if row and row[0] == "ari"]
        assert len(ari_rows) == 3
        for row, k in zip(ari_rows, (2, 3, 5), strict=True):
            assert row[column] == (f"{results[k]['ari']:.4f}" if k in results else "—")


def test_every_numeric_per_k_field_is_shown(runs: Runs) -> None:
    fields = {row[0] for row in _tables(runs.html).rows if row}
    result = _metrics(runs.dirs["a"])["results"][0]
    numeric = {k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "k"}
    assert numeric >= {"inertia", "ari", "nmi", "accuracy_test", "fit_seconds"}
    assert numeric <= fields


def test_what_differs_is_the_jobs_differences(runs: Runs) -> None:
    html = runs.html
    differ = html[html.index('id="differ"') : html.index('id="metrics"')]
    shown = differ[: differ.index("<details>")]
    keys = {row[0] for row in _tables(shown).rows[1:]}
    assert keys >= DIFFERING
    assert not keys & {"n_init", "lloyd_steps", "screen_rows"}  # the same in every job
    seeds = next(row for row in _tables(shown).rows if row[0] == "seed")
    assert seeds[1:] == ["3", "4", "3"]
    k_grids = next(row for row in _tables(shown).rows if row[0] == "k_grid")
    assert k_grids[1:] == ["[2, 3]", "[2, 3]", "[2, 3, 5]"]
    shared = {row[0] for row in _tables(differ[differ.index("<details>") :]).rows}
    assert {"n_init", "lloyd_steps"} <= shared


def _with_fields(source: Path, target: Path, per_k: dict[str, float], k_selection: dict | None) -> Path:
    """A copy of a finished run whose metrics.json has more per-K fields (and a k_selection), as a later version
    of ``run`` may write them."""
    shutil.copytree(source, target)
    metrics = _metrics(target)
    for result in metrics["results"]:
        result.update({key: value * result["k"] for key, value in per_k.items()})
    if k_selection is not None:
        metrics["k_selection"] = k_selection
    (target / "metrics.json").write_text(json.dumps(metrics))
    return target


def test_new_per_k_fields_and_k_selection_show_by_themselves(runs: Runs, tmp_path: Path) -> None:
    first = _with_fields(runs.dirs["a"], tmp_path / "x", {"calinski_harabasz": 1.5, "only_here": 2.0}, {"knee": 3})
    second = _with_fields(runs.dirs["b"], tmp_path / "y", {"calinski_harabasz": 2.5}, None)
    html = mnist_kmeans.compare([mnist_kmeans.open_run(first), second], out=tmp_path / "p.html").read_text()
    rows = _tables(html).rows
    ch = [row for row in rows if row and row[0] == "calinski_harabasz"]
    assert [row[1:] for row in ch] == [["3.0000", "5.0000"], ["4.5000", "7.5000"]]  # K = 2, 3
    assert not [row for row in rows if row and row[0] == "only_here"]
    assert "only some of the runs have it: only_here" in " ".join(html.split())
    assert ["k_selection.knee", "3", "—"] in rows


def test_timings_of_every_run(runs: Runs) -> None:
    html = runs.html
    rows = _tables(html[html.index('id="timings"') :]).rows
    total = next(row for row in rows if row[0] == "total")
    assert len(total) == 4 and all(cell != "—" for cell in total[1:])


def test_user_text_is_escaped(runs: Runs) -> None:
    assert '<img src=x onerror="alert(1)">' not in runs.html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&amp;amp;" in runs.html
    assert len(_tables(runs.html).images) == 3  # the three figures, no image from the job's name


def test_page_is_self_contained(runs: Runs) -> None:
    page = _tables(runs.html)
    assert len(page.images) == 3
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert [link for link in page.links if not link.startswith(("#", "data:"))] == []
    assert "<script" not in runs.html


def test_page_opens_in_headless_chromium(runs: Runs) -> None:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run `bash scripts/setup.sh --test`"
    from playwright import sync_api

    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(runs.page.resolve().as_uri(), wait_until="load")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
            images = page.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
        finally:
            browser.close()
    assert len(images) == 3
    assert all(w > 0 and h > 0 for w, h in images), images
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []


def test_the_runs_are_left_as_they_were(runs: Runs, tmp_path: Path) -> None:
    before = {name: tree_snapshot(d) for name, d in runs.dirs.items()}
    mnist_kmeans.compare([runs.dirs["a"], runs.dirs["b"]], out=tmp_path / "again.html")
    assert {name: tree_snapshot(d) for name, d in runs.dirs.items()} == before


# ------------------------------------------------------------------------------------------- the command


def test_command_writes_the_page_and_prints_its_path(runs: Runs, tmp_path: Path) -> None:
    proc = run_cli("compare", str(runs.dirs["a"]), str(runs.dirs["c"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "compare.html"
    html = (tmp_path / "compare.html").read_text()
    assert str(runs.dirs["c"]) in html and str(runs.dirs["b"]) not in html
    # an earlier comparison page is replaced
    assert main(["compare", str(runs.dirs["b"]), str(runs.dirs["c"]), "--out", str(tmp_path / "compare.html")]) == 0
    assert str(runs.dirs["b"]) in (tmp_path / "compare.html").read_text()


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["compare", *args])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_runs_of_different_data_are_refused(runs: Runs, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    line = _refused([str(runs.dirs["a"]), str(runs.dirs["other"]), "--out", str(out)], capsys)
    assert f"{runs.dirs['other']}: not on the same data as {runs.dirs['a']}" in line
    assert "md5" in line
    assert not out.exists()


def test_fewer_than_two_runs_are_refused(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    assert "at least 2 run directories, got 1" in _refused([str(runs.dirs["a"])], capsys)
    with pytest.raises(UserError, match="given twice"):
        mnist_kmeans.compare([runs.dirs["a"], runs.dirs["a"]])


def test_an_unfinished_run_is_refused(runs: Runs, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(runs.dirs["b"], cut)
    metrics = _metrics(cut)
    del metrics["finished_utc"]
    (cut / "metrics.json").write_text(json.dumps(metrics))
    line = _refused([str(runs.dirs["a"]), str(cut), "--out", str(tmp_path / "p.html")], capsys)
    assert f"{cut}: the run did not finish" in line
    assert not (tmp_path / "p.html").exists()


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        ("metrics.json", "metrics.json: not valid JSON"),
        ("job.yaml", "job.yaml: not valid YAML"),
        ("manifest.json", "manifest.json: missing"),
        ("no-job", "job.yaml: file not found"),
        ("no-md5", "manifest.json: key 'data.md5' is missing"),
    ],
)
def test_missing_or_corrupt_files_are_one_line(
    runs: Runs, capsys: pytest.CaptureFixture[str], tmp_path: Path, broken: str, named: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(runs.dirs["b"], bad)
    if broken == "manifest.json":
        (bad / broken).unlink()
    elif broken == "no-job":
        (bad / "job.yaml").unlink()
    elif broken == "no-md5":
        manifest = json.loads((bad / "manifest.json").read_text())
        del manifest["data"]["md5"]
        (bad / "manifest.json").write_text(json.dumps(manifest))
    else:
        (bad / broken).write_text("{: [unclosed\n")
    line = _refused([str(runs.dirs["a"]), str(bad), "--out", str(tmp_path / "p.html")], capsys)
    file = {"no-md5": "manifest.json", "no-job": "job.yaml"}.get(broken, broken)
    assert f"{bad / file}" in line and named in line
    assert not (tmp_path / "p.html").exists()


def test_out_never_overwrites_a_run_or_a_foreign_file(
    runs: Runs, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a, b = str(runs.dirs["a"]), str(runs.dirs["b"])
    before = tree_snapshot(runs.dirs["a"])
    line = _refused([a, b, "--out", str(runs.dirs["a"] / "report.html")], capsys)
    assert f"inside the run directory {a}" in line
    assert tree_snapshot(runs.dirs["a"]) == before
    notes = tmp_path / "notes.html"
    notes.write_text("<p>mine</p>")
    assert "exists and is not a comparison page" in _refused([a, b, "--out", str(notes)], capsys)
    assert notes.read_text() == "<p>mine</p>"
    assert "is a directory" in _refused([a, b, "--out", str(tmp_path)], capsys)


def test_compare_is_public() -> None:
    assert "compare" in mnist_kmeans.__all__
    assert mnist_kmeans.compare.__module__ == "mnist_kmeans.report.compare"
