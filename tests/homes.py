"""Test support: a node home with one registered dataset, and waiting for a job from outside."""

import time
from pathlib import Path

from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore, VolumeRecord

#: Two train volumes and one val volume (paths never read: the tests stand in for the executor).
VOLUMES = [VolumeRecord(f"c{i}", f"/x/c{i}.nii.gz", None, "nifti", s) for i, s in enumerate(["train", "train", "val"])]


def node_home(tmp_path: Path, volumes=VOLUMES, scientists=()) -> Home:
    """A node home under ``tmp_path`` (own CA and certificate) with dataset 'ct' (#ct, label 1 = pancreas)."""
    from voxgrid.pki import create_ca, issue_certificate

    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "node-a", ["127.0.0.1"])
    admin.init_home("node", tmp_path / "home", "node-a", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    store = NodeStore(Home(tmp_path / "home").db_file)
    store.add_dataset("ct", description="", tags=["#ct"], modality="CT", label_names={1: "pancreas"},
                      volumes=list(volumes))
    for name in scientists:
        store.add_token(name, "scientist")
    store.close()
    return Home(tmp_path / "home")


def wait_job(client, job_id: str, timeout: float = 180, poll: float = 10):
    """The job's status once it is done or failed (long-polls ``client``, a NodeClient)."""
    deadline = time.monotonic() + timeout
    st = client.job(job_id)
    while st.state in ("queued", "running"):
        assert time.monotonic() < deadline, st
        st = client.job(job_id, wait=poll)
    return st
