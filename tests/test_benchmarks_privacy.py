"""The privacy-utility benchmark runs tiny over real node processes: a run without DP and DP-SGD runs
whose noise was set for target epsilons; the nodes' receipts must meet the targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy_utility.py"


def test_privacy_utility_tiny(tmp_path):
    out = tmp_path / "pu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--epsilons", "1", "8", "--timing-steps", "1",
                           "--json", str(out), "--root", str(tmp_path / "fed")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mean Dice" in proc.stdout and "times (target <= 2)" in proc.stdout
    res = json.loads(out.read_text())
    rows = {r["run"]: r for r in res["rows"]}
    assert list(rows) == ["no DP", "DP-SGD eps=8", "DP-SGD eps=1"]
    assert rows["no DP"]["epsilon_rdp"] is None and rows["no DP"]["noise_multiplier"] is None
    for target in (1, 8):
        r = rows[f"DP-SGD eps={target}"]
        # the nodes ran and receipted what the scientist asked: RDP epsilon at (just below) the target
        assert 0.95 * target <= r["epsilon_rdp"] <= target and r["epsilon_prv"] < r["epsilon_rdp"]
    assert rows["DP-SGD eps=1"]["noise_multiplier"] > rows["DP-SGD eps=8"]["noise_multiplier"]
    for r in rows.values():
        assert not r["errors"] and 0 <= r["mean_dice"] <= 1
    t = res["step_time_s"]
    assert t["plain"] > 0 and t["dp_sgd"] > 0 and t["slowdown"] == t["dp_sgd"] / t["plain"]
