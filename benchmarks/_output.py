"""What every benchmark script does with its figures: print where they went, write them as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path | None, figures: dict, tag: str) -> None:
    """Write ``figures`` to ``path`` (parents created) when a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1))
    print(f"[{tag}] figures written to {path}")
