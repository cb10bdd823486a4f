"""Weighted averages of the deltas: FedAvg (by samples or by validation Dice), FedProx, DWA."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from voxgrid.strategies.base import (ClientUpdate, Strategy, StrategyState, apply_delta, is_statistic,
                                     sample_weights, weighted_delta)
from voxgrid.tensors import StateDict

if TYPE_CHECKING:
    from voxgrid.plan import Plan


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


@dataclass
class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017), weighted by each node's training samples."""

    name = "fedavg"
    secure_weight = "samples"

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        return self.apply_mean(global_weights, weighted_delta(updates, sample_weights(updates)))

    def apply_mean(self, global_weights: StateDict, mean_delta: StateDict) -> StateDict:
        return apply_delta(global_weights, mean_delta)


@dataclass
class FedAvgDice(Strategy):
    """FedAvg weighted by each site's latest validation mean Dice (``metrics["mean_dice"]``).

    A site that reported no Dice (no validation split, or ``evaluate=False``) gets the mean
    weight of those that did, so it neither dominates nor vanishes. If no site reported one,
    aggregation fails: run the experiment with ``evaluate=True``. If every Dice is 0 (early
    rounds), there is no evidence to prefer a site and the weights are equal.
    """

    name = "fedavg-dice"
    secure_weight = "val_dice"  # under secure aggregation a site without a Dice weighs 0

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        dice = [_finite(u.metrics.get("mean_dice")) for u in updates]
        known = [min(max(d, 0.0), 1.0) for d in dice if d is not None]
        if not known:
            raise ValueError("FedAvgDice needs each site's validation Dice (metrics['mean_dice']); "
                             "none was reported: run the experiment with evaluate=True")
        fill = sum(known) / len(known)
        weights = [fill if d is None else min(max(d, 0.0), 1.0) for d in dice]
        if sum(weights) == 0:
            weights = [1.0] * len(updates)
        return self.apply_mean(global_weights, weighted_delta(updates, weights))

    def apply_mean(self, global_weights: StateDict, mean_delta: StateDict) -> StateDict:
        return apply_delta(global_weights, mean_delta)


@dataclass
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation; each node adds mu/2 * ||w - w_global||^2
    to its local loss (``plan.local.proximal_mu``), keeping local models near the global one.
    """

    mu: float = 0.01
    name = "fedprox"
    # aggregate/apply_mean: FedAvg's, by training samples

    def __post_init__(self):
        if not (isinstance(self.mu, (int, float)) and math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"FedProx: mu must be a positive number, got {self.mu!r}")

    def configure_plan(self, plan: Plan) -> Plan:
        have = plan.local.proximal_mu
        if have not in (0.0, self.mu):
            raise ValueError(f"the plan already sets local.proximal_mu={have}, which conflicts with FedProx(mu={self.mu})")
        return plan.with_local(proximal_mu=float(self.mu))


@dataclass
class DWA(Strategy):
    """Dynamic weight averaging across clients (the multi-task pancreas study; Liu et al. 2019's DWA).

    Client k's weight in round r is ``lambda_k = xi * exp(rho_k / T) / sum_i exp(rho_i / T)`` with
    ``rho_k = L_k,r-1 / L_k,r-2``: the ratio of its two most recent reported mean local losses
    (``metrics["loss"]``), before this round's; 1 until a site has two. A site whose loss still
    falls fast gets less weight; one whose loss stalls gets more. The new global weights are
    ``global + sum_k lambda_k * delta_k``: the lambdas sum to ``xi``, so ``xi = 1`` is a convex
    combination and ``xi`` acts as a server step size (batch-norm statistics and integer buffers get
    the convex combination, never scaled by ``xi``). Loss histories are kept per site
    (``dataset@node``), so a site that skips a round keeps its history.
    """

    T: float = 2.0
    xi: float = 1.0
    name = "dwa"
    secure_refusal = "its weights come from each node's own loss history, not only from aggregate values"
    _losses: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        for arg in ("T", "xi"):
            v = getattr(self, arg)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"DWA: {arg} must be a positive number, got {v!r}")

    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """The lambdas for ``updates`` from the current history (no side effect)."""
        rho = []
        for u in updates:
            hist = self._losses.get(u.site, [])
            rho.append(hist[-1] / hist[-2] if len(hist) >= 2 and hist[-2] > 0 else 1.0)
        top = max(rho)  # subtract the max before exp: same softmax, no overflow
        e = [math.exp((r - top) / self.T) for r in rho]
        return [self.xi * x / sum(e) for x in e]

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        lam = self.weights(updates)
        # weighted_delta normalises by sum(lam) == xi; scale back so the step is sum_k lambda_k delta_k.
        # Batch-norm statistics and integer buffers are averages, not steps: xi would extrapolate them
        # (a running variance can go negative), so they get the convex combination.
        delta = {k: v if is_statistic(k, global_weights[k]) else v.mul_(self.xi)
                 for k, v in weighted_delta(updates, lam).items()}
        new = apply_delta(global_weights, delta)
        for u in updates:  # history changes only once the round has aggregated
            loss = _finite(u.metrics.get("loss"))
            if loss is not None:
                self._losses[u.site] = (self._losses.get(u.site, []) + [loss])[-2:]
        return new

    def state_dict(self) -> StrategyState:
        return StrategyState(meta={"losses": {k: list(v) for k, v in self._losses.items()}})

    def load_state_dict(self, state: StrategyState) -> None:
        losses = state.meta.get("losses", {})
        if state.tensors or not isinstance(losses, dict):
            raise ValueError("DWA state: expected meta {'losses': {site: [loss, ...]}} and no tensors")
        self._losses = {str(k): [float(x) for x in v][-2:] for k, v in losses.items()}
