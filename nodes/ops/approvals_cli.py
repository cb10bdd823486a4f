"""``voxgrid node policy ...`` and ``voxgrid node requests ...``: the owner decides, in the terminal.

They work on the node's home (its SQLite store), so they act on a running node at once: the node reads
policies and approvals from the file at every job it is sent.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

from voxgrid.nodes.service.home import Home

OWNER_ROLE = "owner"
#: Plan fields the owner should look at first when a plan changed (marked '!' by ``requests show``).
KEY_FIELDS = re.compile(r"(^|\.)(lr|learning_rate|local_epochs|steps_per_epoch|rounds|epochs)\b|^privacy|noise|clip"
                        r"|epsilon|delta")


@contextmanager
def _approvals(path: Path):
    """The home's :class:`~voxgrid.nodes.service.approvals.Approvals`, the owner as caller; a refusal as
    ValueError (the CLI prints it and exits 2)."""
    from voxgrid.nodes.service.approvals import Approvals
    from voxgrid.nodes.service.node import Caller, ServiceError
    from voxgrid.nodes.service.store import NodeStore

    home = Home(path, "node")
    config = home.load()
    store = NodeStore(home.db_file)
    try:
        yield Approvals(store, config.name), Caller(OWNER_ROLE, OWNER_ROLE)
    except ServiceError as exc:
        raise ValueError(exc.detail) from None
    finally:
        store.close()


def hash_blocks(plan_hash: str, per_line: int = 4) -> list[str]:
    """The plan hash in blocks of 8 hex digits, ``per_line`` blocks a line, for people to compare aloud."""
    blocks = [plan_hash[i:i + 8] for i in range(0, len(plan_hash), 8)]
    return [" ".join(blocks[i:i + per_line]) for i in range(0, len(blocks), per_line)]


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _policy_set(args) -> None:
    with _approvals(args.home) as (a, owner):
        print(json.dumps(a.set_policy(owner, args.dataset, args.policy).model_dump()))


def _policy_show(args) -> None:
    with _approvals(args.home) as (a, owner):
        policies = a.policies(owner)
    if args.json:
        print(json.dumps([p.model_dump() for p in policies], indent=1))
        return
    for p in policies:
        print(f"{p.dataset}  {p.policy}")
    if not policies:
        print("no datasets")


def _status(r) -> str:
    if r.state != "approved":
        return r.state
    if r.valid:
        return f"approved ({r.releases - r.used} of {r.releases} left)"
    return "approved (used up)" if r.used >= (r.releases or 0) else "approved (expired)"


def _list(args) -> None:
    with _approvals(args.home) as (a, owner):
        found = a.requests(owner, args.state)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in found], indent=1))
        return
    rows = [("ID", "SCIENTIST", "DATASET", "PLAN", "CREATED (UTC)", "STATUS")]
    rows += [(r.request_id, r.scientist, r.dataset, r.plan_hash[:16], r.created[:16].replace("T", " "), _status(r))
             for r in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _show_lines(r) -> list[str]:
    lines = [f"request {r.request_id}: {_status(r)}",
             f"  scientist  {r.scientist}", f"  dataset    {r.dataset}", f"  created    {r.created}",
             f"  purpose    {r.purpose or '(none given)'}", f"  releases   asked {r.releases_asked or '-'}"
             + (f", approved {r.releases}, used {r.used}, expires {r.expires}" if r.releases else "")]
    if r.reason:
        lines.append(f"  reason     {r.reason}")
    lines += ["", "plan hash (compare with the other sites):", *(f"    {b}" for b in hash_blocks(r.plan_hash)), "",
              "plan:"]
    from voxgrid.nodes.service.approvals import flatten

    lines += [f"    {k}: {_short(v)}" for k, v in flatten(r.plan or {}).items()]
    lines.append("")
    if r.compared_with is None:
        lines.append(f"no earlier approved plan of {r.scientist} at this node to compare with")
    elif not r.changes:
        lines.append(f"same fields as the plan of request {r.compared_with} (approved earlier)")
    else:
        lines.append(f"changes against the plan of request {r.compared_with} (approved earlier; '!' = look first):")
        lines += [f"  {'!' if KEY_FIELDS.search(c.field) else ' '} {c.field}: {_short(c.before)} -> {_short(c.after)}"
                  for c in r.changes]
    return lines


def _show(args) -> None:
    with _approvals(args.home) as (a, owner):
        r = a.get(owner, args.request_id)
    print(r.model_dump_json(indent=1) if args.json else "\n".join(_show_lines(r)))


def _decide(verb: str):
    def run(args):
        with _approvals(args.home) as (a, owner):
            if verb == "approve":
                r = a.approve(owner, args.request_id, args.releases, args.days)
            elif verb == "deny":
                r = a.deny(owner, args.request_id, args.reason)
            else:
                r = a.revoke(owner, args.request_id, args.reason)
        if args.json:
            print(r.model_dump_json(indent=1))
        else:
            print(f"request {r.request_id} of {r.scientist} on {r.dataset}: {_status(r)}"
                  + (f", expires {r.expires}" if verb == "approve" else ""))
    return run


def _common(p, json_flag: bool = True) -> None:
    p.add_argument("--home", required=True, type=Path, help="the node's home folder")
    if json_flag:
        p.add_argument("--json", action="store_true", help="JSON instead of text")


def add_commands(node) -> None:
    """Add ``policy`` and ``requests`` to the ``voxgrid node`` parser."""
    pol = node.add_parser("policy", help="who decides which plans run on a dataset").add_subparsers(
        dest="policy_cmd", required=True)
    p = pol.add_parser("set", help="'open': every valid plan runs (default); 'review': each plan needs your approval")
    _common(p, json_flag=False)
    p.add_argument("--dataset", required=True)
    p.add_argument("--policy", required=True, choices=["open", "review"])
    p.set_defaults(func=_policy_set)
    p = pol.add_parser("show", help="each dataset's policy")
    _common(p)
    p.set_defaults(func=_policy_show)

    req = node.add_parser("requests", help="scientists' requests to run plans on review datasets").add_subparsers(
        dest="requests_cmd", required=True)
    p = req.add_parser("list", help="every request, newest first")
    _common(p)
    p.add_argument("--state", choices=["pending", "approved", "denied", "revoked"])
    p.set_defaults(func=_list)
    p = req.add_parser("show", help="a request: its plan, its hash, and what changed against approved plans")
    _common(p)
    p.add_argument("request_id", metavar="ID")
    p.set_defaults(func=_show)
    p = req.add_parser("approve", help="approve a pending request")
    _common(p)
    p.add_argument("request_id", metavar="ID")
    p.add_argument("--releases", type=int, help="jobs it covers (default: as many as asked, else 1)")
    p.add_argument("--days", type=float, help="days it lasts (default 30)")
    p.set_defaults(func=_decide("approve"))
    p = req.add_parser("deny", help="deny a pending request (the scientist sees the reason)")
    _common(p)
    p.add_argument("request_id", metavar="ID")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=_decide("deny"))
    p = req.add_parser("revoke", help="revoke an approval: later jobs are refused, running ones finish")
    _common(p)
    p.add_argument("request_id", metavar="ID")
    p.add_argument("--reason")
    p.set_defaults(func=_decide("revoke"))
