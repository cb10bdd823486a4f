"""``voxgrid node policy ...`` and ``voxgrid node requests ...``: the owner decides, in the terminal.

They work on the node's home (its SQLite store), so they act on a running node at once: the node reads
policies and approvals from the file at every job it is sent.
"""

from __future__ import annotations

import argparse
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
    """The plan hash's hex digest (without its ``sha256:`` prefix) in blocks of 8 digits, ``per_line`` blocks a
    line, for people to compare aloud; the owner console shows the same blocks."""
    digest = plan_hash.split(":", 1)[-1]
    blocks = [digest[i:i + 8] for i in range(0, len(digest), 8)]
    return [" ".join(blocks[i:i + per_line]) for i in range(0, len(blocks), per_line)]


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _rules(args):
    """The rules the flags give (None: no rule flag given), for a 'rules' policy."""
    from voxgrid.wire import PolicyRules

    given = {k: v for k, v in (("require_dp", args.require_dp), ("max_epsilon_per_release", args.max_epsilon_per_release),
                               ("max_epsilon_per_approval", args.max_epsilon_per_approval),
                               ("networks", args.networks.split(",") if args.networks else None),
                               ("max_patch_size", args.max_patch_size), ("max_rounds", args.max_rounds),
                               ("days", args.days)) if v is not None}
    if given and args.policy != "rules":
        raise ValueError(f"rule options ({', '.join(given)}) apply only with --policy rules")
    try:
        return PolicyRules(**given) if given else None
    except ValueError as exc:
        raise ValueError(f"rules refused: {exc}") from None


def _policy_set(args) -> None:
    rules = _rules(args)
    with _approvals(args.home) as (a, owner):
        print(a.set_policy(owner, args.dataset, args.policy, rules).model_dump_json())


def _policy_show(args) -> None:
    with _approvals(args.home) as (a, owner):
        policies = a.policies(owner)
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in policies], indent=1))
        return
    for p in policies:
        rules = p.rules.model_dump(exclude_none=True) if p.rules else None
        print(f"{p.dataset}  {p.policy}" + (f"  {json.dumps(rules)}" if rules else ""))
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


def _cost_lines(r) -> list[str]:
    """The projected privacy cost and a 'rules' dataset's findings, in words."""
    e, out = r.projected, []
    if e is not None and e.dp:
        out.append(f"  privacy    {e.mechanism}: epsilon {e.epsilon_per_release:.3g} a release, "
                   f"{e.epsilon_total:.3g} for {e.releases} (delta {e.delta:g})")
        out += [f"  budget     {b.scientist or 'all scientists'}: spent {b.spent or 0:.3g} of {b.epsilon:g}, "
                f"these releases add {b.projected if b.projected is not None else 'unbounded'}"
                f"{'' if b.fits else ' (over budget)'}" for b in e.budgets]
    elif e is not None:
        out.append(f"  privacy    {e.mechanism}: not differentially private (no epsilon bounds these releases)")
    if r.findings:
        out += ["  rules not met:", *(f"    - {f}" for f in r.findings)]
    return out


def _show_lines(r) -> list[str]:
    lines = [f"request {r.request_id}: {_status(r)}",
             f"  scientist  {r.scientist}", f"  dataset    {r.dataset}", f"  created    {r.created}",
             f"  purpose    {r.purpose or '(none given)'}", f"  releases   asked {r.releases_asked or '-'}"
             + (f", approved {r.releases}, used {r.used}, expires {r.expires}" if r.releases else "")]
    if r.reason:
        lines.append(f"  reason     {r.reason}")
    lines += _cost_lines(r)
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
                r = _revoke(args, a, owner)
        if args.json:
            print(r.model_dump_json(indent=1))
        else:
            print(f"request {r.request_id} of {r.scientist} on {r.dataset}: {_status(r)}"
                  + (f", expires {r.expires}" if verb == "approve" else ""))
    return run


def _revoke(args, a, owner):
    """Revoke through the running node when there is one (it cancels the approval's queued and running jobs
    at once), else in the store (a node started later withholds what those jobs computed)."""
    from voxgrid.nodes.ops.admin import running_node

    with running_node(args.home) as client:
        if client is not None:
            return client.revoke_approval(args.request_id, args.reason)
    return a.revoke(owner, args.request_id, args.reason)


def _common(p, json_flag: bool = True) -> None:
    p.add_argument("--home", required=True, type=Path, help="the node's home folder")
    if json_flag:
        p.add_argument("--json", action="store_true", help="JSON instead of text")


def add_commands(node) -> None:
    """Add ``policy`` and ``requests`` to the ``voxgrid node`` parser."""
    pol = node.add_parser("policy", help="who decides which plans run on a dataset").add_subparsers(
        dest="policy_cmd", required=True)
    p = pol.add_parser("set", help="'review': each plan needs your approval (new datasets); 'open': every valid "
                                   "plan runs; 'rules': plans meeting your rules are approved automatically")
    _common(p, json_flag=False)
    p.add_argument("--dataset", required=True)
    p.add_argument("--policy", required=True, choices=["open", "review", "rules"])
    r = p.add_argument_group("rules (with --policy rules; unset: defaults, DP required, 10 releases, 30 days)")
    r.add_argument("--require-dp", action=argparse.BooleanOptionalAction, default=None,
                   help="the plan's update must leave under DP (default yes)")
    r.add_argument("--max-epsilon-per-release", type=float)
    r.add_argument("--max-epsilon-per-approval", type=float)
    r.add_argument("--networks", help="allowed network classes, comma-separated, e.g. UNet,SegResNet")
    r.add_argument("--max-patch-size", type=int, help="largest patch edge, voxels")
    r.add_argument("--max-rounds", type=int, help="most releases one automatic approval grants")
    r.add_argument("--days", type=float, help="days an automatic approval lasts")
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
    p = req.add_parser("revoke", help="revoke an approval: later jobs are refused, its queued and running ones stop")
    _common(p)
    p.add_argument("request_id", metavar="ID")
    p.add_argument("--reason")
    p.set_defaults(func=_decide("revoke"))
