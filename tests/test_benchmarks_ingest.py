"""The DICOM ingest benchmark runs at CI size, checks itself against SimpleITK and writes sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ingest.py"
ROWS = {"files", "pydicom loop", "simpleitk", "ours: read", "headers", "pixels", "ours: to cache", "ours: cache hit"}


def test_ingest_benchmark_small(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--repeat", "1", "--json", str(out),
                           "--root", str(tmp_path / "scratch")], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "slices/s" in proc.stdout and "simpleitk" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["config"]["small"] is True and figures["target_slices_per_s"] == 1000.0
    synthetic = figures["series"][0]
    assert synthetic["shape"] == [64, 64, 20] and synthetic["slices"] == 20
    for r in figures["series"]:
        assert set(r["seconds"]) == ROWS and all(v > 0 for v in r["seconds"].values())
        for row, rate in r["slices_per_s"].items():
            assert abs(rate * r["seconds"][row] - r["slices"]) < 1e-6 * r["slices"]
        assert r["agreement"] == {"voxels_equal": True, "affine_max_diff_mm": r["agreement"]["affine_max_diff_mm"],
                                  "cache_equal": True}
        assert r["agreement"]["affine_max_diff_mm"] < 1e-4
    assert isinstance(figures["meets_target"], bool)
    assert list((tmp_path / "scratch" / "synthetic").glob("*.dcm"))  # --root keeps the series
