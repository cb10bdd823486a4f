"""The data node's service layer: typed messages in, typed messages out.

Transports (the HTTPS routes today, an outbound long-poll transport later) are thin adapters
over :class:`NodeService`; they authenticate the caller, then call one method here. Errors are
:class:`ServiceError` subclasses carrying an HTTP-like status and a message for the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

import voxgrid
from voxgrid import tensors
from voxgrid.plan import Plan, PlanError
from voxgrid.privacy import (AccountingError, BudgetExceeded, BudgetStatus, Ledger, LedgerError, LedgerView,
                             PrivacySpec, PrivacySpecError, TrainingContext)
from voxgrid.privacy.calibration import is_derived
from voxgrid.privacy.metrics import MetricsRelease, dice_sensitivity
from voxgrid.privacy.secagg import SecAggError
from voxgrid.wire import (NAME_RE, AdvertisedKeys, AuditEntry, BudgetSet, DatasetInfo, EncryptedShare, Estimate,
                          EstimateRequest, Health, JobRequest, JobStatus, NodeInfo, RevealedShare,
                          RevealRequest, SecAggKeysRequest, SecAggMaskedRequest, SecAggSharesRequest, TokenInfo,
                          TokenIssue, TokenIssued, WeightsRef, WhoAmI)

from voxgrid.nodes.service.blobs import BlobStore, OverQuota, StoragePolicy
from voxgrid.nodes.service.db import TokenError, UnknownToken
from voxgrid.nodes.service.executor import Executor
from voxgrid.nodes.service.pool import ExecutorPool, executor_for
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.limits import HourlyQuota, JobLimits, LimitExceeded, check_plan
from voxgrid.nodes.service.secure import NodeSecAgg, SecureAggregationRefused, parse_config
from voxgrid.nodes.service.store import NodeStore, new_job_id
from voxgrid.nodes.service.waits import JobWaits
from voxgrid.nodes.worker.messages import JobDone, JobFailed, JobStarted, parse_event

log = logging.getLogger("voxgrid.node")

#: Long-polls (GET /v1/jobs/{id}?wait=) one caller may have waiting at once; an experiment needs one per job.
MAX_WAITS_PER_CALLER = 8

_PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s'\":,]+)+")
_UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")  # DICOM UIDs: dotted digit strings


def redact(text: str) -> str:
    """Strip file paths and DICOM UIDs from a message before it leaves the node (invariant 1)."""
    return _UID_RE.sub("<uid>", _PATH_RE.sub("<path>", text))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class BlobCache:
    """The ``keep`` most recent blobs by key, at most ``max_bytes`` together, thread-safe (the durable
    copies are on disk: a blob larger than the cache is not kept in memory)."""

    def __init__(self, keep: int, max_bytes: int = 1 << 30):
        self.keep, self.max_bytes = keep, max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while self._items and (len(self._items) > self.keep
                                   or sum(len(v) for v in self._items.values()) > self.max_bytes):
                self._items.popitem(last=False)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def discard(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


class ServiceError(Exception):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Unauthorized(ServiceError):
    status, title = 401, "Unauthorized"


class Forbidden(ServiceError):
    status, title = 403, "Forbidden"


class NotFound(ServiceError):
    status, title = 404, "Not found"


class Invalid(ServiceError):
    status, title = 422, "Invalid request"


class TooLarge(ServiceError):
    status, title = 413, "Request too large"


class QuotaExceeded(TooLarge):
    """An upload past the scientist's storage quota (nodes/service/blobs.py): a 4xx, the caller's to fix by reuse or
    by waiting for expiry, not a node fault a client would retry (507) nor a rate limit (429)."""

    title = "Storage quota exceeded"


class TooManyWaits(ServiceError):
    """The caller already has its share of long-polls waiting; ``retry_after`` seconds is a fair pause."""

    status, title = 429, "Too many requests"
    retry_after = 1


class TooManyJobs(ServiceError):
    status, title = 429, "Too many jobs"


class TooManyTargets(ServiceError):
    """429: the scientist asked for more new DP-SGD privacy targets this hour than the node derives."""

    status, title = 429, "Too many new privacy targets"


class BudgetRefused(Forbidden):
    """The job's projected privacy spend exceeds a budget the owner set (invariant 5)."""

    title = "Privacy budget exceeded"


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


def authenticate(db, token: str | None) -> Caller:
    """The caller a bearer token belongs to (``db`` is a :class:`~voxgrid.nodes.service.db.Database`)."""
    if not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    found = db.check_token(token)
    if not found:
        raise Unauthorized("unknown or revoked token")
    return Caller(*found)


def require(caller: Caller, *roles: str) -> None:
    if caller.role not in roles:
        raise Forbidden(f"role '{caller.role}' may not do this; it needs one of: {', '.join(roles)}")


