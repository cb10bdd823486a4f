"""NIfTI reading and writing through nibabel."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .volume import VolumeError


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a .nii / .nii.gz file.

    Returns (array, affine): the array in the file's stored dtype (float when the header scales it),
    shape (X, Y, Z[, ...]); the affine 4x4 float64, voxel index -> RAS mm.
    Raises VolumeError naming the file when it is missing, corrupt or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"NIfTI file {path} does not exist")
    try:
        img = nib.load(str(path))
        # nibabel loads lazily: touch the data here so truncated payloads fail now, with the file's name.
        array = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel, gzip and zlib raise a zoo of types for broken files
        raise VolumeError(f"cannot read NIfTI file {path}: {type(exc).__name__}: {exc}") from exc
    return np.asarray(array), affine


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write `array` (X, Y, Z) with `affine` (4x4, voxel -> RAS mm) to `path` (.nii.gz); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    # Code 1 ("scanner") on both forms so every reader agrees on the geometry.
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path
