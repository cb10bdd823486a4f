"""One worker per GPU (issue 17, item 7), on the CPU: GPUs are injected (a node with 2 fake GPUs gets 2
workers, each started with its own CUDA_VISIBLE_DEVICES), and the pool's scheduling is pinned: jobs of
one experiment and dataset run one at a time in order, others spread over the free workers."""

import os
import threading
import time
from types import SimpleNamespace

import pytest

from voxgrid.nodes.service import gpus
from voxgrid.nodes.service.gpus import WorkerSlot, gpu_ids, pick, plan_workers, worker_env
from voxgrid.nodes.service.limits import FairQueue


def test_the_nodes_gpus_are_its_visible_devices_else_what_the_machine_has(monkeypatch):
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": "2,3"}, probe=lambda: ["0", "1", "2", "3"]) == ["2", "3"]
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-1a2b, GPU-3c4d"}, probe=list) == ["GPU-1a2b", "GPU-3c4d"]
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": ""}, probe=lambda: ["0"]) == []
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": "-1"}, probe=lambda: ["0"]) == []
    assert gpu_ids({}, probe=lambda: ["0", "1"]) == ["0", "1"]

    listing = "GPU 0: NVIDIA H200 (UUID: GPU-a)\nGPU 1: NVIDIA H200 (UUID: GPU-b)\n"
    run = lambda *a, **k: SimpleNamespace(stdout=listing)  # noqa: E731
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert gpus.nvidia_gpu_ids(run) == []  # no nvidia-smi: no GPU, and nothing run
    monkeypatch.setattr(gpus.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert gpus.nvidia_gpu_ids(run) == ["0", "1"]


@pytest.mark.parametrize("device, ids, expected", [
    ("auto", ["0", "1"], [("auto", "0", 4), ("auto", "1", 4)]),  # one per GPU, the CPUs shared out
    ("cuda", ["2", "3"], [("cuda", "2", 4), ("cuda", "3", 4)]),
    ("cuda:1", ["2", "3"], [("cuda", "3", 0)]),  # the node's second GPU, seen as the worker's only one
    ("cpu", ["0", "1"], [("cpu", None, 0)]),
    ("auto", [], [("auto", None, 0)]),  # no GPU: one worker, which says why it runs on the CPU
])
def test_plan_workers_gives_each_gpu_its_own_worker(device, ids, expected):
    slots = plan_workers(device, ids, threads=0, cpus=8)
    assert [(s.device, s.gpu, s.threads) for s in slots] == expected


def test_the_worker_environment_is_set_for_the_start_only_and_limited_to_the_gpu():
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with worker_env({"CUDA_VISIBLE_DEVICES": "7"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    with pytest.raises(ValueError, match="LD_PRELOAD"), worker_env({"LD_PRELOAD": "x.so"}):
        pass


def _job(job_id, experiment="e", dataset="d"):
    return SimpleNamespace(job_id=job_id, request=SimpleNamespace(experiment_id=experiment, dataset=dataset))


def _entries(*jobs):
    q = FairQueue()
    for j in jobs:
        q.put(j.job_id, "alice", (j,))
    return q.in_turn()


def test_pick_keeps_an_experiments_jobs_in_order_and_spreads_the_others():
    e1, e2, f1 = _job("e1"), _job("e2"), _job("f1", experiment="f")
    # e1 runs on worker 0: e2 waits, f1 takes the free worker
    assert pick(_entries(e2, f1), [1], {("e", "d")}, {("e", "d"): 0}, sticky=False)[0].job_id == "f1"
    # nothing running: e1 goes first, and back to the worker that ran its experiment's last job
    entry, worker = pick(_entries(e1, e2), [0, 1], set(), {("e", "d"): 1}, sticky=False)
    assert (entry.job_id, worker) == ("e1", 1)
    # that worker busy: another may take it when the state is durable, not when it lives in the worker
    assert pick(_entries(e1), [0], set(), {("e", "d"): 1}, sticky=False)[1] == 0
    assert pick(_entries(e1), [0], set(), {("e", "d"): 1}, sticky=True) is None
    # the same experiment on another dataset is another key
    assert pick(_entries(_job("e3", dataset="d2")), [0], {("e", "d")}, {}, sticky=True)[0].job_id == "e3"
    assert pick(_entries(e1), [], set(), {}, sticky=False) is None


class FakeExecutor:
    """A worker's executor in this process: records what it was given; the test ends its jobs."""

    made: list = []

    def __init__(self, on_event, **kw):
        self.on_event, self.kw = on_event, kw
        self.ready = threading.Event()
        self.ready.set()
        self.worker_device = "cuda"
        self.jobs: list[str] = []
        self.current = None
        FakeExecutor.made.append(self)

    def submit(self, job, weights):
        assert self.current is None, "a worker was handed a second job"
        self.current = job["job_id"]
        self.jobs.append(job["job_id"])

    def finish(self):
        from voxgrid.nodes.worker.messages import JobDone
        from voxgrid.wire import Metrics

        job, self.current = self.current, None
        self.on_event(JobDone(job_id=job, metrics=Metrics(), has_update=False))

    def running(self):
        return self.current

    def queued(self):
        return []

    def cancel(self, job_id, reason):
        return None

    def close(self, timeout=5.0):
        pass


def test_a_pool_of_two_fake_gpus_spreads_experiments_and_keeps_each_in_order(monkeypatch):
    from voxgrid.nodes.service import pool as pool_module

    parsed = {}

    def parse_job(fields):  # the node server validated these already; the pool needs job id and key
        parsed[fields["job_id"]] = fields
        return _job(fields["job_id"], fields["experiment"], "d")

    monkeypatch.setattr(pool_module, "parse_job", parse_job)
    FakeExecutor.made = []
    slots = plan_workers("auto", ["0", "1"], cpus=4)
    events = []
    pool = pool_module.ExecutorPool(events.append, slots, state_dir=None, make_executor=FakeExecutor, poll=0.01)
    try:
        a, b = FakeExecutor.made
        assert [w.kw["env"] for w in (a, b)] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
        assert a.kw["memory_bytes"] == b.kw["memory_bytes"] == pool.limits.worker_memory_bytes() // 2
        for job_id, exp in (("e-r1", "e"), ("e-r2", "e"), ("f-r1", "f"), ("e-r3", "e")):
            pool.submit({"job_id": job_id, "experiment": exp, "scientist": "alice"}, b"w")
        _wait(lambda: a.current and b.current)
        assert {a.current, b.current} == {"e-r1", "f-r1"}  # spread; e-r2 waits for e-r1
        e_worker = a if a.current == "e-r1" else b
        other = b if e_worker is a else a
        other.finish()  # f done: the free worker must not take e-r2 while e-r1 runs
        time.sleep(0.1)
        assert other.current is None and pool.queued() == ["e-r2", "e-r3"]
        e_worker.finish()
        _wait(lambda: e_worker.current == "e-r2")  # back where its state is (sticky: no durable state)
        e_worker.finish()
        _wait(lambda: e_worker.current == "e-r3")
        e_worker.finish()
        _wait(lambda: len(events) == 4)
        assert e_worker.jobs == ["e-r1", "e-r2", "e-r3"] and other.jobs == ["f-r1"]
        assert [e.job_id for e in events] == ["f-r1", "e-r1", "e-r2", "e-r3"]
        assert pool.worker_device == "cuda" and pool.ready.wait(1)
    finally:
        pool.close()


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def env_worker(conn, device, threads, state_dir=None, cache_dir=None):
    """A worker process that speaks the protocol without torch work: it reports, as its device, the GPU it
    was started with, holds each job a moment, and ends it."""
    from voxgrid.nodes.worker.messages import JobDone, JobStarted, WorkerReady, recv_job, send
    from voxgrid.wire import Metrics

    seen = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    send(conn, WorkerReady(device=f"gpu{seen}"))
    while True:
        try:
            job, _ = recv_job(conn)
        except (EOFError, OSError):
            return
        send(conn, JobStarted(job_id=job.job_id))
        t0 = time.time()
        time.sleep(0.3)
        send(conn, JobDone(job_id=job.job_id, has_update=False,
                           metrics=Metrics(device=f"gpu{seen}", compute_s=t0)))


def test_two_real_workers_start_with_their_own_gpu_and_share_the_jobs(monkeypatch):
    from voxgrid.nodes.service import executor as executor_module
    from voxgrid.nodes.service.pool import executor_for
    from voxgrid.nodes.worker.messages import JobDone

    monkeypatch.setattr(executor_module, "worker_main", env_worker)
    done, cv = {}, threading.Condition()

    def on_event(event):
        with cv:
            if isinstance(event, JobDone):
                done[event.job_id] = event.metrics
            cv.notify_all()

    pool = executor_for(on_event, device="auto", threads=1, gpus=["0", "1"], poll=0.05)
    try:
        assert [w.env for w in pool.workers] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
        _wait(lambda: all(w.ready.is_set() for w in pool.workers), 120)
        assert sorted(w.worker_device for w in pool.workers) == ["gpu0", "gpu1"]  # what each process saw
        jobs = [("a-1", "a"), ("a-2", "a"), ("b-1", "b"), ("c-1", "c")]
        for job_id, exp in jobs:
            pool.submit({**_run_job(job_id, exp), "scientist": "alice"}, b"w")
        with cv:
            assert cv.wait_for(lambda: len(done) == 4, 60), done
        assert {m.device for m in done.values()} == {"gpu0", "gpu1"}  # spread over both
        assert done["a-1"].compute_s + 0.3 <= done["a-2"].compute_s + 0.05  # a's second job after its first
    finally:
        pool.close()


def _run_job(job_id, experiment):
    from test_gpu_paths import _run_job as base

    job = base(job_id).model_dump(mode="json")
    job["request"]["experiment_id"] = experiment
    return job


def test_executor_for_a_single_worker_is_the_plain_executor(monkeypatch):
    from voxgrid.nodes.service import pool as pool_module

    made = []
    monkeypatch.setattr(pool_module, "Executor", lambda on_event, **kw: made.append(kw) or "one")
    assert pool_module.executor_for(print, device="cpu", gpus=["0", "1"]) == "one"
    assert made[0]["env"] == {"CUDA_VISIBLE_DEVICES": ""} and made[0]["device"] == "cpu"
    assert pool_module.executor_for(print, device="auto", gpus=["5"]) == "one"
    assert made[1]["env"] == {"CUDA_VISIBLE_DEVICES": "5"}


def test_slot_names_its_gpu():
    assert WorkerSlot("auto", {"CUDA_VISIBLE_DEVICES": "3"}).gpu == "3" and WorkerSlot("cpu").gpu is None
