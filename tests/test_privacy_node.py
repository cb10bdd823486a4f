"""The node enforces privacy: spec checks, budgets, and no update leaves before its ledger entry.

Fast: a NodeService in-process with a stand-in executor (the real-process version, with a kill,
is in test_e2e_privacy.py).
"""

import pytest
import torch
from homes import node_home

from voxgrid import tensors, unet_plan
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.node import BudgetRefused, Caller, Forbidden, Invalid, NodeService
from voxgrid.privacy.accountant import GaussianEvent, epsilon
from voxgrid.wire import BudgetSet, EstimateRequest, JobRequest, Metrics

GAUSS = {"mechanism": "gaussian_update", "clip": 1.0, "noise_multiplier": 4.0, "delta": 1e-5}
ALICE, OWNER = Caller("alice", "scientist"), Caller("owner", "owner")


class StandInExecutor:
    def __init__(self):
        self.jobs = []

    def submit(self, job, weights):
        self.jobs.append(job["job_id"])

    def close(self):
        pass


@pytest.fixture
def node(tmp_path):
    service = NodeService(node_home(tmp_path), start_executor=False)
    service.executor = StandInExecutor()
    yield service
    service.close()


def request(service, privacy=None, round=0):
    plan = unet_plan(["background", "pancreas"], channels=(4, 8), strides=(2,), num_res_units=0, privacy=privacy)
    ref = service.put_weights(ALICE, tensors.dumps({"w": torch.zeros(3)}))
    return JobRequest(experiment_id="e", round=round, dataset="ct", plan=plan.model_dump(mode="json"),
                      plan_hash=plan.content_hash, weights_id=ref.weights_id)


def finish(service, job_id):
    service._on_event({"event": "done", "job_id": job_id, "update": tensors.dumps({"w": torch.ones(3)}),
                       "metrics": Metrics().model_dump(mode="json")})


def test_a_bad_privacy_spec_is_refused_naming_the_field(node):
    with pytest.raises(Invalid, match=r"plan\.privacy\.noise_multiplier") as e:
        node.submit(ALICE, request(node, {**GAUSS, "noise_multiplier": -1}))
    assert e.value.status == 422


def test_a_job_within_budget_is_released_with_a_receipt(node):
    node.set_budget(OWNER, BudgetSet(dataset="ct", scientist="alice", epsilon=10.0, delta=1e-5))
    # evaluate=False: the update alone (a validation Dice on a budgeted dataset costs its own noise)
    job = node.submit(ALICE, request(node, GAUSS).model_copy(update={"evaluate": False}))
    assert node.ledger.entry(job.job_id).state == "reserved" and node.executor.jobs == [job.job_id]
    assert node.job_status(ALICE, job.job_id).privacy is None  # nothing released yet
    finish(node, job.job_id)
    status = node.job_status(ALICE, job.job_id)
    assert status.state == "done" and status.privacy.dp and status.privacy.epsilon == pytest.approx(
        epsilon([GaussianEvent(2.0, 1.0, 1)], 1e-5))
    assert tensors.loads(node.job_update(ALICE, job.job_id))["w"].tolist() == [1.0, 1.0, 1.0]
    view = node.ledger_view(OWNER)
    assert [e.state for e in view.entries] == ["released"] and view.budgets[0].spent > 0
    with pytest.raises(Forbidden, match="role 'scientist'"):
        node.ledger_view(ALICE)


def test_a_job_past_the_budget_is_refused_and_recorded(node):
    single = epsilon([GaussianEvent(2.0, 1.0, 1)], 1e-5)
    node.set_budget(OWNER, BudgetSet(dataset="ct", epsilon=1.2 * single, delta=1e-5))
    finish(node, node.submit(ALICE, request(node, GAUSS)).job_id)
    with pytest.raises(BudgetRefused, match="spent so far epsilon=.*projected cost epsilon=.*remaining epsilon=") as e:
        node.submit(ALICE, request(node, GAUSS, round=1))
    assert e.value.status == 403 and e.value.title == "Privacy budget exceeded"
    assert len(node.store.jobs()) == 1 and len(node.ledger.refusals()) == 1
    assert any(a["action"] == "job.refused" for a in node.store.audit_log())
    with pytest.raises(Invalid, match="no dataset|unknown|invalid"):
        node.set_budget(OWNER, BudgetSet(dataset="ct", scientist="no spaces", epsilon=1.0, delta=1e-5))


