"""The job runner: how the scientist's side runs one job at one node.

Upload the weights (once per node and blob), submit, long-poll until the job ends, fetch the
update. :class:`~voxgrid.experiment.Experiment`, cross-site evaluation and the local baselines all
go through one :class:`JobRunner`, over the :class:`~voxgrid.client.NodeClient` interface only.

A poll that cannot reach the node (a relay that restarts, a flaky link) does not end the job: the
job keeps running at the node, so the runner polls again after an exponential backoff with jitter,
for up to ``unreachable_timeout`` seconds (and never past the job's own deadline), then gives up
with :class:`NodeUnreachable` naming the node and the job.

Every failure is a :class:`JobError` naming node and job: :class:`WeightsMismatch`,
:class:`JobFailed`, :class:`JobTimedOut` (also a ``TimeoutError``), :class:`NodeUnreachable` (also
a :class:`~voxgrid.client.Unreachable`), :class:`BadUpdate` (also a ``ValueError``).
"""

from __future__ import annotations

import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from voxgrid import tensors
from voxgrid.client import RequestRefused, Unreachable, VoxgridError
from voxgrid.tensors import StateDict
from voxgrid.wire import JobRequest, JobStatus

if TYPE_CHECKING:
    from voxgrid.pointers import DatasetPointer

#: Longest single long-poll, in seconds; the node answers as soon as the job ends.
POLL_S = 30.0
#: How long a node may stay unreachable while a job is awaited before the runner gives up.
UNREACHABLE_S = 60.0  # a node behind the grid's relay: the grid may restart and the node redial (<= 30 s backoff)
UNREACHABLE_DIRECT_S = 10.0  # a node reached directly: unreachable is most often down; drop it from the round soon
#: Backoff between polls of an unreachable node: doubles from the first to the largest pause.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0

#: What a failed job at one site raises; the experiment drops that site and records why.
JOB_ERRORS = (VoxgridError, TimeoutError, ValueError, OSError)

T = TypeVar("T")
R = TypeVar("R")


class JobError(VoxgridError):
    """A job at a node gave no result. ``node`` names the node, ``job_id`` the job (None before
    the node accepted it)."""

    def __init__(self, message: str, *, node: str, job_id: str | None = None):
        where = f"node {node}" + (f", job {job_id}" if job_id else "")
        super().__init__(f"{where}: {message}")
        self.node, self.job_id = node, job_id


class WeightsMismatch(JobError):
    """The node stored the uploaded weights under another content address than ours."""


class JobFailed(JobError):
    """The job ended failed at the node; ``reason`` is the node's error."""

    def __init__(self, reason: str | None, *, node: str, job_id: str):
        super().__init__(f"job failed at the node: {reason}", node=node, job_id=job_id)
        self.reason = reason


class JobTimedOut(JobError, TimeoutError):
    """The job did not end within its timeout (the runner then asks the node to cancel it)."""


class NodeUnreachable(JobError, Unreachable):
    """The node could not be reached for longer than the runner waits; the job may still be running there."""


class BadUpdate(JobError, ValueError):
    """The update the node released is not valid safetensors, or does not match the network."""


@dataclass
class Ticket:
    """A submitted job: the status the node answered with, and the ``time.monotonic`` deadline by
    which it must end (``timeout`` seconds after the submission began)."""

    node: str
    status: JobStatus
    deadline: float
    timeout: float

    @property
    def job_id(self) -> str:
        return self.status.job_id


