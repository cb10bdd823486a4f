"""``voxgrid node doctor``: a healthy home passes; each broken part is named as the failing check."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from voxgrid.nodes.ops import admin, doctor
from voxgrid.nodes.local.federation import free_port
from voxgrid.nodes.service.home import Home
from voxgrid.pki import create_ca, issue_certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor-pki")
    ca = create_ca(root / "ca")
    return root, ca, issue_certificate(ca, root / "certs", "node-a", ["127.0.0.1", "localhost"])


@pytest.fixture
def home(pki, tmp_path):
    root, ca, cert = pki
    path = tmp_path / "home"
    admin.init_home("node", path, "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key, port=free_port(),
                    public_url="https://localhost:8443")
    return path


def by_name(checks):
    return {c.name: c for c in checks}


def vx(*args):
    return subprocess.run([sys.executable, "-m", "voxgrid", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def _install(home, cert_pem: bytes, key):
    tls = Home(home).tls
    (tls / "server.crt").write_bytes(cert_pem)
    (tls / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    os.chmod(tls / "server.key", 0o600)


def _expired_cert(ca, host="localhost"):
    """A certificate signed by the federation CA that expired yesterday."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key


def test_healthy_home_passes(home):
    checks = doctor.diagnose(home)
    assert [c.name for c in checks] == ["config", "certificate", "key", "store", "grid", "outbound", "gpu", "disk",
                                        "storage"]
    assert not doctor.failed(checks), [c.line() for c in checks]
    c = by_name(checks)
    assert all(c[n].status == "ok" for n in ("config", "certificate", "key", "store", "grid", "outbound")), checks
    assert "direct mode" in c["outbound"].reason
    assert "names localhost" in c["certificate"].reason
    assert "CPU" in c["gpu"].reason or "CUDA device" in c["gpu"].reason
    # through the command: one line per check, and --json; exit status 0
    r = vx("node", "doctor", "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines()[:9]] == [x.name for x in checks]
    assert r.stdout.splitlines()[-1].endswith("0 fail")


def test_certificate_close_to_expiry_warns(home):
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=810)  # the certificate runs 825 days
    c = by_name(doctor.diagnose(home, gpu=False, now=soon))["certificate"]
    assert c.status == "warn" and "expires in" in c.reason


def test_expired_certificate_fails(pki, home):
    _install(home, *_expired_cert(pki[1]))
    checks = doctor.diagnose(home, gpu=False)
    c = by_name(checks)
    assert c["certificate"].status == "fail" and "expired" in c["certificate"].reason
    assert c["key"].status == "ok"  # the key still matches: only the named check fails


def test_foreign_certificate_fails(pki, home, tmp_path):
    other = create_ca(tmp_path / "other-ca", common_name="someone else's CA")
    foreign = issue_certificate(other, tmp_path / "other", "node-a", ["localhost"])
    shutil.copyfile(foreign.cert, Home(home).tls / "server.crt")
    shutil.copyfile(foreign.key, Home(home).tls / "server.key")
    c = by_name(doctor.diagnose(home, gpu=False))["certificate"]
    assert c.status == "fail" and "foreign certificate" in c.reason


def test_certificate_for_another_host_fails(pki, home):
    h = Home(home)
    cfg = h.load()
    cfg.public_url = "https://node-a.hospital.org:8443"
    h.save(cfg)
    c = by_name(doctor.diagnose(home, gpu=False))["certificate"]
    assert c.status == "fail" and "'node-a.hospital.org'" in c.reason and "localhost" in c.reason


def test_key_mode_and_mismatch_fail(pki, home):
    key = Home(home).tls / "server.key"
    os.chmod(key, 0o644)
    c = by_name(doctor.diagnose(home, gpu=False))["key"]
    assert c.status == "fail" and "0644" in c.reason and "0600" in c.reason
    other = ec.generate_private_key(ec.SECP256R1())
    key.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    os.chmod(key, 0o600)
    c = by_name(doctor.diagnose(home, gpu=False))["key"]
    assert c.status == "fail" and "not the private key" in c.reason


def test_corrupt_store_fails(home):
    db = Home(home).db_file
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    c = by_name(doctor.diagnose(home, gpu=False))["store"]
    assert c.status == "fail" and "node.db" in c.reason


def test_unreachable_grid_fails_and_exits_nonzero(home, tmp_path):
    token = tmp_path / "grid.token"
    token.write_text("vxg_" + "x" * 40)
    admin.set_grid(home, f"https://127.0.0.1:{free_port()}", token)  # nothing listens there
    c = by_name(doctor.diagnose(home, gpu=False, timeout=2))["grid"]
    assert c.status == "fail" and "unreachable" in c.reason
    r = vx("node", "doctor", "--home", home, "--json", "--timeout", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert [x["name"] for x in out["checks"] if x["status"] == "fail"] == ["grid"]


def test_missing_home_fails(tmp_path):
    checks = doctor.diagnose(tmp_path / "nowhere")
    assert doctor.failed(checks) and checks[0].name == "config"
