"""Uncompressed single-frame slices are read straight from their bytes (RawPixels): they must give what
pydicom's pixel_array gives, for every native encoding, and fall back to pydicom when the bytes are odd."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, RLELossless
from voxgrid.datasets import VolumeError, read_dicom_series, write_dicom_series
from voxgrid.datasets.dicom_series import scan_series


def _series(tmp_path, n=4):
    rng = np.random.default_rng(3)
    image = rng.integers(-1024, 1500, (12, 10, n)).astype(np.float64)
    return write_dicom_series(tmp_path / "s", image, np.diag([0.8, 0.9, 2.5, 1.0]))


def _reference(folder):
    """pydicom's own decoding, slices in file order (the writer's order is along the normal)."""
    planes = []
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        planes.append((ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T)
    return np.stack(planes, axis=2).astype(np.float32)


@pytest.mark.parametrize("encoding", ["explicit", "implicit", "12 bits signed", "12 bits unsigned", "slope"])
def test_raw_reads_match_pydicom(tmp_path, encoding):
    folder = _series(tmp_path)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.astype(np.int32)
        if encoding == "implicit":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif encoding.startswith("12 bits"):
            signed = encoding.endswith(" signed")
            # Garbage above bit 11, as some scanners leave it: pydicom masks or sign-extends it away.
            raw = (stored & 0x0FFF) | 0x5000 if not signed else ((stored // 4) & 0x0FFF) | 0xA000
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
            ds.PixelData = raw.astype("<u2").tobytes()
        elif encoding == "slope":
            ds.RescaleSlope, ds.RescaleIntercept = "0.37", "-5.5"
        ds.save_as(f, enforce_file_format=True)
    summary = scan_series(folder)[0]
    assert all(s.raw is not None and s.raw.explicit_vr == (encoding != "implicit") for s in summary.slice_list)
    ours = read_dicom_series(folder).image
    np.testing.assert_array_equal(ours, _reference(folder))


def test_compressed_files_decode_through_pydicom(tmp_path):
    folder = _series(tmp_path, n=3)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless, encoding_plugin="pydicom")
        ds.save_as(f, enforce_file_format=True)
    assert all(s.raw is None for s in scan_series(folder)[0].slice_list)
    assert pydicom.dcmread(next(folder.glob("*.dcm"))).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_dicom_series(folder).image, _reference(folder))


def test_a_file_truncated_after_the_header_scan_is_named(tmp_path):
    folder = _series(tmp_path)
    summary = scan_series(folder)[0]
    victim = summary.slice_list[1].path
    victim.write_bytes(victim.read_bytes()[:-50])  # pixel bytes cut short
    from voxgrid.datasets.dicom_read import _pixels, _raw_plane

    assert _raw_plane(summary.slice_list[1]) is None  # too short: pydicom gets it, and names the problem
    with pytest.raises(VolumeError, match=victim.name):
        _pixels(summary.uid, summary.slice_list)
    assert _raw_plane(summary.slice_list[0]).shape == (10, 12)  # (Rows, Columns)
