"""PACS pull over DIMSE: C-FIND at study, series and image level, then C-GET (pynetdicom)."""
from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from .pacs_common import (PacsAuthError, PacsError, PacsQuery, PacsTransferError, PacsUnavailable, PullReport,
                          _cached, _instance_path, _matches, _store, _touch_folder, series_folder)


_STORAGE = ("CTImageStorage", "MRImageStorage", "EnhancedCTImageStorage", "EnhancedMRImageStorage",
            "SecondaryCaptureImageStorage", "SegmentationStorage", "PositronEmissionTomographyImageStorage",
            "RTStructureSetStorage")


def pull_dimse(
    host: str,
    port: int,
    cache: str | Path,
    query: PacsQuery = PacsQuery(),
    *,
    called_ae: str = "ORTHANC",
    calling_ae: str = "VOXGRID",
    timeout: float = 30.0,
) -> PullReport:
    """C-FIND (study, series, then image level) and C-GET every instance not already cached, over one
    association. The PACS must know `calling_ae` (and allow it C-FIND and C-GET)."""
    from pynetdicom import AE, build_role, evt, sop_class
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    cache = Path(cache)
    report = PullReport(protocol="dimse")
    where = f"DICOM server {called_ae}@{host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(FIND)
    ae.add_requested_context(GET)
    roles = []
    for name in _STORAGE:
        uid = getattr(sop_class, name)
        ae.add_requested_context(uid)
        roles.append(build_role(uid, scp_role=True))
    stored_errors: list[str] = []

    def on_store(event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            _store(cache, ds, report)
        except Exception as exc:  # answer the PACS with a failure status; raise after the C-GET
            stored_errors.append(f"{type(exc).__name__}: {exc}")
            return 0xA700
        return 0x0000

    try:
        assoc = ae.associate(host, port, ae_title=called_ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except Exception as exc:
        raise PacsUnavailable(f"{where} could not be reached: {type(exc).__name__}: {exc}") from exc
    if assoc.is_rejected:
        raise PacsAuthError(f"{where} rejected the association from AE title {calling_ae!r} "
                            "(not registered at the PACS, or wrong called AE title)")
    if not assoc.is_established:
        raise PacsUnavailable(f"{where} is not reachable or aborted the association (port closed, PACS down?)")

    def find(level: str, step: str, **keys) -> list[Dataset]:
        ident = Dataset()
        ident.QueryRetrieveLevel = level
        for k, v in keys.items():
            setattr(ident, k, v)
        found = []
        for status, answer in assoc.send_c_find(ident, FIND):
            if not status:
                raise PacsTransferError(f"{where}: no answer to C-FIND ({step}); association lost", report)
            if status.Status in (0xFF00, 0xFF01):
                found.append(answer)
            elif status.Status != 0x0000:
                if status.Status in (0x0122, 0xA700, 0xA900, 0xC000) and level == "STUDY" and not found:
                    raise PacsAuthError(f"{where} refused C-FIND (status 0x{status.Status:04X}) ({step}); is "
                                        f"AE title {calling_ae!r} allowed to query?")
                raise PacsTransferError(f"{where}: C-FIND failed with status 0x{status.Status:04X} ({step})", report)
        return found

    def get(step: str, **keys) -> None:
        ident = Dataset()
        for k, v in keys.items():
            setattr(ident, k, v)
        for status, _ in assoc.send_c_get(ident, GET):
            if not status:
                raise PacsTransferError(f"{where}: no answer to C-GET ({step}); association lost; taken "
                                        f"{report.taken} so far", report)
            if stored_errors:
                raise PacsTransferError(f"{where}: storing a received instance failed ({step}): "
                                        f"{stored_errors[0]}", report)
            if status.Status not in (0x0000, 0xFF00):
                raise PacsTransferError(f"{where}: C-GET failed with status 0x{status.Status:04X} ({step}); "
                                        f"taken {report.taken} so far", report)

    try:
        # Descriptions are asked for as return keys and matched here, as for DICOMweb.
        keys = dict(StudyInstanceUID="", StudyDate=query.study_date() or "", StudyDescription="")
        if query.modality:
            keys["ModalitiesInStudy"] = query.modality
        studies = [s for s in find("STUDY", "study search", **keys)
                   if _matches(query.study_description, str(s.get("StudyDescription", "") or ""))]
        report.studies = len(studies)
        for s_index, study in enumerate(studies, 1):
            study_uid = str(study.StudyInstanceUID)
            series_list = find("SERIES", f"series search in study {s_index}/{len(studies)}",
                               StudyInstanceUID=study_uid, SeriesInstanceUID="",
                               Modality=query.modality or "", SeriesDescription="")
            for series in series_list:
                if not _matches(query.series_description, str(series.get("SeriesDescription", "") or "")):
                    continue
                series_uid = str(series.SeriesInstanceUID)
                report.series += 1
                folder = series_folder(cache, series_uid)
                step = f"series {report.series} ({folder.name})"
                instances = find("IMAGE", f"instance search, {step}", StudyInstanceUID=study_uid,
                                 SeriesInstanceUID=series_uid, SOPInstanceUID="")
                _touch_folder(report, folder)
                missing = [str(i.SOPInstanceUID) for i in instances
                           if not _cached(_instance_path(cache, series_uid, str(i.SOPInstanceUID)), str(i.SOPInstanceUID))]
                report.skipped += len(instances) - len(missing)
                if not missing:
                    continue
                if len(missing) == len(instances):
                    get(step, QueryRetrieveLevel="SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
                else:
                    for n, sop_uid in enumerate(missing, 1):
                        get(f"{step}, missing instance {n}/{len(missing)}", QueryRetrieveLevel="IMAGE",
                            StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=sop_uid)
    except PacsError:
        raise
    except Exception as exc:
        raise PacsTransferError(f"{where}: transfer failed: {type(exc).__name__}: {exc}; taken {report.taken} so far",
                                report) from exc
    finally:
        if assoc.is_established:
            assoc.release()
    return report
