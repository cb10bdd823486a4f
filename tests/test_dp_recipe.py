"""DP that learns (issue 14): privacy targets instead of noise, augmentation multiplicity, group norm,
fine-tuning part of the network, pretraining on the scientist's own volumes, noised metrics said so."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss

import voxgrid
from voxgrid import tensors
from voxgrid.datasets import make_phantom
from voxgrid.datasets.phantoms import SiteSpec
from voxgrid.evaluation import CrossSiteTable
from voxgrid.nodes.service.node import Invalid
from voxgrid.nodes.worker.dp import VmappedGradients, clip_factor, clipped_grad_sum, patient_gradient
from voxgrid.nodes.worker.objective import freeze_except
from voxgrid.nodes.worker.training import Trainer, refuse_for_dp_sgd
from voxgrid.plan import PlanError, build_network, initial_weights
from voxgrid.privacy import PrivacySpec, PrivacySpecError, TrainingContext
from voxgrid.privacy.accountant import GaussianEvent, epsilon
from voxgrid.privacy.calibration import RTOL, noise_for_target
from voxgrid.selection import SelectedModel
from voxgrid.wire import EstimateRequest

from test_privacy_node import ALICE, finish, node, request  # noqa: F401  (the node fixture)

LABELS = ["background", "pancreas"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=1, patch_size=(16, 16, 16), amp=False)
TARGET = {"mechanism": "dp_sgd", "target_epsilon": 4.0, "rounds": 3, "max_grad_norm": 1.0, "delta": 1e-5}


def _volume(seed: int, patient: str, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.randn(1, size, size, size, generator=g)
    label = torch.zeros(1, size, size, size)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label[:, 4:10, 4:10, 4:10] = 1.0
    return {"image": MetaTensor(image), "label": MetaTensor(label), "patient": patient}


# --- the privacy target -----------------------------------------------------------------------------
# Rates whose RDP has a closed form or converges fast (q = 0.5 evaluates a slow series: seconds per target).
@pytest.mark.parametrize("target,q,steps", [(8.0, 1.0, 10), (1.0, 0.02, 400), (4.0, 1.0, 3)])
def test_derived_noise_meets_the_target_and_no_less_noise_would(target, q, steps):
    z = noise_for_target(target, 1e-5, q, steps)
    assert epsilon([GaussianEvent(z, q, steps)], 1e-5) <= target
    assert epsilon([GaussianEvent(z * (1 - RTOL), q, steps)], 1e-5) > target


def test_a_target_covers_all_planned_rounds_and_the_receipt_states_the_derived_noise():
    spec = PrivacySpec.parse(TARGET)
    ctx = TrainingContext(patients=10, batch_size=10, local_epochs=2)  # q = 1, 2 steps a job
    z = spec.dp_sgd.sigma(ctx)
    assert z == noise_for_target(4.0, 1e-5, 1.0, 2 * 3)
    assert spec.events(ctx) == [GaussianEvent(z, 1.0, 2)]
    assert epsilon(spec.events(ctx) * 3, 1e-5) <= 4.0 < epsilon(spec.events(ctx) * 4, 1e-5)
    assert spec.parameters(ctx)[0]["noise_multiplier"] == z
    assert spec.noise_multiplier(ctx) == z
    with pytest.raises(ValueError, match="TrainingContext"):
        spec.noise_multiplier()


def test_a_scientist_gets_a_bounded_number_of_new_targets_an_hour_and_repeats_are_free(node):  # noqa: F811
    from voxgrid.nodes.service.limits import HourlyQuota
    from voxgrid.nodes.service.node import Caller, TooManyTargets

    node.limits = node.limits.model_copy(update={"max_new_dp_targets_per_hour": 2})
    node._targets = HourlyQuota(2)
    plan = request(node, TARGET).plan

    def estimate(who, target):
        return node.privacy_estimate(who, EstimateRequest(dataset="ct", privacy={**TARGET, "target_epsilon": target},
                                                          releases=1, plan=plan))

    estimate(ALICE, 4.321)
    estimate(ALICE, 5.321)
    for _ in range(3):
        estimate(ALICE, 4.321)  # derived already: costs the node nothing, counts nothing
    with pytest.raises(TooManyTargets, match="2 new DP-SGD privacy targets") as e:
        estimate(ALICE, 6.321)
    assert e.value.status == 429
    with pytest.raises(TooManyTargets):  # a job with a new target is refused the same way, before anything runs
        node.submit(ALICE, request(node, {**TARGET, "target_epsilon": 6.321}, round=1))
    assert estimate(Caller("bob", "scientist"), 6.321).epsilon_total <= 6.321 + 1e-9  # another scientist's own quota
    estimate(ALICE, 6.321)  # now derived (for bob): free for alice too
    quota = HourlyQuota(1)
    assert quota.take("a", now=0.0) and not quota.take("a", now=3599.0) and quota.take("a", now=3600.5)


@pytest.mark.parametrize("change,field", [
    ({"noise_multiplier": 1.0}, "exactly one of noise_multiplier or target_epsilon"),
    ({"rounds": None}, "target_epsilon needs rounds"),
    ({"target_epsilon": 0}, r"plan\.privacy\.target_epsilon"),
    ({"target_epsilon": 1e6}, r"plan\.privacy\.target_epsilon"),
    ({"delta": 1.0}, r"plan\.privacy\.delta"),
    ({"rounds": 0}, r"plan\.privacy\.rounds"),
    ({"augmentation_multiplicity": 0}, r"plan\.privacy\.augmentation_multiplicity"),
    ({"augmentation_multiplicity": 33}, r"plan\.privacy\.augmentation_multiplicity"),
])
def test_bad_target_fields_are_refused_naming_the_field(change, field):
    spec = {k: v for k, v in {**TARGET, **change}.items() if v is not None}
    with pytest.raises(PrivacySpecError, match=field):
        PrivacySpec.parse(spec)


def test_the_node_derives_the_noise_itself_and_refuses_an_unreachable_target(node):  # noqa: F811
    req = request(node, TARGET)
    job = node.submit(ALICE, req)
    entry = node.ledger.entry(job.job_id)
    p = entry.parameters[0]  # the fixture's dataset: 2 train patients, batch 2 -> q = 1, 1 step a job
    assert (p["sample_rate"], p["steps"]) == (1.0, 1)
    assert p["noise_multiplier"] == noise_for_target(4.0, 1e-5, 1.0, 3)
    assert entry.epsilon == pytest.approx(epsilon([GaussianEvent(p["noise_multiplier"], 1.0, 1)], 1e-5))
    assert epsilon([GaussianEvent(p["noise_multiplier"], 1.0, 3)], 1e-5) <= 4.0
    finish(node, job.job_id)
    est = node.privacy_estimate(ALICE, EstimateRequest(dataset="ct", privacy=TARGET, releases=3, plan=req.plan))
    assert est.epsilon_total <= 4.0 + 1e-9
    with pytest.raises(Invalid, match="no noise multiplier") as e:  # 10,000 rounds at epsilon 0.01
        node.submit(ALICE, request(node, {**TARGET, "target_epsilon": 1e-4, "rounds": 10_000}, round=1))
    assert e.value.status == 422


# --- augmentation multiplicity ---------------------------------------------------------------------
def test_a_patients_gradient_is_the_mean_of_its_views_gradients_before_clipping():
    plan = voxgrid.unet_plan(LABELS, **TINY, norm="group")
    torch.manual_seed(0)
    net = build_network(plan)
    params = list(net.parameters())
    loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)  # batch-reducing Dice: slices must not mix
    x = torch.rand(3, 1, 16, 16, 16)
    y = (torch.rand(3, 1, 16, 16, 16) > 0.7).float()
    got = patient_gradient(net, loss, params, x, y)
    views = [torch.autograd.grad(loss(net(x[k:k + 1]), y[k:k + 1]), params) for k in range(3)]
    for i, g in enumerate(got):
        torch.testing.assert_close(g, sum(v[i] for v in views) / 3, rtol=1e-4, atol=1e-6)


def test_the_clipped_sum_bounds_each_patient_and_zeroes_a_non_finite_one():
    plan = voxgrid.unet_plan(LABELS, **TINY, norm="group")
    torch.manual_seed(0)
    net = build_network(plan)
    params = list(net.parameters())
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    patients = [(torch.rand(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.5).float()) for _ in range(3)]
    clip = 1e-3
    total, zeroed = clipped_grad_sum(net, loss, params, patients, lambda v: v, clip)
    want = [torch.zeros_like(p) for p in params]
    for x, y in patients:
        g = patient_gradient(net, loss, params, x, y)
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
        assert norm > clip  # so clipping acts
        for w, t in zip(want, g, strict=True):
            w += t * (clip / (norm + 1e-6))
    for a, b in zip(total, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert zeroed == 0 and clip_factor([torch.tensor([float("nan")])], clip) == 0.0
    assert clip_factor([torch.tensor([3.0, 4.0])], 10.0) == 1.0


def test_dp_sgd_with_a_target_and_k_views_trains_only_the_head_when_asked():
    plan = voxgrid.unet_plan(LABELS, **TINY, norm="group", batch_size=2, lr=1e-2,
                             privacy={**TARGET, "augmentation_multiplicity": 3, "sample_rate": 1.0})
    head = "model.2"
    plan = plan.with_local(train_only=[head])
    torch.manual_seed(0)
    net = build_network(plan)
    refuse_for_dp_sgd(plan, net)  # group norm: no running statistics, per sample
    start = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = freeze_except(net, plan.local.train_only)
    loss, steps = Trainer(torch.device("cpu")).train(plan, net, [_volume(i, f"p{i}", 20) for i in range(3)],
                                                     seed=0, present={1})
    for p in frozen:
        p.requires_grad_(True)
    assert loss is None and steps == 1  # q = 1: one step a local epoch
    moved = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith(head + ".") for k in moved)  # frozen parameters leave unchanged


# --- the plan: group norm -----------------------------------------------------------------------------
def test_unet_plan_offers_group_norm_and_checks_the_groups():
    plan = voxgrid.unet_plan(LABELS, **TINY, norm="group", norm_groups=2)
    norms = [m for m in build_network(plan).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 2 for m in norms)
    assert "norm" not in voxgrid.unet_plan(LABELS, **TINY).network  # the default keeps its hash
    with pytest.raises(PlanError, match="norm_groups=3"):
        voxgrid.unet_plan(LABELS, **TINY, norm="group", norm_groups=3)


# --- pretraining, and an experiment that starts from it ---------------------------------------------
def test_pretraining_learns_and_an_experiment_starts_from_its_weights():
    plan = voxgrid.unet_plan(LABELS, **TINY, norm="group", batch_size=4, samples_per_volume=2, lr=1e-2)
    site = SiteSpec(name="public", n_volumes=4, labels={1: "pancreas"}, shape=(16, 16, 16))
    volumes = [make_phantom(site, i) for i in range(4)]
    lines = []
    w = voxgrid.pretrain(plan, volumes, epochs=6, seed=1, echo=lines.append)
    losses = [float(line.split("mean loss ")[1].split()[0]) for line in lines]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert w.keys() == initial_weights(plan).keys()
    assert voxgrid.pretrain(plan, volumes, epochs=6, seed=1).keys() == w.keys()
    again = voxgrid.pretrain(plan, volumes, epochs=1, seed=1, initial=w)  # continues from given weights
    assert any(not torch.equal(again[k], w[k]) for k in w)
    with pytest.raises(ValueError, match="no label map"):
        voxgrid.pretrain(plan, [type(volumes[0])(volumes[0].image, volumes[0].affine)], epochs=1)


def test_a_target_must_cover_the_experiments_rounds_and_brought_weights_are_sent():
    from voxgrid.pointers import DatasetPointer

    pointer = DatasetPointer.__new__(DatasetPointer)  # the check runs before any node is asked
    plan = voxgrid.unet_plan(LABELS, **TINY, privacy=TARGET)
    with pytest.raises(ValueError, match=r"plan\.privacy\.rounds"):
        voxgrid.Experiment(plan, [pointer], rounds=5, initial=initial_weights(plan))
    # the weights the scientist brings are the ones every node is sent (PUT /v1/weights, safetensors)
    brought = initial_weights(plan, seed=7)
    exp = voxgrid.Experiment(plan, [pointer], rounds=3, initial=brought)
    sent = tensors.loads(exp._global_blob()[0])
    assert sent.keys() == brought.keys() and all(torch.equal(sent[k], brought[k]) for k in brought)
    assert any(not torch.equal(brought[k], v) for k, v in initial_weights(plan, seed=0).items())


# --- several patients at once under torch.func.vmap: the same clipped sum ---------------------------
LOSS_SPECS = {
    "DiceLoss": {"to_onehot_y": True, "softmax": True, "batch": True},
    "DiceCELoss": {"to_onehot_y": True, "softmax": True, "weight": [0.2, 1.0, 3.0], "lambda_ce": 0.7},
    "DiceFocalLoss": {"to_onehot_y": True, "softmax": True, "gamma": 2.0},
    "GeneralizedDiceLoss": {"to_onehot_y": True, "softmax": True},
    "TverskyLoss": {"to_onehot_y": True, "softmax": True, "alpha": 0.3, "beta": 0.7},
    "FocalLoss": {"to_onehot_y": True, "use_softmax": True},
}


@pytest.mark.parametrize("name", sorted(LOSS_SPECS))
def test_vmapped_patients_give_the_loops_clipped_sum_for_every_allowlisted_loss(name):
    from voxgrid.nodes.worker.objective import LocalObjective

    labels = ["background", "pancreas", "tumor"]
    plan = voxgrid.unet_plan(labels, **TINY, norm="group", norm_groups=1,
                             loss={"_target_": name, **LOSS_SPECS[name]}).with_local(train_only=["model.2"])
    torch.manual_seed(0)
    net = build_network(plan)
    freeze_except(net, plan.local.train_only)  # part of the network frozen: only the rest is vmapped
    params = [q for q in net.parameters() if q.requires_grad]
    objective = LocalObjective(plan, {1}, net)  # partial labels: tumour merged into the background
    vloss = objective.vmap_loss()
    if name == "GeneralizedDiceLoss":  # indexes with a boolean mask, which vmap cannot batch: one pass a patient
        assert vloss is None
        return
    gen = torch.Generator().manual_seed(1)
    patients = [(torch.rand(2, 1, 16, 16, 16, generator=gen), torch.randint(0, 2, (2, 1, 16, 16, 16), generator=gen,
                                                                             dtype=torch.uint8)) for _ in range(5)]
    patients[3] = (torch.full_like(patients[3][0], float("nan")), patients[3][1])  # a non-finite patient
    for clip in (1e-3, 1e3):  # every patient clipped, none clipped
        want, bad = clipped_grad_sum(net, objective.data_loss, params, patients, lambda v: v, clip)
        batched = VmappedGradients(net, vloss, params)
        got, bad_v = clipped_grad_sum(net, objective.data_loss, params, patients, lambda v: v, clip,
                                      batched=batched, chunk=2)
        assert batched.usable
        assert bad == bad_v == 1
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-7)
        assert all(bool(torch.isfinite(a).all()) for a in got)


class _OutOfMemoryUnderVmap(torch.nn.Module):
    """A fault not caused for real here: the GPU running out of memory for several patients at once."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # under vmap: several patients
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.conv(x)


