"""``voxgrid wheelhouse --out DIR``: wheels of voxgrid and every dependency, for a site with no network.

At the site (same platform and Python)::

    VOXGRID_WHEELHOUSE=DIR bash scripts/install.sh /opt/voxgrid       # or, by hand:
    python3 -m venv /opt/voxgrid && /opt/voxgrid/bin/pip install --no-index --find-links DIR voxgrid

torch is pinned (default ``torch==2.13.0``); pip takes it from wherever its configuration finds it
(a CPU build on this project's machines). ``--platform``/``--python-version`` build for another target
from binary wheels only (``pip download --only-binary=:all:``); voxgrid itself is a pure-Python wheel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def source_tree() -> Path:
    """The voxgrid source tree (where pyproject.toml is) of this installation, for building its wheel."""
    import voxgrid

    root = Path(voxgrid.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no voxgrid source tree at {root} (installed from a wheel?): pass --source")
    return root


def build(out: Path | str, *, source: Path | None = None, extras: str = "", torch: str = "torch==2.13.0",
          platform: str | None = None, python_version: str | None = None, quiet: bool = True) -> list[Path]:
    """Fill ``out`` with wheels; returns them. Raises RuntimeError naming the pip command that failed."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source or source_tree()).resolve()
    pip = [sys.executable, "-m", "pip"]
    q = ["-q"] if quiet else []

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")

    run([*pip, "wheel", *q, "--no-deps", "-w", str(out), str(source)])
    wheel = sorted(out.glob("voxgrid-*.whl"))[-1]
    spec = f"{wheel}[{extras}]" if extras else str(wheel)
    if platform or python_version:
        target = ["--only-binary=:all:"] + (["--platform", platform] if platform else []) + \
                 (["--python-version", python_version] if python_version else [])
        run([*pip, "download", *q, *target, "-d", str(out), spec, torch])
    else:
        # pip wheel: binary wheels as they are, sdists built into wheels (a site needs no compiler)
        run([*pip, "wheel", *q, "-w", str(out), spec, torch, "pip", "setuptools>=68"])
    return sorted(out.glob("*.whl"))
