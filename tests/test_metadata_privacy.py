"""Invariant 1 at a real node: DICOM headers full of PHI stay on the node.

A node registers DICOM series whose headers carry distinctive PatientName, PatientID, BirthDate,
AccessionNumber, InstitutionName, dates and UIDs, in folders named after the patient, and runs a
DP training job on them (real node and grid processes over TLS). Every reply a scientist can get
(info, datasets, dataset, job status, errors of bad requests and of a failing job, the update's
bytes), the grid's search results and node list, the audit log as the owner API sends it, and the
privacy report (HTML and JSON) must hold none of those values, nor any path.
"""

import json
import shutil
import time

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from voxgrid.datasets import (
    default_sites,
    make_phantom,
    write_dicom_series,
    write_nifti,
)
from voxgrid.nodes.ops import admin
from voxgrid.nodes.local.federation import LocalFederation

import voxgrid
from voxgrid.client import grid_credential
from voxgrid import tensors
from voxgrid.cli import main as cli_main
from voxgrid.pki import client_ssl_context
from voxgrid.plan import initial_weights
from voxgrid.wire import JobRequest

pytestmark = pytest.mark.slow

PATIENT = {"patient_name": "QUIXOTE^ZELDINA^M", "patient_id": "QX-PID-884422", "birth_date": "19310417",
           "accession_number": "QXACC99317", "institution_name": "Quixotic Memorial Infirmary",
           "study_date": "20190923"}
FOLDER = "QX-PID-884422-zeldina"  # sites name folders after patients: the case id is PHI too
GAUSS = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 8.0, "delta": 1e-5}


def _write_phi_site(root):
    """Three DICOM series with PHI and their label maps; returns the PHI strings (UIDs read back)."""
    site = default_sites(n_sites=2, shape=(32, 32, 32), n_volumes=3)[1]
    phi = set(PATIENT.values()) | {FOLDER, "QUIXOTE", "ZELDINA", "Quixotic"}
    for i in range(3):
        vol = make_phantom(site, i)
        case = f"{FOLDER}-{i}"
        series = write_dicom_series(root / "images" / case, vol.image, vol.affine, **PATIENT,
                                    series_description=f"ABD QX-PID-884422 series {i}",
                                    study_instance_uid=generate_uid(), series_instance_uid=generate_uid())
        write_nifti(root / "labels" / f"{case}.nii.gz", vol.label, vol.affine)
        for f in sorted(series.glob("*.dcm")):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert str(ds.PatientName) == PATIENT["patient_name"]  # the PHI really is in the files
            phi |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID, f.name}
    return phi


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    fed = LocalFederation.create(root, default_sites(n_sites=1, shape=(32, 32, 32), n_volumes=2))
    phi = _write_phi_site(root / "phi")
    home = fed.nodes[0].home
    admin.add_dataset(home, "phi-ct", root / "phi" / "images", root / "phi" / "labels", policy="open", tags=["ct", "phi"],
                      label_names={1: "pancreas", 2: "tumor"}, splits=(0.34, 0.33, 0.33))
    shutil.copytree(root / "phi", root / "damaged")
    admin.add_dataset(home, "phi-damaged", root / "damaged" / "images", root / "damaged" / "labels",
                      policy="open", tags=["ct", "damaged"], label_names={1: "pancreas", 2: "tumor"}, splits=(0.34, 0.33, 0.33))
    for f in sorted((root / "damaged" / "images").rglob("*.dcm"))[::5]:
        f.write_bytes(f.read_bytes()[:400])  # a failing disk after registration
    admin.set_budget(home, "phi-ct", 50.0, 1e-4)
    fed.phi = phi
    fed.start()
    yield fed
    fed.stop()


def _plan(privacy=None):
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(4, 8),
                             strides=(2,), num_res_units=0, local_epochs=1, steps_per_epoch=1, privacy=privacy)


def _assert_clean(fed, texts, what):
    text = "\n".join(t if isinstance(t, str) else t.decode("latin-1") for t in texts)
    assert len(text) > 200, f"{what}: too little to check ({len(text)} characters)"
    leaks = sorted(s for s in fed.phi if s in text)
    assert not leaks, f"{what} leaks {leaks}"
    for marker in (str(fed.root), ".dcm", ".nii", "/images/", "/labels/"):
        assert marker not in text, f"{what} leaks a path ({marker!r})"


def _run_job(client, pl, dataset):
    ref = client.put_weights(tensors.dumps(initial_weights(pl)))
    st = client.submit(JobRequest(kind="train", experiment_id="phi", round=0, dataset=dataset,
                                  plan=pl.model_dump(mode="json"), plan_hash=pl.content_hash,
                                  weights_id=ref.weights_id, evaluate=True))
    deadline = time.monotonic() + 180
    while st.state in ("queued", "running"):
        assert time.monotonic() < deadline, st
        st = client.job(st.job_id, wait=10)
    return st


