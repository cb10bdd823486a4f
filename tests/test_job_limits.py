"""The owner's job limits, the fair queue, cancel and restart rules, in-process (fast).

The real-process version, over HTTPS with a live worker, is in test_hostile_jobs.py.
"""

import json
import os

import pytest
import torch
from homes import node_home

from voxgrid import tensors, unet_plan
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.limits import FairQueue, JobLimits, LimitExceeded, check_plan, parameter_count, planned_steps
from voxgrid.nodes.service.node import Caller, Invalid, NodeService, NotFound, TooManyJobs
from voxgrid.nodes.service.store import VolumeRecord
from voxgrid.wire import JobRequest

ALICE, BOB, OWNER = Caller("alice", "scientist"), Caller("bob", "scientist"), Caller("owner", "owner")
VOLUMES = [VolumeRecord(f"c{i}", f"/x/c{i}.nii.gz", None, "nifti", s)
           for i, s in enumerate(["train", "train", "train", "val"])]


def small_plan(**kw):
    return unet_plan(["background", "pancreas"], **{"channels": (4, 8), "strides": (2,), "num_res_units": 0, **kw})


# the fair queue -------------------------------------------------------------------------------
def test_the_queue_takes_turns_across_scientists_and_keeps_order_within_one():
    q = FairQueue()
    for i in range(5):
        q.put(f"a{i}", "alice", None)
    q.put("b0", "bob", None)
    q.put("b1", "bob", None)
    q.put("c0", "carol", None)
    order = [q.pop().job_id for _ in range(len(q))]
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]
    assert q.pop() is None and not q


def test_a_newcomer_waits_at_most_one_job_of_a_busy_scientist():
    q = FairQueue()
    for i in range(50):
        q.put(f"a{i}", "alice", None)
    assert q.pop().job_id == "a0"  # running
    q.put("b0", "bob", None)
    assert [q.pop().job_id for _ in range(2)] == ["a1", "b0"]


def test_a_queued_job_can_be_removed():
    q = FairQueue()
    q.put("a0", "alice", 1)
    q.put("a1", "alice", 2)
    q.put("b0", "bob", 3)
    assert q.remove("a1").item == 2 and q.remove("nope") is None
    assert q.remove("b0").scientist == "bob"
    assert q.job_ids() == ["a0"] and len(q) == 1


# plan checks ----------------------------------------------------------------------------------
def test_default_limits_admit_the_plans_the_repository_uses():
    limits = JobLimits()
    for plan in (small_plan(), small_plan(patch_size=(64, 64, 64)), unet_plan(["background", "pancreas", "tumor"]),
                 small_plan(local_epochs=30), small_plan(batch_size=5, local_epochs=2, patch_size=(128,) * 3)):
        check_plan(plan, limits, VOLUMES)


@pytest.mark.parametrize("change, field", [
    ({"patch_size": (1024, 1024, 1024)}, "plan.patch_size: 1024x1024x1024 = 1073741824 voxels"),
    ({"batch_size": 64}, "plan.batch_size: 64"),
    ({"sw_batch_size": 1000}, "plan.sw_batch_size: 1000"),
    ({"samples_per_volume": 10_000}, "plan.samples_per_volume: 10000"),
    ({"local_epochs": 1_000_000}, "plan.local_epochs/steps_per_epoch: 6000000 optimiser steps"),
    ({"local_epochs": 2, "steps_per_epoch": 9000}, "18000 optimiser steps"),
    ({"channels": [4] * 400, "strides": [1] * 399}, "plan.network.channels: 400 entries"),
])
def test_a_plan_over_a_limit_is_refused_naming_the_field_the_value_and_the_limit(change, field):
    with pytest.raises(LimitExceeded, match="over this node's limit of") as err:
        check_plan(small_plan(**change), JobLimits(), VOLUMES)
    assert field in str(err.value)


def test_network_width_is_counted_on_the_meta_device():
    wide = unet_plan(["background", "pancreas"], channels=(2048, 4096), strides=(2,), num_res_units=0)
    n = parameter_count(wide)  # 2048*4096*27*... : hundreds of millions, built without memory
    assert n > 100_000_000
    with pytest.raises(LimitExceeded, match=rf"plan.network: {n} parameters is over this node's limit of 100000000"):
        check_plan(wide, JobLimits(), VOLUMES)
    assert parameter_count(small_plan()) < 10_000


