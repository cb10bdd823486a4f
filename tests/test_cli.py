"""The hospital side as an IT person scripts it: every step through the ``voxgrid`` command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import voxgrid
from voxgrid.datasets import default_sites, write_site
from voxgrid.nodes.local.federation import free_port


def vx(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "voxgrid", *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"voxgrid {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """CA, certificates, one node home and phantom data (NIfTI and DICOM) written through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    vx("ca", "init", "--out", root / "ca")
    vx("ca", "issue", "--ca-dir", root / "ca", "--name", "node-a", "--host", "127.0.0.1", "--host", "localhost",
       "--out", root / "certs")
    vx("ca", "issue", "--ca-dir", root / "ca", "--name", "grid", "--host", "127.0.0.1", "--out", root / "certs")
    vx("node", "init", "--home", root / "home", "--name", "node-a", "--ca", root / "ca" / "ca.crt",
       "--cert", root / "certs" / "node-a.crt", "--key", root / "certs" / "node-a.key", "--port", free_port(),
       "--threads", "1")
    spec = default_sites(2, (32, 32, 32), 4)[1]
    write_site(spec, root / "nifti", fmt="nifti")
    write_site(spec, root / "dicom", fmt="dicom")
    return root


def test_node_home_is_private_and_not_overwritten(site):
    home = site / "home"
    assert (home / "owner.token").stat().st_mode & 0o777 == 0o600
    assert (home / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    r = vx("node", "init", "--home", home, "--name", "node-a", "--ca", site / "ca" / "ca.crt", "--cert",
           site / "certs" / "node-a.crt", "--key", site / "certs" / "node-a.key", check=False)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert (home / "node.db").stat().st_size > 0


def test_add_datasets_from_nifti_and_dicom(site):
    home = site / "home"
    out = json.loads(vx("node", "dataset", "add", "--home", home, "--name", "pancreas-nii", "--images",
                        site / "nifti" / "images", "--labels", site / "nifti" / "labels", "--tags", "CT,#pancreas",
                        "--label-names", "1=pancreas,2=tumor", "--splits", "0.5,0.25,0.25").stdout)
    assert out == {"name": "pancreas-nii", "volumes": 4, "tags": ["#ct", "#pancreas"],
                   "splits": {"train": 2, "val": 1, "test": 1}}
    vx("node", "dataset", "add", "--home", home, "--name", "pancreas-dcm", "--images", site / "dicom" / "images",
       "--labels", site / "dicom" / "labels", "--tags", "ct,pancreas,dicom", "--label-names", "1=pancreas,2=tumor")
    listed = [json.loads(line) for line in vx("node", "dataset", "list", "--home", home).stdout.splitlines()]
    assert [d["name"] for d in listed] == ["pancreas-dcm", "pancreas-nii"]
    assert all(d["label_names"] == ["background", "pancreas", "tumor"] for d in listed)
    text = json.dumps(listed)
    assert str(site) not in text and "PHANTOM^" not in text


@pytest.mark.parametrize("args, message", [
    (["--label-names", "pancreas"], "not of the form VALUE=NAME"),
    (["--label-names", "1=pancreas", "--tags", "no spaces"], "malformed tag"),
    (["--label-names", "1=pancreas"], "does not name"),  # the label maps also hold 2 (tumor)
    (["--label-names", "1=pancreas,2=tumor", "--splits", "1,x,0"], "comma-separated numbers"),
])
def test_bad_dataset_input_is_refused_clearly(site, args, message):
    base = ["node", "dataset", "add", "--home", site / "home", "--name", "bad", "--images",
            site / "nifti" / "images", "--labels", site / "nifti" / "labels", "--tags", "ct"]
    r = vx(*base, *args, check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_volume_is_named_and_nothing_stored_is_lost(site, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for f in (site / "nifti" / "images").iterdir():
        (images / f.name).write_bytes(f.read_bytes())
    broken = sorted(images.iterdir())[1]
    broken.write_bytes(b"not a nifti file")
    r = vx("node", "dataset", "add", "--home", site / "home", "--name", "pancreas-nii", "--replace", "--images",
           images, "--labels", site / "nifti" / "labels", "--tags", "ct", "--label-names", "1=pancreas,2=tumor",
           check=False)
    assert r.returncode == 2 and broken.name.split(".")[0] in r.stderr
    listed = [json.loads(line) for line in vx("node", "dataset", "list", "--home", site / "home").stdout.splitlines()]
    assert {d["name"]: d["volumes"] for d in listed}["pancreas-nii"] == 4  # the earlier registration is intact


def test_tokens_issued_and_imported(site, tmp_path):
    token = vx("node", "token", "issue", "--home", site / "home", "--name", "alice").stdout.strip()
    assert token.startswith("vxg_") and len(token) > 40
    own = tmp_path / "bob.token"
    own.write_text("vxg_" + "b" * 40)
    vx("node", "token", "issue", "--home", site / "home", "--name", "bob", "--token-file", own)
    assert own.read_text().strip() == "vxg_" + "b" * 40  # an existing token is authorised, not replaced
    r = vx("node", "token", "issue", "--home", site / "home", "--name", "eve", "--role", "god", check=False)
    assert r.returncode == 2 and "role 'god'" in r.stderr


def test_scripted_grid_and_node_start_register_and_serve(site, tmp_path):
    """The whole hospital-side script: grid init/start, node grid token, node start, search from a notebook."""
    ca, certs = site / "ca" / "ca.crt", site / "certs"
    gport = free_port()
    vx("grid", "init", "--home", tmp_path / "grid", "--name", "grid", "--ca", ca, "--cert", certs / "grid.crt",
       "--key", certs / "grid.key", "--port", gport)
    vx("grid", "token", "issue", "--home", tmp_path / "grid", "--name", "node-a", "--role", "node", "--token-file",
       tmp_path / "node-a.grid.token")
    sci = tmp_path / "sci.token"
    vx("grid", "token", "issue", "--home", tmp_path / "grid", "--name", "carol", "--token-file", sci)
    vx("node", "token", "issue", "--home", site / "home", "--name", "carol", "--token-file", sci)
    procs = []
    try:
        for kind, home in (("grid", tmp_path / "grid"), ("node", site / "home")):
            if kind == "node":
                vx("node", "register", "--home", home, "--grid", f"https://127.0.0.1:{gport}", "--grid-token-file",
                   tmp_path / "node-a.grid.token", check=False)  # sets the grid; the node is not running yet
            procs.append(subprocess.Popen([sys.executable, "-m", "voxgrid", kind, "start", "--home", str(home)],
                                          env=dict(os.environ, VOXGRID_HEARTBEAT_S="1"),
                                          stdout=open(tmp_path / f"{kind}.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
            deadline = time.monotonic() + 60
            while not (home / "run.json").exists():
                assert time.monotonic() < deadline and procs[-1].poll() is None, f"{kind} did not start"
                time.sleep(0.05)
        status = json.loads(vx("node", "status", "--home", site / "home").stdout)
        assert status["status"] == "ok" and status["name"] == "node-a"
        grid = voxgrid.connect(f"https://127.0.0.1:{gport}", token=sci, ca=ca)
        deadline = time.monotonic() + 30
        while len(grid.search("#pancreas")) < 2:
            assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.1)
        assert sorted(p.name for p in grid.search("#dicom")) == ["pancreas-dcm"]
        # A dataset added while the node runs reaches the grid with the node's next heartbeat.
        vx("node", "dataset", "add", "--home", site / "home", "--name", "late", "--images", site / "nifti" / "images",
           "--labels", site / "nifti" / "labels", "--tags", "ct,late", "--label-names", "1=pancreas,2=tumor")
        deadline = time.monotonic() + 30
        while not grid.search("#late"):
            assert time.monotonic() < deadline, "the grid never learned of the new dataset"
            time.sleep(0.2)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
    assert not (site / "home" / "run.json").exists()  # a clean stop removes it
