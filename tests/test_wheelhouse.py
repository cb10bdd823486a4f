"""Offline installation, for real: build the wheelhouse, then install it into a fresh virtual environment
inside a network namespace with no route out (``unshare -n``) and run the node's health check there."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voxgrid.nodes.ops import admin
from voxgrid.pki import create_ca, issue_certificate

ROOT = Path(__file__).resolve().parents[1]


def _netns_works() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot create a network namespace: {r.stderr.strip()}"


def offline_env() -> dict:
    """pip with no configuration (no index, no find-links of this machine): only the wheelhouse counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # .pyc files are written on first import instead of at install time (faster here)
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_NO_COMPILE": "1"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_install_in_a_namespace_without_network_runs_the_doctor(tmp_path):
    why = _netns_works()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    wheelhouse = tmp_path / "wheelhouse"
    r = subprocess.run([sys.executable, "-m", "voxgrid", "wheelhouse", "--out", str(wheelhouse)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    names = [p.name for p in wheelhouse.glob("*.whl")]
    assert any(n.startswith("voxgrid-0") for n in names) and any(n.startswith("torch-2.13.0") for n in names)
    assert not any(n.startswith("nvidia") for n in names), "the CPU build of torch needs no CUDA wheels"
    t_build = time.monotonic() - t0

    # no route out in the namespace (loopback exists but is down)
    assert subprocess.run(["unshare", "-n", "ip", "route", "show"], capture_output=True, text=True).stdout == ""
    venv = tmp_path / "site-venv"
    r = subprocess.run(["unshare", "-n", "bash", str(ROOT / "scripts" / "install.sh"), str(venv)], cwd=tmp_path,
                       env=offline_env() | {"VOXGRID_WHEELHOUSE": str(wheelhouse)}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "voxgrid 0.1.0 torch 2.13.0" in r.stdout
    t_install = time.monotonic() - t0 - t_build

    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "node-a", ["127.0.0.1", "localhost"])
    admin.init_home("node", tmp_path / "home", "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    r = subprocess.run(["unshare", "-n", str(venv / "bin" / "voxgrid"), "node", "doctor", "--home",
                        str(tmp_path / "home"), "--json"], cwd=tmp_path, env=offline_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["name"]: c["status"] for c in json.loads(r.stdout)["checks"]}
    assert checks["gpu"] == "ok" and checks["store"] == "ok" and checks["certificate"] == "ok"
    print(f"wheelhouse: {len(names)} wheels built in {t_build:.0f} s, offline install {t_install:.0f} s")
