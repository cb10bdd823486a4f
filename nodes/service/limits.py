"""What one plan may ask of a node: the owner's job limits, checked at submit and enforced while it runs.

A plan is data, but data can still ask for a 1024^3 patch, a million optimiser steps or a network
too wide for the machine. The owner sets :class:`JobLimits` in ``node.json`` (``voxgrid node
limits``); the node refuses a plan over them when it arrives (422 naming the field, the value and
the limit), stops a job past its wall time or a worker past its memory limit, and hands jobs to
the worker fairly (:class:`FairQueue`), so one scientist's queue cannot starve another's.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

from pydantic import Field

from voxgrid.plan import Plan

from voxgrid.nodes.service.home import ConfigSection


class JobLimits(ConfigSection):
    """The node owner's limits on one job (defaults admit every plan the demo, notebooks, benchmarks
    and tests use, with room; a site tightens or widens them with ``voxgrid node limits``)."""

    section = "limits"

    #: plan.patch_size: voxels in one patch (128^3; the repository's plans use at most 64^3)
    max_patch_voxels: int = Field(128 ** 3, ge=1)
    #: plan.batch_size and plan.sw_batch_size
    max_batch_size: int = Field(32, ge=1)
    max_sw_batch_size: int = Field(16, ge=1)
    #: plan.samples_per_volume: patches cropped (and held in memory) per volume and epoch
    max_samples_per_volume: int = Field(32, ge=1)
    #: optimiser steps of one train job: local_epochs x steps per epoch on this node's train split
    max_steps_per_job: int = Field(10_000, ge=1)
    #: parameters of the plan's network (100 M: 400 MB of float32 weights)
    max_parameters: int = Field(100_000_000, ge=1)
    #: voxels of one volume after the plan's transforms (Spacingd to a fine grid, SpatialPadd, ResizeWithPadOrCropd,
    #: RandAffined's spatial_size): 2^29, 2 GiB as float32; a 512x512x1000 CT is 2^28
    max_volume_voxels: int = Field(2 ** 29, ge=1)
    #: entries of any list in plan.network (UNet's channels, strides: its depth); checked before it is built
    max_network_levels: int = Field(16, ge=1)
    #: wall time of one job in the worker, loading its volumes included
    max_job_seconds: float = Field(3600.0, gt=0)
    #: resident memory of the worker process and its children, in MiB; None: 75% of this machine's memory
    max_worker_memory_mb: int | None = Field(None, ge=256)
    #: jobs one scientist may have queued or running at once
    max_queued_jobs: int = Field(100, ge=1)
    #: times a job that was running when the node stopped is run again before it is failed
    max_job_restarts: int = Field(1, ge=0)
    #: new DP-SGD privacy targets (target epsilon, delta and schedule the node has not derived a noise
    #: multiplier for: up to seconds of CPU each) one scientist may ask of the node in any hour
    max_new_dp_targets_per_hour: int = Field(30, ge=1)


    def worker_memory_bytes(self) -> int:
        if self.max_worker_memory_mb is not None:
            return self.max_worker_memory_mb * 2 ** 20
        return int(0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class HourlyQuota:
    """At most ``per_hour`` takes per key in any sliding hour (thread-safe); ``take`` says whether one was left."""

    def __init__(self, per_hour: int):
        self.per_hour = per_hour
        self._taken: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> bool:
        import time

        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._taken.setdefault(key, deque())
            while times and times[0] <= now - 3600:
                times.popleft()
            if len(times) >= self.per_hour:
                return False
            times.append(now)
            return True


class LimitExceeded(ValueError):
    """A plan over one of the node's limits; the message names the field, the value and the limit."""


def planned_steps(plan: Plan, volumes: Iterable[Any]) -> int:
    """Optimiser steps a train job of ``plan`` runs on a dataset with these volume records (objects or
    dicts with ``split``, ``case_id``, optional ``patient``), as the trainer schedules them."""
    from voxgrid.privacy import PrivacySpec, TrainingContext

    vols = [SimpleNamespace(**v) if isinstance(v, dict) else v for v in volumes]
    spec = PrivacySpec.parse(plan.privacy)
    if spec is not None and spec.dp_sgd is not None:
        return spec.dp_sgd.schedule(TrainingContext.of(plan, vols))[1]
    n_train = sum(v.split == "train" for v in vols)
    per_epoch = plan.steps_per_epoch or math.ceil(n_train * plan.samples_per_volume / plan.batch_size)
    return plan.local_epochs * per_epoch


_PARAMS: OrderedDict[str, int] = OrderedDict()
_PARAMS_LOCK = threading.Lock()


def parameter_count(plan: Plan) -> int:
    """Parameters of the plan's network, built on torch's meta device (no memory); cached by plan hash."""
    import torch

    from voxgrid.plan import build_network

    key = plan.content_hash
    with _PARAMS_LOCK:
        if key in _PARAMS:
            return _PARAMS[key]
    with torch.device("meta"):
        n = sum(p.numel() for p in build_network(plan).parameters())
    with _PARAMS_LOCK:
        _PARAMS[key] = n
        while len(_PARAMS) > 256:
            _PARAMS.popitem(last=False)
    return n


def _multiplicity(plan: Plan) -> int:
    """DP-SGD's augmentation multiplicity K (1 without DP-SGD or with a malformed spec, refused elsewhere)."""
    from voxgrid.privacy import PrivacySpec, PrivacySpecError

    try:
        spec = PrivacySpec.parse(plan.privacy)
    except PrivacySpecError:
        return 1
    return spec.dp_sgd.augmentation_multiplicity if spec is not None and spec.dp_sgd is not None else 1