def test_no_phi_in_any_reply_grid_entry_audit_line_or_report(fed, tmp_path):
    node = fed.nodes[0]
    ctx = client_ssl_context(fed.ca_cert)
    sci = httpx.Client(base_url=node.url + "/v1", verify=ctx, timeout=60,
                       headers={"Authorization": f"Bearer {fed.scientist_token}"})
    owner = httpx.Client(base_url=node.url + "/v1", verify=ctx, timeout=60,
                         headers={"Authorization": f"Bearer {fed.owner_token(0)}"})
    grid = httpx.Client(base_url=fed.grid.url + "/v1", verify=ctx, timeout=60,  # the grid takes the credential
                        headers={"Authorization": f"Bearer {grid_credential(fed.scientist_token)}"})
    seen: list = []

    def get(client, path, **kw):
        r = client.get(path, **kw)
        seen.append(r.text)
        return r

    # What a scientist reads: node metadata, datasets, and the grid (after the node registered).
    assert get(sci, "/info").status_code == 200
    datasets = get(sci, "/datasets").json()
    assert {d["name"] for d in datasets} >= {"phi-ct", "phi-damaged"}
    info = get(sci, "/datasets/phi-ct").json()
    assert info["volumes"] == 3  # the allowlist is there: counts, shape ranges, label names
    for path in ("/health", "/whoami"):
        assert get(sci, path).status_code == 200
    api = voxgrid.connect(fed.grid.url, token=fed.scientist_token, ca=fed.ca_cert)
    ptr = api.search("#phi")[0]
    seen += [ptr.info.model_dump_json(), repr(ptr)]
    listing = [get(grid, "/search", params={"tag": "phi"}), get(grid, "/nodes")]
    assert all(r.status_code == 200 for r in listing), [r.text for r in listing]
    seen += [r.text for r in listing]

    # Errors of bad requests.
    for path in ("/datasets/nope", "/datasets/phi-ct/data", "/jobs/nope", "/jobs/nope/update"):
        assert get(sci, path).status_code >= 400
    seen.append(sci.post("/jobs", json={"dataset": "phi-ct", "kind": "train"}).text)
    seen.append(sci.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}).text)
    with pytest.raises(voxgrid.AccessRefused) as refused:
        ptr.get()
    seen.append(str(refused.value))
    r = sci.post("/privacy/estimate", json={"dataset": "phi-ct", "privacy": GAUSS, "releases": 2})
    assert r.status_code == 200
    seen.append(r.text)

    # A DP training job on the PHI series: its status and the update's bytes (safetensors header included).
    st = _run_job(ptr.client, _plan(GAUSS), "phi-ct")
    assert st.state == "done", st.error
    seen.append(get(sci, f"/jobs/{st.job_id}").text)
    update = sci.get(f"/jobs/{st.job_id}/update")
    assert update.status_code == 200 and update.content[8:9] == b"{"  # a safetensors header
    seen.append(update.content)
    # A job on series damaged after registration fails with a message, not with the reader's details.
    bad = _run_job(ptr.client, _plan(), "phi-damaged")
    assert bad.state == "failed" and "could not be loaded" in bad.error
    seen.append(get(sci, f"/jobs/{bad.job_id}").text)
    _assert_clean(fed, seen, "the scientist's replies and the grid")

    # The audit log and job list as the owner API sends them, and the ledger.
    audit = [get(owner, "/owner/audit").text, get(owner, "/owner/jobs").text, get(owner, "/owner/ledger").text]
    assert "job.submit" in audit[0]
    _assert_clean(fed, audit, "the owner API's audit log")

    # The privacy report, written with the owner's CLI.
    assert cli_main(["privacy", "report", "--home", str(node.home), "--out", str(tmp_path / "report")]) == 0
    report = [(tmp_path / "report" / n).read_text() for n in ("privacy-report.json", "privacy-report.html")]
    assert "phi-ct" in report[0] and json.loads(report[0])
    _assert_clean(fed, report, "the privacy report")

    # The worker kept its preprocessed volumes on the node, under its home's cache folder.
    assert list((node.home / "cache" / "prepared").glob("*.safetensors"))
    for client in (sci, owner, grid):
        client.close()


def test_phi_stays_visible_to_the_owner_locally(fed):
    """The check above is not vacuous: the values are on the node, where the owner's tools may show them."""
    from voxgrid.datasets import list_series

    folder = next((fed.root / "phi" / "images").iterdir())
    summary = list_series(folder)[0]
    assert "QX-PID-884422" in summary.description and summary.uid in fed.phi
    assert all(v not in json.dumps(summary.public()) for v in fed.phi)
    assert np.isfinite(voxgrid.datasets.read_dicom_series(folder).image).all()
