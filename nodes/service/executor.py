"""The executor: the server's side of a long-lived worker process beside the node server.

The worker (:mod:`voxgrid.nodes.worker.runner`) stays warm between rounds (imports done, volumes
preprocessed and cached, network built), so a round costs only the compute; preprocessed volumes
also persist in the node home's cache folder (:mod:`voxgrid.nodes.worker.prepcache`), so a restarted
worker does not read the DICOM again. Server and worker talk over a pipe in the typed messages of
:mod:`voxgrid.nodes.worker.messages`: JSON frames, followed for weights and updates by one raw
safetensors frame. Nothing is pickled, and nothing touches the disk on the way: the server keeps
the durable copies.

The server keeps the queue (:class:`~.limits.FairQueue`: round-robin across scientists) and hands
the worker one job at a time, when it is idle. A watchdog stops a job past the owner's wall-time
limit, or a worker past its memory limit, by killing the worker (which is then started again); a
cancelled running job is stopped the same way. The job fails with the reason. A worker whose job broke
its CUDA context reports the failure and exits; it is started again the same way, and no job is handed
to it in between.

This is one worker. A node with several GPUs runs one of these per GPU, each worker started with its own
``CUDA_VISIBLE_DEVICES``, behind :class:`~.pool.ExecutorPool` (:mod:`.gpus` says which GPUs and why).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from voxgrid.nodes.service.gpus import worker_env
from voxgrid.nodes.service.limits import FairQueue, JobLimits, process_tree, tree_rss
from voxgrid.nodes.worker.messages import (JobDone, JobFailed, ProtocolError, WorkerEvent, WorkerReady, parse_job,
                                           recv_event, send)
from voxgrid.nodes.worker.runner import worker_main

log = logging.getLogger("voxgrid.executor")


@dataclass
class _Running:
    job_id: str
    scientist: str
    since: float  # time.monotonic() when it was handed to the worker
    stopping: bool = False  # its worker was killed; the reader is about to fail it


class Executor:
    """Server-side handle: starts the worker, queues jobs, feeds them one at a time, reports events.

    ``on_event`` receives :class:`~voxgrid.nodes.worker.messages.JobStarted`, ``JobDone`` (its ``update``
    attached: the bytes after the plan's privacy filter chain, or None) and ``JobFailed``.
    """

    def __init__(self, on_event: Callable[[WorkerEvent], None], device: str = "auto", threads: int = 0,
                 state_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 limits: JobLimits | None = None, poll: float = 0.25, env: dict[str, str] | None = None,
                 memory_bytes: int | None = None):
        """``env``: what the worker's environment adds (its GPU: ``CUDA_VISIBLE_DEVICES``, see
        :mod:`.gpus`); ``memory_bytes``: its share of the node's worker memory (default: all of it)."""
        self.on_event, self.device, self.threads = on_event, device, threads
        self.env = dict(env or {})
        # Site-kept tensors (FedBN): durable under state_dir, else in the worker's memory only.
        self.state_dir = str(state_dir) if state_dir else None
        # Preprocessed volumes survive a restart under cache_dir (the node home's cache/prepared).
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.limits = limits or JobLimits()
        self._memory = memory_bytes or self.limits.worker_memory_bytes()
        self._cv = threading.Condition()
        self._queue = FairQueue()
        self._current: _Running | None = None
        self._reasons: dict[str, str] = {}  # job id -> why its worker was killed
        self._closing = False
        #: Set once the worker has done its imports and can take a job at once.
        self.ready = threading.Event()
        #: The device type the worker reported when ready ("cuda", "cpu"): what "auto" resolved to there.
        #: None until a worker has been ready.
        self.worker_device: str | None = None
        self._exiting = False  # the worker said it exits after its failed job (a broken CUDA context)
        self._start()
        for name, target in (("executor-dispatch", self._dispatch), ("executor-watchdog", self._watch)):
            threading.Thread(target=target, args=(poll,), name=name, daemon=True).start()

    def _start(self) -> None:
        self.ready.clear()
        self._exiting = False
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited server threads or sockets
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=worker_main, name="voxgrid-executor", daemon=True,
                                 args=(child, self.device, self.threads, self.state_dir, self.cache_dir))
        with worker_env(self.env):  # in its environment from the start: CUDA reads it when it initialises
            self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, args=(self._conn, self._proc), name="executor-reader",
                                        daemon=True)
        self._reader.start()

    def submit(self, job: dict, weights: bytes | Callable[[], bytes | None]) -> None:
        """Queue a job and its start weights (bytes, or a function that reads them when the job's turn
        comes: a long queue holds no blobs). ``job``: the fields of a
        :class:`~voxgrid.nodes.worker.messages.RunJob` and the ``scientist`` whose turn it takes;
        :class:`~voxgrid.nodes.worker.messages.ProtocolError` if they do not make one."""
        fields = {k: v for k, v in job.items() if k != "scientist"}
        msg = parse_job({**fields, "max_steps_per_job": self.limits.max_steps_per_job})
        with self._cv:
            self._queue.put(msg.job_id, job.get("scientist", ""), (msg, weights))
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
                self._finish(JobFailed(job_id=job.job_id, error="start weights lost; submit again"))
                continue
            try:
                send(conn, job, blob)
            except (OSError, ValueError):
                pass  # the worker is gone: its reader fails the job and starts a new one

    def _can_dispatch(self) -> bool:
        return self._closing or (self._current is None and bool(self._queue) and self.ready.is_set())

    def _finish(self, event: JobDone | JobFailed) -> None:
        self.on_event(event)  # the job's end is recorded before the next one can start or be cancelled
        with self._cv:
            if self._current and self._current.job_id == event.job_id:
                self._current = None
            self._reasons.pop(event.job_id, None)
            self._cv.notify_all()

    def _read(self, conn, proc) -> None:
        """The worker's events, until its pipe closes; then :meth:`_reap` it."""
        while True:
            try:
                event = recv_event(conn)
            except (EOFError, OSError):
                break
            except ProtocolError as exc:  # a worker out of step with us: stop it, as if it had crashed
                log.error("the executor sent a message outside the protocol: %s", exc)
                self._kill(None, "job stopped: the executor broke its protocol with the node server")
                break
            if isinstance(event, WorkerReady):
                with self._cv:
                    self.worker_device = event.device
                    self.ready.set()
                    self._cv.notify_all()
            elif isinstance(event, JobFailed) and event.worker_exits:
                with self._cv:  # before the job ends: no next job may go to the worker that is leaving
                    self._exiting = True
                    self.ready.clear()
                self._finish(event)
            elif isinstance(event, (JobDone, JobFailed)):
                self._finish(event)
            else:
                self.on_event(event)
        self._reap(proc)

    def _reap(self, proc) -> None:
        """After the worker's pipe closed: fail the job it was running and start a new worker, unless
        the node is shutting down (its unfinished jobs are recovered at the next start)."""
        proc.join(5)
        if self._closing or proc.exitcode == -signal.SIGTERM:
            return
        # The worker died (killed by the watchdog or a cancel, out of memory): fail its job, start a new one.
        code = proc.exitcode
        with self._cv:
            self.ready.clear()
            lost = self._current
        if lost is not None:
            reason = self._reasons.get(lost.job_id) or (f"executor process exited unexpectedly (exit code {code}); "
                                                        "job not completed")
            self._finish(JobFailed(job_id=lost.job_id, error=reason))
        if self._exiting:
            log.warning("executor exited (code %s) after a CUDA error broke its context; starting a fresh one", code)
        else:
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
