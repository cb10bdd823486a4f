"""The noise multiplier that meets a privacy target: people think in epsilon, DP-SGD needs sigma.

:func:`noise_for_target` finds the smallest noise multiplier (to a relative precision of
``RTOL``) whose composed RDP epsilon over all planned steps is at most the target. It is a pure,
deterministic function of (target, delta, q, steps), so a node and a scientist who know the same
schedule derive the same sigma; the node always derives it itself (the scientist's figure is
only a preview) and accounts what it actually ran.

>>> noise_for_target(8.0, 1e-5, 0.5, 10)  # doctest: +SKIP
1.28...
"""

from __future__ import annotations

import math
import threading

from .accountant import ORDERS, AccountingError, GaussianEvent, epsilon

#: Relative precision of the derived noise multiplier: sigma * (1 - RTOL) would exceed the target.
RTOL = 1e-4
#: Largest noise multiplier the search tries; a target it cannot meet is refused.
MAX_NOISE = 1e4
#: Derivations kept for the process's life: (target, delta, q, steps) -> noise multiplier.
_DERIVED: dict[tuple[float, float, float, int], float] = {}
_DERIVED_MAX = 4096
_LOCK = threading.Lock()


def is_derived(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> bool:
    """Whether :func:`noise_for_target` already knows this answer (then it costs nothing: a node only
    counts new derivations against a scientist, each a fraction of a second to seconds of CPU)."""
    with _LOCK:
        return (target_epsilon, delta, sample_rate, steps) in _DERIVED


def _spent(z: float, delta: float, q: float, steps: int) -> float:
    """RDP epsilon as the ledger states it (:func:`.accountant.epsilon`, all orders); inf where none holds."""
    try:
        return epsilon([GaussianEvent(z, q, steps)], delta)
    except AccountingError:
        return math.inf  # noise too small to state any epsilon: certainly over the target


def _spent_integer_orders(z: float, delta: float, q: float, steps: int) -> float:
    """The RDP epsilon over the integer orders only: 30 times faster than all orders (no series), and never
    below the ledger's figure (a minimum over fewer orders), so a sigma that meets the target here meets it there."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = [a for a in ORDERS if a == int(a)]
    try:
        eps, _ = opacus_rdp.get_privacy_spent(orders=orders, delta=delta,
                                              rdp=opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps,
                                                                         orders=orders))
    except (ArithmeticError, ValueError):
        return math.inf
    return float(eps) if math.isfinite(eps) else math.inf


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (unitless) whose RDP epsilon after ``steps`` Poisson-subsampled
    Gaussian steps at rate ``sample_rate`` is <= ``target_epsilon`` at ``delta``.

    The result ``z`` satisfies ``epsilon(z) <= target`` and ``epsilon(z * (1 - RTOL)) > target``
    (:func:`.accountant.epsilon`, the figure the ledger states). Raises AccountingError (a ValueError)
    for a target that no multiplier up to ``MAX_NOISE`` meets.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (0 < sample_rate <= 1 and steps >= 1):
        raise ValueError(f"need sample_rate in (0, 1] and steps >= 1, got {sample_rate}, {steps}")
    key = (target_epsilon, delta, sample_rate, steps)
    with _LOCK:
        if key in _DERIVED:
            return _DERIVED[key]
    args = (delta, sample_rate, steps)
    # First on the integer orders (cheap), then on all orders from just below that answer: its sigma
    # already meets the target on all orders, and the true answer is within a few per cent under it.
    fast = _search(_spent_integer_orders, target_epsilon, *_bracket(_spent_integer_orders, target_epsilon, *args), *args)
    hi, lo = fast, fast * 0.98
    while _spent(lo, *args) <= target_epsilon:
        hi, lo = lo, lo * 0.9
    z = _search(_spent, target_epsilon, lo, hi, *args)
    with _LOCK:
        if len(_DERIVED) < _DERIVED_MAX:
            _DERIVED[key] = z
    return z


def _search(spent, target: float, lo: float, hi: float, delta: float, q: float, steps: int) -> float:
    """Shrink ``[lo, hi]`` (``spent(hi) <= target < spent(lo)``) to ``hi / lo <= 1 + RTOL / 2``; returns hi.

    A secant step on log(epsilon) against log(sigma), which is nearly linear, then a probe just on
    the other side of it to squeeze the bracket: a few evaluations, not the ~15 of a bisection.
    """
    def gap(z: float) -> float:
        return math.log(spent(z, delta, q, steps) / target)

    f_lo, f_hi = gap(lo), gap(hi)
    while hi / lo > 1 + RTOL / 2:
        u = math.log(hi) - f_hi * (math.log(hi) - math.log(lo)) / (f_hi - f_lo) if math.isfinite(f_lo) else None
        mid = math.sqrt(hi * lo) if u is None or not lo < math.exp(u) < hi else math.exp(u)
        f_mid = gap(mid)
        if f_mid <= 0:
            hi, f_hi, probe = mid, f_mid, max(lo, mid * (1 - RTOL / 4))
        else:
            lo, f_lo, probe = mid, f_mid, min(hi, mid * (1 + RTOL / 4))
        if lo < probe < hi:
            f_probe = gap(probe)
            if f_probe <= 0:
                hi, f_hi = probe, f_probe
            else:
                lo, f_lo = probe, f_probe
    return hi


def _bracket(spent, target: float, delta: float, q: float, steps: int) -> tuple[float, float]:
    """(lo, hi) with spent(hi) <= target < spent(lo), hi = 2 lo."""
    hi = 1.0
    while spent(hi, delta, q, steps) > target:  # grow until the target is met
        hi *= 2
        if hi > MAX_NOISE:
            raise AccountingError(f"no noise multiplier up to {MAX_NOISE:g} reaches epsilon {target:g} at delta "
                                  f"{delta:g} over {steps} steps at rate {q:g}: raise the target or plan fewer steps")
    lo = hi / 2
    while spent(lo, delta, q, steps) <= target:  # shrink while it still holds
        if lo < 1e-3:
            raise AccountingError(f"epsilon {target:g} holds for any noise multiplier: state a smaller target")
        hi, lo = lo, lo / 2
    return lo, hi
