"""Robust aggregation for a misbehaving site: coordinate-wise median and trimmed mean.

Both are unweighted (a site cannot buy influence by claiming many samples) and work on the
deltas, element by element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from voxgrid.strategies.base import ClientUpdate, Strategy, apply_delta
from voxgrid.tensors import StateDict


def _sorted_stack(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """The K deltas for ``key`` stacked along a new dim 0 and sorted along it: (K, *shape), float32+."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ref = updates[0].delta[key]
    dtype = torch.promote_types(ref.dtype, torch.float32)
    return torch.stack([u.delta[key].to(dtype) for u in updates]).sort(dim=0).values


@dataclass
class Median(Strategy):
    """Coordinate-wise median of the deltas (mean of the two middle values for an even count)."""

    name = "median"
    secure_refusal = "the coordinate-wise median needs every node's own update; a masked sum hides them"

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        delta = {}
        for key in global_weights:
            s = _sorted_stack(updates, key)
            n = s.shape[0]
            delta[key] = (s[(n - 1) // 2] + s[n // 2]) / 2
        return apply_delta(global_weights, delta)


@dataclass
class TrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the ``floor(beta * K)`` largest and smallest of K values."""

    beta: float = 0.1
    name = "trimmed-mean"
    secure_refusal = "trimming the extreme values needs every node's own update; a masked sum hides them"

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and 0 <= self.beta < 0.5):
            raise ValueError(f"TrimmedMean: beta must be in [0, 0.5), got {self.beta!r}")

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        k = math.floor(self.beta * len(updates))
        delta = {}
        for key in global_weights:
            s = _sorted_stack(updates, key)
            delta[key] = s[k:s.shape[0] - k].mean(dim=0)
        return apply_delta(global_weights, delta)
