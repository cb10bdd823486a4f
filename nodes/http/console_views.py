"""What the owner console's templates show, in words: plan fields, changes, the hash, projected cost."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from voxgrid.privacy.ledger import fmt_epsilon
from voxgrid.privacy.report import describe
from voxgrid.wire import ApprovalRequestInfo, Estimate

from voxgrid.nodes.ops.approvals_cli import KEY_FIELDS, hash_blocks
from voxgrid.nodes.service.approvals import flatten


def local_path(path: str | None) -> str:
    """``path`` if it is a page of this console (no other host, no scheme), else the requests page."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/requests"
    return path


def when(iso: str | None) -> str:
    """An ISO time as ``2026-11-30 14:50 UTC`` (a dash for none)."""
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def value(v) -> str:
    """A plan value for people: strings as they are, the rest as JSON; long ones shortened."""
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 120 else text[:117] + "..."


def status(r: ApprovalRequestInfo) -> str:
    """The request's state in words, as ``voxgrid node requests list`` prints it."""
    if r.state != "approved":
        return r.state
    if r.valid:
        return f"approved ({(r.releases or 0) - r.used} of {r.releases} left)"
    return "approved (used up)" if r.used >= (r.releases or 0) else "approved (expired)"


def plan_groups(plan: dict | None) -> list[tuple[str, list[tuple[str, str, bool]]]]:
    """The plan's fields grouped by top-level section: (section, [(field, value, look first)]); plain top-level
    fields (``batch_size``) come first, in a group named ""."""
    groups: dict[str, list] = {"": []}
    for field, v in flatten(plan or {}).items():
        section = field.split(".")[0].split("[")[0]
        groups.setdefault("" if section == field else section, []).append(
            (field, value(v), bool(KEY_FIELDS.search(field))))
    return [(k, rows) for k, rows in groups.items() if rows]


def changes(r: ApprovalRequestInfo) -> list[tuple[str, str, str, bool]]:
    """(field, before, after, look first) for each field that changed against the nearest approved plan."""
    return [(c.field, "—" if c.before is None else value(c.before), "—" if c.after is None else value(c.after),
             bool(KEY_FIELDS.search(c.field))) for c in r.changes or []]


def _eps(x: float | None) -> str:
    return "unbounded" if x is None else fmt_epsilon(x)


def projected(est: Estimate | None) -> dict | None:
    """The projected privacy cost of a request's releases, in words and numbers (None: not given)."""
    if est is None:
        return None
    at = f" at δ={est.delta:g}" if est.delta is not None else ""
    if not est.dp:
        headline = (f"{est.releases} release(s) without differential privacy: no ε bound holds for "
                    f"{est.scientist} on {est.dataset} after them")
    else:
        prv = f" (PRV {fmt_epsilon(est.epsilon_per_release_prv)})" if est.epsilon_per_release_prv else ""
        headline = (f"ε {_eps(est.epsilon_per_release)} per release{prv}; ε {_eps(est.epsilon_total)} for all "
                    f"{est.releases} release(s){at}")
    budgets = [{"who": b.scientist or "all scientists together", "budget": f"{fmt_epsilon(b.epsilon)} at δ={b.delta:g}",
                "spent": _eps(b.spent), "projected": _eps(b.projected), "remaining": fmt_epsilon(b.remaining),
                "fits": b.fits} for b in est.budgets]
    return {"dp": est.dp, "headline": headline, "mechanism": describe(est.mechanism, est.parameters),
            "budgets": budgets}


def request_view(r: ApprovalRequestInfo) -> dict:
    """Everything the request page shows besides the raw fields."""
    algorithm, _, digest = r.plan_hash.rpartition(":")
    return {"status": status(r), "hash_algorithm": algorithm or "hash", "hash_lines": hash_blocks(digest, per_line=4),
            "groups": plan_groups(r.plan),
            "changes": changes(r), "projected": projected(getattr(r, "projected", None)),
            "findings": getattr(r, "findings", None) or [], "default_releases": r.releases_asked or 1}
