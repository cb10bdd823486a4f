"""Plans are data: allowlisted components, literal JSON kwargs, canonical hashes (invariant 3)."""

import json
import os
import subprocess
import sys

import pydantic
import pytest
import torch

from voxgrid import components
from voxgrid.plan import (
    Plan,
    PlanError,
    build_loss,
    build_network,
    build_optimizer,
    build_transforms,
    initial_weights,
    unet_plan,
)

LABELS = ["background", "pancreas", "tumor"]
SMALL = dict(channels=(4, 8, 16), strides=(2, 2))
DEEP: list = [0.9]
for _ in range(40):
    DEEP = [DEEP]


def plan_dict(**changes):
    data = json.loads(unet_plan(LABELS, **SMALL).to_json())
    data.update(changes)
    return data


def refusal(**changes) -> str:
    with pytest.raises(PlanError) as info:
        Plan(**plan_dict(**changes))
    return str(info.value)


def test_default_plan_builds_a_network_with_one_output_per_label():
    plan = unet_plan(LABELS)
    net = build_network(plan)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, len(LABELS), 32, 32, 32)
    assert plan.network["out_channels"] == 3 and plan.loss["_target_"] == "DiceCELoss"


def test_hash_ignores_key_order_and_survives_json_round_trip():
    plan = unet_plan(LABELS, **SMALL)
    reordered = {k: plan.network[k] for k in reversed(list(plan.network))}
    data = plan.model_dump()
    data["network"] = reordered
    same = Plan(**dict(reversed(list(data.items()))))
    back = Plan.from_json(plan.to_json(indent=2))
    assert same.content_hash == plan.content_hash == back.content_hash
    assert back == plan
    assert plan.content_hash.startswith("sha256:") and len(plan.content_hash) == 7 + 64


def test_hash_is_the_same_in_another_process_which_does_not_import_nodes():
    code = (
        "import sys; from voxgrid.plan import unet_plan; "
        f"print(unet_plan({LABELS!r}, channels=(4, 8, 16), strides=(2, 2)).content_hash); "
        "print(any(m.startswith('voxgrid.nodes') for m in sys.modules))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    digest, nodes_imported = out.stdout.split()
    assert digest == unet_plan(LABELS, **SMALL).content_hash
    assert nodes_imported == "False"


def test_hash_changes_with_learning_rate():
    assert unet_plan(LABELS, lr=1e-3).content_hash != unet_plan(LABELS, lr=2e-3).content_hash


def test_tuples_become_lists_so_python_and_json_plans_are_equal():
    plan = unet_plan(LABELS, channels=(4, 8, 16), strides=(2, 2), pos_neg=(2, 1))
    assert plan.network["channels"] == [4, 8, 16]
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_json_is_plain_json():
    text = unet_plan(LABELS, privacy={"epsilon": 8.0}).to_json()

    def walk(value):
        assert value is None or isinstance(value, (bool, int, float, str, list, dict))
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            list(map(walk, value.values()))
        elif isinstance(value, list):
            list(map(walk, value))

    walk(json.loads(text))
    for python_ism in ("NaN", "Infinity", "<class", "tuple", "torch", "numpy", "__"):
        assert python_ism not in text


def test_plan_is_frozen_and_owns_its_components():
    network = plan_dict()["network"]
    plan = Plan(**plan_dict(network=network))
    network["out_channels"] = 99
    assert plan.network["out_channels"] == 3
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        plan.local_epochs = 5


@pytest.mark.parametrize(
    "field, spec, expected",
    [
        ("network", {"_target_": "ResNet"}, ["plan.network", "'ResNet' is not an allowed network", "UNet"]),
        ("network", {"_target_": "os.system", "command": "id"}, ["plan.network", "'os.system'"]),
        ("network", {"_target_": "monai.networks.nets.UNet"}, ["is not an allowed network"]),
        ("loss", {"_target_": "DiceLoss", "other_act": "$torch.sigmoid"}, ["plan.loss.other_act", "$torch.sigmoid"]),
        ("loss", {"_target_": "DiceLoss", "reduction": "@network_def#reduction"}, ["plan.loss.reduction"]),
        ("loss", {"_target_": "DiceLoss", "reduction": "%/etc/defaults.json"}, ["plan.loss.reduction"]),
        ("loss", {"_target_": "DiceLoss", "reduction": "config.json#mean"}, ["plan.loss.reduction"]),
        ("loss", {"_target_": "DiceLoss", "weight": {"_target_": "Adam"}}, ["plan.loss.weight", "_target_"]),
        ("loss", {"_target_": "DiceLoss", "_requires_": "@x"}, ["plan.loss", "'_requires_'"]),
        ("loss", {"_target_": "DiceLoss", "_disabled_": True}, ["'_disabled_'"]),
        ("loss", {"_target_": "DiceLoss", "smooth": 1.0}, ["plan.loss (DiceLoss)", "unknown argument 'smooth'"]),
        ("optimizer", {"_target_": "Adam", "params": []}, ["plan.optimizer (Adam)", "'params'"]),
        ("optimizer", {"_target_": "Adam", "betas": DEEP}, ["nested more than"]),
    ],
)
def test_refused_components_name_field_and_problem(field, spec, expected):
    message = refusal(**{field: spec})
    for fragment in expected:
        assert fragment in message


def test_transform_keys_must_be_image_or_label():
    message = refusal(preprocessing=[{"_target_": "NormalizeIntensityd", "keys": ["image", "path"]}])
    assert "plan.preprocessing[0] (NormalizeIntensityd)" in message and "'path'" in message
    message = refusal(augmentation=[{"_target_": "CropForegroundd", "keys": "image", "source_key": "mask"}])
    assert "plan.augmentation[0]" in message and "'mask'" in message


def test_missing_required_argument_is_named():
    message = refusal(preprocessing=[{"_target_": "ScaleIntensityRanged", "keys": ["image"], "a_min": 0}])
    assert "missing required argument 'a_max'" in message


def test_network_channels_must_match_labels():
    network = plan_dict()["network"] | {"out_channels": 2}
    message = refusal(network=network)
    assert "out_channels is 2" in message and "must be 3" in message
    assert "in_channels" in refusal(network=network | {"out_channels": 3, "in_channels": 2})
    # BasicUNet's default out_channels is 2, which does not match three labels either.
    assert "(its default)" in refusal(network={"_target_": "BasicUNet"})


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"labels": ["background"]}, "plan.labels: needs at least 2"),
        ({"labels": ["liver", "background", "tumor"]}, "first name must be 'background'"),
        ({"labels": ["background", "tumor", "tumor"]}, "repeated: tumor"),
        ({"patch_size": [4, 32, 32]}, "plan.patch_size[0]"),
        ({"batch_size": "2"}, "plan.batch_size"),
        ({"amp": "yes"}, "plan.amp"),
        ({"sw_overlap": 1.0}, "plan.sw_overlap"),
        ({"pos_neg": [0, 0]}, "plan.pos_neg"),
        ({"script": "rm -rf /"}, "plan.script"),
    ],
)
def test_refused_fields(changes, fragment):
    if "labels" in changes:  # keep the network consistent so the label rule is what fails
        changes["network"] = plan_dict()["network"] | {"out_channels": max(2, len(changes["labels"]))}
    assert fragment in refusal(**changes)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ('{"labels": NaN}', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"name": "x"}', "plan.network: Field required"),
    ],
)
def test_from_json_refuses_bad_input(text, fragment):
    with pytest.raises(PlanError) as info:
        Plan.from_json(text)
    assert fragment in str(info.value)


