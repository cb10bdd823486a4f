"""Local baselines, model selection, cross-site evaluation and FedBN, against hand-computed values.

Scientist-side pieces run against in-process fake nodes (``FakeNode``): training adds a fixed
per-site step to the weight ``w``, and validation scores are scripted, so every selection is
computable by hand. FedBN's node side runs the real Trainer on tiny volumes.
"""

import json

import pytest
import torch

import voxgrid
from voxgrid.nodes.worker.local_state import LocalState
from voxgrid.nodes.worker.training import PreparedData, Trainer, run_job
from voxgrid.plan import initial_weights, local_keys
from voxgrid.pointers import DatasetPointer
from voxgrid.selection import ModelSelection
from voxgrid.strategies import ClientUpdate
from voxgrid.tensors import digest, dumps, loads
from voxgrid.wire import DatasetInfo, JobStatus, Metrics, WeightsRef
from cubes import cube_volume  # test support: tests/cubes.py

LABELS = ["background", "pancreas", "tumor"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16), amp=False)


def _bn_plan(**kw):
    data = voxgrid.unet_plan(LABELS, **{**TINY, **kw}).model_dump(mode="json")
    data["network"]["norm"] = "batch"
    return voxgrid.Plan(**data)


# --- FedBN, scientist side --------------------------------------------------------------------------
def test_local_keys_are_the_normalisation_layers_found_by_type():
    plan = _bn_plan().with_local(keep_local=["norm"])
    keys = local_keys(plan)
    # tiny UNet with BN (no residual units): 2 BatchNorm3d layers (the output conv has none)
    # x (weight, bias, running_mean, running_var, num_batches_tracked)
    assert len(keys) == 10 and all(".adn.N." in k for k in keys)
    assert local_keys(_bn_plan()) == set()  # keep_local empty
    assert local_keys(voxgrid.unet_plan(LABELS, **TINY).with_local(keep_local=["norm"])) == set()  # instance norm: no state
    with pytest.raises(voxgrid.PlanError, match="keep_local"):
        _bn_plan().with_local(keep_local=["conv"])


def test_fedbn_averages_everything_but_the_normalisation_layers_hand_computed():
    strategy = voxgrid.FedBN()
    plan = strategy.configure_plan(_bn_plan())
    assert plan.local.keep_local == ("norm",) and strategy.configure_plan(plan) == plan  # idempotent
    g = initial_weights(plan)
    bn = local_keys(plan)

    def upd(site, value, samples):
        return ClientUpdate("n-" + site, site, {k: torch.full(v.shape, value) for k, v in g.items()}, samples, {})

    out = strategy.aggregate(g, [upd("a", 1.0, 1), upd("b", 4.0, 3)])
    for k, v in g.items():
        if k in bn:  # never aggregated, even though the deltas were not zero
            assert torch.equal(out[k], v) and out[k].dtype == v.dtype
        else:  # (1 * 1 + 4 * 3) / 4 = 3.25
            assert torch.allclose(out[k], v + 3.25)
    with pytest.raises(ValueError, match="no normalisation layer"):
        voxgrid.FedBN().configure_plan(voxgrid.unet_plan(LABELS, **TINY))


# --- FedBN, node side -------------------------------------------------------------------------------
def test_local_state_latest_round_before_or_at_and_durable(tmp_path):
    st = LocalState(tmp_path)
    st.put("exp-1", "site-a", 0, {"x": torch.tensor([0.0])})
    st.put("exp-1", "site-a", 2, {"x": torch.tensor([2.0])})
    assert st.get("exp-1", "site-a", 0, inclusive=False) is None  # a train job of round 0 starts from the global
    assert st.get("exp-1", "site-a", 2, inclusive=False)["x"].item() == 0.0  # train round 2: from round 0's
    assert st.get("exp-1", "site-a", 2, inclusive=True)["x"].item() == 2.0  # evaluate round 2: round 2's
    assert st.get("exp-1", "site-b", 5, inclusive=True) is None and st.get("exp-2", "site-a", 5, inclusive=True) is None
    again = LocalState(tmp_path)  # a restarted worker reads them back from disk
    assert again.get("exp-1", "site-a", 9, inclusive=True)["x"].item() == 2.0
    with pytest.raises(ValueError, match="invalid"):
        st.put("../x", "site-a", 0, {})



