"""The owner's policies beyond review: 'rules' approve automatically, new datasets start under review,
requests carry the node's cost estimate, a scientist's pending requests are capped, and revoking an
approval stops its jobs. Fast: a NodeService in-process with a stand-in executor (test_privacy_node)."""

import json

import pytest
from homes import node_home

from voxgrid import unet_plan
from voxgrid.cli import main
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.approvals import MAX_PENDING, ApprovalNeeded, TooManyRequests
from voxgrid.nodes.service.node import Caller, Invalid, NodeService
from voxgrid.nodes.service.store import NodeStore
from voxgrid.wire import ApprovalRequestCreate, BudgetSet, PolicyRules

from test_privacy_node import ALICE, GAUSS, OWNER, StandInExecutor, finish, request

BOB = Caller("bob", "scientist")


@pytest.fixture
def node(tmp_path):
    service = NodeService(node_home(tmp_path, policy="review"), start_executor=False)
    service.executor = StandInExecutor()
    yield service
    service.close()


def ask(service, caller, privacy=None, releases=None, lr=2e-3):
    plan = unet_plan(["background", "pancreas"], channels=(4, 8), strides=(2,), num_res_units=0, privacy=privacy,
                     lr=lr)
    return service.approvals.create(caller, ApprovalRequestCreate(
        dataset="ct", plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash, releases=releases))


def test_rules_approve_a_plan_that_meets_them_and_name_what_another_breaks(node):
    rules = PolicyRules(max_epsilon_per_release=3.0, max_epsilon_per_approval=4.2, networks=["UNet"],
                        max_patch_size=96, max_rounds=3)
    assert node.approvals.set_policy(OWNER, "ct", "rules", rules).rules == rules

    # no DP: refused at submit, the refusal names the rule; the request waits for the owner with its findings
    with pytest.raises(ApprovalNeeded, match="does not meet the owner's rules: the plan's update does not leave "
                                             "under differential privacy") as refused:
        node.submit(ALICE, request(node))
    pending = node.approvals.get(OWNER, refused.value.request_id)
    assert pending.state == "pending" and any("differential privacy" in f for f in pending.findings)

    # DP within every rule: the submit itself is approved by the rules, for max_rounds releases
    job = node.submit(ALICE, request(node, GAUSS))
    (auto,) = [r for r in node.approvals.requests(OWNER, "approved")]
    assert auto.decided_by == "rules" and auto.releases == 3 and auto.used == 1
    assert job.job_id in node.approvals.jobs_of(auto.request_id)
    shown = node.approvals.get(OWNER, auto.request_id)
    e = shown.projected
    assert e.dp and e.releases == 3 and e.epsilon_per_release <= 3.0 and e.epsilon_per_release < e.epsilon_total <= 4.2
    for rnd in (1, 2):
        node.submit(ALICE, request(node, GAUSS, round=rnd))
    # used up: the rules approve a plan once per scientist; renewing needs the owner
    with pytest.raises(ApprovalNeeded, match="renewing needs the owner"):
        node.submit(ALICE, request(node, GAUSS, round=3))

    # a request asking for more releases than one automatic approval grants waits, saying so
    over = ask(node, BOB, GAUSS, releases=4)
    assert over.state == "pending" and any("over the 3 one automatic approval grants" in f for f in over.findings)
    # per-approval epsilon: three releases of weaker noise fit one by one but not together
    weak = {**GAUSS, "noise_multiplier": 3.0}
    r = ask(node, BOB, weak, releases=3)
    assert r.state == "pending" and any(f.startswith("epsilon of 3 releases would be") for f in r.findings)
    assert ask(node, BOB, GAUSS, releases=2).state == "approved"
    assert {"actor": "rules", "action": "request.approve"}.items() <= next(
        e for e in node.store.audit_log(1000) if e["actor"] == "rules").items()


def test_rules_refuse_bad_rules_and_rules_on_other_policies(node):
    with pytest.raises(Invalid, match="only to the 'rules' policy"):
        node.approvals.set_policy(OWNER, "ct", "review", PolicyRules())
    with pytest.raises(ValueError):
        PolicyRules(max_epsilon_per_release=-1)
    assert node.approvals.set_policy(OWNER, "ct", "rules").rules == PolicyRules()  # defaults: DP required
    assert node.store.policy("ct") == "rules"


