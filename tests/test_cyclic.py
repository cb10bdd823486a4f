"""The cyclic (sequential) strategy: the visiting order, the hop arithmetic, its refusals, and one
small round trip over real node processes (2 sites, 32^3): each hop is a normal release at its node."""

from __future__ import annotations

import json

import pytest
import torch

import voxgrid
from voxgrid.pointers import DatasetPointer
from voxgrid.secure import SecureAggregationRefused
from voxgrid.strategies import ClientUpdate, from_config
from voxgrid.wire import DatasetInfo

LABELS = ["background", "pancreas", "tumor"]


def _plan(**kw):
    return voxgrid.unet_plan(LABELS, patch_size=(32, 32, 32), channels=(8, 16, 32), strides=(2, 2),
                             num_res_units=0, local_epochs=1, **kw)


def _pointers(n=3):
    return [DatasetPointer(f"node-{c}", f"https://{c}", DatasetInfo(name=f"site-{c}", tags=["#ct"], volumes=4,
                                                                     label_names=LABELS,
                                                                     splits={"train": 2, "val": 1, "test": 1}), None)
            for c in "abcdefg"[:n]]


def test_fixed_order_visits_every_site_once_per_pass_in_the_pointers_order():
    assert voxgrid.Cyclic().visits(0, 3) == [0, 1, 2]
    assert voxgrid.Cyclic(passes=3).visits(7, 2) == [0, 1, 0, 1, 0, 1]


def test_shuffled_order_is_a_permutation_per_pass_reproducible_from_seed_and_round():
    c = voxgrid.Cyclic(order="shuffle", passes=2, seed=4)
    hops = c.visits(5, 6)
    assert sorted(hops[:6]) == list(range(6)) and sorted(hops[6:]) == list(range(6))
    assert c.visits(5, 6) == hops == voxgrid.Cyclic(order="shuffle", passes=2, seed=4).visits(5, 6)  # resume: same
    orders = {tuple(c.visits(r, 6)[:6]) for r in range(20)}
    assert len(orders) > 10  # rounds differ (20 draws of 720 permutations)
    assert voxgrid.Cyclic(order="shuffle", seed=5).visits(5, 6) != voxgrid.Cyclic(order="shuffle", seed=4).visits(5, 6)


def test_aggregate_applies_the_hops_in_order_and_keeps_dtypes():
    g = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    ups = [ClientUpdate("node-a", "a", {"w": torch.tensor([0.5, 0.0]), "n": torch.tensor(2.0)}, 4),
           ClientUpdate("node-b", "b", {"w": torch.tensor([0.0, -1.0]), "n": torch.tensor(1.0)}, 100)]
    new = voxgrid.Cyclic().aggregate(g, ups)
    assert torch.equal(new["w"], torch.tensor([1.5, 1.0]))  # the sum, not a weighted mean: samples do not count
    assert new["n"].dtype == torch.int64 and int(new["n"]) == 6
    with pytest.raises(ValueError, match="zero updates"):
        voxgrid.Cyclic().aggregate(g, [])


def test_config_round_trips_and_bad_parameters_are_refused():
    c = voxgrid.Cyclic(order="shuffle", passes=2, seed=3)
    assert c.config() == {"name": "cyclic", "order": "shuffle", "passes": 2, "seed": 3}
    back = from_config(c.config())
    assert isinstance(back, voxgrid.Cyclic) and back.visits(1, 4) == c.visits(1, 4)
    for bad in ({"order": "random"}, {"passes": 0}, {"passes": 1.5}, {"seed": "x"}):
        with pytest.raises(ValueError, match="Cyclic"):
            voxgrid.Cyclic(**bad)


def test_secure_aggregation_is_refused_saying_the_scientist_sees_every_site():
    with pytest.raises(SecureAggregationRefused, match="cyclic.*sees every site's output"):
        voxgrid.Experiment(_plan(), _pointers(), strategy=voxgrid.Cyclic(), secure_aggregation=True)
    # the other rules are unaffected: FedAvg still runs securely over the same pointers
    assert voxgrid.Experiment(_plan(), _pointers(), secure_aggregation=True).threshold == 2


