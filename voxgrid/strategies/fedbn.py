"""FedBN (Li et al. 2021): normalisation layers stay at each site, never aggregated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from voxgrid.strategies.base import (ClientUpdate, Strategy, apply_delta, sample_weights, weighted_delta)
from voxgrid.tensors import StateDict

if TYPE_CHECKING:
    from voxgrid.plan import Plan


@dataclass
class FedBN(Strategy):
    """FedAvg over every tensor except the normalisation layers' parameters and statistics.

    Sets ``plan.local.keep_local = ("norm",)``: each node keeps its own normalisation state per
    experiment (and round), trains and evaluates with it, and releases a zero delta for it, so the
    scientist never holds a site's statistics. Those keys of the global weights stay as initialised
    and are never used at a node. The plan's network must have such layers (e.g. UNet ``norm="batch"``).
    """

    name = "fedbn"
    _local: frozenset = field(default_factory=frozenset, init=False, repr=False)

    def configure_plan(self, plan: Plan) -> Plan:
        from voxgrid.plan import local_keys

        plan = plan if "norm" in plan.local.keep_local else plan.with_local(
            keep_local=[*plan.local.keep_local, "norm"])
        self._local = frozenset(local_keys(plan))
        if not self._local:
            raise ValueError(f"FedBN: the plan's network ({plan.network.get('_target_')}) has no normalisation "
                             "layer with parameters or statistics; use e.g. UNet with norm='batch'")
        return plan

    secure_weight = "samples"

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        shared = [ClientUpdate(u.node, u.dataset, {k: v for k, v in u.delta.items() if k not in self._local},
                               u.samples, u.metrics) for u in updates]
        return self.apply_mean(global_weights, weighted_delta(shared, sample_weights(updates)))

    def apply_mean(self, global_weights: StateDict, mean_delta: StateDict) -> StateDict:
        delta = {k: v for k, v in mean_delta.items() if k not in self._local}
        kept = {k: v for k, v in global_weights.items() if k in self._local}
        return {**apply_delta({k: v for k, v in global_weights.items() if k not in self._local}, delta), **kept}