DATA_REFUSED = ("voxgrid data nodes never release voxels, label maps, file paths or DICOM headers: "
                "dataset {name!r} is available only through jobs that run at the node "
                "(build a Plan and an Experiment). Only its published metadata can be read.")


class NodeService:
    def __init__(self, home: Home, *, start_executor: bool = True):
        self.home = home
        self.config = home.load()
        self.store = NodeStore(home.db_file)
        # The ledger shares the node's SQLite file but has its own connection (and durable commits).
        self.ledger = Ledger(home.db_file)
        self._cond = threading.Condition()
        self.waits = JobWaits(MAX_WAITS_PER_CALLER)  # long-polls that hold no thread (job_status_wait)
        # Recent weights and updates stay in memory so a round never waits on the disk; the durable
        # copies are written beside (weights in the background, updates right after "done").
        self._weights = BlobCache(keep=4)
        self._updates = BlobCache(keep=8)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer")
        # Who keeps which weights, quotas and expiry (nodes/service/blobs.py); the sweep evicts the caches too.
        self.storage = StoragePolicy.parse(self.config.storage)
        self.blobs = BlobStore(self.store, home, self.storage, evict_weights=self._weights.discard,
                               evict_update=self._updates.discard)
        self._sweeper = None
        self.secagg = NodeSecAgg(self.config.name, home.tls)
        self.executor: Executor | ExecutorPool | None = None
        self.limits = JobLimits.parse(self.config.limits)
        self._targets = HourlyQuota(self.limits.max_new_dp_targets_per_hour)  # new DP-SGD targets, a scientist
        from voxgrid.nodes.service.approvals import Approvals  # here: approvals.py imports this module's errors

        self.approvals = Approvals(self.store, self.config.name, self._approval_estimate)  # the owner's decisions (policies, requests)
        if start_executor:
            # FedBN-style site-kept tensors persist in the home, so a restarted node keeps them.
            # One worker per GPU on a machine with several (nodes/service/gpus.py), else one.
            self.executor = executor_for(self._on_event, device=self.config.device, threads=self.config.threads,
                                         state_dir=home.path / "local-state", cache_dir=home.cache / "prepared",
                                         limits=self.limits)
            self._recover()
            self._sweeper = self.blobs.start_sweeper()  # now, then every storage.sweep_minutes

    def close(self) -> None:
        if self._sweeper:
            self._sweeper.stop()
        if self.executor:
            if hasattr(self.executor, "running_jobs"):  # a pool: one job per worker
                running = self.executor.running_jobs()
            else:
                running = [self.executor.running()] if hasattr(self.executor, "running") else []
            self.executor.close()
            for job in (self.store.job(j) for j in running if j):
                if job is not None and job.state == "running":  # stopped by a shutdown, not by itself: no restart counted
                    self.store.set_job(job.job_id, "queued")
        self._writer.shutdown(wait=True)
        self.ledger.close()
        self.store.close()

    # auth --------------------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Caller:
        return authenticate(self.store, token)

    require = staticmethod(require)

    # public metadata ---------------------------------------------------------------------------
    def health(self, caller: Caller) -> Health:
        return Health(name=self.config.name, version=voxgrid.__version__)

    def whoami(self, caller: Caller) -> WhoAmI:
        return WhoAmI(name=caller.name, role=caller.role)

    def info(self, caller: Caller | None = None) -> NodeInfo:
        """The node's published description; ``caller`` None: the node itself (registering with its grid)."""
        if caller is not None:
            self.require(caller, "owner", "scientist")
        device = self.executor_device()
        return NodeInfo(name=self.config.name, url=self.public_url(), version=voxgrid.__version__,
                        device=device, datasets=[d.info() for d in self.store.datasets()],
                        connect=self.config.connect)

    def public_url(self) -> str:
        """Where scientists reach us; in outbound mode, only the name our certificate must carry."""
        if self.config.public_url:
            return self.config.public_url
        if self.config.connect == "outbound":
            return f"https://{self.config.name}:443"
        return f"https://{self.config.host}:{self.config.port}"

    def executor_device(self) -> str:
        """The device type jobs run on: as the worker reported it once ready (what "auto" became there,
        the CPU included when it fell back), else as the node's setting and this process's torch say."""
        reported = getattr(self.executor, "worker_device", None)
        if isinstance(reported, str) and reported:
            return reported
        if self.config.device != "auto":
            return self.config.device.split(":")[0]
        from voxgrid.nodes.worker.devices import probe_torch

        return "cuda" if probe_torch().usable else "cpu"

    def datasets(self, caller: Caller) -> list[DatasetInfo]:
        self.require(caller, "owner", "scientist")
        return [d.info() for d in self.store.datasets()]

    def dataset(self, caller: Caller, name: str) -> DatasetInfo:
        self.require(caller, "owner", "scientist")
        return self._dataset(name).info()

    def dataset_data(self, caller: Caller, name: str) -> None:
        """Any request for voxels is refused, for every role, and audited."""
        self.require(caller, "owner", "scientist")
        self._dataset(name)
        self.store.audit(caller.name, "data.refused", f"request for the data of dataset {name}")
        raise Forbidden(DATA_REFUSED.format(name=name))

    def _dataset(self, name: str):
        ds = self.store.dataset(name)
        if ds is None:
            known = ", ".join(d.name for d in self.store.datasets()) or "none"
            raise NotFound(f"no dataset named {name!r} at node {self.config.name!r} (datasets here: {known})")
        return ds

    # jobs --------------------------------------------------------------------------------------
    def admit_upload(self, caller: Caller) -> None:
        """Whether ``caller`` may upload weights, asked before a transport reads the body (up to 512 MiB)."""
        self.require(caller, "scientist", "owner")

    def put_weights(self, caller: Caller, data: bytes) -> WeightsRef:
        self.admit_upload(caller)
        try:
            state = tensors.loads(data)
            tensors.check_finite(state)  # NaN weights would switch off the update's clip downstream
        except tensors.TensorsError as exc:
            raise Invalid(str(exc)) from exc
        if not state:
            raise Invalid("the weights blob holds no tensors")
        weights_id = hashlib.sha256(data).hexdigest()
        try:  # charged to the caller (identical bytes again: free); the owner's uploads are recorded, not capped
            self.blobs.admit(caller.name, weights_id, len(data), exempt=caller.role == "owner")
        except OverQuota as exc:
            self.store.audit(caller.name, "weights.refused", str(exc))
            raise QuotaExceeded(f"node {self.config.name!r}: {exc}") from None
        self._weights.put(weights_id, data)
        path = self.home.blobs / f"{weights_id}.safetensors"
        if not path.exists():
            self._writer.submit(_write_atomic, path, data)
        return WeightsRef(weights_id=weights_id, bytes=len(data))

    def _weights_blob(self, weights_id: str) -> bytes | None:
        blob = self._weights.get(weights_id)
        if blob is None:
            path = self.home.blobs / f"{weights_id}.safetensors"
            blob = path.read_bytes() if path.is_file() else None
        return blob

    def submit(self, caller: Caller, req: JobRequest) -> JobStatus:
        self.require(caller, "scientist", "owner")
        ds = self._dataset(req.dataset)
        try:
            plan = Plan.model_validate(req.plan)
        except (ValidationError, PlanError, ValueError) as exc:
            self.store.audit(caller.name, "job.refused", f"plan refused: {exc}")
            raise Invalid(f"plan refused by node {self.config.name!r}: {exc}") from exc
        if plan.content_hash != req.plan_hash:
            raise Invalid(f"plan hash mismatch: request says {req.plan_hash}, plan hashes to {plan.content_hash}")
        try:
            spec = PrivacySpec.parse(plan.privacy)
        except PrivacySpecError as exc:
            self.store.audit(caller.name, "job.refused", f"privacy spec refused: {exc}")
            raise Invalid(f"privacy spec refused by node {self.config.name!r}: {exc}") from exc
        if req.kind == "train":
            self._check_secure(caller, req, spec)
        self._check_limits(caller, plan, req, ds)
        self._check_target(caller.name, spec, plan, ds)
        if req.weights_id not in self._weights and not (self.home.blobs / f"{req.weights_id}.safetensors").is_file():
            raise Invalid(f"unknown weights {req.weights_id}: upload them first (PUT /v1/weights)")
        split = "train" if req.kind == "train" else req.split
        if not any(v.split == split for v in ds.volumes):
            raise Invalid(f"dataset {req.dataset!r} has no volumes in its {split!r} split")
        existing = self.store.find_job(caller.name, req)
        if existing:
            return self._status(existing)
        self._check_queue(caller)
        job_id = new_job_id()
        # A 'review' dataset: one release of the owner's approval (ApprovalNeeded, 403, records a request).
        approval = self.approvals.consume(caller, req.dataset, req.plan, plan.content_hash, job_id)
        # Reserve the spend before the job exists: a crash in between leaves a reservation with
        # no job (given back at the next start), never a job whose spend was not checked.
        try:
            self._reserve(caller, req, ds, plan, spec, job_id)
            job = self.store.add_job(caller.name, req, job_id=job_id)
        except BaseException:
            self.ledger.cancel(job_id)
            self.approvals.refund(approval, job_id)
            raise
        self.store.audit(caller.name, "job.submit",
                         f"{req.kind} job {job.job_id} on {req.dataset}, experiment {req.experiment_id} "
                         f"round {req.round}, plan {plan.content_hash}")
        self._dispatch(job.job_id, req, caller.name)
        return job.status(False)

    def _reserve(self, caller: Caller, req: JobRequest, ds, plan: Plan, spec: PrivacySpec | None, job_id: str) -> None:
        """Reserve what the job releases: its update (train jobs) and, on a budgeted dataset, its metrics."""
        metrics = self._metrics_release(caller, req, ds, plan, spec)
        if req.kind != "train" and metrics is None:
            return  # an evaluate job where no budget applies releases nothing the ledger bounds
        train = req.kind == "train"
        try:
            # DP-SGD's cost depends on the train split's patients and the plan's schedule.
            context = TrainingContext.of(plan, ds.volumes) if train and spec is not None and spec.dp_sgd else None
            self.ledger.reserve(job_id, caller.name, req.dataset, spec if train else None, context, metrics)
        except BudgetExceeded as exc:
            self.store.audit(caller.name, "job.refused", str(exc))
            raise BudgetRefused(str(exc)) from exc
        except AccountingError as exc:
            self.store.audit(caller.name, "job.refused", str(exc))
            raise Invalid(f"plan.privacy refused by node {self.config.name!r}: {exc}") from exc

    def _metrics_release(self, caller: Caller, req: JobRequest, ds, plan: Plan,
                         spec: PrivacySpec | None) -> MetricsRelease | None:
        """How the job's metrics may leave (:mod:`voxgrid.privacy.metrics`); None where no budget applies."""
        if not self.ledger.applies(req.dataset, caller.name):
            return None
        train = req.kind == "train"
        scored = ("val" if req.evaluate else None) if train else req.split
        noise = spec.noise if spec else None
        if scored and noise is None:
            self.store.audit(caller.name, "job.refused", f"unnoised metrics on budgeted dataset {req.dataset}")
            raise BudgetRefused(
                f"dataset {req.dataset!r} has a privacy budget, so the Dice this job would report is a release: give "
                "the plan a noise filter (plan.privacy 'gaussian_update' or 'dp_sgd'), whose noise multiplier the "
                "node uses to noise and account it" + (", or submit with evaluate=False" if train else ""))
        site = set(ds.label_names.values())
        classes = sum(1 for name in plan.labels[1:] if name in site)
        if not (classes and scored and any(v.split == scored for v in ds.volumes)):
            return MetricsRelease(dice="not computed", loss="withheld" if train else "not computed")
        # A DP-SGD target's noise multiplier is derived here from this dataset's patients, never taken as sent.
        try:
            z = spec.noise_multiplier(TrainingContext.of(plan, ds.volumes) if spec.dp_sgd else None)
        except ValueError as exc:  # AccountingError too: a target no noise multiplier meets
            raise Invalid(f"plan.privacy refused by node {self.config.name!r}: {exc}") from exc
        return MetricsRelease(dice="noised", loss="withheld" if train else "not computed", split=scored,
                              noise_multiplier=z, delta=noise.delta,
                              sensitivity=dice_sensitivity(ds.volumes, scored, classes))

    def _check_limits(self, caller: Caller, plan: Plan, req: JobRequest, ds) -> None:
        """The owner's job limits (:class:`~.limits.JobLimits`), before anything is reserved or queued."""
        try:
            extent = (ds.shape_range[1], ds.spacing_range[1]) if ds.shape_range and ds.spacing_range else None
            check_plan(plan, self.limits, ds.volumes, req.kind, extent)
        except LimitExceeded as exc:
            self.store.audit(caller.name, "job.refused", f"over the node's limits: {exc}")
            raise Invalid(f"plan refused by node {self.config.name!r}: {exc}") from None

    def _check_queue(self, caller: Caller) -> None:
        if (n := self.store.count_jobs(caller.name, ("queued", "running"))) >= self.limits.max_queued_jobs:
            self.store.audit(caller.name, "job.refused", f"{n} jobs queued or running")
            raise TooManyJobs(f"{caller.name!r} has {n} jobs queued or running at node {self.config.name!r}, its "
                              f"limit is {self.limits.max_queued_jobs}: wait for some to finish or cancel them")

    def cancel_job(self, caller: Caller, job_id: str) -> JobStatus:
        """Cancel a queued or running job: a scientist its own jobs, the owner any. The job fails with
        "cancelled by <who>" and its privacy reservation is given back; a finished job is left as it is."""
        self.require(caller, "scientist", "owner")
        job = self._own_job(caller, job_id)
        if job.state not in ("queued", "running"):
            return self._status(job)
        reason = f"cancelled by {caller.name}" + (" (the node's owner)" if caller.role == "owner" else "")
        self.store.audit(caller.name, "job.cancel", f"job {job_id} of {job.scientist} ({job.state})")
        where = self.executor.cancel(job_id, reason) if hasattr(self.executor, "cancel") else None
        if where == "running":  # the worker is killed; its reader records the failure with the reason
            with self._cond:
                self._cond.wait_for(lambda: self.store.job(job_id).state not in ("queued", "running"), timeout=30)
        elif self.store.job(job_id).state in ("queued", "running"):
            self.ledger.cancel(job_id)
            self.store.set_job(job_id, "failed", error=reason)
            with self._cond:
                self._cond.notify_all()
            if hasattr(self, "waits"):  # long-polls held without a thread
                self.waits.wake(job_id)
        return self._status(self.store.job(job_id))

    def _check_secure(self, caller: Caller, req: JobRequest, spec: PrivacySpec | None) -> None:
        """A train job of an experiment that asked for secure aggregation must ask for it too, and so
        must one whose noise is distributed (each node adds only its share)."""
        if req.secure is None:
            if spec is not None and spec.gaussian is not None and spec.gaussian.distributed:
                raise Invalid("plan.privacy: a distributed 'gaussian_update' adds only a share of the noise at "
                              "each node, so it needs secure aggregation (Experiment(secure_aggregation=True))")
            if self.store.experiment_is_secure(caller.name, req.experiment_id):
                self.store.audit(caller.name, "job.refused", f"unmasked job in secure experiment {req.experiment_id}")
                raise Forbidden(f"experiment {req.experiment_id!r} asked for secure aggregation: node "
                                f"{self.config.name!r} releases its updates only masked")
            return
        try:
            parse_config(req.secure, self.config.name, req.experiment_id, req.round)
        except SecureAggregationRefused as exc:
            raise Invalid(f"secure aggregation refused by node {self.config.name!r}: {exc}") from None

    def _dispatch(self, job_id: str, req: JobRequest, scientist: str = "") -> None:
        ds = self.store.dataset(req.dataset)
        vols = [v.__dict__ for v in ds.volumes]
        # Everything that changes what the worker loads: a re-registered dataset must not hit a stale cache.
        fingerprint = hashlib.sha256(repr(sorted(sorted(v.items()) for v in vols)).encode())
        if self.executor is None:
            raise ServiceError("this node has no executor")
        # The executor queues the job (fairly across scientists) and reads its weights when its turn comes.
        self.executor.submit({"job_id": job_id, "request": req.model_dump(mode="json"),
                              "dataset": {"label_names": {str(k): v for k, v in ds.label_names.items()},
                                          "volumes": vols, "fingerprint": fingerprint.hexdigest(),
                                          "data_roots": [str(r) for r in self.home.data_roots(self.config).roots]},
                              "scientist": scientist, "metrics_release": self._recorded_release(job_id)},
                             lambda: self._weights_blob(req.weights_id))

    def _recorded_release(self, job_id: str) -> dict | None:
        """The metrics release reserved for the job (also after a restart), for the worker to apply."""
        entry = self.ledger.entry(job_id)
        release = MetricsRelease.in_parameters(entry.parameters) if entry else None
        return release.model_dump() if release else None

    def _recover(self) -> None:
        """After a restart, queue again the jobs that were queued or running when the node stopped.

        A job found running counts one restart; past the owner's ``max_job_restarts`` it fails instead
        (a plan that takes the node down must not take it down at every start). A job over limits
        the owner lowered since it was submitted fails too.
        """
        for job in reversed(self.store.jobs(states=("queued", "running"))):
            error = self._recover_refusal(job)
            if error:
                log.warning("job %s not run again: %s", job.job_id, error)
                self.store.set_job(job.job_id, "failed", error=error)
                self.store.audit("executor", "job.failed", f"{job.job_id}: {error}")
                continue
            log.info("recovering job %s", job.job_id)
            self.store.set_job(job.job_id, "queued")
            self._dispatch(job.job_id, job.request, job.scientist)
        for entry in self.ledger.entries(states=("reserved",)):
            job = self.store.job(entry.job_id)
            if job is None or job.state == "failed":  # nothing was released: give the spend back
                self.ledger.cancel(entry.job_id)
        for job in self.store.jobs(states=("done",)):
            if job.request.kind == "train" and not self._has_update(job.job_id):
                self.store.set_job(job.job_id, "failed", error="the update was lost when the node stopped",
                                   metrics=job.metrics)

    def _recover_refusal(self, job) -> str | None:
        """Why a job the node stopped during must not run again, or None."""
        if job.state == "running":
            restarts, cap = self.store.add_restart(job.job_id), self.limits.max_job_restarts
            if restarts > cap:
                return (f"the node stopped while this job was running, {restarts} times; it is not run again "
                        f"(the node's limit is {cap} restart{'s' * (cap != 1)} per job)")
        ds = self.store.dataset(job.request.dataset)
        try:
            if ds is not None:
                check_plan(Plan.model_validate(job.request.plan), self.limits, ds.volumes, job.request.kind)
        except (LimitExceeded, PlanError, ValueError) as exc:
            return f"refused after the node restarted: {exc}"
        return None

    def _on_event(self, msg: JobStarted | JobDone | JobFailed | dict) -> None:
        """An executor event (:mod:`voxgrid.nodes.worker.messages`; a dict is validated into one first)."""
        msg = parse_event(msg) if isinstance(msg, dict) else msg
        job_id, event = msg.job_id, msg.event
        update = msg.update if isinstance(msg, JobDone) else None
        if event == "started":
            self.store.set_job(job_id, "running")
        elif event == "done" and self.approvals.revoked_job(job_id):
            update = None
            self._withhold(job_id, f"withheld: the owner revoked approval {self.approvals.revoked_job(job_id)} "
                                   "while the job ran; nothing it computed leaves the node")
        elif event == "done":
            # Invariant 5: the ledger entry is committed before the update becomes downloadable.
            # Metrics on a budgeted dataset are a release too: an evaluate job has an entry of its own.
            if (update is not None or self.ledger.entry(job_id) is not None) and not self._release(job_id):
                update = None  # withheld: _release failed the job
            else:
                if update is not None:
                    self._updates.put(job_id, update)
                self.store.set_job(job_id, "done", metrics=msg.metrics)
                self.store.audit("executor", "job.done", job_id)
        elif event == "failed":
            self.ledger.cancel(job_id)
            self.store.set_job(job_id, "failed", error=redact(msg.error))
            self.store.audit("executor", "job.failed", job_id)
        with self._cond:
            self._cond.notify_all()
        self.waits.wake(job_id)
        if update is not None:
            _write_atomic(self.home.updates / f"{job_id}.safetensors", update)

    def _withhold(self, job_id: str, error: str) -> None:
        """End a job as failed with nothing released: its privacy reservation is given back."""
        self.ledger.cancel(job_id)
        self.store.set_job(job_id, "failed", error=error)
        self.store.audit("executor", "job.failed", f"{job_id}: {error}")

    def revoke_approval(self, caller: Caller, request_id: str, reason: str | None = None):
        """Revoke an approval (:meth:`Approvals.revoke`) and cancel its jobs still queued or running."""
        info = self.approvals.revoke(caller, request_id, reason)
        for job_id in self.approvals.jobs_of(request_id):
            job = self.store.job(job_id)
            if job is not None and job.state in ("queued", "running"):
                self.cancel_job(caller, job_id)
        return info

    def _release(self, job_id: str) -> bool:
        """Commit the job's ledger entry (invariant 5: before the update can leave); False withholds it."""
        try:
            self.ledger.release(job_id)
            return True
        except (LedgerError, sqlite3.Error) as exc:
            log.error("job %s: update withheld, ledger entry not written: %s", job_id, exc)
            self.store.set_job(job_id, "failed", error=f"update withheld: the privacy ledger entry could not be "
                                                       f"written ({type(exc).__name__}: {redact(str(exc))})")
            self.store.audit("executor", "job.failed", f"{job_id}: ledger entry not written, update withheld")
            return False

    def _own_job(self, caller: Caller, job_id: str):
        job = self.store.job(job_id)
        if job is None or (caller.role != "owner" and job.scientist != caller.name):
            raise NotFound(f"no job {job_id!r} for {caller.name!r} at node {self.config.name!r}")
        return job

    def _has_update(self, job_id: str) -> bool:
        return job_id in self._updates or (self.home.updates / f"{job_id}.safetensors").is_file()

    def _status(self, job) -> JobStatus:
        """The job's status with its privacy receipt, once its release is in the ledger."""
        receipt = self.ledger.receipt(job.job_id)
        return job.status(self._has_update(job.job_id)).model_copy(update={"privacy": receipt})

    def job_status(self, caller: Caller, job_id: str, wait: float = 0.0) -> JobStatus:
        """The job's status; with ``wait`` > 0, block up to that many seconds for it to finish."""
        self.require(caller, "scientist", "owner")
        job = self._own_job(caller, job_id)
        if wait > 0 and job.state in ("queued", "running"):
            with self._cond:
                self._cond.wait_for(lambda: self.store.job(job_id).state in ("done", "failed"), timeout=min(wait, 60))
            job = self.store.job(job_id)
        return self._status(job)

    async def job_status_wait(self, caller: Caller, job_id: str, wait: float = 0.0) -> JobStatus:
        """:meth:`job_status` for an event loop: waits up to ``wait`` seconds (at most 60) for the job to
        finish without holding a thread. A caller may have :data:`MAX_WAITS_PER_CALLER` waits at once;
        past that it gets :class:`TooManyWaits` (429, Retry-After) at once, and nothing is held for it."""
        self.require(caller, "scientist", "owner")
        if wait <= 0:
            return await asyncio.to_thread(self.job_status, caller, job_id)
        deadline = asyncio.get_running_loop().time() + min(wait, 60)
        with self.waits.register((caller.name, caller.role), job_id) as changed:
            if changed is None:
                raise TooManyWaits(f"{caller.name!r} already has {MAX_WAITS_PER_CALLER} long-polls waiting at node "
                                   f"{self.config.name!r}; retry after they end, or poll without wait")
            while True:  # registered before reading, so no change is missed
                changed.clear()
                status = await asyncio.to_thread(self.job_status, caller, job_id)
                left = deadline - asyncio.get_running_loop().time()
                if status.state not in ("queued", "running") or left <= 0:
                    return status
                try:
                    await asyncio.wait_for(changed.wait(), timeout=left)
                except TimeoutError:
                    pass

    def _check_target(self, scientist: str, spec: PrivacySpec | None, plan: Plan, ds) -> None:
        """A DP-SGD target the node has not yet derived a noise multiplier for costs it up to seconds of
        CPU: at most ``limits.max_new_dp_targets_per_hour`` of them a scientist (TooManyTargets, 429)."""
        if spec is None or spec.dp_sgd is None:
            return
        try:
            key = spec.dp_sgd.derivation(TrainingContext.of(plan, ds.volumes))
        except ValueError as exc:
            raise Invalid(f"plan refused by node {self.config.name!r}: {exc}") from exc
        if key is None or is_derived(*key) or self._targets.take(scientist):
            return
        limit = self.limits.max_new_dp_targets_per_hour
        self.store.audit(scientist, "job.refused", f"over {limit} new DP-SGD privacy targets in an hour")
        raise TooManyTargets(f"{scientist!r} asked node {self.config.name!r} for {limit} new DP-SGD privacy targets "
                             "(target_epsilon, delta, schedule) in the last hour, its limit: each costs the node a "
                             "noise calibration; reuse a target already asked for, or wait")

    def privacy_estimate(self, caller: Caller, req: EstimateRequest) -> Estimate:
        """What more releases would cost the caller on a dataset, against the budgets that apply."""
        self.require(caller, "scientist", "owner")
        return self._estimate(caller.name, req)

    def _approval_estimate(self, scientist: str, dataset: str, plan: dict, releases: int) -> Estimate | None:
        """What an approval's releases would cost (its plan's update chain); None where no estimate holds."""
        try:
            return self._estimate(scientist, EstimateRequest(dataset=dataset, privacy=plan.get("privacy"), plan=plan,
                                                             releases=releases))
        except (ServiceError, ValidationError, ValueError):
            return None

    def _estimate(self, scientist: str, req: EstimateRequest) -> Estimate:
        ds = self._dataset(req.dataset)
        try:
            spec = PrivacySpec.parse(req.privacy)
        except PrivacySpecError as exc:
            raise Invalid(str(exc)) from exc
        context = None
        if spec is not None and spec.dp_sgd:  # its cost depends on the plan's schedule and this dataset
            if req.plan is None:
                raise Invalid("a 'dp_sgd' estimate needs the plan (its batch size and epochs set the cost)")
            try:
                plan = Plan.model_validate(req.plan)
                context = TrainingContext.of(plan, ds.volumes)
            except (ValidationError, PlanError, ValueError) as exc:
                raise Invalid(f"plan refused by node {self.config.name!r}: {exc}") from exc
            self._check_target(scientist, spec, plan, ds)
        try:
            return self.ledger.estimate(req.dataset, scientist, spec, req.releases, context)
        except AccountingError as exc:
            raise Invalid(f"plan.privacy refused by node {self.config.name!r}: {exc}") from exc

    def job_update(self, caller: Caller, job_id: str) -> bytes:
        self.require(caller, "scientist", "owner")
        job = self._own_job(caller, job_id)
        if job.request.secure is not None:
            raise Forbidden(f"job {job_id} is part of a secure aggregation: its update leaves this node only "
                            "masked (POST /v1/secagg/masked)")
        blob = self._released_update(job)
        self.store.audit(caller.name, "update.release", f"job {job_id} on {job.request.dataset}")
        return blob

    def _released_update(self, job) -> bytes:
        """The job's update bytes, once its release is in the ledger (invariant 5, checked where bytes leave)."""
        job_id = job.job_id
        if job.state != "done" or not self._has_update(job_id):
            raise NotFound(f"job {job_id} has no update (state: {job.state})")
        entry = self.ledger.entry(job_id)
        if entry is None or entry.state != "released":
            raise Forbidden(f"job {job_id}: its release is not recorded in the privacy ledger, so its update "
                            "is withheld")
        blob = self._updates.get(job_id)
        return blob if blob is not None else (self.home.updates / f"{job_id}.safetensors").read_bytes()

    # secure aggregation (voxgrid.privacy.secagg; the node's side is nodes/service/secure.py) -------------
    @contextmanager
    def _secagg_refusals(self, caller: Caller, what: str):
        try:
            yield
        except SecAggError as exc:  # a protocol violation: a swapped key, a replay, a forbidden reveal
            self.store.audit(caller.name, "secagg.refused", f"{what}: {exc}")
            raise Forbidden(f"secure aggregation {what} refused by node {self.config.name!r}: {exc}") from None
        except SecureAggregationRefused as exc:
            self.store.audit(caller.name, "secagg.refused", f"{what}: {exc}")
            raise Invalid(f"secure aggregation {what} refused by node {self.config.name!r}: {exc}") from None

    def secagg_keys(self, caller: Caller, req: SecAggKeysRequest) -> AdvertisedKeys:
        """Fresh key pairs for one round, signed with this node's identity."""
        self.require(caller, "scientist", "owner")
        self._dataset(req.dataset)
        with self._secagg_refusals(caller, "keys"):
            return self.secagg.keys(caller.name, req)

    def secagg_shares(self, caller: Caller, req: SecAggSharesRequest) -> list[EncryptedShare]:
        """Checks every node's signed keys, returns this node's secrets split and encrypted for each."""
        self.require(caller, "scientist", "owner")
        with self._secagg_refusals(caller, "key shares"):
            return self.secagg.shares(caller.name, req)

    def secagg_masked(self, caller: Caller, req: SecAggMaskedRequest) -> bytes:
        """A secure-aggregation train job's update, masked: the only form in which it leaves."""
        self.require(caller, "scientist", "owner")
        job = self._own_job(caller, req.job_id)
        if job.request.secure is None:
            raise Invalid(f"job {req.job_id} was not submitted for secure aggregation; "
                          f"its update is at GET /v1/jobs/{req.job_id}/update")
        blob = self._released_update(job)
        with self._secagg_refusals(caller, "masked input"):
            words = self.secagg.mask(caller.name, job.job_id, job.request.secure, job.metrics, blob, req.inbox)
        self.store.audit(caller.name, "update.release", f"job {job.job_id} on {job.request.dataset}, masked")
        return words

    def secagg_reveal(self, caller: Caller, req: RevealRequest) -> list[RevealedShare]:
        """The shares the aggregator needs to unmask the sum, never both kinds for one node."""
        self.require(caller, "scientist", "owner")
        with self._secagg_refusals(caller, "reveal"):
            shares = self.secagg.reveal(caller.name, req)
        self.store.audit(caller.name, "secagg.reveal", f"experiment {req.experiment_id} round {req.round}: "
                                                       f"{len(req.survivors)} survivors, dropped {req.dropped}")
        return shares

    # owner -------------------------------------------------------------------------------------
    def issue_token(self, caller: Caller, req: TokenIssue) -> TokenIssued:
        self.require(caller, "owner")
        return TokenIssued(name=req.name, role=req.role, token=self.store.add_token(req.name, req.role))

    def tokens(self, caller: Caller) -> list[TokenInfo]:
        """Every token of the node (id, name, role, created, expires, revoked, expired; never a token or hash)."""
        self.require(caller, "owner")
        return [TokenInfo(**t) for t in self.store.tokens()]

    def revoke_token(self, caller: Caller, token_id: str) -> TokenInfo:
        """Revoke one token by its id; refused from the next request on. The last valid owner token is kept."""
        self.require(caller, "owner")
        try:
            (revoked,) = self.store.revoke(token_id=token_id, actor=caller.name)
        except UnknownToken as exc:
            raise NotFound(str(exc)) from None
        except TokenError as exc:
            raise Invalid(str(exc)) from None
        return TokenInfo(**revoked)

    def audit_log(self, caller: Caller, limit: int = 200) -> list[AuditEntry]:
        self.require(caller, "owner")
        return [AuditEntry(**e) for e in self.store.audit_log(limit)]

    def jobs(self, caller: Caller) -> list[JobStatus]:
        self.require(caller, "owner")
        return [self._status(j) for j in self.store.jobs()]

    def set_budget(self, caller: Caller, req: BudgetSet) -> list[BudgetStatus]:
        """Set a privacy budget on a dataset; returns the dataset's budgets and where they stand."""
        self.require(caller, "owner")
        self._dataset(req.dataset)
        if req.scientist is not None and not NAME_RE.match(req.scientist):
            raise Invalid(f"invalid scientist name {req.scientist!r}")
        self.ledger.set_budget(req.dataset, req.epsilon, req.delta, scientist=req.scientist)
        self.store.audit(caller.name, "budget.set", f"{req.dataset} for {req.scientist or 'all scientists'}: "
                                                    f"epsilon {req.epsilon:g}, delta {req.delta:g}")
        return self.ledger.budgets(req.dataset)

    def ledger_view(self, caller: Caller) -> LedgerView:
        """Budgets, every release and every refusal (the owner's privacy record)."""
        self.require(caller, "owner")
        return self.ledger.view()
