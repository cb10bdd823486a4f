"""Strategies against hand-computed values on tiny tensors; strategy state through checkpoints."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import voxgrid
from voxgrid import tensors
from voxgrid.strategies import (DWA, STRATEGIES, ClientUpdate, FedAdam, FedAvg, FedAvgDice, FedProx, FedYogi, Median,
                                Strategy, StrategyState, TrimmedMean, apply_delta, from_config, weighted_delta)


def _u(node, delta, samples):
    return ClientUpdate(node=node, dataset="d", delta=delta, samples=samples)


def test_fedavg_weights_by_samples_hand_computed():
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5, dtype=torch.int64)}
    ups = [_u("a", {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(1.0)}, 1),
           _u("b", {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3.0)}, 3)]
    new = FedAvg().aggregate(g, ups)
    # (1*[1,0] + 3*[0,4]) / 4 = [0.25, 3]
    assert torch.allclose(new["w"], torch.tensor([1.25, 5.0]))
    assert new["w"].dtype == torch.float32
    assert new["n"].dtype == torch.int64 and int(new["n"]) == 8  # 5 + (1 + 9)/4 = 7.5, rounded half to even


def test_fedavg_zero_samples_falls_back_to_equal_weights():
    g = {"w": torch.zeros(2)}
    ups = [_u("a", {"w": torch.ones(2)}, 0), _u("b", {"w": 3 * torch.ones(2)}, 0)]
    assert torch.allclose(FedAvg().aggregate(g, ups)["w"], torch.full((2,), 2.0))


def test_weighted_delta_refuses_empty_and_nonpositive():
    with pytest.raises(ValueError, match="zero updates"):
        weighted_delta([], [])
    with pytest.raises(ValueError, match="positive"):
        weighted_delta([_u("a", {"w": torch.ones(1)}, 1)], [0.0])


def test_apply_delta_keeps_dtypes():
    g = {"h": torch.ones(2, dtype=torch.float16)}
    out = apply_delta(g, {"h": torch.full((2,), 0.5, dtype=torch.float64)})
    assert out["h"].dtype == torch.float16 and torch.allclose(out["h"].float(), torch.full((2,), 1.5))


def test_tensors_roundtrip_and_errors():
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    blob = tensors.dumps(state, metadata={"k": "v"})
    back = tensors.loads(blob)
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["b"], state["b"])
    assert len(tensors.digest(blob)) == 64
    with pytest.raises(tensors.TensorsError, match="not a valid safetensors"):
        tensors.loads(b"\x80\x04K\x01.")  # a pickle, refused
    with pytest.raises(tensors.TensorsError, match="missing"):
        tensors.check_compatible(state, {"a": state["a"]})
    with pytest.raises(tensors.TensorsError, match="shape"):
        tensors.check_compatible(state, {"a": torch.zeros(4, 3), "b": state["b"]})


# --- the strategies of issue 6: hand-computed values on tiny tensors ------------------------------
def _um(node, delta, samples=1, **metrics):
    return ClientUpdate(node=node, dataset="d", delta=delta, samples=samples, metrics=metrics)


def _w(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_fedavg_dice_weights_by_validation_dice():
    g = _w(0.0, 0.0)
    ups = [_um("a", _w(1.0, 0.0), mean_dice=0.75), _um("b", _w(0.0, 1.0), mean_dice=0.25)]
    # weights 0.75 : 0.25 -> [0.75, 0.25]; samples (1 each) play no part
    assert torch.allclose(FedAvgDice().aggregate(g, ups)["w"], torch.tensor([0.75, 0.25]))
    # a site without a Dice gets the mean of the others, (0.75 + 0.25) / 2 = 0.5; weights sum 1.5:
    # [0.75 / 1.5, 0.25 / 1.5] = [0.5, 1/6]
    ups3 = ups + [_um("c", _w(0.0, 0.0), mean_dice=None)]
    assert torch.allclose(FedAvgDice().aggregate(g, ups3)["w"], torch.tensor([0.5, 1 / 6]))
    # every Dice 0 (an early round): no evidence to prefer a site, equal weights
    zeros = [_um("a", _w(1.0, 0.0), mean_dice=0.0), _um("b", _w(0.0, 1.0), mean_dice=0.0)]
    assert torch.allclose(FedAvgDice().aggregate(g, zeros)["w"], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="evaluate=True"):
        FedAvgDice().aggregate(g, [_um("a", _w(1.0, 0.0)), _um("b", _w(0.0, 1.0), mean_dice=float("nan"))])


LABELS = ["background", "pancreas", "tumor"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16))


def test_fedprox_aggregates_like_fedavg_and_sets_mu_in_the_plan():
    g = _w(1.0, 2.0)
    ups = [_um("a", _w(1.0, 0.0), samples=1), _um("b", _w(0.0, 4.0), samples=3)]
    # (1*[1,0] + 3*[0,4]) / 4 = [0.25, 3]
    assert torch.allclose(FedProx(mu=0.1).aggregate(g, ups)["w"], torch.tensor([1.25, 5.0]))
    plan = voxgrid.unet_plan(LABELS, **TINY)
    prox = FedProx(mu=0.1).configure_plan(plan)
    assert plan.local.proximal_mu == 0.0 and prox.local.proximal_mu == 0.1
    assert prox.content_hash != plan.content_hash
    assert FedProx(mu=0.1).configure_plan(prox) == prox  # idempotent: resume applies it again
    with pytest.raises(ValueError, match="conflicts"):
        FedProx(mu=0.2).configure_plan(prox)
    with pytest.raises(ValueError, match="positive"):
        FedProx(mu=0)


def test_plan_local_settings_are_validated_and_hashed():
    plan = voxgrid.unet_plan(LABELS, **TINY, local={"proximal_mu": 0.5})
    assert voxgrid.Plan.from_json(plan.to_json()) == plan
    with pytest.raises(voxgrid.PlanError, match=r"plan\.local\.mu: unknown field; known: proximal_mu"):
        voxgrid.unet_plan(LABELS, **TINY, local={"mu": 0.5})
    with pytest.raises(voxgrid.PlanError, match=r"plan\.local\.proximal_mu: .*greater than or equal to 0"):
        plan.with_local(proximal_mu=-1.0)
    with pytest.raises(voxgrid.PlanError, match=r"plan\.extra: unknown field; known: name, network"):
        voxgrid.unet_plan(LABELS, **TINY, extra=1)


def _fedopt_updates(delta):
    # two sites, one sample each, deltas [2*delta] and [0]: the averaged delta is `delta`;
    # an int64 buffer (deltas 1 and 3, mean 2) and a batch-norm statistic (deltas 1 and 0, mean 0.5)
    return [_um("a", {"w": torch.tensor([2 * delta]), "n": torch.tensor(1.0), "bn.running_mean": torch.tensor([1.0])}),
            _um("b", {"w": torch.tensor([0.0]), "n": torch.tensor(3.0), "bn.running_mean": torch.tensor([0.0])})]


G0 = {"w": torch.tensor([0.0]), "n": torch.tensor(5, dtype=torch.int64), "bn.running_mean": torch.tensor([0.0])}
HP = dict(lr=1.0, beta1=0.5, beta2=0.5, tau=0.5)  # v starts at tau^2 = 0.25


def test_fedadam_hand_computed_two_rounds_and_state_roundtrip():
    s = FedAdam(**HP)
    # round 1, Delta = 0.5: m = 0.5*0 + 0.5*0.5 = 0.25; v = 0.5*0.25 + 0.5*0.25 = 0.25;
    # step = 1 * 0.25 / (sqrt(0.25) + 0.5) = 0.25
    g1 = s.aggregate(G0, _fedopt_updates(0.5))
    assert torch.allclose(g1["w"], torch.tensor([0.25]))
    assert int(g1["n"]) == 7 and torch.allclose(g1["bn.running_mean"], torch.tensor([0.5]))  # plain averages
    state = s.state_dict()
    assert sorted(state.tensors) == ["m/w", "v/w"] and state.meta == {}
    # the state survives safetensors (what a checkpoint writes), into a fresh strategy
    fresh = FedAdam(**HP)
    fresh.load_state_dict(StrategyState(tensors=tensors.loads(tensors.dumps(state.tensors))))
    # round 2, Delta = 0.5: m = 0.5*0.25 + 0.5*0.5 = 0.375; v = 0.5*0.25 + 0.5*0.25 = 0.25;
    # step = 0.375 / (0.5 + 0.5) = 0.375 -> w = 0.25 + 0.375 = 0.625
    for strat in (s, fresh):
        assert torch.allclose(strat.aggregate(g1, _fedopt_updates(0.5))["w"], torch.tensor([0.625]))
    with pytest.raises(ValueError, match="m/<param>"):
        FedAdam().load_state_dict(StrategyState(tensors={"x": torch.zeros(1)}))


def test_fedyogi_hand_computed_differs_from_adam_when_the_delta_jumps():
    yogi, adam = FedYogi(**HP), FedAdam(**HP)
    # round 1 (Delta = 0.5, Delta^2 = v = 0.25): sign(v - Delta^2) = 0 so Yogi's v stays 0.25, step 0.25 as Adam
    assert torch.allclose(yogi.aggregate(G0, _fedopt_updates(0.5))["w"], torch.tensor([0.25]))
    adam.aggregate(G0, _fedopt_updates(0.5))
    # round 2, Delta = 2: m = 0.5*0.25 + 0.5*2 = 1.125
    # Yogi: v = 0.25 - 0.5 * 4 * sign(0.25 - 4) = 2.25, step = 1.125 / (1.5 + 0.5) = 0.5625
    # Adam: v = 0.5*0.25 + 0.5*4 = 2.125, step = 1.125 / (sqrt(2.125) + 0.5)
    g = {**G0, "w": torch.tensor([0.25])}
    assert torch.allclose(yogi.aggregate(g, _fedopt_updates(2.0))["w"], torch.tensor([0.25 + 0.5625]))
    assert torch.allclose(adam.aggregate(g, _fedopt_updates(2.0))["w"],
                          torch.tensor([0.25 + 1.125 / (math.sqrt(2.125) + 0.5)]))


def test_dwa_hand_computed_from_loss_ratios():
    # T = 1 / (2 ln 2) makes exp(rho / T) = 4**rho: rho 0.5 -> 2, rho 1 -> 4
    s = DWA(T=1 / (2 * math.log(2)), xi=1.5)
    g = _w(0.0)

    def ups(loss_a, loss_b):
        return [_um("a", _w(1.0), loss=loss_a), _um("b", _w(0.5), loss=loss_b)]

    # rounds 0 and 1: no site has two previous losses, rho = 1 for both: lambda = 1.5 / 2 = 0.75 each;
    # step = 0.75 * 1 + 0.75 * 0.5 = 1.125
    assert torch.allclose(s.aggregate(g, ups(1.0, 1.0))["w"], torch.tensor([1.125]))
    assert torch.allclose(s.aggregate(g, ups(0.5, 1.0))["w"], torch.tensor([1.125]))
    # round 2: rho_a = 0.5 / 1.0 = 0.5 -> 2, rho_b = 1.0 / 1.0 = 1 -> 4;
    # lambda_a = 1.5 * 2/6 = 0.5, lambda_b = 1.5 * 4/6 = 1.0 (sum xi); step = 0.5 * 1 + 1.0 * 0.5 = 1.0
    assert s.weights(ups(9.0, 9.0)) == pytest.approx([0.5, 1.0])  # this round's losses play no part yet
    saved = json.loads(json.dumps(s.state_dict().meta))  # JSON is all a checkpoint keeps
    assert saved == {"losses": {"d@a": [1.0, 0.5], "d@b": [1.0, 1.0]}}
    fresh = DWA(T=1 / (2 * math.log(2)), xi=1.5)
    fresh.load_state_dict(StrategyState(meta=saved))
    for strat in (s, fresh):
        assert torch.allclose(strat.aggregate(g, ups(0.25, 1.0))["w"], torch.tensor([1.0]))
    # a site that reports no loss keeps its history; a new site starts at rho = 1
    s.aggregate(g, [_um("a", _w(1.0), loss=None)])
    assert s.state_dict().meta["losses"]["d@a"] == [0.5, 0.25]


def test_dwa_the_issues_formula_with_the_benchmarks_T_and_xi():
    # lambda_k = xi * exp(rho_k / T) / sum_i exp(rho_i / T), T = 2, xi = 2, rho = L_{r-1} / L_{r-2}
    s = DWA(T=2.0, xi=2.0)
    losses = {"a": (1.0, 0.5), "b": (2.0, 2.0), "c": (1.0, 0.8)}  # rho 0.5, 1.0, 0.8
    for r in range(2):
        s.aggregate(_w(0.0), [_um(n, _w(0.0), loss=v[r]) for n, v in losses.items()])
    ups = [_um("a", _w(1.0)), _um("b", _w(-1.0)), _um("c", _w(0.5))]
    # exp(0.25), exp(0.5), exp(0.4) = 1.2840, 1.6487, 1.4918 (sum 4.4246): lambda 0.5804, 0.7453, 0.6743
    assert s.weights(ups) == pytest.approx([0.580407, 0.745257, 0.674336], abs=1e-6)
    assert sum(s.weights(ups)) == pytest.approx(2.0)
    # the step is sum_k lambda_k delta_k: 0.5804 - 0.7453 + 0.6743 / 2 = 0.1723
    assert s.aggregate(_w(0.0), ups)["w"].item() == pytest.approx(0.172318, abs=1e-5)


def test_median_and_trimmed_mean_ignore_an_outlier():
    g = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(0, dtype=torch.int64)}

    def u(node, a, b, n=0.0):
        return _um(node, {"w": torch.tensor([a, b]), "n": torch.tensor(n)}, samples=1000 if node == "x" else 1)

    three = [u("a", 1.0, -1.0, 1.0), u("b", 10.0, 0.0, 2.0), u("c", 2.0, 5.0, 9.0)]
    # sorted per coordinate: [1, 2, 10] -> 2 and [-1, 0, 5] -> 0; buffer [1, 2, 9] -> 2
    out = Median().aggregate(g, three)
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0])) and int(out["n"]) == 2
    # four values: mean of the two middle ones, [1, 2, 3, 10] -> 2.5 and [-1, 0, 5, 100] -> 2.5;
    # samples (1000 at x) do not buy influence
    four = three + [u("x", 3.0, 100.0)]
    assert torch.equal(Median().aggregate(g, four)["w"], torch.tensor([2.5, 2.5]))
    # beta 0.25 of 4 trims floor(1) from each end: [2, 3] -> 2.5 and [0, 5] -> 2.5
    assert torch.equal(TrimmedMean(beta=0.25).aggregate(g, four)["w"], torch.tensor([2.5, 2.5]))
    five = four + [u("y", -100.0, 1.0)]
    # beta 0.2 of 5 trims 1: [1, 2, 3] -> 2 and [0, 1, 5] -> 2; beta 0.1 trims 0: plain means
    assert torch.allclose(TrimmedMean(beta=0.2).aggregate(g, five)["w"], torch.tensor([2.0, 2.0]))
    assert torch.allclose(TrimmedMean(beta=0.1).aggregate(g, five)["w"], torch.tensor([-84 / 5, 105 / 5]))
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        TrimmedMean(beta=0.5)


def test_every_strategy_rebuilds_from_its_json_config():
    for cls in STRATEGIES.values():
        s = cls()
        again = from_config(json.loads(json.dumps(s.config())))
        assert type(again) is cls and again.config() == s.config()
    assert from_config({"name": "fedadam", "lr": 0.5}).lr == 0.5
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        from_config({"name": "nope"})
    with pytest.raises(ValueError, match="bad parameters"):
        from_config({"name": "fedprox", "gamma": 1})
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict(StrategyState(meta={"x": 1}))  # the base class's default: no state
    with pytest.raises(TypeError, match="abstract"):
        Strategy()  # a rule must say how it aggregates


def test_checkpoint_carries_strategy_state_and_resume_restores_it(tmp_path):
    ptrs = [SimpleNamespace(node="a", url="https://a", name="d"), SimpleNamespace(node="b", url="https://b", name="d")]
    plan = voxgrid.unet_plan(LABELS, **TINY)
    exp = voxgrid.Experiment(plan, ptrs, strategy=FedAdam(**HP), checkpoint_dir=tmp_path)
    exp.strategy.aggregate(G0, _fedopt_updates(0.5))  # as a round would
    exp.save_checkpoint(tmp_path)
    saved = json.loads((tmp_path / "experiment.json").read_text())
    assert saved["strategy"] == {"name": "fedadam", **HP}
    assert saved["strategy_state"] == {"meta": {}, "tensors": "strategy-0000.safetensors"}
    back = voxgrid.Experiment.resume(tmp_path, ptrs)  # strategy rebuilt from the checkpoint
    assert isinstance(back.strategy, FedAdam) and back.strategy.config() == exp.strategy.config()
    assert torch.equal(back.strategy.state_dict().tensors["m/w"], torch.tensor([0.25]))
    with pytest.raises(ValueError, match="checkpoint was made with strategy"):
        voxgrid.Experiment.resume(tmp_path, ptrs, strategy=FedAdam())
    # FedProx: the experiment runs the configured plan, and resume configures it again, unchanged
    prox = voxgrid.Experiment(plan, ptrs, strategy=FedProx(mu=0.3), checkpoint_dir=tmp_path / "p")
    assert prox.plan.local.proximal_mu == 0.3
    prox.save_checkpoint(tmp_path / "p")
    assert voxgrid.Experiment.resume(tmp_path / "p", ptrs).plan == prox.plan
