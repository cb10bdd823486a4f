"""Cyclic weight transfer (Chang et al. 2018; FLARE's cyclic controller): no averaging at all.

The model visits the sites one after another, each training from where the previous one stopped
(institutional incremental learning when ``passes=1`` and one round). One round is ``passes`` passes
over the sites, in a fixed order or in a fresh shuffle per pass. Every hop is an ordinary train job
at that node, so each hop's release passes the node's privacy filters and ledger like any update;
the scientist sees every site's output, so secure aggregation is refused.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from voxgrid.strategies.base import ClientUpdate, Strategy, apply_delta
from voxgrid.tensors import StateDict

if TYPE_CHECKING:
    from voxgrid.plan import Plan


@dataclass
class Cyclic(Strategy):
    """Sequential training: ``order`` ``"fixed"`` (the pointers' order) or ``"shuffle"`` (a permutation
    per pass, drawn from ``(seed, round, pass)``, so a resumed experiment visits in the same order),
    ``passes`` visits of every site per round.

    :meth:`visits` is the whole rule; :meth:`aggregate` composes the hops' deltas in visit order.
    """

    order: Literal["fixed", "shuffle"] = "fixed"
    passes: int = 1
    seed: int = 0
    name = "cyclic"
    sequential = True
    secure_refusal = ("the model visits one site at a time and each site's trained weights are the next site's "
                      "start, so the scientist sees every site's output: there is no sum to hide it in")

    def __post_init__(self):
        if self.order not in ("fixed", "shuffle"):
            raise ValueError(f"Cyclic: order must be 'fixed' or 'shuffle', got {self.order!r}")
        if not (isinstance(self.passes, int) and not isinstance(self.passes, bool) and self.passes >= 1):
            raise ValueError(f"Cyclic: passes must be a positive integer, got {self.passes!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"Cyclic: seed must be an integer, got {self.seed!r}")

    def visits(self, rnd: int, n_sites: int) -> list[int]:
        """Round ``rnd``'s hops: indices into the experiment's pointers, ``passes * n_sites`` long."""
        out: list[int] = []
        for p in range(self.passes):
            sites = list(range(n_sites))
            if self.order == "shuffle":
                # str seeds are hashed with SHA-512, not Python's per-process hash: stable across runs
                random.Random(f"cyclic:{self.seed}:{rnd}:{p}").shuffle(sites)
            out += sites
        return out

    def aggregate(self, global_weights: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
        """``global + delta_1 + ... + delta_k``, applied in visit order: hop i's delta is relative to
        the weights hop i - 1 produced, so this is the weights after the last hop."""
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        weights = global_weights
        for u in updates:
            weights = apply_delta(weights, u.delta)
        return weights

    def train_jobs_per_round(self) -> int:
        return self.passes

    def configure_plan(self, plan: Plan) -> Plan:
        # A node keeps a site's own tensors (keep_local, DTP's averages) per round: a second visit
        # in the same round would start from the previous round's copy, not the first visit's.
        if self.passes > 1 and (plan.local.keep_local or plan.local.dtp):
            raise ValueError(f"Cyclic(passes={self.passes}): plan.local.keep_local and plan.local.dtp keep state "
                             "at each site per round, which a second visit in the same round would not see; "
                             "use passes=1 (and more rounds)")
        return plan

    @staticmethod
    def hop_seed(base: int, pass_index: int) -> int:
        """The job seed of a visit in pass ``pass_index`` of a round whose jobs otherwise get ``base``:
        the same as other strategies' in the first pass, another in each later one (other patches)."""
        return base + 7919 * pass_index