def test_scientists_can_estimate_before_they_submit(node):
    node.set_budget(OWNER, BudgetSet(dataset="ct", epsilon=1.0, delta=1e-5))
    est = node.privacy_estimate(ALICE, EstimateRequest(dataset="ct", privacy=GAUSS, releases=4))
    assert est.scientist == "alice" and est.releases == 4 and est.budgets[0].scientist is None
    with pytest.raises(Invalid, match=r"plan\.privacy\.clip"):
        node.privacy_estimate(ALICE, EstimateRequest(dataset="ct", privacy={**GAUSS, "clip": 0}))


def test_no_update_leaves_without_a_ledger_entry(node):
    # a done job whose update is on disk but whose release never reached the ledger
    req = request(node)
    job = node.store.add_job("alice", req)
    (node.home.updates / f"{job.job_id}.safetensors").write_bytes(tensors.dumps({"w": torch.ones(3)}))
    node.store.set_job(job.job_id, "done", metrics=Metrics())
    with pytest.raises(Forbidden, match="not recorded in the privacy ledger"):
        node.job_update(ALICE, job.job_id)
    # an executor result for a job with no reservation is withheld, and the job fails
    other = node.store.add_job("alice", request(node, round=3))
    finish(node, other.job_id)
    status = node.job_status(ALICE, other.job_id)
    assert status.state == "failed" and "withheld" in status.error and not status.has_update


def test_failed_jobs_and_orphans_give_their_reservation_back(node):
    job = node.submit(ALICE, request(node, GAUSS))
    node._on_event({"event": "failed", "job_id": job.job_id, "error": "boom"})
    assert node.ledger.entry(job.job_id).state == "cancelled"
    node.ledger.reserve("orphan", "alice", "ct", None)  # the node died between reserve and add_job
    node._recover()
    assert node.ledger.entry("orphan").state == "cancelled"


def test_an_update_lost_in_a_crash_leaves_its_spend_recorded(node):
    job = node.submit(ALICE, request(node, GAUSS))
    finish(node, job.job_id)
    (node.home.updates / f"{job.job_id}.safetensors").unlink()  # the crash beat the disk write
    node._updates = type(node._updates)(keep=8)  # and took the memory copy with it
    node._recover()
    status = node.job_status(ALICE, job.job_id)
    assert status.state == "failed" and "lost" in status.error
    assert node.ledger.entry(job.job_id).state == "released"  # it may have been served from memory


def test_budget_set_by_the_admin_function(node):
    budgets = admin.set_budget(node.home.path, "ct", 3.0, 1e-6, scientist="alice")
    assert budgets[0]["scientist"] == "alice" and budgets[0]["remaining"] == 3.0
    with pytest.raises(ValueError, match="no dataset named 'mri'"):
        admin.set_budget(node.home.path, "mri", 3.0, 1e-6)
    assert admin.ledger_view(node.home.path)["budgets"][0]["epsilon"] == 3.0


def test_budget_cli(node, capsys):
    from voxgrid.cli import main

    assert main(["node", "budget", "set", "--home", str(node.home.path), "--dataset", "ct", "--epsilon", "2",
                 "--delta", "1e-5"]) == 0
    assert '"remaining": 2.0' in capsys.readouterr().out
    assert main(["node", "budget", "set", "--home", str(node.home.path), "--dataset", "ct", "--epsilon", "-2",
                 "--delta", "1e-5"]) == 2
    assert "epsilon: Input should be greater than or equal to 0" in capsys.readouterr().err
    assert main(["node", "budget", "show", "--home", str(node.home.path)]) == 0
    assert '"budgets"' in capsys.readouterr().out
