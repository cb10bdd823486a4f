"""Patient-level DP-SGD: the spec, the trainer (Opacus, on a real MONAI UNet), the node's accounting."""

import math

import pytest
import torch
from monai.data import MetaTensor

import voxgrid
from voxgrid.nodes.service.node import Invalid
from voxgrid.nodes.service.store import NodeStore, VolumeRecord
from voxgrid.nodes.worker.training import Trainer, refuse_for_dp_sgd
from voxgrid.plan import PlanError, build_network
from voxgrid.privacy import Ledger, PrivacySpec, PrivacySpecError, TrainingContext
from voxgrid.privacy.accountant import GaussianEvent, epsilon
from voxgrid.privacy.mechanisms import apply_filters, secure_generator
from voxgrid.wire import EstimateRequest

from test_privacy_node import ALICE, finish, node, request  # noqa: F401  (the node fixture)

DPSGD = {"mechanism": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}
LABELS = ["background", "pancreas"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=1, patch_size=(16, 16, 16), amp=False)


def _plan(privacy=DPSGD, **kw):
    return voxgrid.unet_plan(LABELS, **{**TINY, "privacy": privacy, **kw})


def _volume(seed: int, patient: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.randn(1, 16, 16, 16, generator=g)
    label = torch.zeros(1, 16, 16, 16)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label[:, 4:10, 4:10, 4:10] = 1.0
    return {"image": MetaTensor(image), "label": MetaTensor(label), "patient": patient}


# --- the spec --------------------------------------------------------------------------------------
def test_dp_sgd_spec_schedule_and_chains():
    spec = PrivacySpec.parse(DPSGD)
    assert spec.dp and spec.delta == 1e-5 and spec.name == "dp_sgd"
    ctx = TrainingContext(patients=10, batch_size=2, local_epochs=3)
    assert spec.dp_sgd.schedule(ctx) == (0.2, 15)  # q = 2/10, 3 epochs of ceil(1/q) = 5 steps
    assert spec.events(ctx) == [GaussianEvent(1.1, 0.2, 15)]
    assert PrivacySpec.parse({**DPSGD, "sample_rate": 0.5}).dp_sgd.schedule(
        TrainingContext(10, 2, 1, steps_per_epoch=7)) == (0.5, 7)
    assert PrivacySpec.parse(DPSGD).dp_sgd.schedule(TrainingContext(1, 2, 1)) == (1.0, 1)  # q capped at 1
    with pytest.raises(ValueError, match="TrainingContext"):
        spec.events()  # the cost depends on the dataset: never guessed
    chain = PrivacySpec.parse({"filters": [DPSGD, {"mechanism": "percentile", "fraction": 0.25}]})
    assert chain.dp and chain.name == "dp_sgd+percentile"
    params = chain.parameters(ctx)
    assert params[0]["sample_rate"] == 0.2 and params[0]["steps"] == 15 and params[0]["unit"] == "patient"
    with pytest.raises(PrivacySpecError, match="at most one noise filter"):
        PrivacySpec.parse({"filters": [DPSGD, {"mechanism": "gaussian_update", "clip": 1.0,
                                               "noise_multiplier": 1.0, "delta": 1e-5}]})
    with pytest.raises(PrivacySpecError, match="put it first"):
        PrivacySpec.parse({"filters": [{"mechanism": "percentile", "fraction": 0.25}, DPSGD]})
    with pytest.raises(PrivacySpecError, match=r"plan\.privacy\.max_grad_norm"):
        PrivacySpec.parse({**DPSGD, "max_grad_norm": 0})
    # the update filters pass over dp_sgd (it acted in training): the update is unchanged
    update = {"w": torch.arange(4.0)}
    assert torch.equal(apply_filters(spec, update, secure_generator())["w"], update["w"])


def test_training_context_counts_patients_of_the_train_split():
    vols = [VolumeRecord("a1", "", None, "nifti", "train", patient="A"),
            VolumeRecord("a2", "", None, "nifti", "train", patient="A"),
            VolumeRecord("b", "", None, "nifti", "train"), VolumeRecord("c", "", None, "nifti", "val")]
    ctx = TrainingContext.of(_plan(batch_size=1, local_epochs=2), vols)
    assert (ctx.patients, ctx.batch_size, ctx.local_epochs) == (2, 1, 2)


# --- the trainer -----------------------------------------------------------------------------------
def test_dp_sgd_trains_a_monai_unet_with_steps_set_by_the_patients():
    torch.manual_seed(0)
    plan = _plan(batch_size=1, local_epochs=1, lr=1e-2)
    net = build_network(plan)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = Trainer(torch.device("cpu"))
    # 4 volumes of 2 patients: q = 1/2, 2 steps; one volume per patient: q = 1/4, 4 steps
    two = [_volume(i, "AB"[i // 2]) for i in range(4)]
    four = [_volume(i, f"p{i}") for i in range(4)]
    loss, steps = trainer.train(plan, net, two, seed=0, present={1})
    assert loss is None and steps == 2  # the loss of the patients is not released
    assert trainer.train(plan, net, four, seed=0, present={1})[1] == 4
    assert any(not torch.equal(start[k], v) for k, v in net.state_dict().items())
    # the hooks are gone: the cached network trains without DP afterwards
    assert not any(getattr(p, "grad_sample", None) is not None for p in net.parameters())
    plain = _plan(privacy=None, batch_size=1, samples_per_volume=1)
    assert trainer.train(plain, net, four, seed=0, present={1})[0] is not None
    assert not any(getattr(p, "grad_sample", None) is not None for p in net.parameters())


def test_each_patient_moves_the_weights_at_most_max_grad_norm():
    """SGD, lr 1, every patient in every step (q = 1), almost no noise: one step moves the weights by
    the mean of the clipped per-patient gradients, so by at most max_grad_norm, however large they are."""
    clip = 1e-3
    plan = _plan(privacy={**DPSGD, "noise_multiplier": 1e-9, "max_grad_norm": clip, "sample_rate": 1.0},
                 optimizer={"_target_": "SGD", "lr": 1.0}, local_epochs=1, steps_per_epoch=1)
    torch.manual_seed(0)
    net = build_network(plan)
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    Trainer(torch.device("cpu")).train(plan, net, [_volume(i, f"p{i}") for i in range(3)], seed=0, present={1})
    moved = math.sqrt(sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in net.named_parameters()))
    assert 0.2 * clip < moved <= clip * (1 + 1e-4)


def test_layers_dp_sgd_cannot_train_are_refused_by_name():
    batch_norm = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                  "strides": [2], "num_res_units": 1, "norm": "batch"}
    with pytest.raises(PlanError, match=r"layer 'model\.0\.conv\.unit0\.adn\.N' \(BatchNorm3d\)") as e:
        voxgrid.unet_plan(LABELS, **{**TINY, "privacy": DPSGD}, network=batch_norm)  # on the scientist's side
    assert "norm" in str(e.value) and "instance" in str(e.value)
    plain = voxgrid.unet_plan(LABELS, **TINY, network=batch_norm)
    with pytest.raises(ValueError, match=r"BatchNorm3d"):  # and again at the node, on the network it built
        refuse_for_dp_sgd(plain, build_network(plain))
    refuse_for_dp_sgd(_plan(), build_network(_plan()))  # the default UNet (instance norm) is fine


# --- the node: reservation, receipt, estimate ------------------------------------------------------
def test_the_node_reserves_and_receipts_dp_sgd_with_its_schedule(node):  # noqa: F811
    req = request(node, DPSGD)
    job = node.submit(ALICE, req)
    entry = node.ledger.entry(job.job_id)
    # the fixture's dataset: 2 train volumes, one patient each; the plan's batch 2 -> q = 1, 1 step/epoch
    q, steps = 1.0, 1
    assert entry.parameters[0]["sample_rate"] == q and entry.parameters[0]["steps"] == steps
    assert entry.epsilon == pytest.approx(epsilon([GaussianEvent(1.1, q, steps)], 1e-5))
    finish(node, job.job_id)
    receipt = node.job_status(ALICE, job.job_id).privacy
    assert receipt.mechanism == "dp_sgd" and receipt.dp and "patient" in receipt.note
    assert receipt.parameters[0]["noise_multiplier"] == 1.1 and receipt.parameters[0]["unit"] == "patient"
    assert 0 < receipt.epsilon_prv <= receipt.epsilon
    est = node.privacy_estimate(ALICE, EstimateRequest(dataset="ct", privacy=DPSGD, releases=3, plan=req.plan))
    assert est.epsilon_per_release == pytest.approx(entry.epsilon) and est.parameters[0]["steps"] == steps
    with pytest.raises(Invalid, match="needs the plan"):
        node.privacy_estimate(ALICE, EstimateRequest(dataset="ct", privacy=DPSGD))


def test_volumes_of_one_patient_are_one_unit_in_the_ledger(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    spec = PrivacySpec.parse(DPSGD)
    plan = _plan(batch_size=1)
    one_each = [VolumeRecord(f"c{i}", "", None, "nifti", "train") for i in range(4)]
    shared = [VolumeRecord(f"c{i}", "", None, "nifti", "train", patient=f"P{i // 2}") for i in range(4)]
    a = ledger.reserve("a", "alice", "ct", spec, TrainingContext.of(plan, one_each))
    b = ledger.reserve("b", "alice", "ct2", spec, TrainingContext.of(plan, shared))
    assert (a.parameters[0]["patients"], b.parameters[0]["patients"]) == (4, 2)
    assert b.parameters[0]["sample_rate"] == 0.5 and b.epsilon > a.epsilon  # fewer units: more cost each
    with pytest.raises(ValueError, match="TrainingContext"):
        ledger.reserve("c", "alice", "ct", spec)
    assert ledger.entry("c") is None
    ledger.close()


def test_patients_are_stored_and_kept_in_one_split(tmp_path):
    from voxgrid.datasets import SiteSpec, write_site
    from voxgrid.nodes.ops import admin
    from voxgrid.nodes.service.home import Home

    from voxgrid.pki import create_ca, issue_certificate

    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "n", ["127.0.0.1"])
    admin.init_home("node", tmp_path / "home", "n", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    write_site(SiteSpec(name="s", n_volumes=6, labels={1: "pancreas"}, shape=(16, 16, 16)), tmp_path / "site")
    cases = [f"s-{i:03d}" for i in range(6)]
    patients = {c: f"P{i // 2}" for i, c in enumerate(cases)}
    admin.add_dataset(tmp_path / "home", "ct", tmp_path / "site" / "images", tmp_path / "site" / "labels",
                      policy="open", tags=["ct"], label_names={1: "pancreas"}, patients=patients, check=False)
    store = NodeStore(Home(tmp_path / "home").db_file)
    vols = store.dataset("ct").volumes
    store.close()
    assert {v.case_id: v.patient for v in vols} == patients
    for p in set(patients.values()):
        assert len({v.split for v in vols if v.patient == p}) == 1
    with pytest.raises(ValueError, match="no volume with case id nope"):
        admin.add_dataset(tmp_path / "home", "ct2", tmp_path / "site" / "images", tmp_path / "site" / "labels",
                          policy="open", tags=["ct"], label_names={1: "pancreas"}, patients={"nope": "P"}, check=False)
