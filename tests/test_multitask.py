"""The partial-annotation multi-organ setup: a shared body aggregated by the strategy, a task head
kept at each site (``plan.local.keep_local = ["head"]``, ``plan.local.head`` its name prefixes),
and local fine-tuning after federation (``voxgrid.baselines.finetune``)."""

import pytest
import torch

import voxgrid
from voxgrid.baselines import finetune, finetune_plan
from voxgrid.nodes.worker.local_state import LocalState
from voxgrid.nodes.worker.objective import freeze_except
from voxgrid.nodes.worker.training import PreparedData, Trainer, run_job
from voxgrid.plan import PlanError, build_network, initial_weights, local_keys
from voxgrid.pointers import DatasetPointer
from voxgrid.tensors import digest, dumps, loads
from voxgrid.wire import DatasetInfo, JobStatus, Metrics, WeightsRef
from cubes import cube_volume  # test support: tests/cubes.py

LABELS = ["background", "pancreas", "tumor"]
TINY = dict(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 16, 16), amp=False)
HEAD = ["model.2"]  # MONAI UNet's last up-sampling block: the layer that maps features to classes


def _plan(**kw):
    return voxgrid.unet_plan(LABELS, **{**TINY, "local_epochs": 1, "samples_per_volume": 1, **kw})




DATA = PreparedData({"train": [cube_volume(0), cube_volume(1)], "val": [cube_volume(2)], "test": [cube_volume(3)]}, {1})


def test_head_keys_are_named_by_prefix_and_checked():
    plan = _plan().with_local(keep_local=["head"], head=HEAD)
    keys = set(initial_weights(plan))
    head = local_keys(plan)
    assert head == {k for k in keys if k.startswith("model.2.")} and head and head != keys
    with pytest.raises(PlanError, match="names no parameter prefix"):
        _plan().with_local(keep_local=["head"])
    with pytest.raises(PlanError, match="'decoder' names no parameter"):
        local_keys(_plan().with_local(keep_local=["head"], head=["decoder"]))
    with pytest.raises(PlanError, match="'model.2x' names no parameter"):  # a prefix of names, not of text
        local_keys(_plan().with_local(keep_local=["head"], head=["model.2x"]))
    assert local_keys(_plan().with_local(keep_local=["head"], head=["model.2."])) == head  # a trailing dot is fine


def test_each_site_keeps_its_head_and_releases_only_the_body():
    plan = _plan().with_local(keep_local=["head"], head=HEAD)
    head = local_keys(plan)
    trainer, store, g = Trainer(torch.device("cpu")), LocalState(), initial_weights(plan)
    _, delta = run_job(trainer, plan, "train", DATA, g, split="val", evaluate=False, seed=0, local_state=store,
                       job_key=("mt-1", "site-a", 0))
    assert all(torch.count_nonzero(delta[k]) == 0 for k in head)  # the head never leaves the site
    assert any(torch.count_nonzero(delta[k]) > 0 for k in delta if k not in head)  # the body does
    kept = store.get("mt-1", "site-a", 0, inclusive=True)
    assert set(kept) == head and any(kept[k].ne(g[k]).any() for k in head)
    # FedAvg leaves the global head as it was: only zeros were averaged into it
    new = voxgrid.FedAvg().aggregate(g, [voxgrid.strategies.ClientUpdate("n", "site-a", delta, 2)])
    assert all(torch.equal(new[k], g[k]) for k in head)
    # evaluating the global model, the site uses its own head (a poisoned global head changes nothing)
    poisoned = {k: (torch.full_like(v, 5.0) if k in head else v) for k, v in new.items()}
    m_own, _ = run_job(trainer, plan, "evaluate", DATA, poisoned, split="test", evaluate=False, seed=0,
                       local_state=store, job_key=("mt-1", "site-a", 0))
    m_ref, _ = run_job(trainer, _plan(), "evaluate", DATA, new | kept, split="test", evaluate=False, seed=0)
    assert m_own.dice == m_ref.dice


def test_train_only_the_head_leaves_the_body_untouched():
    plan = _plan().with_local(train_only=HEAD)
    g = initial_weights(plan)
    trainer = Trainer(torch.device("cpu"))
    m, delta = run_job(trainer, plan, "train", DATA, g, split="val", evaluate=False, seed=0)
    assert m.steps == 1
    head = {k for k in g if k.startswith("model.2.")}
    assert all(torch.count_nonzero(delta[k]) == 0 for k in g if k not in head)
    assert all(torch.count_nonzero(delta[k]) > 0 for k in head if k.endswith("weight"))
    net = trainer.network(plan, g)  # the warm network is trainable again for the next job
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(PlanError, match="plan.local.train_only: 'nope' names no parameter"):
        _plan().with_local(train_only=["nope"])  # refused when the plan is made, not at the node
    with pytest.raises(PlanError, match="plan.local.train_only: 'nope'"):
        freeze_except(build_network(plan), ["nope"])
    assert freeze_except(build_network(plan), []) == []


