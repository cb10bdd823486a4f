"""The executor: a long-lived worker process beside the node server.

The worker stays warm between rounds (imports done, volumes preprocessed and cached, network
built), so a round costs only the compute; preprocessed volumes also persist in the node home's
cache folder (:mod:`.prepcache`), so a restarted worker does not read the DICOM again. Server and
worker talk over a pipe: a JSON message, followed for weights and updates by one raw safetensors
message. Nothing is pickled
(``send_bytes``/``recv_bytes`` only), and nothing touches the disk on the way: the server keeps
the durable copies.

The server keeps the queue (:class:`~.limits.FairQueue`: round-robin across scientists) and hands
the worker one job at a time, when it is idle. A watchdog stops a job past the owner's wall-time
limit, or a worker past its memory limit, by killing the worker (which is then started again); a
cancelled running job is stopped the same way. The job fails with the reason.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from voxgrid.nodes.service.limits import FairQueue, JobLimits, process_tree, tree_rss

log = logging.getLogger("voxgrid.executor")


@dataclass
class _Running:
    job_id: str
    scientist: str
    since: float  # time.monotonic() when it was handed to the worker
    stopping: bool = False  # its worker was killed; the reader is about to fail it


class Executor:
    """Server-side handle: starts the worker, queues jobs, feeds them one at a time, reports events.

    ``on_event`` receives dicts: ``{"event": "started", "job_id"}``, ``{"event": "done", "job_id",
    "metrics", "update": bytes | None}`` (the update after the plan's privacy filter chain) or
    ``{"event": "failed", "job_id", "error"}``.
    """

    def __init__(self, on_event: Callable[[dict], None], device: str = "auto", threads: int = 0,
                 state_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 limits: JobLimits | None = None, poll: float = 0.25):
        self.on_event, self.device, self.threads = on_event, device, threads
        # Site-kept tensors (FedBN): durable under state_dir, else in the worker's memory only.
        self.state_dir = str(state_dir) if state_dir else None
        # Preprocessed volumes survive a restart under cache_dir (the node home's cache/prepared).
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.limits = limits or JobLimits()
        self._memory = self.limits.worker_memory_bytes()
        self._cv = threading.Condition()
        self._queue = FairQueue()
        self._current: _Running | None = None
        self._reasons: dict[str, str] = {}  # job id -> why its worker was killed
        self._closing = False
        #: Set once the worker has done its imports and can take a job at once.
        self.ready = threading.Event()
        self._start()
        for name, target in (("executor-dispatch", self._dispatch), ("executor-watchdog", self._watch)):
            threading.Thread(target=target, args=(poll,), name=name, daemon=True).start()

    def _start(self) -> None:
        self.ready.clear()
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited server threads or sockets
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=worker_main, name="voxgrid-executor", daemon=True,
                                 args=(child, self.device, self.threads, self.state_dir, self.cache_dir))
        self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, args=(self._conn, self._proc), name="executor-reader",
                                        daemon=True)
        self._reader.start()

    def submit(self, job: dict, weights: bytes | Callable[[], bytes | None]) -> None:
        """Queue a job: ``{"job_id", "request": JobRequest dict, "dataset": {...}, "scientist"}`` and its start
        weights (bytes, or a function that reads them when the job's turn comes: a long queue holds no blobs)."""
        job = {**job, "limits": {"max_steps_per_job": self.limits.max_steps_per_job}}
        with self._cv:
            self._queue.put(job["job_id"], job.get("scientist", ""), (job, weights))
            self._cv.notify_all()

    def queued(self) -> list[str]:
        """Job ids waiting for the worker, in the order they would run if nothing else arrived."""
        with self._cv:
            return self._queue.job_ids()

    def running(self) -> str | None:
        with self._cv:
            return self._current.job_id if self._current else None

    def cancel(self, job_id: str, reason: str) -> str | None:
        """Take a job off the queue ("queued"; the caller records its end) or stop it by killing the
        worker ("running"; it fails with ``reason``). None: the executor does not hold it."""
        with self._cv:
            if self._queue.remove(job_id) is not None:
                return "queued"
        return "running" if self._kill(job_id, reason) else None

    def _dispatch(self, poll: float) -> None:
        """Hand the worker the next job whenever it is ready and idle."""
        while True:
            with self._cv:
                self._cv.wait_for(self._can_dispatch)
                if self._closing:
                    return
                entry = self._queue.pop()
                self._current = _Running(entry.job_id, entry.scientist, time.monotonic())
                conn = self._conn
            job, weights = entry.item
            blob = weights() if callable(weights) else weights
            if blob is None:  # only after a crash that beat the background write
                self._finish(job["job_id"], {"event": "failed", "job_id": job["job_id"],
                                             "error": "start weights lost; submit again"})
                continue
            try:
                conn.send_bytes(json.dumps(job).encode())
                conn.send_bytes(blob)
            except (OSError, ValueError):
                pass  # the worker is gone: its reader fails the job and starts a new one

    def _can_dispatch(self) -> bool:
        return self._closing or (self._current is None and bool(self._queue) and self.ready.is_set())

    def _finish(self, job_id: str, msg: dict) -> None:
        self.on_event(msg)  # the job's end is recorded before the next one can start or be cancelled
        with self._cv:
            if self._current and self._current.job_id == job_id:
                self._current = None
            self._reasons.pop(job_id, None)
            self._cv.notify_all()

    def _read(self, conn, proc) -> None:
        while True:
            try:
                msg = json.loads(conn.recv_bytes())
                if msg.get("event") == "ready":
                    with self._cv:
                        self.ready.set()
                        self._cv.notify_all()
                    continue
                if msg.get("event") == "done":
                    msg["update"] = conn.recv_bytes() if msg.get("has_update") else None
            except (EOFError, OSError):
                break
            if msg.get("event") in ("done", "failed"):
                self._finish(msg["job_id"], msg)
            else:
                self.on_event(msg)
        proc.join(5)
        if self._closing or proc.exitcode == -signal.SIGTERM:
            return  # the node is shutting down: its unfinished jobs are recovered at the next start
        # The worker died (killed by the watchdog or a cancel, out of memory): fail its job, start a new one.
        code = proc.exitcode
        with self._cv:
            self.ready.clear()
            lost = self._current
        if lost is not None:
            reason = self._reasons.get(lost.job_id) or (f"executor process exited unexpectedly (exit code {code}); "
                                                        "job not completed")
            self._finish(lost.job_id, {"event": "failed", "job_id": lost.job_id, "error": reason})
        log.error("executor exited with code %s; restarting it", code)
        with self._cv:
            if not self._closing:
                self._start()

    def _kill(self, job_id: str | None, reason: str) -> bool:
        """Kill the worker (and its children) if it runs ``job_id`` (None: whatever it runs)."""
        with self._cv:
            cur = self._current
            if job_id is not None and (cur is None or cur.job_id != job_id):
                return False
            if cur is not None:
                if cur.stopping:
                    return True
                cur.stopping = True
                self._reasons[cur.job_id] = reason
            pids = process_tree(self._proc.pid) if self._proc.pid else []
        log.warning("stopping the executor: %s", reason)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return True

    def _watch(self, poll: float) -> None:
        """The watchdog: wall time of the running job, resident memory of the worker."""
        limit_s = self.limits.max_job_seconds
        while not self._closing:
            time.sleep(poll)
            with self._cv:
                cur, pid = self._current, self._proc.pid
            if cur is not None and time.monotonic() - cur.since > limit_s:
                self._kill(cur.job_id, f"job stopped: it exceeded the node's wall-time limit of {limit_s:g} s")
                continue
            # Only while a job runs: a worker whose baseline is over the limit fails jobs, it does not loop.
            rss = tree_rss(pid) if pid and cur is not None else 0
            if rss > self._memory:
                mb = self._memory // 2 ** 20
                self._kill(cur.job_id, f"job stopped: the executor exceeded the node's memory limit of {mb} MiB "
                                       f"({rss // 2 ** 20} MiB resident)")

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()


def worker_main(conn, device: str, threads: int, state_dir: str | None = None, cache_dir: str | None = None) -> None:
    """Worker loop: runs the jobs the server hands it, one at a time. Exits when the server goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us cleanly
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from voxgrid import components

    from voxgrid.nodes.worker.local_state import LocalState
    from voxgrid.nodes.worker.prepcache import PrepCache
    from voxgrid.nodes.worker.training import Trainer, pick_device

    runner = JobRunner(Trainer(pick_device(device)), LocalState(state_dir), PrepCache(cache_dir) if cache_dir else None)
    for kind in ("network", "loss", "optimizer", "transform"):  # the allowlist's imports, before any job waits
        components.table(kind)
    conn.send_bytes(json.dumps({"event": "ready", "device": runner.trainer.device.type}).encode())
    while True:
        try:
            job = json.loads(conn.recv_bytes())
            blob = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job_id = job["job_id"]
        conn.send_bytes(json.dumps({"event": "started", "job_id": job_id}).encode())
        try:
            metrics, update = runner.run(job, blob)
            conn.send_bytes(json.dumps({"event": "done", "job_id": job_id, "has_update": update is not None,
                                        "metrics": metrics.model_dump(mode="json")}).encode())
            if update is not None:
                conn.send_bytes(update)
        except Exception as exc:  # a bad job must never take the worker down
            log.warning("job %s failed: %s", job_id, traceback.format_exc())
            conn.send_bytes(json.dumps({"event": "failed", "job_id": job_id,
                                        "error": f"{type(exc).__name__}: {exc}"}).encode())


class JobRunner:
    """The worker's side of one job: the step limit, the data (kept for the next job on the same
    dataset), training or evaluation, and the privacy filter chain. Runs in the worker process."""

    def __init__(self, trainer, local_state, prep_cache):
        self.trainer, self.local_state, self.prep_cache = trainer, local_state, prep_cache
        self._data: dict[tuple, object] = {}

    def run(self, job: dict, blob: bytes):
        """(metrics, update bytes or None) of one job message and its start weights."""
        from voxgrid import tensors
        from voxgrid.plan import Plan
        from voxgrid.privacy import PrivacySpec
        from voxgrid.privacy.mechanisms import apply_filters, secure_generator
        from voxgrid.privacy.metrics import MetricsRelease
        from voxgrid.wire import JobRequest

        from voxgrid.nodes.service.limits import planned_steps
        from voxgrid.nodes.service.secure import noise_share
        from voxgrid.nodes.worker.training import run_job

        req = JobRequest.model_validate(job["request"])
        plan = Plan.model_validate(req.plan)
        cap = job.get("limits", {}).get("max_steps_per_job")
        if req.kind == "train" and cap and (steps := planned_steps(plan, job["dataset"]["volumes"])) > cap:
            raise RuntimeError(f"{steps} optimiser steps on this dataset is over the node's limit of {cap} "
                               "steps per job")
        release = job.get("metrics_release")
        metrics, delta = run_job(self.trainer, plan, req.kind, self.data(job["job_id"], req, plan, job["dataset"]),
                                 tensors.loads(blob), split=req.split, evaluate=req.evaluate, seed=req.seed,
                                 local_state=self.local_state, job_key=(req.experiment_id, req.dataset, req.round),
                                 release=MetricsRelease.model_validate(release) if release else None)
        spec = PrivacySpec.parse(plan.privacy)
        if delta is not None and spec is not None:
            # The privacy filter chain runs here, so the raw delta never reaches the server process
            # or the disk. Noise is seeded from OS entropy, never from the scientist's seed.
            delta = apply_filters(spec, delta, secure_generator(), noise_share=noise_share(req, metrics))
        return metrics, tensors.dumps(delta, metadata={"job_id": job["job_id"]}) if delta is not None else None

    def data(self, job_id: str, req, plan, ds: dict):
        """The dataset's volumes prepared for ``plan`` (one dataset kept at a time: volumes are large)."""
        from voxgrid.nodes.worker.training import prepare

        key = (req.dataset, ds["fingerprint"], json.dumps(plan.preprocessing, sort_keys=True), tuple(plan.labels))
        if key not in self._data:
            site_labels = {int(k): v for k, v in ds["label_names"].items()}
            try:
                prepared = prepare(ds["volumes"], site_labels, plan, cache=self.prep_cache, roots=ds.get("data_roots"))
            except Exception:
                # Reader errors name files, series UIDs and descriptions: they stay in the node's log.
                log.warning("job %s: loading dataset %s failed: %s", job_id, req.dataset, traceback.format_exc())
                raise RuntimeError(f"the volumes of dataset {req.dataset!r} could not be loaded at the node; "
                                   "its owner can read the reason in the node's log") from None
            self._data = {key: prepared}
        return self._data[key]
