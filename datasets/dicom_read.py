"""Reading one DICOM series into a Volume: slice order, geometry, gaps, pixels, optional resampling.

Geometry conventions: arrays are indexed [i, j, k] as nibabel would give them, i along the DICOM
row direction (columns of the pixel matrix), j along the column direction (rows), k along slices
in increasing position along the slice normal (row direction x column direction). Affines map
voxel indices to RAS+ mm; DICOM stores LPS+, so the first two rows flip sign.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom

from .dicom_series import SeriesRules, SeriesSummary, Slice, scan_series
from .volume import Volume, VolumeError

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
_GAP_TOLERANCE = 0.01  # relative deviation of a slice gap from the series' median gap


def _pick(folder: Path, summaries: list[SeriesSummary], series_uid: str | None) -> SeriesSummary:
    if all((s.skipped or "").startswith("non-image") for s in summaries):  # also: no DICOM at all
        raise VolumeError(f"no DICOM image files found in {folder}")
    if series_uid is not None:
        match = [s for s in summaries if s.uid == series_uid]
        if not match:
            raise VolumeError(f"series {series_uid} not found in {folder}; it holds {[s.uid for s in summaries]}")
        if match[0].skipped:
            raise VolumeError(f"series {series_uid} in {folder} is skipped: {match[0].skipped}")
        return match[0]
    accepted = [s for s in summaries if s.accepted]
    if not accepted:
        listing = "; ".join(f"{s.uid} ({s.skipped})" for s in summaries)
        raise VolumeError(f"no series in {folder} passes the series rules: {listing}")
    if len(accepted) > 1:
        listing = "; ".join(f"{s.uid} ({s.description!r}, {s.slices} images)" for s in accepted)
        raise VolumeError(f"{folder} holds {len(accepted)} image series, pass series_uid= to pick one: {listing}")
    return accepted[0]


def _where(s: Slice) -> str:
    return f"{s.path}" if s.frame is None else f"{s.path} frame {s.frame + 1}"


def geometry(series: str, slices: list[Slice], thickness: float | None = None, allow_resample: bool = False):
    """Sort slices along the normal and build the LPS affine.

    Returns (sorted slices, LPS affine, targets, shifts). Without `allow_resample` uneven gaps and
    gantry tilt (slices offset in-plane from one another, their stack not along the normal) are
    VolumeErrors naming the series. With it, `targets` (uneven gaps: positions along the normal of a
    regular grid) and `shifts` (tilt: per-slice in-plane shift in voxels (i, j) that stacks the
    slices along the normal) say how to resample; both are None when nothing needs resampling.
    """
    first = slices[0]
    for s in slices:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise VolumeError(f"series {series}: {_where(s)} is {s.rows}x{s.columns}, others {first.rows}x{first.columns}")
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise VolumeError(f"series {series}: {_where(s)} has a different ImageOrientationPatient")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise VolumeError(f"series {series}: {_where(s)} has a different PixelSpacing")

    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([s.position for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")  # position, not InstanceNumber, which scanners reuse and reorder
    slices, positions, along = [slices[i] for i in order], positions[order], along[order]

    targets = shifts = None
    if len(slices) > 1:
        gaps = np.diff(along)
        if np.min(gaps) < 1e-3:  # mm
            k = int(np.argmin(gaps))
            raise VolumeError(f"series {series}: two slices share position {along[k]:.3f} mm "
                              f"({_where(slices[k])}, {_where(slices[k + 1])})")
        expected = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - expected) > _GAP_TOLERANCE * expected)
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
        offsets = (positions - positions[0]) - np.outer(along - along[0], normal)  # in-plane drift per slice
        drift = np.linalg.norm(offsets, axis=1)
        if np.max(drift) > 1e-3 * max(1.0, along[-1] - along[0]):
            tilt = np.degrees(np.arctan2(drift[-1], along[-1] - along[0]))
            if not allow_resample:
                raise VolumeError(
                    f"series {series}: gantry tilt of {tilt:.2f} degrees (slices drift {drift[-1]:.2f} mm in-plane "
                    f"over {along[-1] - along[0]:.2f} mm); the owner may allow resampling (allow_resample=True)")
            shifts = np.stack([offsets @ row_dir / first.pixel_spacing[1], offsets @ col_dir / first.pixel_spacing[0]], 1)
            slice_step = normal * (along[-1] - along[0]) / (len(slices) - 1)
        if bad.size:
            k = int(bad[0])
            if not allow_resample:
                raise VolumeError(
                    f"series {series}: uneven slice gap of {gaps[k]:.3f} mm between slices at {along[k]:.3f} and "
                    f"{along[k + 1]:.3f} mm (expected {expected:.3f} mm; missing or extra slice?); "
                    "the owner may allow resampling (allow_resample=True)")
            n = int(round((along[-1] - along[0]) / expected)) + 1
            targets = np.linspace(along[0], along[-1], n)
            slice_step = normal * (along[-1] - along[0]) / (n - 1) if shifts is not None else \
                (positions[-1] - positions[0]) / (n - 1)
    else:
        slice_step = normal * (thickness or 1.0)

    row_spacing, col_spacing = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row, one column per step
    lps[:3, 1] = col_dir * row_spacing  # j: down a column, one row per step
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return slices, lps, targets, shifts


def untilt_slices(image: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Gantry tilt: shift each slice in-plane by `shifts[k]` voxels (i, j) with linear interpolation, so
    the slices stack along the normal; voxels shifted in from outside the field take the image minimum."""
    from scipy.ndimage import shift

    out = np.empty_like(image)
    fill = float(image.min())
    for k in range(image.shape[2]):
        out[:, :, k] = shift(image[:, :, k], shifts[k], order=1, mode="constant", cval=fill)
    return out


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