def _attention_unet():
    from monai.networks.nets import AttentionUnet

    return AttentionUnet(3, 1, 2, (4, 8), (2,))  # adds in place into a captured tensor: vmap refuses it


@pytest.mark.parametrize("make,edge,said", [(_attention_unet, 16, "cannot be vmapped"),
                                            (_OutOfMemoryUnderVmap, 8, "out of memory for several patients")])
def test_what_vmap_cannot_do_falls_back_to_one_pass_per_patient_with_the_same_sum(make, edge, said, caplog):
    torch.manual_seed(0)
    net = make()
    params, loss = list(net.parameters()), DiceCELoss(softmax=True)
    shape = (1, 1, edge, edge, edge)
    patients = [(torch.rand(shape), torch.randint(0, 2, (1, 2, edge, edge, edge)).float()) for _ in range(3)]
    want, _ = clipped_grad_sum(net, loss, params, patients, lambda v: v, 1e-3)
    batched = VmappedGradients(net, loss, params)
    got, _ = clipped_grad_sum(net, loss, params, patients, lambda v: v, 1e-3, batched=batched, chunk=2)
    assert not batched.usable and said in caplog.text
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_dtp_and_losses_without_one_hot_keep_one_pass_per_patient():
    from voxgrid.nodes.worker.dp import patient_chunk
    from voxgrid.nodes.worker.objective import LocalObjective

    plan = voxgrid.unet_plan(LABELS, **TINY, norm="group", loss={"_target_": "DiceLoss", "softmax": True})
    assert LocalObjective(plan, {1}, build_network(plan)).vmap_loss() is None
    assert patient_chunk(1, 1_000) == 8 and patient_chunk(4, 1_000) == 2 and patient_chunk(16, 1_000) == 1
    assert patient_chunk(1, 64 * 2**20) == 1  # 256 MiB of per-patient gradients at most


