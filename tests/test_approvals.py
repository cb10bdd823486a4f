"""The owner decides: dataset policies, approval requests and decisions, through the CLI, the owner API
and a real node process (which reads policies and approvals from its SQLite file at every job)."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from homes import cube_volumes, node_home, serving, wait_job

from voxgrid import ApprovalsNotGranted, Experiment, tensors, unet_plan
from voxgrid.cli import main
from voxgrid.client import AccessRefused, ConflictError, NodeClient, NotFoundError, RequestRefused
from voxgrid.experiment import RoundFailed
from voxgrid.nodes.ops import admin
from voxgrid.nodes.ops.approvals_cli import hash_blocks
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.store import NodeStore
from voxgrid.plan import initial_weights
from voxgrid.pointers import DatasetPointer
from voxgrid.wire import JobRequest


def plan(lr=2e-3):
    return unet_plan(["background", "pancreas"], patch_size=(16, 16, 16), channels=(4, 8), strides=(2,),
                     num_res_units=0, lr=lr, local_epochs=1, steps_per_epoch=1, batch_size=1, samples_per_volume=1)




def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voxgrid", "node", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture
def running(tmp_path):
    """A real node process whose dataset 'ct' is under review; yields (home, url, ca)."""
    home = node_home(tmp_path, volumes=cube_volumes(tmp_path / "data")).path
    assert main(["node", "policy", "set", "--home", str(home), "--dataset", "ct", "--policy", "review"]) == 0
    with serving(home, tmp_path / "node.log") as (url, ca):
        yield home, url, ca


def job(p, weights_id, kind="train", rnd=0):
    return JobRequest(kind=kind, experiment_id="exp-1", round=rnd, dataset="ct", plan=p.model_dump(mode="json"),
                      plan_hash=p.content_hash, weights_id=weights_id, evaluate=False)


def refused(client, req) -> str:
    """The request id a refusal for want of approval names."""
    with pytest.raises(AccessRefused) as err:
        client.submit(req)
    assert err.value.status == 403 and err.value.title == "Approval needed", err.value
    return err.value.detail


def test_review_dataset_needs_the_owners_approval(running):
    home, url, ca = running
    alice_token = admin.issue_token(home, "node", "alice", "scientist")
    owner_token = Home(home).owner_token_file.read_text().strip()
    p1, p2 = plan(), plan(lr=2e-2)
    with NodeClient(url, alice_token, ca, timeout=60) as alice, NodeClient(url, owner_token, ca, timeout=60) as owner:
        wid = alice.put_weights(tensors.dumps(initial_weights(p1))).weights_id

        # refused, with the request the node recorded; again: the same pending request
        detail = refused(alice, job(p1, wid))
        (req,) = alice.requests()
        assert req.request_id in detail and req.state == "pending" and req.plan_hash == p1.content_hash
        assert req.request_id in refused(alice, job(p1, wid)) and len(alice.requests()) == 1

        # the owner approves two releases in the terminal; the same job runs, then one more, then no more
        r = cli("requests", "approve", req.request_id, "--home", home, "--releases", 2, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state"] == "approved" and json.loads(r.stdout)["releases"] == 2
        assert wait_job(alice, alice.submit(job(p1, wid)).job_id).state == "done"
        assert wait_job(alice, alice.submit(job(p1, wid, "evaluate")).job_id).state == "done"
        assert alice.request(req.request_id).used == 2 and not alice.request(req.request_id).valid
        detail = refused(alice, job(p1, wid, rnd=1))
        assert "used up" in detail
        again = next(r for r in alice.requests() if r.state == "pending").request_id
        assert again != req.request_id and again in detail

        # a changed plan needs its own approval; the owner sees what changed and the hash in blocks
        changed = refused(alice, job(p2, wid))
        new = next(r for r in alice.requests() if r.plan_hash == p2.content_hash).request_id
        assert new in changed
        r = cli("requests", "show", new, "--home", home)
        assert r.returncode == 0, r.stderr
        assert "! optimizer.lr: 0.002 -> 0.02" in r.stdout and hash_blocks(p2.content_hash)[0] in r.stdout
        assert f"changes against the plan of request {req.request_id}" in r.stdout

        # denied, with a reason the scientist sees (and a refused job names it)
        owner.deny(new, "learning rate too high for this cohort")
        assert alice.request(new).state == "denied" and alice.request(new).reason.startswith("learning rate")
        assert "learning rate too high" in refused(alice, job(p2, wid))

        # approve the pending one, then revoke it: later jobs are refused
        owner.approve(again, releases=5, days=2)
        assert alice.submit(job(p1, wid, rnd=1)).state in ("queued", "running", "done")
        r = cli("requests", "revoke", again, "--home", home, "--reason", "study closed")
        assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
        assert "revoked" in refused(alice, job(p1, wid, rnd=2))

        _bad_inputs(home, alice, owner, req.request_id, new, p1)
        actions = {(e.action, e.actor) for e in owner.audit(1000)}
        assert {("request.create", "alice"), ("request.approve", "owner"), ("approval.use", "alice"),
                ("request.deny", "owner"), ("approval.revoke", "owner"), ("job.refused", "alice"),
                ("policy.set", "owner")} <= actions

        _experiment(url, alice_token, ca, owner)


def _bad_inputs(home, alice, owner, approved, denied, p1):
    before = {r.request_id: r for r in owner.owner_requests()}
    with pytest.raises(NotFoundError):
        owner.approve("r000000000000")
    with pytest.raises(ConflictError, match="already approved"):
        owner.approve(approved)
    with pytest.raises(ConflictError, match="already approved"):
        owner.deny(approved, "too late")
    with pytest.raises(ConflictError, match="already denied"):
        owner.approve(denied)
    with pytest.raises(ConflictError, match="not approved"):
        owner.revoke_approval(denied)
    for call in (alice.owner_requests, lambda: alice.approve(approved), lambda: alice.deny(denied, "x")):
        with pytest.raises(AccessRefused):
            call()
    bad = p1.model_dump(mode="json") | {"batch_size": -1}
    with pytest.raises(RequestRefused) as err:
        alice.request_approval("ct", bad, p1.content_hash)
    assert err.value.status == 422
    with pytest.raises(RequestRefused, match="hash mismatch"):
        alice.request_approval("ct", p1.model_dump(mode="json"), "0" * 64)
    with pytest.raises(NotFoundError):
        alice.request_approval("no-such-dataset", p1)
    r = cli("requests", "approve", approved, "--home", home)
    assert r.returncode == 2 and "already approved" in r.stderr
    r = cli("requests", "deny", "nope", "--home", home, "--reason", "x")
    assert r.returncode == 2 and "no request 'nope'" in r.stderr
    assert {r.request_id: r for r in owner.owner_requests()} == before


def _experiment(url, token, ca, owner):
    """The scientist's side: a request at every site as a table; a round refused names what to do."""
    with NodeClient(url, token, ca, timeout=60) as client:
        pointer = DatasetPointer("node-a", url, client.dataset("ct"), client)
        exp = Experiment(plan(lr=5e-3), [pointer], rounds=2, evaluate=False, job_timeout=60)
        with pytest.raises(RoundFailed, match=r"need their owner's approval of this plan: node-a \(ct\)"):
            exp.run_round()
        table = exp.request_approval("pancreas segmentation, validation study")
        assert len(table) == 1 and table[0]["state"] == "pending" and "node-a" in repr(table)
        (pending,) = owner.owner_requests(state="pending")
        assert pending.purpose.startswith("pancreas") and pending.releases_asked == 2
        with pytest.raises(ApprovalsNotGranted, match="still waiting for node-a after 0.3 s") as err:
            exp.wait_for_approvals(timeout=0.3, poll=0.1)
        assert err.value.table[0]["state"] == "pending"
        owner.approve(pending.request_id)
        assert exp.wait_for_approvals(timeout=30, poll=0.1).approved
        assert exp.approvals()[0]["state"] == "approved (2 of 2 left)" and exp.approvals().approved
        # an owner's no ends the wait at once, with the reason
        other = Experiment(plan(lr=7e-3), [pointer], rounds=1, evaluate=False, job_timeout=60)
        other.request_approval("a second look")
        owner.deny(next(r.request_id for r in owner.owner_requests(state="pending")), "not for this cohort")
        with pytest.raises(ApprovalsNotGranted, match=r"not approved at node-a \(denied: not for this cohort\)"):
            other.wait_for_approvals(timeout=600, poll=0.1)


def test_policy_cli_and_an_old_store_gains_the_tables(tmp_path, capsys):
    home = node_home(tmp_path).path
    db = Home(home).db_file
    with sqlite3.connect(db) as c:  # a node.db from before policies and approvals
        c.execute("DROP TABLE dataset_policies")
        c.execute("DROP TABLE approval_requests")
    store = NodeStore(db)
    assert store.policy("ct") == "open"  # registered before policies: stays open, as it was
    store.close()
    assert main(["node", "policy", "show", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"dataset": "ct", "policy": "open", "rules": None}]
    assert main(["node", "policy", "set", "--home", str(home), "--dataset", "ct", "--policy", "review"]) == 0
    assert main(["node", "policy", "set", "--home", str(home), "--dataset", "nope", "--policy", "review"]) == 2
    capsys.readouterr()
    assert main(["node", "policy", "show", "--home", str(home)]) == 0
    assert capsys.readouterr().out.split() == ["ct", "review"]
    assert main(["node", "requests", "list", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert hash_blocks("0123456789abcdef" * 4) == ["01234567 89abcdef 01234567 89abcdef"] * 2
    assert hash_blocks("sha256:" + "0123456789abcdef" * 4) == hash_blocks("0123456789abcdef" * 4)  # as the console