def _raw_plane(s: Slice) -> np.ndarray | None:
    """The stored values of an uncompressed single-frame slice, read at the offset the header pass found,
    masked or sign-extended to BitsStored as pydicom's pixel_array does; None when the bytes there are not
    a plain Pixel Data element of the expected size (then pydicom decodes the file)."""
    raw = s.raw
    dtype = np.dtype(raw.dtype)
    count = s.rows * s.columns
    with open(s.path, "rb") as f:
        f.seek(raw.offset)
        head = f.read(12 if raw.explicit_vr else 8)
        if head[:4] != _PIXEL_DATA_TAG or (raw.explicit_vr and head[4:6] not in (b"OW", b"OB")):
            return None
        length = int.from_bytes(head[-4:], "little")
        if length == 0xFFFFFFFF or length < count * dtype.itemsize:  # encapsulated, or short
            return None
        plane = np.fromfile(f, dtype=dtype, count=count)
    if plane.size != count:  # truncated file: let pydicom name the problem
        return None
    bits = dtype.itemsize * 8
    if raw.bits_stored < bits:
        if dtype.kind == "u":
            plane &= (1 << raw.bits_stored) - 1
        else:
            shift = bits - raw.bits_stored
            plane = (plane << shift) >> shift
    return plane.reshape(s.rows, s.columns)


def _store(out: np.ndarray, plane: np.ndarray, s: Slice) -> None:
    """out[:] = plane * slope + intercept (float32). In float32 directly when that is exact (integer
    values below 2**24, slope 1, integer intercept: the usual CT case), else through float64."""
    if s.slope == 1.0 and float(s.intercept).is_integer() and plane.dtype.kind in "iu" and plane.dtype.itemsize <= 2:
        np.add(plane, np.float32(s.intercept), out=out, dtype=np.float32)
    else:
        out[:] = plane.astype(np.float64) * s.slope + s.intercept


