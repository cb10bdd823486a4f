"""Synthetic multi-site phantoms: determinism, anatomy, site differences, writing to disk."""
import time
from dataclasses import replace

import numpy as np
import pydicom
import pytest

from voxgrid.datasets import SiteSpec, default_sites, load_volume, make_phantom, scan_folder, write_site

SITES = default_sites()
SITE_A, SITE_B, SITE_C = SITES


def _shell(mask):
    """Voxels within 2 of the mask but outside it."""
    grown = mask.copy()
    for _ in range(2):
        g = grown.copy()
        for axis in range(3):
            g |= np.roll(grown, 1, axis) | np.roll(grown, -1, axis)
        grown = g
    return grown & ~mask


def test_default_sites_styles_and_cycling():
    assert [s.name for s in SITES] == ["site-a", "site-b", "site-c"]
    assert SITE_A.labels == {1: "pancreas"} and not SITE_A.tumor
    assert SITE_B.labels == SITE_C.labels == {1: "pancreas", 2: "tumor"} and SITE_B.tumor and SITE_C.tumor
    assert (SITE_A.n_volumes, SITE_B.n_volumes, SITE_C.n_volumes) == (8, 8, 4)
    assert SITE_C.spacing != SITE_A.spacing and SITE_C.noise_sd > SITE_A.noise_sd
    assert (SITE_C.hu_offset, SITE_C.hu_scale) != (0.0, 1.0)
    assert default_sites(n_volumes=4)[2].n_volumes == 3

    five = default_sites(5, shape=(16, 16, 16), seed=3)
    assert [s.name for s in five] == ["site-a", "site-b", "site-c", "site-d", "site-e"]
    assert five[3].labels == five[0].labels and five[4].tumor and five[0].shape == (16, 16, 16)
    assert len({s.seed for s in five}) == 5
    assert {s.seed for s in five}.isdisjoint(s.seed for s in default_sites(5, seed=4))
    with pytest.raises(ValueError):
        default_sites(0)


def test_deterministic_per_seed_and_index():
    v1, v2 = make_phantom(SITE_B, 3), make_phantom(SITE_B, 3)
    np.testing.assert_array_equal(v1.image, v2.image)
    np.testing.assert_array_equal(v1.label, v2.label)
    assert not np.array_equal(v1.image, make_phantom(SITE_B, 4).image)
    assert not np.array_equal(v1.image, make_phantom(replace(SITE_B, seed=SITE_B.seed + 1), 3).image)


def test_volume_format_and_affine():
    vol = make_phantom(SITE_C, 0)
    assert vol.image.shape == vol.label.shape == (32, 32, 32)
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    assert vol.spacing == pytest.approx(SITE_C.spacing)
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag(SITE_C.spacing))
    assert vol.image.min() >= -1024 and vol.image.max() < 3072
    # Air at the corners, bone somewhere, soft tissue in the middle.
    assert vol.image[0, 0, :].mean() < -950 and vol.image.max() > 300
    assert -100 < np.median(vol.image[12:20, 12:20, :]) < 200


def test_label_sets_per_site():
    def values(site):
        return set().union(*(np.unique(make_phantom(site, i).label).tolist() for i in range(site.n_volumes)))

    assert values(SITE_A) == {0, 1}
    assert values(SITE_B) == values(SITE_C) == {0, 1, 2}
    # A site that has tumours but only annotates pancreas never shows label 2.
    assert values(replace(SITE_A, tumor=True)) == {0, 1}
    organs = SiteSpec("x", 2, {3: "liver", 7: "pancreas", 9: "kidney"}, seed=1)
    assert values(organs) == {0, 3, 7, 9}
    with pytest.raises(ValueError, match="spleen"):
        make_phantom(SiteSpec("x", 1, {1: "spleen"}), 0)


def test_pancreas_is_sized_and_contrasted_for_learning():
    for i in range(SITE_A.n_volumes):
        vol = make_phantom(SITE_A, i)
        pancreas = vol.label == 1
        assert 100 <= pancreas.sum() <= 600
        assert vol.image[pancreas].mean() - vol.image[_shell(pancreas)].mean() > 40


def test_tumours_in_most_cases_hypodense_and_touching_pancreas():
    with_tumour = 0
    for i in range(SITE_B.n_volumes):
        vol = make_phantom(SITE_B, i)
        tumour, pancreas = vol.label == 2, vol.label == 1
        if tumour.any():
            with_tumour += 1
            assert (_shell(tumour) & pancreas).any()
            assert vol.image[tumour].mean() < vol.image[pancreas].mean() - 25
    assert with_tumour >= SITE_B.n_volumes // 2


def test_sites_differ_in_intensity():
    def stats(site):
        vols = [make_phantom(site, i) for i in range(3)]
        means = [v.image[v.label == 1].mean() for v in vols]
        # Noise from the difference of neighbouring voxels inside the pancreas.
        noise = [np.std(np.diff(v.image, axis=2)[(v.label[:, :, 1:] == 1) & (v.label[:, :, :-1] == 1)]) for v in vols]
        return np.mean(means), np.mean(noise)

    (mean_a, noise_a), (mean_c, noise_c) = stats(SITE_A), stats(SITE_C)
    assert mean_c - mean_a > 20
    assert noise_c > 1.5 * noise_a


def test_fast_enough():
    for shape, limit in (((32, 32, 32), 0.05), ((64, 64, 64), 1.0)):
        site = replace(SITE_B, shape=shape)
        make_phantom(site, 0)
        best = min(_timed(make_phantom, site, i) for i in range(3))
        assert best < limit, (shape, best)


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_write_site_round_trips(tmp_path, fmt):
    site = replace(SITE_C, n_volumes=3)
    assert write_site(site, tmp_path, fmt=fmt) == tmp_path
    sources = scan_folder(tmp_path / "images", tmp_path / "labels")
    assert [s.case_id for s in sources] == ["site-c-000", "site-c-001", "site-c-002"]
    assert {s.kind for s in sources} == {fmt}
    for i, source in enumerate(sources):
        expected, vol = make_phantom(site, i), load_volume(source)
        np.testing.assert_array_equal(vol.label, expected.label)
        np.testing.assert_allclose(vol.affine, expected.affine, atol=1e-4)
        tolerance = 0.5 + 1e-3 if fmt == "dicom" else 0.0  # int16 pixels round to 1 HU
        assert np.max(np.abs(vol.image - expected.image)) <= tolerance


def test_dicom_site_carries_fake_phi(tmp_path):
    write_site(replace(SITE_A, n_volumes=2), tmp_path, fmt="dicom")
    ds = pydicom.dcmread(tmp_path / "images" / "site-a-001" / "IM00000.dcm")
    assert str(ds.PatientName) == "PHANTOM^SITE-A^001"
    assert ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber and ds.InstitutionName and ds.StudyDate
    other = pydicom.dcmread(tmp_path / "images" / "site-a-000" / "IM00000.dcm")
    assert other.StudyInstanceUID != ds.StudyInstanceUID and other.PatientID != ds.PatientID
    with pytest.raises(ValueError, match="fmt"):
        write_site(SITE_A, tmp_path, fmt="png")