def check_plan(plan: Plan, limits: JobLimits, volumes: Iterable[Any], kind: str = "train",
               extent: tuple[tuple, tuple] | None = None) -> None:
    """Raise :class:`LimitExceeded` for the first of the plan's fields over the node's limits.

    ``extent``: the dataset's largest (shape in voxels, spacing in mm), when published; it bounds what
    resampling to the plan's ``Spacingd`` grid makes of a volume.
    """
    check_transforms(plan, limits, extent)
    voxels = math.prod(plan.patch_size)
    checks = [("plan.patch_size", voxels, limits.max_patch_voxels, f"{'x'.join(map(str, plan.patch_size))} = "
                                                                    f"{voxels} voxels"),
              ("plan.batch_size", plan.batch_size, limits.max_batch_size, None),
              ("plan.sw_batch_size", plan.sw_batch_size, limits.max_sw_batch_size, None),
              ("plan.samples_per_volume", plan.samples_per_volume, limits.max_samples_per_volume, None),
              # DP-SGD's K views of one patient go through the network as one batch
              ("plan.privacy.augmentation_multiplicity", _multiplicity(plan), limits.max_batch_size, None)]
    for field, value, limit, shown in checks:
        if value > limit:
            raise LimitExceeded(f"{field}: {shown or value} is over this node's limit of {limit}")
    if kind == "train":
        steps = planned_steps(plan, volumes)
        if steps > limits.max_steps_per_job:
            raise LimitExceeded(f"plan.local_epochs/steps_per_epoch: {steps} optimiser steps on this dataset "
                                f"(local_epochs {plan.local_epochs}) is over this node's limit of "
                                f"{limits.max_steps_per_job} steps per job")
    for key, value in plan.network.items():
        if isinstance(value, list) and len(value) > limits.max_network_levels:
            raise LimitExceeded(f"plan.network.{key}: {len(value)} entries is over this node's limit of "
                                f"{limits.max_network_levels}")
    params = parameter_count(plan)
    if params > limits.max_parameters:
        raise LimitExceeded(f"plan.network: {params} parameters is over this node's limit of {limits.max_parameters}")


def check_transforms(plan: Plan, limits: JobLimits, extent: tuple[tuple, tuple] | None = None) -> None:
    """Refuse transforms that would blow one volume up past ``limits.max_volume_voxels``."""
    for where in ("preprocessing", "augmentation"):
        for i, spec in enumerate(getattr(plan, where)):
            voxels = _transform_voxels(spec, extent)
            if voxels is not None and voxels > limits.max_volume_voxels:
                raise LimitExceeded(f"plan.{where}[{i}] ({spec.get('_target_')}): a volume of up to {voxels:.0f} "
                                    f"voxels is over this node's limit of {limits.max_volume_voxels}")


def _transform_voxels(spec: dict, extent: tuple[tuple, tuple] | None) -> float | None:
    """Voxels of a volume after one transform, where its parameters say (None: it keeps the size)."""
    size = spec.get("spatial_size")
    if isinstance(size, (list, tuple)) and size and all(isinstance(s, (int, float)) for s in size):
        return float(math.prod(max(float(s), 1.0) for s in size))
    pixdim = spec.get("pixdim")
    if spec.get("_target_") == "Spacingd" and extent is not None and isinstance(pixdim, (list, tuple)):
        shape, spacing = extent
        if len(pixdim) == len(shape) == len(spacing) and all(isinstance(p, (int, float)) and p > 0 for p in pixdim):
            return math.prod(n * s / p for n, s, p in zip(shape, spacing, pixdim, strict=True))
    return None


@dataclass
class Queued:
    job_id: str
    scientist: str
    item: Any


class FairQueue:
    """Jobs waiting for the worker: round-robin across scientists, first in first out within one.

    Not thread-safe; the executor holds its lock around every call.
    """

    def __init__(self) -> None:
        self._by: OrderedDict[str, deque[Queued]] = OrderedDict()

    def put(self, job_id: str, scientist: str, item: Any) -> None:
        self._by.setdefault(scientist, deque()).append(Queued(job_id, scientist, item))

    def pop(self) -> Queued | None:
        """The next job: the first of the scientist whose turn it is; that scientist then goes last."""
        if not self._by:
            return None
        scientist, jobs = next(iter(self._by.items()))
        entry = jobs.popleft()
        del self._by[scientist]
        if jobs:
            self._by[scientist] = jobs
        return entry

    def remove(self, job_id: str) -> Queued | None:
        for scientist, jobs in self._by.items():
            for entry in jobs:
                if entry.job_id == job_id:
                    jobs.remove(entry)
                    if not jobs:
                        del self._by[scientist]
                    return entry
        return None

    def in_turn(self) -> list[Queued]:
        """Every queued job, in the order :meth:`pop` would hand them out if nothing else arrived."""
        lanes = [list(jobs) for jobs in self._by.values()]
        return [lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)]

    def take(self, job_id: str) -> Queued | None:
        """Hand out a job out of turn (an earlier one must wait); its scientist has had a turn and goes last."""
        entry = self.remove(job_id)
        if entry is not None and entry.scientist in self._by:
            self._by.move_to_end(entry.scientist)
        return entry

    def __len__(self) -> int:
        return sum(map(len, self._by.values()))

    def __bool__(self) -> bool:
        return bool(self._by)

    def job_ids(self) -> list[str]:
        return [e.job_id for jobs in self._by.values() for e in jobs]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (Linux /proc; 0 where it cannot be read)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


def process_tree(pid: int) -> list[int]:
    """A process and its descendants, children first (the order to kill them in)."""
    return [*reversed(_descendants(pid)), pid]