def test_new_datasets_start_under_review_and_an_old_store_keeps_open(tmp_path, capsys):
    home = node_home(tmp_path, policy=None).path  # as `voxgrid node dataset add` without --policy
    store = NodeStore(Home(home).db_file)
    assert store.policy("ct") == "review"
    store.add_dataset("ct", description="", tags=["#ct"], modality="CT", label_names={1: "x"}, volumes=[],
                      replace=True)
    assert store.policy("ct") == "review"  # a replaced dataset keeps its policy
    store.set_policy("ct", "open")
    store.add_dataset("ct", description="", tags=["#ct"], modality="CT", label_names={1: "x"}, volumes=[],
                      replace=True)
    assert store.policy("ct") == "open"
    # a node.db from before rules: the column is added, and a dataset without a policy row stays open
    with store.transaction() as c:
        c.execute("DROP TABLE dataset_policies")
        c.execute("CREATE TABLE dataset_policies (dataset TEXT PRIMARY KEY, policy TEXT NOT NULL, "
                  "updated_at TEXT NOT NULL)")
    store.close()
    store = NodeStore(Home(home).db_file)
    assert store.policy("ct") == "open"
    store.close()
    assert main(["node", "policy", "set", "--home", str(home), "--dataset", "ct", "--policy", "rules",
                 "--max-epsilon-per-release", "2", "--networks", "UNet,SegResNet", "--max-rounds", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "rules" and out["rules"]["networks"] == ["UNet", "SegResNet"]
    assert out["rules"]["max_rounds"] == 5 and out["rules"]["require_dp"] is True
    assert main(["node", "policy", "set", "--home", str(home), "--dataset", "ct", "--policy", "review",
                 "--max-rounds", "5"]) == 2
    assert "apply only with --policy rules" in capsys.readouterr().err


def test_requests_carry_the_projected_cost_and_are_capped_per_scientist(node):
    node.set_budget(OWNER, BudgetSet(dataset="ct", scientist="alice", epsilon=5.0, delta=1e-5))
    r = ask(node, ALICE, GAUSS, releases=4)
    e = r.projected
    assert e.dp and e.releases == 4 and e.epsilon_total > e.epsilon_per_release > 0
    (check,) = e.budgets
    assert check.scientist == "alice" and check.epsilon == 5.0 and check.projected == pytest.approx(e.epsilon_total,
                                                                                                    rel=0.05)
    for i in range(1, MAX_PENDING):
        ask(node, ALICE, lr=1e-3 * (i + 1))
    with pytest.raises(TooManyRequests, match=f"already has {MAX_PENDING} requests waiting") as err:
        ask(node, ALICE, lr=0.5)
    assert err.value.status == 429
    with pytest.raises(TooManyRequests):  # a refused job records no request past the cap either
        node.submit(ALICE, request(node, {**GAUSS, "noise_multiplier": 3.0}))
    assert len(node.approvals.mine(ALICE)) == MAX_PENDING
    assert ask(node, BOB).state == "pending"  # another scientist is not held up


def test_revoking_stops_the_approvals_queued_jobs_and_withholds_a_finished_one(node):
    r = ask(node, ALICE, GAUSS, releases=3)
    node.approvals.approve(OWNER, r.request_id)
    jobs = [node.submit(ALICE, request(node, GAUSS, round=i)).job_id for i in range(3)]
    finish(node, jobs[0])
    assert node.job_status(ALICE, jobs[0]).state == "done"
    node.revoke_approval(OWNER, r.request_id, "consent withdrawn")
    states = [node.store.job(j) for j in jobs]
    assert states[0].state == "done"  # finished before: left as it was
    assert all(s.state == "failed" and "cancelled by owner" in s.error for s in states[1:])
    assert all(node.ledger.entry(j).state == "cancelled" for j in jobs[1:])
    # a job the worker finishes after a revocation made outside the server (the CLI on the store): withheld
    other = {**GAUSS, "noise_multiplier": 5.0}
    r2 = ask(node, ALICE, other, releases=1)
    node.approvals.approve(OWNER, r2.request_id)
    late = node.submit(ALICE, request(node, other, round=9)).job_id
    node.approvals.revoke(OWNER, r2.request_id)
    finish(node, late)
    st = node.store.job(late)
    assert st.state == "failed" and f"revoked approval {r2.request_id}" in st.error
    assert node.ledger.entry(late).state == "cancelled"