def test_steps_follow_the_trainer_and_dp_sgd_schedules():
    assert planned_steps(small_plan(local_epochs=3), VOLUMES) == 3 * 6  # 3 train volumes * 4 patches / batch 2
    dp = {"mechanism": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "sample_rate": 1e-6}
    plan = small_plan(privacy=dp, local_epochs=1, batch_size=1)
    assert planned_steps(plan, VOLUMES) == 1_000_000
    with pytest.raises(LimitExceeded, match="1000000 optimiser steps"):
        check_plan(plan, JobLimits(), VOLUMES)
    check_plan(plan, JobLimits(), VOLUMES, kind="evaluate")  # evaluation runs no optimiser step


def test_limits_parse_from_the_config_and_name_a_bad_key():
    assert JobLimits.parse({}).max_patch_voxels == 128 ** 3
    assert JobLimits.parse({"max_job_seconds": 5}).max_job_seconds == 5
    with pytest.raises(ValueError, match="limits.max_job_secs"):
        JobLimits.parse({"max_job_secs": 5})
    with pytest.raises(ValueError, match="limits.max_job_seconds"):
        JobLimits.parse({"max_job_seconds": -1})
    assert JobLimits().worker_memory_bytes() > 2 ** 28  # 75% of this machine's memory


# the node service -----------------------------------------------------------------------------
class StandInExecutor:
    """Holds jobs like the real executor's queue; never runs them."""

    def __init__(self):
        self.queue = FairQueue()

    def submit(self, job, weights):
        self.queue.put(job["job_id"], job["scientist"], job)

    def cancel(self, job_id, reason):
        return "queued" if self.queue.remove(job_id) else None

    def close(self):
        pass


@pytest.fixture
def node(tmp_path):
    node_home(tmp_path, VOLUMES, scientists=["bob"])
    admin.set_limits(tmp_path / "home", max_queued_jobs=3)
    service = NodeService(Home(tmp_path / "home"), start_executor=False)
    service.executor = StandInExecutor()
    yield service
    service.close()


def request(service, caller=ALICE, round=0, **plan_fields):
    plan = small_plan(**plan_fields)
    ref = service.put_weights(caller, tensors.dumps({"w": torch.zeros(3)}))
    return JobRequest(experiment_id="e", round=round, dataset="ct", plan=plan.model_dump(mode="json"),
                      plan_hash=plan.content_hash, weights_id=ref.weights_id)


def test_submit_refuses_a_plan_over_the_limits_and_audits_it(node):
    with pytest.raises(Invalid, match=r"plan.patch_size: 1024x1024x1024 = 1073741824 voxels is over this node's "
                                      r"limit of 2097152"):
        node.submit(ALICE, request(node, patch_size=(1024, 1024, 1024)))
    assert node.store.jobs() == [] and not node.executor.queue
    assert any(e["action"] == "job.refused" and "patch_size" in e["detail"] for e in node.store.audit_log(10))


def test_one_scientist_may_hold_only_so_many_queued_jobs(node):
    for r in range(3):
        node.submit(ALICE, request(node, round=r))
    with pytest.raises(TooManyJobs, match="'alice' has 3 jobs queued or running.*limit is 3"):
        node.submit(ALICE, request(node, round=3))
    node.submit(BOB, request(node, BOB, round=0))  # others are not held up
    assert node.submit(ALICE, request(node, round=0)).state == "queued"  # resubmitting is still idempotent


def test_cancel_own_queued_job_others_are_not_found_owner_cancels_any(node):
    a = node.submit(ALICE, request(node, round=0, privacy={"mechanism": "gaussian_update", "clip": 1.0,
                                                           "noise_multiplier": 4.0, "delta": 1e-5}))
    b = node.submit(BOB, request(node, BOB))
    with pytest.raises(NotFound):
        node.cancel_job(BOB, a.job_id)
    st = node.cancel_job(ALICE, a.job_id)
    assert st.state == "failed" and st.error == "cancelled by alice"
    assert node.ledger.entry(a.job_id).state == "cancelled"  # the reservation is given back
    st = node.cancel_job(OWNER, b.job_id)
    assert st.state == "failed" and st.error == "cancelled by owner (the node's owner)"
    assert not node.executor.queue
    assert node.cancel_job(ALICE, a.job_id).error == "cancelled by alice"  # a finished job stays as it is
    actions = [(e["actor"], e["action"]) for e in node.store.audit_log(20)]
    assert ("alice", "job.cancel") in actions and ("owner", "job.cancel") in actions


