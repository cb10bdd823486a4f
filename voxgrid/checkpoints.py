"""Experiment checkpoints: one folder, brought up to date after every round; never pickled.

* ``round-NNNN.safetensors``: the global weights after ``NNNN`` completed rounds;
* ``strategy-NNNN.safetensors``: the strategy's tensor state (moments), if it has any;
* ``selection-NNNN.safetensors``: the models kept by model selection, if any;
* ``experiment.json``: the experiment's results (plan, strategy, sites, every round), its settings,
  and the JSON parts of the strategy's and selection's state; replaced atomically, written last.

:meth:`voxgrid.experiment.Experiment.save_checkpoint` and ``Experiment.resume`` use :func:`save` and :func:`load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from voxgrid import tensors
from voxgrid.plan import Plan
from voxgrid.reports import RoundResult
from voxgrid.strategies import Strategy, StrategyState, from_config
from voxgrid.tensors import StateDict

STATE_FILE = "experiment.json"


def _save_state(folder: Path, stem: str, state: StrategyState) -> dict:
    """Tensors to ``<stem>.safetensors`` (only if there are any), metadata inline as JSON."""
    out = {"meta": state.meta, "tensors": None}
    if state.tensors:
        path = folder / f"{stem}.safetensors"
        path.write_bytes(tensors.dumps(state.tensors))
        out["tensors"] = path.name
    return out


def _load_state(folder: Path, saved: dict | None) -> StrategyState:
    if not saved:
        return StrategyState()
    blob = tensors.loads((folder / saved["tensors"]).read_bytes()) if saved.get("tensors") else {}
    return StrategyState(tensors=blob, meta=saved.get("meta") or {})


def save(folder: str | Path, *, completed: int, weights: bytes, results: dict, settings: dict, strategy: Strategy,
         selection=None) -> Path:
    """Write the checkpoint after ``completed`` rounds; ``weights`` is the global weights'
    safetensors blob, ``selection`` a :class:`~voxgrid.selection.ModelSelection` or None.
    Returns the path of ``experiment.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{completed:04d}.safetensors"
    path.write_bytes(weights)
    kept = _save_state(folder, f"selection-{completed:04d}", selection.state()) if selection else None
    state = results | {"completed_rounds": completed, "weights": path.name, **settings, "selection": kept,
                       "strategy_state": _save_state(folder, f"strategy-{completed:04d}", strategy.state_dict())}
    tmp = folder / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / STATE_FILE)
    return folder / STATE_FILE


@dataclass
class Checkpoint:
    """A checkpoint folder as read back: ``state`` is its ``experiment.json``."""

    folder: Path
    state: dict

    @property
    def experiment_id(self) -> str:
        return self.state["experiment_id"]

    @property
    def plan(self) -> Plan:
        return Plan.model_validate(self.state["plan"])

    def strategy(self, strategy: Strategy | None = None) -> Strategy:
        """The saved strategy with its state restored: rebuilt from its config, or ``strategy``,
        which must have the same config."""
        saved = self.state.get("strategy", {"name": "fedavg"})
        if strategy is None:
            strategy = from_config(saved)
        elif strategy.config() != saved:
            raise ValueError(f"the checkpoint was made with strategy {saved}, not {strategy.config()}; "
                             "pass an equal strategy, or none to rebuild the saved one")
        strategy.load_state_dict(_load_state(self.folder, self.state.get("strategy_state")))
        return strategy

    def weights(self) -> StateDict:
        return tensors.loads((self.folder / self.state["weights"]).read_bytes())

    def settings(self) -> dict:
        """The experiment's constructor arguments, as saved."""
        s = self.state
        return {"rounds": s["target_rounds"], "min_nodes": s["min_nodes"], "job_timeout": s["job_timeout"],
                "evaluate": s["evaluate"], "seed": s["seed"], "select": s.get("select", False),
                "secure_aggregation": s.get("secure_aggregation", False), "threshold": s.get("threshold"),
                "secure_neighbours": s.get("secure_neighbours")}

    def selection_state(self) -> StrategyState:
        return _load_state(self.folder, self.state.get("selection"))

    def history(self) -> list[RoundResult]:
        return [RoundResult.from_dict(r) for r in self.state["rounds"]]


def load(folder: str | Path) -> Checkpoint:
    """Read the checkpoint in ``folder`` (its ``experiment.json``; the tensors when asked for)."""
    folder = Path(folder)
    return Checkpoint(folder, json.loads((folder / STATE_FILE).read_text()))
