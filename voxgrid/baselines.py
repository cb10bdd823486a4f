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

from voxgrid.evaluation import site_names
from voxgrid.experiment import Experiment, RoundResult
from voxgrid.plan import Plan
from voxgrid.pointers import DatasetPointer
from voxgrid.selection import SelectedModel
from voxgrid.strategies import FedAvg
from voxgrid.tensors import StateDict


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
            for site, p in zip(self.sites, self.pointers)}

    @classmethod
    def resume(cls, folder: str | Path, pointers: list[DatasetPointer]) -> LocalBaselines:
        """Continue from ``checkpoint_dir`` (each site's experiment from its own checkpoint)."""
        self = cls.__new__(cls)
        self.pointers, self.sites = list(pointers), site_names(pointers)
        self.experiments = {s: Experiment.resume(Path(folder) / s, [p]) for s, p in zip(self.sites, self.pointers)}
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
