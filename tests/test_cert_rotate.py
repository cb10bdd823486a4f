"""Rotating a node's certificate: checked before anything changes, swapped with the old pair kept, served
after a restart."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from cryptography import x509

from voxgrid.cli import main
from voxgrid.nodes.ops import admin, doctor
from voxgrid.nodes.local.federation import free_port
from voxgrid.nodes.service.home import Home
from voxgrid.pki import CertificateError, certificate_info, client_ssl_context, create_ca, issue_certificate

HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture
def site(tmp_path):
    ca = create_ca(tmp_path / "ca")
    old = issue_certificate(ca, tmp_path / "old", "node-a", HOSTS)
    home = tmp_path / "home"
    admin.init_home("node", home, "node-a", ca_cert=ca.cert, cert=old.cert, key=old.key, port=free_port())
    return ca, Home(home, "node")


def _tls_files(home: Home) -> dict:
    return {f.name: f.read_bytes() for f in home.tls.iterdir() if f.is_file()}


def test_rotation_from_a_kit_swaps_the_pair_and_keeps_the_old_one(site, tmp_path):
    ca, home = site
    old_serial = certificate_info(home.tls / "server.crt")["serial"]
    old_key = (home.tls / "server.key").read_bytes()
    kit = tmp_path / "kit"
    new = issue_certificate(ca, kit, "node-a", HOSTS)
    new.cert.rename(kit / "server.crt")
    new.key.rename(kit / "server.key")

    out = admin.rotate_certificate(home.path, bundle=kit)
    assert out["old_serial"] == old_serial and out["serial"] != old_serial
    assert certificate_info(home.tls / "server.crt")["serial"] == out["serial"]
    assert (home.tls / "server.key").read_bytes() == (kit / "server.key").read_bytes()
    assert (home.tls / "server.key").stat().st_mode & 0o777 == 0o600
    backups = sorted((home.tls / "backup").iterdir())
    assert [b.suffix for b in backups] == [".crt", ".key"] and old_serial[:16] in backups[0].name
    assert certificate_info(backups[0])["serial"] == old_serial and backups[1].read_bytes() == old_key
    assert backups[1].stat().st_mode & 0o777 == 0o600
    assert not list(home.tls.glob(".rotate-*")), "the staging folder is removed"
    checks = {c.name: c for c in doctor.diagnose(home.path, gpu=False)}
    assert checks["certificate"].status == "ok" and checks["key"].status == "ok"


def _refused(home, match, **kw):
    before = _tls_files(home)
    with pytest.raises(CertificateError, match=match):
        admin.rotate_certificate(home.path, **kw)
    assert _tls_files(home) == before and not (home.tls / "backup").exists()
    assert not list(home.tls.glob(".rotate-*"))


def test_a_certificate_of_another_ca_a_wrong_key_a_wrong_name_or_host_are_refused(site, tmp_path):
    ca, home = site
    other = create_ca(tmp_path / "other-ca", common_name="someone else's CA")
    foreign = issue_certificate(other, tmp_path / "foreign", "node-a", HOSTS)
    _refused(home, "was not issued by the federation CA", cert=foreign.cert, key=foreign.key)
    good = issue_certificate(ca, tmp_path / "good", "node-a", HOSTS)
    _refused(home, "is not the private key of", cert=good.cert, key=foreign.key)
    wrong_name = issue_certificate(ca, tmp_path / "b", "node-b", HOSTS)
    _refused(home, "issued to 'node-b', not to 'node-a'", cert=wrong_name.cert, key=wrong_name.key)
    elsewhere = issue_certificate(ca, tmp_path / "elsewhere", "node-a", ["node-a.hospital.test"])
    _refused(home, "does not name '127.0.0.1'", cert=elsewhere.cert, key=elsewhere.key)
    _refused(home, "a CA certificate", cert=ca.cert, key=ca.key)  # the federation CA itself
    with pytest.raises(ValueError, match="exactly one of"):
        admin.rotate_certificate(home.path, cert=good.cert, key=good.key, ca_dir=tmp_path / "ca")


def test_cli_issues_from_the_ca_and_the_doctor_warns_before_expiry(site, tmp_path, capsys):
    _, home = site
    other = create_ca(tmp_path / "other-ca")
    foreign = issue_certificate(other, tmp_path / "foreign", "node-a", HOSTS)
    before = _tls_files(home)
    assert main(["node", "cert", "rotate", "--home", str(home.path), "--cert", str(foreign.cert),
                 "--key", str(foreign.key)]) == 2
    assert "was not issued by the federation CA" in capsys.readouterr().err and _tls_files(home) == before

    assert main(["node", "cert", "rotate", "--home", str(home.path), "--ca-dir", str(tmp_path / "ca"),
                 "--days", "10"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["serial"] != out["old_serial"] and sorted(out["sans"]) == sorted(HOSTS)  # the current hosts kept
    c = {c.name: c for c in doctor.diagnose(home.path, gpu=False)}["certificate"]
    assert c.status == "warn" and "expires in 9 days" in c.reason and "cert rotate" in c.reason


def _served_serial(port: int, ca) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client_ssl_context(ca.cert).wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return format(x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number, "x")


def _start(home: Home, log) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "voxgrid", "node", "start", "--home", str(home.path)],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not home.run_file.exists():
        assert p.poll() is None, f"node exited with {p.returncode}"
        assert time.monotonic() < deadline, "node did not start"
        time.sleep(0.05)
    return p


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow
def test_a_restarted_node_serves_the_rotated_certificate(site, tmp_path, capsys):
    ca, home = site
    port = home.load().port
    old_serial = certificate_info(home.tls / "server.crt")["serial"]
    with open(tmp_path / "node.log", "ab") as log:
        p = _start(home, log)
        try:
            assert _served_serial(port, ca) == old_serial
            assert main(["node", "cert", "rotate", "--home", str(home.path), "--ca-dir", str(tmp_path / "ca")]) == 0
            printed = capsys.readouterr().out
            new_serial = json.loads(printed.splitlines()[0])["serial"]
            assert f"running (pid {p.pid})" in printed and "restart it" in printed
            assert _served_serial(port, ca) == old_serial  # until the restart
            _stop(p)
            p = _start(home, log)
            assert _served_serial(port, ca) == new_serial != old_serial
        finally:
            _stop(p)


def test_the_grid_rotates_the_same_way(tmp_path):
    ca = create_ca(tmp_path / "ca")
    old = issue_certificate(ca, tmp_path / "old", "grid", ["grid.federation.test"])
    admin.init_home("grid", tmp_path / "grid", "grid", ca_cert=ca.cert, cert=old.cert, key=old.key,
                    public_url="https://grid.federation.test:8443")
    wrong = issue_certificate(ca, tmp_path / "new", "node-a", ["grid.federation.test"])
    with pytest.raises(CertificateError, match="issued to 'node-a', not to 'grid'"):
        admin.rotate_certificate(tmp_path / "grid", "grid", cert=wrong.cert, key=wrong.key)
    out = admin.rotate_certificate(tmp_path / "grid", "grid", ca_dir=tmp_path / "ca")
    assert out["sans"] == ["grid.federation.test"] and out["running_pid"] is None
    assert [c.status for c in doctor.diagnose(tmp_path / "grid", "grid", gpu=False)][:3] == ["ok", "ok", "ok"]
