"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

Written here because no well-kept Python library offers it (the PyPI packages are unmaintained
or pull in their own crypto); the arithmetic is thirty lines of Python integers. Coefficients
come from :mod:`secrets`. The Mersenne prime 2**521 - 1 exceeds every 256-bit secret, so a
secret is one field element and reconstruction is exact.
"""

from __future__ import annotations

import functools
import secrets

from .errors import SecAggError

PRIME = 2**521 - 1
SECRET_BYTES = 32
_Y_HEX = 131  # hex digits of a field element (521 bits)


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares y = f(x) for each x in ``xs`` of a random degree ``threshold - 1`` polynomial with f(0) = secret."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret must be {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError(f"cannot split into {len(xs)} distinct nonzero shares with threshold {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


@functools.lru_cache(maxsize=4096)
def _lagrange(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """Lagrange basis values at ``at`` for the nodes ``xs`` (cached: every owner's shares usually come
    from the same survivors, so the aggregator computes each basis once per round, not once per node)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _interpolate_at(points: list[tuple[int, int]], at: int) -> int:
    basis = _lagrange(tuple(x for x, _ in points), at)
    return sum(y * b for (_, y), b in zip(points, basis, strict=True)) % PRIME


def combine(shares: dict[int, int], threshold: int, what: str) -> bytes:
    """The secret from at least ``threshold`` shares {x: y}.

    Shares beyond the threshold are checked against the polynomial the first ``threshold`` define,
    so a corrupted share is detected whenever there is redundancy.
    """
    if len(shares) < threshold:
        raise SecAggError(f"cannot reconstruct {what}: only {len(shares)} of threshold {threshold} shares")
    points = sorted(shares.items())
    base, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate_at(base, x) != y:
            raise SecAggError(f"cannot reconstruct {what}: the share at x={x} is inconsistent with the others")
    value = _interpolate_at(base, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise SecAggError(f"cannot reconstruct {what}: the shares do not encode a {SECRET_BYTES}-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def encode_y(y: int) -> str:
    return format(y, f"0{_Y_HEX}x")


def decode_y(text: str, what: str) -> int:
    try:
        y = int(text, 16)
    except (TypeError, ValueError):
        raise SecAggError(f"{what}: share value is not hexadecimal") from None
    if len(text) != _Y_HEX or not 0 <= y < PRIME:
        raise SecAggError(f"{what}: share value is not a field element")
    return y
