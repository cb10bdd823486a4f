"""Our DICOM reader on real files shipped with pydicom and pydicom-data, checked against SimpleITK (GDCM):
series rules, localizer and non-image skips, uneven gaps, enhanced multi-frame, compressed syntaxes."""
import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from voxgrid.datasets import SeriesRules, VolumeError, list_series, read_dicom_series, write_dicom_series

sitk = pytest.importorskip("SimpleITK")
DIRTESTS = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests")
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _data_file(name):
    """A pydicom test file that is present offline (pydicom or the pydicom-data wheel), else skip."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data missing)")
    return path


def _sitk(files):
    if len(files) == 1:
        img = sitk.ReadImage(str(files[0]))  # a multi-frame file is one 3-D image
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        img = reader.Execute()
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # SimpleITK numpy order is (z, y, x)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return array, LPS_RAS @ lps


def _sitk_folder(folder):
    return _sitk(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def _same_slice_order(array, affine, reference_affine):
    """Flip k when the two readers stack slices in opposite directions (SimpleITK keeps frame order)."""
    if np.dot(affine[:3, 2], reference_affine[:3, 2]) < 0:
        n = array.shape[2] - 1
        affine = affine.copy()
        affine[:3, 3] += affine[:3, 2] * n
        affine[:3, 2] *= -1
        array = array[:, :, ::-1]
    return array, affine


def _assert_matches_sitk(vol, array, affine, columns=(0, 1, 2, 3)):
    array, affine = _same_slice_order(array, affine, vol.affine)
    assert vol.image.shape == array.shape
    np.testing.assert_array_equal(vol.image, array.astype(np.float32))
    np.testing.assert_allclose(vol.affine[:, columns], affine[:, columns], atol=1e-4)


def test_ct5n_series_matches_simpleitk():
    folder = os.path.join(DIRTESTS, "98892001", "CT5N")
    vol = read_dicom_series(folder)
    assert vol.image.shape == (16, 16, 5) and vol.spacing == pytest.approx((0.488281, 0.488281, 2.5))
    _assert_matches_sitk(vol, *_sitk_folder(folder))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_slice_files_match_simpleitk(tmp_path, name):
    shutil.copy(get_testdata_file(name), tmp_path / name)
    vol = read_dicom_series(tmp_path)
    array, affine = _sitk([tmp_path / name])
    # One slice has no slice spacing: we take SliceThickness, SimpleITK 1 mm for MR; compare i, j and origin.
    _assert_matches_sitk(vol, array, affine, columns=(0, 1, 3))


def test_uneven_gap_series_is_a_clear_error_or_resampled():
    folder = os.path.join(DIRTESTS, "77654033", "CT2")
    uid = pydicom.dcmread(os.path.join(folder, "17106"), stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(VolumeError, match=rf"{uid}: uneven slice gap of 202\.500 mm.*-99\.480.*expected 1\.250.*allow_resample"):
        read_dicom_series(folder)
    vol = read_dicom_series(folder, allow_resample=True)
    assert vol.image.shape == (16, 16, 165) and vol.spacing == pytest.approx((0.488281, 0.488281, 1.25))
    # The last three slices were acquired on the grid: copied unchanged; the first too.
    array, affine = _sitk_folder(folder)  # SimpleITK warns and keeps the 4 slices with a mean spacing
    np.testing.assert_array_equal(vol.image[:, :, [0, -3, -2, -1]], array.astype(np.float32))
    np.testing.assert_allclose(vol.affine[:, [0, 1, 3]], affine[:, [0, 1, 3]], atol=1e-4)
    mid = vol.image[:, :, 81]  # halfway across the gap: the mean of its two neighbours
    np.testing.assert_allclose(mid, 0.5 * (array[:, :, 0] + array[:, :, 1]), atol=0.6)


def test_list_series_on_real_export_skips_localizers_and_projections():
    ct = {s.description: s for s in list_series(os.path.join(DIRTESTS, "98892001"))}
    assert ct["Scout"].skipped == "localizer (ImageType LOCALIZER)" and ct["Scout"].slices == 2
    assert ct["SmartScore - Gated 0.5 sec"].accepted and ct["SmartScore - Gated 0.5 sec"].slices == 5
    # read_dicom_series picks the only accepted series of the patient folder.
    assert read_dicom_series(os.path.join(DIRTESTS, "98892001")).image.shape == (16, 16, 5)

    mr = list_series(os.path.join(DIRTESTS, "98892003"))
    assert not any(s.accepted for s in mr)
    reasons = {s.skipped for s in mr}
    assert "series description matches the exclusion rule (localizer/scout)" in reasons
    assert any(r.startswith("mixed orientations") for r in reasons)
    with pytest.raises(VolumeError, match="no series .* passes the series rules"):
        read_dicom_series(os.path.join(DIRTESTS, "98892003"))

    cr = list_series(os.path.join(DIRTESTS, "77654033"))
    assert sum(s.skipped is not None and s.skipped.startswith("no patient geometry") for s in cr) == 3


def test_series_rules_modality_description_and_min_slices(tmp_path):
    def ct(name, uid, desc, n, seed):
        image = np.random.default_rng(seed).uniform(-1000, 1000, (8, 8, n)).astype(np.float32)
        write_dicom_series(tmp_path / name, image, np.diag([1.0, 1.0, 2.0, 1.0]), series_instance_uid=uid,
                           series_description=desc, patient_name="SECRET^NAME", patient_id="MRN-777")
    ct("a", "1.2.826.0.1.1", "ABD 5mm", 6, 0)
    ct("b", "1.2.826.0.1.2", "ABD 1mm arterial", 10, 1)
    ct("c", "1.2.826.0.1.3", "Topogram", 1, 2)
    sr = Dataset()  # a structured report beside the images: a non-image object
    sr.SOPClassUID, sr.SOPInstanceUID = pydicom.uid.BasicTextSRStorage, "1.2.826.0.1.9.1"
    sr.SeriesInstanceUID, sr.Modality, sr.PatientName = "1.2.826.0.1.9", "SR", "SECRET^NAME"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)

    summaries = {s.uid: s for s in list_series(tmp_path)}
    assert summaries["1.2.826.0.1.3"].skipped.startswith("series description matches the exclusion rule")
    assert summaries["1.2.826.0.1.9"].skipped == "non-image object (Basic Text SR Storage)"
    assert summaries["1.2.826.0.1.1"].accepted and summaries["1.2.826.0.1.2"].accepted

    rules = SeriesRules(modalities=("ct",), description=r"arterial", min_slices=8)
    picked = [s.uid for s in list_series(tmp_path, rules) if s.accepted]
    assert picked == ["1.2.826.0.1.2"]
    assert read_dicom_series(tmp_path, rules=rules).image.shape == (8, 8, 10)
    small = {s.uid: s.skipped for s in list_series(tmp_path, SeriesRules(min_slices=8))}
    assert small["1.2.826.0.1.1"] == "6 slice(s), fewer than the minimum 8"
    assert {s.uid: s.skipped for s in list_series(tmp_path, SeriesRules(modalities=("MR",)))}[
        "1.2.826.0.1.2"] == "modality CT not in ['MR']"
    with pytest.raises(VolumeError, match=r"2 image series.*1\.2\.826\.0\.1\.1.*1\.2\.826\.0\.1\.2"):
        read_dicom_series(tmp_path)
    with pytest.raises(VolumeError, match="invalid"):
        SeriesRules(description="(unclosed")

    # What may leave the node: no UID, description, name or ID in the public summaries.
    public = repr([s.public() for s in list_series(tmp_path)])
    for secret in ("1.2.826", "ABD", "arterial", "Topogram", "SECRET", "MRN-777", str(tmp_path)):
        assert secret not in public


def test_localizer_slice_inside_a_series_is_dropped(tmp_path):
    image = np.random.default_rng(3).uniform(-500, 500, (8, 8, 6)).astype(np.float32)
    write_dicom_series(tmp_path, image, np.diag([1.0, 1.0, 2.0, 1.0]), series_instance_uid="1.2.826.0.2")
    ds = pydicom.dcmread(tmp_path / "IM00002.dcm")  # a coronal single slice in the same series
    ds.ImageOrientationPatient, ds.SOPInstanceUID = [1, 0, 0, 0, 0, -1], "1.2.826.0.2.99"
    ds.save_as(tmp_path / "scout.dcm")
    ds = pydicom.dcmread(tmp_path / "IM00003.dcm")  # and one flagged LOCALIZER
    ds.ImageType, ds.SOPInstanceUID, ds.ImagePositionPatient = ["ORIGINAL", "PRIMARY", "LOCALIZER"], "1.2.826.0.2.98", [0, 0, 500]
    ds.save_as(tmp_path / "loc.dcm")
    (summary,) = list_series(tmp_path)
    assert summary.accepted and summary.slices == 6
    assert any("localizer" in n for n in summary.notes) and len(summary.notes) == 2
    vol = read_dicom_series(tmp_path)
    assert np.max(np.abs(vol.image - image)) <= 0.5 + 1e-4


def _with_geometry(ds, n_frames, shared_rescale=True):
    """Give a stripped enhanced MR (pydicom-data's emri_small has no functional groups) an oblique geometry."""
    row, col = np.array([0.8660254, 0.5, 0.0]), np.array([0.0, 0.0, -1.0])
    shared, orient, measures = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [*row, *col]
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.7], 3.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    if shared_rescale:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -100, "US"
        shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    normal = np.cross(row, col)
    frames = []
    for f in [*range(0, n_frames, 2), *range(1, n_frames, 2)]:  # frames stored out of spatial order
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [round(float(v), 4) for v in np.array([10.0, -20.0, 30.0]) + 3 * f * normal]
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm"])
def test_enhanced_mr_multiframe_matches_simpleitk(tmp_path, name):
    src = _data_file(name)
    shutil.copy(src, tmp_path / name)
    (summary,) = list_series(tmp_path)  # as shipped: no plane positions, skipped with the reason
    assert summary.skipped == "multi-frame object without per-frame functional groups (no plane positions)"

    ds = _with_geometry(pydicom.dcmread(src), 10)
    ds.save_as(tmp_path / name)
    vol = read_dicom_series(tmp_path)
    assert vol.image.shape == (64, 64, 10) and vol.spacing == pytest.approx((0.7, 0.9, 3.0), abs=1e-4)
    if name == "emri_small.dcm":
        # Frames are out of order on purpose; SimpleITK keeps file order, so compare frame by frame.
        array, affine = _sitk([tmp_path / name])
        normal = np.cross([0.8660254, 0.5, 0.0], [0.0, 0.0, -1.0])
        along = [np.dot(normal, [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
                 for fg in ds.PerFrameFunctionalGroupsSequence]
        np.testing.assert_array_equal(vol.image, array[:, :, np.argsort(along)].astype(np.float32))
        # GDCM takes the direction and origin from the functional groups but not, for this object, the
        # in-plane spacing (it reports 1 mm): compare directions and origin, spacing is pinned above.
        unit = lambda a: a[:3, :2] / np.linalg.norm(a[:3, :2], axis=0)  # noqa: E731
        np.testing.assert_allclose(unit(vol.affine), unit(affine), atol=1e-4)
        np.testing.assert_allclose(vol.affine[:, 3], affine[:, 3], atol=1e-4)
    # Every syntax decodes to the same frames; frame i sits at slice order[i] (shared rescale 2x - 100).
    reference = pydicom.dcmread(_data_file("emri_small.dcm")).pixel_array  # (frames, rows, columns)
    order = [*range(0, 10, 2), *range(1, 10, 2)]
    expected = (reference[np.argsort(order)].astype(np.float32) * 2 - 100).transpose(2, 1, 0)
    np.testing.assert_array_equal(vol.image, expected)
    assert vol.image.min() >= -100


def test_enhanced_ct_supplemental_matches_simpleitk(tmp_path):
    src = _data_file("eCT_Supplemental.dcm")
    shutil.copy(src, tmp_path / "ect.dcm")
    vol = read_dicom_series(tmp_path)
    assert vol.image.shape == (512, 512, 2) and vol.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    _assert_matches_sitk(vol, *_sitk([tmp_path / "ect.dcm"]))
    assert vol.image.min() >= -1024  # shared PixelValueTransformation applied (intercept -1024)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_syntaxes_decode_to_the_same_voxels(tmp_path, name):
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "plain.dcm")
    reference = read_dicom_series(tmp_path)
    (tmp_path / "plain.dcm").unlink()
    shutil.copy(_data_file(name), tmp_path / name)
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.image, reference.image)
    np.testing.assert_allclose(vol.affine, reference.affine)


