"""Weights on the wire and on disk: safetensors only (invariant 2, never pickle)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

StateDict = dict[str, torch.Tensor]


class TensorsError(ValueError):
    """A blob that is not a valid safetensors state dict."""


#: Largest safetensors header accepted (a 3D UNet's state dict has a few KB of header).
MAX_HEADER_BYTES = 1 << 20
#: Dtypes a network's state dict can take (floats; ints for counters such as num_batches_tracked).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                 torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def dumps(state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict (tensors moved to CPU, made contiguous) to safetensors bytes."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return _st_save(flat, metadata=metadata)


def loads(data: bytes) -> StateDict:
    """Parse safetensors bytes; raises :class:`TensorsError` naming the problem.

    The header's length (first 8 bytes, little-endian) is checked against :data:`MAX_HEADER_BYTES`
    before anything is parsed.
    """
    if len(data) >= 8:
        size = int.from_bytes(data[:8], "little")
        if size > MAX_HEADER_BYTES:
            raise TensorsError(f"the safetensors header is {size} bytes; the limit is {MAX_HEADER_BYTES} bytes")
    try:
        return _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise TensorsError(f"not a valid safetensors blob ({len(data)} bytes): {exc}") from exc


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`TensorsError` naming the first tensor whose dtype a network cannot take
    (:data:`WEIGHT_DTYPES`) or with an entry that is NaN, inf or beyond float32's range."""
    for k, t in state.items():
        if t.dtype not in WEIGHT_DTYPES:
            raise TensorsError(f"weights '{k}': dtype {t.dtype} is not accepted "
                               f"(one of {', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)})")
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise TensorsError(f"weights '{k}' have non-finite entries (NaN, inf, or beyond float32's range)")


def digest(data: bytes) -> str:
    """Content address of a blob (hex sha256)."""
    return hashlib.sha256(data).hexdigest()


def check_compatible(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`TensorsError` if ``other`` lacks keys of ``reference`` or has other shapes."""
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    if missing or extra:
        raise TensorsError(f"weights do not match the network: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in reference.items():
        if tuple(other[k].shape) != tuple(v.shape):
            raise TensorsError(f"weights '{k}': shape {tuple(other[k].shape)}, network expects {tuple(v.shape)}")


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All tensors as one float32 vector, in sorted key order (the order both sides of a secure sum use)."""
    if not state:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([state[k].detach().reshape(-1).to(torch.float32).cpu() for k in sorted(state)]).numpy()


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of :func:`flatten` with the keys and shapes of ``like`` (values as float32)."""
    total = sum(like[k].numel() for k in like)
    if vector.ndim != 1 or vector.shape[0] != total:
        raise TensorsError(f"a flat vector of {vector.shape} cannot fill the network's {total} values")
    out: StateDict = {}
    at = 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = torch.from_numpy(np.ascontiguousarray(vector[at:at + n], dtype=np.float32)).reshape(like[k].shape)
        at += n
    return out
