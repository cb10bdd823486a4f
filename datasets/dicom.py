"""CT DICOM series: write one file per slice, read a folder back into a Volume.

Geometry conventions: arrays are indexed [i, j, k] as nibabel would give them, i along the DICOM
row direction (columns of the pixel matrix), j along the column direction (rows), k along slices.
Affines map voxel indices to RAS+ mm; DICOM stores LPS+, so the first two rows flip sign.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from .volume import Volume, VolumeError

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_GAP_TOLERANCE = 0.01  # relative deviation of a slice gap from the series' median gap


def _ds(value: float) -> DSfloat:
    # auto_format keeps DS strings within 16 characters without us hand-rounding.
    return DSfloat(float(value), auto_format=True)


def _rescale_for(image_hu: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so every value fits int16; the usual CT -1024 / 1 whenever it can."""
    lo, hi = float(np.min(image_hu)), float(np.max(image_hu))
    if round(lo) + 1024 >= -32768 and round(hi) + 1024 <= 32767:
        return 1.0, -1024.0
    return (hi - lo) / 65534.0, (hi + lo) / 2.0


def write_dicom_series(
    out_dir: str | Path,
    image_hu: np.ndarray,
    affine: np.ndarray,
    *,
    patient_name: str = "PHANTOM^SITE",
    patient_id: str = "PHANTOM-0001",
    series_description: str = "phantom CT",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    institution_name: str = "Voxgrid Phantom Hospital",
    accession_number: str = "ACC0001",
    birth_date: str = "19700101",
    study_date: str = "20260101",
) -> Path:
    """Write `image_hu` (X, Y, Z, HU) as Z CT Image Storage files `out_dir/IM00000.dcm`, ...

    `affine` (4x4, voxel -> RAS mm) must have orthogonal in-plane axes. Pixels are int16 with
    RescaleSlope/Intercept (values round to 1 HU when the range allows). Every PHI field is filled
    in, so tests can check none of it leaks. SOP instance UIDs derive from the series UID, so a
    given series UID makes the output deterministic. Returns out_dir.
    """
    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3:
        raise VolumeError(f"DICOM series for {out_dir}: image must be 3-D (X, Y, Z), got shape {image_hu.shape}")
    lps = _LPS_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = np.linalg.norm(col_step), np.linalg.norm(row_step)
    if abs(np.dot(col_step, row_step)) > 1e-6 * dx * dy:
        raise VolumeError(f"DICOM series for {out_dir}: affine's in-plane axes are not orthogonal")
    orientation = [*(col_step / dx), *(row_step / dy)]

    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
    slope, intercept = _rescale_for(image_hu)
    stored = np.clip(np.rint((image_hu.astype(np.float64) - intercept) / slope), -32768, 32767).astype("<i2")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = image_hu.shape
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"IM{k:05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        # PHI, deliberately complete.
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = birth_date, "O"
        ds.AccessionNumber, ds.InstitutionName = accession_number, institution_name
        ds.ReferringPhysicianName = "REFERRER^PHANTOM"
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "voxgrid", series_description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition, ds.PositionReferenceIndicator = "HFS", ""
        ds.KVP = _ds(120)
        # Geometry.
        position = lps @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(dy), _ds(dx)]  # DICOM order: between rows, then between columns
        ds.SliceThickness = _ds(np.linalg.norm(slice_step))
        ds.SliceLocation = _ds(position[2])
        # Pixels.
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "HU"
        ds.WindowCenter, ds.WindowWidth = _ds(40), _ds(400)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (Rows=Y, Columns=X)
        ds.save_as(path, enforce_file_format=True)
    return out_dir


