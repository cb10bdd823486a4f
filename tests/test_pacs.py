"""PACS pulls against a real Orthanc (Debian's orthanc + orthanc-dicomweb), started per module as a child
process on free loopback ports with HTTP authentication, our AE title registered, storage in a temp dir."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from voxgrid.datasets import SiteSpec, make_phantom, read_dicom_series, scan_folder, write_site
from voxgrid.datasets.pacs import (PacsAuthError, PacsQuery, PacsTransferError, PacsUnavailable, pull_dicomweb,
                                   pull_dimse, series_folder)

pytestmark = pytest.mark.slow

ORTHANC = shutil.which("Orthanc") or shutil.which("orthanc")
if ORTHANC is None:
    pytest.skip("the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)",
                allow_module_level=True)
USER, PASSWORD, OUR_AE = "voxgrid", "s3cret-pw", "VOXGRIDTEST"
SITE = SiteSpec(name="pacs", n_volumes=2, labels={1: "pancreas"}, shape=(16, 16, 12), seed=7)


def _dicomweb_plugin() -> str:
    out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout.split()
    libs = [p for p in out if "libOrthancDicomWeb.so" in p and os.path.exists(p)]
    if not libs:
        pytest.fail("orthanc is installed but the DICOMweb plugin (orthanc-dicomweb) is not")
    return sorted(libs, key=len)[0]


def _die_with_parent():
    """Linux: SIGTERM the Orthanc child if the test process dies without running its teardown."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, root: Path):
        self.root, self.http_port, self.dicom_port = root, _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.auth = (USER, PASSWORD)
        config = {
            "Name": "voxgrid-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "DicomModalities": {"voxgrid": [OUR_AE, "127.0.0.1", _free_port()]},
            "DicomCheckCalledAeTitle": True, "DicomCheckModalityHost": True, "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
            "Plugins": [_dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False, "HttpsVerifyPeers": False, "ConcurrentJobs": 1,
            "SaveJobs": False, "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "a")
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.version = requests.get(f"{self.url}/system", auth=self.auth, timeout=5).json()["Version"]

    def upload(self, folder: Path) -> int:
        n = 0
        for path in sorted(folder.rglob("*.dcm")):
            r = requests.post(f"{self.url}/instances", data=path.read_bytes(), auth=self.auth, timeout=10)
            r.raise_for_status()
            n += 1
        return n

    def crash(self):
        """SIGKILL, as a PACS that dies mid-transfer; the process is reaped by stop()."""
        os.kill(self.proc.pid, signal.SIGKILL)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    write_site(SITE, out, fmt="dicom")
    return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, site):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        assert server.upload(site / "images") == SITE.n_volumes * SITE.shape[2]
        yield server
    finally:
        server.stop()


def _check_cache(cache: Path, site: Path):
    """Every pulled series reads back to the phantom we uploaded (voxels within 1 HU rounding, same affine)."""
    sources = scan_folder(cache)
    assert len(sources) == SITE.n_volumes
    expected = {}
    for case in sorted((site / "images").iterdir()):
        uid = str(pydicom.dcmread(next(case.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        expected[series_folder(cache, uid).name] = int(case.name.rsplit("-", 1)[1])
    for source in sources:
        vol = read_dicom_series(source.image)
        phantom = make_phantom(SITE, expected[source.case_id])
        assert np.max(np.abs(vol.image - phantom.image)) <= 0.5 + 1e-3
        np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-4)


def test_dicomweb_pull_then_resume(orthanc, site, tmp_path):
    url = f"{orthanc.url}/dicom-web"
    t0 = time.perf_counter()
    report = pull_dicomweb(url, tmp_path, PacsQuery(modality="CT"), username=USER, password=PASSWORD)
    first = time.perf_counter() - t0
    n = SITE.n_volumes * SITE.shape[2]
    assert (report.studies, report.series, report.taken, report.skipped) == (2, 2, n, 0), report
    _check_cache(tmp_path, site)
    # Nothing that leaves the node names a patient, a UID or a path.
    public = json.dumps(report.public())
    for secret in ("PHANTOM", "PH-PACS", "ACC", "1.2.", str(tmp_path)):
        assert secret not in public

    # Resume: one file deleted, one damaged: exactly those two are fetched again.
    files = sorted(tmp_path.rglob("*.dcm"))
    files[0].unlink()
    files[5].write_bytes(b"garbage")
    again = pull_dicomweb(url, tmp_path, PacsQuery(modality="CT"), username=USER, password=PASSWORD)
    assert (again.taken, again.skipped) == (2, n - 2)
    _check_cache(tmp_path, site)
    assert not list(tmp_path.rglob("*.part*"))
    print(f"DICOMweb: {n} instances in {first:.2f} s")


def test_dicomweb_filters(orthanc, tmp_path):
    url = f"{orthanc.url}/dicom-web"
    none = pull_dicomweb(url, tmp_path, PacsQuery(modality="MR"), username=USER, password=PASSWORD)
    assert (none.series, none.taken) == (0, 0)
    out = pull_dicomweb(url, tmp_path, PacsQuery(study_date_from="1900-01-01", study_date_to="1900-12-31"),
                        username=USER, password=PASSWORD)
    assert out.studies == 0
    some = pull_dicomweb(url, tmp_path, PacsQuery(series_description="*PHANTOM*", study_date_from="20250101"),
                         username=USER, password=PASSWORD)
    assert (some.studies, some.series, some.taken) == (2, 2, SITE.n_volumes * SITE.shape[2])
    other = pull_dicomweb(url, tmp_path, PacsQuery(study_description="*brain*"), username=USER, password=PASSWORD)
    assert other.studies == 0


def test_dicomweb_errors_are_named(orthanc, tmp_path):
    url = f"{orthanc.url}/dicom-web"
    with pytest.raises(PacsAuthError, match="refused our credentials.*401"):
        pull_dicomweb(url, tmp_path, username=USER, password="wrong")
    dead = f"http://127.0.0.1:{_free_port()}/dicom-web"
    with pytest.raises(PacsUnavailable, match=f"DICOMweb server {dead} is not reachable \\(QIDO-RS study search\\)"):
        pull_dicomweb(dead, tmp_path, username=USER, password=PASSWORD, timeout=2)
    with pytest.raises(PacsTransferError, match="HTTP 404"):
        pull_dicomweb(f"{orthanc.url}/no-such-root", tmp_path, username=USER, password=PASSWORD)
    assert not list(tmp_path.rglob("*.dcm"))


def test_dimse_pull_then_resume(orthanc, site, tmp_path):
    kw = dict(called_ae="ORTHANC", calling_ae=OUR_AE)
    t0 = time.perf_counter()
    report = pull_dimse("127.0.0.1", orthanc.dicom_port, tmp_path, PacsQuery(modality="CT"), **kw)
    first = time.perf_counter() - t0
    n = SITE.n_volumes * SITE.shape[2]
    assert (report.studies, report.series, report.taken, report.skipped) == (2, 2, n, 0), report
    _check_cache(tmp_path, site)
    sorted(tmp_path.rglob("*.dcm"))[3].unlink()
    again = pull_dimse("127.0.0.1", orthanc.dicom_port, tmp_path, PacsQuery(modality="CT"), **kw)
    assert (again.taken, again.skipped) == (1, n - 1)
    _check_cache(tmp_path, site)
    print(f"DIMSE: {n} instances in {first:.2f} s")


def test_dimse_errors_are_named(orthanc, tmp_path):
    with pytest.raises(PacsUnavailable, match="DICOM server ORTHANC@127.0.0.1:[0-9]+ is not reachable"):
        pull_dimse("127.0.0.1", _free_port(), tmp_path, calling_ae=OUR_AE, timeout=3)
    with pytest.raises(PacsAuthError, match="rejected the association from AE title 'STRANGER'"):
        pull_dimse("127.0.0.1", orthanc.dicom_port, tmp_path, calling_ae="STRANGER", timeout=5)


def test_pacs_down_mid_way_is_a_clear_error(tmp_path_factory, site, tmp_path):
    server = Orthanc(tmp_path_factory.mktemp("orthanc-down"))
    server.upload(site / "images")
    url, port = f"{server.url}/dicom-web", server.dicom_port
    server.crash()
    server.stop()
    with pytest.raises(PacsUnavailable, match="not reachable"):
        pull_dicomweb(url, tmp_path, username=USER, password=PASSWORD, timeout=2)
    with pytest.raises(PacsUnavailable):
        pull_dimse("127.0.0.1", port, tmp_path, calling_ae=OUR_AE, timeout=3)


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_pacs_dying_mid_transfer_then_resume(tmp_path_factory, site, tmp_path, monkeypatch, protocol):
    import voxgrid.datasets.pacs_common as common
    import voxgrid.datasets.pacs_dicomweb as web
    import voxgrid.datasets.pacs_dimse as dimse

    root = tmp_path_factory.mktemp(f"orthanc-crash-{protocol}")
    server = Orthanc(root)
    server.upload(site / "images")
    store, calls = common._store, []

    def store_then_crash(*args):
        store(*args)
        calls.append(1)
        if len(calls) == 5:
            server.crash()

    def pull(srv):
        if protocol == "dicomweb":
            return pull_dicomweb(f"{srv.url}/dicom-web", tmp_path, username=USER, password=PASSWORD, timeout=5)
        return pull_dimse("127.0.0.1", srv.dicom_port, tmp_path, calling_ae=OUR_AE, timeout=5)

    for module in (web, dimse):
        monkeypatch.setattr(module, "_store", store_then_crash)
    try:
        with pytest.raises((PacsUnavailable, PacsTransferError), match="not reachable|association|failed") as info:
            pull(server)
    finally:
        server.stop()
    print(f"{protocol} mid-transfer: {info.value}")
    assert info.value.report is not None and info.value.report.taken >= 5
    taken = info.value.report.taken
    assert len(list(tmp_path.rglob("*.dcm"))) == taken and not list(tmp_path.rglob("*.part*"))

    monkeypatch.undo()
    server = Orthanc(root)  # the same storage, new ports: the PACS is back
    try:
        report = pull(server)
    finally:
        server.stop()
    n = SITE.n_volumes * SITE.shape[2]
    assert (report.taken, report.skipped) == (n - taken, taken)
    _check_cache(tmp_path, site)
