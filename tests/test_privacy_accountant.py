"""The accountant's figures, pinned to an independent implementation (Google's dp-accounting)."""

import math

import pytest

from voxgrid.privacy.accountant import ORDERS, GaussianEvent, epsilon

# Opacus and dp-accounting share the RDP bound of the sampled Gaussian, but evaluate the fractional
# orders with different series (dp-accounting drops an order whose series does not converge), so
# the two agree to a relative 1e-3, not to the last digit.
REL_TOL = 1e-3
CASES = [  # (noise_multiplier, sample_rate, steps): DP-SGD-like, and update-level (q = 1)
    (1.1, 0.01, 1000), (1.0, 0.05, 200), (0.8, 0.004, 5000), (0.55, 1.0, 1), (5.0, 1.0, 10), (10.0, 1.0, 3)]


def reference(events, delta):
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=list(ORDERS))
    for e in events:
        g = dpa.GaussianDpEvent(e.noise_multiplier)
        acc.compose(g if e.sample_rate == 1 else dpa.PoissonSampledDpEvent(e.sample_rate, g), e.steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,q,steps", CASES)
def test_epsilon_matches_dp_accounting(z, q, steps):
    ev = [GaussianEvent(z, q, steps)]
    assert epsilon(ev, 1e-5) == pytest.approx(reference(ev, 1e-5), rel=REL_TOL)


def test_composition_over_rounds_matches_dp_accounting():
    rounds = [GaussianEvent(1.1, 0.02, 50)] * 5 + [GaussianEvent(4.0, 1.0, 1)] * 3
    assert epsilon(rounds, 1e-6) == pytest.approx(reference(rounds, 1e-6), rel=REL_TOL)
    # identical events collapse into one term: the same figure as one event of all the steps
    assert epsilon([GaussianEvent(1.1, 0.02, 50)] * 5, 1e-5) == pytest.approx(
        epsilon([GaussianEvent(1.1, 0.02, 250)], 1e-5), rel=1e-12)


def test_epsilon_only_grows_with_steps_and_rounds():
    eps = [epsilon([GaussianEvent(1.0, 0.01, n)], 1e-5) for n in (1, 10, 100, 1000, 10000)]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    total, last = [], 0.0
    for _ in range(6):
        total.append(GaussianEvent(3.0, 1.0, 1))
        now = epsilon(total, 1e-5)
        assert now > last
        last = now


def test_edges():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([GaussianEvent(1.0, 0.01, 100)], 1e-3) < epsilon([GaussianEvent(1.0, 0.01, 100)], 1e-7)
    assert math.isfinite(epsilon([GaussianEvent(0.3, 1.0, 1)], 1e-5))
    for bad in (dict(noise_multiplier=0, sample_rate=0.1, steps=1), dict(noise_multiplier=1, sample_rate=0, steps=1),
                dict(noise_multiplier=1, sample_rate=1.5, steps=1), dict(noise_multiplier=1, sample_rate=1, steps=0)):
        with pytest.raises(ValueError):
            GaussianEvent(**bad)
    with pytest.raises(ValueError, match="delta"):
        epsilon([GaussianEvent(1.0, 1.0, 1)], 0)