def test_colour_is_skipped_and_lossy_jpeg_decodes(tmp_path):
    shutil.copy(_data_file("SC_rgb_jpeg_dcmtk.dcm"), tmp_path / "rgb.dcm")
    (summary,) = list_series(tmp_path)
    assert summary.skipped == "colour image (SamplesPerPixel is not 1)"
    ds = pydicom.dcmread(_data_file("JPGExtended.dcm"))
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)  # 12-bit JPEG Extended: pylibjpeg-libjpeg


def _write_seg(folder, label, names, path, series_files=None):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in sorted(series_files or folder.glob("*.dcm"))]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial: k follows z here
    mask = np.stack([label[:, :, k].T for k in range(label.shape[2])])  # (frames, Rows, Cols) label map
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Pancreas if name == "pancreas" else codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for n, name in sorted(names.items())]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=pydicom.uid.generate_uid(), series_number=2,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1, manufacturer="voxgrid",
        manufacturer_model_name="test", software_versions="0", device_serial_number="1")
    seg.save_as(path)


def test_dicom_seg_label_map_read_with_highdicom(tmp_path):
    from voxgrid.datasets import SiteSpec, make_phantom, read_dicom_seg

    site = SiteSpec(name="seg", n_volumes=1, labels={1: "pancreas", 2: "tumor"}, shape=(24, 20, 10), tumor=True)
    phantom = make_phantom(site, 0)
    assert set(np.unique(phantom.label)) >= {0, 1}
    write_dicom_series(tmp_path / "ct", phantom.image, phantom.affine, series_instance_uid="1.2.826.0.5.1")
    names = {1: "pancreas", 2: "tumor"}
    _write_seg(tmp_path / "ct", phantom.label, names, tmp_path / "ct" / "seg.dcm")

    assert [s.skipped for s in list_series(tmp_path / "ct") if s.modality == "SEG"] == [
        "segmentation object (a label map, not an image)"]
    vol, got_names = read_dicom_seg(tmp_path / "ct" / "seg.dcm", tmp_path / "ct")
    assert got_names == names
    assert vol.label.dtype == np.uint8 and vol.label.shape == phantom.label.shape
    np.testing.assert_array_equal(vol.label, phantom.label)
    np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-4)

    write_dicom_series(tmp_path / "other", phantom.image[:, :, :6], phantom.affine, series_instance_uid="1.2.826.0.5.2")
    with pytest.raises(VolumeError, match="does not fit series 1.2.826.0.5.2"):
        read_dicom_seg(tmp_path / "ct" / "seg.dcm", tmp_path / "other", series_uid="1.2.826.0.5.2")
    (tmp_path / "bad.dcm").write_bytes(b"DICM nonsense")
    with pytest.raises(VolumeError, match="cannot read DICOM SEG .*bad.dcm"):
        read_dicom_seg(tmp_path / "bad.dcm", tmp_path / "ct")


