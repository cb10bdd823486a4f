"""NIfTI I/O, the Volume type, and the datasets package's import boundary."""
import ast
from pathlib import Path

import numpy as np
import pytest

from voxgrid.datasets import Volume, VolumeError, read_nifti, write_nifti

DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"


def _affine():
    a = np.diag([0.8, 1.2, 2.5, 1.0])
    a[:3, 3] = [-10.0, 20.5, 3.25]
    return a


def test_nifti_round_trip_keeps_values_dtype_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, (32, 30, 28)).astype(np.float32)
    path = write_nifti(tmp_path / "sub" / "case.nii.gz", image, _affine())
    assert path == tmp_path / "sub" / "case.nii.gz" and path.is_file()
    array, affine = read_nifti(path)
    assert array.dtype == np.float32 and array.shape == (32, 30, 28)
    np.testing.assert_array_equal(array, image)
    np.testing.assert_allclose(affine, _affine(), atol=1e-5)


def test_nifti_keeps_integer_labels(tmp_path):
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4] = 2
    array, _ = read_nifti(write_nifti(tmp_path / "l.nii.gz", label, np.eye(4)))
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, label)


def test_corrupt_nifti_raises_volume_error_naming_file(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((32, 32, 32), np.float32), np.eye(4))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all" * 20)
    for path in (truncated, garbage):
        with pytest.raises(VolumeError, match=path.name):
            read_nifti(path)
    with pytest.raises(VolumeError, match="missing.nii.gz"):
        read_nifti(tmp_path / "missing.nii.gz")


def test_volume_spacing_is_column_norms_of_affine():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 3.0])
    vol = Volume(image=np.zeros((2, 2, 2), np.float32), affine=affine, label=None)
    assert vol.spacing == pytest.approx((0.7, 0.9, 3.0))
    assert all(isinstance(s, float) for s in vol.spacing)
    assert issubclass(VolumeError, ValueError)


def test_datasets_imports_nothing_else_of_voxgrid():
    for path in DATASETS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "voxgrid" for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path} reaches outside datasets/"
                assert node.level == 1 or not (node.module or "").startswith("voxgrid"), path
