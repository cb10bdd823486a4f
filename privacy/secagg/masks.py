"""Mask expansion: ChaCha20 keystreams (from ``cryptography``) added to ring words in place.

Each 32-byte seed keys ChaCha20 with a zero nonce (every seed is used for one stream only: seeds
are bound to experiment, round and pair by HKDF), and encrypting zeros gives the keystream,
read as little-endian ring words. Work proceeds in cache-sized chunks: every stream fills one
reusable buffer (``update_into``), added or subtracted into the words with wrapping numpy
arithmetic, so memory stays at the output plus a few chunk buffers.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .quantize import Quantiser, ring_dtype

CHUNK = 1 << 16  # words per chunk: 256 KiB of uint32, fits L2 with its keystream buffer


class Stream:
    """One mask: the keystream of ``key``, added (sign +1) or subtracted (sign -1)."""

    def __init__(self, key: bytes, sign: int):
        if len(key) != 32 or sign not in (1, -1):
            raise ValueError("a mask stream needs a 32-byte key and a sign of +1 or -1")
        self.key, self.sign = key, sign

    def encryptor(self):
        return Cipher(algorithms.ChaCha20(self.key, bytes(16)), mode=None).encryptor()


def apply(words: np.ndarray, streams: list[Stream], *, head: tuple[np.ndarray, Quantiser] | None = None) -> None:
    """Add each stream's mask to ``words`` in place; with ``head=(x, quantiser)`` first quantise
    ``x`` into ``words[:len(x)]`` chunk by chunk, so each chunk is masked while still in cache."""
    dtype = ring_dtype(words.dtype.itemsize * 8)
    if words.dtype != dtype or not words.flags.c_contiguous or not words.flags.writeable:
        raise ValueError(f"mask words must be a writable contiguous {dtype} array")
    zeros = bytes(CHUNK * dtype.itemsize)
    buffer = bytearray(CHUNK * dtype.itemsize)
    keystream = np.frombuffer(buffer, dtype)
    encryptors = [(s.encryptor(), s.sign) for s in streams]
    n_head = 0 if head is None else head[0].size
    for start in range(0, words.size, CHUNK):
        stop = min(start + CHUNK, words.size)
        block = words[start:stop]
        if start < n_head:
            head[1].into(head[0][start:min(stop, n_head)], block[:min(stop, n_head) - start], start)
        nbytes = (stop - start) * dtype.itemsize
        ks = keystream[:stop - start]
        for encryptor, sign in encryptors:
            encryptor.update_into(memoryview(zeros)[:nbytes], buffer)
            (np.add if sign > 0 else np.subtract)(block, ks, out=block)


def expand(key: bytes, length: int, bits: int) -> np.ndarray:
    """The mask of ``key`` alone (for tests and checks)."""
    words = np.zeros(length, ring_dtype(bits))
    apply(words, [Stream(key, 1)])
    return words
