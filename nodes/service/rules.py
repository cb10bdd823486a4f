"""A ``rules`` dataset's automatic decision: which of the owner's rules a plan does not meet.

Pure: the plan, the owner's :class:`~voxgrid.wire.PolicyRules`, the releases asked for and the node's own
cost estimate in, findings (in words, for the owner and the scientist) out. No findings: the plan is
approved automatically. The estimate comes from the node's accountant, never from the scientist.
"""

from __future__ import annotations

from voxgrid.plan import Plan
from voxgrid.privacy.records import Estimate
from voxgrid.wire import PolicyRules


def findings(rules: PolicyRules, plan: Plan, releases: int, cost: Estimate | None) -> list[str]:
    """Every rule ``plan`` breaks when run ``releases`` times; ``cost``: the node's estimate of those
    releases (None where the node could not compute one: then any epsilon rule counts as broken)."""
    out = []
    network = str(plan.network.get("_target_"))
    if rules.networks is not None and network not in rules.networks:
        out.append(f"network {network} is not among the allowed {', '.join(rules.networks) or '(none)'}")
    if rules.max_patch_size is not None and max(plan.patch_size) > rules.max_patch_size:
        out.append(f"patch size {list(plan.patch_size)} has an edge over {rules.max_patch_size} voxels")
    if releases > rules.max_rounds:
        out.append(f"{releases} releases asked, over the {rules.max_rounds} one automatic approval grants")
    dp = cost is not None and cost.dp
    if rules.require_dp and not dp:
        out.append("the plan's update does not leave under differential privacy (plan.privacy has no DP filter)")
    for limit, value, what in ((rules.max_epsilon_per_release, cost and cost.epsilon_per_release, "one release"),
                               (rules.max_epsilon_per_approval, cost and cost.epsilon_total,
                                f"{releases} releases")):
        if limit is None:
            continue
        if not dp or value is None:
            out.append(f"epsilon of {what} is unbounded (not DP), over the limit {limit:g}")
        elif value > limit:
            out.append(f"epsilon of {what} would be {value:.3g}, over the limit {limit:g}")
    return out