def test_a_job_running_when_the_node_stopped_runs_again_at_most_once(node):
    job = node.submit(ALICE, request(node))
    node.store.set_job(job.job_id, "running")  # the node dies during it
    node._recover()
    assert node.store.job(job.job_id).state == "queued" and job.job_id in node.executor.queue.job_ids()
    node.store.set_job(job.job_id, "running")  # and dies during it again
    node._recover()
    st = node.job_status(ALICE, job.job_id)
    assert st.state == "failed" and "not run again" in st.error and "1 restart per job" in st.error
    queued = node.submit(ALICE, request(node, round=1))  # a queued job is not counted: it never ran
    for _ in range(3):
        node._recover()
    assert node.store.job(queued.job_id).state == "queued"


def test_a_recovered_job_over_limits_lowered_since_fails(node, tmp_path):
    job = node.submit(ALICE, request(node, patch_size=(64, 64, 64)))
    node.limits = JobLimits(max_patch_voxels=32 ** 3)
    node._recover()
    st = node.job_status(ALICE, job.job_id)
    assert st.state == "failed" and "refused after the node restarted" in st.error and "32768" in st.error


def test_the_owner_sets_limits_in_the_home(tmp_path, node):
    home = node.home.path
    out = admin.set_limits(home, max_job_seconds=60, max_patch_voxels=64 ** 3)
    assert out["max_job_seconds"] == 60 and out["max_patch_voxels"] == 64 ** 3 and out["max_queued_jobs"] == 3
    assert json.loads((home / "node.json").read_text())["limits"]["max_job_seconds"] == 60
    assert admin.set_limits(home, max_job_seconds=None)["max_job_seconds"] == 3600  # back to the default
    with pytest.raises(ValueError, match="max_job_seconds"):
        admin.set_limits(home, max_job_seconds=0)
    with pytest.raises(ValueError, match="unknown limit"):
        admin.set_limits(home, max_gpus=1)


def test_the_owners_commands_set_limits_and_cancel_a_job_of_a_stopped_node(node, capsys):
    from voxgrid.cli import main

    home = str(node.home.path)
    assert main(["node", "limits", "--home", home, "--max-job-seconds", "90", "--max-patch-voxels", "262144"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_job_seconds"] == 90 and out["max_patch_voxels"] == 64 ** 3
    assert main(["node", "limits", "--home", home, "--reset", "max-job-seconds"]) == 0
    assert json.loads(capsys.readouterr().out)["max_job_seconds"] == 3600
    assert main(["node", "limits", "--home", home, "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    job = node.submit(BOB, request(node, BOB))
    assert main(["node", "cancel", "--home", home, job.job_id]) == 0  # no run.json: straight to the store
    out = json.loads(capsys.readouterr().out)
    assert out["state"] == "failed" and out["error"] == "cancelled by owner (the node's owner)"
    assert main(["node", "cancel", "--home", home, "nope"]) == 2
    assert "no job 'nope'" in capsys.readouterr().err


def test_resident_memory_counts_a_process_and_its_children():
    import subprocess
    import sys
    import time

    from voxgrid.nodes.service.limits import process_tree, tree_rss

    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'x = bytearray(64 << 20); " \
           "import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while tree_rss(parent.pid) < 64 << 20:  # the child's 64 MiB count towards the parent's tree
            assert time.monotonic() < deadline, tree_rss(parent.pid)
            time.sleep(0.1)
        assert len(process_tree(parent.pid)) == 2 and process_tree(parent.pid)[-1] == parent.pid
    finally:
        for pid in process_tree(parent.pid):
            os.kill(pid, 9)
        parent.wait()
    assert tree_rss(2 ** 22 + 1) == 0  # no such process


def test_transforms_that_blow_a_volume_up_are_refused_naming_the_transform():
    """A plan could ask Spacingd for a 0.01 mm grid or SpatialPadd for 4096^3: memory the patch limit never saw."""
    limits = JobLimits(max_volume_voxels=512 ** 3)
    extent = ((512, 512, 300), (0.9, 0.9, 2.5))  # the dataset's published largest shape and spacing
    fine = small_plan(preprocessing=[{"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [0.05, 0.05, 0.05]}])
    with pytest.raises(LimitExceeded, match=r"plan\.preprocessing\[0\] \(Spacingd\): a volume of up to \d+ voxels"):
        check_plan(fine, limits, VOLUMES, extent=extent)
    pad = small_plan(augmentation=[{"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": [4096] * 3}])
    with pytest.raises(LimitExceeded, match=r"plan\.augmentation\[0\] \(SpatialPadd\)"):
        check_plan(pad, limits, VOLUMES)
    usual = small_plan(preprocessing=[{"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 2.0]}])
    check_plan(usual, limits, VOLUMES, extent=extent)  # a usual resampling passes
    check_plan(fine, limits, VOLUMES)  # without a published extent, resampling is bounded by the watchdog only
