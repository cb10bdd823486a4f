"""Aggregation rules: one small class per rule, pure functions of their inputs and their state.

One module per family: :mod:`.averaging` (FedAvg, FedAvgDice, FedProx, DWA), :mod:`.fedbn`
(FedBN), :mod:`.fedopt` (FedAdam, FedYogi), :mod:`.robust` (Median, TrimmedMean), :mod:`.cyclic`
(Cyclic: sequential, no aggregation); :mod:`.base` holds the shared types.
"""

from __future__ import annotations

from voxgrid.strategies.averaging import DWA, FedAvg, FedAvgDice, FedProx
from voxgrid.strategies.base import (ClientUpdate, Strategy, StrategyState, apply_delta, sample_weights,
                                     weighted_delta)
from voxgrid.strategies.cyclic import Cyclic
from voxgrid.strategies.fedbn import FedBN
from voxgrid.strategies.fedopt import FedAdam, FedYogi
from voxgrid.strategies.robust import Median, TrimmedMean

#: Strategies by their ``name``: what :func:`from_config` can rebuild from a checkpoint.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgDice, FedProx, DWA, FedBN, FedAdam, FedYogi, Median, TrimmedMean,
                              Cyclic)
}


def from_config(config: dict) -> Strategy:
    """Rebuild a strategy from :meth:`Strategy.config` JSON (its name and hyper-parameters)."""
    params = dict(config)
    name = params.pop("name", None)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))} "
                         "(for your own strategy, pass the object, e.g. to Experiment.resume)")
    try:
        return STRATEGIES[name](**params)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: bad parameters {params}: {exc}") from None


__all__ = ["ClientUpdate", "Strategy", "StrategyState", "STRATEGIES", "from_config", "FedAvg", "FedAvgDice",
           "FedProx", "DWA", "FedBN", "Cyclic", "FedAdam", "FedYogi", "Median", "TrimmedMean", "apply_delta", "sample_weights",
           "weighted_delta"]
