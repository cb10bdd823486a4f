"""The executor: a long-lived worker process beside the node server.

The worker stays warm between rounds (imports done, volumes preprocessed and cached, network
built), so a round costs only the compute; preprocessed volumes also persist in the node home's
cache folder (:mod:`.prepcache`), so a restarted worker does not read the DICOM again. Server and
worker talk over a pipe: a JSON message, followed for weights and updates by one raw safetensors
message. Nothing is pickled
(``send_bytes``/``recv_bytes`` only), and nothing touches the disk on the way: the server keeps
the durable copies.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections.abc import Callable

log = logging.getLogger("voxgrid.executor")


class Executor:
    """Server-side handle: starts the worker, feeds it jobs, reports events to ``on_event``.

    ``on_event`` receives dicts: ``{"event": "started", "job_id"}``, ``{"event": "done", "job_id",
    "metrics", "update": bytes | None}`` (the update after the plan's privacy filter chain) or
    ``{"event": "failed", "job_id", "error"}``.
    """

    def __init__(self, on_event: Callable[[dict], None], device: str = "auto", threads: int = 0,
                 state_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
        self.on_event, self.device, self.threads = on_event, device, threads
        # Site-kept tensors (FedBN): durable under state_dir, else in the worker's memory only.
        self.state_dir = str(state_dir) if state_dir else None
        # Preprocessed volumes survive a restart under cache_dir (the node home's cache/prepared).
        self.cache_dir = str(cache_dir) if cache_dir else None
        self._lock = threading.Lock()
        self._inflight: dict[str, dict] = {}
        self._closing = False
        #: Set once the worker has done its imports and can take a job at once.
        self.ready = threading.Event()
        self._start()

    def _start(self) -> None:
        self.ready.clear()
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited server threads or sockets
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=worker_main, name="voxgrid-executor", daemon=True,
                                 args=(child, self.device, self.threads, self.state_dir, self.cache_dir))
        self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="executor-reader", daemon=True)
        self._reader.start()

    def submit(self, job: dict, weights: bytes) -> None:
        """Queue a job: ``{"job_id", "request": JobRequest dict, "dataset": {...}}`` and its start weights."""
        with self._lock:  # the two messages must stay adjacent
            self._inflight[job["job_id"]] = job
            self._conn.send_bytes(json.dumps(job).encode())
            self._conn.send_bytes(weights)

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = json.loads(conn.recv_bytes())
                if msg.get("event") == "ready":
                    self.ready.set()
                    continue
                if msg.get("event") == "done":
                    msg["update"] = conn.recv_bytes() if msg.get("has_update") else None
            except (EOFError, OSError):
                break
            if msg.get("event") in ("done", "failed"):
                with self._lock:
                    self._inflight.pop(msg["job_id"], None)
            self.on_event(msg)
        self._proc.join(5)
        if self._closing or self._proc.exitcode == -signal.SIGTERM:
            return  # the node is shutting down: its unfinished jobs are recovered at the next start
        # The worker died (killed, out of memory): fail its jobs with a message, start a new one.
        code = self._proc.exitcode
        with self._lock:
            lost, self._inflight = list(self._inflight), {}
        for job_id in lost:
            self.on_event({"event": "failed", "job_id": job_id,
                           "error": f"executor process exited unexpectedly (exit code {code}); job not completed"})
        log.error("executor exited with code %s; restarting it", code)
        self._start()

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()


def worker_main(conn, device: str, threads: int, state_dir: str | None = None, cache_dir: str | None = None) -> None:
    """Worker loop: one job at a time, in submission order. Exits when the server goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us cleanly
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from voxgrid import tensors
    from voxgrid.plan import Plan
    from voxgrid.privacy import PrivacySpec
    from voxgrid import components
    from voxgrid.privacy.mechanisms import apply_filters, secure_generator
    from voxgrid.wire import JobRequest

    from .local_state import LocalState
    from .prepcache import PrepCache
    from .secure import noise_share
    from .training import Trainer, pick_device, prepare, run_job

    trainer = Trainer(pick_device(device))
    local_state = LocalState(state_dir)
    prep_cache = PrepCache(cache_dir) if cache_dir else None
    for kind in ("network", "loss", "optimizer", "transform"):  # the allowlist's imports, before any job waits
        components.table(kind)
    conn.send_bytes(json.dumps({"event": "ready", "device": trainer.device.type}).encode())
    cache: dict[tuple, object] = {}
    while True:
        try:
            job = json.loads(conn.recv_bytes())
            blob = conn.recv_bytes()
        except (EOFError, OSError):
            return
        job_id = job["job_id"]
        conn.send_bytes(json.dumps({"event": "started", "job_id": job_id}).encode())
        try:
            req = JobRequest.model_validate(job["request"])
            plan = Plan.model_validate(req.plan)
            ds = job["dataset"]
            site_labels = {int(k): v for k, v in ds["label_names"].items()}
            key = (req.dataset, ds["fingerprint"], json.dumps(plan.preprocessing, sort_keys=True), tuple(plan.labels))
            data = cache.get(key)
            if data is None:
                try:
                    data = prepare(ds["volumes"], site_labels, plan, cache=prep_cache, roots=ds.get("data_roots"))
                except Exception:
                    # Reader errors name files, series UIDs and descriptions: they stay in the node's log.
                    log.warning("job %s: loading dataset %s failed: %s", job_id, req.dataset, traceback.format_exc())
                    raise RuntimeError(f"the volumes of dataset {req.dataset!r} could not be loaded at the node; "
                                       "its owner can read the reason in the node's log") from None
                cache = {key: data}  # one dataset at a time: volumes are large
            metrics, delta = run_job(trainer, plan, req.kind, data, tensors.loads(blob), split=req.split,
                                     evaluate=req.evaluate, seed=req.seed, local_state=local_state,
                                     job_key=(req.experiment_id, req.dataset, req.round))
            spec = PrivacySpec.parse(plan.privacy)
            if delta is not None and spec is not None:
                # The privacy filter chain runs here, so the raw delta never reaches the server process
                # or the disk. Noise is seeded from OS entropy, never from the scientist's seed.
                delta = apply_filters(spec, delta, secure_generator(), noise_share=noise_share(req, metrics))
            update = tensors.dumps(delta, metadata={"job_id": job_id}) if delta is not None else None
            conn.send_bytes(json.dumps({"event": "done", "job_id": job_id, "has_update": update is not None,
                                        "metrics": metrics.model_dump(mode="json")}).encode())
            if update is not None:
                conn.send_bytes(update)
        except Exception as exc:  # a bad job must never take the worker down
            log.warning("job %s failed: %s", job_id, traceback.format_exc())
            conn.send_bytes(json.dumps({"event": "failed", "job_id": job_id,
                                        "error": f"{type(exc).__name__}: {exc}"}).encode())
