"""PACS pull over DIMSE: C-FIND at study, series and image level, then C-GET (pynetdicom)."""
from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from .pacs_common import (PacsAuthError, PacsError, PacsQuery, PacsTransferError, PacsUnavailable, PullReport,
                          _cached, _instance_path, _matches, _store, _touch_folder, series_folder)


_STORAGE = ("CTImageStorage", "MRImageStorage", "EnhancedCTImageStorage", "EnhancedMRImageStorage",
            "SecondaryCaptureImageStorage", "SegmentationStorage", "PositronEmissionTomographyImageStorage",
            "RTStructureSetStorage")


class _Association:
    """One association with the PACS: C-FIND and C-GET whose failures raise PacsErrors naming the server and
    the step; the instances the PACS sends back during a C-GET (C-STORE to us) are stored in the cache."""

    def __init__(self, cache: Path, report: PullReport, where: str, calling_ae: str):
        self.cache, self.report, self.where, self.calling_ae = cache, report, where, calling_ae
        self.stored_errors: list[str] = []
        self.assoc = None

    def on_store(self, event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            _store(self.cache, ds, self.report)
        except Exception as exc:  # answer the PACS with a failure status; raise after the C-GET
            self.stored_errors.append(f"{type(exc).__name__}: {exc}")
            return 0xA700
        return 0x0000

    def open(self, host: str, port: int, called_ae: str, timeout: float) -> None:
        from pynetdicom import AE, build_role, evt, sop_class
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(FIND)
        ae.add_requested_context(GET)
        roles = []
        for name in _STORAGE:
            uid = getattr(sop_class, name)
            ae.add_requested_context(uid)
            roles.append(build_role(uid, scp_role=True))
        try:
            assoc = ae.associate(host, port, ae_title=called_ae, ext_neg=roles,
                                 evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        except Exception as exc:
            raise PacsUnavailable(f"{self.where} could not be reached: {type(exc).__name__}: {exc}") from exc
        if assoc.is_rejected:
            raise PacsAuthError(f"{self.where} rejected the association from AE title {self.calling_ae!r} "
                                "(not registered at the PACS, or wrong called AE title)")
        if not assoc.is_established:
            raise PacsUnavailable(f"{self.where} is not reachable or aborted the association (port closed, "
                                  "PACS down?)")
        self.assoc = assoc

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def find(self, level: str, step: str, **keys) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        ident = Dataset()
        ident.QueryRetrieveLevel = level
        for k, v in keys.items():
            setattr(ident, k, v)
        found = []
        for status, answer in self.assoc.send_c_find(ident, FIND):
            if not status:
                raise PacsTransferError(f"{self.where}: no answer to C-FIND ({step}); association lost", self.report)
            if status.Status in (0xFF00, 0xFF01):
                found.append(answer)
            elif status.Status != 0x0000:
                if status.Status in (0x0122, 0xA700, 0xA900, 0xC000) and level == "STUDY" and not found:
                    raise PacsAuthError(f"{self.where} refused C-FIND (status 0x{status.Status:04X}) ({step}); is "
                                        f"AE title {self.calling_ae!r} allowed to query?")
                raise PacsTransferError(f"{self.where}: C-FIND failed with status 0x{status.Status:04X} ({step})",
                                        self.report)
        return found

    def get(self, step: str, **keys) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        where, report = self.where, self.report
        ident = Dataset()
        for k, v in keys.items():
            setattr(ident, k, v)
        for status, _ in self.assoc.send_c_get(ident, GET):
            if not status:
                raise PacsTransferError(f"{where}: no answer to C-GET ({step}); association lost; taken "
                                        f"{report.taken} so far", report)
            if self.stored_errors:
                raise PacsTransferError(f"{where}: storing a received instance failed ({step}): "
                                        f"{self.stored_errors[0]}", report)
            if status.Status not in (0x0000, 0xFF00):
                raise PacsTransferError(f"{where}: C-GET failed with status 0x{status.Status:04X} ({step}); "
                                        f"taken {report.taken} so far", report)


def _pull_series(pacs: _Association, study_uid: str, series_uid: str) -> None:
    """C-GET the instances of one series that the cache lacks: the whole series when it has none of them,
    else one by one (report.series already counts the series)."""
    cache, report = pacs.cache, pacs.report
    folder = series_folder(cache, series_uid)
    step = f"series {report.series} ({folder.name})"
    instances = pacs.find("IMAGE", f"instance search, {step}", StudyInstanceUID=study_uid,
                          SeriesInstanceUID=series_uid, SOPInstanceUID="")
    _touch_folder(report, folder)
    missing = [str(i.SOPInstanceUID) for i in instances
               if not _cached(_instance_path(cache, series_uid, str(i.SOPInstanceUID)), str(i.SOPInstanceUID))]
    report.skipped += len(instances) - len(missing)
    if not missing:
        return
    if len(missing) == len(instances):
        pacs.get(step, QueryRetrieveLevel="SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        return
    for n, sop_uid in enumerate(missing, 1):
        pacs.get(f"{step}, missing instance {n}/{len(missing)}", QueryRetrieveLevel="IMAGE",
                 StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)


def _pull_studies(pacs: _Association, query: PacsQuery) -> None:
    report = pacs.report
    # Descriptions are asked for as return keys and matched here, as for DICOMweb.
    keys = dict(StudyInstanceUID="", StudyDate=query.study_date() or "", StudyDescription="")
    if query.modality:
        keys["ModalitiesInStudy"] = query.modality
    studies = [s for s in pacs.find("STUDY", "study search", **keys)
               if _matches(query.study_description, str(s.get("StudyDescription", "") or ""))]
    report.studies = len(studies)
    for s_index, study in enumerate(studies, 1):
        study_uid = str(study.StudyInstanceUID)
        series_list = pacs.find("SERIES", f"series search in study {s_index}/{len(studies)}",
                                StudyInstanceUID=study_uid, SeriesInstanceUID="",
                                Modality=query.modality or "", SeriesDescription="")
        for series in series_list:
            if not _matches(query.series_description, str(series.get("SeriesDescription", "") or "")):
                continue
            series_uid = str(series.SeriesInstanceUID)
            report.series += 1
            _pull_series(pacs, study_uid, series_uid)


def pull_dimse(
    host: str,
    port: int,
    cache: str | Path,
    query: PacsQuery | None = None,
    *,
    called_ae: str = "ORTHANC",
    calling_ae: str = "VOXGRID",
    timeout: float = 30.0,
) -> PullReport:
    """C-FIND (study, series, then image level) and C-GET every instance not already cached, over one
    association. The PACS must know `calling_ae` (and allow it C-FIND and C-GET). No `query`: everything."""
    query = PacsQuery() if query is None else query
    report = PullReport(protocol="dimse")
    where = f"DICOM server {called_ae}@{host}:{port}"
    pacs = _Association(Path(cache), report, where, calling_ae)
    pacs.open(host, port, called_ae, timeout)
    try:
        _pull_studies(pacs, query)
    except PacsError:
        raise
    except Exception as exc:
        raise PacsTransferError(f"{where}: transfer failed: {type(exc).__name__}: {exc}; taken {report.taken} so far",
                                report) from exc
    finally:
        pacs.release()
    return report
