"""The DP-SGD step benchmark runs at a tiny size and reports both ways against the plain step."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dp_step  # noqa: E402


def test_dp_step_benchmark_tiny(tmp_path):
    lines = []
    rows = dp_step.main(["--channels", "4,8", "--res-units", "0", "--patch", "16", "--patients", "3", "--views", "2",
                         "--repeats", "1", "--json", str(tmp_path / "f.json")], echo=lines.append)
    [row] = rows
    assert row["channels"] == [4, 8] and row["res_units"] == 0
    assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("plain_s", "dp_loop_s", "dp_vmap_s", "vmap_ratio"))
    assert json.loads((tmp_path / "f.json").read_text())["rows"][0]["vmap_ratio"] == row["vmap_ratio"]
    assert lines[-1].startswith("largest DP-SGD step / plain step, vmapped: ")
