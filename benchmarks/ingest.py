"""DICOM ingest throughput: slices per second from a DICOM folder to a cached Hounsfield-unit tensor,
ours (``read_dicom_series`` + the node's preprocessing cache) against SimpleITK's ImageSeriesReader
on the same files, in one run.

Series: a synthetic CT written with ``write_dicom_series`` (full size: 512 x 512 x 200 int16, the
issue's workload) and pydicom's 5-slice CT test series (``dicomdirtests/98892001/CT5N``). Each
reader runs once to warm the page cache, then ``--repeat`` times; the best time counts. Rows:

* ``files``          the files' bytes from the page cache (the ceiling)
* ``pydicom loop``   ``dcmread`` + ``pixel_array`` per file (a reference, no sorting or geometry)
* ``simpleitk``      ``ImageSeriesReader`` (GDCM sorts, rescales and builds the geometry)
* ``ours: read``     ``read_dicom_series``: HU float32 volume and RAS affine in memory, of which
  ``headers`` (``scan_series``: one header parse per file, grouping, rules) and ``pixels`` (sorting,
  gaps, pixel reads into the volume) say where the time goes
* ``ours: to cache`` read + the volume written to the node's preprocessing cache (safetensors)
* ``ours: cache hit`` the cached tensor read back and verified (what a restarted node pays)

Each row gives the best wall time and the best CPU time of this process (all its threads: SimpleITK
reads with several), as slices per second; on a busy machine the CPU figure is the steadier one.

Our voxels must equal SimpleITK's and the affines agree to 1e-4 mm, else the script fails.

    python benchmarks/ingest.py                            # full size
    python benchmarks/ingest.py --small --json out.json    # CI size: 64 x 64 x 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_SLICES_PER_S = 1000.0


def _best(fn, repeat: int) -> tuple[tuple[float, float], object]:
    """Best wall and best CPU seconds (this process, all threads) over ``repeat`` runs after a warm-up.
    CPU time is the steadier figure on a machine shared with other work."""
    fn()  # warm: page cache, imports, first-touch allocations of the libraries
    wall = cpu = float("inf")
    out = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return (wall, cpu), out


def _sitk_read(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _sitk_array_affine(img) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # SimpleITK's numpy order is (z, y, x)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def synthetic_series(folder: Path, size: int, slices: int) -> Path:
    """A CT-like int16 series: noise around soft tissue, air outside a disc, a bright spine."""
    from voxgrid.datasets import write_dicom_series

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    body = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (0.45 * size) ** 2
    image = np.where(body[..., None], rng.normal(40, 20, (size, size, slices)), -1000.0)
    image[size // 2 - size // 16: size // 2 + size // 16, int(0.7 * size): int(0.8 * size)] = 700.0
    spacing = 350.0 / size
    write_dicom_series(folder, np.round(image), np.diag([spacing, spacing, 1.25, 1.0]))
    return folder


def pydicom_series() -> Path | None:
    """pydicom's 5-slice CT test series, when the installed pydicom ships it."""
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    folder = Path(ct).parent / "dicomdirtests" / "98892001" / "CT5N" if ct else None
    return folder if folder is not None and folder.is_dir() else None


def measure(name: str, folder: Path, repeat: int, scratch: Path) -> dict:
    import pydicom
    import torch
    from voxgrid.datasets import read_dicom_series
    from voxgrid.datasets.dicom_read import _pick, _pixels, geometry
    from voxgrid.datasets.dicom_series import scan_series
    from voxgrid.nodes.worker.prepcache import PrepCache

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    cache = PrepCache(scratch / f"cache-{name}")

    def to_cache():
        vol = read_dicom_series(folder)
        cache.put("bench", {"image": torch.from_numpy(vol.image)})
        return vol

    def headers():
        return _pick(folder, scan_series(folder), None)

    summary = headers()
    t = {}
    t["files"], _ = _best(lambda: [p.read_bytes() for p in files], repeat)
    t["pydicom loop"], _ = _best(lambda: [pydicom.dcmread(p).pixel_array for p in files], repeat)
    t["simpleitk"], img = _best(lambda: _sitk_read(folder), repeat)
    t["ours: read"], ours = _best(lambda: read_dicom_series(folder), repeat)
    t["  headers"], _ = _best(headers, repeat)
    t["  pixels"], _ = _best(lambda: _pixels(summary.uid, geometry(summary.uid, summary.slice_list)[0]), repeat)
    t["ours: to cache"], _ = _best(to_cache, repeat)
    t["ours: cache hit"], hit = _best(lambda: cache.load("bench"), repeat)

    array, affine = _sitk_array_affine(img)
    n = ours.image.shape[2]
    agree = {
        "voxels_equal": bool(ours.image.shape == array.shape and np.array_equal(ours.image, array.astype(np.float32))),
        "affine_max_diff_mm": float(np.max(np.abs(ours.affine - affine))),
        "cache_equal": bool(np.array_equal(hit["image"].numpy(), ours.image)),
    }
    return {"series": name, "shape": list(ours.image.shape), "slices": n,
            "seconds": {k.strip(): v[0] for k, v in t.items()},
            "slices_per_s": {k.strip(): n / v[0] for k, v in t.items()},
            "cpu_seconds": {k.strip(): v[1] for k, v in t.items()},
            "slices_per_cpu_s": {k.strip(): n / max(v[1], 1e-9) for k, v in t.items()}, "agreement": agree}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CI size: a 64 x 64 x 20 synthetic series")
    ap.add_argument("--size", type=int, default=512, help="rows and columns of the synthetic series")
    ap.add_argument("--slices", type=int, default=200, help="slices of the synthetic series")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--root", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    size, slices = (64, 20) if args.small else (args.size, args.slices)

    root = Path(tempfile.mkdtemp(prefix="voxgrid-ingest-")) if args.root is None else args.root
    root.mkdir(parents=True, exist_ok=True)
    try:
        series = {f"synthetic CT {size}x{size}x{slices}": synthetic_series(root / "synthetic", size, slices)}
        if (ct5n := pydicom_series()) is not None:
            series["pydicom CT5N"] = ct5n
        results = [measure(f"s{i}", folder, args.repeat, root) | {"series": name}
                   for i, (name, folder) in enumerate(series.items())]
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    for r in results:
        print(f"\n{r['series']}  shape {tuple(r['shape'])}")
        print(f"  {'reader':<18}{'wall s':>10}{'slices/s':>12}{'CPU s':>10}{'slices/CPU s':>14}")
        for k, v in r["seconds"].items():
            print(f"  {k:<18}{v:>10.4f}{r['slices_per_s'][k]:>12.0f}{r['cpu_seconds'][k]:>10.4f}"
                  f"{r['slices_per_cpu_s'][k]:>14.0f}")
        print(f"  agreement with SimpleITK: {r['agreement']}")
    main_series = results[0]
    figures = {
        "config": {"small": args.small, "size": size, "slices": slices, "repeat": args.repeat,
                   "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "target_slices_per_s": TARGET_SLICES_PER_S,
        "series": results,
        "meets_target": main_series["slices_per_s"]["ours: to cache"] >= TARGET_SLICES_PER_S,
        "meets_target_cpu": main_series["slices_per_cpu_s"]["ours: to cache"] >= TARGET_SLICES_PER_S,
    }
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    ok = all(r["agreement"]["voxels_equal"] and r["agreement"]["affine_max_diff_mm"] < 1e-4
             and r["agreement"]["cache_equal"] for r in results)
    if not ok:
        print("ingest: our reader disagrees with SimpleITK or the cache", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