def _read_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Every DICOM image header under `folder` (recursive); non-DICOM files and non-image objects are skipped."""
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    found = []
    for path in paths:
        if path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM at all (README, thumbnails, ...)
        except Exception as exc:
            raise VolumeError(f"corrupt DICOM file {path}: {type(exc).__name__}: {exc}") from exc
        # Either copy of the SOP class may be the one a truncation damaged.
        classes = [c for c in (ds.file_meta.get("MediaStorageSOPClassUID"), ds.get("SOPClassUID")) if c]
        image_classes = [c.name for c in classes if "Image Storage" in c.name]
        if "Rows" in ds and "SeriesInstanceUID" in ds:  # SR, RTSTRUCT, presentation states have no Rows
            found.append((path, ds))
        elif image_classes:  # an image class without its image header: truncated or damaged
            raise VolumeError(f"corrupt DICOM file {path}: {image_classes[0]} object lacks Rows or SeriesInstanceUID")
    return found


def _select_series(folder: Path, headers, series_uid: str | None):
    by_series: dict[str, list] = defaultdict(list)
    for path, ds in headers:
        by_series[str(ds.SeriesInstanceUID)].append((path, ds))
    if not by_series:
        raise VolumeError(f"no DICOM image files found in {folder}")
    if series_uid is not None:
        if series_uid not in by_series:
            raise VolumeError(f"series {series_uid} not found in {folder}; it holds {sorted(by_series)}")
        return series_uid, by_series[series_uid]
    if len(by_series) > 1:
        listing = "; ".join(
            f"{uid} ({str(items[0][1].get('SeriesDescription', ''))!r}, {len(items)} images)"
            for uid, items in sorted(by_series.items())
        )
        raise VolumeError(f"{folder} holds {len(by_series)} image series, pass series_uid= to pick one: {listing}")
    return next(iter(by_series.items()))


def _geometry(series: str, items) -> tuple[list, np.ndarray]:
    """Sort slices along the normal; returns (sorted items, LPS affine)."""
    first = items[0][1]
    first_iop = np.array(first.ImageOrientationPatient, dtype=np.float64)
    for path, ds in items:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise VolumeError(f"series {series}: {path} lacks {tag}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"series {series}: {path} is multi-frame, which is not supported")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise VolumeError(f"series {series}: {path} is {ds.Rows}x{ds.Columns}, others {first.Rows}x{first.Columns}")
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=np.float64), first_iop, atol=1e-4):
            raise VolumeError(f"series {series}: {path} has a different ImageOrientationPatient")
        if not np.allclose(np.array(ds.PixelSpacing, float), np.array(first.PixelSpacing, float), rtol=1e-4):
            raise VolumeError(f"series {series}: {path} has a different PixelSpacing")

    row_dir, col_dir = first_iop[:3], first_iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.array(ds.ImagePositionPatient, dtype=np.float64) for _, ds in items])
    along = positions @ normal
    order = np.argsort(along, kind="stable")  # position, not InstanceNumber, which scanners reuse and reorder
    items, positions, along = [items[i] for i in order], positions[order], along[order]

    if len(items) > 1:
        gaps = np.diff(along)
        if np.min(gaps) < 1e-3:  # mm
            k = int(np.argmin(gaps))
            raise VolumeError(
                f"series {series}: two slices share position {along[k]:.3f} mm ({items[k][0]}, {items[k + 1][0]})"
            )
        expected = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - expected) > _GAP_TOLERANCE * expected)
        if bad.size:
            k = int(bad[0])
            raise VolumeError(
                f"series {series}: uneven slice gap of {gaps[k]:.3f} mm between slices at {along[k]:.3f} and "
                f"{along[k + 1]:.3f} mm (expected {expected:.3f} mm; missing or extra slice?)"
            )
        # Slice step from the end positions, so gantry tilt ends up in the affine rather than being ignored.
        slice_step = (positions[-1] - positions[0]) / (len(items) - 1)
    else:
        thickness = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)
        slice_step = normal * thickness

    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row, one column per step
    lps[:3, 1] = col_dir * row_spacing  # j: down a column, one row per step
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return items, lps


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read the one image series under `folder` (recursive) into a Volume (image float32 X, Y, Z in
    rescaled units, HU for CT; affine voxel -> RAS mm; label None).

    More than one image series needs `series_uid=`. Raises VolumeError naming the folder, series or
    file for corrupt files, inconsistent geometry and uneven slice gaps (> 1 % off the median).
    """
    folder = Path(folder)
    if not folder.exists():
        raise VolumeError(f"DICOM folder {folder} does not exist")
    uid, items = _select_series(folder, _read_headers(folder), series_uid)
    items, lps = _geometry(uid, items)

    nx, ny = int(items[0][1].Columns), int(items[0][1].Rows)
    image = np.empty((nx, ny, len(items)), dtype=np.float32)
    for k, (path, _) in enumerate(items):
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            raise VolumeError(f"series {uid}: cannot decode pixels of {path}: {type(exc).__name__}: {exc}") from exc
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        image[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T  # (Rows, Cols) -> (X, Y)
    return Volume(image=image, affine=_LPS_RAS @ lps, label=None)