def test_node_keeps_its_normalisation_state_and_releases_a_zero_delta_for_it():
    plan = voxgrid.FedBN().configure_plan(_bn_plan(local_epochs=1, samples_per_volume=1))
    bn = local_keys(plan)
    data = PreparedData({"train": [cube_volume(0), cube_volume(1)], "val": [cube_volume(2)], "test": [cube_volume(3)]}, {1})
    trainer, store, g = Trainer(torch.device("cpu")), LocalState(), initial_weights(plan)
    _, delta = run_job(trainer, plan, "train", data, g, split="val", evaluate=False, seed=0, local_state=store,
                       job_key=("fedbn-1", "site-a", 0))
    assert all(torch.count_nonzero(delta[k]) == 0 for k in bn)  # nothing of the site's BN leaves
    assert any(torch.count_nonzero(delta[k]) > 0 for k in delta if k not in bn)
    kept = store.get("fedbn-1", "site-a", 0, inclusive=True)
    assert set(kept) == bn and any(kept[k].ne(g[k]).any() for k in bn if k.endswith("running_mean"))
    trained = {k: (g[k] + delta[k]).to(g[k].dtype) for k in g} | kept  # what the site's model really is
    # evaluate with the global weights' BN poisoned: the node uses its own copy, so scores match
    poisoned = {k: (torch.full_like(v, 1e3) if k.endswith("running_mean") else v) for k, v in trained.items()}
    m_own, _ = run_job(trainer, plan, "evaluate", data, poisoned, split="test", evaluate=False, seed=0,
                       local_state=store, job_key=("fedbn-1", "site-a", 0))
    m_ref, _ = run_job(trainer, _bn_plan(local_epochs=1, samples_per_volume=1), "evaluate", data, trained,
                       split="test", evaluate=False, seed=0)
    assert m_own.dice == m_ref.dice
    # another experiment id has no state: the (poisoned) global BN is used, and the scores differ
    m_other, _ = run_job(trainer, plan, "evaluate", data, poisoned, split="test", evaluate=False, seed=0,
                         local_state=store, job_key=("other-1", "site-a", 0))
    assert m_other.dice != m_own.dice
    with pytest.raises(ValueError, match="no local state"):
        run_job(trainer, plan, "evaluate", data, g, split="test", evaluate=False, seed=0)


# --- selection --------------------------------------------------------------------------------------
def _u(site, step, dice):
    return ClientUpdate("n", site, {"w": torch.tensor([float(step)])}, 1, {"mean_dice": dice})


def test_model_selection_hand_computed_and_state_roundtrip():
    sel = ModelSelection(voxgrid.unet_plan(LABELS, **TINY), "exp-1")
    sel.observe_local(0, {"w": torch.tensor([0.0])}, [_u("a", 1, 0.2), _u("b", 5, 0.6)])
    sel.observe_global(0, {"w": torch.tensor([3.0])}, {"a": 0.5, "b": None, "c": 0.7})  # mean of known: 0.6
    sel.observe_local(1, {"w": torch.tensor([3.0])}, [_u("a", 1, 0.5), _u("b", 5, 0.6), _u("c", 2, None)])
    sel.observe_global(1, {"w": torch.tensor([6.0])}, {"a": 0.6, "b": 0.6})  # 0.6: a tie keeps round 0
    assert (sel.best_global.round, sel.best_global.score, sel.best_global.weights["w"].item()) == (0, 0.6, 3.0)
    a, b = sel.best_local["a@n"], sel.best_local["b@n"]
    assert (a.round, a.score, a.weights["w"].item()) == (1, 0.5, 4.0)  # start 3 + step 1
    assert (b.round, b.score, b.weights["w"].item()) == (0, 0.6, 5.0)  # round 1 tied: kept round 0
    assert "c@n" not in sel.best_local  # never reported a validation score
    back = ModelSelection(sel.plan, "exp-1")
    st = sel.state()
    back.load(type(st)(tensors=loads(dumps(st.tensors)), meta=json.loads(json.dumps(st.meta))))
    assert [(m.name, m.round, m.score, m.weights["w"].item()) for m in back.models()] == \
           [(m.name, m.round, m.score, m.weights["w"].item()) for m in sel.models()]


