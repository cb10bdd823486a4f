"""Hostile numbers against the privacy filters: NaN, inf, huge values and every dtype an upload can carry.

A NaN anywhere used to make the update's norm NaN, the clip's scale 1 and the update leave unclipped
under the usual epsilon (issue 11, finding 1). Each filter now refuses what it cannot bound.
"""

import math
import struct

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import voxgrid
from voxgrid import tensors
from voxgrid.nodes.worker.training import Trainer, check_update
from voxgrid.plan import build_network
from voxgrid.privacy import PrivacySpec
from voxgrid.privacy.mechanisms import (
    NonFiniteUpdate,
    apply_filters,
    clip,
    distributed_share,
    gaussian_update,
    l2_norm,
    percentile,
)
from voxgrid.privacy.secagg import SecAggConfig
from voxgrid.privacy.secagg.errors import SecAggError
from voxgrid.privacy.secagg.quantize import Quantiser, check_weight, decode, ring_dtype

NAN, INF = float("nan"), float("inf")
GAUSS = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}


def _update(bad: float, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A normal update with one hostile entry, in a tensor named like an unused normalisation buffer."""
    return {"conv.weight": torch.full((4, 3), 0.5, dtype=dtype),
            "norm.running_var": torch.tensor([1.0, bad, 1.0], dtype=dtype)}


# --- every filter refuses non-finite entries ------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_every_filter_refuses_a_non_finite_update_naming_the_tensor(bad):
    gen = torch.Generator().manual_seed(0)
    for run in (lambda u: clip(u, 1.0),
                lambda u: gaussian_update(u, clip_norm=1.0, noise_multiplier=1.0, generator=gen),
                lambda u: percentile(u, fraction=0.5),
                lambda u: apply_filters(PrivacySpec.parse(GAUSS), u, gen),
                lambda u: apply_filters(PrivacySpec.parse({"mechanism": "percentile", "fraction": 0.5}), u, gen),
                check_update):
        with pytest.raises(NonFiniteUpdate, match=r"norm\.running_var"):
            run(_update(bad))


def test_a_dp_sgd_only_chain_still_refuses_a_non_finite_update():
    spec = PrivacySpec.parse({"mechanism": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5})
    with pytest.raises(NonFiniteUpdate):
        apply_filters(spec, _update(NAN), torch.Generator())


# --- huge finite values: the norm cannot overflow, the clip still bounds ---------------------------
@pytest.mark.parametrize("value,dtype", [(1e200, torch.float64), (1.7e308, torch.float64),
                                         (65504.0, torch.float16), (3e38, torch.bfloat16)])
def test_huge_finite_entries_are_clipped_and_the_norm_is_exact(value, dtype):
    u = {"a": torch.full((1000,), value, dtype=dtype), "b": torch.full((3,), -value, dtype=dtype)}
    exact = float(u["a"][0].double()) * math.sqrt(1003)  # may exceed float64 for 1.7e308: then inf is right
    assert l2_norm(u) == pytest.approx(exact, rel=1e-9) or (math.isinf(exact) and math.isinf(l2_norm(u)))
    out = clip(u, 2.0)
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in out.values())
    assert l2_norm(out) == pytest.approx(2.0, rel=1e-5)
    # direction kept: every entry has the same magnitude
    assert torch.allclose(out["a"], torch.full((1000,), 2.0 / math.sqrt(1003)), rtol=1e-5)
    noisy = gaussian_update(u, clip_norm=2.0, noise_multiplier=1e-6, generator=torch.Generator().manual_seed(0))
    assert l2_norm(noisy) == pytest.approx(2.0, rel=1e-3)


def test_tiny_and_zero_updates_and_float16_noise_do_not_overflow():
    assert l2_norm({"a": torch.full((10,), 1e-300, dtype=torch.float64)}) == pytest.approx(1e-300 * math.sqrt(10))
    zero = clip({"a": torch.zeros(5, dtype=torch.float16)}, 1.0)
    assert zero["a"].dtype == torch.float32 and not zero["a"].any()
    # noise of std 1e5 added to a float16 update: float16 tops out at 65504; float32 does not
    out = gaussian_update({"a": torch.ones(1000, dtype=torch.float16)}, clip_norm=1.0, noise_multiplier=1e5,
                          generator=torch.Generator().manual_seed(0))
    assert out["a"].dtype == torch.float32 and bool(torch.isfinite(out["a"]).all())
    assert float(out["a"].std()) == pytest.approx(1e5, rel=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_comes_out_float32(dtype):
    u = {"a": torch.tensor([3.0, -4.0], dtype=dtype)}
    gen = torch.Generator().manual_seed(0)
    for out in (clip(u, 1.0), clip(u, 10.0), percentile(u, fraction=0.5),
                gaussian_update(u, clip_norm=1.0, noise_multiplier=1.0, generator=gen),
                apply_filters(PrivacySpec.parse(GAUSS), u, gen)):
        assert out["a"].dtype == torch.float32 and bool(torch.isfinite(out["a"]).all())
    assert clip(u, 1.0)["a"].tolist() == pytest.approx([0.6, -0.8], rel=1e-2)
    assert percentile(u, fraction=0.5)["a"].tolist() == [0.0, -4.0]


def test_percentile_refuses_values_beyond_float32_rather_than_send_inf():
    with pytest.raises(NonFiniteUpdate, match="'a'.*float32"):
        percentile({"a": torch.tensor([1e200, 1.0], dtype=torch.float64)}, fraction=0.5)


def test_filters_refuse_non_float_dtypes_by_name():
    """Ints, bool and complex were refused before; float8 passed as 'floating point' and then broke."""
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.uint8, torch.bool, torch.complex64):
        u = {"ok": torch.zeros(2), "counter": torch.zeros(2).to(dtype)}
        for run in (lambda v: clip(v, 1.0), lambda v: percentile(v, fraction=0.5),
                    lambda v: apply_filters(PrivacySpec.parse(GAUSS), v, torch.Generator())):
            with pytest.raises(TypeError, match=r"floating-point.*counter"):
                run(u)


@pytest.mark.parametrize("kw", [dict(clip_norm=NAN, noise_multiplier=1.0), dict(clip_norm=INF, noise_multiplier=1.0),
                                dict(clip_norm=1.0, noise_multiplier=NAN), dict(clip_norm=1.0, noise_multiplier=INF),
                                dict(clip_norm=1e20, noise_multiplier=1e20), dict(clip_norm=-1.0, noise_multiplier=1.0)])
def test_gaussian_update_refuses_parameters_that_switch_off_clip_or_noise(kw):
    with pytest.raises(NonFiniteUpdate):
        gaussian_update({"a": torch.ones(3)}, generator=torch.Generator(), **kw)


def test_distributed_share_refuses_non_finite_weights():
    for w, m in [(NAN, 1.0), (1.0, INF), (INF, INF)]:
        with pytest.raises(ValueError, match="distributed noise"):
            distributed_share(w, m, 2)


# --- quantisation for secure aggregation --------------------------------------------------------------
def _quantise(x: np.ndarray, weight: float = 1.0):
    config = SecAggConfig("exp-h", 0, ("a", "b", "c"), threshold=2, clip=1.0, max_weight=1.0)
    out = np.empty(x.size, ring_dtype(config.bits))
    Quantiser(config, weight, x.size).into(x, out, 0)
    return decode(config, np.concatenate([out, np.zeros(1, out.dtype)]))[0]


def test_quantisation_refuses_non_finite_entries_and_clips_huge_ones():
    """A pin, not a fix: quantisation already checked x * scale for finiteness before its cast."""
    for bad in (NAN, INF, -INF):
        for dtype in (np.float16, np.float32, np.float64):
            with pytest.raises(SecAggError, match="non-finite"):
                _quantise(np.array([0.1, bad, 0.2], dtype=dtype))
            with pytest.raises(SecAggError, match="non-finite"), np.errstate(invalid="ignore"):
                _quantise(np.array([0.1, bad], dtype=dtype), weight=0.0)  # 0 * inf is NaN, not 0
    assert _quantise(np.array([65504.0, -65504.0], np.float16)).tolist() == pytest.approx([1.0, -1.0], abs=1e-8)
    assert _quantise(np.array([1e200, -3e38], np.float64)).tolist() == pytest.approx([1.0, -1.0], abs=1e-8)
    with pytest.raises(SecAggError, match="non-finite"):  # x * scale overflows float64: refused, never wrapped
        _quantise(np.array([1.7e308], np.float64))
    for w in (NAN, INF, -1.0):
        with pytest.raises(SecAggError, match="weight"):
            check_weight(SecAggConfig("exp-h", 0, ("a", "b"), threshold=2), w)


# --- uploads: header cap and weights a network can take -------------------------------------------------
def _blob_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def test_a_huge_safetensors_header_is_refused_before_parsing():
    meta = b'{"__metadata__":{"x":"' + b"a" * (2 << 20) + b'"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(tensors.TensorsError, match=r"header is \d+ bytes; the limit is 1048576"):
        tensors.loads(_blob_with_header(meta) + b"\0\0\0\0")
    # the cap reads the length field only: a 50 MB claim over a 20-byte blob is refused the same way
    with pytest.raises(tensors.TensorsError, match="header is 52428800 bytes"):
        tensors.loads(struct.pack("<Q", 50 << 20) + b"{}" * 6)
    # a real UNet's state dict is far below the cap and still loads
    blob = tensors.dumps(build_network(voxgrid.unet_plan(["background", "fg"])).state_dict())
    assert int.from_bytes(blob[:8], "little") < 64 << 10 and tensors.loads(blob)


@pytest.mark.parametrize("value,dtype", [(NAN, torch.float32), (INF, torch.float16), (-INF, torch.bfloat16),
                                         (1e200, torch.float64)])
def test_check_finite_refuses_non_finite_weights_by_name(value, dtype):
    state = {"conv.weight": torch.zeros(3, dtype=dtype), "norm.running_mean": torch.tensor([0.0, value], dtype=dtype)}
    with pytest.raises(tensors.TensorsError, match=r"'norm\.running_mean'.*non-finite"):
        tensors.check_finite(state)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.float8_e5m2])
def test_check_finite_refuses_dtypes_a_network_cannot_take(dtype):
    with pytest.raises(tensors.TensorsError, match=r"'w': dtype"):
        tensors.check_finite({"w": torch.zeros(2).to(dtype)})


def test_check_finite_accepts_real_weights_with_integer_counters():
    state = build_network(voxgrid.unet_plan(["background", "fg"])).state_dict()
    state["norm.num_batches_tracked"] = torch.tensor(3)  # BatchNorm's int64 counter
    tensors.check_finite(state)
    tensors.check_finite({k: v.half() if v.is_floating_point() else v for k, v in state.items()})


# --- DP-SGD: one patient's non-finite gradient ----------------------------------------------------------
DPSGD = {"mechanism": "dp_sgd", "noise_multiplier": 1e-9, "max_grad_norm": 1e-3, "sample_rate": 1.0, "delta": 1e-5}
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=1, patch_size=(16, 16, 16), amp=False)


def _volume(seed: int, patient: str, poison: float | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.randn(1, 16, 16, 16, generator=g)
    label = torch.zeros(1, 16, 16, 16)
    image[:, 4:10, 4:10, 4:10] += 1.0
    label[:, 4:10, 4:10, 4:10] = 1.0
    if poison is not None:
        image *= poison
    return {"image": MetaTensor(image), "label": MetaTensor(label), "patient": patient}


@pytest.mark.parametrize("poison", [NAN, INF])
def test_dp_sgd_zeroes_one_patients_non_finite_gradient_and_stays_within_the_clip(poison, caplog):
    """SGD, lr 1, every patient every step, almost no noise: the weights move by at most max_grad_norm
    even when one patient's volume makes its gradient NaN/inf (that patient then counts as zero)."""
    clip_norm = DPSGD["max_grad_norm"]
    plan = voxgrid.unet_plan(["background", "pancreas"], **TINY, privacy=DPSGD,
                             optimizer={"_target_": "SGD", "lr": 1.0}, local_epochs=1, steps_per_epoch=1)
    torch.manual_seed(0)
    net = build_network(plan)
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    data = [_volume(0, "p0"), _volume(1, "p1"), _volume(2, "p2", poison=poison)]
    Trainer(torch.device("cpu")).train(plan, net, data, seed=0, present={1})
    moved = math.sqrt(sum(float((p.detach() - start[k]).pow(2).sum()) for k, p in net.named_parameters()))
    assert math.isfinite(moved) and 0.1 * clip_norm < moved <= clip_norm * (1 + 1e-4)
