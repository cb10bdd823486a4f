"""benchmarks/executor.py runs on the CPU at a tiny size and gives sane figures, its last line the data share."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_executor_benchmark_tiny_on_the_cpu(tmp_path):
    import executor

    lines = []
    figures = executor.main(["--shape", "48", "48", "32", "--patch", "16", "--train-shape", "24", "24", "24",
                             "--train-patch", "16", "--volumes", "2", "--steps", "2", "--repeats", "1",
                             "--eval-shape", "64", "64", "48", "--eval-classes", "3",
                             "--json", str(tmp_path / "f.json")], echo=lines.append)
    assert figures["device"] == "cpu" and (tmp_path / "f.json").is_file()
    draw = figures["draw"]
    assert draw["before_s"] > 0 and draw["after_s"] > 0 and draw["indices_once_s"] > 0
    assert draw["dp_patient_before_s"] > 0 and draw["dp_patient_after_s"] > 0
    assert figures["plain"]["steps"] == 2 and figures["dp"]["steps"] >= 1
    assert figures["epoch_prep"]["batches"] == 2  # 2 volumes x 2 patches in batches of 2
    assert math.isfinite(figures["data_share"]) and 0 <= figures["data_share"] <= 1
    assert lines[-1].startswith("data path share of a training step on cpu:")
    # evaluation peak memory, each measurement in a fresh process: now, and the one-hot scoring of before
    three = figures["eval_memory"]["classes"]["3"]
    assert figures["eval_memory"]["shape"] == [64, 64, 48]
    assert three["now"]["peak_bytes"] > 0 and three["before"]["peak_bytes"] > 0
    assert three["onehot_bytes"] == 2 * 64 * 64 * 48 * 3 * 8
    assert any(x.startswith("[executor] evaluation peak memory, 3 classes, 64x64x48:") for x in lines)
