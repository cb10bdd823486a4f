"""One plan cannot hold the executor: a real node, attacked from outside over HTTPS.

A node with a 15 s wall-time limit per job (set by its owner before it starts), two scientists
(``scientist`` and ``bob``) and its owner. A tiny job costs about a second.
"""

import time

import pytest
from homes import wait_job
import torch

import voxgrid
from voxgrid import tensors
from voxgrid.client import NotFoundError, NodeClient, RequestRefused
from voxgrid.plan import initial_weights
from voxgrid.wire import JobRequest

pytestmark = pytest.mark.slow

WALL_S = 15


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.ops import admin
    from voxgrid.nodes.local.federation import LocalFederation

    root = tmp_path_factory.mktemp("hostile")
    fed = LocalFederation.create(root, default_sites(n_sites=1, shape=(32, 32, 32), n_volumes=4))
    home = fed.nodes[0].home
    admin.set_limits(home, max_job_seconds=WALL_S)
    admin.issue_token(home, "node", "bob", "scientist", root / "bob.token")
    fed.bob_token = (root / "bob.token").read_text().strip()
    fed.start()
    yield fed
    fed.stop()


def clients(fed):
    url, ca = fed.nodes[0].url, fed.ca_cert
    return (NodeClient(url, fed.scientist_token, ca), NodeClient(url, fed.bob_token, ca),
            NodeClient(url, fed.owner_token(0), ca))


def plan(**kw):
    fields = dict(patch_size=(16, 16, 16), channels=(4, 8), strides=(2,), num_res_units=0, local_epochs=1,
                  steps_per_epoch=1, amp=False)
    fields.update(kw)
    return voxgrid.unet_plan(["background", "pancreas"], **fields)


def submit(client, pl, tag, weights=None):
    ref = client.put_weights(tensors.dumps(weights or initial_weights(pl)))
    return client.submit(JobRequest(kind="train", experiment_id=tag, round=0, dataset="site-a",
                                    plan=pl.model_dump(mode="json"), plan_hash=pl.content_hash,
                                    weights_id=ref.weights_id, evaluate=False))


LONG = dict(steps_per_epoch=9000)  # under the step limit, far over the wall-time limit




def wait_running(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while (st := client.job(job_id)).state != "running":
        assert st.state == "queued" and time.monotonic() < deadline, st
        time.sleep(0.05)


def test_a_1024_cubed_patch_is_refused_at_submit_with_the_limit(fed):
    alice, _, owner = clients(fed)
    with pytest.raises(RequestRefused) as err:
        submit(alice, plan(patch_size=(1024, 1024, 1024)), "huge")  # (the network is small: its weights are real)
    assert err.value.status == 422
    assert "plan.patch_size: 1024x1024x1024 = 1073741824 voxels is over this node's limit of 2097152" in str(err.value)
    with pytest.raises(RequestRefused, match="optimiser steps on this dataset"):
        submit(alice, plan(local_epochs=100_000), "epochs")
    with pytest.raises(RequestRefused, match="plan.network: .* parameters is over"):
        # ~900 MB of weights would not even upload: the node refuses the plan before it reads any weights
        submit(alice, plan(channels=(2048, 4096)), "wide", weights={"w": torch.zeros(1)})
    assert not [j for j in owner.jobs() if j.experiment_id in ("huge", "epochs", "wide")]


def test_a_job_over_the_wall_time_limit_fails_with_the_reason_and_the_next_runs(fed):
    alice, _, _ = clients(fed)
    slow = submit(alice, plan(**LONG), "wall")
    quick = submit(alice, plan(), "after-wall")
    t0 = time.monotonic()
    st = wait_job(alice, slow.job_id)
    assert st.state == "failed" and f"exceeded the node's wall-time limit of {WALL_S} s" in st.error
    assert time.monotonic() - t0 < WALL_S + 20
    assert wait_job(alice, quick.job_id).state == "done"


def test_scientists_cancel_their_own_jobs_only_and_the_owner_any(fed):
    alice, bob, owner = clients(fed)
    running = submit(alice, plan(**LONG), "cancel")
    queued = submit(alice, plan(lr=1e-3), "cancel")
    wait_running(alice, running.job_id)
    with pytest.raises(NotFoundError):
        bob.cancel(running.job_id)
    with pytest.raises(NotFoundError):
        bob.cancel(queued.job_id)
    st = alice.cancel(queued.job_id)
    assert st.state == "failed" and st.error == "cancelled by scientist"
    t0 = time.monotonic()
    st = owner.cancel(running.job_id)
    assert st.state == "failed" and st.error == "cancelled by owner (the node's owner)"
    assert time.monotonic() - t0 < 10
    bobs = submit(bob, plan(), "after-cancel")  # the worker was restarted and takes the next job
    assert wait_job(bob, bobs.job_id).state == "done"
    assert alice.cancel(queued.job_id).error == "cancelled by scientist"  # finished: left as it is
    audit = [(e.actor, e.action) for e in owner.audit(limit=50)]
    assert ("scientist", "job.cancel") in audit and ("owner", "job.cancel") in audit


def test_one_scientists_queue_does_not_starve_another(fed):
    alice, bob, owner = clients(fed)
    blocker = submit(alice, plan(**LONG), "many")
    wait_running(alice, blocker.job_id)
    mine = [submit(alice, plan(lr=1e-3 * (i + 1)), "many") for i in range(5)]
    theirs = submit(bob, plan(), "few")
    owner.cancel(blocker.job_id)  # alice has five queued, bob one: bob's comes second, not sixth
    for j in [*mine, theirs]:
        assert wait_job(alice if j in mine else bob, j.job_id).state == "done"
    done = [e.detail for e in reversed(owner.audit(limit=200)) if e.action == "job.done"]
    order = [done.index(j.job_id) for j in [*mine, theirs]]
    assert order[-1] == sorted(order)[1], "bob's job waited behind alice's queue"


def test_a_job_running_when_the_node_is_killed_is_not_run_again_endlessly(fed):
    alice, _, _ = clients(fed)
    job = submit(alice, plan(**LONG), "crash")
    wait_running(alice, job.job_id)
    fed.kill_node(0)
    fed.restart_node(0)
    alice, _, _ = clients(fed)
    wait_running(alice, job.job_id)  # run again once: a crash of the node may not be the job's fault
    fed.kill_node(0)
    fed.restart_node(0)
    alice, _, _ = clients(fed)
    st = alice.job(job.job_id)
    assert st.state == "failed" and "not run again" in st.error, st
    assert wait_job(alice, submit(alice, plan(), "after-crash").job_id).state == "done"
