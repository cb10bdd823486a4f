"""One worker per GPU (issue 17, item 7): which GPUs a node has, a worker process pinned to each with
``CUDA_VISIBLE_DEVICES``, and a pool that spreads jobs over them.

Pinning. Each worker sees exactly one GPU, so inside it "auto" and "cuda" mean that GPU (cuda:0 there),
and nothing a job does can land on another worker's GPU. The variable must be in the worker's
environment before CUDA initialises; a spawned worker imports torch (every voxgrid module does) before
any of our code runs there, so the variable is put into the environment the process is started with
(:func:`worker_env`), not set by the worker afterwards.

Order. Jobs of one experiment on one dataset run one at a time, in the order they arrived: a round's
site-kept tensors (FedBN) and DTP's averages feed the next round, and an evaluate job reads the train
job's. Such a job goes back to the worker that ran its predecessor when that worker is free (its
volumes are prepared there and its network is warm); when the site-kept state is durable (the node's
``state_dir``), it may also go to another free worker rather than wait. Jobs of other experiments or
datasets spread over the free workers. Among the jobs that may start, the scientists take turns
(:class:`~.limits.FairQueue`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


#: Environment variables a worker may be given (nothing else of the server's environment is touched).
WORKER_ENV_KEYS = ("CUDA_VISIBLE_DEVICES",)
_ENV_LOCK = threading.Lock()


def nvidia_gpu_ids(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """The indices of the machine's NVIDIA GPUs as ``nvidia-smi --list-gpus`` numbers them (none without
    it). Asked in a subprocess: the server never initialises CUDA itself."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def gpu_ids(env: Mapping[str, str] = os.environ, probe: Callable[[], list[str]] = nvidia_gpu_ids) -> list[str]:
    """The GPUs this node may use: those its own ``CUDA_VISIBLE_DEVICES`` names (ids or UUIDs, in its
    order; empty or -1: none), else every GPU ``probe`` finds."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    return probe()


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process to start: the device it is told, the environment it starts with, its CPU
    threads (0: torch's default)."""

    device: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 0

    @property
    def gpu(self) -> str | None:
        return self.env.get("CUDA_VISIBLE_DEVICES") or None


def plan_workers(device: str, gpus: Sequence[str], threads: int = 0, cpus: int | None = None) -> list[WorkerSlot]:
    """The workers for a node's ``device`` setting and its ``gpus`` (:func:`gpu_ids`).

    "auto" and "cuda": one worker per GPU, each seeing only its own ("auto" with no GPU: one worker,
    which says why it runs on the CPU). "cuda:N": one worker on the node's N-th GPU. "cpu": one worker,
    no GPU visible. ``threads`` (0: the machine's ``cpus`` shared out) sets each worker's CPU threads."""
    cpus = cpus or os.cpu_count() or 1
    if device == "cpu":
        return [WorkerSlot("cpu", {"CUDA_VISIBLE_DEVICES": ""}, threads)]
    if device.startswith("cuda:") and device[5:].isdigit():
        n = int(device[5:])
        if n >= len(gpus):  # let the worker fail naming the device, as a single worker would
            return [WorkerSlot(device, {}, threads)]
        return [WorkerSlot("cuda", {"CUDA_VISIBLE_DEVICES": gpus[n]}, threads)]
    if device not in ("auto", "cuda") or not gpus:
        return [WorkerSlot(device, {}, threads)]
    per = threads or max(1, cpus // len(gpus))
    return [WorkerSlot(device, {"CUDA_VISIBLE_DEVICES": g}, per) for g in gpus]


@contextmanager
def worker_env(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with ``env`` set, for starting one worker (it inherits it), then as
    it was. Serialised: two workers starting at once each get their own."""
    bad = set(env) - set(WORKER_ENV_KEYS)
    if bad:
        raise ValueError(f"not a worker setting: {sorted(bad)}")
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def order_key(job) -> tuple[str, str]:
    """Jobs with the same key run one at a time, in arrival order: (experiment, dataset)."""
    return job.request.experiment_id, job.request.dataset


def pick(entries: Sequence, idle: Sequence[int], running_keys: set, last_worker: Mapping, sticky: bool):
    """The (entry, worker) to start next, or None.

    ``entries``: queued entries in the scientists' turn order, each ``.item[0]`` a job; ``idle``: free
    workers; ``running_keys``: keys (:func:`order_key`) with a job running; ``last_worker``: key -> the
    worker that ran its last job; ``sticky``: a key's jobs must stay on that worker (state not durable)."""
    if not idle:
        return None
    blocked = set(running_keys)
    for entry in entries:
        key = order_key(entry.item[0])
        if key in blocked:
            continue
        blocked.add(key)  # a later job of this key waits behind this one
        last = last_worker.get(key)
        if last in idle:
            return entry, last
        if last is not None and sticky:
            continue
        fresh = [w for w in idle if w not in last_worker.values()]  # a worker no key is at home on
        return entry, (fresh or list(idle))[0]
    return None


class AnyReady:
    """Set when any of the workers is ready (what the server waits for before it says it is ready)."""

    def __init__(self, events: Callable[[], list[threading.Event]]):
        self._events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events())

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.05)
        return True
