"""Privacy accounting: epsilon of composed (Poisson-)subsampled Gaussian mechanisms.

We do not write the maths again. Two accountants, both Opacus's:

* ``"rdp"`` (the default; budgets are enforced with it): the RDP bounds and the RDP ->
  (epsilon, delta) conversion of ``opacus.accountants.analysis.rdp``, the analysis its
  ``RDPAccountant`` runs. Fast and exact to evaluate, but 7-12 % above the PRV figure in our tests.
* ``"prv"``: Opacus's ``PRVAccountant`` (privacy random variables, Gopi et al. 2021), a numerical
  composition that is tighter; its figure is an upper bound within ``PRV_EPS_ERROR`` of the true
  epsilon. Receipts and reports show it beside the RDP figure.

Tests pin both to Google's dp-accounting (RDP to its RdpAccountant, PRV to its PLD accountant).

>>> epsilon([GaussianEvent(noise_multiplier=1.1, sample_rate=0.01, steps=1000)], delta=1e-5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: RDP orders (alpha) the bound is minimised over: Opacus's RDPAccountant defaults.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


@dataclass(frozen=True)
class GaussianEvent:
    """A Gaussian mechanism run ``steps`` times, each on a Poisson sample of the records.

    ``noise_multiplier``: noise std divided by the L2 sensitivity (unitless, > 0).
    ``sample_rate``: probability that a record is in a step's sample, in (0, 1]; 1 = no subsampling.
    ``steps``: number of compositions (>= 1).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self):
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive number, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


#: Absolute error the PRV accountant is asked for: its epsilon is at most this above the true one.
PRV_EPS_ERROR = 0.01
#: Most distinct (noise, rate) pairs :func:`tighter_epsilon` composes with PRV before keeping RDP.
PRV_MAX_DISTINCT = 4
ACCOUNTANTS = ("rdp", "prv")


def epsilon(events: Iterable[GaussianEvent], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of all ``events`` composed, at ``delta`` (0.0 for no events), by ``accountant`` ("rdp" or "prv")."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}")
    # RDP is additive over steps, so identical mechanisms collapse into one term: a long ledger
    # costs one RDP evaluation per distinct (noise, rate), not one per release.
    steps: dict[tuple[float, float], int] = defaultdict(int)
    for e in events:
        steps[(e.noise_multiplier, e.sample_rate)] += e.steps
    if not steps:
        return 0.0
    if accountant == "prv":
        return _prv(tuple(sorted(steps.items())), delta)
    # Imported here: Opacus pulls in its whole package (~1.5 s), which a node needs only once a
    # DP release is projected, not at every start.
    from opacus.accountants.analysis import rdp as opacus_rdp

    try:
        total = sum(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=list(ORDERS))
                    for (z, q), n in steps.items())
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    except (ArithmeticError, ValueError) as exc:  # a noise multiplier so small that the bound breaks down
        raise AccountingError(_unaccountable(steps, exc)) from None
    if not math.isfinite(eps):
        raise AccountingError(_unaccountable(steps, "the bound is not finite"))
    return float(eps)


class AccountingError(ValueError):
    """Events no epsilon can be stated for (noise so small that the accountant's bound breaks down)."""


def _unaccountable(steps: dict[tuple[float, float], int], why) -> str:
    smallest = min(z for z, _ in steps)
    return (f"no epsilon can be stated for a noise multiplier of {smallest:g} ({why}); such noise protects "
            "nothing: use a noise multiplier of 0.3 or more")


#: Most grid points the PRV accountant may discretise on (8 bytes each, a few arrays of them). Its
#: grid grows as the noise shrinks and the steps grow: a noise multiplier of 0.001 asked for tens of
#: GB and took the node down, so such events are refused here and :func:`tighter_epsilon` keeps RDP.
PRV_MAX_GRID = 4_000_000


@lru_cache(maxsize=256)  # seconds of FFTs each: a repeated estimate or receipt must not cost them again
def _prv(terms: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    steps = dict(terms)
    acc = PRVAccountant()
    acc.history = [(z, q, n) for (z, q), n in steps.items()]  # Opacus's own (noise, rate, steps) records
    with np.errstate(divide="ignore", over="ignore"):
        domain = acc._get_domain(prvs=[PoissonSubsampledGaussianPRV(q, z) for (z, q) in steps],
                                 num_self_compositions=list(steps.values()), eps_error=PRV_EPS_ERROR,
                                 delta_error=delta / 1000)
    if not domain.size <= PRV_MAX_GRID:
        raise OverflowError(f"the PRV accountant would need a grid of {domain.size} points (limit {PRV_MAX_GRID})")
    # delta_error: Opacus's default (delta / 1000); the returned epsilon is the upper estimate.
    with np.errstate(divide="ignore"):  # log(1 - q) at q = 1 is -inf by design in Opacus's PRV
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def tighter_epsilon(events: Iterable[GaussianEvent], delta: float) -> float:
    """The smaller of the RDP and PRV figures (both are upper bounds, so their minimum is one too).

    Falls back to RDP where the PRV accountant cannot evaluate the events (it discretises the
    privacy loss on a finite grid and refuses some extreme parameters), and beyond
    ``PRV_MAX_DISTINCT`` distinct (noise, rate) pairs: each costs about a second of FFTs, and a
    receipt is computed on the path of the release it describes.
    """
    events = list(events)
    rdp = epsilon(events, delta, "rdp")
    if len({(e.noise_multiplier, e.sample_rate) for e in events}) > PRV_MAX_DISTINCT:
        return rdp
    try:
        return min(rdp, epsilon(events, delta, "prv"))
    except (ValueError, RuntimeError, ArithmeticError, MemoryError):
        return rdp