# --- fake nodes: experiments, baselines, cross-site evaluation ---------------------------------------
class FakeNode:
    """Training adds ``step`` to w; its val Dice is scripted per round; an evaluate job scores
    pancreas = 1 - |w - target| / 10 and tumor = half that (None where the site lacks tumor)."""

    def __init__(self, step, val, target, tumor=True):
        self.step, self.val, self.target, self.tumor = step, val, target, tumor
        self.blobs, self.jobs, self.updates = {}, [], {}

    def put_weights(self, blob):
        self.blobs[digest(blob)] = blob
        return WeightsRef(weights_id=digest(blob), bytes=len(blob))

    def submit(self, req):
        self.jobs.append(req)
        w = loads(self.blobs[req.weights_id])["w"].item()
        job_id = f"j{len(self.jobs)}"
        if req.kind == "train":
            self.updates[job_id] = dumps({"w": torch.tensor([float(self.step)])})
            dice = self.val[req.round]
            m = Metrics(loss=1.0, dice={"pancreas": dice}, mean_dice=dice, samples=1)
        else:
            p = 1 - abs(w - self.target) / 10
            m = Metrics(dice={"pancreas": p, "tumor": p / 2 if self.tumor else None}, samples=1)
        return JobStatus(job_id=job_id, kind=req.kind, experiment_id=req.experiment_id, round=req.round,
                         dataset=req.dataset, state="done", metrics=m, has_update=req.kind == "train")

    def update(self, job_id):
        return self.updates[job_id]


def _pointers():
    nodes = {"site-a": FakeNode(1, [0.2, 0.5, 0.3], 6, tumor=False), "site-b": FakeNode(5, [0.6, 0.1, 0.6], 6)}
    labels = {"site-a": ["background", "pancreas"], "site-b": LABELS}
    return [DatasetPointer(f"node-{s}", f"https://{s}", DatasetInfo(name=s, tags=["#ct"], volumes=4, label_names=labels[s],
                                                                     splits={"train": 2, "val": 1, "test": 1}), n)
            for s, n in nodes.items()], nodes


W0 = {"w": torch.tensor([0.0])}


def test_experiment_select_keeps_fl_global_best_and_fl_local_and_resumes(tmp_path):
    ptrs, nodes = _pointers()
    exp = voxgrid.Experiment(voxgrid.unet_plan(LABELS, **TINY), ptrs, rounds=3, evaluate=False, select=True,
                             initial=W0, checkpoint_dir=tmp_path)
    exp.run(progress=False)
    # FedAvg, 1 sample each: w = 0 -> 3 -> 6 -> 9; global val score (both sites, target 6) 1 - |w - 6| / 10
    assert [r.sites[0].global_val_dice["pancreas"] for r in exp.history] == pytest.approx([0.7, 1.0, 0.7])
    best = exp.selection.best_global
    # its score: mean over sites of each site's mean over classes: (1.0 + (1.0 + 0.5) / 2) / 2
    assert (best.round, best.weights["w"].item(), best.score) == (1, 6.0, pytest.approx(0.875))
    a, b = exp.selection.best_local["site-a@node-site-a"], exp.selection.best_local["site-b@node-site-b"]
    assert (a.round, a.weights["w"].item()) == (1, 4.0)  # round 1 starts from 3, site a adds 1
    assert (b.round, b.weights["w"].item()) == (0, 5.0)  # round 0 (0.6) ties round 2: the earlier stays
    assert all(j.evaluate for n in nodes.values() for j in n.jobs if j.kind == "train")  # val Dice asked for
    assert {j.split for n in nodes.values() for j in n.jobs if j.kind == "evaluate"} == {"val"}  # evaluate=False: no test
    back = voxgrid.Experiment.resume(tmp_path, ptrs)
    assert [(m.name, m.round, m.weights["w"].item()) for m in back.selection.models()] == \
           [(m.name, m.round, m.weights["w"].item()) for m in exp.selection.models()]


