"""Several workers behind one executor interface: one per GPU (:mod:`.gpus` says which and why).

:class:`ExecutorPool` keeps the node's queue and hands a job to a worker's :class:`~.executor.Executor`
only when that worker is ready and idle, so each worker holds at most one job; the watchdog, restarts
and the pipe protocol stay the single executor's. :func:`executor_for` gives a node one plain
executor when it has one worker (the CPU, one GPU) and a pool when it has several.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from voxgrid.nodes.service.executor import Executor
from voxgrid.nodes.service.gpus import AnyReady, WorkerSlot, gpu_ids, order_key, pick, plan_workers
from voxgrid.nodes.service.limits import FairQueue, JobLimits
from voxgrid.nodes.worker.messages import JobDone, JobFailed, WorkerEvent, parse_job

log = logging.getLogger("voxgrid.executor")


class ExecutorPool:
    """One :class:`~.executor.Executor` per slot; jobs of one (experiment, dataset) in order, others spread.

    ``make_executor``: builds a worker's executor (tests pass a stand-in); it gets the pool's arguments
    and the slot's ``device``, ``threads``, ``env`` and a share of the workers' memory."""

    def __init__(self, on_event: Callable[[WorkerEvent], None], slots: list[WorkerSlot], *,
                 state_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 limits: JobLimits | None = None, poll: float = 0.25, make_executor: Callable[..., Executor] = Executor):
        if not slots:
            raise ValueError("an executor pool needs at least one worker")
        self.on_event, self.limits, self.slots = on_event, limits or JobLimits(), list(slots)
        # Without a durable state folder, a site's kept tensors live in one worker's memory: stay there.
        self.sticky = state_dir is None
        self._cv = threading.Condition()
        self._queue = FairQueue()
        self._busy: dict[int, tuple[str, tuple[str, str]]] = {}  # worker -> (job id, order key)
        self._last: dict[tuple[str, str], int] = {}  # order key -> the worker that ran its last job
        self._closing = False
        memory = self.limits.worker_memory_bytes() // len(slots)  # the node's worker memory, shared out
        self.workers = [make_executor(self._events_of(i), device=s.device, threads=s.threads, state_dir=state_dir,
                                      cache_dir=cache_dir, limits=self.limits, poll=poll, env=s.env,
                                      memory_bytes=memory) for i, s in enumerate(slots)]
        self.ready = AnyReady(lambda: [w.ready for w in self.workers])
        threading.Thread(target=self._dispatch, args=(poll,), name="executor-pool", daemon=True).start()

    @property
    def worker_device(self) -> str | None:
        """The device type the workers reported ("cuda", "cpu"); None until one is ready."""
        return next((w.worker_device for w in self.workers if w.worker_device), None)

    def submit(self, job: dict, weights) -> None:
        """As :meth:`.executor.Executor.submit` (ProtocolError for a job that is not one)."""
        fields = {k: v for k, v in job.items() if k != "scientist"}
        msg = parse_job({**fields, "max_steps_per_job": self.limits.max_steps_per_job})
        with self._cv:
            self._queue.put(msg.job_id, job.get("scientist", ""), (msg, job, weights))
            self._cv.notify_all()

    def queued(self) -> list[str]:
        with self._cv:
            mine = self._queue.job_ids()
        return [j for w in self.workers for j in w.queued()] + mine

    def running_jobs(self) -> list[str]:
        return [j for j in (w.running() for w in self.workers) if j]

    def running(self) -> str | None:
        jobs = self.running_jobs()
        return jobs[0] if jobs else None

    def assignments(self) -> dict[int, str]:
        """Worker index -> the job it was handed and has not ended."""
        with self._cv:
            return {w: job for w, (job, _) in self._busy.items()}

    def cancel(self, job_id: str, reason: str) -> str | None:
        with self._cv:
            if self._queue.remove(job_id) is not None:
                return "queued"
        for i, w in enumerate(self.workers):
            where = w.cancel(job_id, reason)
            if where == "queued":  # handed but not started: no event will free the worker
                self._release(i, job_id)
            if where:
                return where
        return None

    def _events_of(self, i: int) -> Callable[[WorkerEvent], None]:
        def handle(event: WorkerEvent) -> None:
            self.on_event(event)  # the job's end is recorded before the next job of its key may start
            if isinstance(event, (JobDone, JobFailed)):
                self._release(i, event.job_id)
        return handle

    def _release(self, i: int, job_id: str) -> None:
        with self._cv:
            if self._busy.get(i, ("",))[0] == job_id:
                del self._busy[i]
            self._cv.notify_all()

    def _choose(self):
        idle = [i for i, w in enumerate(self.workers) if i not in self._busy and w.ready.is_set()]
        running = {key for _, key in self._busy.values()}
        return pick(self._queue.in_turn(), idle, running, self._last, self.sticky)

    def _dispatch(self, poll: float) -> None:
        """Hand each free, ready worker the next job it may run."""
        while True:
            with self._cv:
                choice = None
                while not self._closing and (choice := self._choose()) is None:
                    self._cv.wait(poll)  # also wakes for workers becoming ready, which do not notify
                if self._closing:
                    return
                entry, i = choice
                self._queue.take(entry.job_id)
                msg, job, weights = entry.item
                self._busy[i] = (msg.job_id, order_key(msg))
                self._last[order_key(msg)] = i
            log.info("job %s to worker %d (%s)", msg.job_id, i, self.slots[i].gpu or self.slots[i].device)
            self.workers[i].submit(job, weights)

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for w in self.workers:
            w.close(timeout)


def executor_for(on_event: Callable[[WorkerEvent], None], device: str = "auto", threads: int = 0,
                   gpus: list[str] | None = None, **kwargs) -> Executor | ExecutorPool:
    """The node's executor: one worker per GPU for "auto"/"cuda" on a machine with several (``gpus``:
    :func:`.gpus.gpu_ids` unless given), else one worker. ``kwargs``: the executor's."""
    slots = plan_workers(device, gpu_ids() if gpus is None else gpus, threads)
    if len(slots) == 1:
        s = slots[0]
        return Executor(on_event, device=s.device, threads=s.threads, env=s.env, **kwargs)
    return ExecutorPool(on_event, slots, **kwargs)
