"""The pooled (centralised) baseline of the multi-site benchmark: the same plan trained in one process
on the union of every site's training split, which no real federation can do.

On the phantom federation the benchmark owns every node, so it reads each node's registry (the same
train/val/test assignment the node uses), prepares the volumes with the node's own code
(``voxgrid.nodes.worker.training.prepare``: the plan's preprocessing and label mapping) and trains
with the node's own :class:`~voxgrid.nodes.worker.training.Trainer` (same patches, loss, optimiser).
A round is ``plan.local_epochs`` epochs over the pooled training volumes, so ``rounds`` rounds give
every training volume as many epochs as one site gets in a federated experiment of ``rounds`` rounds.
The kept round is the one with the best average over sites of the mean validation Dice at each site,
the rule of "FL global best". The model is then scored at the nodes like every other.

Pooling is sound only when every site's label map is complete for the classes its images contain:
a site that does not annotate a class must not show it (the phantoms' ``SiteSpec.tumor``), else its
unlabelled tumours would be taught as background. :func:`check_poolable` refuses otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def check_poolable(specs) -> None:
    """Refuse sites whose images contain a class their labels do not annotate (phantoms: the tumour)."""
    bad = [s.name for s in specs if s.tumor and "tumor" not in s.labels.values()]
    if bad:
        raise ValueError(f"sites {bad} show tumours they do not annotate: pooling their labels would teach "
                         "tumour as background")


def pooled_data(node_homes: dict[str, Path], plan):
    """Per site (``{site: node home}``, the dataset named after the site), its volumes prepared as
    its node prepares them: ``{site: PreparedData}`` with train, val and test splits."""
    from voxgrid.nodes.service.home import Home
    from voxgrid.nodes.service.store import NodeStore
    from voxgrid.nodes.worker.training import prepare

    out = {}
    for site, home in node_homes.items():
        store = NodeStore(Home(home).db_file)
        try:
            ds = store.dataset(site)
        finally:
            store.close()
        if ds is None:
            raise ValueError(f"node home {home} has no dataset {site!r}")
        out[site] = prepare([dataclasses.asdict(v) for v in ds.volumes], ds.label_names, plan)
    return out


def train_pooled(plan, data: dict, *, rounds: int, seed: int, device: str = "cpu", threads: int = 1):
    """Train ``plan`` from ``initial_weights(plan, seed)`` on the union of the sites' train splits.

    Returns ``(weights, round, val_score, history)``: the kept round's weights (a state dict), its
    index, its score (mean over sites of the site's mean val Dice) and every round's score.
    """
    import torch

    from voxgrid.nodes.worker.training import Trainer
    from voxgrid.plan import initial_weights
    from voxgrid.selection import mean_score

    torch.set_num_threads(threads)
    trainer = Trainer(torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device))
    train = [item for d in data.values() for item in d.splits["train"]]
    present = set().union(*(d.present for d in data.values()))
    weights = initial_weights(plan, seed=seed)
    best, history = None, []
    for rnd in range(rounds):
        net = trainer.network(plan, weights)
        trainer.train(plan, net, train, seed * 100003 + rnd, present)  # the seed an experiment's round-r job gets
        weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        score = mean_score([mean_score(trainer.evaluate(plan, net, d.splits["val"], d.present))
                            for d in data.values() if d.splits["val"]])
        history.append(score)
        if score is not None and (best is None or score > best[2]):
            best = (weights, rnd, score)
    if best is None:
        raise ValueError("no site has a validation split with an annotated class: nothing to select by")
    return (*best, history)
