"""The executor: a long-lived worker process beside the node server.

The worker stays warm between rounds (imports done, volumes preprocessed and cached, network
built), so a round costs only the compute. Server and worker talk over a pipe with JSON
messages; weights go through files in the node home as safetensors. Nothing is pickled
(``send_bytes``/``recv_bytes`` only).
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
from pathlib import Path

log = logging.getLogger("voxgrid.executor")


class Executor:
    """Server-side handle: starts the worker, feeds it jobs, reports events to ``on_event``.

    ``on_event`` receives dicts: ``{"event": "started", "job_id"}``, ``{"event": "done", "job_id",
    "metrics"}`` or ``{"event": "failed", "job_id", "error"}``.
    """

    def __init__(self, home: Path, on_event: Callable[[dict], None], device: str = "auto", threads: int = 0):
        self.home, self.on_event, self.device, self.threads = Path(home), on_event, device, threads
        self._lock = threading.Lock()
        self._inflight: dict[str, dict] = {}
        self._closing = False
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited server threads or sockets
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=worker_main, args=(child, str(self.home), self.device, self.threads),
                                 name="voxgrid-executor", daemon=True)
        self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="executor-reader", daemon=True)
        self._reader.start()

    def submit(self, job: dict) -> None:
        """Queue a job: ``{"job_id", "request": JobRequest dict, "dataset": {...}}``."""
        with self._lock:
            self._inflight[job["job_id"]] = job
            self._conn.send_bytes(json.dumps(job).encode())

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = json.loads(conn.recv_bytes())
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


def worker_main(conn, home: str, device: str, threads: int) -> None:
    """Worker loop: one job at a time, in submission order. Exits when the server goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us cleanly
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from safetensors.torch import save_file

    from voxgrid import tensors
    from voxgrid.plan import Plan
    from voxgrid.wire import JobRequest

    from .training import Trainer, pick_device, prepare, run_job

    trainer = Trainer(pick_device(device))
    cache: dict[tuple, object] = {}
    home_path = Path(home)
    while True:
        try:
            job = json.loads(conn.recv_bytes())
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
                data = prepare(ds["volumes"], site_labels, plan)
                cache = {key: data}  # one dataset at a time: volumes are large
            weights = tensors.loads((home_path / "blobs" / f"{req.weights_id}.safetensors").read_bytes())
            metrics, delta = run_job(trainer, plan, req.kind, data, weights, split=req.split,
                                     evaluate=req.evaluate, seed=req.seed)
            if delta is not None:
                out = home_path / "updates" / f"{job_id}.safetensors"
                tmp = out.with_suffix(".tmp")
                # straight to the file: half the time of tensors.dumps + write_bytes for a 20 MB update
                save_file({k: v.detach().to("cpu").contiguous() for k, v in delta.items()}, str(tmp),
                          metadata={"job_id": job_id})
                os.replace(tmp, out)
            conn.send_bytes(json.dumps({"event": "done", "job_id": job_id,
                                        "metrics": metrics.model_dump(mode="json")}).encode())
        except Exception as exc:  # a bad job must never take the worker down
            log.warning("job %s failed: %s", job_id, traceback.format_exc())
            conn.send_bytes(json.dumps({"event": "failed", "job_id": job_id,
                                        "error": f"{type(exc).__name__}: {exc}"}).encode())
