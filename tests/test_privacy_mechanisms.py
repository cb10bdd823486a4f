"""Update-level mechanisms and the filter-chain spec a plan carries."""

import math

import pytest
import torch

from voxgrid.privacy import PrivacySpec, PrivacySpecError
from voxgrid.privacy.mechanisms import (
    apply_filters,
    clip,
    distributed_share,
    gaussian_update,
    l2_norm,
    percentile,
    secure_generator,
)


def update(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": scale * torch.randn(8, 4, 3, 3, 3, generator=g),
            "conv.bias": scale * torch.randn(8, generator=g)}


def test_clip_bounds_the_global_norm_and_keeps_small_updates():
    u = update()
    assert l2_norm(clip(u, 1.0)) == pytest.approx(1.0, rel=1e-5)
    small = clip(u, 1e6)
    assert all(torch.equal(small[k], u[k]) for k in u)
    c = clip(u, 1.0)  # a scaling: direction kept
    ratio = c["conv.bias"] / c["conv.weight"].flatten()[0]
    assert torch.allclose(ratio, u["conv.bias"] / u["conv.weight"].flatten()[0])


def test_gaussian_update_adds_noise_of_the_stated_scale():
    u = {"w": torch.zeros(200_000)}
    out = gaussian_update(u, clip_norm=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(1))
    assert out["w"].std().item() == pytest.approx(3.0, rel=0.01) and abs(out["w"].mean().item()) < 0.02
    # seeded generator: reproducible; the input is not modified
    a = gaussian_update(update(), clip_norm=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(7))
    b = gaussian_update(update(), clip_norm=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(update()["conv.bias"], update()["conv.bias"])


def test_secure_generators_differ():
    a, b = secure_generator(), secure_generator()
    assert not torch.equal(torch.randn(16, generator=a), torch.randn(16, generator=b))


def test_percentile_keeps_the_largest_fraction_across_tensors():
    u = {"a": torch.tensor([0.1, -5.0, 0.2, 3.0]), "b": torch.tensor([[-0.3, 4.0], [0.0, 0.05]])}
    out = percentile(u, fraction=0.25)  # 8 entries -> keep 2: -5 and 4
    assert out["a"].tolist() == [0.0, -5.0, 0.0, 0.0] and out["b"].tolist() == [[0.0, 4.0], [0.0, 0.0]]
    assert out["b"].shape == (2, 2)
    kept = percentile(update(), fraction=0.25)
    n = sum(t.numel() for t in kept.values())
    assert sum(int((t != 0).sum()) for t in kept.values()) == math.ceil(0.25 * n)
    assert all(torch.equal(percentile(u, fraction=1.0)[k], u[k]) for k in u)
    ties = percentile({"t": torch.ones(10)}, fraction=0.3)
    assert int((ties["t"] != 0).sum()) == 3


def test_filters_refuse_integer_tensors():
    with pytest.raises(TypeError, match="floating-point"):
        percentile({"steps": torch.tensor([3])}, fraction=0.5)


def test_chain_runs_in_order():
    spec = PrivacySpec.parse({"filters": [{"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 0.5,
                                           "delta": 1e-5}, {"mechanism": "percentile", "fraction": 0.1}]})
    out = apply_filters(spec, update(), torch.Generator().manual_seed(0))
    n = sum(t.numel() for t in out.values())
    assert sum(int((t != 0).sum()) for t in out.values()) == math.ceil(0.1 * n)  # sparse: percentile ran last
    assert spec.name == "gaussian_update+percentile" and spec.dp


def test_spec_shorthand_and_dp_flag():
    g = PrivacySpec.parse({"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.1, "delta": 1e-5})
    assert g.dp and g.name == "gaussian_update" and len(g.events()) == 1
    assert g.events()[0].noise_multiplier == pytest.approx(0.55)  # sensitivity of a clipped update: 2 * clip
    p = PrivacySpec.parse({"mechanism": "percentile", "fraction": 0.25})
    assert not p.dp and p.events() == []
    assert PrivacySpec.parse(None) is None


@pytest.mark.parametrize("bad,named", [
    ({"mechanism": "gaussian_update", "clip": -1, "noise_multiplier": 1, "delta": 1e-5}, "plan.privacy.clip"),
    ({"mechanism": "gaussian_update", "clip": 1, "noise_multiplier": 1}, "plan.privacy.delta: Field required"),
    ({"mechanism": "gaussian_update", "clip": 1, "noise_multiplier": 1, "delta": 2}, "plan.privacy.delta"),
    ({"mechanism": "percentile", "fraction": 1.5}, "plan.privacy.fraction"),
    ({"mechanism": "percentile", "fraction": 0.5, "seed": 3}, "plan.privacy.seed: Extra inputs"),
    ({"mechanism": "laplace"}, "unknown mechanism 'laplace'"),
    ({"filters": []}, "plan.privacy.filters"),
    ({"filters": [{"mechanism": "percentile", "fraction": 0}]}, "plan.privacy.filters[0].fraction"),
    ({"filters": [{"mechanism": "gaussian_update", "clip": 1, "noise_multiplier": 1, "delta": 1e-5}] * 2},
     "at most one noise filter"),
    ("gaussian", "plan.privacy"),
])
def test_bad_specs_name_the_field(bad, named):
    with pytest.raises(PrivacySpecError) as e:
        PrivacySpec.parse(bad)
    assert named in str(e.value)


def test_distributed_noise_shares_add_up_to_the_full_noise_of_the_largest_weighted_update():
    # Three nodes, weights 2, 4, 8 (max 8), threshold 2: each weighted share has std sigma*C*8/sqrt(2),
    # so any 2 of them sum to std sigma*C*8, the noise the largest weighted update needs.
    weights, t = [2.0, 4.0, 8.0], 2
    shares = [distributed_share(w, 8.0, t) for w in weights]
    assert shares == pytest.approx([8 / (2 * math.sqrt(2)), 8 / (4 * math.sqrt(2)), 1 / math.sqrt(2)])
    for pair in ((0, 1), (0, 2), (1, 2)):
        std = math.sqrt(sum((weights[i] * shares[i]) ** 2 for i in pair))
        assert std == pytest.approx(8.0)
    assert distributed_share(0.0, 8.0, t) == 0.0  # a zero-weight update is zero: nothing to hide
    with pytest.raises(ValueError, match="weight <= max_weight"):
        distributed_share(9.0, 8.0, t)

    spec = PrivacySpec.parse({"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0, "delta": 1e-5,
                              "distributed": True})
    assert spec.events() == PrivacySpec.parse({"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0,
                                               "delta": 1e-5}).events()  # the sum is accounted like the central one
    with pytest.raises(ValueError, match="needs secure aggregation"):
        apply_filters(spec, update(), secure_generator())
    big = {"w": torch.zeros(200_000)}
    out = apply_filters(spec, big, secure_generator(), noise_share=0.25)
    assert float(out["w"].std()) == pytest.approx(4.0 * 0.25, rel=0.02)
