"""Getting volumes in: NIfTI, DICOM series, PACS pulls (voxgrid.datasets.pacs), synthetic multi-site phantoms
(imports nothing else of voxgrid)."""
from .dicom import SeriesRules, SeriesSummary, list_series, read_dicom_series, write_dicom_series
from .dicom_seg import read_dicom_seg
from .dicom_series import series_case_id
from .folder import VolumeSource, load_volume, scan_dicom_export, scan_folder
from .nifti import read_nifti, write_nifti
from .phantoms import SiteSpec, default_sites, make_phantom, write_site
from .volume import Volume, VolumeError

__all__ = [
    "Volume", "VolumeError", "VolumeSource", "scan_folder", "load_volume", "read_nifti", "write_nifti",
    "read_dicom_series", "write_dicom_series", "list_series", "SeriesRules", "SeriesSummary",
    "read_dicom_seg", "scan_dicom_export", "series_case_id", "SiteSpec", "default_sites", "make_phantom", "write_site",
]
