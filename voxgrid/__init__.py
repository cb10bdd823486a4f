"""voxgrid: federated learning for medical imaging in which every hospital keeps its data.

The scientist's side::

    import voxgrid
    grid = voxgrid.connect("https://grid:8443", token=..., ca="ca.crt")
    pointers = grid.search("#ct", "#pancreas")
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"])
    exp = voxgrid.Experiment(plan, pointers, rounds=5)
    exp.run()
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path

from voxgrid.client import (AccessRefused, AuthError, GridClient, NodeClient, NotFoundError, RemoteError,
                            RequestRefused, Unreachable, VoxgridError)
from voxgrid.baselines import LocalBaselines, finetune
from voxgrid.evaluation import CrossSiteTable, cross_site_evaluation
from voxgrid.experiment import Experiment, RoundFailed
from voxgrid.approvals import ApprovalsNotGranted
from voxgrid.plan import Plan, PlanError, unet_plan
from voxgrid.pointers import DatasetPointer, Grid, PointerList
from voxgrid.pretrain import pretrain
from voxgrid.selection import SelectedModel
from voxgrid.strategies import (DWA, Cyclic, FedAdam, FedAvg, FedAvgDice, FedBN, FedProx, FedYogi, Median, Strategy,
                                TrimmedMean)


def connect(grid_url: str | None = None, *, token: str | Path, ca: str | Path | None = None,
            nodes: list[str] | None = None, tokens: dict[str, str] | None = None, timeout: float = 120.0) -> Grid:
    """Connect to a grid (or, without one, to a list of node URLs) as a scientist.

    Args:
        grid_url: the grid's https URL; ``None`` to use ``nodes`` directly.
        token: your token (or a path to a file holding it); used at the grid and, unless
            ``tokens`` names another for a node, at every node.
        ca: the federation CA certificate (PEM) that signed the servers' certificates.
        nodes: node URLs to use without a grid.
        tokens: per-node tokens, by node name.
    """
    if grid_url is None and not nodes:
        raise ValueError("connect() needs a grid URL or a list of node URLs")
    if isinstance(token, Path) or (isinstance(token, str) and Path(token).is_file()):
        token = Path(token).read_text().strip()
    grid = GridClient(grid_url, token, ca, timeout) if grid_url else None
    if grid is not None:
        grid.whoami()  # fail now, with a clear message, on a bad URL, CA or token
    return Grid(grid, token, ca, nodes={u: u for u in nodes or []}, tokens=tokens, timeout=timeout)


__all__ = ["connect", "Grid", "Plan", "PlanError", "unet_plan", "pretrain", "Experiment", "RoundFailed", "ApprovalsNotGranted", "Strategy", "FedAvg",
           "FedAvgDice", "FedProx", "FedAdam", "FedYogi", "DWA", "FedBN", "Cyclic", "Median", "TrimmedMean", "LocalBaselines", "finetune",
           "SelectedModel", "CrossSiteTable", "cross_site_evaluation",
           "DatasetPointer", "PointerList", "NodeClient", "GridClient", "VoxgridError", "RemoteError", "AuthError",
           "AccessRefused", "NotFoundError", "RequestRefused", "Unreachable", "__version__"]
