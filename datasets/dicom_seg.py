"""DICOM SEG label maps, read with highdicom and placed on the image series they segment.

A SEG frame refers to the source image (SOP instance) it was drawn on, so the label map is built
slice by slice from those references, in our reader's slice order: no geometry is re-derived from
the SEG, and the label shares the image's affine exactly. Slices without a SEG frame are background.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .dicom_read import read_series_with_slices
from .dicom_series import SeriesRules
from .volume import Volume, VolumeError


def read_dicom_seg(
    seg_path: str | Path,
    image_folder: str | Path,
    *,
    series_uid: str | None = None,
    rules: SeriesRules | None = None,
) -> tuple[Volume, dict[int, str]]:
    """Read the image series a DICOM SEG refers to (found under `image_folder`; `series_uid` overrides
    the SEG's own reference) and the SEG as a uint8 label map on it (value = segment number).

    Returns (Volume with image, affine and label; {segment number: segment label}). Raises VolumeError
    naming the file for unreadable SEGs, overlapping segments, segment numbers over 255, or a SEG whose
    source images are not slices of that series.
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as exc:
        raise VolumeError(f"cannot read DICOM SEG {seg_path}: {type(exc).__name__}: {exc}") from exc
    sources = seg.get_source_image_uids()
    referenced = {series for _, series, _ in sources}
    if series_uid is None:
        if len(referenced) != 1:
            raise VolumeError(f"DICOM SEG {seg_path} refers to {len(referenced)} image series; pass series_uid=")
        series_uid = next(iter(referenced))
    volume, slices = read_series_with_slices(image_folder, series_uid, rules=rules)
    if slices is None or any(s.frame is not None for s in slices):
        raise VolumeError(f"DICOM SEG {seg_path}: only single-frame source series are supported")
    outside = {sop for _, _, sop in sources} - {s.sop_uid for s in slices}
    if outside:
        raise VolumeError(f"DICOM SEG {seg_path} does not fit series {series_uid}: {len(outside)} of its source "
                          "images are not slices of that series")
    numbers = list(seg.get_segment_numbers())
    if numbers and max(numbers) > 255:
        raise VolumeError(f"DICOM SEG {seg_path}: segment number {max(numbers)} does not fit a uint8 label map")
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[s.sop_uid for s in slices], combine_segments=True, relabel=False,
            assert_missing_frames_are_empty=True)
    except Exception as exc:  # overlapping segments, frames referring to other images, ...
        raise VolumeError(f"DICOM SEG {seg_path} does not fit series {series_uid}: {type(exc).__name__}: {exc}") from exc
    label = np.ascontiguousarray(np.asarray(pixels).transpose(2, 1, 0)).astype(np.uint8)  # (Z, Rows, Cols) -> (X, Y, Z)
    if label.shape != volume.image.shape:
        raise VolumeError(f"DICOM SEG {seg_path}: label shape {label.shape} does not match the image {volume.image.shape}")
    names = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    return Volume(image=volume.image, affine=volume.affine, label=label), names
