"""The protocol between the node server and its worker process: typed messages over a pipe.

Every message crosses as one JSON frame (``model_dump_json``; the receiver validates it with
``model_validate_json``). Bytes follow in frames of their own: a :class:`RunJob`'s start weights, and
a :class:`JobDone`'s update when it has one, as raw safetensors. Nothing is pickled: the worker
handles data the scientist sent, so it gets only bytes that it validates.

Server to worker: :class:`RunJob`. Worker to server: :class:`WorkerReady`, :class:`JobStarted`,
:class:`JobDone`, :class:`JobFailed`. A frame that is none of these raises :class:`ProtocolError`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from voxgrid.datasets.folder import VolumeSource
from voxgrid.privacy.metrics import MetricsRelease
from voxgrid.wire import JobRequest, Metrics


class ProtocolError(ValueError):
    """A frame on the worker pipe that is not a message of this protocol (unknown, or malformed)."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- what a job runs on ---------------------------------------------------------------------------
class VolumeSpec(_Message):
    """One volume of a dataset as the registry holds it (private paths: never leaves the node)."""

    case_id: str
    image: str
    label: str | None = None
    kind: str  # "nifti" or "dicom"; the reader names any other
    split: str
    series_uid: str | None = None  # DICOM: which series of the image folder
    allow_resample: bool = False  # DICOM: uneven gaps / gantry tilt accepted at registration
    patient: str | None = None  # DP-SGD's unit of privacy; None: the volume is its own patient

    def source(self) -> VolumeSource:
        return VolumeSource(case_id=self.case_id, image=self.image, label=self.label, kind=self.kind,
                            series_uid=self.series_uid)


class DatasetSpec(_Message):
    """What the worker needs of a dataset: its label values, its volumes and the node's data roots."""

    label_names: dict[int, str]  # label value at this site -> class name
    volumes: list[VolumeSpec]
    fingerprint: str  # of the volume records: a re-registered dataset must not hit a stale in-memory copy
    data_roots: list[str] = []  # checked again before any file is read (a symlink may have been swapped)


# --- server -> worker -----------------------------------------------------------------------------
class RunJob(_Message):
    """Run one job; its start weights follow as one raw frame."""

    job_id: str
    request: JobRequest
    dataset: DatasetSpec
    metrics_release: MetricsRelease | None = None  # as reserved in the ledger: how the metrics may leave
    max_steps_per_job: int | None = None  # the owner's limit, checked again on the volumes the worker loads


# --- worker -> server -----------------------------------------------------------------------------
class WorkerReady(_Message):
    """Imports done: the worker takes a job at once. ``device``: the device type it runs jobs on
    ("cuda", "cpu"), as it resolved the node's setting ("auto" may have fallen back to the CPU)."""

    event: Literal["ready"] = "ready"
    device: str


class JobStarted(_Message):
    event: Literal["started"] = "started"
    job_id: str


class JobDone(_Message):
    """A job's metrics; with ``has_update``, its update (after the privacy filters) follows as one frame."""

    event: Literal["done"] = "done"
    job_id: str
    metrics: Metrics
    has_update: bool = False
    # The update frame, attached by the receiver; never part of the JSON frame.
    update: bytes | None = Field(None, exclude=True, repr=False)


class JobFailed(_Message):
    event: Literal["failed"] = "failed"
    job_id: str
    error: str
    # The worker exits right after this message (its CUDA context is broken): the server hands it no
    # further job and starts a fresh worker when its pipe closes.
    worker_exits: bool = False


WorkerEvent = Annotated[Union[WorkerReady, JobStarted, JobDone, JobFailed], Field(discriminator="event")]
_EVENTS: TypeAdapter[WorkerEvent] = TypeAdapter(WorkerEvent)


def _problems(exc: ValidationError) -> str:
    # Locations and reasons only: the input may be a whole plan.
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<frame>'}: {e['msg']}"
                     for e in exc.errors(include_url=False, include_input=False)[:5])


def parse_event(data: bytes | str | dict) -> WorkerEvent:
    """A worker event from a JSON frame (or, in process, its fields); :class:`ProtocolError` if it is none."""
    try:
        return _EVENTS.validate_python(data) if isinstance(data, dict) else _EVENTS.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"not a worker event: {_problems(exc)}") from None


def parse_job(data: bytes | str | dict) -> RunJob:
    """A :class:`RunJob` from a JSON frame (or its fields); :class:`ProtocolError` if malformed."""
    try:
        return RunJob.model_validate(data) if isinstance(data, dict) else RunJob.model_validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"not a job for the worker: {_problems(exc)}") from None


# --- framing --------------------------------------------------------------------------------------
def send(conn, msg: _Message, blob: bytes | None = None) -> None:
    """One message as a JSON frame, then ``blob`` (weights, an update) as a raw frame if given."""
    conn.send_bytes(msg.model_dump_json().encode())
    if blob is not None:
        conn.send_bytes(blob)


def recv_job(conn) -> tuple[RunJob, bytes]:
    """The next job and its start weights (both frames read first, so a bad one leaves the pipe in step)."""
    frame, weights = conn.recv_bytes(), conn.recv_bytes()
    return parse_job(frame), weights


def recv_event(conn) -> WorkerEvent:
    """The next worker event, a :class:`JobDone` with its update frame attached."""
    event = parse_event(conn.recv_bytes())
    if isinstance(event, JobDone):
        event = event.model_copy(update={"update": conn.recv_bytes() if event.has_update else None})
    return event
