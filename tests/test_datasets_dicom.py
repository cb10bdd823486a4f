"""DICOM series writing and reading: geometry, ordering, errors."""
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from voxgrid.datasets import VolumeError, read_dicom_series, write_dicom_series

SHAPE = (32, 24, 16)  # distinct extents catch any axis swap


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1000, 1500, SHAPE).astype(np.float32)


def _affine(oblique=False):
    a = np.diag([0.7, 0.8, 2.5, 1.0])
    if oblique:
        th = 0.4
        rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
        a[:3, :3] = rot @ a[:3, :3]
    a[:3, 3] = [12.0, -40.0, 100.0]
    return a


@pytest.mark.parametrize("oblique", [False, True])
def test_round_trip_voxels_and_affine(tmp_path, oblique):
    image = _image()
    write_dicom_series(tmp_path / "s", image, _affine(oblique))
    assert len(list((tmp_path / "s").glob("*.dcm"))) == SHAPE[2]
    vol = read_dicom_series(tmp_path / "s")
    assert vol.image.dtype == np.float32 and vol.image.shape == SHAPE and vol.label is None
    assert np.max(np.abs(vol.image - image)) <= 0.5 + 1e-4  # int16 rounding to 1 HU
    np.testing.assert_allclose(vol.affine, _affine(oblique), atol=1e-4)


def test_written_files_are_real_ct_with_phi_and_lps_geometry(tmp_path):
    image = _image()
    write_dicom_series(tmp_path / "s", image, _affine(), patient_name="DOE^JANE", patient_id="MRN-42",
                       institution_name="General Hospital", accession_number="ACC9", birth_date="19650203",
                       study_date="20240506")
    ds = pydicom.dcmread(tmp_path / "s" / "IM00003.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert (str(ds.PatientName), ds.PatientID, ds.InstitutionName) == ("DOE^JANE", "MRN-42", "General Hospital")
    assert (ds.AccessionNumber, ds.PatientBirthDate, ds.StudyDate) == ("ACC9", "19650203", "20240506")
    assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.shape == (SHAPE[1], SHAPE[0])  # (Rows, Cols)
    np.testing.assert_allclose(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                               image[:, :, 3].T, atol=0.5 + 1e-4)
    # RAS (12, -40, 100) + 3 slices of 2.5 mm -> LPS (-12, 40, 107.5)
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-12.0, 40.0, 107.5])
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [-1, 0, 0, 0, -1, 0])
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.8, 0.7])
    assert float(ds.SliceThickness) == pytest.approx(2.5)


def test_given_series_uid_makes_output_deterministic(tmp_path):
    kw = dict(study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.4.5")
    for name in ("a", "b"):
        write_dicom_series(tmp_path / name, _image(), _affine(), **kw)
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_slices_ordered_by_position_not_instance_number_or_file_name(tmp_path):
    image = _image()
    write_dicom_series(tmp_path / "s", image, _affine())
    files = sorted((tmp_path / "s").glob("*.dcm"))
    rng = np.random.default_rng(1)
    # Scramble instance numbers, file names and folder layout.
    (tmp_path / "s" / "deep" / "er").mkdir(parents=True)
    for n, (f, new) in enumerate(zip(files, rng.permutation(len(files)), strict=True)):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(rng.integers(1, 1000))
        target = tmp_path / "s" / ("deep/er" if n % 2 else "") / f"z{new:03d}"
        ds.save_as(target)
        f.unlink()
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    vol = read_dicom_series(tmp_path / "s")
    assert np.max(np.abs(vol.image - image)) <= 0.5 + 1e-4
    np.testing.assert_allclose(vol.affine, _affine(), atol=1e-4)


def test_missing_middle_slice_is_an_uneven_gap(tmp_path):
    write_dicom_series(tmp_path / "s", _image(), _affine(), series_instance_uid="1.2.3.99")
    (tmp_path / "s" / "IM00007.dcm").unlink()
    with pytest.raises(VolumeError, match=r"1\.2\.3\.99.*gap of 5\.000 mm.*expected 2\.500"):
        read_dicom_series(tmp_path / "s")


def test_two_series_need_a_choice(tmp_path):
    write_dicom_series(tmp_path / "f" / "one", _image(0), _affine(), series_instance_uid="1.2.3.1")
    write_dicom_series(tmp_path / "f" / "two", _image(1), _affine(), series_instance_uid="1.2.3.2",
                       series_description="second")
    with pytest.raises(VolumeError, match=r"2 image series.*1\.2\.3\.1.*1\.2\.3\.2"):
        read_dicom_series(tmp_path / "f")
    vol = read_dicom_series(tmp_path / "f", series_uid="1.2.3.2")
    assert np.max(np.abs(vol.image - _image(1))) <= 0.5 + 1e-4
    with pytest.raises(VolumeError, match="1.2.3.7 not found"):
        read_dicom_series(tmp_path / "f", series_uid="1.2.3.7")


def test_errors_for_empty_corrupt_and_duplicate(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM image files"):
        read_dicom_series(tmp_path / "empty")

    write_dicom_series(tmp_path / "s", _image(), _affine())
    good = (tmp_path / "s" / "IM00004.dcm").read_bytes()
    (tmp_path / "s" / "IM00004.dcm").write_bytes(good[:400])  # DICM magic, then cut mid-header
    with pytest.raises(VolumeError, match="corrupt DICOM file .*IM00004.dcm"):
        read_dicom_series(tmp_path / "s")
    (tmp_path / "s" / "IM00004.dcm").write_bytes(good[:-100])  # cut inside the pixel data
    with pytest.raises(VolumeError, match="IM00004.dcm"):
        read_dicom_series(tmp_path / "s")

    write_dicom_series(tmp_path / "d", _image(), _affine(), series_instance_uid="1.2.3.5")
    shutil.copy(tmp_path / "d" / "IM00002.dcm", tmp_path / "d" / "copy.dcm")
    with pytest.raises(VolumeError, match="share position"):
        read_dicom_series(tmp_path / "d")


def test_reads_pydicom_ct_small(tmp_path):
    src = get_testdata_file("CT_small.dcm")
    shutil.copy(src, tmp_path / "ct.dcm")
    vol = read_dicom_series(tmp_path)
    ds = pydicom.dcmread(src)
    assert vol.image.shape == (128, 128, 1)
    expected = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(vol.image[:, :, 0], expected)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    np.testing.assert_allclose(vol.affine[:3, 3], [-ipp[0], -ipp[1], ipp[2]], atol=1e-5)
    assert vol.spacing == pytest.approx((0.661468, 0.661468, 5.0))
    assert vol.image.mean() > -1024  # rescale applied: raw values would be stored positives
