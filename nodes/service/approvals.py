"""The owner decides (DESIGN.md, "The owner decides"): dataset policies, approval requests, decisions.

A dataset's policy is ``open`` (every valid plan runs), ``review`` (every plan needs its owner's approval
before it runs; new datasets start here) or ``rules`` (a plan meeting the owner's rules, checked with the
node's own accountant by :mod:`.rules`, is approved automatically, once per scientist and plan, and
recorded as decided by ``rules``; anything else waits for review). A scientist's job that no valid
approval covers is refused (:class:`ApprovalNeeded`, 403) and the node records a request for the
(scientist, dataset, plan hash) triple, or reuses the pending one. An approval binds that triple, a number
of releases (each train or evaluate job the node accepts uses one) and an expiry. Every request, decision
and revocation is written to the audit log in the same transaction as the change, before it takes effect.
Revoking refuses later jobs and stops the ones it covered that have not finished: queued jobs are cancelled,
and a running job's update and metrics are withheld when it ends (:meth:`Approvals.revoked_job`).

Service layer only (no HTTP here): roles are checked with :func:`~voxgrid.nodes.service.node.require`,
errors are :class:`~voxgrid.nodes.service.node.ServiceError` subclasses.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

from typing import Callable

from voxgrid.plan import Plan, PlanError
from voxgrid.privacy.records import Estimate
from voxgrid.wire import (MAX_APPROVAL_DAYS, MAX_RELEASES, ApprovalRequestCreate, ApprovalRequestInfo, PlanChange,
                          PolicyInfo, PolicyRules)

from voxgrid.nodes.service.db import now
from voxgrid.nodes.service.node import Caller, Forbidden, Invalid, NotFound, ServiceError, require
from voxgrid.nodes.service.rules import findings
from voxgrid.nodes.service.store import POLICIES, NodeStore

#: Days an approval lasts unless the owner says otherwise.
DEFAULT_DAYS = 30
#: Most pending requests one scientist may have at a node: each costs the owner's attention.
MAX_PENDING = 20
#: Who decides automatically under a 'rules' policy (``decided_by``).
RULES = "rules"

#: The node's cost estimate: (scientist, dataset, plan JSON, releases) -> Estimate, or None if none holds.
Estimator = Callable[[str, str, dict, int], "Estimate | None"]


class ApprovalNeeded(Forbidden):
    """403: the dataset is under review and no valid approval covers this scientist, dataset and plan."""

    title = "Approval needed"

    def __init__(self, detail: str, request_id: str | None):
        super().__init__(detail)
        self.request_id = request_id


class RequestNotFound(NotFound):
    """404: no request with that id (for this caller)."""


class RequestConflict(ServiceError):
    """409: the request is not in a state that allows this decision (approving twice, denying an approved one)."""

    status, title = 409, "Conflict"


class TooManyRequests(ServiceError):
    """429: the scientist already has :data:`MAX_PENDING` requests waiting at this node."""

    status, title = 429, "Too many pending requests"


def _stamp(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def flatten(value, prefix: str = "") -> dict[str, object]:
    """A plan's JSON as ``{dotted.path: leaf}`` (lists indexed: ``preprocessing[0].name``)."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def plan_changes(before: dict, after: dict) -> list[PlanChange]:
    """Every field whose value differs between two plans, by dotted path (absent: None)."""
    a, b = flatten(before), flatten(after)
    return [PlanChange(field=k, before=a.get(k), after=b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


class Approvals:
    """Policies, requests and decisions of one node, kept in its :class:`NodeStore`."""

    def __init__(self, store: NodeStore, node: str, estimate: Estimator | None = None):
        self.store, self.node = store, node
        self.estimate = estimate or (lambda scientist, dataset, plan, releases: None)

    # policies (owner) ---------------------------------------------------------------------------
    def policies(self, caller: Caller) -> list[PolicyInfo]:
        require(caller, "owner")
        return [self._policy(d, p) for d, p in self.store.policies().items()]

    def _policy(self, dataset: str, policy: str) -> PolicyInfo:
        rules = self.store.rules(dataset) if policy == "rules" else None
        return PolicyInfo(dataset=dataset, policy=policy, rules=PolicyRules(**rules) if rules is not None else None)

    def set_policy(self, caller: Caller, dataset: str, policy: str, rules: PolicyRules | None = None) -> PolicyInfo:
        """Set a dataset's policy; a 'rules' one without rules gets the default :class:`PolicyRules`."""
        require(caller, "owner")
        if policy not in POLICIES:
            raise Invalid(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
        if rules is not None and policy != "rules":
            raise Invalid(f"rules apply only to the 'rules' policy, not {policy!r}")
        if policy == "rules":
            rules = rules or PolicyRules()
        try:
            self.store.set_policy(dataset, policy, actor=caller.name,
                                  rules=rules.model_dump(mode="json") if rules else None)
        except KeyError:
            raise NotFound(f"no dataset named {dataset!r} at node {self.node!r}") from None
        return self._policy(dataset, policy)

    def rules_findings(self, scientist: str, dataset: str, plan: dict, plan_hash: str,
                       releases: int | None) -> list[str] | None:
        """What keeps the plan from automatic approval on a 'rules' dataset (None: not a 'rules' dataset)."""
        if self.store.policy(dataset) != "rules":
            return None
        rules = PolicyRules(**(self.store.rules(dataset) or {}))
        if self.store.query("SELECT 1 FROM approval_requests WHERE scientist=? AND dataset=? AND plan_hash=? AND "
                            "decided_by=?", (scientist, dataset, plan_hash, RULES)):
            return ["the rules already approved this plan for this scientist once; renewing needs the owner"]
        n = releases or rules.max_rounds
        return findings(rules, Plan.model_validate(plan), n, self.estimate(scientist, dataset, plan, n))

    # the scientist's side -----------------------------------------------------------------------
    def create(self, caller: Caller, req: ApprovalRequestCreate) -> ApprovalRequestInfo:
        """Record a request (or update the pending one for the same scientist, dataset and plan hash)."""
        require(caller, "scientist", "owner")
        if self.store.dataset(req.dataset) is None:
            raise NotFound(f"no dataset named {req.dataset!r} at node {self.node!r}")
        try:
            plan_hash = Plan.model_validate(req.plan).content_hash
        except (PlanError, ValueError) as exc:
            self.store.audit(caller.name, "request.refused", f"plan refused: {exc}")
            raise Invalid(f"plan refused by node {self.node!r}: {exc}") from None
        if plan_hash != req.plan_hash:
            raise Invalid(f"plan hash mismatch: request says {req.plan_hash}, plan hashes to {plan_hash}")
        with self.store.transaction() as c:
            pending = c.execute("SELECT * FROM approval_requests WHERE scientist=? AND dataset=? AND plan_hash=? "
                                "AND state='pending'", (caller.name, req.dataset, plan_hash)).fetchone()
            if pending is not None:
                request_id = pending["request_id"]
                self.store.audit(caller.name, "request.update", f"{request_id}: releases {req.releases}, "
                                                                f"purpose {req.purpose!r}", conn=c)
                c.execute("UPDATE approval_requests SET purpose=?, releases_asked=? WHERE request_id=?",
                          (req.purpose or pending["purpose"], req.releases or pending["releases_asked"], request_id))
            else:
                request_id = self._insert(c, caller.name, req.dataset, req.plan, plan_hash, req.purpose, req.releases)
        self._auto_approve(caller.name, req.dataset, req.plan, plan_hash, req.releases, request_id)
        return self.get(caller, request_id)

    def _insert(self, c, scientist: str, dataset: str, plan: dict, plan_hash: str, purpose: str = "",
                releases: int | None = None) -> str:
        """A new pending request (inside transaction ``c``), audited before the insert; at most
        :data:`MAX_PENDING` per scientist (:class:`TooManyRequests`)."""
        pending = c.execute("SELECT COUNT(*) FROM approval_requests WHERE scientist=? AND state='pending'",
                            (scientist,)).fetchone()[0]
        if pending >= MAX_PENDING:
            raise TooManyRequests(f"{scientist} already has {pending} requests waiting for the owner of node "
                                  f"{self.node!r} (at most {MAX_PENDING}): wait for decisions, or ask the owner")
        request_id = "r" + uuid.uuid4().hex[:11]
        self.store.audit(scientist, "request.create", f"{request_id}: {scientist} asks for plan {plan_hash} on "
                                                      f"{dataset}" + (f": {purpose}" if purpose else ""), conn=c)
        c.execute("INSERT INTO approval_requests (request_id, scientist, dataset, plan, plan_hash, purpose, "
                  "releases_asked, created_at, state) VALUES (?,?,?,?,?,?,?,?, 'pending')",
                  (request_id, scientist, dataset, json.dumps(plan, sort_keys=True), plan_hash, purpose or "",
                   releases, now()))
        return request_id

    def mine(self, caller: Caller) -> list[ApprovalRequestInfo]:
        """The caller's own requests, newest first."""
        require(caller, "scientist", "owner")
        rows = self.store.query("SELECT * FROM approval_requests WHERE scientist=? ORDER BY created_at DESC",
                                (caller.name,))
        return [self._info(r) for r in rows]

    def get(self, caller: Caller, request_id: str) -> ApprovalRequestInfo:
        """One request: a scientist's own (with its plan); for the owner, any, with the changes against
        the nearest plan the scientist already had approved here."""
        require(caller, "scientist", "owner")
        row = self._row(request_id)
        if row is None or (caller.role != "owner" and row["scientist"] != caller.name):
            raise RequestNotFound(f"no request {request_id!r} for {caller.name!r} at node {self.node!r}")
        info = self._info(row, plan=True)
        plan, n = json.loads(row["plan"]), row["releases"] or row["releases_asked"] or 1
        extra = {"projected": self.estimate(row["scientist"], row["dataset"], plan, n)}
        if row["state"] == "pending":
            extra["findings"] = self.rules_findings(row["scientist"], row["dataset"], plan, row["plan_hash"],
                                                    row["releases_asked"])
        info = info.model_copy(update=extra)
        if caller.role != "owner":
            return info
        nearest = self._nearest(row)
        if nearest is None:
            return info
        changes = plan_changes(json.loads(nearest["plan"]), json.loads(row["plan"]))
        return info.model_copy(update={"compared_with": nearest["request_id"], "changes": changes})

    def _nearest(self, row):
        """The scientist's approved (possibly since used up, expired or revoked) request whose plan differs
        from ``row``'s in the fewest fields; None if there is none."""
        others = self.store.query("SELECT * FROM approval_requests WHERE scientist=? AND request_id!=? "
                                  "AND releases IS NOT NULL ORDER BY created_at DESC",
                                  (row["scientist"], row["request_id"]))
        plan = json.loads(row["plan"])
        return min(others, key=lambda o: len(plan_changes(json.loads(o["plan"]), plan)), default=None)

    # the submit path ----------------------------------------------------------------------------
    def consume(self, caller: Caller, dataset: str, plan: dict, plan_hash: str, job_id: str) -> str | None:
        """Use one release of a valid approval for the job; returns the approval's request id (None: no
        approval needed: an open dataset, or the owner). Raises :class:`ApprovalNeeded` naming the request
        the node recorded (or reused) for the owner, or the denial or revocation that stands."""
        if caller.role == "owner" or self.store.policy(dataset) == "open":
            return None
        used = self._use(caller.name, dataset, plan_hash, job_id)
        if used is None and self._auto_approve(caller.name, dataset, plan, plan_hash, None):
            used = self._use(caller.name, dataset, plan_hash, job_id)
        if used is not None:
            return used
        why = self.rules_findings(caller.name, dataset, plan, plan_hash, None)
        with self.store.transaction() as c:
            refusal = self._refusal(c, caller.name, dataset, plan, plan_hash, now(), why)
        raise refusal  # after the commit: the recorded request stays

    def _use(self, scientist: str, dataset: str, plan_hash: str, job_id: str) -> str | None:
        """One release of a valid approval for the job, recorded against it; None: no valid approval."""
        with self.store.transaction() as c:
            found = c.execute("SELECT request_id FROM approval_requests WHERE scientist=? AND dataset=? AND "
                              "plan_hash=? AND state='approved' AND used < releases AND expires_at > ? "
                              "ORDER BY expires_at LIMIT 1", (scientist, dataset, plan_hash, now())).fetchone()
            if found is None:
                return None
            self.store.audit(scientist, "approval.use", f"{found['request_id']}: job {job_id}", conn=c)
            c.execute("UPDATE approval_requests SET used=used+1 WHERE request_id=?", (found["request_id"],))
            c.execute("INSERT OR IGNORE INTO approval_jobs (request_id, job_id) VALUES (?,?)",
                      (found["request_id"], job_id))
            return found["request_id"]

    def _auto_approve(self, scientist: str, dataset: str, plan: dict, plan_hash: str, releases: int | None,
                      request_id: str | None = None) -> str | None:
        """On a 'rules' dataset, approve (the pending ``request_id``, or a new request) when the plan meets
        every rule; the request id, or None where the owner must decide."""
        if self.rules_findings(scientist, dataset, plan, plan_hash, releases) != []:
            return None
        rules = PolicyRules(**(self.store.rules(dataset) or {}))
        n = releases or rules.max_rounds
        expires = _stamp(datetime.now(timezone.utc) + timedelta(days=rules.days))
        with self.store.transaction() as c:
            pending = c.execute("SELECT request_id FROM approval_requests WHERE scientist=? AND dataset=? AND "
                                "plan_hash=? AND state='pending'", (scientist, dataset, plan_hash)).fetchone()
            request_id = request_id or (pending["request_id"] if pending else None)
            if request_id is None:
                request_id = self._insert(c, scientist, dataset, plan, plan_hash, releases=n)
            self.store.audit(RULES, "request.approve", f"{request_id}: plan {plan_hash} for {scientist} on "
                                                       f"{dataset} meets the owner's rules, {n} release(s), "
                                                       f"expires {expires}", conn=c)
            c.execute("UPDATE approval_requests SET state='approved', decided_at=?, decided_by=?, releases=?, "
                      "expires_at=? WHERE request_id=? AND state='pending'", (now(), RULES, n, expires, request_id))
        return request_id

    def revoked_job(self, job_id: str) -> str | None:
        """The revoked approval that covered the job, if any: its update and metrics must not leave."""
        rows = self.store.query("SELECT r.request_id FROM approval_jobs j JOIN approval_requests r "
                                "ON r.request_id=j.request_id WHERE j.job_id=? AND r.state='revoked'", (job_id,))
        return rows[0]["request_id"] if rows else None

    def jobs_of(self, request_id: str) -> list[str]:
        """The jobs an approval covered."""
        return [r["job_id"] for r in self.store.query("SELECT job_id FROM approval_jobs WHERE request_id=?",
                                                      (request_id,))]

    def _refusal(self, c, scientist: str, dataset: str, plan: dict, plan_hash: str, at: str,
                 why: list[str] | None = None) -> ApprovalNeeded:
        last = c.execute("SELECT * FROM approval_requests WHERE scientist=? AND dataset=? AND plan_hash=? "
                         "ORDER BY (state='pending') DESC, created_at DESC LIMIT 1",
                         (scientist, dataset, plan_hash)).fetchone()
        where = f"dataset {dataset!r} at node {self.node!r}"
        if last is not None and last["state"] in ("denied", "revoked"):
            self.store.audit(scientist, "job.refused", f"plan {plan_hash} on {dataset}: request "
                                                       f"{last['request_id']} {last['state']}", conn=c)
            return ApprovalNeeded(
                f"approval needed: the owner of {where} {last['state']} request {last['request_id']} for this plan"
                f" ({last['reason'] or 'no reason given'}); to ask again, create a new request (POST /v1/requests, "
                f"Experiment.request_approval)", last["request_id"])
        if last is not None and last["state"] == "pending":
            request_id, how = last["request_id"], "is waiting for"
        else:
            request_id = self._insert(c, scientist, dataset, plan, plan_hash)
            how = "was recorded for"
        self.store.audit(scientist, "job.refused", f"plan {plan_hash} on {dataset}: approval needed, request "
                                                   f"{request_id}", conn=c)
        used = " (the earlier approval is used up or expired)" if last is not None else ""
        rules = f" The plan does not meet the owner's rules: {'; '.join(why)}." if why else ""
        return ApprovalNeeded(f"approval needed: {where} runs only plans its owner approved; request {request_id} "
                              f"{how} the owner's decision{used}.{rules} Check it with GET /v1/requests/{request_id} "
                              f"(Experiment.approvals())", request_id)

    def refund(self, request_id: str | None, job_id: str) -> None:
        """Give back the release a job used when the node did not accept the job after all."""
        if request_id is None:
            return
        with self.store.transaction() as c:
            self.store.audit("node", "approval.refund", f"{request_id}: job {job_id} not accepted", conn=c)
            c.execute("UPDATE approval_requests SET used=MAX(used-1, 0) WHERE request_id=?", (request_id,))
            c.execute("DELETE FROM approval_jobs WHERE request_id=? AND job_id=?", (request_id, job_id))

    # the owner's decisions ----------------------------------------------------------------------
    def requests(self, caller: Caller, state: str | None = None) -> list[ApprovalRequestInfo]:
        """Every request (or those in ``state``), newest first."""
        require(caller, "owner")
        rows = self.store.query("SELECT * FROM approval_requests ORDER BY created_at DESC")
        return [self._info(r) for r in rows if state is None or r["state"] == state]

    def approve(self, caller: Caller, request_id: str, releases: int | None = None,
                days: float | None = None) -> ApprovalRequestInfo:
        """Approve a pending request for ``releases`` jobs (default: as many as asked, else 1) for ``days``
        (default :data:`DEFAULT_DAYS`)."""
        require(caller, "owner")
        if releases is not None and (isinstance(releases, bool) or not 1 <= releases <= MAX_RELEASES):
            raise Invalid(f"releases must be from 1 to {MAX_RELEASES}, got {releases!r}")
        if days is not None and not 0 < days <= MAX_APPROVAL_DAYS:
            raise Invalid(f"days must be more than 0 and at most {MAX_APPROVAL_DAYS}, got {days!r}")
        with self.store.transaction() as c:
            row = self._pending(c, request_id, "approve")
            releases = releases or row["releases_asked"] or 1
            expires = _stamp(datetime.now(timezone.utc) + timedelta(days=days or DEFAULT_DAYS))
            self.store.audit(caller.name, "request.approve",
                             f"{request_id}: plan {row['plan_hash']} for {row['scientist']} on {row['dataset']}, "
                             f"{releases} release(s), expires {expires}", conn=c)
            c.execute("UPDATE approval_requests SET state='approved', decided_at=?, decided_by=?, releases=?, "
                      "expires_at=? WHERE request_id=?", (now(), caller.name, releases, expires, request_id))
        return self._info(self._row(request_id))

    def deny(self, caller: Caller, request_id: str, reason: str) -> ApprovalRequestInfo:
        """Deny a pending request; the scientist sees ``reason``."""
        require(caller, "owner")
        if not (reason or "").strip():
            raise Invalid("a denial needs a reason (the scientist sees it)")
        with self.store.transaction() as c:
            row = self._pending(c, request_id, "deny")
            self.store.audit(caller.name, "request.deny", f"{request_id}: plan {row['plan_hash']} for "
                                                          f"{row['scientist']} on {row['dataset']}: {reason}", conn=c)
            c.execute("UPDATE approval_requests SET state='denied', decided_at=?, decided_by=?, reason=? "
                      "WHERE request_id=?", (now(), caller.name, reason.strip(), request_id))
        return self._info(self._row(request_id))

    def revoke(self, caller: Caller, request_id: str, reason: str | None = None) -> ApprovalRequestInfo:
        """Revoke an approval: later jobs are refused; its unfinished jobs are stopped by the node
        (:meth:`NodeService.revoke_approval`, :meth:`revoked_job`)."""
        require(caller, "owner")
        with self.store.transaction() as c:
            row = c.execute("SELECT * FROM approval_requests WHERE request_id=?", (request_id,)).fetchone()
            if row is None:
                raise RequestNotFound(f"no request {request_id!r} at node {self.node!r}")
            if row["state"] != "approved":
                hint = " (deny a pending request instead)" if row["state"] == "pending" else ""
                raise RequestConflict(f"request {request_id} is {row['state']}, not approved: nothing to revoke{hint}")
            self.store.audit(caller.name, "approval.revoke", f"{request_id}: plan {row['plan_hash']} for "
                                                             f"{row['scientist']} on {row['dataset']}"
                                                             + (f": {reason}" if reason else ""), conn=c)
            c.execute("UPDATE approval_requests SET state='revoked', reason=? WHERE request_id=?",
                      ((reason or "").strip() or None, request_id))
        return self._info(self._row(request_id))

    def _pending(self, c, request_id: str, verb: str):
        row = c.execute("SELECT * FROM approval_requests WHERE request_id=?", (request_id,)).fetchone()
        if row is None:
            raise RequestNotFound(f"no request {request_id!r} at node {self.node!r} ('requests list' shows them)")
        if row["state"] != "pending":
            raise RequestConflict(f"cannot {verb} request {request_id}: it is already {row['state']} "
                                  f"(by {row['decided_by']} at {row['decided_at']})")
        return row

    # rows -----------------------------------------------------------------------------------------
    def _row(self, request_id: str):
        rows = self.store.query("SELECT * FROM approval_requests WHERE request_id=?", (request_id,))
        return rows[0] if rows else None

    @staticmethod
    def _info(r, plan: bool = False) -> ApprovalRequestInfo:
        valid = (r["state"] == "approved" and r["used"] < (r["releases"] or 0) and (r["expires_at"] or "") > now())
        return ApprovalRequestInfo(
            request_id=r["request_id"], scientist=r["scientist"], dataset=r["dataset"], plan_hash=r["plan_hash"],
            purpose=r["purpose"], releases_asked=r["releases_asked"], created=r["created_at"], state=r["state"],
            decided=r["decided_at"], decided_by=r["decided_by"], reason=r["reason"], releases=r["releases"],
            used=r["used"], expires=r["expires_at"], valid=valid, plan=json.loads(r["plan"]) if plan else None)
