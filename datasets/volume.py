"""The in-memory volume every reader returns, and the error every reader raises."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class VolumeError(ValueError):
    """A volume could not be read or is inconsistent; the message names the file, series or case."""


@dataclass
class Volume:
    """One image and its optional label map.

    image: float32, shape (X, Y, Z); Hounsfield units for CT. Any memory order: the DICOM reader returns
        the (X, Y, Z) view of a slice-contiguous buffer (Fortran order) rather than pay for a transposing copy.
    affine: float64, shape (4, 4); voxel index (i, j, k) -> RAS+ millimetres (nibabel convention).
    label: uint8, shape (X, Y, Z), 0 = background, or None when the volume is unlabelled.
    """

    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: the lengths of the affine's first three columns."""
        norms = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))
