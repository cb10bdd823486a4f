"""``voxgrid demo --review``: the owners' decision step, end to end, on the demo federation.

Every site's dataset is under ``review``. The scientist's experiment asks every owner; the first site's
owner denies with a reason the scientist reads; the scientist asks again with what the owner wanted; every
owner approves; then training runs. The owners decide through ``voxgrid node requests ...``, the same
code path as at a real site's terminal.
"""

from __future__ import annotations

import contextlib
import io
import json

from voxgrid.cli import main

#: What the first site's owner answers to a request that gives no ethics reference.
DENIAL = "please name the ethics approval that covers this study in the purpose"


def owner_cli(*args) -> dict:
    """Run ``voxgrid node requests ... --json`` in this process, as a site's owner would; its JSON answer."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["node", "requests", *map(str, args), "--json"])
    if code != 0:
        raise RuntimeError(f"voxgrid node requests {' '.join(map(str, args))} failed (exit {code})")
    return json.loads(buf.getvalue())


def pending(home) -> list[dict]:
    return owner_cli("list", "--home", home, "--state", "pending")


def approve_by_review(exp, fed, echo) -> None:
    """Ask every owner to approve ``exp``'s plan: one denial first, then the approvals the run needs."""
    echo("[demo] every site's dataset is under review: the experiment asks each owner to approve its plan")
    echo(repr(exp.request_approval(purpose="pancreas and tumour segmentation across sites")))
    first = fed.nodes[0]
    (request,) = pending(first.home)
    owner_cli("deny", request["request_id"], "--home", first.home, "--reason", DENIAL)
    echo(f"[demo] the owner of {first.name} denied it; what the scientist sees:")
    echo(repr(exp.approvals()))
    echo(repr(exp.request_approval(purpose="pancreas and tumour segmentation across sites; ethics approval "
                                           "EK-2026-042")))
    for node in fed.nodes:
        for r in pending(node.home):
            shown = owner_cli("show", r["request_id"], "--home", node.home)
            owner_cli("approve", r["request_id"], "--home", node.home)
            echo(f"[demo] the owner of {node.name} approved request {r['request_id']} for plan "
                 f"{shown['plan_hash'][:23]}... ({shown['releases_asked']} releases)")
    echo(repr(exp.wait_for_approvals(timeout=60, poll=0.5)))
