"""Paths that only a GPU would exercise, checked on the CPU (issue 17, items 1, 2 and 5).

* DP-SGD's noise generator must be on the gradients' device (Opacus refuses a CPU generator for CUDA
  tensors);
* the loss modules' buffers (cross-entropy's class weights) must follow the network to its device
  (checked with the ``meta`` device standing in for CUDA);
* evaluation scores label maps, not full-volume one-hot tensors, with the same numbers.
"""

import math

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from opacus.optimizers.optimizer import _generate_noise

import voxgrid
import voxgrid.nodes.worker.training as training
from voxgrid.nodes.worker.objective import LocalObjective
from voxgrid.nodes.worker.training import Trainer
from voxgrid.plan import build_network

TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16), amp=False)
WEIGHTED = {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "weight": [0.5, 2.0, 3.0]}


# --- 1. DP-SGD's noise generator ---------------------------------------------------------------------
def test_dp_noise_generator_is_made_on_the_device_asked_and_seeded_from_os_entropy(monkeypatch):
    gen = training.dp_noise_generator(torch.device("cpu"))
    assert gen.device == torch.device("cpu")
    # Opacus draws the noise on the reference's device with this generator: both noise modes work.
    ref = torch.zeros(3, 4)
    assert _generate_noise(1.0, ref, generator=gen).shape == ref.shape
    assert _generate_noise(1.0, ref, generator=gen, secure_mode=True).shape == ref.shape

    made = []

    class FakeGenerator:  # no CUDA here: record what the helper asks torch for
        def __init__(self, device="cpu"):
            self.device = torch.device(device)
            self.seed = None
            made.append(self)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    a = training.dp_noise_generator(torch.device("cuda", 1))
    b = training.dp_noise_generator("cuda:1")
    assert made == [a, b]
    assert a.device == b.device == torch.device("cuda", 1)
    assert 0 <= a.seed < 2**63 and 0 <= b.seed < 2**63 and a.seed != b.seed  # OS entropy, not a fixed seed


def test_dp_sgd_hands_opacus_a_generator_on_the_parameters_device(monkeypatch):
    from opacus import optimizers

    asked, generators = [], []
    real_helper, real_optimizer = training.dp_noise_generator, optimizers.DPOptimizer

    def helper(device):
        asked.append(torch.device(device))
        return real_helper(device)

    class Spy(real_optimizer):
        def __init__(self, *args, **kwargs):
            generators.append(kwargs.get("generator"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(training, "dp_noise_generator", helper)
    monkeypatch.setattr(optimizers, "DPOptimizer", Spy)
    dp = {"mechanism": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "sample_rate": 1.0}
    plan = voxgrid.unet_plan(["background", "pancreas"], **{**TINY, "privacy": dp, "local_epochs": 1,
                                                            "steps_per_epoch": 1})
    torch.manual_seed(0)
    net = build_network(plan)
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    image = 0.1 * torch.randn(1, 16, 16, 16)
    label = torch.zeros(1, 16, 16, 16)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label[:, 4:10, 4:10, 4:10] = 1.0
    data = [{"image": MetaTensor(image), "label": MetaTensor(label), "patient": p} for p in "AB"]
    loss, steps = Trainer(torch.device("cpu")).train(plan, net, data, seed=0, present={1})
    assert (loss, steps) == (None, 1)  # one real DP-SGD step, noise drawn with that generator
    assert asked == [torch.device("cpu")]
    assert len(generators) == 1 and generators[0].device == next(net.parameters()).device
    assert any(not torch.equal(start[k], p.detach()) for k, p in net.named_parameters())


def test_dp_sgd_refuses_parameters_on_several_devices():
    params = [torch.zeros(1), torch.zeros(1, device="meta")]
    with pytest.raises(ValueError, match="several devices"):
        training._params_device(params, torch.device("cpu"))
    assert training._params_device([], torch.device("cpu")) == torch.device("cpu")


# --- 2. the loss modules follow the network's device ---------------------------------------------------
def _buffers_on(objective: LocalObjective) -> list[torch.device]:
    losses = [objective.loss_fn, *objective.task_losses.values()]
    return [b.device for f in losses for b in f.buffers()]


@pytest.mark.parametrize("present", [{1, 2}, {2}])  # all classes annotated; a partial site (restricted weights)
def test_weighted_loss_buffers_follow_the_network_to_its_device(present):
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], **{**TINY, "loss": WEIGHTED})
    net = build_network(plan).to("meta")
    objective = LocalObjective(plan, present, net)
    devices = _buffers_on(objective)
    assert devices and all(d.type == "meta" for d in devices)
    # the weighted cross-entropy runs on the network's device (a CPU weight against meta logits raises;
    # MONAI's Dice term calls .item(), which meta tensors cannot, so it is checked by its buffers only)
    ce = objective.loss_fn.cross_entropy
    n = ce.weight.numel()
    assert n == 1 + len(present)
    logits = torch.zeros(1, n, 4, 4, 4, device="meta")
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long, device="meta")
    assert ce(logits, target).device.type == "meta"


def test_dtp_task_losses_follow_the_network_to_its_device():
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], **{**TINY, "loss": WEIGHTED}).with_local(
        dtp={"alpha": 0.5, "gamma": 1.0})
    objective = LocalObjective(plan, {1, 2}, build_network(plan).to("meta"))
    assert len(objective.task_losses) == 2
    devices = _buffers_on(objective)
    assert devices and all(d.type == "meta" for d in devices)


def test_the_loss_stays_on_the_cpu_for_a_cpu_network():
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], **{**TINY, "loss": WEIGHTED})
    objective = LocalObjective(plan, {1, 2}, build_network(plan))
    assert all(d.type == "cpu" for d in _buffers_on(objective))


