"""The round-overhead benchmark runs at CI size and writes sane figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "round_overhead.py"


@pytest.mark.slow
def test_round_overhead_small(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out), "--root", str(tmp_path / "fed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "overhead" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["config"]["small"] is True and figures["config"]["size"] == 32
    rounds = figures["rounds"]
    assert [r["round"] for r in rounds] == list(range(figures["config"]["rounds"]))
    for r in rounds:
        assert r["compute_s"] > 0
        assert math.isfinite(r["overhead_s"]) and math.isfinite(r["wall_s"])
        assert r["overhead_s"] >= 0  # a node's compute happens inside the scientist's wall time
        assert len(r["nodes"]) == figures["config"]["sites"]
        assert all(n["compute_s"] > 0 and n["samples"] == figures["config"]["volumes"] for n in r["nodes"].values())
    for key in ("excluding_round_0", "including_round_0"):
        s = figures["summary"][key]
        assert s["compute_s"] > 0 and math.isfinite(s["overhead_s"])
    assert isinstance(figures["meets_target"], bool)
