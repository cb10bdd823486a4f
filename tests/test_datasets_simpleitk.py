"""read_dicom_series agrees with SimpleITK (GDCM) on voxels and geometry."""
import numpy as np
import pytest

from voxgrid.datasets import make_phantom, default_sites, read_dicom_series, write_dicom_series

sitk = pytest.importorskip("SimpleITK")


def _sitk_read(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # SimpleITK numpy order is (z, y, x)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # SimpleITK geometry is LPS


@pytest.mark.parametrize("angle", [0.0, 0.5])
def test_matches_simpleitk(tmp_path, angle):
    vol = make_phantom(default_sites()[2], 0)
    affine = vol.affine.copy()
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine[:3, :3] = rot @ affine[:3, :3]
    write_dicom_series(tmp_path, vol.image[:, 2:, 4:], affine)  # non-cubic (32, 30, 28)
    ours = read_dicom_series(tmp_path)
    array, theirs = _sitk_read(tmp_path)
    assert ours.image.shape == array.shape == (32, 30, 28)
    np.testing.assert_array_equal(ours.image, array.astype(np.float32))
    np.testing.assert_allclose(ours.affine, theirs, atol=1e-4)
    np.testing.assert_allclose(ours.affine, affine, atol=1e-4)
