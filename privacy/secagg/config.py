"""One round's secure-aggregation parameters: roster, threshold, quantisation and neighbour graph.

Threshold rule: ``2 <= t <= g`` and ``t > g / 2``, where ``g`` is the size of a node's group (the
node and its neighbours: ``n`` for the complete graph, ``neighbours + 1`` for SecAgg+). The
majority rule is enforced, not merely recommended: with ``t <= g / 2`` an aggregator could ask two
disjoint halves of the survivors for the two kinds of share of one node and unmask its update
without any single node seeing both requests. A round therefore needs at least two nodes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from .errors import SecAggError

BITS = (32, 64)
# Round-to-nearest adds at most half a step per node; this factor absorbs float64 rounding of the
# scale itself (it matters only for 64-bit rings, where 2**63 exceeds float64's 53-bit mantissa).
_SAFETY = 1.0 - 2.0**-20


@functools.lru_cache(maxsize=64)
def _ring(experiment_id: str, round_: int, nodes: tuple[str, ...]) -> list[str]:
    return tuple(sorted(nodes, key=lambda n: hashlib.sha256(json.dumps([experiment_id, round_, n]).encode()).digest()))


@dataclass(frozen=True)
class SecAggConfig:
    """What every participant of a round must agree on (the aggregator sends it with the job)."""

    experiment_id: str
    round: int
    nodes: tuple[str, ...]  # the round's roster; sorted on construction, names unique
    threshold: int
    clip: float = 1.0  # per-entry bound before weighting
    max_weight: float = 1.0  # the largest weight a node may use
    bits: int = 32  # ring Z_2^bits
    neighbours: int | None = None  # SecAgg+ degree (even); None, or >= n - 1, is the complete graph

    def __post_init__(self) -> None:
        if not isinstance(self.experiment_id, str) or not self.experiment_id:
            raise SecAggError(f"experiment_id must be a non-empty string, not {self.experiment_id!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise SecAggError(f"round must be an integer >= 0, not {self.round!r}")
        if isinstance(self.nodes, str) or not all(isinstance(n, str) and n for n in self.nodes):
            raise SecAggError(f"nodes must be a list of non-empty node names, not {self.nodes!r}")
        nodes = tuple(sorted(self.nodes))
        duplicates = sorted({n for n in nodes if nodes.count(n) > 1})
        if duplicates:
            raise SecAggError(f"the roster names {duplicates} more than once")
        if len(nodes) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 nodes, the roster has {len(nodes)}")
        object.__setattr__(self, "nodes", nodes)
        if self.bits not in BITS:
            raise SecAggError(f"bits must be one of {BITS}, not {self.bits!r}")
        for name in ("clip", "max_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise SecAggError(f"{name} must be a positive finite number, not {value!r}")
            object.__setattr__(self, name, float(value))
        if self.neighbours is not None:
            k = self.neighbours
            if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2:
                raise SecAggError(f"neighbours must be an even integer >= 2 (a ring graph links k/2 nodes on each "
                                  f"side), or None for the complete graph, not {k!r}")
        t, g = self.threshold, self.group_size
        if isinstance(t, bool) or not isinstance(t, int) or not (2 <= t <= g) or not t > g / 2:
            raise SecAggError(f"threshold must be an integer with 2 <= t <= {g} and t > {g}/2 (a majority of each "
                              f"node's group of {g}), not {t!r}; SecAggConfig.default_threshold gives {g // 2 + 1}")

    # --- the neighbour graph -------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.neighbours is None or self.neighbours >= len(self.nodes) - 1

    @property
    def group_size(self) -> int:
        """A node plus its neighbours: who holds shares of its secrets."""
        return len(self.nodes) if self.complete else self.neighbours + 1

    @staticmethod
    def default_threshold(n: int, neighbours: int | None = None) -> int:
        """The smallest admissible threshold (a bare majority of each group): tolerates the most dropouts."""
        g = n if neighbours is None or neighbours >= n - 1 else neighbours + 1
        return max(2, g // 2 + 1)

    def neighbours_of(self, node: str) -> tuple[str, ...]:
        """The nodes ``node`` masks with and shares secrets with (sorted, itself excluded).

        SecAgg+: the roster is put on a ring in an order hashed from (experiment, round, name), so
        it is fixed by public data, and each node links to ``neighbours / 2`` nodes on each side.
        """
        if node not in self.nodes:
            raise SecAggError(f"node {node!r} is not in this round's roster {list(self.nodes)}")
        if self.complete:
            return tuple(n for n in self.nodes if n != node)
        ring = _ring(self.experiment_id, self.round, self.nodes)
        i, half = ring.index(node), self.neighbours // 2
        return tuple(sorted({ring[(i + d) % len(ring)] for d in range(-half, half + 1) if d}))

    def index(self, node: str) -> int:
        """The node's Shamir x coordinate (1-based roster position)."""
        if node not in self.nodes:
            raise SecAggError(f"node {node!r} is not in this round's roster {list(self.nodes)}")
        return self.nodes.index(node) + 1

    # --- quantisation --------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Fixed-point steps per unit of a weighted entry.

        Headroom: each node's word is at most ``max_weight * clip * scale + 1/2`` in magnitude, so
        the sum over all ``n`` nodes stays below ``2**(bits-1)`` and never wraps the signed ring.
        """
        return self._scale_for(self.max_weight * self.clip)

    @property
    def weight_scale(self) -> float:
        """Fixed-point steps per unit of weight (the appended last element), same headroom rule."""
        return self._scale_for(self.max_weight)

    def _scale_for(self, bound: float) -> float:
        n = len(self.nodes)
        return ((2.0 ** (self.bits - 1) - 1) / n - 0.5) / bound * _SAFETY

    def error_bound(self, survivors: int | None = None) -> float:
        """Largest difference between a decoded sum entry and the exact sum of weighted clipped entries:
        half a step per node for rounding, plus float64 rounding of the products (which matters only in
        64-bit rings, whose steps are finer than float64 resolves)."""
        n = len(self.nodes) if survivors is None else survivors
        return n * (0.5 / self.scale + self.max_weight * self.clip * 2.0**-50)

    # --- wire ----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        d = asdict(self)
        d["nodes"] = list(self.nodes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> SecAggConfig:
        if not isinstance(d, dict):
            raise SecAggError(f"a secure-aggregation config must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(d) - names, {"experiment_id", "round", "nodes", "threshold"} - set(d)
        if unknown or missing:
            raise SecAggError(f"bad secure-aggregation config: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
        if not isinstance(d["nodes"], (list, tuple)):
            raise SecAggError(f"nodes must be a list of node names, not {d['nodes']!r}")
        return cls(**{**d, "nodes": tuple(d["nodes"])})
