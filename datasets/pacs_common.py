"""What both PACS protocols share: query filters, the pull report, errors, and the resumable cache."""
from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from .dicom_series import series_case_id



class PacsError(RuntimeError):
    """A PACS pull failed; `report` holds what was taken before the failure (None before any transfer)."""

    def __init__(self, message: str, report: PullReport | None = None):
        super().__init__(message)
        self.report = report


class PacsUnavailable(PacsError):
    """The PACS cannot be reached (down, wrong host or port, association refused)."""


class PacsAuthError(PacsError):
    """The PACS refused our credentials (HTTP 401/403) or our AE title."""


class PacsTransferError(PacsError):
    """The PACS answered a query or a retrieve with an error, or sent something unusable."""


def _date(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.strftime("%Y%m%d")
    text = str(value).replace("-", "")
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"date {value!r} is not YYYYMMDD or YYYY-MM-DD")
    return text


@dataclass(frozen=True)
class PacsQuery:
    """Query filters. modality: e.g. "CT" (series level); study_description / series_description:
    DICOM wildcard matches ("*ABDOMEN*"); study_date_from / study_date_to: inclusive dates
    (date objects or "YYYYMMDD" / "YYYY-MM-DD"), either may be open."""

    modality: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    study_date_from: str | _dt.date | None = None
    study_date_to: str | _dt.date | None = None

    def study_date(self) -> str | None:
        lo, hi = _date(self.study_date_from), _date(self.study_date_to)
        if not lo and not hi:
            return None
        return lo if lo and lo == hi else f"{lo}-{hi}"


@dataclass
class PullReport:
    """What one pull did. series: series matched; taken: instances stored now; skipped: instances
    already in the cache (verified by SOPInstanceUID); bytes: bytes written; folders: the cache
    folders (one per series) the pull touched."""

    protocol: str
    studies: int = 0
    series: int = 0
    taken: int = 0
    skipped: int = 0
    bytes: int = 0
    folders: list[Path] = field(default_factory=list)

    def public(self) -> dict:
        """Counts only: no UIDs, paths or descriptions."""
        return {"protocol": self.protocol, "studies": self.studies, "series": self.series, "taken": self.taken,
                "skipped": self.skipped, "bytes": self.bytes}


def _hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def series_folder(cache: str | Path, series_uid: str) -> Path:
    """The cache folder of a series: `<cache>/series-<sha256(uid)[:16]>` (its case id in scan_folder)."""
    return Path(cache) / series_case_id(series_uid)


def _instance_path(cache: Path, series_uid: str, sop_uid: str) -> Path:
    return series_folder(cache, series_uid) / f"{_hash(sop_uid)}.dcm"


def _cached(path: Path, sop_uid: str) -> bool:
    """Present and really that instance (header readable, SOPInstanceUID matches)."""
    if not path.is_file():
        return False
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == sop_uid
    except Exception:
        return False  # damaged: fetch again


def _store(cache: Path, ds: Dataset, report: PullReport) -> None:
    series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    path = _instance_path(cache, series_uid, sop_uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".part{os.getpid()}")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    report.taken += 1
    report.bytes += path.stat().st_size


def _touch_folder(report: PullReport, folder: Path) -> None:
    if folder not in report.folders:
        report.folders.append(folder)


def _matches(pattern: str | None, value: str) -> bool:
    """DICOM wildcard match (* and ?), case-insensitive; None matches anything."""
    return pattern is None or fnmatch.fnmatchcase(value.lower(), pattern.lower())