def across_nodes(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` (one per node or dataset), each in its own thread; results in order."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def describe(exc: BaseException) -> str:
    """How a site's failure is recorded: ``"JobTimedOut: node n, job j: did not finish ..."``."""
    return f"{type(exc).__name__}: {exc}"


def _permanent(exc: Unreachable) -> bool:
    """An Unreachable that retrying cannot cure: the node's certificate is not trusted."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class JobRunner:
    """Runs jobs at nodes; safe to share between threads (one per node).

    Args:
        timeout: default seconds a job has, from its submission, to end (callers may pass their own).
        unreachable_timeout: seconds a node may stay unreachable while a job is awaited (default: 60 s
            for a node reached through the grid's relay, 10 s for one reached directly).
        poll: longest single long-poll.
        clock, sleep, jitter: ``time.monotonic``, ``time.sleep`` and ``random.random`` by default;
            replaceable so that the backoff can be tested without waiting.
    """

    def __init__(self, timeout: float = 600.0, *, unreachable_timeout: float | None = None, poll: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] = random.random):
        self.timeout = timeout
        self.unreachable_timeout = unreachable_timeout
        self.poll = poll
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._sent: dict[str, set[str]] = {}  # node URL -> weights ids uploaded there by this runner
        self._lock = threading.Lock()

    # weights ---------------------------------------------------------------------------------
    def put_weights(self, p: DatasetPointer, blob: bytes, weights_id: str | None = None, *,
                    force: bool = False) -> bool:
        """Upload ``blob`` unless this runner already sent it to the node; True if uploaded."""
        weights_id = weights_id or tensors.digest(blob)
        if not force:
            with self._lock:
                if weights_id in self._sent.get(p.url, ()):
                    return False
        ref = p.client.put_weights(blob)
        if ref.weights_id != weights_id:
            raise WeightsMismatch(f"stored the weights under {ref.weights_id}, expected {weights_id}", node=p.node)
        with self._lock:
            self._sent.setdefault(p.url, set()).add(weights_id)
        return True

    # one job -----------------------------------------------------------------------------------
    def submit(self, p: DatasetPointer, req: JobRequest, blob: bytes, timeout: float | None = None) -> Ticket:
        """Upload the weights if the node lacks them, then submit; the job's clock starts now."""
        timeout = self.timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        uploaded = self.put_weights(p, blob, req.weights_id)
        try:
            st = p.client.submit(req)
        except RequestRefused:
            if uploaded:
                raise
            # The node no longer holds the weights sent earlier (e.g. a rebuilt home): send them again.
            self.put_weights(p, blob, req.weights_id, force=True)
            st = p.client.submit(req)
        return Ticket(p.node, st, deadline, timeout)

    def wait(self, p: DatasetPointer, ticket: Ticket) -> JobStatus:
        """Long-poll until the job ends; its final status if done, else :class:`JobFailed`,
        :class:`JobTimedOut` or :class:`NodeUnreachable`."""
        st = ticket.status
        while st.state in ("queued", "running"):
            if self._clock() > ticket.deadline:
                self._cancel(p, st.job_id)
                raise JobTimedOut(f"did not finish within {ticket.timeout:.0f} s", node=p.node, job_id=st.job_id)
            st = self._poll(p, st.job_id, ticket.deadline)
        if st.state == "failed":
            raise JobFailed(st.error, node=p.node, job_id=st.job_id)
        return st

    def run(self, p: DatasetPointer, req: JobRequest, blob: bytes, timeout: float | None = None) -> JobStatus:
        """Submit and wait: the job's final status."""
        return self.wait(p, self.submit(p, req, blob, timeout))

    def update(self, p: DatasetPointer, st: JobStatus, like: StateDict) -> StateDict:
        """Fetch a done train job's update and check it fits ``like`` (the weights it started from)."""
        blob = p.client.update(st.job_id)
        try:
            delta = tensors.loads(blob)
            tensors.check_compatible(like, delta)
        except tensors.TensorsError as exc:
            raise BadUpdate(f"unusable update: {exc}", node=p.node, job_id=st.job_id) from exc
        return delta

    def train(self, p: DatasetPointer, req: JobRequest, blob: bytes, like: StateDict,
              timeout: float | None = None) -> tuple[JobStatus, StateDict]:
        """Run a train job and fetch its update: (final status, weight delta)."""
        st = self.run(p, req, blob, timeout)
        return st, self.update(p, st, like)

    # waiting -----------------------------------------------------------------------------------
    def _poll(self, p: DatasetPointer, job_id: str, deadline: float) -> JobStatus:
        """One long-poll; while the node is unreachable, poll again after a backoff, up to the bound."""
        lost_since: float | None = None
        attempt = 0
        while True:
            try:
                return p.client.job(job_id, wait=min(self.poll, max(0.1, deadline - self._clock())))
            except Unreachable as exc:
                if _permanent(exc):
                    raise
                now = self._clock()
                lost_since = now if lost_since is None else lost_since
                bound = self._unreachable_bound(p)
                give_up = min(lost_since + bound, deadline)
                if now >= give_up:
                    raise NodeUnreachable(
                        f"cannot reach the node to wait for the job: unreachable for {now - lost_since:.0f} s "
                        f"over {attempt + 1} polls (the limit is {bound:.0f} s, within the job's "
                        f"deadline); the job may still be running there. Last error: {exc}",
                        node=p.node, job_id=job_id) from exc
                self._sleep(min(self.backoff(attempt), give_up - now))
                attempt += 1

    def _unreachable_bound(self, p: DatasetPointer) -> float:
        if self.unreachable_timeout is not None:
            return self.unreachable_timeout
        return UNREACHABLE_S if getattr(p.client, "relayed", False) else UNREACHABLE_DIRECT_S

    def backoff(self, attempt: int) -> float:
        """Pause before poll ``attempt + 1`` of an unreachable node: doubling, half of it random."""
        pause = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
        return pause * (0.5 + 0.5 * self._jitter())

    def _cancel(self, p: DatasetPointer, job_id: str) -> None:
        """Ask the node to stop a job nobody waits for any more; best effort."""
        try:
            p.client.cancel(job_id)
        except (VoxgridError, OSError):
            pass  # unreachable, or already ended: the timeout is what the caller needs to hear
