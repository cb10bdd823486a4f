"""Secure aggregation end to end: real node processes over TLS, the notebook sees only the sum.

The same round run plainly and securely (same seed, same start weights) must give the same global
model within the quantisation bound; a node killed mid-round is dropped and the sum of the others is
still recovered; a secure job's update never leaves unmasked.
"""

import pytest
import torch

import voxgrid
from voxgrid.client import NodeClient
from voxgrid.plan import initial_weights
from voxgrid.privacy.secagg import SecAggConfig
from voxgrid.secure import secure_round

pytestmark = pytest.mark.slow


def _plan():
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(8, 16, 32),
                             strides=(2, 2), local_epochs=1)


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_secure_round_gives_the_plain_fedavg_result_and_never_releases_an_update(federation):
    ptrs = federation.connect().search("#ct")
    assert len(ptrs) == 3
    start = initial_weights(_plan(), seed=3)
    plain = voxgrid.Experiment(_plan(), ptrs, rounds=1, evaluate=False, seed=3, initial=start, name="plain")
    secure = voxgrid.Experiment(_plan(), ptrs, rounds=1, evaluate=False, seed=3, initial=start, name="secure",
                                secure_aggregation=True, threshold=2)
    [rp] = plain.run(progress=False)
    [rs] = secure.run(progress=False)
    assert all(s.ok for s in rp.sites + rs.sites), (rp.sites, rs.sites)
    moved = _max_diff(start, plain.global_weights)
    assert moved > 1e-3  # the round did change the model ...
    assert _max_diff(plain.global_weights, secure.global_weights) < 1e-5  # ... and the secure sum is FedAvg's
    assert [s.samples for s in rs.sites] == [s.samples for s in rp.sites]

    # The secure jobs' updates never leave unmasked, not even to the node's owner ...
    owner = NodeClient(ptrs[0].url, federation.owner_token(0), federation.ca_cert)
    [job] = [j for j in owner.jobs() if j.experiment_id == secure.experiment_id and j.kind == "train"]
    for client in (owner, ptrs[0].client):
        with pytest.raises(voxgrid.AccessRefused, match="only\\s+masked"):
            client.update(job.job_id)
    # ... and a plain job slipped into the secure experiment is refused.
    req = secure._job(ptrs[0], 1, secure._global_blob()[1], "train")
    with pytest.raises(voxgrid.AccessRefused, match="asked for secure aggregation"):
        ptrs[0].client.submit(req)
    audit = [(e.action, e.detail) for e in owner.audit(limit=500)]
    assert ("update.release", f"job {job.job_id} on {job.dataset}, masked") in audit
    assert any(action == "secagg.reveal" and secure.experiment_id in detail for action, detail in audit)


def test_a_node_killed_mid_round_is_dropped_and_the_others_sum_is_recovered(federation):
    ptrs = sorted(federation.connect().search("#ct"), key=lambda p: p.node)
    exp = voxgrid.Experiment(_plan(), ptrs, rounds=1, evaluate=False, seed=5, name="drop", secure_aggregation=True,
                             threshold=2)
    blob, wid = exp._global_blob()
    victim = ptrs[2].node
    index = [p.name for p in federation.nodes].index(victim)

    def wait(p, ticket):
        if p.node == victim:  # dies after sharing its keys, before its masked update
            federation.kill_node(index)
        return exp._wait(p, ticket)

    config = SecAggConfig(experiment_id=exp.experiment_id, round=0, nodes=tuple(p.node for p in ptrs), threshold=2,
                          clip=100.0, max_weight=100.0, bits=32)
    try:
        out = secure_round(config=config, weight="samples", pointers=ptrs, like=exp.global_weights, wait=wait,
                           submit=lambda p, secure: exp._submit(p, exp._job(p, 0, wid, "train", secure=secure), blob))
    finally:
        federation.restart_node(index)
    assert out.error is None, out.error
    assert [err is None for _, err in out.outcomes] == [True, True, False]
    assert victim in out.dropped
    # The recovered mean is the two survivors' mean: check against their own plain updates.
    plain = voxgrid.Experiment(_plan(), ptrs[:2], rounds=1, evaluate=False, seed=5, name="drop-plain",
                               initial=exp.global_weights)
    plain.run(progress=False)
    expected = {k: plain.global_weights[k].float() - exp.global_weights[k].float() for k in exp.global_weights}
    assert _max_diff(expected, out.mean_delta) < 1e-5

    # More dropouts than the threshold allows: the round fails cleanly, the model is unchanged.
    federation.wait_registered()
    ptrs = sorted(federation.connect().search("#ct"), key=lambda p: p.node)
    exp = voxgrid.Experiment(_plan(), ptrs, rounds=1, evaluate=False, name="toofew", secure_aggregation=True,
                             threshold=3, min_nodes=2, job_timeout=120)
    before = {k: v.clone() for k, v in exp.global_weights.items()}
    index = [p.name for p in federation.nodes].index(ptrs[1].node)
    federation.kill_node(index)
    try:
        with pytest.raises(voxgrid.RoundFailed, match="threshold|unmask"):
            exp.run_round()
    finally:
        federation.restart_node(index)
    assert all(torch.equal(before[k], exp.global_weights[k]) for k in before)


def test_distributed_dp_each_node_adds_a_share_and_the_sum_carries_the_full_noise(federation):
    ptrs = federation.connect().search("#ct")
    dp = {"mechanism": "gaussian_update", "clip": 1e-4, "noise_multiplier": 100.0, "delta": 1e-5, "distributed": True}
    plan = _plan().model_copy(update={"privacy": dp})
    plan = voxgrid.Plan.model_validate(plan.model_dump(mode="json"))
    with pytest.raises(ValueError, match="needs secure_aggregation=True"):
        voxgrid.Experiment(plan, ptrs, rounds=1, evaluate=False, name="dist-plain")
    exp = voxgrid.Experiment(plan, ptrs, rounds=1, evaluate=False, name="dist", secure_aggregation=True, threshold=2)
    blob, wid = exp._global_blob()
    exp._put_weights(ptrs[0], blob, wid)
    with pytest.raises(voxgrid.RequestRefused, match="needs secure aggregation"):  # the node checks it too
        ptrs[0].client.submit(exp._job(ptrs[0], 0, wid, "train"))
    start = {k: v.clone() for k, v in exp.global_weights.items()}
    [r] = exp.run(progress=False)
    assert all(s.ok for s in r.sites), r.sites
    assert all(s.privacy["dp"] and s.privacy["epsilon"] > 0 for s in r.sites)
    step = torch.cat([(exp.global_weights[k].float() - start[k].float()).reshape(-1) for k in start])
    weights = [s.samples for s in r.sites]
    # Each weighted share has std sigma*C*max_w/sqrt(t); three of them, divided by the total weight.
    expected = 100.0 * 1e-4 * max(weights) * (3 / 2) ** 0.5 / sum(weights)
    assert float(step.std()) == pytest.approx(expected, rel=0.05)


def test_strategies_that_need_individual_updates_are_refused(federation):
    ptrs = federation.connect().search("#ct")
    for strategy, why in ((voxgrid.Median(), "median"), (voxgrid.DWA(), "loss history")):
        with pytest.raises(ValueError, match=why):
            voxgrid.Experiment(_plan(), ptrs, strategy=strategy, secure_aggregation=True)
    with pytest.raises(ValueError, match="at least 2 nodes"):
        voxgrid.Experiment(_plan(), ptrs[:1], secure_aggregation=True)
    with pytest.raises(ValueError, match="threshold=5"):
        voxgrid.Experiment(_plan(), ptrs, secure_aggregation=True, threshold=5)
