"""The PRV accountant (Opacus's), pinned to an independent one: Google's dp-accounting PLD accountant."""

import pytest

from voxgrid.privacy import Ledger, PrivacySpec, TrainingContext
from voxgrid.privacy.accountant import PRV_EPS_ERROR, GaussianEvent, epsilon, tighter_epsilon

# Both discretise the privacy loss distribution (PRV: Opacus, eps_error 0.01; PLD: dp-accounting's
# default discretisation 1e-4), so they agree to their discretisation errors, not to the last digit:
# we allow an absolute 2 * PRV_EPS_ERROR plus 1 % relative.
ABS_TOL, REL_TOL = 2 * PRV_EPS_ERROR, 0.01
CASES = [(1.1, 0.01, 1000), (1.0, 0.05, 200), (0.8, 0.004, 3000), (0.55, 1.0, 1), (5.0, 1.0, 10)]


def pld_reference(events, delta):
    import dp_accounting as dpa

    acc = dpa.pld.PLDAccountant()
    for e in events:
        g = dpa.GaussianDpEvent(e.noise_multiplier)
        acc.compose(g if e.sample_rate == 1 else dpa.PoissonSampledDpEvent(e.sample_rate, g), e.steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,q,steps", CASES)
def test_prv_matches_dp_accounting_pld_and_is_tighter_than_rdp(z, q, steps):
    ev = [GaussianEvent(z, q, steps)]
    prv, ref, rdp = epsilon(ev, 1e-5, "prv"), pld_reference(ev, 1e-5), epsilon(ev, 1e-5, "rdp")
    assert prv == pytest.approx(ref, abs=ABS_TOL, rel=REL_TOL)
    assert prv < rdp  # the reason to offer it: RDP's conversion to (epsilon, delta) is loose
    assert tighter_epsilon(ev, 1e-5) == prv


def test_prv_composes_mixed_events_like_pld():
    ev = [GaussianEvent(1.1, 0.02, 100)] * 3 + [GaussianEvent(4.0, 1.0, 1)] * 2
    assert epsilon(ev, 1e-6, "prv") == pytest.approx(pld_reference(ev, 1e-6), abs=ABS_TOL, rel=REL_TOL)


def test_prv_epsilon_only_grows_with_steps():
    eps = [epsilon([GaussianEvent(1.0, 0.02, n)], 1e-5, "prv") for n in (10, 100, 500, 2000)]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)


def test_unknown_accountant_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown accountant 'moments'.*rdp, prv"):
        epsilon([GaussianEvent(1.0, 0.1, 1)], 1e-5, "moments")
    assert epsilon([], 1e-5, "prv") == 0.0


def test_receipts_and_reports_state_the_tighter_figure(tmp_path):
    from voxgrid.privacy import report

    ledger = Ledger(tmp_path / "l.db")
    spec = PrivacySpec.parse({"mechanism": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5})
    ctx = TrainingContext(patients=50, batch_size=5, local_epochs=2)  # q = 0.1, 20 steps
    for job in ("a", "b"):
        ledger.reserve(job, "alice", "ct", spec, ctx)
        receipt = ledger.release(job)
    both = [GaussianEvent(1.0, 0.1, 20)] * 2
    assert receipt.cumulative_epsilon == pytest.approx(epsilon(both, 1e-5))
    assert receipt.cumulative_epsilon_prv == pytest.approx(epsilon(both, 1e-5, "prv"))
    assert receipt.cumulative_epsilon_prv < receipt.cumulative_epsilon
    data = report.build(ledger)
    assert data["series"][0]["epsilon_prv"] == pytest.approx(receipt.cumulative_epsilon_prv)
    assert data["releases"][0]["parameters"][0]["steps"] == 20
    assert "tighter PRV accountant" in report.render_html(data)
    ledger.close()


def test_tighter_epsilon_keeps_rdp_past_the_distinct_mechanism_limit():
    from voxgrid.privacy.accountant import PRV_MAX_DISTINCT

    many = [GaussianEvent(4.0 + i, 1.0, 1) for i in range(PRV_MAX_DISTINCT + 1)]
    assert tighter_epsilon(many, 1e-5) == epsilon(many, 1e-5, "rdp")
    few = many[:2]
    assert tighter_epsilon(few, 1e-5) == pytest.approx(epsilon(few, 1e-5, "prv"))
    assert tighter_epsilon(few, 1e-5) < epsilon(few, 1e-5, "rdp")