def test_finetune_plan():
    plan = _plan().with_local(keep_local=["head"], head=HEAD, proximal_mu=0.1)
    ft = finetune_plan(plan, 3, "head")
    assert (ft.local_epochs, ft.local.train_only, ft.local.proximal_mu, ft.local.keep_local) == \
           (3, tuple(HEAD), 0.0, ("head",))
    assert finetune_plan(plan, 2).local.train_only == ()
    with pytest.raises(ValueError, match="plan.local.head"):
        finetune_plan(_plan(), 1, "head")
    with pytest.raises(ValueError, match="epochs"):
        finetune_plan(plan, 0)
    with pytest.raises(ValueError, match="part"):
        finetune_plan(plan, 1, "body")


class StepNode:
    """Training adds ``step`` to w and reports val Dice ``val``; evaluate scores 1 - |w - 6| / 10."""

    def __init__(self, step, val):
        self.step, self.val, self.blobs, self.jobs, self.updates = step, val, {}, [], {}

    def put_weights(self, blob):
        self.blobs[digest(blob)] = blob
        return WeightsRef(weights_id=digest(blob), bytes=len(blob))

    def submit(self, req):
        self.jobs.append(req)
        w, job_id = loads(self.blobs[req.weights_id])["w"].item(), f"j{len(self.jobs)}"
        if req.kind == "train":
            self.updates[job_id] = dumps({"w": torch.tensor([float(self.step)])})
            m = Metrics(loss=1.0, dice={"pancreas": self.val}, mean_dice=self.val, samples=1)
        else:
            m = Metrics(dice={"pancreas": 1 - abs(w - 6) / 10, "tumor": None}, samples=1)
        return JobStatus(job_id=job_id, kind=req.kind, experiment_id=req.experiment_id, round=req.round,
                         dataset=req.dataset, state="done", metrics=m, has_update=req.kind == "train")

    def update(self, job_id):
        return self.updates[job_id]


def test_finetune_after_federation_gives_one_model_per_site():
    nodes = {"site-a": StepNode(1, 0.4), "site-b": StepNode(5, 0.7)}
    ptrs = [DatasetPointer(f"node-{s}", f"https://{s}", DatasetInfo(name=s, tags=["#ct"], volumes=4,
                                                                     label_names=["background", "pancreas"],
                                                                     splits={"train": 2, "val": 1, "test": 1}), n)
            for s, n in nodes.items()]
    plan = _plan().with_local(keep_local=["head"], head=HEAD)
    exp = voxgrid.Experiment(plan, ptrs, rounds=2, evaluate=False, initial={"w": torch.tensor([0.0])})
    exp.run(progress=False)
    assert exp.global_weights["w"].item() == 6.0  # 0 -> 3 -> 6 (equal samples)
    models = finetune(exp, epochs=3, part="head")
    # each site trains the final global model alone: 6 + 1 and 6 + 5; nothing is averaged
    assert [(m.name, m.site, m.weights["w"].item(), m.score, m.round, m.experiment_id) for m in models] == \
           [("FL+FT site-a", "site-a", 7.0, 0.4, 2, exp.experiment_id),
            ("FL+FT site-b", "site-b", 11.0, 0.7, 2, exp.experiment_id)]
    assert exp.global_weights["w"].item() == 6.0 and len(exp.history) == 2
    for n in nodes.values():
        job = n.jobs[-1]  # the fine-tuning job: the experiment's next round, under its id, head only
        assert (job.kind, job.round, job.experiment_id, job.evaluate) == ("train", 2, exp.experiment_id, True)
        assert job.plan["local_epochs"] == 3 and job.plan["local"]["train_only"] == HEAD
        assert job.plan["local"]["keep_local"] == ["head"]  # the site starts from, and keeps, its own head
    table = voxgrid.cross_site_evaluation(models, ptrs)
    assert table.dice["FL+FT site-a"]["site-b"]["pancreas"] == pytest.approx(0.9)  # w = 7
    assert {j.round for n in nodes.values() for j in n.jobs if j.kind == "evaluate"} == {2}
