"""What a node keeps to itself between rounds: the site-kept tensors of ``plan.local.keep_local``
(FedBN's normalisation layers), per experiment, dataset and round. They never leave the node.

A train job of round r starts from the state of the latest earlier round and stores its own under r;
an evaluate job of round r uses the latest state at or before r (the model that round produced).
With a folder, each state is a safetensors file written atomically, so it survives a restart.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from voxgrid import tensors
from voxgrid.tensors import StateDict

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ROUND = re.compile(r"^round-(\d{6})\.safetensors$")


class LocalState:
    """Site-kept tensors by (experiment, dataset, round): in memory, and on disk under ``folder`` if given."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        self._mem: dict[tuple[str, str], dict[int, StateDict]] = {}

    def _dir(self, experiment: str, dataset: str) -> Path | None:
        for part in (experiment, dataset):
            if not _SAFE.match(part) or part in (".", ".."):
                raise ValueError(f"invalid experiment or dataset name {part!r}")
        return self.folder / experiment / dataset if self.folder else None

    def put(self, experiment: str, dataset: str, round: int, state: StateDict) -> None:
        d = self._dir(experiment, dataset)
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
        self._mem.setdefault((experiment, dataset), {})[round] = state
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"round-{round:06d}.safetensors"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(tensors.dumps(state))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def _rounds(self, experiment: str, dataset: str) -> dict[int, StateDict | None]:
        d = self._dir(experiment, dataset)
        found: dict[int, StateDict | None] = {}
        if d is not None and d.is_dir():
            found = {int(m.group(1)): None for f in d.iterdir() if (m := _ROUND.match(f.name))}
        return found | self._mem.get((experiment, dataset), {})

    def get(self, experiment: str, dataset: str, round: int, *, inclusive: bool) -> StateDict | None:
        """The state of the latest round before ``round`` (at or before it if ``inclusive``), or None."""
        rounds = self._rounds(experiment, dataset)
        older = [r for r in rounds if r < round or (inclusive and r == round)]
        if not older:
            return None
        r = max(older)
        state = rounds[r]
        if state is None:  # on disk only (after a restart)
            state = tensors.loads((self._dir(experiment, dataset) / f"round-{r:06d}.safetensors").read_bytes())
            self._mem.setdefault((experiment, dataset), {})[r] = state
        return state
