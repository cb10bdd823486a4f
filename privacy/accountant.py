"""Privacy accounting: epsilon of composed (Poisson-)subsampled Gaussian mechanisms.

We do not write the maths again: the RDP bounds and the RDP -> (epsilon, delta) conversion are
Opacus's (``opacus.accountants.analysis.rdp``), the same analysis its ``RDPAccountant`` runs.
Tests pin our figures to Google's dp-accounting for the same parameters.

>>> epsilon([GaussianEvent(noise_multiplier=1.1, sample_rate=0.01, steps=1000)], delta=1e-5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

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


def epsilon(events: Iterable[GaussianEvent], delta: float) -> float:
    """Epsilon of all ``events`` composed, at ``delta`` (0.0 for no events)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    # RDP is additive over steps, so identical mechanisms collapse into one term: a long ledger
    # costs one RDP evaluation per distinct (noise, rate), not one per release.
    steps: dict[tuple[float, float], int] = defaultdict(int)
    for e in events:
        steps[(e.noise_multiplier, e.sample_rate)] += e.steps
    if not steps:
        return 0.0
    # Imported here: Opacus pulls in its whole package (~1.5 s), which a node needs only once a
    # DP release is projected, not at every start.
    from opacus.accountants.analysis import rdp as opacus_rdp

    total = sum(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=list(ORDERS))
                for (z, q), n in steps.items())
    eps, _ = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)
