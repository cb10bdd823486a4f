"""The scientist's side of the owners' decisions: requests for approval at every site, as a table.

A dataset whose owner set the ``review`` policy runs only plans the owner approved (for a number of jobs,
until an expiry). :meth:`voxgrid.Experiment.request_approval` asks every site of an experiment;
:meth:`voxgrid.Experiment.approvals` re-reads where each request stands, and
:meth:`voxgrid.Experiment.wait_for_approvals` waits for every owner's decision.
"""

from __future__ import annotations

import html
import time

from voxgrid.client import VoxgridError
from voxgrid.wire import ApprovalRequestInfo

_COLUMNS = ("node", "dataset", "state", "since", "reason", "request")
#: The title a node's 403 carries when a plan needs its owner's approval (nodes/service/approvals.py).
APPROVAL_NEEDED = "Approval needed (403)"


def _row(node: str, dataset: str, r: ApprovalRequestInfo | None, error: str | None = None) -> dict:
    if r is None:
        return {"node": node, "dataset": dataset, "state": "error" if error else "none", "since": "",
                "reason": error or "no request for this plan", "request": ""}
    state = r.state
    if state == "approved":
        state = f"approved ({r.releases - r.used} of {r.releases} left)" if r.valid else "approved (used up/expired)"
    reason = r.reason or (f"expires {r.expires[:10]}" if r.expires else "")
    return {"node": node, "dataset": dataset, "state": state, "since": (r.decided or r.created)[:16].replace("T", " "),
            "reason": reason, "request": r.request_id}


class ApprovalTable(list):
    """One row (a dict: node, dataset, state, since, reason, request) per site; prints as a table."""

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(list(self), columns=list(_COLUMNS))

    @property
    def approved(self) -> bool:
        """Whether every site has a valid approval for the plan."""
        return bool(self) and all(r["state"].startswith("approved (") and "left" in r["state"] for r in self)

    def __repr__(self) -> str:
        if not self:
            return "(no sites)"
        rows = [{c: str(r[c]) for c in _COLUMNS} for r in self]
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in _COLUMNS}
        line = "  ".join(c.ljust(widths[c]) for c in _COLUMNS)
        body = ["  ".join(r[c].ljust(widths[c]) for c in _COLUMNS).rstrip() for r in rows]
        return "\n".join([line.rstrip(), "-" * len(line.rstrip()), *body])

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in _COLUMNS) + "</tr>"
                       for r in self)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def request_approval(pointers, plan, purpose: str, releases: int | None) -> ApprovalTable:
    """Ask the owner of every pointer's dataset to approve ``plan``; a site that fails shows the error."""
    table = ApprovalTable()
    for p in pointers:
        try:
            r = p.client.request_approval(p.name, plan, releases=releases, purpose=purpose)
            table.append(_row(p.node, p.name, r))
        except VoxgridError as exc:
            table.append(_row(p.node, p.name, None, str(exc)))
    return table


def approvals(pointers, plan_hash: str) -> ApprovalTable:
    """Where the requests for the plan stand at every site (the newest request per site)."""
    table = ApprovalTable()
    for p in pointers:
        try:
            mine = [r for r in p.client.requests() if r.dataset == p.name and r.plan_hash == plan_hash]
            table.append(_row(p.node, p.name, _best(mine)))
        except VoxgridError as exc:
            table.append(_row(p.node, p.name, None, str(exc)))
    return table


class ApprovalsNotGranted(VoxgridError):
    """Not every site approved: one denied or revoked (raised at once), or the wait timed out. ``table``:
    where each site stands."""

    def __init__(self, message: str, table: ApprovalTable):
        super().__init__(f"{message}\n{table!r}")
        self.table = table


def wait(pointers, plan_hash: str, timeout: float, poll: float = 10.0) -> ApprovalTable:
    """The approvals table once every site approved the plan; :class:`ApprovalsNotGranted` at once when
    a site denied or revoked it (an owner's no does not turn into a yes by waiting), or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        table = approvals(pointers, plan_hash)
        if table.approved:
            return table
        refused = [f"{r['node']} ({r['state']}: {r['reason'] or 'no reason given'})" for r in table
                   if r["state"] in ("denied", "revoked")]
        if refused:
            raise ApprovalsNotGranted(f"not approved at {', '.join(refused)}", table)
        if time.monotonic() + poll > deadline:
            waiting = [r["node"] for r in table if not r["state"].startswith("approved (")]
            raise ApprovalsNotGranted(f"still waiting for {', '.join(waiting)} after {timeout:g} s", table)
        time.sleep(poll)


def _best(requests: list[ApprovalRequestInfo]) -> ApprovalRequestInfo | None:
    """A valid approval if there is one, else the newest request."""
    valid = [r for r in requests if r.valid]
    return valid[0] if valid else (max(requests, key=lambda r: r.created) if requests else None)


def approval_hint(pointers, errors: list[str | None]) -> str:
    """For a failed round: which sites refused for want of their owner's approval, and what to do."""
    needing = [f"{p.node} ({p.name})" for p, err in zip(pointers, errors, strict=True)
               if err and APPROVAL_NEEDED in err]
    if not needing:
        return ""
    return (f". Sites that need their owner's approval of this plan: {', '.join(needing)}. Each recorded a request; "
            f"add your purpose and the jobs you need with exp.request_approval(purpose='...'), then follow the "
            f"owners' decisions with exp.approvals() and run again once they approved")
