"""Masked words on the wire: safetensors with exactly one tensor, ``masked`` (never pickle)."""

from __future__ import annotations

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from .errors import SecAggError

_DTYPES = (np.dtype("uint32"), np.dtype("uint64"))


def check_words(words: np.ndarray, bits: int | None = None, length: int | None = None) -> np.ndarray:
    if not isinstance(words, np.ndarray) or words.dtype not in _DTYPES or words.ndim != 1:
        raise SecAggError("masked words must be a 1-D uint32 or uint64 array, not "
                          f"{type(words).__name__} {getattr(words, 'dtype', '')} {getattr(words, 'shape', '')}")
    if bits is not None and words.dtype.itemsize * 8 != bits:
        raise SecAggError(f"masked words are {words.dtype}, but this round's ring has {bits} bits")
    if length is not None and words.size != length:
        raise SecAggError(f"masked words have length {words.size}, expected {length}")
    if words.size < 2:
        raise SecAggError("masked words must hold at least one entry and the weight")
    return words


def pack_words(words: np.ndarray) -> bytes:
    """Safetensors bytes holding ``words`` as the tensor ``masked``."""
    words = check_words(words)
    return save({"masked": np.ascontiguousarray(words.astype(words.dtype.newbyteorder("<"), copy=False))})


def unpack_words(data: bytes, bits: int | None = None, length: int | None = None) -> np.ndarray:
    """The words in ``data``; refuses anything but one 1-D uint32/uint64 tensor named ``masked``
    (and, when given, the round's ring width and the expected length)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError(f"masked words must arrive as bytes, not {type(data).__name__}")
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, TypeError) as e:
        raise SecAggError(f"masked words are not a valid safetensors file: {e}") from None
    if set(tensors) != {"masked"}:
        raise SecAggError(f"masked words must hold exactly one tensor 'masked', not {sorted(tensors)}")
    return check_words(tensors["masked"], bits, length)
