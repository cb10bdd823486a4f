"""``voxgrid demo``: the one command a new user runs, as a real process, at its smallest size."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_runs_a_secure_private_federation_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "voxgrid", "demo", "--out", str(out), "--rounds", "1",
                           "--volumes", "3", "--local-epochs", "1", "--review"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["secure_aggregation"] is True and results["threshold"] == 2
    [rnd] = results["rounds"]
    assert len(rnd["sites"]) == 3 and all(s["ok"] and s["test_dice"] for s in rnd["sites"])
    [dp] = results["dp_experiment"]["rounds"]  # the same plan again with DP-SGD: every release accounted
    assert all(s["ok"] and s["privacy"]["dp"] and s["privacy"]["epsilon"] > 0 for s in dp["sites"])
    assert results["dp_experiment"]["secure_aggregation"] is True
    text = proc.stdout
    assert text.count("secure aggregation (threshold 2)") == 2
    assert "global model Dice on each site's test split" in text and "with DP-SGD" in text
    # --review: both experiments asked every owner; the first site's owner denied once, with a reason the
    # scientist read, then every owner approved through `voxgrid node requests`, and only then did training run
    from voxgrid.nodes.local.review import DENIAL

    assert text.count("the owner of node-site-a denied it") == 2 and text.count(DENIAL) >= 2
    assert text.count("approved (") >= 6 and text.index("denied it") < text.index("global model Dice")
    reports = sorted((out / "privacy-report").glob("*/privacy-report.html"))
    assert len(reports) == 3 and all("dp_sgd" in r.read_text() for r in reports)
