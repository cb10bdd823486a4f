"""Aggregation rules: one small class per rule, pure functions of their inputs.

An update is a weight *delta* (local weights minus the global weights the job started from),
so every strategy maps ``(global weights, updates) -> new global weights``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from voxgrid.tensors import StateDict


@dataclass(frozen=True)
class ClientUpdate:
    """What one node released for one round."""

    node: str
    dataset: str
    delta: StateDict
    samples: int
    metrics: dict = field(default_factory=dict)


class Strategy:
    """Base class: subclasses implement :meth:`aggregate`."""

    name = "strategy"

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON description stored in checkpoints and results."""
        return {"name": self.name}


def weighted_delta(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> StateDict:
    """sum_k w_k * delta_k / sum_k w_k, accumulated in place in (at least) float32."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {list(weights)}")
    out: StateDict = {}
    for key, ref in updates[0].delta.items():
        acc = torch.zeros(ref.shape, dtype=torch.promote_types(ref.dtype, torch.float32))
        for u, w in zip(updates, weights):
            acc.add_(u.delta[key], alpha=w / total)  # in place: no temporaries the size of the model
        out[key] = acc
    return out


def apply_delta(global_weights: StateDict, delta: StateDict) -> StateDict:
    """global + delta, cast back to each tensor's dtype (integer buffers are rounded)."""
    new: StateDict = {}
    for key, g in global_weights.items():
        d = delta[key]
        if g.is_floating_point():
            new[key] = (g + d).to(g.dtype)
        else:
            new[key] = (g.to(torch.float64) + d).round().to(g.dtype)
    return new


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017), weighted by each node's training samples."""

    name = "fedavg"

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        weights = [max(u.samples, 0) for u in updates]
        if sum(weights) == 0:
            weights = [1.0] * len(updates)
        return apply_delta(global_weights, weighted_delta(updates, weights))
