"""PACS pull over DICOMweb: QIDO-RS search, WADO-RS retrieve (dicomweb-client)."""
from __future__ import annotations

from pathlib import Path

from .pacs_common import (PacsAuthError, PacsQuery, PacsTransferError, PacsUnavailable, PullReport, _cached,
                          _instance_path, _matches, _store, _touch_folder, series_folder)


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"


def _client(url: str, username: str | None, password: str | None, timeout: float):
    import requests
    from dicomweb_client import DICOMwebClient

    # A plain session: dicomweb-client's session helpers retry refused connections for ~30 s, which only
    # delays telling the owner the PACS is down. Busy answers (429/503/504) are still retried, briefly.
    session = requests.Session()
    if username is not None:
        session.auth = (username, password or "")
    client = DICOMwebClient(url, session=session, timeout=timeout)
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=200)
    return client


class _Calls:
    """Runs one dicomweb-client call; its failure becomes a PacsError naming the server, the step and,
    mid-transfer, how far the pull got (with the partial report attached)."""

    def __init__(self, where: str, timeout: float, report: PullReport):
        self.where, self.timeout, self.report = where, timeout, report

    def __call__(self, step: str, fn, *args, **kwargs):
        import requests

        where, report = self.where, self.report
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            progress = f"; taken {report.taken}, skipped {report.skipped} so far" if report.series else ""
            raise PacsUnavailable(f"{where} is not reachable ({step}): {type(exc).__name__}{progress}",
                                  report if report.series else None) from exc
        except requests.exceptions.Timeout as exc:
            raise PacsUnavailable(f"{where} timed out after {self.timeout} s ({step})", report) from exc
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise PacsAuthError(f"{where} refused our credentials (HTTP {status}) ({step})") from exc
            raise PacsTransferError(f"{where} answered HTTP {status} ({step}); taken {report.taken}, "
                                    f"skipped {report.skipped} so far", report) from exc
        except Exception as exc:
            raise PacsTransferError(f"{where} failed ({step}): {type(exc).__name__}: {exc}; taken "
                                    f"{report.taken} so far", report) from exc


def _study_filters(query: PacsQuery) -> dict:
    # Wildcard filters are matched here, not by the server: dicomweb-client percent-encodes "*", which
    # Orthanc 1.10's QIDO-RS then matches literally. Exact filters (dates, modality) go to the server.
    filters = {}
    if query.study_date():
        filters["StudyDate"] = query.study_date()
    if query.modality:
        filters["ModalitiesInStudy"] = query.modality
    return filters


def _pull_series(call: _Calls, client, cache: Path, study_uid: str, series_uid: str) -> None:
    """Retrieve every instance of one series that the cache lacks (report.series already counts it)."""
    report = call.report
    folder = series_folder(cache, series_uid)
    step = f"series {report.series} ({folder.name})"
    instances = call(f"QIDO-RS instance search, {step}", client.search_for_instances, study_uid, series_uid)
    _touch_folder(report, folder)
    for i_index, instance in enumerate(instances, 1):
        sop_uid = _value(instance, _SOP_UID)
        if _cached(_instance_path(cache, series_uid, sop_uid), sop_uid):
            report.skipped += 1
            continue
        ds = call(f"WADO-RS retrieve, {step}, instance {i_index}/{len(instances)}", client.retrieve_instance,
                  study_uid, series_uid, sop_uid)
        if str(ds.get("SOPInstanceUID", "")) != sop_uid:
            raise PacsTransferError(f"{call.where} sent another instance than asked ({step}, instance "
                                    f"{i_index}/{len(instances)})", report)
        _store(cache, ds, report)


def pull_dicomweb(
    url: str,
    cache: str | Path,
    query: PacsQuery | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 30.0,
) -> PullReport:
    """Search a DICOMweb server (QIDO-RS studies, then series) and retrieve (WADO-RS) every instance
    not already cached. `url` is the DICOMweb root, e.g. http://pacs:8042/dicom-web. No `query`: everything."""
    query = PacsQuery() if query is None else query
    cache = Path(cache)
    client = _client(url, username, password, timeout)
    report = PullReport(protocol="dicomweb")
    call = _Calls(f"DICOMweb server {url}", timeout, report)

    studies = call("QIDO-RS study search", client.search_for_studies, search_filters=_study_filters(query),
                   fields=["StudyDescription"])
    studies = [s for s in studies if _matches(query.study_description, _value(s, "00081030"))]
    report.studies = len(studies)
    for s_index, study in enumerate(studies, 1):
        study_uid = _value(study, _STUDY_UID)
        series_list = call(f"QIDO-RS series search in study {s_index}/{len(studies)}", client.search_for_series,
                           study_uid, search_filters={"Modality": query.modality} if query.modality else {},
                           fields=["SeriesDescription"])
        for series in series_list:
            if not _matches(query.series_description, _value(series, "0008103E")):
                continue
            report.series += 1
            _pull_series(call, client, cache, study_uid, _value(series, _SERIES_UID))
    return report
