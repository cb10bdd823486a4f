"""Model selection by validation Dice, as in the multi-site studies.

* "FL global best": the global model of the round with the best average, over sites, of its mean
  validation Dice at each site (scored by evaluate jobs on each site's val split).
* "FL local": for each site, the local model (start weights + the delta it released) of the round
  in which the site's own validation mean Dice, measured by its train job, was best.

On a budgeted dataset a node noises the Dice it releases; a model chosen on noised scores says so
(``SelectedModel.noise_sd``), and the cross-site table prints it under the table.

Ties keep the earlier round. Scores a site did not report (None) are left out of the average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from voxgrid.plan import Plan
from voxgrid.strategies import ClientUpdate, StrategyState, apply_delta
from voxgrid.tensors import StateDict


@dataclass(frozen=True)
class SelectedModel:
    """A model the scientist holds, with what a node needs to evaluate it.

    ``experiment_id`` and ``round`` name the jobs that produced it: nodes that keep tensors to
    themselves (``plan.local.keep_local``, FedBN) use their own copy from that experiment and round.
    """

    name: str
    weights: StateDict
    plan: Plan
    experiment_id: str
    round: int
    score: float | None = None  # the validation score it was selected by
    site: str | None = None  # the site whose local model it is (FL local, local baselines)
    #: the largest std of the noise the nodes added to the validation Dice it was selected by (None: not noised)
    noise_sd: float | None = None


def dice_noise_sd(receipt) -> float | None:
    """Std of the Gaussian noise a node added to each Dice of a job (from its privacy receipt, a
    :class:`voxgrid.privacy.records.Receipt`, its dict, or None); None when the Dice was released unnoised."""
    from voxgrid.privacy.metrics import MetricsRelease

    if receipt is None:
        return None
    release = MetricsRelease.in_parameters(receipt["parameters"] if isinstance(receipt, dict) else receipt.parameters)
    return release.std if release is not None and release.dice == "noised" else None


def client_update(p, st, delta: StateDict) -> ClientUpdate:
    """What a node released with its train job (its pointer ``p`` and final ``st``, a
    :class:`voxgrid.wire.JobStatus`): the metrics carry ``dice_noise_sd`` when its Dice was noised."""
    metrics = st.metrics.model_dump()
    metrics["dice_noise_sd"] = dice_noise_sd(st.privacy)
    return ClientUpdate(node=p.node, dataset=p.name, delta=delta, samples=st.metrics.samples, metrics=metrics)


def mean_score(values: Mapping[str, float | None] | Sequence[float | None]) -> float | None:
    """Mean of the finite values, None if there are none."""
    vals = values.values() if isinstance(values, Mapping) else values
    known = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(known) / len(known) if known else None


class ModelSelection:
    """Keeps the best global model and each site's best local model while an experiment runs."""

    def __init__(self, plan: Plan, experiment_id: str):
        self.plan, self.experiment_id = plan, experiment_id
        self.best_global: SelectedModel | None = None
        self.best_local: dict[str, SelectedModel] = {}

    def observe_local(self, rnd: int, start: StateDict, updates: Sequence[ClientUpdate]) -> None:
        """Round ``rnd``'s updates (deltas from ``start``) with their val ``mean_dice`` in ``metrics`` (and
        ``dice_noise_sd``, the std of the noise the node added to it, when it was noised)."""
        for u in updates:
            score = mean_score([u.metrics.get("mean_dice")])
            best = self.best_local.get(u.site)
            if score is not None and (best is None or score > best.score):
                self.best_local[u.site] = SelectedModel(f"FL local ({u.site})", apply_delta(start, u.delta), self.plan,
                                                        self.experiment_id, rnd, score, u.site,
                                                        noise_sd=u.metrics.get("dice_noise_sd") or None)

    def observe_global(self, rnd: int, weights: StateDict, site_scores: Mapping[str, float | None],
                       noise_sd: float | None = None) -> None:
        """The global model after round ``rnd`` and its val mean Dice per site; ``noise_sd``: the largest std
        of the noise the nodes added to those scores (a noised score still selects: the choice is
        post-processing of released figures, only less sure)."""
        score = mean_score(site_scores)
        if score is not None and (self.best_global is None or score > self.best_global.score):
            self.best_global = SelectedModel("FL global best", dict(weights), self.plan, self.experiment_id, rnd, score,
                                             noise_sd=noise_sd or None)

    def models(self) -> list[SelectedModel]:
        """FL global best, then each site's FL local model (sorted by site)."""
        return ([self.best_global] if self.best_global else []) + [self.best_local[s] for s in sorted(self.best_local)]

    # checkpoints: tensors under "global/<key>" and "local/<i>/<key>", the rest as JSON --------------
    def state(self) -> StrategyState:
        tensors, meta = {}, {"global": None, "local": []}
        if self.best_global:
            tensors.update({f"global/{k}": v for k, v in self.best_global.weights.items()})
            meta["global"] = {"round": self.best_global.round, "score": self.best_global.score,
                              "noise_sd": self.best_global.noise_sd}
        for i, (site, m) in enumerate(sorted(self.best_local.items())):
            tensors.update({f"local/{i}/{k}": v for k, v in m.weights.items()})
            meta["local"].append({"site": site, "round": m.round, "score": m.score, "noise_sd": m.noise_sd})
        return StrategyState(tensors=tensors, meta=meta)

    def load(self, state: StrategyState) -> None:
        def part(prefix):
            return {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}

        g = state.meta.get("global")
        self.best_global = None if not g else SelectedModel("FL global best", part("global/"), self.plan,
                                                            self.experiment_id, g["round"], g["score"],
                                                            noise_sd=g.get("noise_sd"))
        self.best_local = {m["site"]: SelectedModel(f"FL local ({m['site']})", part(f"local/{i}/"), self.plan,
                                                    self.experiment_id, m["round"], m["score"], m["site"],
                                                    noise_sd=m.get("noise_sd"))
                           for i, m in enumerate(state.meta.get("local", []))}
