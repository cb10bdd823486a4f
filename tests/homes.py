"""Test support: a node home with one registered dataset, and waiting for a job from outside."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore, VolumeRecord

#: Two train volumes and one val volume (paths never read: the tests stand in for the executor).
VOLUMES = [VolumeRecord(f"c{i}", f"/x/c{i}.nii.gz", None, "nifti", s) for i, s in enumerate(["train", "train", "val"])]


def node_home(tmp_path: Path, volumes=VOLUMES, scientists=(), policy: str = "open") -> Home:
    """A node home under ``tmp_path`` (own CA and certificate) with dataset 'ct' (#ct, label 1 = pancreas)
    under ``policy``."""
    from voxgrid.pki import create_ca, issue_certificate

    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "node-a", ["127.0.0.1"])
    admin.init_home("node", tmp_path / "home", "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    store = NodeStore(Home(tmp_path / "home").db_file)
    store.add_dataset("ct", description="", tags=["#ct"], modality="CT", label_names={1: "pancreas"},
                      volumes=list(volumes), policy=policy)
    for name in scientists:
        store.add_token(name, "scientist")
    store.close()
    return Home(tmp_path / "home")


def cube_volumes(folder: Path) -> list[VolumeRecord]:
    """Three 16^3 NIfTI volumes with a labelled cube under ``folder``: two train, one val."""
    import nibabel as nib
    import numpy as np

    folder.mkdir()
    out = []
    for i, split in enumerate(["train", "train", "val"]):
        image = np.random.default_rng(i).normal(0, 20, (16, 16, 16)).astype(np.float32)
        label = np.zeros((16, 16, 16), np.uint8)
        image[4:10, 4:10, 4:10] += 200
        label[4:10, 4:10, 4:10] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"c{i}-label.nii.gz")
        out.append(VolumeRecord(f"c{i}", str(folder / f"c{i}.nii.gz"), str(folder / f"c{i}-label.nii.gz"), "nifti",
                                split))
    return out


def wait_job(client, job_id: str, timeout: float = 180, poll: float = 10):
    """The job's status once it is done or failed (long-polls ``client``, a NodeClient)."""
    deadline = time.monotonic() + timeout
    st = client.job(job_id)
    while st.state in ("queued", "running"):
        assert time.monotonic() < deadline, st
        st = client.job(job_id, wait=poll)
    return st


@contextmanager
def serving(home: Path, log_file: Path, args=()):
    """A real ``voxgrid node start`` process for ``home`` on a free port (``args``: more start options); yields
    (url, ca); stopped after. Its run file (``Home(home).run_file``) names its owner console, if it has one."""
    log = open(log_file, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "voxgrid", "node", "start", "--home", str(home), "--port", "0",
                             "--host", "127.0.0.1", *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    run = Home(home).run_file
    deadline = time.monotonic() + 90
    while not run.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
        time.sleep(0.05)
    try:
        yield json.loads(run.read_text())["url"], Home(home).tls / "ca.crt"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
