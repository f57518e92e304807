"""The cluster's exposure (``cluster.connect``): a job over TLS between real processes, clients without the right
certificates refused (exit 3), and an embedded cluster that listens on loopback only.

The certificates are made here with ``cryptography``: a CA, one certificate for the scheduler and workers and one for
the client (both for 127.0.0.1 and localhost, signed by the CA), and an intruder's certificate signed by another CA.
Distributed's TLS requires a certificate from both ends and checks it against the CA, so the scheduler refuses any
client that the CA did not sign.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, DaskCluster, IdxDataset, run_cli

JOB = {"name": "tls", "k_grid": [3], "epochs": 1, "batch_size": 100, "n_init": 1, "lloyd_steps": 0, "seed": 1}


def _name(cn: str):  # noqa: ANN202 - a cryptography Name
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str):  # noqa: ANN201 - (key, certificate)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_leaf(ca_key, ca_cert, cn: str):  # noqa: ANN001, ANN201
    """A certificate for 127.0.0.1 and localhost, for servers and clients alike, signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(directory: Path, name: str, key, cert) -> None:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (directory / f"{name}-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (directory / f"{name}-key.pem").chmod(0o600)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ca_key, ca_cert = make_ca("mnist-kmeans test CA")
    write_pem(d, "ca", None, ca_cert)
    for name in ("node", "client"):
        write_pem(d, name, *make_leaf(ca_key, ca_cert, name))
    other_key, other_cert = make_ca("another CA")
    write_pem(d, "intruder", *make_leaf(other_key, other_cert, "intruder"))
    return d


@pytest.fixture(scope="module")
def tls_cluster(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    tls = {"ca_file": str(certs / "ca.pem"), "cert": str(certs / "node.pem"), "key": str(certs / "node-key.pem")}
    cluster = DaskCluster(tmp_path_factory.mktemp("tls-cluster"), tls=tls).start_scheduler()
    try:
        cluster.add_worker()
        cluster.wait_for_workers(1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def job_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls-job") / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def cluster_file(directory: Path, scheduler: str, tls: tuple[str, str] | None) -> Path:
    """A cluster file in the certificates' directory, with paths relative to it (as cluster.yaml's comment says)."""
    data: dict = {"scheduler": scheduler, "connect_timeout": 10}
    if tls is not None:
        data["tls"] = {"ca_file": "ca.pem", "cert": tls[0], "key": tls[1]}
    name = "cluster-" + ("none" if tls is None else tls[0].removesuffix(".pem")) + ".yaml"
    path = directory / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_job(job_file: Path, cluster: Path, store: str, out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "run", str(job_file), "--cluster", str(cluster), "--store", store, "--out", str(out), timeout=timeout
    )


def test_job_runs_over_tls(
    certs: Path, tls_cluster: DaskCluster, job_file: Path, kgrid_store: tuple[str, IdxDataset], tmp_path: Path
) -> None:
    assert tls_cluster.address.startswith("tls://")
    cfile = cluster_file(certs, tls_cluster.address, ("client.pem", "client-key.pem"))
    proc = run_job(job_file, cfile, kgrid_store[0], tmp_path / "run", timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cluster"]["scheduler"] == tls_cluster.address
    assert metrics["cluster"]["n_workers"] == 1
    assert [row["k"] for row in metrics["results"]] == [3]


@pytest.mark.parametrize(
    ("case", "tls", "scheme", "says"),
    [
        ("no certificates", None, "tls", "set tls (ca_file, cert, key)"),
        ("a certificate of another CA", ("intruder.pem", "intruder-key.pem"), "tls", "TLS handshake refused"),
        ("plain TCP to the TLS port", None, "tcp", "not reachable"),
    ],
)
def test_client_without_trusted_certificate_is_refused(
    case: str,
    tls: tuple[str, str] | None,
    scheme: str,
    says: str,
    certs: Path,
    tls_cluster: DaskCluster,
    job_file: Path,
    kgrid_store: tuple[str, IdxDataset],
    tmp_path: Path,
) -> None:
    address = tls_cluster.address.replace("tls://", f"{scheme}://")
    cfile = cluster_file(certs, address, tls)
    proc = run_job(job_file, cfile, kgrid_store[0], tmp_path / "run", timeout=120)
    assert proc.returncode == 3, f"{case}: exit {proc.returncode}\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"cluster error: {address}") and says in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_embedded_cluster_listens_on_loopback_only() -> None:
    """The LocalCluster of cluster.yaml: scheduler, workers, nannies and dashboard bound to 127.0.0.1, nothing else."""
    import psutil

    from mnist_kmeans.cluster import connect
    from mnist_kmeans.config import ClusterConfig, LocalClusterConfig, load_cluster

    assert LocalClusterConfig().dashboard_address.startswith("127.0.0.1:")
    assert load_cluster(REPO_ROOT / "cluster.yaml").local.dashboard_address.startswith("127.0.0.1:")

    me = psutil.Process()

    def listening(procs: list[psutil.Process]) -> set[tuple[int, str, int]]:
        out = set()
        for p in procs:
            try:
                out |= {(p.pid, c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == "LISTEN"}
            except psutil.NoSuchProcess:
                continue
        return out

    before = listening([me, *me.children(recursive=True)])  # this session's other clusters are not ours
    cfg = ClusterConfig(
        local=LocalClusterConfig(
            n_workers=1, threads_per_worker=1, memory_limit="1GiB", dashboard_address="127.0.0.1:0"
        )
    )
    with connect(cfg) as (client, info):
        opened = listening([me, *me.children(recursive=True)]) - before
        assert info.scheduler.startswith("tcp://127.0.0.1:")
        assert info.dashboard is not None and info.dashboard.startswith("http://127.0.0.1:")
        assert {port for _, _, port in opened} >= {int(info.scheduler.rsplit(":", 1)[1])}
        assert len({pid for pid, _, _ in opened}) >= 2  # this process (scheduler, dashboard) and a worker process
        exposed = sorted((pid, ip, port) for pid, ip, port in opened if ip != "127.0.0.1")
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert client.submit(sum, [1, 2]).result() == 3
