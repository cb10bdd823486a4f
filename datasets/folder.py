"""Finding volumes in a site's folders and loading them with their label maps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .dicom import read_dicom_series
from .dicom_series import SeriesRules, SeriesSummary, list_series, series_case_id
from .nifti import read_nifti
from .volume import Volume, VolumeError

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_AFFINE_ATOL = 1e-3  # mm; DICOM DS strings and NIfTI float32 headers both round a little


@dataclass
class VolumeSource:
    """Where one case lives on disk. kind is "nifti" (image is a file) or "dicom" (image is a folder holding
    the series; `series_uid` picks it when the folder holds several, e.g. a whole export)."""

    case_id: str
    image: Path
    label: Path | None
    kind: str
    series_uid: str | None = None


class DataRoots:
    """The folders a node may read volumes from: a path whose fully resolved form (symlinks followed,
    ``..`` collapsed) lies outside every root is refused with a VolumeError naming the file and the roots.
    Checked at registration and again when a job loads the volumes (a symlink may be swapped later)."""

    def __init__(self, roots):
        self.roots = tuple(Path(r).resolve() for r in roots)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def _inside(self, resolved: Path) -> bool:
        return any(resolved == r or resolved.is_relative_to(r) for r in self.roots)

    def check_path(self, path: str | Path, what: str = "file", *, recursive: bool = True) -> None:
        """Refuse `path` (and, for a folder with `recursive`, everything under it, symlinked folders
        followed) unless each resolves inside a root; `what` names it in the error. No-op without roots."""
        if not self.roots:
            return
        seen: set[Path] = set()
        top = Path(path)
        pending = [top]
        while pending:
            entry = pending.pop()
            resolved = entry.resolve()
            if not self._inside(resolved):
                label = what if entry == top else f"{what}: {'folder' if resolved.is_dir() else 'file'}"
                via = f" (resolves to {resolved})" if str(resolved) != str(entry) else ""
                raise VolumeError(f"{label} {entry}{via} is outside the node's data roots "
                                  f"({', '.join(map(str, self.roots))})")
            if recursive and resolved.is_dir() and resolved not in seen:  # seen: a symlink loop ends here
                seen.add(resolved)
                pending.extend(sorted(entry.iterdir(), reverse=True))

    def check_source(self, source: VolumeSource) -> None:
        """Refuse a case whose image (file, or DICOM folder and every file in it) or label map escapes the roots."""
        self.check_path(source.image, f"case {source.case_id!r} image")
        if source.label is not None:
            self.check_path(source.label, f"case {source.case_id!r} label map")


def _nifti_case_id(path: Path) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _find_label(labels: Path, case_id: str) -> Path | None:
    for suffix in _NIFTI_SUFFIXES:
        candidate = labels / f"{case_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _existing_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise VolumeError(f"{what} folder {path} does not exist or is not a folder")
    return path


def _image_entries(images: Path) -> dict[str, tuple[Path, str]]:
    """case id -> (entry, kind) for the NIfTI files and non-empty DICOM subfolders of `images`."""
    found: dict[str, tuple[Path, str]] = {}
    for entry in sorted(images.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not any(p.is_file() for p in entry.rglob("*")):
                continue
            case_id, kind = entry.name, "dicom"
        elif (case_id := _nifti_case_id(entry)) is not None:
            kind = "nifti"
        else:
            continue
        if case_id in found:
            raise VolumeError(f"case {case_id!r} appears twice in {images}: {found[case_id][0].name} and {entry.name}")
        found[case_id] = (entry, kind)
    if not found:
        raise VolumeError(f"image folder {images} holds no NIfTI files and no DICOM series subfolders")
    return found


def scan_folder(images: str | Path, labels: str | Path | None = None) -> list[VolumeSource]:
    """List the cases in `images`: NIfTI files (case id = name without .nii/.nii.gz) and/or one
    subfolder per DICOM series (case id = subfolder name). With `labels`, every case needs
    `labels/<case_id>.nii.gz` (or .nii). Sorted by case_id. Nothing is read yet.
    """
    images = _existing_folder(images, "image")
    if labels is not None:
        labels = _existing_folder(labels, "label")
    found = _image_entries(images)

    sources = []
    for case_id in sorted(found):
        image, kind = found[case_id]
        label = None
        if labels is not None:
            label = _find_label(labels, case_id)
            if label is None:
                raise VolumeError(f"case {case_id!r} has no label map {case_id}.nii.gz in {labels}")
        sources.append(VolumeSource(case_id=case_id, image=image, label=label, kind=kind))
    return sources


def scan_dicom_export(
    folder: str | Path, rules: SeriesRules | None = None, labels: str | Path | None = None
) -> tuple[list[VolumeSource], list[SeriesSummary]]:
    """One case per series that `rules` accept anywhere under `folder` (an export or PACS dump with many
    series side by side), case id `series_case_id(uid)` (no UID); with `labels`, every case needs
    `labels/<case_id>.nii.gz`. Returns (sources sorted by case id, every series' summary, skipped ones
    included, for the ingest report). Nothing but headers is read."""
    folder = Path(folder)
    summaries = list_series(folder, rules)
    accepted = [s for s in summaries if s.accepted]
    if not accepted:
        raise VolumeError(f"no series under {folder} passes the series rules "
                          f"({len(summaries)} found: {sorted({s.skipped for s in summaries})})")
    sources = []
    for summary in accepted:
        case_id = series_case_id(summary.uid)
        label = None
        if labels is not None:
            label = _find_label(Path(labels), case_id)
            if label is None:
                raise VolumeError(f"case {case_id!r} has no label map {case_id}.nii.gz in {labels}")
        sources.append(VolumeSource(case_id=case_id, image=folder, label=label, kind="dicom", series_uid=summary.uid))
    return sorted(sources, key=lambda s: s.case_id), summaries


def _as_3d(array: np.ndarray, what: str) -> np.ndarray:
    # NIfTI writers often add trailing singleton time/channel axes.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{what} must be 3-D, got shape {array.shape}")
    return array


def _as_label(array: np.ndarray, case_id: str) -> np.ndarray:
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise VolumeError(f"case {case_id!r}: label map holds non-integer values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise VolumeError(f"case {case_id!r}: label values {array.min()}..{array.max()} are outside 0..255")
    return array.astype(np.uint8)


def load_volume(source: VolumeSource, *, allow_resample: bool = False) -> Volume:
    """Read a case's image (float32 X, Y, Z) and label (uint8, same shape and affine, or None).
    `allow_resample` (DICOM only): resample uneven gaps and gantry tilt instead of refusing the series."""
    if source.kind == "nifti":
        array, affine = read_nifti(source.image)
        image = _as_3d(array, f"case {source.case_id!r} image {source.image}").astype(np.float32)
    elif source.kind == "dicom":
        volume = read_dicom_series(source.image, source.series_uid, allow_resample=allow_resample)
        image, affine = volume.image, volume.affine
    else:
        raise VolumeError(f"case {source.case_id!r}: unknown kind {source.kind!r} (expected 'nifti' or 'dicom')")

    label = None
    if source.label is not None:
        label_array, label_affine = read_nifti(source.label)
        label_array = _as_3d(label_array, f"case {source.case_id!r} label {source.label}")
        if label_array.shape != image.shape:
            raise VolumeError(
                f"case {source.case_id!r}: label shape {label_array.shape} does not match image shape {image.shape}"
            )
        if not np.allclose(label_affine, affine, atol=_AFFINE_ATOL):
            raise VolumeError(
                f"case {source.case_id!r}: label affine does not match the image's (atol {_AFFINE_ATOL} mm)\n"
                f"image affine:\n{np.array2string(affine, precision=4)}\n"
                f"label affine:\n{np.array2string(label_affine, precision=4)}"
            )
        label = _as_label(label_array, source.case_id)
    return Volume(image=image, affine=affine, label=label)


def read_geometry(source: VolumeSource, *, allow_resample: bool = False) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A case image's shape (voxels, i j k) and spacing (mm) from headers only: the NIfTI header, or the
    DICOM series reader's header pass and slice geometry (no pixel data is decoded)."""
    if source.kind == "nifti":
        try:
            img = nib.load(str(source.image))  # lazy: reads the header, not the voxels
        except Exception as exc:
            raise VolumeError(f"cannot read NIfTI header of {source.image}: {type(exc).__name__}: {exc}") from exc
        shape, affine = tuple(img.shape), np.asarray(img.affine, dtype=np.float64)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise VolumeError(f"case {source.case_id!r} image {source.image} must be 3-D, got shape {shape}")
    elif source.kind == "dicom":
        from .dicom_read import _pick, geometry, scan_series

        summary = _pick(Path(source.image), scan_series(source.image), source.series_uid)
        slices, affine, targets, _ = geometry(summary.uid, summary.slice_list, summary.thickness, allow_resample)
        shape = (slices[0].columns, slices[0].rows, len(targets) if targets is not None else len(slices))
    else:
        raise VolumeError(f"case {source.case_id!r}: unknown kind {source.kind!r} (expected 'nifti' or 'dicom')")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
