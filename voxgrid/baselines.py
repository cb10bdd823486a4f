"""Standalone (local-only) baselines: each site trains the same plan on its own data only.

One single-site :class:`~voxgrid.experiment.Experiment` per site with FedAvg, which over one site
is plain local training: the scientist holds one weight set per site and nothing is averaged. A
round is the same budget as a federated round (``plan.local_epochs`` local epochs), so
``LocalBaselines(plan, pointers, rounds=R)`` matches ``Experiment(plan, pointers, rounds=R)``.
Each site's best round by its own validation Dice is kept (``models()``).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from voxgrid import tensors
from voxgrid.evaluation import site_names
from voxgrid.experiment import Experiment, RoundResult
from voxgrid.jobs import across_nodes
from voxgrid.plan import Plan
from voxgrid.pointers import DatasetPointer
from voxgrid.selection import SelectedModel, mean_score
from voxgrid.strategies import FedAvg, apply_delta
from voxgrid.tensors import StateDict
from voxgrid.wire import JobRequest


class LocalBaselines:
    """Local-only training at every site, rounds run in parallel across sites.

    Args as :class:`~voxgrid.experiment.Experiment`; ``evaluate`` scores each site's model on its
    own test split after every round (off by default: :func:`~voxgrid.evaluation.cross_site_evaluation`
    scores the selected models at the end). Checkpoints go to ``checkpoint_dir/<site>``.
    """

    def __init__(self, plan: Plan, pointers: list[DatasetPointer], *, rounds: int = 3, job_timeout: float = 600.0,
                 evaluate: bool = False, checkpoint_dir: str | Path | None = None, name: str = "local", seed: int = 0,
                 initial: StateDict | None = None):
        if not pointers:
            raise ValueError("local baselines need at least one dataset pointer")
        self.plan, self.pointers, self.rounds = plan, list(pointers), rounds
        self.sites = site_names(self.pointers)
        folder = Path(checkpoint_dir) if checkpoint_dir else None
        self.experiments = {
            site: Experiment(plan, [p], strategy=FedAvg(), rounds=rounds, job_timeout=job_timeout, evaluate=evaluate,
                             checkpoint_dir=folder / site if folder else None, name=f"{name}-{site}"[:40], seed=seed,
                             initial=initial, select=True)
            for site, p in zip(self.sites, self.pointers, strict=True)}

    @classmethod
    def resume(cls, folder: str | Path, pointers: list[DatasetPointer]) -> LocalBaselines:
        """Continue from ``checkpoint_dir`` (each site's experiment from its own checkpoint)."""
        self = cls.__new__(cls)
        self.pointers, self.sites = list(pointers), site_names(pointers)
        self.experiments = {s: Experiment.resume(Path(folder) / s, [p])
                            for s, p in zip(self.sites, self.pointers, strict=True)}
        first = next(iter(self.experiments.values()))
        self.plan, self.rounds = first.plan, first.rounds
        return self

    def run(self, rounds: int | None = None, on_round=None) -> dict[str, list[RoundResult]]:
        """Train every site until ``rounds`` (default: the configured number) rounds are done."""
        target = self.rounds if rounds is None else rounds
        with ThreadPoolExecutor(max_workers=len(self.experiments)) as pool:
            while min(len(e.history) for e in self.experiments.values()) < target:
                behind = [e for e in self.experiments.values() if len(e.history) < target]
                results = list(pool.map(lambda e: e.run_round(), behind))
                if on_round:
                    on_round(self, results)
        return self.history

    @property
    def history(self) -> dict[str, list[RoundResult]]:
        return {s: e.history for s, e in self.experiments.items()}

    @property
    def weights(self) -> dict[str, StateDict]:
        """Each site's latest local weights."""
        return {s: e.global_weights for s, e in self.experiments.items()}

    def models(self, prefix: str = "local") -> list[SelectedModel]:
        """Each site's best local model by its validation Dice, named ``"<prefix> <site>"``."""
        out = []
        for site, e in self.experiments.items():
            best = e.selection.best_global
            if best is not None:
                out.append(dataclasses.replace(best, name=f"{prefix} {site}", site=site))
        return out

    def history_frame(self):
        """One row per (site, round): loss and validation Dice of the site's own model."""
        import pandas as pd

        rows = [{"site": s, "round": r.round, "loss": x.loss, **{f"val_dice[{k}]": v for k, v in x.val_dice.items()}}
                for s, hist in self.history.items() for r in hist for x in r.sites]
        return pd.DataFrame(rows)


def finetune_plan(plan: Plan, epochs: int, part: Literal["all", "head"] = "all") -> Plan:
    """The plan of local fine-tuning: ``epochs`` local epochs, no proximal term, and with
    ``part="head"`` only the task head (``plan.local.head``) trained."""
    if part not in ("all", "head"):
        raise ValueError(f"part must be 'all' or 'head', got {part!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if part == "head" and not plan.local.head:
        raise ValueError("part='head' needs the plan to name its head (plan.local.head, e.g. ['model.2'])")
    data = plan.model_dump(mode="json")
    data["local_epochs"] = epochs
    data["local"] = {**data["local"], "proximal_mu": 0.0, "train_only": list(plan.local.head) if part == "head" else []}
    return Plan(**data)


def finetune(experiment: Experiment, *, epochs: int = 1, part: Literal["all", "head"] = "all",
             pointers: list[DatasetPointer] | None = None, prefix: str = "FL+FT",
             job_timeout: float | None = None) -> list[SelectedModel]:
    """Local fine-tuning after federation ("FedBN + fine-tuning"): one model per site.

    Each site trains the experiment's final global weights on its own data for ``epochs`` local
    epochs (``part="head"``: the head only), as a train job of the experiment's next round under
    the experiment's id, so a site starts from the tensors it kept itself in the last round
    (``plan.local.keep_local``: FedBN's norms, task heads) and keeps its fine-tuned ones. Run it once
    the federation is over: a later federated round would reuse that round number. The released
    delta passes the node's privacy filters and ledger like any update.

    Returns ``SelectedModel``s named ``"<prefix> <site>"`` with ``site`` set and ``score`` the
    site's validation mean Dice after fine-tuning, ready for :func:`~voxgrid.evaluation.cross_site_evaluation`.
    """
    if experiment.secure_aggregation:
        raise ValueError("fine-tuned site models are individual updates; the nodes of a secure-aggregation "
                         "experiment release none (run finetune on an experiment without secure_aggregation)")
    plan = finetune_plan(experiment.plan, epochs, part)
    pointers = list(pointers if pointers is not None else experiment.pointers)
    start, rnd = experiment.global_weights, len(experiment.history)
    blob = tensors.dumps(start)
    timeout = experiment.job_timeout if job_timeout is None else job_timeout

    def one(p: DatasetPointer) -> tuple[StateDict, float | None]:
        req = JobRequest(kind="train", experiment_id=experiment.experiment_id, round=rnd, dataset=p.name,
                         plan=plan.model_dump(mode="json"), plan_hash=plan.content_hash,
                         weights_id=tensors.digest(blob), split="val", evaluate=True,
                         seed=experiment.seed * 100003 + rnd)
        st, delta = experiment.jobs.train(p, req, blob, like=start, timeout=timeout)
        return apply_delta(start, delta), mean_score([st.metrics.mean_dice])

    results = across_nodes(one, pointers)
    return [SelectedModel(f"{prefix} {site}", weights, plan, experiment.experiment_id, rnd, score, site)
            for site, (weights, score) in zip(site_names(pointers), results, strict=True)]
