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
    assert "pooled" in names and "Cyclic global best" in names and all(f"Cyclic local site-{s}" in names for s in "abc")
    ratios = res["runs"][0]["pooled_ratio"]
    pooled_mean = next(m["average"]["mean"] for m in table["models"] if m["name"] == "pooled")
    assert set(ratios) == {n for n in names if not n.startswith("local ") and n != "pooled"}
    assert all(r["ratio"] == pytest.approx(r["mean"] / pooled_mean) for r in ratios.values())
    assert proc.stdout.strip().splitlines()[-1].startswith("[multisite] best federated global model's mean Dice / pooled")
    assert res["summary"]["best_global_vs_pooled"]["mean"] == pytest.approx(
        max(r["ratio"] for n, r in ratios.items() if n.endswith("global best")))
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


def _benchmark_module(name):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_pooled_baseline_trains_on_the_union_of_the_nodes_train_splits(tmp_path):
    import dataclasses

    import torch

    import voxgrid
    from voxgrid.datasets import default_sites
    from voxgrid.nodes.local.federation import LocalFederation

    pooled = _benchmark_module("pooled")
    specs = default_sites(2, (16, 16, 16), n_volumes=4)
    fed = LocalFederation.create(tmp_path, specs)  # homes and registries only: no process is started
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(16,) * 3, channels=(4, 8), strides=(2,),
                             num_res_units=0, local_epochs=1, samples_per_volume=1)
    data = pooled.pooled_data({s.name: p.home for s, p in zip(specs, fed.nodes, strict=True)}, plan)
    assert {s: {k: len(v) for k, v in d.splits.items()} for s, d in data.items()} == \
        {"site-a": {"train": 2, "val": 1, "test": 1}, "site-b": {"train": 2, "val": 1, "test": 1}}
    assert data["site-a"].present == {1} and data["site-b"].present == {1, 2}
    w, rnd, score, history = pooled.train_pooled(plan, data, rounds=2, seed=3)
    assert len(history) == 2 and rnd in (0, 1) and score == max(h for h in history if h is not None) == history[rnd]
    w0 = voxgrid.plan.initial_weights(plan, seed=3)
    assert set(w) == set(w0) and any(not torch.equal(w[k], w0[k]) for k in w0)
    again = pooled.train_pooled(plan, data, rounds=2, seed=3)  # same seed, same data: the same model
    assert again[1] == rnd and all(torch.equal(again[0][k], w[k]) for k in w)
    unlabelled = dataclasses.replace(specs[0], tumor=True)  # shows tumours it labels as background
    with pytest.raises(ValueError, match="site-a.*background"):
        pooled.check_poolable([unlabelled, specs[1]])
    pooled.check_poolable(specs)


def test_pooled_ratios_and_the_last_line():
    multisite = _benchmark_module("multisite")
    runs = [{"seed": 0, "pooled_ratio": {"FedAvg global best": {"mean": 0.49, "pooled": 0.5, "ratio": 0.98},
                                         "Cyclic global best": {"mean": 0.45, "pooled": 0.5, "ratio": 0.9},
                                         "FedAvg local site-a": {"mean": 0.6, "pooled": 0.5, "ratio": 1.2}}},
            {"seed": 1, "pooled_ratio": {"FedAvg global best": {"mean": 0.4, "pooled": 0.5, "ratio": 0.8},
                                         "Cyclic global best": {"mean": 0.5, "pooled": 0.5, "ratio": 1.0}}}]
    frac = multisite.best_global_fraction(runs)
    assert [(b["seed"], b["model"]) for b in frac["per_seed"]] == [(0, "FedAvg global best"), (1, "Cyclic global best")]
    assert frac["mean"] == pytest.approx(0.99)  # local models are not global models: 1.2 does not count
    line = multisite.render_fraction(frac)
    assert line.startswith("[multisite] best federated global model's mean Dice / pooled model's: 0.990")
    assert "seed 0: FedAvg 0.490 / 0.500 = 0.980" in line
