"""scan_folder / load_volume: finding cases, pairing labels, checking they fit."""
import numpy as np
import pytest

from voxgrid.datasets import VolumeError, VolumeSource, load_volume, scan_folder, write_dicom_series, write_nifti

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _image(seed=0, shape=(32, 32, 32)):
    return np.random.default_rng(seed).normal(0, 50, shape).astype(np.float32)


def _label(shape=(32, 32, 32)):
    label = np.zeros(shape, np.uint8)
    label[10:20, 12:18, 8:24] = 1
    label[14:16, 14:16, 14:16] = 2
    return label


def test_scan_nifti_and_dicom_cases_sorted_with_labels(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_nifti(images / "case-b.nii.gz", _image(1), AFFINE)
    write_nifti(images / "case-a.nii", _image(0), AFFINE)
    write_dicom_series(images / "case-c", _image(2), AFFINE)
    (images / "notes.txt").write_text("ignored")
    (images / ".hidden.nii.gz").write_text("ignored")
    (images / "empty-dir").mkdir()
    for case in ("case-a", "case-b", "case-c"):
        write_nifti(labels / f"{case}.nii.gz", _label(), AFFINE)
    write_nifti(labels / "extra.nii.gz", _label(), AFFINE)  # a label without an image is not a case

    sources = scan_folder(images, labels)
    assert [(s.case_id, s.kind) for s in sources] == [("case-a", "nifti"), ("case-b", "nifti"), ("case-c", "dicom")]
    assert sources[0].image == images / "case-a.nii" and sources[2].image == images / "case-c"
    assert all(s.label == labels / f"{s.case_id}.nii.gz" for s in sources)

    for source, seed in zip(sources, (0, 1, 2), strict=True):
        vol = load_volume(source)
        assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
        assert np.max(np.abs(vol.image - _image(seed))) <= 0.5 + 1e-4
        np.testing.assert_array_equal(vol.label, _label())
        np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-4)


def test_without_labels_folder_sources_have_no_label(tmp_path):
    write_nifti(tmp_path / "x.nii.gz", _image(), AFFINE)
    (source,) = scan_folder(tmp_path)
    assert source == VolumeSource("x", tmp_path / "x.nii.gz", None, "nifti")
    assert load_volume(source).label is None


def test_missing_label_names_the_case(tmp_path):
    write_nifti(tmp_path / "images" / "p1.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "images" / "p2.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "labels" / "p1.nii.gz", _label(), AFFINE)
    with pytest.raises(VolumeError, match="'p2' has no label map"):
        scan_folder(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(VolumeError, match="label folder .*nowhere"):
        scan_folder(tmp_path / "images", tmp_path / "nowhere")


def test_empty_or_useless_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="empty"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"x")
    with pytest.raises(VolumeError, match="junk.* holds no NIfTI"):
        scan_folder(tmp_path / "junk")
    with pytest.raises(VolumeError, match="does not exist"):
        scan_folder(tmp_path / "absent")


def test_duplicate_case_ids_are_refused(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "a.nii", _image(), AFFINE)
    with pytest.raises(VolumeError, match="'a' appears twice"):
        scan_folder(tmp_path)


def test_label_shape_mismatch_names_case_and_shapes(tmp_path):
    write_nifti(tmp_path / "images" / "c1.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "labels" / "c1.nii.gz", _label((32, 32, 30)), AFFINE)
    (source,) = scan_folder(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(VolumeError, match=r"'c1'.*\(32, 32, 30\).*\(32, 32, 32\)"):
        load_volume(source)


def test_label_affine_mismatch_names_case_and_prints_both(tmp_path):
    shifted = AFFINE.copy()
    shifted[0, 3] = 3.0
    write_nifti(tmp_path / "images" / "c1.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "labels" / "c1.nii.gz", _label(), shifted)
    (source,) = scan_folder(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(VolumeError, match=r"(?s)'c1'.*affine.*image affine.*label affine.*3\."):
        load_volume(source)


def test_label_with_fractional_values_is_refused(tmp_path):
    write_nifti(tmp_path / "images" / "c1.nii.gz", _image(), AFFINE)
    write_nifti(tmp_path / "labels" / "c1.nii.gz", _label().astype(np.float32) * 0.5, AFFINE)
    (source,) = scan_folder(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(VolumeError, match="'c1'.*non-integer"):
        load_volume(source)


def test_four_d_image_with_singleton_axis_loads_as_3d(tmp_path):
    write_nifti(tmp_path / "c.nii.gz", _image()[..., None], AFFINE)
    (source,) = scan_folder(tmp_path)
    assert load_volume(source).image.shape == (32, 32, 32)
    write_nifti(tmp_path / "c.nii.gz", np.zeros((8, 8, 8, 2), np.float32), AFFINE)
    with pytest.raises(VolumeError, match="3-D"):
        load_volume(source)
