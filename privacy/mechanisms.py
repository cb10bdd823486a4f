"""Update-level privacy mechanisms: pure functions over state dicts (name -> tensor).

Noise comes only from the generator passed in. At a node it must be :func:`secure_generator`,
never a seed the scientist chose: whoever knows the seed can subtract the noise.
"""

from __future__ import annotations

import math
import secrets

import torch

from .spec import GaussianUpdate, Percentile, PrivacySpec

Update = dict[str, torch.Tensor]


def secure_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy pool (63 bits)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def _check(update: Update) -> None:
    bad = [k for k, t in update.items() if not t.is_floating_point()]
    if bad:
        raise TypeError(f"privacy filters need floating-point tensors; not so: {bad[:5]}")


def l2_norm(update: Update) -> float:
    """Global L2 norm of all entries of all tensors (accumulated in float64)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.values()))


def clip(update: Update, max_norm: float) -> Update:
    """The update scaled so that its global L2 norm is at most ``max_norm``."""
    _check(update)
    scale = min(1.0, max_norm / (l2_norm(update) + 1e-12))
    return {k: t * scale for k, t in update.items()}


def gaussian_update(update: Update, *, clip_norm: float, noise_multiplier: float,
                    generator: torch.Generator) -> Update:
    """Clip to global L2 norm ``clip_norm``, then add N(0, (noise_multiplier * clip_norm)^2) to every entry."""
    std = noise_multiplier * clip_norm
    return {k: t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
            for k, t in clip(update, clip_norm).items()}


def percentile(update: Update, *, fraction: float) -> Update:
    """Keep the ``ceil(fraction * n)`` entries of largest magnitude across the whole update; zero the rest."""
    _check(update)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([t.detach().reshape(-1).abs().float().cpu() for t in update.values()]) if update else None
    if flat is None or flat.numel() == 0:
        return dict(update)
    k = math.ceil(fraction * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True  # exactly k, even with ties
    out, start = {}, 0
    for name, t in update.items():
        n = t.numel()
        out[name] = t * keep[start:start + n].reshape(t.shape).to(t.device)
        start += n
    return out


def apply_filters(spec: PrivacySpec, update: Update, generator: torch.Generator) -> Update:
    """Run the spec's filter chain, in order, over the update."""
    for f in spec.filters:
        if isinstance(f, GaussianUpdate):
            update = gaussian_update(update, clip_norm=f.clip, noise_multiplier=f.noise_multiplier,
                                     generator=generator)
        elif isinstance(f, Percentile):
            update = percentile(update, fraction=f.fraction)
        else:  # a new filter type must be wired here before any plan may use it
            raise TypeError(f"no implementation for privacy filter {f.mechanism!r}")
    return update
