"""Stored blobs are bounded: who uploaded which weights, per-scientist quotas, expiry (nodes/service/blobs.py).

Fast: a NodeService in-process over a real SQLite file, with a stand-in executor; time is moved by
passing ``now`` to the sweep. The real-process version, over HTTPS, is in test_hostile_storage.py.
"""

import datetime as dt
import json
import os
import threading
import time

import pytest
import torch
from homes import node_home

from voxgrid import tensors, unet_plan
from voxgrid.nodes.ops import doctor
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.service.node import Caller, Invalid, NodeService, QuotaExceeded

from voxgrid.wire import JobRequest, Metrics

ALICE, BOB, OWNER = Caller("alice", "scientist"), Caller("bob", "scientist"), Caller("owner", "owner")
HOUR = dt.timedelta(hours=1)


class StandInExecutor:
    def __init__(self):
        self.jobs = []

    def submit(self, job, weights, *args, **kw):
        self.jobs.append(job["job_id"])

    def close(self):
        pass


def blob(seed: int, n: int = 1000) -> bytes:
    return tensors.dumps({"w": torch.full((n,), float(seed))})


SIZE = len(blob(0))


@pytest.fixture
def home(tmp_path):
    return node_home(tmp_path)


def set_storage(home: Home, **storage) -> None:
    cfg = home.load()
    cfg.storage = storage
    home.save(cfg)


def open_node(home: Home) -> NodeService:
    service = NodeService(home, start_executor=False)
    service.executor = StandInExecutor()
    return service


@pytest.fixture
def node(home):
    set_storage(home, quota_bytes=3 * SIZE, quota_blobs=100)
    service = open_node(home)
    yield service
    service.close()


def flush(service):
    service._writer.submit(lambda: None).result()  # the background blob writes are done


def submit(service, caller, weights_id, round=0):
    plan = unet_plan(["background", "pancreas"], channels=(4, 8), strides=(2,), num_res_units=0)
    return service.submit(caller, JobRequest(experiment_id="e", round=round, dataset="ct",
                                             plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash,
                                             weights_id=weights_id))


def finish(service, job_id):
    service._on_event({"event": "done", "job_id": job_id, "update": tensors.dumps({"w": torch.ones(3)}),
                       "metrics": Metrics().model_dump(mode="json")})


def now():
    return dt.datetime.now(dt.timezone.utc)


def test_an_upload_over_the_quota_is_refused_naming_quota_use_and_remedy(node):
    for i in range(3):
        node.put_weights(ALICE, blob(i))
    with pytest.raises(QuotaExceeded) as e:
        node.put_weights(ALICE, blob(3))
    assert e.value.status == 413 and e.value.title == "Storage quota exceeded"
    detail = e.value.detail
    assert "'alice'" in detail and "3 weights blob(s)" in detail and "quota" in detail, detail
    assert "deleted automatically" in detail and "re-uploading weights you already sent costs nothing" in detail
    assert "storage.quota_bytes" in detail and "/" not in detail.replace("blob(s)", "")  # no path leaves
    flush(node)
    assert sorted(p.name for p in node.home.blobs.iterdir()) == sorted(
        f"{node.put_weights(ALICE, blob(i)).weights_id}.safetensors" for i in range(3))  # nothing of the 4th kept
    assert any(a["action"] == "weights.refused" for a in node.store.audit_log())


def test_a_count_quota_refuses_many_tiny_blobs(home):
    set_storage(home, quota_blobs=2)
    node = open_node(home)
    try:
        node.put_weights(ALICE, blob(1, n=1))
        node.put_weights(ALICE, blob(2, n=1))
        with pytest.raises(QuotaExceeded, match="in 2 blob"):
            node.put_weights(ALICE, blob(3, n=1))
    finally:
        node.close()


def test_identical_bytes_again_cost_nothing_and_quotas_are_per_scientist(node):
    refs = [node.put_weights(ALICE, blob(i)) for i in range(3)]
    assert node.put_weights(ALICE, blob(0)) == refs[0]  # at the quota, the same bytes again: free
    assert node.blobs.usage()["alice"] == {"bytes": 3 * SIZE, "blobs": 3}
    # bob is charged for what he sends, even bytes alice sent: a quota tells nobody what others uploaded
    assert node.put_weights(BOB, blob(0)) == refs[0]
    assert node.blobs.usage() == {"alice": {"bytes": 3 * SIZE, "blobs": 3}, "bob": {"bytes": SIZE, "blobs": 1}}
    for i in range(4, 10):  # the owner's uploads are recorded but not capped
        node.put_weights(OWNER, blob(i))


def test_concurrent_uploads_cannot_overshoot_the_quota(node):
    ok, refused = [], []

    def upload(i):
        try:
            ok.append(node.put_weights(ALICE, blob(100 + i)))
        except QuotaExceeded:
            refused.append(i)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 3 and len(refused) == 5
    assert node.blobs.usage()["alice"]["bytes"] == 3 * SIZE


