"""Dynamic task prioritisation (plan.local.dtp) against hand-computed values.

A task is one foreground class the site annotates; its loss weight is
W = -(1 - kbar)^gamma * log(kbar), kbar = alpha * Dice^r + (1 - alpha) * kbar (per batch).
"""

import math

import pytest
import torch
from monai.losses import DiceCELoss

import voxgrid
from voxgrid.nodes.worker.objective import DynamicTaskPriority, LocalObjective, dtp_weight, soft_dice
from voxgrid.nodes.worker.local_state import LocalState
from voxgrid.nodes.worker.training import DTP_KEY, PreparedData, Trainer, run_job
from voxgrid.plan import PlanError, TaskPriority, build_network
from cubes import cube_volume  # test support: tests/cubes.py

LABELS = ["background", "pancreas", "tumor"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16), amp=False)


def _plan(**dtp):
    return voxgrid.unet_plan(LABELS, **TINY).with_local(dtp=dtp)


def test_dtp_weight_hand_computed():
    assert dtp_weight(0.5, 2.0) == pytest.approx(0.25 * math.log(2))  # -(0.5)^2 * ln 0.5 = 0.1733
    assert dtp_weight(0.5, 0.0) == pytest.approx(math.log(2))  # gamma 0: plain -log(kbar)
    assert dtp_weight(0.9, 1.0) == pytest.approx(-0.1 * math.log(0.9))  # 0.01054: an easy task weighs little
    assert dtp_weight(1.0, 1.0) == 0.0
    assert dtp_weight(0.0, 1.0) == pytest.approx(-math.log(1e-6))  # clamped: finite, large


def test_moving_average_of_dice_to_the_power_r_hand_computed():
    dtp = DynamicTaskPriority(TaskPriority(gamma=1.0, alpha=0.5, r=2.0), [1, 2])
    assert dtp.weights() == {1: 1.0, 2: 1.0}  # nothing measured yet: the plain loss
    dtp.observe({1: 0.6, 2: None})  # first measurement starts the average: 0.6^2 = 0.36
    assert dtp.kbar == {1: pytest.approx(0.36)}
    dtp.observe({1: 0.8, 2: 0.5})  # 0.5 * 0.64 + 0.5 * 0.36 = 0.5; task 2 starts at 0.25
    assert dtp.kbar == {1: pytest.approx(0.5), 2: pytest.approx(0.25)}
    w = dtp.weights()
    assert w[1] == pytest.approx(-0.5 * math.log(0.5))  # 0.3466
    assert w[2] == pytest.approx(-0.75 * math.log(0.25))  # 1.0397: the weaker task gets more weight
    dtp.observe({1: None, 2: None})  # a batch without either class changes nothing
    assert dtp.weights() == w


def test_soft_dice_hand_computed():
    # 4 voxels, equal logits over 3 channels: p = 1/3 everywhere; class 1 on 2 voxels, class 2 absent
    logits = torch.zeros(1, 3, 1, 2, 2)
    target = torch.tensor([[[[1, 1], [0, 0]]]]).reshape(1, 1, 1, 2, 2).float()
    d = soft_dice(logits, target, [1, 2], softmax=True)
    # 2 * (2/3) / (4/3 + 2) = 0.4
    assert d[1] == pytest.approx(0.4, abs=1e-5) and d[2] is None
    # sigmoid: p = 0.5: 2 * 1 / (2 + 2) = 0.5
    assert soft_dice(logits, target, [1], softmax=False)[1] == pytest.approx(0.5, abs=1e-5)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g).float()
    return logits, target