def _pixels(series: str, slices: list[Slice]) -> np.ndarray:
    """Rescaled float32 (X, Y, Z) stack in the given slice order; each file is decoded once.

    Slices are filled into a contiguous (Z, Rows, Columns) buffer, one contiguous plane at a time, and
    returned as its (X, Y, Z) transposed view (Fortran-ordered): no per-slice transposes or copies.
    Uncompressed single-frame files are read straight from their bytes (RawPixels); other transfer
    syntaxes and multi-frame objects decode through pydicom (pylibjpeg / pyjpegls plugins)."""
    first = slices[0]
    stack = np.empty((len(slices), first.rows, first.columns), dtype=np.float32)
    by_path: dict[Path, list[int]] = defaultdict(list)
    for k, s in enumerate(slices):
        plane = _raw_plane(s) if s.raw is not None else None
        if plane is None:
            by_path[s.path].append(k)
        else:
            _store(stack[k], plane, s)
    for path, ks in by_path.items():
        try:
            data = pydicom.dcmread(path).pixel_array  # compressed syntaxes decode through pylibjpeg / pyjpegls
        except Exception as exc:
            raise VolumeError(f"series {series}: cannot decode pixels of {path}: {type(exc).__name__}: {exc}") from exc
        for k in ks:
            s = slices[k]
            plane = data if s.frame is None or data.ndim == 2 else data[s.frame]  # one frame comes unstacked
            if plane.shape != (s.rows, s.columns):
                raise VolumeError(f"series {series}: {_where(s)} decodes to shape {plane.shape}, "
                                  f"expected {(s.rows, s.columns)}")
            _store(stack[k], plane, s)
    return stack.transpose(2, 1, 0)  # (Z, Rows, Cols) -> (X, Y, Z)


def resample_slices(image: np.ndarray, along: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation along k: each target position takes the two acquired slices around it,
    weighted by distance (a target on an acquired slice copies it). In-plane voxels are untouched and
    nothing is extrapolated (targets lie between the first and last slice)."""
    upper = np.clip(np.searchsorted(along, targets, side="left"), 1, len(along) - 1)
    lower = upper - 1
    w = ((targets - along[lower]) / (along[upper] - along[lower])).astype(np.float32)
    return image[:, :, lower] * (1 - w) + image[:, :, upper] * w


def read_dicom_series(
    folder: str | Path,
    series_uid: str | None = None,
    *,
    rules: SeriesRules | None = None,
    allow_resample: bool = False,
) -> Volume:
    """Read one image series under `folder` (recursive) into a Volume (image float32 X, Y, Z in
    rescaled units, HU for CT; affine voxel -> RAS mm; label None).

    The series is the one named by `series_uid`, or the only one `rules` accept (localizers, scouts,
    non-image objects and series failing the rules are skipped: see `list_series`). Enhanced
    multi-frame CT/MR objects are read frame by frame from their functional groups. Compressed
    transfer syntaxes decode with the pylibjpeg / pyjpegls plugins.

    Uneven slice gaps (> 1 % off the median gap, e.g. a missing slice) raise a VolumeError naming the
    series and the gap; with `allow_resample=True` the slices are instead linearly interpolated onto a
    regular grid from the first to the last slice with (about) the median gap (`resample_slices`).
    Gantry tilt (the slice stack sheared off the normal) is likewise an error unless `allow_resample`,
    which shifts each slice in-plane with linear interpolation onto an orthogonal grid (`untilt_slices`).
    """
    return read_series_with_slices(folder, series_uid, rules=rules, allow_resample=allow_resample)[0]


def read_series_with_slices(
    folder: str | Path,
    series_uid: str | None = None,
    *,
    rules: SeriesRules | None = None,
    allow_resample: bool = False,
) -> tuple[Volume, list[Slice] | None]:
    """As read_dicom_series, plus the slices in k order (None when resampled), for DICOM SEG placement."""
    folder = Path(folder)
    summary = _pick(folder, scan_series(folder, rules), series_uid)
    slices, lps, targets, shifts = geometry(summary.uid, summary.slice_list, summary.thickness, allow_resample)
    image = _pixels(summary.uid, slices)
    if shifts is not None:
        image = untilt_slices(image, shifts)
    if targets is not None:
        normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
        image = resample_slices(image, np.array([s.position for s in slices]) @ normal, targets)
    if targets is not None or shifts is not None:
        return Volume(image=image, affine=_LPS_RAS @ lps, label=None), None
    return Volume(image=image, affine=_LPS_RAS @ lps, label=None), slices
