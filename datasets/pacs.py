"""Pulling DICOM series from a PACS into a node's cache: DICOMweb (QIDO-RS + WADO-RS, dicomweb-client)
or DIMSE (C-FIND + C-GET, pynetdicom).

The cache holds one folder per series, `<cache>/series-<hash>/<hash>.dcm` (hashes of the series and
SOP instance UIDs, so no UID becomes a case id or a file name), ready for `scan_folder(cache)`.
Pulls are resumable: an instance whose file is present and whose header carries the expected
SOPInstanceUID is skipped; files are written to a temporary name and renamed, so an interrupted
pull never leaves a partial file behind. Every pull returns a `PullReport` of what it took and
skipped; `PullReport.public()` holds counts only. Failures raise a `PacsError` subclass naming the
server, the step and, mid-transfer, how far it got (with the partial report attached).
"""
from .pacs_common import (PacsAuthError, PacsError, PacsQuery, PacsTransferError, PacsUnavailable, PullReport,
                          series_folder)
from .pacs_dicomweb import pull_dicomweb
from .pacs_dimse import pull_dimse

__all__ = ["PacsQuery", "PullReport", "PacsError", "PacsUnavailable", "PacsAuthError", "PacsTransferError",
           "pull_dicomweb", "pull_dimse", "series_folder"]
