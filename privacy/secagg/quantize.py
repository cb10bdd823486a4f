"""Fixed-point quantisation into the ring Z_2^bits, and back.

A node sends ``rint(weight * clip(x, -clip, clip) * scale)`` for each entry and
``rint(weight * weight_scale)`` as the last word; negative values wrap to the top of the ring.
:attr:`SecAggConfig.scale` leaves headroom so that the sum over the whole roster cannot wrap,
hence the decoded sum is exact up to half a step per node (:meth:`SecAggConfig.error_bound`).
Rounding is deterministic (round half to even), so no randomness is involved here at all.
"""

from __future__ import annotations

import math

import numpy as np

from .config import SecAggConfig
from .errors import SecAggError


def ring_dtype(bits: int) -> np.dtype:
    return np.dtype("<u4") if bits == 32 else np.dtype("<u8")


def signed_dtype(bits: int) -> np.dtype:
    return np.dtype("<i4") if bits == 32 else np.dtype("<i8")


def check_vector(vector: np.ndarray) -> np.ndarray:
    """The update as a contiguous 1-D float array (no copy when it already is one)."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.kind != "f":
        raise SecAggError("the update must be a 1-D numpy float array, not "
                          f"{type(vector).__name__} {getattr(vector, 'dtype', '')} {getattr(vector, 'shape', '')}")
    if vector.size == 0:
        raise SecAggError("the update is empty")
    return np.ascontiguousarray(vector)


def check_weight(config: SecAggConfig, weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)) \
            or not math.isfinite(weight) or not 0 <= weight <= config.max_weight:
        raise SecAggError(f"weight must be a number in [0, max_weight={config.max_weight}], not {weight!r}")
    return float(weight)


def weight_word(config: SecAggConfig, weight: float) -> int:
    """The ring word carrying the weight (non-negative, so no wrap)."""
    return int(np.rint(weight * config.weight_scale))


class Quantiser:
    """Quantises chunks of one node's update into ring words, reusing its scratch buffers."""

    def __init__(self, config: SecAggConfig, weight: float, chunk: int):
        self._factor = weight * config.scale
        self._bound = weight * config.clip * config.scale
        self._signed = signed_dtype(config.bits)
        self._f64 = np.empty(chunk, np.float64)
        self._ok = np.empty(chunk, bool)

    def into(self, x: np.ndarray, out: np.ndarray, offset: int) -> None:
        """``out[:] = ring words of x`` (``out`` is a writable unsigned view of the same length)."""
        m = x.size
        f, ok = self._f64[:m], self._ok[:m]
        np.multiply(x, self._factor, out=f, dtype=np.float64)
        np.isfinite(f, out=ok)
        if not ok.all():
            bad = offset + int(np.flatnonzero(~ok)[0])
            raise SecAggError(f"the update has a non-finite entry at index {bad} ({x[bad - offset]!r})")
        np.clip(f, -self._bound, self._bound, out=f)
        np.rint(f, out=f)
        # |f| < 2**(bits-1) by the headroom rule, so the signed cast is exact; viewing it unsigned is
        # the two's-complement wrap into the ring.
        np.copyto(out.view(self._signed), f, casting="unsafe")


def decode(config: SecAggConfig, total: np.ndarray) -> tuple[np.ndarray, float]:
    """(sum of weighted entries as float64, total weight) from the unmasked sum of words."""
    signed = total.view(signed_dtype(config.bits))
    weight = float(signed[-1]) / config.weight_scale
    values = signed[:-1].astype(np.float64)
    values /= config.scale
    return values, weight
