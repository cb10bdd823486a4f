"""CT DICOM series: write one file per slice (`write_dicom_series`); reading lives in dicom_read.py
(`read_dicom_series`) and dicom_series.py (`list_series`, `SeriesRules`), re-exported here.

Geometry conventions: arrays are indexed [i, j, k] as nibabel would give them, i along the DICOM
row direction (columns of the pixel matrix), j along the column direction (rows), k along slices.
Affines map voxel indices to RAS+ mm; DICOM stores LPS+, so the first two rows flip sign.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from .dicom_read import read_dicom_series
from .dicom_series import SeriesRules, SeriesSummary, list_series
from .volume import VolumeError

__all__ = ["write_dicom_series", "read_dicom_series", "list_series", "SeriesRules", "SeriesSummary"]

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


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
