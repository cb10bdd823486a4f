"""Provisioning from one project file, and starting what it produced: kits, service files, launchers."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voxgrid.client import GridClient
from voxgrid.nodes.local.federation import free_port
from voxgrid.nodes.ops.launchers import write_service_files
from voxgrid.nodes.ops.provision import ProjectError, load_project, provision

VENV_BIN = Path(sys.executable).parent


def vx(*args, env=None):
    return subprocess.run([sys.executable, "-m", "voxgrid", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)


def project(tmp_path, sites=("node-a", "node-b", "node-c"), **extra):
    data = {"federation": "pancreas-study", "grid": {"name": "grid", "host": "127.0.0.1", "port": free_port()},
            "sites": [{"name": s, "host": "127.0.0.1", "port": free_port()} for s in sites], **extra}
    path = tmp_path / "project.json"
    path.write_text(json.dumps(data))
    return path


def test_kits_hold_only_their_own_secrets(tmp_path):
    out = tmp_path / "kits"
    summary = json.loads(vx("provision", "--project", project(tmp_path), "--out", out).stdout)
    assert summary["created"] == ["grid", "node-a", "node-b", "node-c"]
    names = ["grid", "node-a", "node-b", "node-c"]
    for n in names:
        kit = out / n
        assert (kit / "ca.crt").read_bytes() == (out / "ca" / "ca.crt").read_bytes()
        assert {"server.crt", "server.key", "kit.json", "start.sh"} <= {p.name for p in kit.iterdir()}
        assert (kit / "server.key").stat().st_mode & 0o777 == 0o600 and kit.stat().st_mode & 0o777 == 0o700
        assert os.access(kit / "start.sh", os.X_OK)
        meta = json.loads((kit / "kit.json").read_text())
        assert meta["name"] == n and meta["grid_url"] == summary["grid_url"]
    secrets = {"ca": [(out / "ca" / "ca.key").read_text().strip()]}
    for n in names:
        secrets[n] = [(out / n / "server.key").read_text().strip()]
        if n != "grid":
            token = (out / n / "grid.token").read_text().strip()
            assert token.startswith("vxg_") and (out / n / "grid.token").stat().st_mode & 0o777 == 0o600
            secrets[n].append(token)
    # every file of every kit, scanned for every other party's key and token (and the CA key)
    for n in names:
        text = "".join(p.read_text() for p in (out / n).rglob("*") if p.is_file())
        for owner, values in secrets.items():
            if owner != n:
                assert not any(v in text for v in values), f"{owner}'s secret in {n}'s kit"
    assert not list(out.glob("*/ca.key")) or list(out.glob("*/ca.key")) == [out / "ca" / "ca.key"]
    hashes = json.loads((out / "grid" / "node-tokens.json").read_text())
    assert [(h["name"], h["role"]) for h in hashes] == [("node-a", "node"), ("node-b", "node"), ("node-c", "node")]
    # again with one more site: the CA and existing kits stay, the new site gets a kit and a token hash
    before = (out / "node-a" / "server.key").read_bytes()
    again = provision(project(tmp_path, sites=("node-a", "node-b", "node-c", "node-d")), out)
    assert again["created"] == ["node-d"] and again["kept"] == names
    assert (out / "node-a" / "server.key").read_bytes() == before
    assert [h["name"] for h in json.loads((out / "grid" / "node-tokens.json").read_text())][-1] == "node-d"


@pytest.mark.parametrize("change, field", [
    (lambda d: d["sites"][1].update(port=70000), "sites.1.port"),
    (lambda d: d["sites"][0].update(host="not a host!"), "sites.0.host"),
    (lambda d: d.pop("grid"), "grid"),
    (lambda d: d["grid"].update(nmae="x"), "grid.nmae"),
    (lambda d: d["sites"].append(dict(d["sites"][0])), "sites"),
    (lambda d: d["sites"][0].update(name="grid"), "sites"),
])
def test_malformed_project_names_the_field(tmp_path, change, field):
    path = project(tmp_path, sites=("node-a", "node-b"))
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ProjectError, match=r"project\.json: " + re.escape(field) + r"\b"):
        load_project(path)


def test_malformed_project_cli_error(tmp_path):
    path = tmp_path / "project.json"
    path.write_text('{"federation": "x", "grid": {"name": "grid", "host": "127.0.0.1", "port": 1}, "sites": []}')
    r = vx("provision", "--project", path, "--out", tmp_path / "kits")
    assert r.returncode == 2 and "sites" in r.stderr and "project.json" in r.stderr
    assert not (tmp_path / "kits").exists()


def test_service_unit_structure(tmp_path):
    out = tmp_path / "kits"
    provision(project(tmp_path, sites=("node-a",)), out)
    from voxgrid.nodes.ops import admin

    kit = out / "node-a"
    admin.init_home("node", tmp_path / "home", "node-a", ca_cert=kit / "ca.crt", cert=kit / "server.crt",
                    key=kit / "server.key")
    unit, launcher = write_service_files(tmp_path / "home", tmp_path / "svc", user="voxgrid")
    assert unit.name == "voxgrid-node-node-a.service"
    text = unit.read_text()
    service = text.split("[Service]")[1].split("[Install]")[0]
    lines = dict(line.split("=", 1) for line in service.strip().splitlines())
    assert lines["ExecStart"] == f'"{VENV_BIN / "voxgrid"}" "node" "start" "--home" "{tmp_path / "home"}"'
    assert lines["Restart"] == "on-failure" and lines["User"] == "voxgrid" and lines["KillSignal"] == "SIGTERM"
    assert "[Unit]" in text and "WantedBy=multi-user.target" in text
    if shutil.which("systemd-analyze"):  # verify the unit for real where systemd's tools are installed
        r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and unit.name not in r.stderr, r.stderr  # warnings name the file
    assert launcher.read_text().startswith("#!/bin/sh") and os.access(launcher, os.X_OK)


def _wait_file(path, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} not written in {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_kits_start_a_federation_and_the_launcher_runs_a_node(tmp_path):
    """start.sh of the grid and of node-a bring them up (node-a registers with its provisioned token);
    node-b, its home made from its kit, runs through the generated shell launcher. SIGTERM stops both."""
    out = tmp_path / "kits"
    provision(project(tmp_path, sites=("node-a", "node-b")), out)
    env = dict(os.environ, VOXGRID=str(VENV_BIN / "voxgrid"), VOXGRID_LISTEN="127.0.0.1", OMP_NUM_THREADS="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def launch(cmd, name):
        with open(logs / f"{name}.log", "ab") as log:
            p = subprocess.Popen([str(cmd)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    from voxgrid.nodes.ops import admin

    kit_b, home_a, home_b = out / "node-b", out / "node-a" / "home", tmp_path / "srv" / "node-b"
    admin.init_home("node", home_b, "node-b", ca_cert=kit_b / "ca.crt", cert=kit_b / "server.crt",
                    key=kit_b / "server.key", port=json.loads((kit_b / "kit.json").read_text())["port"])
    _, launcher = write_service_files(home_b, tmp_path / "svc")
    try:
        grid = launch(out / "grid" / "start.sh", "grid")
        node_a = launch(out / "node-a" / "start.sh", "node-a")  # retries registering until the grid is up
        node_b = launch(launcher, "node-b")
        for home, proc in ((out / "grid" / "home", grid), (home_a, node_a), (home_b, node_b)):
            _wait_file(home / "run.json", proc)
        assert json.loads((home_b / "run.json").read_text())["pid"] == node_b.pid  # exec: the launcher is the node
        status = vx("node", "status", "--home", home_b, env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["name"] == "node-b", status.stderr
        owner = (out / "grid" / "home" / "owner.token").read_text().strip()
        with GridClient(json.loads((out / "grid" / "home" / "run.json").read_text())["url"], owner,
                        out / "grid" / "ca.crt") as g:
            deadline = time.monotonic() + 30
            while "node-a" not in {n.name for n in g.nodes()}:
                assert time.monotonic() < deadline, "node-a did not register with the grid"
                time.sleep(0.2)
        r = vx("node", "doctor", "--home", home_a, "--json", env=env)
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert r.returncode == 0 and checks["grid"]["status"] == "ok", r.stdout
        for p in (node_a, node_b):
            p.send_signal(signal.SIGTERM)
        assert [p.wait(timeout=30) for p in (node_a, node_b)] == [0, 0]
        assert not (home_a / "run.json").exists() and not (home_b / "run.json").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_an_outbound_site_kit_creates_a_node_that_dials_out_through_the_sites_proxy(tmp_path):
    path = project(tmp_path, sites=("node-a", "node-b"))
    data = json.loads(path.read_text())
    data["sites"][1].update(host="node-b.hospital-b.internal", port=443, connect="outbound")
    path.write_text(json.dumps(data))
    out = tmp_path / "kits"
    provision(path, out)
    kit = out / "node-b"
    assert json.loads((kit / "kit.json").read_text())["connect"] == "outbound"
    assert "--connect outbound" in (kit / "start.sh").read_text()
    assert "--connect" not in (out / "node-a" / "start.sh").read_text()
    (tmp_path / "proxy.cred").write_text("site-b:s3cret\n")
    # VOXGRID: the real command for 'init', a no-op for 'start' (serving is tested elsewhere)
    wrapper = tmp_path / "vx.sh"
    wrapper.write_text(f'#!/bin/sh\nif [ "$2" = start ]; then exit 0; fi\nexec {sys.executable} -m voxgrid "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, VOXGRID=str(wrapper), VOXGRID_HOME=str(tmp_path / "home"),
               VOXGRID_PROXY="http://proxy.hospital-b.internal:3128", VOXGRID_PROXY_CREDENTIALS=str(tmp_path / "proxy.cred"))
    r = subprocess.run(["sh", str(kit / "start.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "home" / "node.json").read_text())
    assert cfg["connect"] == "outbound" and cfg["proxy"] == "http://proxy.hospital-b.internal:3128"
    assert cfg["public_url"] == "https://node-b.hospital-b.internal:443"
    assert (tmp_path / "home" / cfg["proxy_credentials_file"]).read_text().strip() == "site-b:s3cret"
    assert (tmp_path / "home" / cfg["proxy_credentials_file"]).stat().st_mode & 0o777 == 0o600
