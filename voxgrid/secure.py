"""A secure round, scientist side: the experiment relays keys and shares and learns only the sum.

The protocol is :mod:`voxgrid.privacy.secagg` (pairwise masks, Shamir shares for dropouts).
One round, with every call to a node in parallel:

1. keys: each node makes fresh key pairs and signs them with its federation identity;
2. shares: each node checks everyone's keys and splits its secrets for the others;
3. train: each node runs its job (started before step 1, so steps 1-2 overlap training), then
   masks its weighted update with the shares relayed to it;
4. reveal: the nodes that sent a masked update reveal the shares needed to cancel the masks.

A node that fails at any step is dropped; the sum is recovered as long as ``threshold`` nodes
stay to the end. The aggregator then divides the weighted sum by the total weight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from voxgrid.client import VoxgridError
from voxgrid.pointers import DatasetPointer
from voxgrid.privacy.secagg import SecAggConfig, SecAggError, SecAggServer, unpack_words
from voxgrid.tensors import StateDict, unflatten
from voxgrid.wire import JobStatus, SecAggKeysRequest, SecAggMaskedRequest, SecAggSharesRequest, SecureAggregation

#: Largest magnitude of an update entry the ring holds (larger entries are clipped): a round's
#: weight deltas are orders of magnitude smaller.
CLIP = 100.0
#: Ring Z_2^32: the weighted mean's rounding error is at most about n * CLIP / 2^32 * (n * max_weight /
#: total weight), ~1e-7 for three balanced sites, and the masked update is as large as a float32 one.
BITS = 32


class SecureAggregationRefused(ValueError):
    """The experiment cannot run under secure aggregation; the message names the strategy and says why."""


def check_secure(strategy, pointers: Sequence[DatasetPointer], threshold: int | None,
                 neighbours: int | None = None) -> int:
    """Refuse what secure aggregation cannot do; returns the threshold (default: a majority of each
    node's group, at least 2). ``neighbours``: SecAgg+ graph degree (even), None for the complete graph."""
    if strategy.secure_weight is None:
        raise SecureAggregationRefused(f"strategy {strategy.name!r} cannot run with secure aggregation: "
                                       f"{strategy.secure_refusal}")
    nodes = [p.node for p in pointers]
    if len(nodes) < 2:
        raise ValueError("secure aggregation needs at least 2 nodes: with one, the sum is that node's update")
    twice = sorted({n for n in nodes if nodes.count(n) > 1})
    if twice:
        raise ValueError(f"secure aggregation takes one dataset per node (a node is one party of the sum); "
                         f"{twice} appear more than once")
    t = SecAggConfig.default_threshold(len(nodes), neighbours) if threshold is None else threshold
    try:  # the protocol's own rules: 2 <= t <= group size and t > group size / 2; an even degree
        SecAggConfig(experiment_id="check", round=0, nodes=tuple(nodes), threshold=t, neighbours=neighbours)
    except SecAggError as exc:
        raise ValueError(f"threshold={threshold}, neighbours={neighbours}: {exc}") from None
    return t


def round_config(experiment_id: str, rnd: int, pointers: Sequence[DatasetPointer], weight: str, threshold: int,
                 neighbours: int | None = None) -> SecAggConfig:
    """The round's protocol parameters; ``max_weight`` bounds what any node may weigh its update by
    (the largest published train split for ``"samples"``, 1 for a Dice)."""
    max_weight = 1.0 if weight == "val_dice" else float(max(p.info.splits.get("train", p.info.volumes)
                                                            for p in pointers))
    return SecAggConfig(experiment_id=experiment_id, round=rnd, nodes=tuple(p.node for p in pointers),
                        threshold=threshold, clip=CLIP, max_weight=max(max_weight, 1.0), bits=BITS,
                        neighbours=neighbours)


@dataclass
class SecureOutcome:
    """What a secure round gives the experiment: per pointer (status, error), and the mean delta."""

    outcomes: list[tuple[JobStatus | None, str | None]]
    mean_delta: StateDict | None = None
    error: str | None = None
    dropped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step, as the aggregator saw them


def _parallel(fn: Callable, items: list) -> list:
    """``fn`` over ``items`` in threads; each result is (value, None) or (None, "Type: message")."""
    def safe(x):
        try:
            return fn(x), None
        except (VoxgridError, SecAggError, TimeoutError, ValueError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(safe, items))


def secure_round(*, config: SecAggConfig, weight: str, pointers: list[DatasetPointer], like: StateDict,
                 submit: Callable[[DatasetPointer, SecureAggregation], object],
                 wait: Callable[[DatasetPointer, object], JobStatus]) -> SecureOutcome:
    """Run one secure round. ``submit(pointer, secure)`` sends the train job and returns a ticket;
    ``wait(pointer, ticket)`` waits for the job's status. The jobs start first, so the key agreement
    runs while the nodes train."""
    secure = SecureAggregation(config=config.to_json(), weight=weight)
    server = SecAggServer(config)
    errors: dict[str, str] = {}

    timings: dict[str, float] = {}

    def step(name: str, fn: Callable, items: list) -> list:
        t0 = time.perf_counter()
        results = _parallel(fn, items)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        kept = []
        for p, (value, err) in zip(items, results, strict=True):  # one result per item
            if err is None:
                kept.append((p, value))
            else:
                errors[p.node] = f"{name}: {err}"
        return kept

    tickets = dict((p.node, t) for p, t in step("submit", lambda p: submit(p, secure), list(pointers)))
    alive = [p for p in pointers if p.node in tickets]
    for p, keys in step("keys", lambda p: p.client.secagg_keys(SecAggKeysRequest(dataset=p.name, secure=secure)),
                        alive):
        try:
            server.add_keys(keys)
        except SecAggError as exc:
            errors[p.node] = f"keys: {exc}"
    alive = [p for p in alive if p.node not in errors]
    roster = server.roster()
    shared = step("shares", lambda p: p.client.secagg_shares(
        SecAggSharesRequest(experiment_id=config.experiment_id, round=config.round, roster=roster)), alive)
    sharers = []
    for p, shares in shared:  # one node's bad shares drop that node, not the round
        try:
            server.route(shares)
            sharers.append(p)
        except SecAggError as exc:
            errors[p.node] = f"shares: {exc}"
    inboxes = server.inboxes()
    statuses: dict[str, JobStatus] = {}
    lock = threading.Lock()

    def train(p: DatasetPointer) -> JobStatus:
        st = wait(p, tickets[p.node])
        statuses[p.node] = st  # metrics and receipt, even if masking fails after
        t0 = time.perf_counter()
        words = p.client.secagg_masked(SecAggMaskedRequest(job_id=st.job_id, inbox=inboxes.get(p.node, [])))
        masked = unpack_words(words, bits=config.bits)
        with lock:  # the aggregator's running sum is not thread-safe
            server.add_masked(p.node, masked)
            timings["masked (slowest node)"] = max(timings.get("masked (slowest node)", 0.0),
                                                   time.perf_counter() - t0)
        return st

    done = step("train", train, sharers)
    outcome = SecureOutcome(outcomes=[(statuses.get(p.node), errors.get(p.node)) for p in pointers], dropped=errors,
                            timings=timings)
    try:
        summed = set(server.reveal_request().survivors)
        revealed = step("reveal", lambda p: p.client.secagg_reveal(server.reveal_request(p.node)),
                        [p for p, _ in done])
        # A node whose masked update is in the sum counts, even if it then failed to reveal its shares.
        outcome.outcomes = [(statuses.get(p.node), None if p.node in summed else errors.get(p.node))
                            for p in pointers]
        t0 = time.perf_counter()
        total, weight_sum = server.unmask([s for _, shares in revealed for s in shares])
        timings["unmask"] = time.perf_counter() - t0
    except SecAggError as exc:
        outcome.error = f"secure aggregation could not unmask the sum: {exc}"
        return outcome
    if not weight_sum > 0:
        outcome.error = f"the nodes' total weight ({weight}) is {weight_sum}: nothing to average"
        return outcome
    outcome.mean_delta = unflatten(total / weight_sum, like)
    return outcome
