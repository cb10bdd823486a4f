"""The multi-site benchmark runs at CI size: local baselines, FedAvg, FedProx, DWA, DWA+DTP, FedBN,
MT-heads and FedBN+FT over real node processes, then the cross-site table; checks its shape and that
its findings are reported. The summary over seeds is checked on hand-made runs."""

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
    for label in ("FedAvg", "FedProx", "DWA", "DWA+DTP", "FedBN", "MT-heads"):
        assert f"{label} global best" in names and all(f"{label} local site-{s}" in names for s in "abc")
    assert all(f"FedBN+FT site-{s}" in names for s in "abc")  # fine-tuned after federation, one per site
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
    assert set(res["findings"]) == {"fl_global_best", "fl_local", "fl_finetuned"}
    assert res["config"]["seeds"] == [0] and [r["seed"] for r in res["runs"]] == [0]
    assert res["summary"]["every_federated_beats_every_standalone"]["fl_finetuned"]["seeds"] == 1


def _run(seed, local_mean, fed_mean, holds, unseen):
    models = [{"name": "local site-a", "average": {"mean": local_mean}},
              {"name": "FedAvg global best", "average": {"mean": fed_mean}}]
    found = {"every_federated_beats_every_standalone": {"mean": {"holds": holds}},
             "standalone_on_unseen_class": [{"model": "local site-a", "class": "tumor", "mean_dice_elsewhere": unseen}]}
    return {"seed": seed, "table": {"models": models}, "findings": {"fl_global_best": found, "fl_local": found}}


def test_summary_over_seeds_hand_computed():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import multisite
    finally:
        sys.path.remove(str(SCRIPT.parent))
    s = multisite.summarise([_run(0, 0.2, 0.5, True, 0.01), _run(1, 0.4, 0.3, False, 0.03)])
    assert s["average_mean_dice"]["local site-a"] == pytest.approx({"mean": 0.3, "min": 0.2, "max": 0.4, "n": 2})
    assert s["average_mean_dice"]["FedAvg global best"]["mean"] == pytest.approx(0.4)
    assert s["average_mean_dice"]["FedAvg global best"]["seeds_beating_every_local"] == 1  # 0.5 > 0.2, 0.3 < 0.4
    assert "seeds_beating_every_local" not in s["average_mean_dice"]["local site-a"]
    assert s["every_federated_beats_every_standalone"]["fl_global_best"] == {"seeds_holding": 1, "seeds": 2}
    assert s["every_federated_beats_every_standalone"]["fl_finetuned"] == {"seeds_holding": 0, "seeds": 0}
    u = s["standalone_on_unseen_class"]["local site-a on tumor"]
    assert (u["mean"], u["max"], u["values"]) == (pytest.approx(0.02), 0.03, [0.01, 0.03])
    text = multisite.render_summary(s, [0, 1])
    assert "1 of 2 seeds" in text and "0.300 [0.200, 0.400]" in text
    assert "0.400 [0.300, 0.500]  beats every local baseline in 1 of 2 seeds" in text
    args = multisite.parse_args(["--small", "--seed", "3", "--methods", "FedBN+FT"])
    assert args.seeds == [3] and args.methods == ["FedBN+FT", "FedBN"]  # fine-tuning needs the FedBN run
    with pytest.raises(SystemExit):
        multisite.parse_args(["--seeds", "1", "1"])