def test_local_baselines_train_each_site_alone_and_cross_site_table(tmp_path):
    ptrs, nodes = _pointers()
    base = voxgrid.LocalBaselines(voxgrid.unet_plan(LABELS, **TINY), ptrs, rounds=3, initial=W0,
                                  checkpoint_dir=tmp_path)
    base.run()
    # nothing is averaged: site a walks 0 -> 1 -> 2 -> 3, site b 0 -> 5 -> 10 -> 15
    assert {s: w["w"].item() for s, w in base.weights.items()} == {"site-a": 3.0, "site-b": 15.0}
    assert all(j.kind == "train" for n in nodes.values() for j in n.jobs)  # one site: its val score is the train job's
    models = base.models()
    assert [(m.name, m.round, m.weights["w"].item(), m.site) for m in models] == \
           [("local site-a", 1, 2.0, "site-a"), ("local site-b", 0, 5.0, "site-b")]
    assert LocalBaselines_resumed_models(tmp_path, ptrs) == [(m.name, m.round) for m in models]

    table = voxgrid.cross_site_evaluation(models, ptrs)
    assert all(j.split == "test" for n in nodes.values() for j in n.jobs if j.kind == "evaluate")
    assert table.site_classes == {"site-a": ["pancreas"], "site-b": ["pancreas", "tumor"]}
    # local site-a (w = 2): pancreas 1 - 4/10 = 0.6 at both sites, tumor 0.3 at site b
    assert table.dice["local site-a"] == {"site-a": {"pancreas": 0.6, "tumor": None},
                                          "site-b": {"pancreas": 0.6, "tumor": 0.3}}
    # local site-b (w = 5): pancreas 0.9, tumor 0.45; average: pancreas 0.9, tumor 0.45, mean 0.675
    assert table.average("local site-b") == pytest.approx({"pancreas": 0.9, "tumor": 0.45, "mean": 0.675})
    frame = table.frame
    assert list(frame.index) == ["local site-a", "local site-b"]
    assert list(frame.columns) == [("site-a", "pancreas"), ("site-b", "pancreas"), ("site-b", "tumor"),
                                   ("average", "pancreas"), ("average", "tumor"), ("average", "mean")]
    assert frame.loc["local site-a", ("average", "mean")] == pytest.approx(0.45)
    text = table.render()
    assert "site-a" in text and "average" in text and "0.675" in text
    assert json.loads(json.dumps(table.to_dict()))["models"][1]["average"]["mean"] == pytest.approx(0.675)
    with pytest.raises(ValueError, match="unique"):
        voxgrid.cross_site_evaluation(models + models[:1], ptrs)


def LocalBaselines_resumed_models(folder, ptrs):
    return [(m.name, m.round) for m in voxgrid.LocalBaselines.resume(folder, ptrs).models()]


def test_dwa_does_not_extrapolate_batch_norm_statistics_with_xi():
    # xi = 2, equal lambdas (1 each): parameters step 2 * mean delta; a running variance that both sites
    # lowered from 1.0 by 0.9 becomes 0.1 (the average), not 1 - 1.8 = -0.8 (a NaN network)
    g = {"bn.weight": torch.tensor([1.0]), "bn.running_var": torch.tensor([1.0]),
         "bn.num_batches_tracked": torch.tensor(0)}
    d = {"bn.weight": torch.tensor([0.5]), "bn.running_var": torch.tensor([-0.9]), "bn.num_batches_tracked": torch.tensor(4)}
    out = voxgrid.DWA(T=2.0, xi=2.0).aggregate(g, [ClientUpdate("n", s, d, 1, {"loss": 1.0}) for s in "ab"])
    assert torch.allclose(out["bn.weight"], torch.tensor([2.0]))  # 1 + 2 * 0.5
    assert torch.allclose(out["bn.running_var"], torch.tensor([0.1]))
    assert int(out["bn.num_batches_tracked"]) == 4
