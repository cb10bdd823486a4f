"""The secure-aggregation benchmark runs at a tiny size: its table, its JSON, and its correctness check."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "secagg.py"


def test_secagg_benchmark_tiny(tmp_path):
    out = tmp_path / "secagg.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1000,70000", "--nodes", "3,5",
                           "--dropout-fraction", "0,0.4", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mask MB/s" in proc.stdout and "ratio" in proc.stdout
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [(r["size"], r["nodes"]) for r in rows] == [(s, n) for s in (1000, 70000) for n in (3, 5) for _ in (0, 1)]
    for r in rows:
        assert r["threshold"] == r["nodes"] // 2 + 1 and r["survivors"] == r["nodes"] - r["dropped"]
        assert r["dropped"] <= r["nodes"] - r["threshold"]
        assert r["verified"] and r["max_abs_error"] <= r["error_bound"] and r["weight_error"] < 1e-6
        assert all(r[k] > 0 for k in ("mask_s", "unmask_s", "plain_s", "mask_MBps", "overhead_ratio"))
    assert [r["dropped"] for r in rows[:4]] == [0, 1, 0, 2]  # 0.4 of 3 rounds to 1; of 5, 2 (= n - t)


def _load_script():
    spec = importlib.util.spec_from_file_location("secagg_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_secagg_benchmark_sparse_graph_and_bad_arguments(tmp_path, capsys):
    bench = _load_script()  # in process: one subprocess above already covers the command line
    out = tmp_path / "plus.json"
    assert bench.main(["--sizes", "500", "--nodes", "8", "--dropout-fraction", "0.2", "--neighbours", "4",
                       "--json", str(out)]) == 0
    assert "SecAgg+ neighbour graph of degree 4" in capsys.readouterr().out
    [r] = json.loads(out.read_text())["results"]
    assert r["neighbours"] == 4 and r["threshold"] == 3 and r["dropped"] == 2 and r["verified"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--nodes", "1"])
    assert "nodes >= 2" in capsys.readouterr().err
