"""`voxgrid node dataset add --pacs`: a dataset built straight from a real Orthanc (the fixture of test_pacs.py),
through the command an IT person runs."""
import json
import shutil
import sqlite3

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_cli import vx  # the `voxgrid` command as a subprocess
from test_pacs import OUR_AE, PASSWORD, USER, Orthanc, _free_port  # skips here too without Orthanc

import voxgrid
from voxgrid.datasets import SiteSpec, VolumeSource, load_volume, series_case_id, write_site
from voxgrid.nodes.local.federation import free_port
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore

pytestmark = pytest.mark.slow

SITE = SiteSpec(name="pacsnode", n_volumes=3, labels={1: "pancreas"}, shape=(16, 16, 12), seed=11)
N_IMAGES = SITE.n_volumes * SITE.shape[2]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node home made through the CLI, phantom series uploaded to Orthanc (plus a one-slice scout series
    the series rules skip), and NIfTI label maps named by the case ids the node will give the series."""
    root = tmp_path_factory.mktemp("node-pacs")
    vx("ca", "init", "--out", root / "ca")
    vx("ca", "issue", "--ca-dir", root / "ca", "--name", "node-a", "--host", "127.0.0.1", "--out", root / "certs")
    vx("node", "init", "--home", root / "home", "--name", "node-a", "--ca", root / "ca" / "ca.crt",
       "--cert", root / "certs" / "node-a.crt", "--key", root / "certs" / "node-a.key", "--port", free_port(),
       "--threads", "1")
    write_site(SITE, root / "site", fmt="dicom")
    (root / "labels").mkdir()
    secrets = {"PHANTOM", "PH-", PASSWORD}  # PASSWORD; the fake PHI of the phantoms starts with PH
    for case in sorted((root / "site" / "images").iterdir()):
        ds = pydicom.dcmread(next(case.glob("*.dcm")), stop_before_pixels=True)
        secrets |= {str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientName), str(ds.PatientID)}
        shutil.copy(root / "site" / "labels" / f"{case.name}.nii.gz",
                    root / "labels" / f"{series_case_id(str(ds.SeriesInstanceUID))}.nii.gz")
    scout = pydicom.dcmread(next((root / "site" / "images").iterdir()).glob("*.dcm").__next__())
    scout.SeriesInstanceUID, scout.SOPInstanceUID = generate_uid(), generate_uid()
    scout.file_meta.MediaStorageSOPInstanceUID = scout.SOPInstanceUID
    scout.SeriesDescription, scout.SeriesNumber = "Scout", 99
    (root / "scout").mkdir()
    scout.save_as(root / "scout" / "scout.dcm")
    (root / "pacs.pw").write_text(PASSWORD + "\n")
    server = Orthanc(tmp_path_factory.mktemp("orthanc-node"))
    try:
        assert server.upload(root / "site" / "images") + server.upload(root / "scout") == N_IMAGES + 1
        yield {"root": root, "home": root / "home", "orthanc": server, "secrets": secrets}
    finally:
        server.stop()


def _add(node, *extra, name="abdomen", check=True, source=None):
    source = source or f"dicomweb+http://127.0.0.1:{node['orthanc'].http_port}/dicom-web"
    return vx("node", "dataset", "add", "--home", node["home"], "--name", name, "--pacs", source,
              "--pacs-user", USER, "--pacs-password-file", node["root"] / "pacs.pw", "--modality", "CT",
              "--since", "20000101", "--tags", "ct,pancreas,pacs", "--label-names", "1=pancreas", *extra,
              check=check)


def _listed(node) -> dict:
    out = vx("node", "dataset", "list", "--home", node["home"]).stdout
    return {d["name"]: d for d in map(json.loads, out.splitlines())}


def _no_phi(node, text: str):
    for secret in node["secrets"]:
        assert secret not in text, f"{secret!r} leaked"
    assert "1.2." not in text and "Scout" not in text


def test_without_labels_pulls_but_registers_nothing(node):
    r = _add(node, check=False)
    assert r.returncode == 2 and "not registered" in r.stderr and "--labels" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    _no_phi(node, r.stdout + r.stderr)
    assert r.stderr.count("series-") == SITE.n_volumes  # the case ids to annotate, the scout not among them
    assert _listed(node) == {}
    assert len(list((node["home"] / "cache" / "pacs" / "abdomen").rglob("*.dcm"))) == N_IMAGES + 1


def test_add_from_pacs_then_replace_downloads_nothing(node):
    r = _add(node, "--labels", node["root"] / "labels")
    _no_phi(node, r.stdout + r.stderr)
    out = json.loads(r.stdout)
    assert out["volumes"] == SITE.n_volumes and out["splits"] == {"train": 1, "val": 1, "test": 1}
    assert out["series"]["found"] == SITE.n_volumes + 1 and out["series"]["accepted"] == SITE.n_volumes
    (scout,) = out["series"]["skipped"]
    assert scout["slices"] == 1 and scout["skipped"]
    # The earlier run without labels already pulled everything: resumed, not fetched again.
    assert out["pull"]["series"] == SITE.n_volumes + 1 and out["pull"]["taken"] == 0
    assert out["pull"]["skipped"] == N_IMAGES + 1

    listed = _listed(node)
    assert listed["abdomen"]["volumes"] == SITE.n_volumes and listed["abdomen"]["modality"] == "CT"
    assert listed["abdomen"]["label_names"] == ["background", "pancreas"]
    _no_phi(node, json.dumps(listed))

    again = _add(node, "--labels", node["root"] / "labels", "--replace")
    out2 = json.loads(again.stdout)
    assert (out2["pull"]["taken"], out2["pull"]["skipped"]) == (0, N_IMAGES + 1)
    assert out2["volumes"] == SITE.n_volumes

    # Each volume keeps its series UID; training's prepare() loads them as the executor hands them over.
    store = NodeStore(Home(node["home"], "node").db_file)
    try:
        ds = store.dataset("abdomen")
    finally:
        store.close()
    assert all(v.series_uid and v.series_uid in node["secrets"] for v in ds.volumes)
    for v in ds.volumes:
        vol = load_volume(VolumeSource(case_id=v.case_id, image=v.image, label=v.label, kind=v.kind,
                                       series_uid=v.series_uid))
        assert vol.image.shape == SITE.shape and vol.label is not None and vol.label.max() == 1
    from voxgrid.nodes.worker.training import prepare  # torch: only here

    data = prepare([v.__dict__ for v in ds.volumes], ds.label_names, voxgrid.unet_plan(["background", "pancreas"]))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 1, "val": 1, "test": 1}


def test_add_from_dimse(node):
    r = vx("node", "dataset", "add", "--home", node["home"], "--name", "abdomen-dimse", "--pacs",
           f"dimse://ORTHANC@127.0.0.1:{node['orthanc'].dicom_port}", "--calling-ae", OUR_AE, "--modality", "CT",
           "--min-slices", "2", "--labels", node["root"] / "labels", "--tags", "ct", "--label-names", "1=pancreas")
    _no_phi(node, r.stdout + r.stderr)
    out = json.loads(r.stdout)
    assert out["volumes"] == SITE.n_volumes and out["pull"]["protocol"] == "dimse"
    assert (out["pull"]["taken"], out["pull"]["skipped"]) == (N_IMAGES + 1, 0)  # its own cache folder


def test_pacs_down_is_exit_2_and_leaves_datasets_intact(node):
    before = _listed(node)
    assert "abdomen" in before
    dead = f"dicomweb+http://127.0.0.1:{_free_port()}/dicom-web"
    r = _add(node, "--labels", node["root"] / "labels", "--replace", source=dead, check=False)
    assert r.returncode == 2 and "PACS pull failed" in r.stderr and "not reachable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _listed(node) == before


@pytest.mark.parametrize("source, message", [
    ("dicomweb+http://pacs.example.org/dicom-web", "plain HTTP is only accepted"),
    ("ftp://pacs/dicom-web", "must start with"),
    ("dimse://pacs.example.org:104", "dimse://CALLEDAE@host:port"),
])
def test_bad_source_is_refused_before_any_pull(node, source, message):
    r = _add(node, "--labels", node["root"] / "labels", name="bad", source=source, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_images_and_pacs_are_exclusive(node):
    r = _add(node, "--images", node["root"] / "site" / "images", check=False)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_old_node_db_gains_series_uid(tmp_path):
    db = tmp_path / "node.db"
    with sqlite3.connect(db) as c:  # the volumes table as the first release made it
        c.execute("CREATE TABLE datasets (name TEXT PRIMARY KEY, description TEXT NOT NULL, tags TEXT NOT NULL, "
                  "modality TEXT NOT NULL, label_names TEXT NOT NULL, created_at TEXT NOT NULL)")
        c.execute("CREATE TABLE volumes (dataset TEXT NOT NULL, case_id TEXT NOT NULL, image TEXT NOT NULL, "
                  "label TEXT, kind TEXT NOT NULL, split TEXT NOT NULL, PRIMARY KEY (dataset, case_id))")
        c.execute("INSERT INTO datasets VALUES ('old', '', '[\"#ct\"]', 'CT', '{\"1\": \"pancreas\"}', 'x')")
        c.execute("INSERT INTO volumes VALUES ('old', 'c0', '/x/c0.nii.gz', '/x/l0.nii.gz', 'nifti', 'train')")
    for _ in range(2):  # the migration runs once and is idempotent
        store = NodeStore(db)
        try:
            (vol,) = store.dataset("old").volumes
            assert (vol.case_id, vol.series_uid, vol.allow_resample) == ("c0", None, False)
        finally:
            store.close()