# --- noised metrics are said so ----------------------------------------------------------------------
def test_the_cross_site_table_says_which_dice_is_noised():
    plan = voxgrid.unet_plan(LABELS, **TINY)
    m = SelectedModel("FL global best", {}, plan, "e", 0, 0.5, noise_sd=0.04)
    table = CrossSiteTable("test", ["a", "b"], {"a": ["pancreas"], "b": ["pancreas"]}, [m],
                           {m.name: {"a": {"pancreas": 0.5}, "b": {"pancreas": 0.7}}}, {}, noise_sd={"b": 0.031})
    text = str(table)
    assert "Dice at b is noised" in text and "0.031" in text and "Dice at a is noised" not in text
    assert "selected by validation Dice noised" in text
    assert np.isclose(table.average(m.name)["mean"], 0.6)
    plain = CrossSiteTable("test", ["a"], {"a": ["pancreas"]}, [SelectedModel("x", {}, plan, "e", 0)],
                           {"x": {"a": {"pancreas": 0.5}}}, {})
    assert "noised" not in str(plain)


def _noised_status(kind, dice, sd=None):
    """A finished job as a node reports it; with ``sd`` its receipt says the Dice left noised with that std."""
    from voxgrid.privacy.metrics import MetricsRelease
    from voxgrid.privacy.records import Receipt
    from voxgrid.wire import JobStatus, Metrics

    receipt = None
    if sd is not None:
        release = MetricsRelease(dice="noised", loss="withheld", split="val", noise_multiplier=sd / 0.5,
                                 sensitivity=0.5, delta=1e-5)
        receipt = Receipt(job_id="j", dataset="a", scientist="alice", mechanism="gaussian_dice", dp=True, epsilon=1.0,
                          delta=1e-5, cumulative_epsilon=1.0, parameters=[release.model_dump()], note="")
    return JobStatus(job_id="j", kind=kind, experiment_id="e", round=0, dataset="a", state="done", privacy=receipt,
                     metrics=Metrics(dice={"pancreas": dice}, mean_dice=dice, samples=3), has_update=kind == "train")