def test_the_sweep_deletes_unused_weights_and_keeps_those_of_queued_jobs(node):
    used = node.put_weights(ALICE, blob(1)).weights_id
    unused = node.put_weights(ALICE, blob(2)).weights_id
    job = submit(node, ALICE, used)
    flush(node)
    report = node.blobs.sweep(now() + 25 * HOUR)
    assert report.weights == [unused] and report.rows == 1
    assert not (node.home.blobs / f"{unused}.safetensors").exists()
    assert (node.home.blobs / f"{used}.safetensors").exists() and node._weights_blob(used) is not None
    with pytest.raises(Invalid, match=f"unknown weights {unused}: upload them first"):
        submit(node, ALICE, unused, round=1)
    assert node.blobs.usage()["alice"]["blobs"] == 1  # the expired weights no longer count
    # the job finished: its weights live on for the TTL after that, then go
    node.blobs.sweep(now() + 48 * HOUR)  # still queued: kept, and fresh again
    finish(node, job.job_id)
    assert node.blobs.sweep(now() + 2 * HOUR).weights == []
    assert node.blobs.sweep(now() + 73 * HOUR).weights == [used]
    assert node.blobs.usage() == {}
    with pytest.raises(Invalid, match="upload them first"):
        submit(node, ALICE, used, round=2)
    node.put_weights(ALICE, blob(1))  # uploading again brings them back
    assert submit(node, ALICE, used, round=2).state == "queued"


def test_weights_shared_by_two_scientists_stay_while_either_keeps_them(node):
    wid = node.put_weights(ALICE, blob(1)).weights_id
    flush(node)
    later = now() + 20 * HOUR
    node.blobs.clock = lambda: later
    node.put_weights(BOB, blob(1))  # bob's copy is fresh when alice's expires
    assert node.blobs.sweep(now() + 30 * HOUR).weights == []
    assert (node.home.blobs / f"{wid}.safetensors").exists() and "alice" not in node.blobs.usage()
    assert node.blobs.sweep(now() + 45 * HOUR).weights == [wid]


def test_quotas_and_ownership_survive_a_restart(home):
    set_storage(home, quota_bytes=2 * SIZE)
    node = open_node(home)
    node.put_weights(ALICE, blob(1))
    node.put_weights(ALICE, blob(2))
    node.close()
    node = open_node(home)
    try:
        with pytest.raises(QuotaExceeded):
            node.put_weights(ALICE, blob(3))
        assert node.blobs.sweep(now() + 25 * HOUR).rows == 2
        node.put_weights(ALICE, blob(3))
    finally:
        node.close()


def test_updates_are_served_after_a_restart_and_expire_after_their_ttl(home):
    node = open_node(home)
    wid = node.put_weights(ALICE, blob(1)).weights_id
    job = submit(node, ALICE, wid)
    finish(node, job.job_id)
    node.close()
    node = open_node(home)  # a restarted node still serves the update of a recent job
    try:
        node.blobs.sweep(now() + 25 * HOUR)
        assert tensors.loads(node.job_update(ALICE, job.job_id))["w"].tolist() == [1.0, 1.0, 1.0]
        assert node.blobs.sweep(now() + 8 * 24 * HOUR).updates == [job.job_id]
        assert not (home.updates / f"{job.job_id}.safetensors").exists()
        status = node.job_status(ALICE, job.job_id)
        assert status.state == "failed" and "the update expired" in status.error and not status.has_update
        assert submit(node, ALICE, node.put_weights(ALICE, blob(1)).weights_id).job_id != job.job_id  # runs again
    finally:
        node.close()


def test_files_from_before_quotas_and_half_writes_are_cleaned(node):
    old = time.time() - 48 * 3600
    legacy, recent = node.home.blobs / ("a" * 64 + ".safetensors"), node.home.blobs / ("b" * 64 + ".safetensors")
    tmp = node.home.blobs / "c.123.4.tmp"
    orphan = node.home.updates / ("f" * 32 + ".safetensors")
    for p in (legacy, recent, tmp, orphan):
        p.write_bytes(blob(0))
    for p in (legacy, tmp):
        os.utime(p, (old, old))
    os.utime(orphan, (old - 8 * 24 * 3600,) * 2)
    report = node.blobs.sweep()
    assert report.weights == ["a" * 64] and report.updates == ["f" * 32]
    assert recent.exists() and not legacy.exists() and not tmp.exists() and not orphan.exists()


def test_a_bad_storage_section_is_refused_naming_the_key(home):
    set_storage(home, quota_bytes=-1)
    with pytest.raises(ValueError, match=r"storage\.quota_bytes"):
        NodeService(home, start_executor=False)
    cfg = json.loads(home.config_file.read_text())
    del cfg["storage"]  # a home from before quotas loads, with the defaults
    home.config_file.write_text(json.dumps(cfg))
    node = open_node(home)
    try:
        assert node.storage.quota_bytes == 4 * 1024 ** 3 and node.storage.weights_ttl_hours == 24
    finally:
        node.close()


def test_the_owner_sees_storage_use_in_the_doctor(home):
    set_storage(home, quota_bytes=3 * SIZE)
    node = open_node(home)
    node.put_weights(ALICE, blob(1))
    node.put_weights(ALICE, blob(2))
    flush(node)
    check = doctor.check_storage(home, home.load())  # while the node runs
    assert check.status == "ok" and "'alice'" in check.reason and "weights 2 file(s)" in check.reason, check
    node.put_weights(ALICE, blob(3))
    node.close()
    check = doctor.check_storage(home, home.load())  # stopped: read-only, and at the quota
    assert check.status == "warn" and "at 90% of the quota or more: alice" in check.reason, check
