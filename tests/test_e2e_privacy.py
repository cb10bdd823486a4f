"""Privacy at real nodes: budgets set by the owner, receipts, refusals, and the ledger surviving a kill.

Real node processes over TLS (the ``federation`` fixture); one training job costs a few seconds.
"""

import math
import time

import pytest
from homes import wait_job

import voxgrid
from voxgrid import tensors
from voxgrid.client import NodeClient
from voxgrid.plan import initial_weights
from voxgrid.privacy.accountant import GaussianEvent, epsilon
from voxgrid.wire import JobRequest

pytestmark = pytest.mark.slow

GAUSS = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 8.0, "delta": 1e-5}
SINGLE = epsilon([GaussianEvent(8.0 / 2, 1.0, 1)], 1e-5)  # one release: sensitivity 2 * clip


def plan(privacy=None):
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), local_epochs=1,
                             steps_per_epoch=2, privacy=privacy)


def submit(p, privacy=None, round=0):
    pl = plan(privacy)
    blob = tensors.dumps(initial_weights(pl))
    ref = p.client.put_weights(blob)
    return p.client.submit(JobRequest(kind="train", experiment_id="dp", round=round, dataset=p.name,
                                      plan=pl.model_dump(mode="json"), plan_hash=pl.content_hash,
                                      weights_id=ref.weights_id, evaluate=False))




def test_budgets_receipts_refusals_and_the_ledger_across_a_kill(federation):
    ptrs = {p.name: p for p in federation.connect().search("#ct")}
    a, b = ptrs["site-a"], ptrs["site-b"]
    owner = NodeClient(a.url, federation.owner_token(0), federation.ca_cert)
    owner.set_budget(a.name, epsilon=1.3 * SINGLE, delta=1e-5, scientist="scientist")

    # Before: the scientist asks what it would cost.
    est = a.client.privacy_estimate(a.name, GAUSS, releases=1)
    assert est.epsilon_per_release == pytest.approx(SINGLE) and est.budgets[0].fits
    assert not a.client.privacy_estimate(a.name, GAUSS, releases=2).budgets[0].fits

    # Within budget: the update comes with a receipt stating epsilon.
    st = wait_job(a.client, submit(a, GAUSS).job_id)
    assert st.state == "done", st.error
    assert st.privacy.dp and st.privacy.epsilon == pytest.approx(SINGLE) and st.privacy.delta == 1e-5
    assert st.privacy.cumulative_epsilon == pytest.approx(SINGLE) and st.privacy.mechanism == "gaussian_update"

    # Killed after the job is done and its update is on disk, before the update is downloaded: after a
    # restart the ledger still holds the release, and the update is served with the same receipt.
    on_disk = federation.nodes[0].home / "updates" / f"{st.job_id}.safetensors"
    deadline = time.monotonic() + 30
    while not on_disk.is_file():  # written just after "done" is visible
        assert time.monotonic() < deadline
        time.sleep(0.01)
    federation.kill_node(0)
    federation.restart_node(0)
    owner = NodeClient(a.url, federation.owner_token(0), federation.ca_cert)
    [entry] = [e for e in owner.ledger().entries if e.job_id == st.job_id]
    assert entry.state == "released" and entry.epsilon == pytest.approx(SINGLE)
    after = a.client.job(st.job_id)
    assert after.state == "done" and after.privacy == st.privacy
    update = tensors.loads(a.client.update(st.job_id))
    n = sum(t.numel() for t in update.values())
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    assert norm == pytest.approx(8.0 * math.sqrt(n), rel=0.05)  # noise of std 8 * clip, added at the node

    # Past the budget: refused, saying what was spent, what the job would cost and what remains.
    with pytest.raises(voxgrid.AccessRefused) as e:
        submit(a, GAUSS, round=1)
    msg = str(e.value)
    assert "Privacy budget exceeded" in msg and f"spent so far epsilon={SINGLE:.4g}" in msg
    assert "projected cost epsilon=" in msg and f"remaining epsilon={0.3 * SINGLE:.4g}" in msg
    # Percentile sharing alone is not DP: refused where a budget applies ...
    with pytest.raises(voxgrid.AccessRefused, match="unbounded .*not differentially private"):
        submit(a, {"mechanism": "percentile", "fraction": 0.25}, round=2)
    view = owner.ledger()
    assert len(view.refusals) == 2 and view.budgets[0].remaining == pytest.approx(0.3 * SINGLE)
    # ... and released without a number where none applies.
    st = wait_job(b.client, submit(b, {"mechanism": "percentile", "fraction": 0.25}).job_id)
    assert st.state == "done", st.error
    assert st.privacy.dp is False and st.privacy.epsilon is None and st.privacy.cumulative_epsilon is None
    assert "NOT differentially private" in st.privacy.note
    update = tensors.loads(b.client.update(st.job_id))
    kept = sum(int((t != 0).sum()) for t in update.values())
    assert kept <= math.ceil(0.25 * sum(t.numel() for t in update.values()))
    # A bad spec is refused naming the field.
    with pytest.raises(voxgrid.RequestRefused, match=r"plan\.privacy\.fraction"):
        submit(b, {"mechanism": "percentile", "fraction": 3})


def test_the_scientist_sees_the_cost_before_and_the_receipts_after(federation):
    c = {p.name: p for p in federation.connect().search("#ct")}["site-c"]
    owner = NodeClient(c.url, federation.owner_token(2), federation.ca_cert)
    owner.set_budget(c.name, epsilon=10 * SINGLE, delta=1e-5)
    exp = voxgrid.Experiment(plan(GAUSS), [c], rounds=2, evaluate=False, name="dp-exp")
    before = exp.privacy_estimate()
    assert before.loc[0, "dp"] and before.loc[0, "releases"] == 2
    assert before.loc[0, "epsilon_per_release"] == pytest.approx(SINGLE)
    assert before.loc[0, "dataset fits"] and before.loc[0, "dataset budget"] == pytest.approx(10 * SINGLE)
    exp.run(rounds=1, progress=False)
    summary = exp.privacy_summary()
    assert list(summary["site"]) == ["site-c@node-site-c"]
    assert summary.loc[0, "epsilon"] == pytest.approx(SINGLE) and summary.loc[0, "dp"]
    assert summary.loc[0, "cumulative_epsilon"] >= summary.loc[0, "epsilon"]
