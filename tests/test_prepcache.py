"""The node's on-disk cache of preprocessed volumes (nodes/worker/prepcache.py), through training.prepare."""

import numpy as np
import pytest
import torch
from voxgrid.datasets import write_dicom_series, write_nifti
from voxgrid.nodes.worker import training
from voxgrid.nodes.ops import admin
from voxgrid.nodes.service.home import Home
from voxgrid.nodes.worker.prepcache import PrepCache
from voxgrid.pki import create_ca, issue_certificate

import voxgrid
from voxgrid.cli import main as cli_main

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SITE_LABELS = {1: "pancreas", 2: "tumor"}


def _plan(a_max=300):
    plan = voxgrid.unet_plan(["background", "pancreas", "tumor"], patch_size=(16, 16, 16))
    pre = [dict(plan.preprocessing[0], a_max=a_max), {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "LPS"}]
    return plan.model_copy(update={"preprocessing": pre})


def _image(seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 30, (32, 32, 16)).astype(np.float32)
    image[8:20, 8:20, 4:10] += 200
    label = np.zeros(image.shape, np.uint8)
    label[8:20, 8:20, 4:10] = 1
    label[10:14, 10:14, 5:8] = 2
    return image, label


@pytest.fixture
def volumes(tmp_path):
    """One NIfTI case and one DICOM series case, each with a NIfTI label map."""
    image, label = _image(0)
    write_nifti(tmp_path / "img" / "a.nii.gz", image, AFFINE)
    write_nifti(tmp_path / "lab" / "a.nii.gz", label, AFFINE)
    image, label = _image(1)
    write_dicom_series(tmp_path / "img" / "b", np.round(image), AFFINE)
    write_nifti(tmp_path / "lab" / "b.nii.gz", label, AFFINE)
    return [
        {"case_id": "a", "image": str(tmp_path / "img" / "a.nii.gz"), "label": str(tmp_path / "lab" / "a.nii.gz"),
         "kind": "nifti", "split": "train", "series_uid": None, "allow_resample": False},
        {"case_id": "b", "image": str(tmp_path / "img" / "b"), "label": str(tmp_path / "lab" / "b.nii.gz"),
         "kind": "dicom", "split": "val", "series_uid": None, "allow_resample": False},
    ]


@pytest.fixture
def reads(monkeypatch):
    """Counts the volumes actually read from their DICOM / NIfTI sources."""
    calls = []
    real = training.load_volume

    def counting(source, **kw):
        calls.append(source.case_id)
        return real(source, **kw)

    monkeypatch.setattr(training, "load_volume", counting)
    return calls


def _items(data):
    return data.splits["train"] + data.splits["val"]


def _assert_same(a, b):
    for x, y in zip(_items(a), _items(b), strict=True):
        for key in ("image", "label"):
            assert torch.equal(x[key].as_tensor(), y[key].as_tensor())
            assert x[key].dtype == y[key].dtype
            assert torch.allclose(x[key].affine.double(), y[key].affine.double(), atol=1e-9)


def test_second_load_after_a_restart_reads_no_source_and_equals_a_fresh_preprocess(tmp_path, volumes, reads):
    plan, root = _plan(), tmp_path / "cache"
    fresh = training.prepare(volumes, SITE_LABELS, plan)
    assert reads == ["a", "b"]
    first = PrepCache(root)
    training.prepare(volumes, SITE_LABELS, plan, cache=first)
    assert (first.hits, first.misses) == (0, 2) and len(first.entries()) == 2

    restarted = PrepCache(root)  # a new worker process: nothing in memory
    reads.clear()
    cached = training.prepare(volumes, SITE_LABELS, plan, cache=restarted)
    assert reads == [] and (restarted.hits, restarted.misses) == (2, 0)
    _assert_same(cached, fresh)
    # The pipeline ran (reorientation to LPS flips the first two axes of the RAS image) and the label mapping is kept.
    assert cached.splits["train"][0]["image"].affine[0, 0] == -1.5
    assert set(torch.unique(cached.splits["val"][0]["label"].as_tensor()).tolist()) == {0.0, 1.0, 2.0}