def test_gantry_tilt_is_an_error_unless_resampling_is_allowed(tmp_path):
    tilt = np.radians(15.0)
    sheared = np.diag([0.8, 0.8, 2.0, 1.0])
    sheared[:3, 2] = [0.0, 2.0 * np.tan(tilt), 2.0]  # each slice shifted along y (RAS), as a tilted gantry does
    sheared[:3, 3] = [-12.0, -12.0, -12.0]
    blob = lambda xyz: 1000.0 * np.exp(-np.sum((xyz - [0.0, 2.0, 0.0]) ** 2, axis=-1) / (2 * 4.0 ** 2))  # noqa: E731

    def world(affine, shape):
        ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).astype(float)
        return ijk @ affine[:3, :3].T + affine[:3, 3]

    shape = (32, 40, 12)
    write_dicom_series(tmp_path, blob(world(sheared, shape)), sheared, series_instance_uid="1.2.826.0.7.1")
    with pytest.raises(VolumeError, match=r"1\.2\.826\.0\.7\.1: gantry tilt of 15\.00 degrees.*allow_resample"):
        read_dicom_series(tmp_path)
    vol = read_dicom_series(tmp_path, allow_resample=True)
    assert vol.image.shape == shape
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([0.8, 0.8, 2.0]), atol=1e-4)  # orthogonal now
    np.testing.assert_allclose(vol.affine[:3, 3], sheared[:3, 3], atol=1e-4)
    # The blob stays where it was in the patient (linear interpolation of a smooth blob, 1 HU rounding),
    # wherever the tilted acquisition saw it; beyond its field the image minimum fills in.
    xyz = world(vol.affine, shape)
    src = (xyz - sheared[:3, 3]) @ np.linalg.inv(sheared[:3, :3]).T
    seen = (src[..., 1] >= 0) & (src[..., 1] <= shape[1] - 1)
    assert 0.8 < seen.mean() < 1.0
    np.testing.assert_allclose(vol.image[seen], blob(xyz)[seen], atol=6.0)  # peak 1000; 4.1 measured
    assert np.all(vol.image[~seen] == vol.image.min())