def test_data_loss_is_the_dtp_weighted_sum_of_per_task_losses():
    plan = _plan(gamma=2.0, alpha=1.0, r=1.0)  # alpha 1: kbar is this batch's Dice
    net = build_network(plan)
    obj = LocalObjective(plan, {1, 2}, net)
    logits, target = _batch()
    loss = obj.data_loss(logits, target)
    ce = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = 0
    with torch.no_grad():
        p = torch.softmax(logits, 1)
    for c in (1, 2):
        g = (target[:, 0] == c).float()
        dice = float(2 * (p[:, c] * g).sum() / (p[:, c].sum() + g.sum()))
        w = -((1 - dice) ** 2) * math.log(dice)
        # task c: "c against everything else", the other channels merged by logsumexp
        others = [k for k in range(3) if k != c]
        two = torch.cat([torch.logsumexp(logits[:, others], 1, keepdim=True), logits[:, [c]]], 1)
        expected = expected + w * ce(two, (target == c).float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the weights are constants; the gradient reaches the logits
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_a_partially_labelled_site_has_one_task_per_annotated_class():
    plan = _plan(gamma=1.0, alpha=1.0, r=1.0)
    obj = LocalObjective(plan, {1}, build_network(plan))  # pancreas only: one task
    logits, target = _batch(1)
    target[target == 2] = 0  # what the site's label map says about tumour: background
    loss = obj.data_loss(logits, target)
    assert set(obj.dtp.kbar) == {1}
    w = dtp_weight(obj.dtp.kbar[1], 1.0)
    two = torch.cat([torch.logsumexp(logits[:, [0, 2]], 1, keepdim=True), logits[:, [1]]], 1)
    expected = w * DiceCELoss(to_onehot_y=True, softmax=True)(two, (target == 1).float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_dtp_the_plain_loss_and_plan_validation():
    plan = voxgrid.unet_plan(LABELS, **TINY)
    obj = LocalObjective(plan, {1, 2}, build_network(plan))
    logits, target = _batch()
    assert obj.dtp is None
    assert obj.data_loss(logits, target).item() == pytest.approx(
        DiceCELoss(to_onehot_y=True, softmax=True)(logits, target).item(), rel=1e-6)
    with_dtp = _plan(gamma=2.0, alpha=0.5, r=1.0)
    assert with_dtp.content_hash != plan.content_hash  # the data owner sees it in the plan
    assert voxgrid.Plan.from_json(with_dtp.to_json()).local.dtp == TaskPriority(gamma=2.0, alpha=0.5, r=1.0)
    for bad, field in (({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"r": 0.0}, "r"),
                       ({"gamma": -1.0}, "gamma"), ({"beta": 1.0}, "beta")):
        with pytest.raises(PlanError, match=f"plan.local.dtp.{field}"):
            plan.with_local(dtp=bad)


def test_dtp_is_refused_with_dp_sgd():
    # its weights come from earlier batches (other patients), which DP-SGD's per-patient bound excludes
    data = _plan(gamma=1.0, alpha=0.5, r=1.0).model_dump(mode="json")
    with pytest.raises(PlanError, match="plan.local.dtp: dynamic task priority"):
        voxgrid.Plan(**{**data, "privacy": {"mechanism": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0,
                                            "delta": 1e-5}})
    # update-level noise is fine: it sees only the finished update
    gauss = voxgrid.Plan(**{**data, "privacy": {"mechanism": "gaussian_update", "clip": 1.0,
                                                "noise_multiplier": 1.0, "delta": 1e-5}})
    assert LocalObjective(gauss, {1, 2}, build_network(gauss)).dtp is not None


def test_a_node_trains_with_dtp():
    plan = voxgrid.unet_plan(LABELS, **TINY, local_epochs=1, samples_per_volume=1).with_local(
        dtp={"gamma": 2.0, "alpha": 0.5, "r": 1.0})
    data = PreparedData({"train": [cube_volume(0), cube_volume(1)], "val": [cube_volume(2)], "test": []}, {1})
    m, delta = run_job(Trainer(torch.device("cpu")), plan, "train", data, voxgrid.plan.initial_weights(plan),
                       split="val", evaluate=True, seed=0)
    assert m.loss is not None and math.isfinite(m.loss) and m.steps == 1
    assert any(torch.count_nonzero(v) for v in delta.values())


def test_dtp_moving_averages_carry_over_to_the_sites_next_round(tmp_path):
    # alpha tiny: the average barely moves within a job, so what round 1 ends with is what it started from
    plan = voxgrid.unet_plan(LABELS, **TINY, local_epochs=1, samples_per_volume=1).with_local(
        dtp={"gamma": 2.0, "alpha": 1e-6, "r": 1.0})
    data = PreparedData({"train": [cube_volume(0), cube_volume(1)], "val": [], "test": []}, {1})
    state, trainer = LocalState(tmp_path), Trainer(torch.device("cpu"))
    weights = voxgrid.plan.initial_weights(plan)
    run_job(trainer, plan, "train", data, weights, split="val", evaluate=False, seed=0, local_state=state,
            job_key=("exp", "ct", 0))
    first = state.get("exp", "ct", 0, inclusive=True)[DTP_KEY]
    assert 0 < first[1] < 1 and math.isnan(first[2])  # measured for the annotated class only
    state.put("exp", "ct", 0, {DTP_KEY: torch.tensor([math.nan, 0.999, math.nan], dtype=torch.float64)})
    _, delta = run_job(trainer, plan, "train", data, weights, split="val", evaluate=False, seed=1,
                       local_state=state, job_key=("exp", "ct", 1))
    carried = state.get("exp", "ct", 1, inclusive=True)[DTP_KEY]
    assert carried[1] == pytest.approx(0.999, abs=1e-5)  # started from round 0's average, not afresh
    assert DTP_KEY not in delta and set(delta) == set(weights)  # the averages stay at the site
