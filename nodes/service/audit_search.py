"""The audit log, filtered (the owner console's audit page): by actor, action and date, newest first."""

from __future__ import annotations

from datetime import date, timedelta

from voxgrid.wire import AuditEntry

from voxgrid.nodes.service.node import Caller, Invalid, NodeService, require

#: Most entries one search returns.
MAX_ENTRIES = 2000


def _day(text: str | None, field: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise Invalid(f"{field} must be a date YYYY-MM-DD, got {text!r}") from None


def search_audit(service: NodeService, caller: Caller, actor: str | None = None, action: str | None = None,
                 since: str | None = None, until: str | None = None, limit: int = 500) -> list[AuditEntry]:
    """Entries whose actor is ``actor``, whose action starts with ``action`` ("request." finds every request
    entry), and made from day ``since`` through day ``until`` (UTC, inclusive); newest first."""
    require(caller, "owner")
    if not 1 <= limit <= MAX_ENTRIES:
        raise Invalid(f"limit must be from 1 to {MAX_ENTRIES}, got {limit}")
    first, last = _day(since, "since"), _day(until, "until")
    sql, args = "SELECT at, actor, action, detail FROM audit WHERE 1=1", []
    if actor:
        sql, args = sql + " AND actor = ?", [*args, actor]
    if action:  # a prefix, matched literally (no LIKE wildcards from the form)
        sql, args = sql + " AND substr(action, 1, ?) = ?", [*args, len(action), action]
    if first:
        sql, args = sql + " AND at >= ?", [*args, first.isoformat()]
    if last:
        sql, args = sql + " AND at < ?", [*args, (last + timedelta(days=1)).isoformat()]
    rows = service.store.query(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
    return [AuditEntry(**dict(r)) for r in rows]


def audit_actors(service: NodeService, caller: Caller) -> list[str]:
    """Everyone who appears in the audit log (the filter's choices)."""
    require(caller, "owner")
    return [r["actor"] for r in service.store.query("SELECT DISTINCT actor FROM audit ORDER BY actor")]
