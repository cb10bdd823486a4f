"""Strategies over real node processes: FedProx's mu reaches the nodes in the plan; FedAdam's moments
survive a checkpoint. One round each, no evaluation, to stay quick. Site a annotates pancreas only,
so its jobs also exercise the partial-label loss."""

import json

import pytest
import torch

import voxgrid

pytestmark = pytest.mark.slow


def _plan():
    return voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(32, 32, 32), channels=(8, 16, 32),
                             strides=(2, 2), local_epochs=1)


def _changed(before, after):
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_fedprox_and_fedadam_run_a_round_and_checkpoint(federation, tmp_path):
    ptrs = federation.connect().search("#ct", "#pancreas")
    assert len(ptrs) == 3

    prox = voxgrid.Experiment(_plan(), ptrs, strategy=voxgrid.FedProx(mu=0.01), rounds=1, evaluate=False,
                              name="prox")
    assert prox.plan.local.proximal_mu == 0.01 and prox.plan.content_hash != _plan().content_hash
    start = {k: v.clone() for k, v in prox.global_weights.items()}
    [r] = prox.run(progress=False)
    assert all(s.ok and s.loss is not None and s.loss > 0 for s in r.sites), r.sites
    assert _changed(start, prox.global_weights)

    adam = voxgrid.Experiment(_plan(), ptrs, strategy=voxgrid.FedAdam(lr=1e-2), rounds=1, evaluate=False,
                              checkpoint_dir=tmp_path / "ckpt", name="adam")
    start = {k: v.clone() for k, v in adam.global_weights.items()}
    [r] = adam.run(progress=False)
    assert all(s.ok for s in r.sites), r.sites
    assert _changed(start, adam.global_weights)
    saved = json.loads((tmp_path / "ckpt" / "experiment.json").read_text())
    assert saved["strategy"]["name"] == "fedadam" and saved["strategy_state"]["tensors"] == "strategy-0001.safetensors"
    back = voxgrid.Experiment.resume(tmp_path / "ckpt", ptrs)
    m = back.strategy.state_dict().tensors
    assert set(m) == set(adam.strategy.state_dict().tensors)
    assert all(torch.equal(m[k], t) for k, t in adam.strategy.state_dict().tensors.items())