def test_a_changed_pipeline_label_mapping_or_source_misses(tmp_path, volumes, reads):
    cache = PrepCache(tmp_path / "cache")
    training.prepare(volumes, SITE_LABELS, _plan(), cache=cache)
    reads.clear()
    other = training.prepare(volumes, SITE_LABELS, _plan(a_max=250), cache=cache)
    assert reads == ["a", "b"]
    assert float(other.splits["train"][0]["image"].max()) == 1.0

    reads.clear()
    training.prepare(volumes, {1: "pancreas", 2: "unknown"}, _plan(), cache=cache)  # tumor now maps to background
    assert reads == ["a", "b"]

    image, _ = _image(7)  # the owner replaces case a's image with new content
    write_nifti(volumes[0]["image"], image + 50, AFFINE)
    reads.clear()
    data = training.prepare(volumes, SITE_LABELS, _plan(), cache=cache)
    assert reads == ["a"]  # b is still cached
    _assert_same(data, training.prepare(volumes, SITE_LABELS, _plan()))
    assert len(cache.entries()) == 7  # 2 + 2 (pipeline) + 2 (label mapping) + 1 (new source)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, volumes, reads, damage):
    plan, root = _plan(), tmp_path / "cache"
    training.prepare(volumes, SITE_LABELS, plan, cache=PrepCache(root))
    entry = PrepCache(root).entries()[0]
    blob = bytearray(entry.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[-100] ^= 0xFF  # in the tensor bytes: the header still parses
    else:
        blob = bytearray(b"\x00" * 64)
    entry.write_bytes(bytes(blob))

    cache = PrepCache(root)
    reads.clear()
    data = training.prepare(volumes, SITE_LABELS, plan, cache=cache)
    assert (cache.hits, cache.rebuilt, len(reads)) == (1, 1, 1)
    _assert_same(data, training.prepare(volumes, SITE_LABELS, plan))
    again = PrepCache(root)
    training.prepare(volumes, SITE_LABELS, plan, cache=again)
    assert (again.hits, again.rebuilt) == (2, 0)


def test_a_cache_that_cannot_be_written_only_costs_speed(tmp_path, volumes):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    cache = PrepCache(tmp_path / "cache")
    data = training.prepare(volumes, SITE_LABELS, _plan(), cache=cache)
    assert len(_items(data)) == 2 and cache.misses == 2 and cache.entries() == []


def test_owner_cli_shows_and_clears_the_cache(tmp_path, volumes, capsys):
    ca = create_ca(tmp_path / "ca")
    cert = issue_certificate(ca, tmp_path / "certs", "n", ["127.0.0.1"])
    home = tmp_path / "home"
    admin.init_home("node", home, "n", ca_cert=ca.cert, cert=cert.cert, key=cert.key)
    cache = PrepCache(Home(home).cache / "prepared")
    training.prepare(volumes, SITE_LABELS, _plan(), cache=cache)
    assert cli_main(["node", "cache", "info", "--home", str(home)]) in (0, None)
    out = capsys.readouterr().out
    assert '"entries": 2' in out and str(home / "cache" / "prepared") in out
    assert cli_main(["node", "cache", "clear", "--home", str(home)]) in (0, None)
    assert "removed 2 preprocessed volume(s)" in capsys.readouterr().out
    assert cache.entries() == [] and cache.info()["bytes"] == 0
    assert cli_main(["node", "cache", "info", "--home", str(tmp_path / "nowhere")]) == 2
    assert "no node home at" in capsys.readouterr().err


def test_a_slice_ordered_dicom_volume_is_stored_without_a_transposing_copy(tmp_path, volumes):
    from voxgrid.datasets import read_dicom_series

    image = torch.from_numpy(read_dicom_series(volumes[1]["image"]).image)
    assert not image.is_contiguous()  # the reader's (X, Y, Z) view of its (Z, Y, X) buffer
    cache = PrepCache(tmp_path / "cache")
    assert cache.put("k", {"image": image, "case": {"note": "json values ride along"}})
    back = cache.load("k")
    assert back["image"].shape == image.shape and torch.equal(back["image"], image)
    assert back["case"] == {"note": "json values ride along"}
    assert cache.info()["bytes"] < image.numel() * 4 + 4096  # the voxels once, plus a small header
