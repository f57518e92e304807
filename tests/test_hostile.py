"""Hostile inputs: job files, cluster files, stores and run directories that are wrong, malformed, foreign or
malicious. Each is refused with its exit code and ONE line that names the file (or key) at fault, nothing existing is
overwritten, and nothing in them is executed or unpickled.

Validation happens before any cluster starts, so most cases run ``main()`` in this process and take milliseconds;
the few that need a cluster start an in-process one (threads). Beside the table:

- ``batch_size`` smaller than K is *not* an error: this project never lets ``partial_fit`` initialise a model (each
  chain starts from k-means++ on a sample of ``max(1024, 3K)`` rows, given as ``init``), so scikit-learn's "first batch
  must hold K rows" rule does not apply; the test runs such a job to the end;
- no read path of the package unpickles (checked on its syntax tree), and a store that asks for pickle is refused.
"""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from mnist_kmeans.cli import main
from tests.helpers import REPO_ROOT, IdxDataset, loopback_port, tree_snapshot

GOOD_JOB = {"name": "hostile", "k_grid": [3], "epochs": 1, "batch_size": 100, "n_init": 1, "lloyd_steps": 0, "seed": 0}
THREADS_CLUSTER = (
    "connect_timeout: 2\n"
    "local: {n_workers: 1, threads_per_worker: 2, processes: false, dashboard_address: '127.0.0.1:0'}\n"
)


@dataclass
class Ctx:
    tmp: Path
    store: str  # a complete store of 3,000 + 500 rows (read only)

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    def job(self, text: str | dict | bytes, name: str = "job.yaml") -> Path:
        path = self.tmp / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text if isinstance(text, str) else yaml.safe_dump(text, sort_keys=False))
        return path

    def cluster(self, text: str = THREADS_CLUSTER) -> Path:
        path = self.tmp / "cluster.yaml"
        path.write_text(text)
        return path

    def run(
        self, job: Path | None = None, *more: str, store: str | None = None, cluster: Path | None = None
    ) -> list[str]:
        return [
            "run",
            str(job or self.job(GOOD_JOB)),
            "--cluster",
            str(cluster or self.cluster()),
            "--store",
            store or self.store,
            *more,
        ]

    def run_out(self, job: Path | None = None, **kw: object) -> list[str]:
        return [*self.run(job, **kw), "--out", str(self.out)]  # type: ignore[arg-type]


def job_with(**changes: object) -> dict:
    job = dict(GOOD_JOB)
    for key, value in changes.items():
        if value is None:
            job.pop(key, None)
        else:
            job[key] = value
    return job


# --- hostile stores ---------------------------------------------------------------------------------------------------

MARKER = "pwned-by-pickle"


