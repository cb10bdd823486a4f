"""Finding the series in a DICOM export and deciding which of them are volumes.

A real export folder mixes what a scanner and a PACS produce: the axial series one wants, scouts
and localizers, reformats, structured reports, segmentations, dose reports. `scan_series` reads
every header once (no pixels), groups files by SeriesInstanceUID, turns each series into a list of
2-D slices (one per single-frame file, one per frame of an enhanced multi-frame object) and decides,
with the owner's `SeriesRules`, whether it is a volume to read or is skipped, and why.

PHI: a `SeriesSummary` holds the series UID and description for the owner's eyes on the node;
`SeriesSummary.public()` is the allowlisted part (modality, slice count, skip reason, notes),
and skip reasons and notes are built from fixed phrases, never from header values other than
modality, SOP class names and counts.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .volume import VolumeError

_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
DEFAULT_EXCLUDE = r"\b(localizer|localiser|scout|topogram|surview|scanogram|pilot)s?\b"


@dataclass(frozen=True)
class SeriesRules:
    """Which series of a folder count as volumes (owner-settable).

    modalities: accepted Modality values (e.g. ("CT",)); empty accepts any.
    description: regex the SeriesDescription must match (re.search, case-insensitive); None accepts any.
    exclude_description: regex that, when it matches the SeriesDescription, skips the series
        (default: localizer / scout / topogram / surview / pilot); None disables it.
    min_slices: series with fewer 2-D slices (files or frames) are skipped.
    """

    modalities: tuple[str, ...] = ()
    description: str | None = None
    exclude_description: str | None = DEFAULT_EXCLUDE
    min_slices: int = 1

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(m.upper() for m in self.modalities))
        for pattern in (self.description, self.exclude_description):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise VolumeError(f"series rule regex {pattern!r} is invalid: {exc}") from exc
        if self.min_slices < 1:
            raise VolumeError(f"series rule min_slices must be at least 1, got {self.min_slices}")


@dataclass(frozen=True)
class Slice:
    """One 2-D image: a single-frame file (frame None) or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (row direction, column direction)
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float
    rows: int
    columns: int
    sop_uid: str = ""  # the file's SOPInstanceUID (for matching DICOM SEG frames to their source slice)
    raw: RawPixels | None = None  # where the pixels lie in an uncompressed file; None: decode with pydicom


@dataclass(frozen=True)
class RawPixels:
    """Uncompressed little-endian pixels of a single-frame file: read straight from the file at `offset`
    (the Pixel Data element's tag, found by the header pass), skipping a second parse of the header."""

    offset: int
    explicit_vr: bool
    dtype: str  # numpy dtype of the stored values, e.g. "<i2"
    bits_stored: int


@dataclass
class SeriesSummary:
    """One series found in a folder. `uid` and `description` are PHI-adjacent: keep them on the node;
    `public()` is what may leave it."""

    uid: str
    modality: str
    description: str
    slices: int
    skipped: str | None = None
    notes: tuple[str, ...] = ()
    slice_list: list[Slice] = field(default_factory=list, repr=False)
    thickness: float | None = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        return self.skipped is None

    def public(self) -> dict:
        """The allowlisted part: no UID, no description, no path, no date, no name."""
        return {"modality": self.modality, "slices": self.slices, "skipped": self.skipped, "notes": list(self.notes)}


def series_case_id(series_uid: str) -> str:
    """A case id for a series that is not its UID: "series-" + the first 16 hex digits of its SHA-256."""
    return "series-" + hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def _floats(value) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)


def _is_localizer(ds) -> bool:
    return any("LOCALIZER" in str(v).upper() for v in (ds.get("ImageType") or []))


