"""The job runner rides out a node it transiently cannot reach (a relay restarting) while the job runs.

A real outage of just the right length is slow and hard to cause on cue, so a small in-process fake
NodeClient raises ``Unreachable`` on its long-polls, and a fake clock makes the backoff instant.
Everything else the runner does is covered end to end against real nodes (test_e2e*.py).
"""

import ssl

import pytest
import torch

from voxgrid import tensors
from voxgrid.client import Unreachable
from voxgrid.jobs import BACKOFF_FIRST_S, BACKOFF_MAX_S, JobRunner, NodeUnreachable
from voxgrid.pointers import DatasetPointer
from voxgrid.wire import DatasetInfo, JobRequest, JobStatus, Metrics, WeightsRef

W = {"w": torch.tensor([1.0])}
BLOB = tensors.dumps(W)


class Clock:
    """time.monotonic and time.sleep, without waiting."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


class FlakyNode:
    """A node whose answers to the long-polls follow ``script``: ``L`` lost (``Unreachable``), ``R``
    still running, ``D`` done; ``None``: it is never reached."""

    def __init__(self, clock: Clock, script: str | None, cause: Exception | None = None):
        self.clock, self.script, self.cause = clock, script, cause
        self.polls, self.uploads, self.cancelled = [], 0, []

    def put_weights(self, blob):
        self.uploads += 1
        return WeightsRef(weights_id=tensors.digest(blob), bytes=len(blob))

    def _status(self, state):
        return JobStatus(job_id="job-7", kind="train", experiment_id="exp-1", round=0, dataset="site-a", state=state,
                         metrics=Metrics(samples=3) if state == "done" else None, has_update=state == "done")

    def submit(self, req):
        return self._status("queued")

    def job(self, job_id, wait=0.0):
        assert job_id == "job-7" and wait > 0
        self.polls.append(self.clock.now)
        answer = "L" if self.script is None else self.script[len(self.polls) - 1]
        if answer == "L":
            exc = Unreachable("https://relay.test: cannot reach server: [Errno 111] Connection refused")
            raise exc from self.cause
        return self._status({"R": "running", "D": "done"}[answer])

    def update(self, job_id):
        return tensors.dumps({"w": torch.tensor([0.5])})

    def cancel(self, job_id):
        self.cancelled.append(job_id)
        return self._status("failed")


def _pointer(node):
    info = DatasetInfo(name="site-a", tags=["#ct"], volumes=4, label_names=["background", "pancreas"],
                       splits={"train": 2, "val": 1, "test": 1})
    return DatasetPointer("node-a", "https://node-a.test", info, node)


def _req():
    return JobRequest(kind="train", experiment_id="exp-1", round=0, dataset="site-a", plan={}, plan_hash="h",
                      weights_id=tensors.digest(BLOB))


def test_a_transiently_unreachable_node_is_polled_again_with_backoff_until_the_job_ends():
    clock = Clock()
    node = FlakyNode(clock, "LLLLD")
    runner = JobRunner(600, unreachable_timeout=60, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)
    st, delta = runner.train(_pointer(node), _req(), BLOB, like=W)
    assert st.state == "done" and st.job_id == "job-7" and torch.equal(delta["w"], torch.tensor([0.5]))
    assert len(node.polls) == 5 and node.uploads == 1 and not node.cancelled
    # exponential: 0.5, 1, 2, 4 s (jitter pinned to its top)
    assert clock.sleeps == [BACKOFF_FIRST_S * 2 ** i for i in range(4)]


def test_the_backoff_is_jittered_and_capped():
    runner = JobRunner(jitter=iter([0.0, 1.0, 0.5] * 10).__next__)
    pauses = [runner.backoff(a) for a in range(9)]
    for a, pause in enumerate(pauses):
        top = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** a)
        assert top / 2 <= pause <= top
    assert pauses[0] == BACKOFF_FIRST_S / 2 and pauses[1] == 2 * BACKOFF_FIRST_S and max(pauses) <= BACKOFF_MAX_S
    assert len(set(pauses[6:])) == 3  # capped, and still spread by the jitter


def test_each_outage_gets_the_full_bound():
    clock = Clock()
    node = FlakyNode(clock, "LLLRLLLD")  # two outages of 2 s each, a bound of 2 s
    runner = JobRunner(600, unreachable_timeout=2.0, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)
    assert runner.run(_pointer(node), _req(), BLOB).state == "done"
    assert clock.sleeps == [0.5, 1.0, 0.5] * 2  # the last pause of each is cut to the bound


def test_it_gives_up_after_the_bound_naming_node_and_job():
    clock = Clock()
    node = FlakyNode(clock, None)
    runner = JobRunner(600, unreachable_timeout=30, clock=clock, sleep=clock.sleep)
    t0 = clock.now
    with pytest.raises(NodeUnreachable) as e:
        runner.run(_pointer(node), _req(), BLOB)
    assert isinstance(e.value, Unreachable)  # callers that catch Unreachable still do
    assert (e.value.node, e.value.job_id) == ("node-a", "job-7")
    assert "node node-a, job job-7" in str(e.value) and "cannot reach" in str(e.value)
    assert "Connection refused" in str(e.value)  # the last transport error
    assert clock.now - t0 == pytest.approx(30)  # the bound, not a second more
    assert len(node.polls) > 5 and sum(clock.sleeps) == pytest.approx(30)
    assert not node.cancelled  # nothing to ask a node that cannot be reached


def test_it_never_waits_past_the_jobs_own_deadline():
    clock = Clock()
    node = FlakyNode(clock, None)
    runner = JobRunner(unreachable_timeout=60, clock=clock, sleep=clock.sleep)
    t0 = clock.now
    with pytest.raises(NodeUnreachable, match="job-7"):
        runner.run(_pointer(node), _req(), BLOB, timeout=5)
    assert clock.now - t0 == pytest.approx(5)


def test_an_untrusted_certificate_is_not_retried():
    clock = Clock()
    node = FlakyNode(clock, None, cause=ssl.SSLCertVerificationError("CERTIFICATE_VERIFY_FAILED"))
    runner = JobRunner(clock=clock, sleep=clock.sleep)
    with pytest.raises(Unreachable) as e:
        runner.run(_pointer(node), _req(), BLOB)
    assert not isinstance(e.value, NodeUnreachable) and len(node.polls) == 1 and not clock.sleeps


def test_with_the_real_clock_the_bound_holds():
    import time

    node = FlakyNode(Clock(), None)
    runner = JobRunner(unreachable_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(NodeUnreachable, match="node node-a, job job-7"):
        runner.run(_pointer(node), _req(), BLOB)
    assert 0.3 <= time.monotonic() - t0 < 1.5 and len(node.polls) >= 2
