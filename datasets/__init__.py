"""Getting volumes in: NIfTI, DICOM series, synthetic multi-site phantoms (imports nothing else of voxgrid)."""
from .dicom import read_dicom_series, write_dicom_series
from .folder import VolumeSource, load_volume, scan_folder
from .nifti import read_nifti, write_nifti
from .phantoms import SiteSpec, default_sites, make_phantom, write_site
from .volume import Volume, VolumeError

__all__ = [
    "Volume", "VolumeError", "VolumeSource", "scan_folder", "load_volume", "read_nifti", "write_nifti",
    "read_dicom_series", "write_dicom_series", "SiteSpec", "default_sites", "make_phantom", "write_site",
]
