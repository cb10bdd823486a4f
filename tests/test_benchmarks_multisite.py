"""The multi-site benchmark runs at CI size: local baselines, FedAvg, FedProx, DWA and FedBN over real
node processes, then the cross-site table; checks its shape and that its findings are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multisite.py"


@pytest.mark.slow
def test_multisite_small(tmp_path):
    out = tmp_path / "multisite.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", str(out), "--root", str(tmp_path / "fed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Dice on each site's test split" in proc.stdout and "every FL global best model beats" in proc.stdout
    res = json.loads(out.read_text())
    table = res["table"]
    assert table["split"] == "test" and table["sites"] == ["site-a", "site-b", "site-c"]
    assert table["site_classes"] == {"site-a": ["pancreas"], "site-b": ["pancreas", "tumor"],
                                     "site-c": ["pancreas", "tumor"]}
    names = [m["name"] for m in table["models"]]
    assert names[:3] == ["local site-a", "local site-b", "local site-c"]
    for label in ("FedAvg", "FedProx", "DWA", "FedBN"):
        assert f"{label} global best" in names and all(f"{label} local site-{s}" in names for s in "abc")
    for m in table["models"]:
        assert not m["errors"], m
        assert set(m["dice"]) == set(table["sites"])
        for site, classes in table["site_classes"].items():
            assert all(0 <= m["dice"][site][c] <= 1 for c in classes)
        assert m["dice"]["site-a"]["tumor"] is None  # site a annotates no tumour: not measurable there
    f = res["findings"]["fl_global_best"]
    assert set(f["every_federated_beats_every_standalone"]) == {"pancreas", "tumor", "mean"}
    assert all(isinstance(v["holds"], bool) for v in f["every_federated_beats_every_standalone"].values())
    [unseen] = f["standalone_on_unseen_class"]
    assert unseen["model"] == "local site-a" and unseen["class"] == "tumor"
