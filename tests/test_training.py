"""Node-side training pieces: FedProx's proximal term and the loss under partial labels (CPU, tiny)."""

import pytest
import torch

import voxgrid
from voxgrid.nodes.worker.objective import LocalObjective, proximal_term, restrict_to_annotated
from voxgrid.nodes.worker.training import Trainer
from voxgrid.plan import build_loss, build_network
from cubes import cube_volume  # test support: tests/cubes.py

LABELS = ["background", "pancreas", "tumor"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16), amp=False)


def _plan(**kw):
    return voxgrid.unet_plan(LABELS, **{**TINY, **kw})


# --- FedProx ---------------------------------------------------------------------------------------
def test_proximal_term_is_zero_at_the_global_weights_and_grows_as_mu_half_squared_distance():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)  # 3 parameters: 2 weights + 1 bias
    obj = LocalObjective(_plan(local={"proximal_mu": 2.0}), {1, 2}, net)
    assert obj.proximal().item() == 0.0  # at the global weights
    # one SGD step (lr 0.1) on sum(params): every gradient is 1, every parameter moves by -0.1
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sum(p.sum() for p in net.parameters()).backward()
    opt.step()
    # mu/2 * ||w - w_g||^2 = 2/2 * 3 * 0.1^2 = 0.03
    assert obj.proximal().item() == pytest.approx(0.03, rel=1e-5)
    assert proximal_term(net.parameters(), obj.anchor, 2.0).item() == pytest.approx(0.03, rel=1e-5)
    # its gradient pulls back to the anchor: d/dw = mu * (w - w_g) = 2 * -0.1 = -0.2
    net.zero_grad()
    obj.proximal().backward()
    assert torch.allclose(net.bias.grad, torch.tensor([-0.2]))
    assert LocalObjective(_plan(), {1, 2}, net).proximal() is None  # mu = 0: no term



def _distance(net, start):
    return sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in net.named_parameters())


def test_trainer_with_proximal_term_stays_closer_to_the_global_weights():
    data = [cube_volume(0), cube_volume(1)]
    dist = {}
    for mu in (0.0, 50.0):
        plan = _plan(local={"proximal_mu": mu}, local_epochs=2, samples_per_volume=1, lr=1e-2)
        torch.manual_seed(0)
        net = build_network(plan)
        start = {k: p.detach().clone() for k, p in net.named_parameters()}
        loss, steps = Trainer(torch.device("cpu")).train(plan, net, data, seed=0, present={1})
        assert steps == 2 and 0 < loss < 10
        dist[mu] = _distance(net, start)
    assert 0 < dist[50.0] < dist[0.0]


# --- partial labels --------------------------------------------------------------------------------
def _logits_and_target():
    """Target: pancreas (1) in a cube, background elsewhere; no tumor (2) is annotated.

    ``good`` is confident and right everywhere; ``tumorish`` is ``good`` with the background and
    tumor logits swapped on background voxels of a second cube: it calls them tumor.
    """
    target = torch.zeros(1, 1, 16, 16, 16)
    target[..., 4:8, 4:8, 4:8] = 1
    onehot = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    good = 5.0 * onehot
    tumorish = good.clone()
    region = (slice(None), slice(None), slice(10, 14), slice(10, 14), slice(10, 14))
    tumorish[region] = good[region][:, [2, 1, 0]]  # swap channels 0 and 2 there
    return good, tumorish, target


@pytest.mark.parametrize("loss", [
    {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
    {"_target_": "DiceFocalLoss", "to_onehot_y": True, "softmax": True, "weight": [1.0, 2.0, 3.0]},
])
def test_unannotated_class_is_not_penalised_at_a_site_without_it_but_is_where_annotated(loss):
    good, tumorish, target = _logits_and_target()
    plan = _plan(loss=loss)
    net = torch.nn.Linear(1, 1)
    site_a = LocalObjective(plan, {1}, net)     # annotates pancreas only
    site_b = LocalObjective(plan, {1, 2}, net)  # annotates pancreas and tumor
    # site A: background and tumor are merged (marginal loss), so calling background "tumor" costs nothing
    assert site_a.data_loss(tumorish, target).item() == pytest.approx(site_a.data_loss(good, target).item(), abs=1e-6)
    # site B: its label map says those voxels are background, not tumor: penalised
    assert site_b.data_loss(tumorish, target).item() > site_b.data_loss(good, target).item() + 0.05
    # gradients on the tumor logits where the model calls background voxels tumor: site B pushes them
    # down (a descent step subtracts a positive gradient); site A never does (background or tumor are
    # one merged outcome there, so it only reinforces the merged probability)
    grads = {}
    for name, site in (("a", site_a), ("b", site_b)):
        x = tumorish.clone().requires_grad_(True)
        site.data_loss(x, target).backward()
        grads[name] = x.grad[:, 2, 10:14, 10:14, 10:14]
    assert (grads["a"] <= 0).all() and (grads["b"] > 0).all()


def test_sigmoid_losses_drop_the_unannotated_channel():
    good, _, target = _logits_and_target()
    plan = _plan(loss={"_target_": "DiceLoss", "to_onehot_y": True, "sigmoid": True})
    site_a = LocalObjective(plan, {1}, torch.nn.Linear(1, 1))
    assert not site_a.merge
    anything = good.clone()
    anything[:, 2] = torch.randn(16, 16, 16)  # the tumor channel is simply not seen at site A
    assert site_a.data_loss(anything, target).item() == pytest.approx(site_a.data_loss(good, target).item())


def test_restrict_to_annotated_shapes_and_reindexing():
    logits = torch.randn(2, 4, 16, 16, 16)
    target = torch.zeros(2, 1, 16, 16, 16)
    target[:, :, :4] = 3  # the site annotates classes 1 and 3; 2 is missing
    out, t = restrict_to_annotated(logits, target, [3, 1], merge=True)
    assert out.shape == (2, 3, 16, 16, 16) and t.dtype == target.dtype
    assert set(t.unique().tolist()) == {0.0, 2.0}  # class 3 is the kept set's 2nd foreground channel
    assert torch.allclose(out[:, 0], torch.logsumexp(logits[:, [0, 2]], dim=1))
    assert torch.equal(out[:, 1:], logits[:, [1, 3]])
    same, same_t = restrict_to_annotated(logits, target, [1, 2, 3], merge=True)
    assert same is logits and same_t is target  # a fully annotated site: untouched
    with pytest.raises(ValueError, match="annotates none"):
        LocalObjective(_plan(), set(), torch.nn.Linear(1, 1))


def test_per_class_loss_weights_follow_the_kept_classes():
    plan = _plan(loss={"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "weight": [1.0, 2.0, 3.0]})
    assert torch.equal(build_loss(plan, classes=[0, 2]).dice.class_weight, torch.tensor([1.0, 3.0]))
    short = _plan(loss={"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "weight": [1.0, 2.0]})
    with pytest.raises(voxgrid.PlanError, match=r"plan.loss.weight: 2 entries, but the plan names 3 classes"):
        build_loss(short, classes=[0, 2])