class _Evil:
    """Unpickling this creates a marker file: the proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def v2_store_with_pickle(ctx: Ctx) -> str:
    """A Zarr v2 group that says it is an mnist-kmeans store, whose arrays ask for numcodecs' pickle codec."""
    root = ctx.tmp / "evil-v2.zarr"
    root.mkdir()
    attrs = {"format": "mnist-kmeans/1", "complete": True, "image_shape": [2, 2], "n_classes": 2, "md5": {}}
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / ".zattrs").write_text(json.dumps(attrs))
    for split in ("train", "test"):
        (root / split).mkdir()
        (root / split / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        for name, shape in (("images", [4, 4]), ("labels", [4])):
            d = root / split / name
            d.mkdir()
            meta = {
                "zarr_format": 2,
                "shape": shape,
                "chunks": shape,
                "dtype": "|u1",
                "compressor": None,
                "fill_value": 0,
                "order": "C",
                "filters": [{"id": "pickle"}],
                "dimension_separator": ".",
            }
            (d / ".zarray").write_text(json.dumps(meta))
            (d / ".".join("0" * len(shape))).write_bytes(pickle.dumps(_Evil(str(ctx.tmp / MARKER))))
    return str(root)


def v3_store_with_codec(ctx: Ctx, codec: dict, name: str = "evil-v3.zarr") -> str:
    """A copy of the good store whose train/images declare another codec (e.g. numcodecs' pickle)."""
    import shutil

    root = ctx.tmp / name
    shutil.copytree(ctx.store, root)
    meta_path = root / "train" / "images" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [{"name": "bytes"}, codec]
    meta_path.write_text(json.dumps(meta))
    return str(root)


def store_with_attrs(ctx: Ctx, **changes: object) -> str:
    import shutil

    root = ctx.tmp / "changed.zarr"
    shutil.copytree(ctx.store, root)
    group = zarr.open_group(str(root), mode="r+", use_consolidated=False)
    group.attrs.put({**dict(group.attrs), **changes})
    return str(root)


def store_of_floats(ctx: Ctx) -> str:
    root = ctx.tmp / "floats.zarr"
    group = zarr.create_group(
        str(root),
        zarr_format=3,
        attributes={"format": "mnist-kmeans/1", "complete": True, "image_shape": [2, 2], "n_classes": 2, "md5": {}},
    )
    for split in ("train", "test"):
        group.create_array(f"{split}/images", data=np.zeros((8, 4)), chunks=(4, 4))
        group.create_array(f"{split}/labels", data=np.zeros(8, dtype=np.uint8), chunks=(4,))
    return str(root)


def a_file(ctx: Ctx) -> str:
    path = ctx.tmp / "store-is-a-file.zarr"
    path.write_text("not a store")
    return str(path)


def a_directory_of_other_things(ctx: Ctx) -> str:
    path = ctx.tmp / "photos"
    path.mkdir()
    (path / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    return str(path)


# --- hostile run directories ------------------------------------------------------------------------------------------


def fake_run_dir(
    ctx: Ctx,
    job: dict,
    ingest_id: str | None = None,
    epochs_done: int | None = None,
    damage: Callable[[zarr.Group], object] | None = None,
) -> Path:
    """A run directory as `run` leaves it after an interrupt, made from ``job`` (resolved with the store); with
    ``epochs_done`` or ``damage``, one saved epoch whose chain then claims ``epochs_done`` or is given to ``damage``."""
    from mnist_kmeans.checkpoint import Checkpoint
    from mnist_kmeans.config import load_job, with_overrides
    from mnist_kmeans.data.store import open_store

    info = open_store(ctx.store)
    resolved = with_overrides(load_job(ctx.job(job, "made-with.yaml")), store=ctx.store)
    run_dir = ctx.tmp / "old-run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(yaml.safe_dump(resolved.to_yaml_dict(), sort_keys=False))
    data = {"store": ctx.store, "md5": info.md5, "ingest_id": ingest_id or info.ingest_id}
    (run_dir / "manifest.json").write_text(json.dumps({"data": data}))
    ckpt = Checkpoint.create(run_dir / "centroids.zarr", info.image_shape)
    if epochs_done is not None or damage is not None:
        from mnist_kmeans.fit import ChainState

        k = resolved.k_grid[0]
        state = ChainState(k, 0, 1, 0, np.zeros((k, info.n_features), np.float32), np.zeros(k, np.float32), 0, 1)
        ckpt.save_epoch(state, resolved.epochs, resolved.lloyd_steps)
        chain = ckpt.group[f"chains/k{k}/r0"]
        if epochs_done is not None:
            chain.update_attributes({"epochs_done": epochs_done})  # a checkpoint that claims more than it holds
        if damage is not None:
            damage(chain)
    return run_dir


def nan_in_centers(chain: zarr.Group) -> None:
    centers = chain["centers"]
    saved = np.asarray(centers[0])
    saved[1, 2] = np.nan
    centers[0] = saved


def chain_of_other_k(chain: zarr.Group) -> None:
    """A second chain beside the real one, for K=7 (GOOD_JOB's grid is [3])."""
    from mnist_kmeans.checkpoint import Checkpoint
    from mnist_kmeans.fit import ChainState

    ckpt = Checkpoint.open(Path(str(chain.store.root)))
    n_features = chain["centers"].shape[2]
    ckpt.save_epoch(ChainState(7, 0, 1, 0, np.zeros((7, n_features), np.float32), np.zeros(7, np.float32), 0, 1), 1, 0)


def read_only_dir(ctx: Ctx) -> Path:
    mount = ctx.tmp / "ro"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root in a VM)")
    ctx.tmp.joinpath(".unmount").write_text(str(mount))
    return mount


# --- the table --------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    code: int
    says: tuple[str, ...]  # fragments of the one line on stderr ({tmp} = the test's directory)


CASES = [
    # job files
    Case(
        "job: a YAML list",
        lambda c: c.run_out(c.job("- name: x\n- k_grid: [3]\n")),
        2,
        ("job.yaml", "must hold a YAML mapping", "list"),
    ),
    Case(
        "job: a YAML scalar",
        lambda c: c.run_out(c.job("just some words\n")),
        2,
        ("job.yaml", "must hold a YAML mapping", "str"),
    ),
    Case(
        "job: not valid YAML", lambda c: c.run_out(c.job("name: x\nk_grid: [3, 6\n")), 2, ("job.yaml", "not valid YAML")
    ),
    Case("job: not UTF-8", lambda c: c.run_out(c.job(b"name: \xff\xfe\x00x\n")), 2, ("job.yaml", "cannot read")),
    Case("job: file missing", lambda c: c.run_out(c.tmp / "nope.yaml"), 2, ("nope.yaml", "file not found")),
    Case(
        "job: a python tag (code)",
        lambda c: c.run_out(c.job(f"!!python/object/apply:os.system ['touch {c.tmp}/{MARKER}']\n")),
        2,
        ("job.yaml", "not valid YAML"),
    ),
    Case(
        "job: k_grid missing", lambda c: c.run_out(c.job(job_with(k_grid=None))), 2, ("job.yaml", "k_grid", "missing")
    ),
    Case("job: name missing", lambda c: c.run_out(c.job(job_with(name=None))), 2, ("job.yaml", "name", "missing")),
    Case("job: name of the wrong type", lambda c: c.run_out(c.job(job_with(name=[1, 2]))), 2, ("job.yaml", "name")),
    Case("job: negative K", lambda c: c.run_out(c.job(job_with(k_grid=[-5]))), 2, ("job.yaml", "k_grid", ">= 2")),
    Case("job: huge K", lambda c: c.run_out(c.job(job_with(k_grid=[10**12]))), 2, ("job.yaml", "k_grid", "<= 65536")),
    Case(
        "job: K a string",
        lambda c: c.run_out(c.job(job_with(k_grid="ten"))),
        2,
        ("job.yaml", "k_grid", "list of integers"),
    ),
    Case("job: K a float", lambda c: c.run_out(c.job(job_with(k_grid=[3.5]))), 2, ("job.yaml", "k_grid", "integer")),
    Case(
        "job: K larger than the training rows",
        lambda c: c.run_out(c.job(job_with(k_grid=[5000]))),
        2,
        ("job.yaml", "k_grid", "K=5000 is larger than the 3000 training rows"),
    ),
    Case(
        "job: epochs a string", lambda c: c.run_out(c.job(job_with(epochs="3"))), 2, ("job.yaml", "epochs", "integer")
    ),
    Case(
        "job: batch_size 0", lambda c: c.run_out(c.job(job_with(batch_size=0))), 2, ("job.yaml", "batch_size", ">= 1")
    ),
    Case("job: seed beyond 32 bits", lambda c: c.run_out(c.job(job_with(seed=2**40))), 2, ("job.yaml", "seed", "<=")),
    Case("job: a misspelt key", lambda c: c.run_out(c.job(job_with(epoch=3))), 2, ("job.yaml", "epoch", "unknown key")),
    # cluster files
    Case(
        "cluster: a YAML list",
        lambda c: c.run_out(cluster=c.cluster("- scheduler: tcp://x:1\n")),
        2,
        ("cluster.yaml", "must hold a YAML mapping"),
    ),
    Case(
        "cluster: address without scheme",
        lambda c: c.run_out(cluster=c.cluster("scheduler: localhost:8786\n")),
        2,
        ("cluster.yaml", "scheduler", "tcp://HOST:PORT"),
    ),
    Case(
        "cluster: negative timeout",
        lambda c: c.run_out(cluster=c.cluster("connect_timeout: -1\n")),
        2,
        ("cluster.yaml", "connect_timeout", "positive"),
    ),
    Case(
        "cluster: zero workers",
        lambda c: c.run_out(cluster=c.cluster("local: {n_workers: 0}\n")),
        2,
        ("cluster.yaml", "local.n_workers", ">= 1"),
    ),
    Case(
        "cluster: memory limit garbage",
        lambda c: c.run_out(cluster=c.cluster("local: {memory_limit: lots}\n")),
        2,
        ("cluster.yaml", "memory_limit"),
    ),
    Case(
        "cluster: TLS files missing",
        lambda c: c.run_out(
            cluster=c.cluster(
                "scheduler: tls://127.0.0.1:8786\ntls: {ca_file: ca.pem, cert: me.pem, key: me-key.pem}\n"
            )
        ),
        2,
        ("cluster.yaml", "tls.ca_file", "file not found"),
    ),
    Case(
        "cluster: nobody at the address",
        lambda c: c.run_out(cluster=c.cluster("scheduler: tcp://127.0.0.1:1\nconnect_timeout: 1\n")),
        3,
        ("127.0.0.1:1", "not reachable"),
    ),  # port 1: no one
    # stores
    Case(
        "store: another format version",
        lambda c: c.run_out(store=store_with_attrs(c, format="mnist-kmeans/2")),
        2,
        ("changed.zarr", "store format is 'mnist-kmeans/2'"),
    ),
    Case(
        "store: malformed checksums",
        lambda c: c.run_out(store=store_with_attrs(c, chunk_crc32={"train": "nope"})),
        2,
        ("changed.zarr", "chunk_crc32"),
    ),
    Case("store: images not uint8", lambda c: c.run_out(store=store_of_floats(c)), 2, ("floats.zarr", "float64")),
    Case(
        "store: a Zarr v2 group asking for pickle",
        lambda c: c.run_out(store=v2_store_with_pickle(c)),
        2,
        ("evil-v2.zarr", "not an mnist-kmeans store"),
    ),
    Case(
        "store: a v3 array asking for pickle",
        lambda c: c.run_out(store=v3_store_with_codec(c, {"name": "numcodecs.pickle"})),
        2,
        ("evil-v3.zarr", "not a valid mnist-kmeans store"),
    ),
    Case("store: a regular file", lambda c: c.run_out(store=a_file(c)), 2, ("store-is-a-file.zarr", "not a directory")),
    Case(
        "store: a directory of other things",
        lambda c: c.run_out(store=a_directory_of_other_things(c)),
        2,
        ("photos", "not an mnist-kmeans store"),
    ),
    # run directories
    Case(
        "resume: a run of another job",
        lambda c: [*c.run(), "--resume", str(fake_run_dir(c, job_with(name="theirs")))],
        2,
        ("old-run/job.yaml", "name='theirs'", "name='hostile'"),
    ),
    Case(
        "resume: a run on another store",
        lambda c: [*c.run(), "--resume", str(fake_run_dir(c, GOOD_JOB, ingest_id="0" * 32))],
        2,
        ("old-run/manifest.json", "another store"),
    ),
    Case("resume: not a run directory", lambda c: [*c.run(), "--resume", str(c.tmp)], 2, ("not a run directory",)),
    Case(
        "resume: job.yaml not a mapping",
        lambda c: [
            *c.run(),
            "--resume",
            str((lambda d: (d / "job.yaml").write_text("[1, 2]\n") and d)(fake_run_dir(c, GOOD_JOB))),
        ],
        2,
        ("old-run/job.yaml", "mapping"),
    ),
    Case(
        "resume: a checkpoint that claims more than it holds",
        lambda c: [*c.run(), "--resume", str(fake_run_dir(c, GOOD_JOB, epochs_done=99))],
        2,
        ("chains/k3/r0", "damaged checkpoint", "epochs_done = 99"),
    ),
    Case(
        "resume: NaN in a saved chain's centers",
        lambda c: [*c.run(), "--resume", str(fake_run_dir(c, GOOD_JOB, damage=nan_in_centers))],
        2,
        ("chains/k3/r0/centers", "NaN"),
    ),
    Case(
        "resume: a chain of a K the job does not have",
        lambda c: [*c.run(), "--resume", str(fake_run_dir(c, GOOD_JOB, damage=chain_of_other_k))],
        2,
        ("chains/k7/r0", "not a chain of this job"),
    ),
    Case(
        "resume: a screening inertia that is infinite",
        lambda c: [
            *c.run(),
            "--resume",
            str(fake_run_dir(c, GOOD_JOB, damage=lambda g: g.update_attributes({"screen_inertia": [float("inf")]}))),
        ],
        2,
        ("chains/k3/r0", "screen_inertia"),
    ),
    Case(
        "resume: with --out somewhere else",
        lambda c: [*c.run(), "--resume", str(fake_run_dir(c, GOOD_JOB)), "--out", str(c.tmp / "elsewhere")],
        2,
        ("--out", "drop --out"),
    ),
    Case(
        "store: memory://",
        lambda c: c.run_out(store="memory://mnist.zarr"),
        2,
        ("memory://mnist.zarr", "one process"),
    ),
    Case(
        "out: refused before any cluster is joined (a read-only file system, an unreachable scheduler)",
        lambda c: [
            *c.run(cluster=c.cluster(f"scheduler: tcp://127.0.0.1:{loopback_port()}\nconnect_timeout: 1\n")),
            "--out",
            str(read_only_dir(c) / "run"),
        ],
        2,
        ("ro/run", "Read-only file system"),
    ),
    Case(
        "out: a directory that is not empty",
        lambda c: (c.out.mkdir(), (c.out / "mine.txt").write_text("x"), c.run_out())[2],
        2,
        ("run", "not empty"),
    ),
    Case(
        "out: on a read-only file system",
        lambda c: [*c.run(), "--out", str(read_only_dir(c) / "run")],
        2,
        ("ro/run", "Read-only file system"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(
    case: Case,
    kgrid_store: tuple[str, IdxDataset],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a stray relative path would land here, not in the repository
    ctx = Ctx(tmp_path, kgrid_store[0])
    store_before = tree_snapshot(Path(kgrid_store[0]))
    try:
        argv = case.argv(ctx)
        before = tree_snapshot(tmp_path)
        code = main(argv)
        err = capsys.readouterr().err
    finally:
        unmount = tmp_path / ".unmount"
        if unmount.exists():
            subprocess.run(["umount", "-l", unmount.read_text()], capture_output=True)
    assert code == case.code, f"{case.id}: exit {code}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"{case.id}: stderr is not one line:\n{err}"
    for fragment in case.says:
        assert fragment in lines[0], f"{case.id}: {fragment!r} not in: {lines[0]}"
    assert tree_snapshot(tmp_path) == before, f"{case.id}: a file was written or changed"
    assert tree_snapshot(Path(kgrid_store[0])) == store_before
    assert not (tmp_path / MARKER).exists(), f"{case.id}: something in the input was executed"


def test_the_table_is_broad() -> None:
    kinds = {case.id.split(":")[0] for case in CASES}
    assert len(CASES) >= 12 and {"job", "cluster", "store", "resume", "out"} <= kinds


def test_a_batch_smaller_than_k_works(
    kgrid_store: tuple[str, IdxDataset], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """K = 64 with batches of 16 rows: fine, because no ``partial_fit`` ever initialises a model here (see above)."""
    ctx = Ctx(tmp_path, kgrid_store[0])
    job = ctx.job(job_with(k_grid=[64], batch_size=16, report={"centroid_grids": [64]}))
    code = main(ctx.run_out(job))
    err = capsys.readouterr().err
    assert code == 0, err
    group = zarr.open_group(str(ctx.out / "centroids.zarr"), mode="r", use_consolidated=False)
    centers = np.asarray(group["final/k64"][...])
    assert centers.shape == (64, 100) and np.isfinite(centers).all()
    assert json.loads((ctx.out / "metrics.json").read_text())["results"][0]["k"] == 64


# --- nothing read back is unpickled -----------------------------------------------------------------------------------

UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "torch"}
UNSAFE_CALLS = {
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("yaml", "Loader"),
    ("yaml", "UnsafeLoader"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}


def unpickling_uses(source: str, where: str = "<sample>") -> list[str]:
    """Every import of a pickle-like loader, ``yaml.load``-like call, ``eval``/``exec``, or ``allow_pickle`` not
    False."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"{where}:{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNPICKLING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(f"{where}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in UNSAFE_CALLS:
                found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in {"eval", "exec", "__import__"}:
                found.append(f"{where}:{node.lineno}: {node.func.id}(...)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where}:{node.lineno}: allow_pickle={ast.unparse(kw.value)}")
    return found


def test_the_package_never_unpickles() -> None:
    """Models live in Zarr and JSON, configuration in YAML read with ``safe_load``: no module of the package imports
    a pickle-like loader, calls ``yaml.load``, ``eval``/``exec``, or ``np.load(..., allow_pickle=True)``.

    (Dask itself pickles tasks and results between the client and its workers: that traffic is the cluster's, kept on
    loopback or inside TLS; nothing the project reads back from a store or run directory goes through it.)
    """
    offenders = []
    for path in sorted((REPO_ROOT / "mnist_kmeans").rglob("*.py")):
        offenders += unpickling_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))
    assert not offenders, "\n".join(offenders)


def test_the_check_is_not_vacuous() -> None:
    sample = (
        "import pickle\nfrom joblib import load\nimport yaml, numpy as np\nyaml.load(s)\nyaml.safe_load(s)\n"
        "np.load(f, allow_pickle=True)\nnp.load(f)\neval('1')\n"
    )
    assert sorted(line.split(": ", 1)[1] for line in unpickling_uses(sample)) == sorted(
        ["import pickle", "from joblib import ...", "yaml.load", "allow_pickle=True", "eval(...)"]
    )
