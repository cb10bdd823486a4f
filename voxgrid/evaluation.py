"""Cross-site evaluation: every model on every site's test split, Dice per class, as the studies lay it out.

Scoring runs at the nodes as evaluate jobs (no voxel leaves a node); only Dice comes back.

>>> table = cross_site_evaluation(fl.selection.models() + baselines.models(), pointers)
>>> table.frame        # rows: models; columns: (site, class) ... (average, class), (average, mean)
>>> print(table)       # the same, as a plain-text table
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from voxgrid import tensors
from voxgrid.jobs import JOB_ERRORS, JobRunner, across_nodes, describe
from voxgrid.pointers import DatasetPointer
from voxgrid.reports import noise_note
from voxgrid.selection import SelectedModel, dice_noise_sd, mean_score
from voxgrid.wire import JobRequest

AVERAGE = "average"


def site_names(pointers: Sequence[DatasetPointer]) -> list[str]:
    """A column name per pointer: the dataset name, or ``dataset@node`` where names repeat."""
    names = [p.name for p in pointers]
    return [n if names.count(n) == 1 else f"{n}@{p.node}" for n, p in zip(names, pointers, strict=True)]


@dataclass
class CrossSiteTable:
    """Dice per (model, site, class) on each site's ``split``; ``None`` where not measured."""

    split: str
    sites: list[str]
    site_classes: dict[str, list[str]]  # the classes each site annotates (its columns)
    models: list[SelectedModel]
    dice: dict[str, dict[str, dict[str, float | None]]]  # model name -> site -> class -> Dice
    errors: dict[str, dict[str, str]]  # model name -> site -> why it has no score
    #: site -> std of the Gaussian noise the node added to each released Dice (a privacy budget applies there)
    noise_sd: dict[str, float] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        seen = [c for s in self.sites for c in self.site_classes[s]]
        return list(dict.fromkeys(seen))

    def average(self, model: str) -> dict[str, float | None]:
        """Per class, the mean over sites that annotate it; ``"mean"``: the mean of those class averages."""
        out = {c: mean_score([self.dice[model].get(s, {}).get(c) for s in self.sites if c in self.site_classes[s]])
               for c in self.classes}
        out["mean"] = mean_score(out)
        return out

    @property
    def frame(self):
        """A DataFrame: one row per model, columns (site, class), then (average, class) and (average, mean)."""
        import pandas as pd

        cols = [(s, c) for s in self.sites for c in self.site_classes[s]]
        cols += [(AVERAGE, c) for c in [*self.classes, "mean"]]
        rows = []
        for m in self.models:
            avg = self.average(m.name)
            rows.append([self.dice[m.name].get(s, {}).get(c) if s != AVERAGE else avg[c] for s, c in cols])
        return pd.DataFrame(rows, index=[m.name for m in self.models], columns=pd.MultiIndex.from_tuples(cols),
                            dtype=float)

    def render(self, digits: int = 3) -> str:
        """Plain text in the studies' layout: a header row of sites over a row of classes."""
        cols = [(s, c) for s in self.sites for c in self.site_classes[s]]
        cols += [(AVERAGE, c) for c in [*self.classes, "mean"]]
        width = max(8, digits + 4, *(len(c) + 1 for _, c in cols))
        name_w = max(len("model"), *(len(m.name) for m in self.models)) + 2
        groups = [(s, sum(1 for g, _ in cols if g == s)) for s in [*self.sites, AVERAGE]]
        top = " " * name_w + "".join(f"{s[:w * width - 1]:^{w * width}}" for s, w in groups)
        head = f"{'model':<{name_w}}" + "".join(f"{c:>{width}}" for _, c in cols)
        lines = [f"Dice on each site's {self.split} split", top, head, "-" * len(head)]
        for m, row in zip(self.models, self.frame.itertuples(index=False), strict=True):
            cells = "".join(f"{'-' if v is None or math.isnan(v) else f'{v:.{digits}f}':>{width}}" for v in row)
            lines.append(f"{m.name:<{name_w}}{cells}")
        for name, errs in self.errors.items():
            lines += [f"  {name} at {s}: {e}"[:160] for s, e in errs.items()]
        return "\n".join(lines + self.noise_notes())

    def noise_notes(self) -> list[str]:
        """Lines saying which Dice (and which selections) are noised, and by how much; none without noise."""
        notes = [noise_note(s, sd) for s, sd in sorted(self.noise_sd.items())]
        notes += [f"note: {m.name} was selected by validation Dice noised at the nodes (std up to {m.noise_sd:.3f})"
                  for m in self.models if m.noise_sd]
        return notes

    __str__ = render

    def _repr_html_(self) -> str:
        return self.frame.to_html(float_format=lambda v: f"{v:.3f}", na_rep="-")

    def to_dict(self) -> dict:
        return {"split": self.split, "sites": self.sites, "site_classes": self.site_classes,
                "models": [{"name": m.name, "experiment_id": m.experiment_id, "round": m.round, "score": m.score,
                            "site": m.site, "dice": self.dice[m.name], "average": self.average(m.name),
                            "errors": self.errors.get(m.name, {}), "selection_noise_sd": m.noise_sd}
                           for m in self.models], "noise_sd": self.noise_sd}


def cross_site_evaluation(models: Sequence[SelectedModel], pointers: Sequence[DatasetPointer], *,
                          split: str = "test", job_timeout: float = 600.0, seed: int = 0) -> CrossSiteTable:
    """Score every model on every pointer's ``split`` with evaluate jobs at the nodes.

    Sites run in parallel, models one after the other at each site. A job that fails leaves that
    cell ``None`` and its reason in ``errors``. Model names must be unique.
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique: {names}")
    if not models or not pointers:
        raise ValueError("cross-site evaluation needs at least one model and one pointer")
    sites = site_names(pointers)
    blobs = [tensors.dumps(m.weights) for m in models]
    runner = JobRunner(job_timeout)  # each model's weights go to each node once, whatever its datasets

    def at_site(p: DatasetPointer):
        scores, errors, noise = {}, {}, 0.0
        for m, blob in zip(models, blobs, strict=True):
            req = JobRequest(kind="evaluate", experiment_id=m.experiment_id, round=m.round, dataset=p.name,
                             plan=m.plan.model_dump(mode="json"), plan_hash=m.plan.content_hash,
                             weights_id=tensors.digest(blob), split=split, evaluate=False, seed=seed)
            try:
                st = runner.run(p, req, blob)
                scores[m.name], noise = dict(st.metrics.dice), max(noise, dice_noise_sd(st.privacy) or 0.0)
            except JOB_ERRORS as exc:
                scores[m.name], errors[m.name] = {}, describe(exc)
        return scores, errors, noise

    results = across_nodes(at_site, pointers)
    dice = {m.name: {s: r[0][m.name] for s, r in zip(sites, results, strict=True)} for m in models}
    errors = {}
    for s, (_, errs, _) in zip(sites, results, strict=True):
        for name, e in errs.items():
            errors.setdefault(name, {})[s] = e
    site_classes = {s: [c for c in p.info.label_names[1:] if c in models[0].plan.labels]
                    for s, p in zip(sites, pointers, strict=True)}
    noise_sd = {s: r[2] for s, r in zip(sites, results, strict=True) if r[2] > 0}
    return CrossSiteTable(split, sites, site_classes, list(models), dice, errors, noise_sd)