def test_fl_local_selection_and_the_round_table_say_when_their_dice_is_noised():
    from voxgrid.pointers import DatasetPointer
    from voxgrid.reports import RoundResult, SiteResult, dice_table, history_frame
    from voxgrid.selection import ModelSelection, client_update
    from voxgrid.wire import DatasetInfo

    plan = voxgrid.unet_plan(LABELS, **TINY)
    pa, pb = (DatasetPointer(f"node-{n}", f"https://{n}", DatasetInfo(name=n, tags=[], volumes=4, label_names=LABELS, splits={}),
                             None)
              for n in "ab")
    noised, exact = client_update(pa, _noised_status("train", 0.7, sd=0.05), {}), \
        client_update(pb, _noised_status("train", 0.6), {})
    assert noised.metrics["dice_noise_sd"] == pytest.approx(0.05) and exact.metrics["dice_noise_sd"] is None
    sel = ModelSelection(plan, "e")
    sel.observe_local(0, {}, [noised, exact])
    by_site = {m.site: m for m in sel.models()}
    assert by_site[noised.site].noise_sd == pytest.approx(0.05) and by_site[exact.site].noise_sd is None
    table = CrossSiteTable("test", ["a"], {"a": ["pancreas"]}, sel.models(),
                           {m.name: {"a": {"pancreas": 0.5}} for m in sel.models()}, {})
    text = str(table)
    assert f"FL local ({noised.site}) was selected by validation Dice noised at the nodes (std up to 0.050)" in text
    assert f"FL local ({exact.site}) was selected" not in text
    back = ModelSelection(plan, "e")
    back.load(sel.state())  # a resumed experiment still knows
    assert {m.site: m.noise_sd for m in back.models()} == {m.site: m.noise_sd for m in sel.models()}

    sites = [SiteResult("node-a", "a", True, test_dice={"pancreas": 0.7}, test_dice_noise_sd=0.031),
             SiteResult("node-b", "b", True, test_dice={"pancreas": 0.6})]
    r = RoundResult(round=0, sites=sites, wall_s=1.0, compute_s=0.5, train_wall_s=0.8)
    text = dice_table(r, ["pancreas"])
    assert "Dice at a@node-a is noised by its node (privacy budget): Gaussian, std 0.031" in text
    assert "b@node-b is noised" not in text
    assert list(history_frame([r])["dice_noise_sd"].fillna(0)) == [0.031, 0.0]
    assert RoundResult.from_dict(r.to_dict()).sites[0].test_dice_noise_sd == 0.031  # kept in checkpoints


def test_the_nodes_batch_limit_bounds_the_views_of_a_patient():
    from voxgrid.nodes.service.limits import JobLimits, LimitExceeded, check_plan
    from voxgrid.nodes.service.store import VolumeRecord

    plan = voxgrid.unet_plan(LABELS, **TINY, batch_size=2, privacy={**TARGET, "augmentation_multiplicity": 8})
    vols = [VolumeRecord(f"c{i}", "", None, "nifti", "train") for i in range(4)]
    check_plan(plan, JobLimits(), vols)  # K = 8 <= the default 32
    with pytest.raises(LimitExceeded, match=r"plan\.privacy\.augmentation_multiplicity: 8 .* limit of 4"):
        check_plan(plan, JobLimits(max_batch_size=4), vols)