def test_scan_dicom_export_gives_one_case_per_accepted_series(tmp_path):
    from voxgrid.datasets import load_volume, scan_dicom_export, series_case_id, write_nifti

    export = tmp_path / "export"
    images = {}
    for n, uid in enumerate(["1.2.826.0.8.1", "1.2.826.0.8.2"]):
        images[uid] = np.random.default_rng(n).uniform(-900, 900, (8, 6, 5 + n)).astype(np.float32)
        write_dicom_series(export / f"s{n}", images[uid], np.diag([1.0, 1.0, 2.0, 1.0]), series_instance_uid=uid)
    shutil.copytree(os.path.join(DIRTESTS, "98892001", "CT2N"), export / "scout")  # localizers: skipped
    sources, summaries = scan_dicom_export(export)
    assert [s.case_id for s in sources] == sorted(series_case_id(u) for u in images)
    assert all("1.2.826" not in s.case_id for s in sources)
    assert sorted(s.skipped or "" for s in summaries) == ["", "", "localizer (ImageType LOCALIZER)"]
    for source in sources:
        vol = load_volume(source)
        assert np.max(np.abs(vol.image - images[source.series_uid])) <= 0.5 + 1e-4

    labels = tmp_path / "labels"
    write_nifti(labels / f"{series_case_id('1.2.826.0.8.1')}.nii.gz", np.zeros((8, 6, 5), np.uint8),
                np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(VolumeError, match=f"{series_case_id('1.2.826.0.8.2')}.*no label map"):
        scan_dicom_export(export, labels=labels)
    with pytest.raises(VolumeError, match="no series under .* passes the series rules"):
        scan_dicom_export(export, SeriesRules(modalities=("MR",)))
