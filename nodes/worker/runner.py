"""The worker process: runs the jobs its server hands it over the pipe, one at a time.

It stays warm between rounds (imports done, volumes prepared, network built), so a round costs only
the compute. The server's side (queue, watchdog, restarts) is :mod:`voxgrid.nodes.service.executor`;
the two speak :mod:`.messages`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable

from voxgrid.nodes.worker.messages import (JobDone, JobFailed, JobStarted, RunJob, WorkerReady, recv_job,
                                           send)

log = logging.getLogger("voxgrid.executor")


#: The worker's exit status after a CUDA error that broke its context (the server starts a new worker).
EXIT_DEVICE_BROKEN = 3


def worker_main(conn, device: str, threads: int, state_dir: str | None = None, cache_dir: str | None = None) -> None:
    """Worker loop: runs the jobs the server hands it, one at a time. Exits when the server goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us cleanly
    runner = JobRunner.start(device, threads, state_dir, cache_dir)
    send(conn, WorkerReady(device=runner.trainer.device.type))  # what "auto" became: the node reports it
    serve(conn, runner)


def serve(conn, runner: JobRunner, exit: Callable[[int], object] = os._exit) -> None:
    """Run the jobs that arrive on ``conn`` until the server goes away, or until a job breaks the
    device's CUDA context: then its failure is reported and the process ends with
    :data:`EXIT_DEVICE_BROKEN` through ``exit``; ``os._exit`` by default, since the interpreter's own
    shutdown would run CUDA teardown on the broken context."""
    while True:
        try:
            job, blob = recv_job(conn)  # a ProtocolError ends the worker: the server fails the job, restarts it
        except (EOFError, OSError):
            return
        send(conn, JobStarted(job_id=job.job_id))
        event, update = runner.attempt(job, blob)
        send(conn, event, update)
        if isinstance(event, JobFailed) and event.worker_exits:
            log.error("job %s broke the CUDA context; the worker exits so that a fresh one takes the next job",
                      job.job_id)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            exit(EXIT_DEVICE_BROKEN)
            return


class JobRunner:
    """The worker's side of one job: the step limit, the data (kept for the next job on the same
    dataset), training or evaluation, and the privacy filter chain. Runs in the worker process."""

    def __init__(self, trainer, local_state, prep_cache):
        self.trainer, self.local_state, self.prep_cache = trainer, local_state, prep_cache
        self._data: dict[tuple, object] = {}

    @classmethod
    def start(cls, device: str, threads: int, state_dir: str | None, cache_dir: str | None) -> JobRunner:
        """Set the thread count, import torch and the allowlist, build the runner (before any job waits)."""
        if threads > 0:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        from voxgrid import components

        from voxgrid.nodes.worker.local_state import LocalState
        from voxgrid.nodes.worker.prepcache import PrepCache
        from voxgrid.nodes.worker.training import Trainer, pick_device

        runner = cls(Trainer(pick_device(device)), LocalState(state_dir), PrepCache(cache_dir) if cache_dir else None)
        for kind in ("network", "loss", "optimizer", "transform"):
            components.table(kind)
        return runner

    def attempt(self, job: RunJob, blob: bytes) -> tuple[JobDone | JobFailed, bytes | None]:
        """Run one job and say how it ended (:meth:`run` does the work); a bad job never raises here.

        A sticky CUDA error (:func:`.devices.is_sticky_cuda_error`) fails the job with
        ``worker_exits``: the context is broken and every later job would fail too. Otherwise, on
        CUDA, the allocator's cached blocks are handed back between jobs."""
        from voxgrid.nodes.worker.devices import is_sticky_cuda_error

        try:
            metrics, update = self.run(job, blob)
        except Exception as exc:  # a bad job must never take the worker down
            log.warning("job %s failed: %s", job.job_id, traceback.format_exc())
            if is_sticky_cuda_error(exc):
                first = (str(exc).strip().splitlines() or [""])[0]  # torch appends debugging advice
                return JobFailed(job_id=job.job_id, worker_exits=True,
                                 error=f"the GPU failed during the job and its CUDA context cannot be used again "
                                       f"({type(exc).__name__}: {first}); the node restarts its executor, so the "
                                       "next job runs on a fresh one"), None
            self.release_memory()
            return JobFailed(job_id=job.job_id, error=f"{type(exc).__name__}: {exc}"), None
        self.release_memory()
        return JobDone(job_id=job.job_id, metrics=metrics, has_update=update is not None), update

    def release_memory(self) -> None:
        """On CUDA, give the allocator's cached blocks back to the device between jobs (another job's
        shapes, or another process on the GPU, can use them). Nothing to do on the CPU."""
        if self.trainer.device.type != "cuda":
            return
        import torch

        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:  # an error here is the next job's to report
            log.warning("releasing cached GPU memory failed: %s", exc)

    def run(self, job: RunJob, blob: bytes):
        """(metrics, update bytes or None) of one job and its start weights."""
        from voxgrid import tensors
        from voxgrid.plan import Plan
        from voxgrid.privacy import PrivacySpec
        from voxgrid.privacy.mechanisms import apply_filters, secure_generator

        from voxgrid.nodes.service.secure import noise_share
        from voxgrid.nodes.worker.training import run_job

        req = job.request
        plan = Plan.model_validate(req.plan)
        self.check_steps(job, plan)
        metrics, delta = run_job(self.trainer, plan, req.kind, self.data(job, plan), tensors.loads(blob),
                                 split=req.split, evaluate=req.evaluate, seed=req.seed, local_state=self.local_state,
                                 job_key=(req.experiment_id, req.dataset, req.round), release=job.metrics_release)
        spec = PrivacySpec.parse(plan.privacy)
        if delta is not None and spec is not None:
            # The privacy filter chain runs here, so the raw delta never reaches the server process
            # or the disk. Noise is seeded from OS entropy, never from the scientist's seed.
            delta = apply_filters(spec, delta, secure_generator(), noise_share=noise_share(req, metrics))
        return metrics, tensors.dumps(delta, metadata={"job_id": job.job_id}) if delta is not None else None

    @staticmethod
    def check_steps(job: RunJob, plan) -> None:
        """The owner's step limit, on the volumes as the worker got them (the server checked at submit)."""
        from voxgrid.nodes.service.limits import planned_steps

        cap = job.max_steps_per_job
        if job.request.kind == "train" and cap and (steps := planned_steps(plan, job.dataset.volumes)) > cap:
            raise RuntimeError(f"{steps} optimiser steps on this dataset is over the node's limit of {cap} "
                               "steps per job")

    def data(self, job: RunJob, plan):
        """The dataset's volumes prepared for ``plan`` (one dataset kept at a time: volumes are large)."""
        from voxgrid.nodes.worker.training import prepare

        ds, name = job.dataset, job.request.dataset
        key = (name, ds.fingerprint, json.dumps(plan.preprocessing, sort_keys=True), tuple(plan.labels))
        if key not in self._data:
            try:
                prepared = prepare(ds.volumes, ds.label_names, plan, cache=self.prep_cache, roots=ds.data_roots)
            except Exception:
                # Reader errors name files, series UIDs and descriptions: they stay in the node's log.
                log.warning("job %s: loading dataset %s failed: %s", job.job_id, name, traceback.format_exc())
                raise RuntimeError(f"the volumes of dataset {name!r} could not be loaded at the node; "
                                   "its owner can read the reason in the node's log") from None
            self._data = {key: prepared}
        return self._data[key]
