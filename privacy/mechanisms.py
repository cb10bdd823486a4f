"""Update-level privacy mechanisms: pure functions over state dicts (name -> tensor).

Noise comes only from the generator passed in. At a node it must be :func:`secure_generator`,
never a seed the scientist chose: whoever knows the seed can subtract the noise.

DP-SGD (``dp_sgd``) is not here: it acts inside local training (``nodes.training``), and
:func:`apply_filters` passes over it.

Why there is no sparse vector technique (SVT) filter. The federated brain-tumour work (Li et al.
2019, "Privacy-preserving federated brain tumour segmentation") clips each update entry to
[-gamma, gamma], then uses SVT (after Lyu et al. 2017) to choose which entries pass a noisy
threshold and shares those entries with noise, stating epsilon for that selection. As we read it,
the figure is not a patient-level guarantee for what leaves the site, so we do not offer it:

* One patient moves every one of the d entries at once (d ~ 10^6). SVT's cost grows linearly with
  the number c of "above threshold" answers (and every released value is a further Laplace
  release), so sharing a fraction of d entries costs c * (per-answer epsilon): composed over all
  shared entries and all rounds the bound is orders of magnitude above the per-selection figure.
* Calibrating instead to the whole vector (clip the update to L2 norm C) makes the per-entry
  noise scale with C*sqrt(d) in L1 terms: the selection becomes noise.
* A threshold taken as a percentile of the same update is itself data-dependent and must be paid
  for; SVT's proof assumes it is fixed or released privately.
Made sound, it is dominated by what we offer: clip + Gaussian noise (``gaussian_update``, or
DP-SGD) followed by percentile sharing gives one (epsilon, delta) for the whole update, and the
top-k selection after noise is post-processing, at no further cost.
"""

from __future__ import annotations

import math
import secrets

import torch

from .spec import DPSGD, GaussianUpdate, Percentile, PrivacySpec

Update = dict[str, torch.Tensor]


def secure_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy pool (63 bits)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class NonFiniteUpdate(ValueError):
    """An update (or a filter's parameter) with NaN or inf entries: no clip can bound it, so nothing is released."""


#: Dtypes the filters take; anything else (ints, bool, complex, float8) is refused.
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Largest clip or noise std a filter accepts: the float32 output must stay finite.
MAX_PARAMETER = 1e30


def _check(update: Update) -> None:
    """Refuse dtypes other than :data:`FLOATS` (TypeError) and non-finite entries (:class:`NonFiniteUpdate`)."""
    bad = [f"{k} ({t.dtype})" for k, t in update.items() if t.dtype not in FLOATS]
    if bad:
        raise TypeError(f"privacy filters need floating-point tensors (float16/bfloat16/float32/float64); "
                        f"not so: {bad[:5]}")
    for k, t in update.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteUpdate(f"update tensor '{k}' has non-finite entries (NaN or inf); nothing was released")


def _param(name: str, value: float, *, zero: bool = False) -> float:
    v = float(value)
    if not ((0 <= v if zero else 0 < v) and v <= MAX_PARAMETER):  # also refuses NaN and inf
        raise NonFiniteUpdate(f"{name} must be a number in {'[' if zero else '('}0, {MAX_PARAMETER:g}], "
                              f"not {value!r}")
    return v


def _float32(update: Update) -> Update:
    """The (checked) update as float32, every filter's output, refusing entries beyond float32's range."""
    out = {k: t.float() for k, t in update.items()}
    for k, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteUpdate(f"update tensor '{k}' has entries beyond float32's range; nothing was released")
    return out


def _norm_parts(update: Update) -> tuple[float, float]:
    """(m, r) with norm = m * r: m the largest magnitude, r = norm / m in [1, sqrt(entries)], in float64,
    so huge finite entries cannot overflow."""
    m = max((float(t.detach().abs().max()) for t in update.values() if t.numel()), default=0.0)
    if m == 0 or not math.isfinite(m):
        return m, 1.0
    return m, math.sqrt(sum(float((t.detach().double() / m).pow(2).sum()) for t in update.values()))


def l2_norm(update: Update) -> float:
    """Global L2 norm of all entries of all tensors (NaN or inf if an entry is, or if it exceeds float64)."""
    m, r = _norm_parts(update)
    return m * r