def _rescale(item, fallback) -> tuple[float, float]:
    seq = item.get("PixelValueTransformationSequence") if item is not None else None
    src = seq[0] if seq else fallback
    slope = float(src.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(src.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _frames(path: Path, ds) -> list[Slice]:
    """Slices of an enhanced multi-frame object from its functional groups (per-frame over shared)."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = int(ds.NumberOfFrames)
    if len(per_frame) != n:
        raise VolumeError(f"multi-frame file {path}: {n} frames but {len(per_frame)} per-frame functional groups "
                          "(plane positions are needed)")

    def pick(frame_item, keyword):
        for item in (frame_item, shared):
            if item is not None and item.get(keyword):
                return item.get(keyword)[0]
        return None

    out = []
    for f, item in enumerate(per_frame):
        pos, ori, meas = pick(item, "PlanePositionSequence"), pick(item, "PlaneOrientationSequence"), \
            pick(item, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise VolumeError(f"multi-frame file {path}: frame {f + 1} lacks plane position, orientation or "
                              "pixel spacing in its functional groups")
        transform = item if item.get("PixelValueTransformationSequence") else shared
        slope, intercept = _rescale(transform, ds)
        out.append(Slice(path, f, _floats(pos.ImagePositionPatient), _floats(ori.ImageOrientationPatient),
                         tuple(float(v) for v in meas.PixelSpacing), slope, intercept, int(ds.Rows), int(ds.Columns),
                         str(ds.get("SOPInstanceUID", ""))))
    return out


_NATIVE_LE = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # transfer syntax -> explicit VR


def _raw_pixels(ds) -> RawPixels | None:
    """RawPixels for a single-frame, one-sample, uncompressed little-endian file; None otherwise."""
    explicit = _NATIVE_LE.get(str(ds.file_meta.get("TransferSyntaxUID", "")))
    offset = getattr(ds, "_voxgrid_pixel_offset", None)
    bits, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if explicit is None or offset is None or bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return RawPixels(offset, explicit, f"<{'i' if signed else 'u'}{bits // 8}", stored)


def _read_headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Every DICOM file under `folder` (recursive; a file is taken alone), headers only. Non-DICOM files
    are ignored; a damaged DICOM file is a VolumeError naming it. Each dataset carries
    `_voxgrid_pixel_offset`: where pydicom stopped, at the Pixel Data element (see RawPixels)."""
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    found = []
    for path in paths:
        if path.name.startswith(".") or path.name == "DICOMDIR":
            continue
        try:
            with open(path, "rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
                ds._voxgrid_pixel_offset = fp.tell()  # pydicom rewinds to the tag it stopped at
        except InvalidDicomError:
            continue  # not DICOM at all (README, thumbnails, ...)
        except Exception as exc:
            raise VolumeError(f"corrupt DICOM file {path}: {type(exc).__name__}: {exc}") from exc
        classes = [c for c in (ds.file_meta.get("MediaStorageSOPClassUID"), ds.get("SOPClassUID")) if c]
        image_classes = [c.name for c in classes if "Image Storage" in c.name]
        if image_classes and ("Rows" not in ds or "SeriesInstanceUID" not in ds):  # truncated or damaged
            raise VolumeError(f"corrupt DICOM file {path}: {image_classes[0]} object lacks Rows or SeriesInstanceUID")
        found.append((path, ds))
    return found


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    return uid.name if uid else "unknown SOP class"


class _Skip(Exception):
    """A series that is not a usable volume; the message is the reason it is skipped."""


def _image_objects(items: list[tuple[Path, pydicom.Dataset]], notes: list[str]) -> list[tuple[Path, pydicom.Dataset]]:
    """The objects with pixel data (Rows); presentation states, reports, ... are noted and ignored."""
    images = [(p, ds) for p, ds in items if "Rows" in ds]
    if not images:
        raise _Skip(f"non-image object ({_sop_name(items[0][1])})")
    if len(images) < len(items):
        notes.append(f"ignored {len(items) - len(images)} non-image object(s)")
    return images


def _volume_images(images: list[tuple[Path, pydicom.Dataset]], notes: list[str]) -> list[tuple[Path, pydicom.Dataset]]:
    """The images that may form a volume: no segmentation or colour series; localizer images dropped."""
    if any(ds.get("SOPClassUID") == _SEGMENTATION for _, ds in images):
        raise _Skip("segmentation object (a label map, not an image)")
    if any(int(ds.get("SamplesPerPixel", 1) or 1) != 1 for _, ds in images):
        raise _Skip("colour image (SamplesPerPixel is not 1)")
    kept = [(p, ds) for p, ds in images if not _is_localizer(ds)]
    if not kept:
        raise _Skip("localizer (ImageType LOCALIZER)")
    if len(kept) < len(images):
        notes.append(f"dropped {len(images) - len(kept)} localizer image(s) (ImageType LOCALIZER)")
    return kept


def _slices(kept: list[tuple[Path, pydicom.Dataset]]) -> list[Slice]:
    """One Slice per frame: enhanced objects by their per-frame groups, classic ones by their own geometry."""
    slices: list[Slice] = []
    for path, ds in kept:
        if ds.get("PerFrameFunctionalGroupsSequence"):  # enhanced CT/MR (one or more files, any frame count)
            slices.extend(_frames(path, ds))
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise _Skip("multi-frame object without per-frame functional groups (no plane positions)")
        missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if t not in ds]
        if missing:
            raise _Skip(f"no patient geometry ({', '.join(missing)} missing; projection or secondary capture)")
        slope, intercept = _rescale(None, ds)
        slices.append(Slice(path, None, _floats(ds.ImagePositionPatient), _floats(ds.ImageOrientationPatient),
                            tuple(float(v) for v in ds.PixelSpacing), slope, intercept,
                            int(ds.Rows), int(ds.Columns), str(ds.get("SOPInstanceUID", "")), _raw_pixels(ds)))
    return slices


def _single_orientation(slices: list[Slice], notes: list[str]) -> list[Slice]:
    """Orientation: a single slice in another plane is a localizer; several planes are not a volume."""
    keys = [tuple(np.round(s.orientation, 3)) for s in slices]
    counts = Counter(keys)
    if len(counts) <= 1:
        return slices
    main, n_main = counts.most_common(1)[0]
    if n_main >= 2 and all(c == 1 for k, c in counts.items() if k != main):
        notes.append(f"dropped {len(slices) - n_main} single slice(s) in another orientation (localizer)")
        return [s for s, k in zip(slices, keys, strict=True) if k == main]
    raise _Skip(f"mixed orientations ({len(counts)} planes; multi-planar localizer?)")


def _check_rules(rules: SeriesRules, modality: str, description: str, n_slices: int) -> None:
    """The site's selection rules: modality, description (and its exclusion), minimum slice count."""
    if rules.modalities and modality not in rules.modalities:
        raise _Skip(f"modality {modality or 'missing'} not in {list(rules.modalities)}")
    if rules.description is not None and not re.search(rules.description, description, re.IGNORECASE):
        raise _Skip("series description does not match the rule")
    if rules.exclude_description is not None and re.search(rules.exclude_description, description, re.IGNORECASE):
        raise _Skip("series description matches the exclusion rule (localizer/scout)")
    if n_slices < rules.min_slices:
        raise _Skip(f"{n_slices} slice(s), fewer than the minimum {rules.min_slices}")


def _classify(uid: str, items: list[tuple[Path, pydicom.Dataset]], rules: SeriesRules) -> SeriesSummary:
    first = items[0][1]
    modality = str(first.get("Modality", "") or "").upper()
    description = str(first.get("SeriesDescription", "") or "")
    summary = SeriesSummary(uid=uid, modality=modality, description=description, slices=0)
    notes: list[str] = []
    try:
        images = _image_objects(items, notes)
        summary.slices = sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in images)
        slices = _slices(_volume_images(images, notes))
        summary.slices = len(slices)
        slices = _single_orientation(slices, notes)
        summary.slices, summary.slice_list = len(slices), slices
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        summary.thickness = float(thickness) if thickness else None
        _check_rules(rules, modality, description, len(slices))
    except _Skip as skip:
        summary.skipped = str(skip)
    summary.notes = tuple(notes)
    return summary


def scan_series(folder: str | Path, rules: SeriesRules | None = None) -> list[SeriesSummary]:
    """Every series under `folder` (recursive), accepted or skipped with a reason, sorted by UID."""
    folder = Path(folder)
    if not folder.exists():
        raise VolumeError(f"DICOM folder {folder} does not exist")
    rules = rules or SeriesRules()
    by_series: dict[str, list] = defaultdict(list)
    for path, ds in _read_headers(folder):
        by_series[str(ds.get("SeriesInstanceUID", "") or "(no series UID)")].append((path, ds))
    return [_classify(uid, items, rules) for uid, items in sorted(by_series.items())]


def list_series(folder: str | Path, rules: SeriesRules | None = None) -> list[SeriesSummary]:
    """Summaries of every series under `folder`: uid, modality, description, slice count, skip reason,
    notes. Use `[s.public() for s in ...]` for anything that leaves the node."""
    return scan_series(folder, rules)