# --- 5. evaluation on label maps ------------------------------------------------------------------------
LABELS5 = ["background", "liver", "spleen", "kidney", "absent"]


class Nearest(torch.nn.Module):
    """Pointwise 'network': logits favour the class nearest to the voxel's value (sliding-window safe)."""

    def __init__(self, n_cls: int):
        super().__init__()
        self.register_buffer("centres", torch.arange(n_cls, dtype=torch.float32).view(1, n_cls, 1, 1, 1))

    def forward(self, x):
        return -(x - self.centres) ** 2


def _volumes(n_cls: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate([(20, 18, 16), (16, 20, 17), (18, 16, 16)]):
        label = torch.randint(0, n_cls - 1, shape, generator=g)  # the last class is never in the truth
        if i == 1:
            label[label == 3] = 0  # class 3 absent from this volume's truth (still predicted below)
        if i == 2:
            label[label == 2] = 1  # class 2 absent from the truth here...
        wrong = torch.rand(shape, generator=g) < 0.3
        noisy = torch.where(wrong, torch.randint(0, n_cls, shape, generator=g), label).float()
        if i == 2:
            noisy[noisy == 2] = 0  # ...and from the prediction: with ignore_empty False it scores 1
        image = noisy + 0.2 * (torch.rand(shape, generator=g) - 0.5)
        out.append({"image": MetaTensor(image[None]), "label": MetaTensor(label.float()[None])})
    return out


def _one_hot_reference(plan, net, data, present, ignore_empty):
    """The evaluation as it was: full-volume one-hot int64 prediction and label."""
    n_cls = len(plan.labels)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=ignore_empty)
    for item in data:
        logits = sliding_window_inference(item["image"].as_tensor()[None], roi_size=plan.patch_size,
                                          sw_batch_size=plan.sw_batch_size, predictor=net,
                                          overlap=plan.sw_overlap, padding_mode="constant")
        pred = torch.nn.functional.one_hot(logits.float().argmax(1), n_cls).permute(0, 4, 1, 2, 3)
        gt = torch.nn.functional.one_hot(item["label"].as_tensor()[0].long(), n_cls)
        metric(y_pred=pred, y=gt.permute(3, 0, 1, 2)[None])
    raw = metric.aggregate()
    scores = raw.tolist()
    out = {}
    for c in range(1, n_cls):
        s = scores[c - 1]
        out[plan.labels[c]] = None if (c not in present or math.isnan(s)) else round(float(s), 6)
    return out, raw


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_index_dice_equals_the_one_hot_reference_without_one_hot_volumes(monkeypatch, ignore_empty):
    plan = voxgrid.unet_plan(LABELS5, **{**TINY, "patch_size": (8, 8, 8)})
    net = Nearest(len(LABELS5))
    data = _volumes(len(LABELS5))
    present = {1, 2, 3, 4}
    expected, raw = _one_hot_reference(plan, net, data, present, ignore_empty)
    # never in the truth: all-NaN (ignore_empty) or all-0 per volume; MONAI's mean_batch gives 0 either way
    assert expected["absent"] == 0.0 and None not in expected.values()

    seen = []

    class Spy(DiceMetric):
        def __call__(self, y_pred, y, **kw):
            seen.append((tuple(y_pred.shape), y_pred.dtype, tuple(y.shape), y.dtype))
            return super().__call__(y_pred, y, **kw)

    def no_one_hot(*a, **k):
        raise AssertionError("evaluation must not one-hot encode full volumes")

    monkeypatch.setattr(training, "DiceMetric", Spy)
    monkeypatch.setattr(torch.nn.functional, "one_hot", no_one_hot)
    got = Trainer(torch.device("cpu")).evaluate(plan, net, data, present, ignore_empty=ignore_empty)
    assert got == expected
    # label maps (B, 1, X, Y, Z) of one byte per voxel reach the metric
    assert [s[0][1] for s in seen] == [1, 1, 1] and all(s[2][1] == 1 for s in seen)
    assert all(s[1] == torch.uint8 and s[3] == torch.uint8 for s in seen)
    # the raw per-class means agree exactly, not only after rounding
    monkeypatch.undo()
    index = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=ignore_empty,
                       num_classes=len(LABELS5))
    for item in data:
        logits = sliding_window_inference(item["image"].as_tensor()[None], roi_size=plan.patch_size,
                                          sw_batch_size=plan.sw_batch_size, predictor=net,
                                          overlap=plan.sw_overlap, padding_mode="constant")
        index(y_pred=logits.argmax(1, keepdim=True).to(torch.uint8),
              y=item["label"].as_tensor().to(torch.uint8)[None])
    assert torch.equal(index.aggregate(), raw)


def test_uint8_labels_a_classes_subset_and_a_node_sw_batch_cap_give_the_same_scores():
    plan = voxgrid.unet_plan(LABELS5, **{**TINY, "patch_size": (8, 8, 8), "sw_batch_size": 4})
    net = Nearest(len(LABELS5))
    data = _volumes(len(LABELS5), seed=1)
    expected, _ = _one_hot_reference(plan, net, data, {1, 3}, ignore_empty=True)
    assert expected["spleen"] is None and expected["liver"] is not None  # not annotated here: None
    as_uint8 = [{"image": d["image"], "label": MetaTensor(d["label"].as_tensor().to(torch.uint8))} for d in data]
    assert Trainer(torch.device("cpu")).evaluate(plan, net, as_uint8, {1, 3}) == expected
    assert Trainer(torch.device("cpu"), max_sw_batch_size=1).evaluate(plan, net, data, {1, 3}) == expected
    with pytest.raises(ValueError, match="max_sw_batch_size"):
        Trainer(torch.device("cpu"), max_sw_batch_size=0)