def test_builders_recheck_a_plan_mutated_after_validation():
    plan = unet_plan(LABELS, **SMALL)
    plan.network["_target_"] = "os.system"  # nested dicts are mutable despite frozen=True
    with pytest.raises(PlanError, match="os.system"):
        build_network(plan)
    with pytest.raises(PlanError, match=r"transforms\[0\]"):
        build_transforms([{"_target_": "LoadImaged", "keys": ["image"]}])


def test_loss_optimizer_and_transforms_are_built_as_specified():
    plan = unet_plan(
        LABELS,
        **SMALL,
        lr=0.02,
        loss={"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "weight": [0.1, 1.0, 2.0]},
        augmentation=[{"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 1.0, "spatial_axis": 0}],
    )
    net = build_network(plan)
    optimizer = build_optimizer(plan, net.parameters())
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.02
    loss = build_loss(plan)
    assert torch.equal(loss.cross_entropy.weight, torch.tensor([0.1, 1.0, 2.0]))
    logits, target = torch.randn(1, 3, 8, 8, 8), torch.randint(0, 3, (1, 1, 8, 8, 8))
    assert torch.isfinite(loss(logits, target))

    image = torch.linspace(-1000, 1000, 64).reshape(1, 4, 4, 4)
    sample = {"image": image, "label": torch.arange(64.0).reshape(1, 4, 4, 4)}
    for transform in build_transforms(plan.preprocessing + plan.augmentation):
        sample = transform(sample)
    assert float(sample["image"].min()) == 0.0 and float(sample["image"].max()) == 1.0
    assert float(sample["label"][0, 0, 0, 0]) == 48.0  # flipped along the first spatial axis


def test_initial_weights_are_deterministic_per_seed_and_leave_global_rng_alone():
    plan = unet_plan(LABELS, **SMALL)
    torch.manual_seed(42)
    before = torch.rand(3)
    torch.manual_seed(42)
    a, b, c = initial_weights(plan), initial_weights(plan), initial_weights(plan, seed=1)
    assert torch.equal(torch.rand(3), before)
    assert a.keys() == b.keys() == build_network(plan).state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_allowlist_is_read_only():
    assert "UNet" in components.NETWORKS and "Adam" in components.OPTIMIZERS
    with pytest.raises(TypeError):
        components.NETWORKS["Evil"] = object
    assert "LoadImaged" not in components.TRANSFORMS


def test_model_validate_also_raises_plan_error():
    # Nodes validate received plans with model_validate; they get the same clean message.
    data = plan_dict(network={"_target_": "os.system"})
    with pytest.raises(PlanError, match=r"^plan\.network: \"_target_\" 'os.system' is not an allowed network"):
        Plan.model_validate(data)
    assert Plan.model_validate(plan_dict()) == unet_plan(LABELS, **SMALL)