def clip(update: Update, max_norm: float) -> Update:
    """The update scaled so that its global L2 norm is at most ``max_norm`` (float32 out)."""
    _check(update)
    max_norm = _param("clip", max_norm)
    m, r = _norm_parts(update)
    scale = 1.0 if m == 0 else min(1.0, (max_norm / m) / (r * (1 + 1e-12)))
    if scale == 1.0:
        return _float32(update)
    return _float32({k: t.double() * scale for k, t in update.items()})


def gaussian_update(update: Update, *, clip_norm: float, noise_multiplier: float,
                    generator: torch.Generator) -> Update:
    """Clip to global L2 norm ``clip_norm``, then add N(0, (noise_multiplier * clip_norm)^2) to every entry
    (float32 out)."""
    std = _param("noise std (noise_multiplier * clip)",
                 _param("noise_multiplier", noise_multiplier, zero=True) * _param("clip", clip_norm), zero=True)
    return _float32({k: t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
                     for k, t in clip(update, clip_norm).items()})


def percentile(update: Update, *, fraction: float) -> Update:
    """Keep the ``ceil(fraction * n)`` entries of largest magnitude across the whole update; zero the rest."""
    _check(update)
    update = _float32(update)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([t.detach().reshape(-1).abs().cpu() for t in update.values()]) if update else None
    if flat is None or flat.numel() == 0:
        return dict(update)
    k = math.ceil(fraction * flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True  # exactly k, even with ties
    out, start = {}, 0
    for name, t in update.items():
        n = t.numel()
        out[name] = torch.where(keep[start:start + n].reshape(t.shape).to(t.device), t, 0.0)
        start += n
    return out


def distributed_share(weight: float, max_weight: float, threshold: int) -> float:
    """The fraction of a distributed Gaussian filter's noise std one node adds before its update is
    weighted and securely summed.

    Node i releases ``w_i * (clip(u_i) + N(0, (s_i * sigma * C)^2))``. With ``s_i = max_weight /
    (w_i * sqrt(t))`` every weighted share has std ``sigma * C * max_weight / sqrt(t)``, so the sum of
    at least ``t`` of them has std >= ``sigma * C * max_weight``, while one patient moves the sum by at
    most ``2 * C * w_i <= 2 * C * max_weight``: the sum is the filter's Gaussian mechanism. A node of
    weight 0 contributes nothing (its weighted update is zero) and adds no noise.
    """
    if threshold < 1 or not (math.isfinite(weight) and math.isfinite(max_weight)) or max_weight <= 0 \
            or weight < 0 or weight > max_weight:
        raise ValueError(f"distributed noise needs 0 <= weight <= max_weight and threshold >= 1, got weight "
                         f"{weight}, max_weight {max_weight}, threshold {threshold}")
    return 0.0 if weight == 0 else max_weight / (weight * math.sqrt(threshold))


def apply_filters(spec: PrivacySpec, update: Update, generator: torch.Generator, *,
                  noise_share: float | None = None) -> Update:
    """Run the spec's filter chain, in order, over the update.

    ``noise_share``: for a ``distributed`` Gaussian filter, the fraction of its noise std this node
    adds (:func:`distributed_share`); such a filter without one is refused.
    Refuses a non-finite update (:class:`NonFiniteUpdate`) and non-float dtypes before any filter runs.
    """
    _check(update)
    for f in spec.filters:
        if isinstance(f, GaussianUpdate):
            share = 1.0
            if f.distributed:
                if noise_share is None:
                    raise ValueError("a distributed 'gaussian_update' adds only a share of the noise, so it needs "
                                     "secure aggregation (Experiment(secure_aggregation=True))")
                share = noise_share
            update = gaussian_update(update, clip_norm=f.clip, noise_multiplier=f.noise_multiplier * share,
                                     generator=generator)
        elif isinstance(f, Percentile):
            update = percentile(update, fraction=f.fraction)
        elif isinstance(f, DPSGD):
            continue  # applied in local training (nodes.training); the update is already its output
        else:  # a new filter type must be wired here before any plan may use it
            raise TypeError(f"no implementation for privacy filter {f.mechanism!r}")
    return update