def test_several_passes_refuse_state_kept_at_the_site_per_round():
    plan = _plan().with_local(keep_local=["norm"])
    with pytest.raises(ValueError, match="passes=2.*keep_local"):
        voxgrid.Experiment(plan, _pointers(), strategy=voxgrid.Cyclic(passes=2))
    assert voxgrid.Experiment(plan, _pointers(), strategy=voxgrid.Cyclic()).plan.local.keep_local == ("norm",)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    fed = LocalFederation.create(tmp_path_factory.mktemp("cyclic"), default_sites(2, (32, 32, 32), n_volumes=4),
                                 device="cpu")
    with fed:
        fed.start()
        yield fed


@pytest.mark.slow
def test_cyclic_over_real_nodes_checkpoints_resumes_and_each_hop_is_a_release(two_sites, tmp_path):
    grid = two_sites.connect()
    ptrs = sorted(grid.search("#ct"), key=lambda p: p.name)
    plan = _plan(privacy={"mechanism": "percentile", "fraction": 0.5})  # a filter each hop must pass
    exp = voxgrid.Experiment(plan, ptrs, strategy=voxgrid.Cyclic(passes=2), rounds=1, select=True, name="cyc",
                             checkpoint_dir=tmp_path / "ckpt")
    start = {k: v.clone() for k, v in exp.global_weights.items()}
    [r] = exp.run(progress=False)
    assert [s.ok for s in r.sites] == [True, True], r.sites
    assert all(s.test_dice and set(s.test_dice) == set(s.val_dice) for s in r.sites)  # scored at every site
    assert any(not torch.equal(start[k], exp.global_weights[k]) for k in start)
    # the hops ran one after another: the round's compute is every hop's, not the slowest site's
    assert r.compute_s == pytest.approx(sum(s.compute_s for s in r.sites))
    assert r.compute_s > max(s.compute_s for s in r.sites) > 0
    # each hop was a release at its node: two passes -> two ledger entries per site, through the filter
    for i in range(2):
        entries = [e for e in two_sites.node_client(i).ledger().entries if e.state == "released"]
        assert [e.mechanism for e in entries] == ["percentile", "percentile"], entries
    assert all(s.privacy and s.privacy["mechanism"] == "percentile" for s in r.sites)
    assert exp.selection.best_global is not None
    assert set(exp.selection.best_local) == {f"{p.name}@{p.node}" for p in ptrs}
    saved = json.loads((tmp_path / "ckpt" / "experiment.json").read_text())
    assert saved["strategy"] == {"name": "cyclic", "order": "fixed", "passes": 2, "seed": 0}
    back = voxgrid.Experiment.resume(tmp_path / "ckpt", ptrs)
    assert isinstance(back.strategy, voxgrid.Cyclic) and back.strategy.passes == 2 and len(back.history) == 1
    assert all(torch.equal(back.global_weights[k], exp.global_weights[k]) for k in start)

    # A budget binds each hop: site b affords one DP release, so its second visit is refused and the
    # round ends with site b dropped (min_nodes=1) and the model from site a's second visit.
    dp = _plan(privacy={"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 2.0, "delta": 1e-5})
    one = ptrs[1].client.privacy_estimate(ptrs[1].name, dp.privacy).epsilon_per_release
    two_sites.node_client(1).set_budget(ptrs[1].name, epsilon=1.5 * one, delta=1e-5)
    exp = voxgrid.Experiment(dp, ptrs, strategy=voxgrid.Cyclic(passes=2), rounds=1, evaluate=False, min_nodes=1,
                             name="cyc-dp")
    [r] = exp.run(progress=False)
    assert r.sites[0].ok and r.sites[0].privacy["epsilon"] == pytest.approx(one)
    assert not r.sites[1].ok and "budget" in r.sites[1].error.lower(), r.sites[1]
    grid.close()
