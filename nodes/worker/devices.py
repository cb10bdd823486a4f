"""Which device the worker trains on, why not the GPU, and which errors leave a GPU unusable.

Shared by the worker (:func:`voxgrid.nodes.worker.training.pick_device`, the job loop in
:mod:`.runner`) and the doctor (:func:`voxgrid.nodes.ops.doctor.check_gpu`). Light to import: torch
only when a probe runs. Every probe is a plain function or value that callers may pass in, so the
decisions are tested here on a machine without a GPU.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("voxgrid.executor")

#: Present when the NVIDIA kernel driver is loaded.
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"
#: What to do about a CPU-only torch on a machine with a GPU.
CUDA_WHEEL_FIX = ("install torch's CUDA wheel (pip install torch --index-url https://download.pytorch.org/whl/cuXXX, "
                  "cuXXX as supported by the NVIDIA driver; see https://pytorch.org/get-started/locally/)")


def host_has_nvidia_gpu(exists: Callable[[str], bool] = os.path.exists,
                        which: Callable[[str], str | None] = shutil.which) -> bool:
    """Whether this machine has an NVIDIA GPU, whatever torch thinks: the kernel driver is loaded or
    ``nvidia-smi`` is on PATH."""
    return bool(exists(NVIDIA_DRIVER_FILE) or which("nvidia-smi"))


@dataclass(frozen=True)
class CudaProbe:
    """What torch says about CUDA on this machine."""

    torch_version: str
    cuda_version: str | None  # torch.version.cuda: None on a CPU-only build
    available: bool  # torch.cuda.is_available()
    device_count: int = 0
    names: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.cuda_version is not None and self.available and self.device_count > 0


def probe_torch(names: bool = False) -> CudaProbe:
    """Ask the installed torch (``names``: also the devices' names, which initialises CUDA)."""
    import torch

    available = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if available else 0
    return CudaProbe(torch.__version__, torch.version.cuda, available, count,
                     tuple(torch.cuda.get_device_name(i) for i in range(count)) if names else ())


def no_cuda_reason(probe: CudaProbe, host_gpu: bool | None = None) -> str | None:
    """Why torch cannot use a GPU here, in words (None: it can). ``host_gpu``: whether the machine has
    an NVIDIA GPU (None: not known); with one, the reason names the fix."""
    if probe.usable:
        return None
    if probe.cuda_version is None:
        why = f"torch {probe.torch_version} is a CPU-only build (torch.version.cuda is None)"
        return f"{why} on a machine with an NVIDIA GPU: {CUDA_WHEEL_FIX}" if host_gpu else why
    why = f"torch {probe.torch_version} (CUDA {probe.cuda_version}) sees no CUDA device"
    if host_gpu:
        return (f"{why} although this machine has an NVIDIA GPU: check the driver supports CUDA "
                f"{probe.cuda_version} (nvidia-smi), that CUDA_VISIBLE_DEVICES does not hide it, and that a "
                "container was given the GPU")
    return f"{why} (no NVIDIA GPU found on this machine)"


def resolve_device(requested: str = "auto", probe: Callable[[], CudaProbe] = probe_torch,
                   host_gpu: Callable[[], bool] = host_has_nvidia_gpu,
                   warn: Callable[..., None] = log.warning) -> str:
    """The device the worker uses for ``requested`` ("auto", "cpu", "cuda", "cuda:1", ...).

    "auto" is CUDA when torch can use it; otherwise the CPU, never silently: ``warn`` gets the reason
    (a CPU-only torch build, or no device visible)."""
    if requested != "auto":
        return requested
    p = probe()
    why = no_cuda_reason(p, host_gpu() if not p.usable else None)
    if why is None:
        return "cuda"
    warn("device 'auto': jobs run on the CPU: %s", why)
    return "cpu"


# --- errors that leave the CUDA context unusable -----------------------------------------------------
#: Words of CUDA errors after which the process's CUDA context is broken ("sticky"): every later kernel
#: fails too, so the worker must exit and be started afresh.
STICKY_CUDA_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "illegal instruction",
                       "misaligned address", "unspecified launch failure", "cudaErrorLaunchFailure",
                       "cudaErrorIllegalAddress", "cudaErrorAssert", "CUBLAS_STATUS", "CUDNN_STATUS_EXECUTION_FAILED",
                       "CUDA driver error", "uncorrectable ECC error")


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a CUDA error that breaks the context.

    Out-of-memory is not: the caching allocator recovers from it (the job fails, the next one runs)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RuntimeError) and type(e).__name__ != "OutOfMemoryError":  # AcceleratorError is one
            text = str(e)
            if "out of memory" not in text and any(m in text for m in STICKY_CUDA_MARKERS):
                return True
        e = e.__cause__ or e.__context__
    return False
