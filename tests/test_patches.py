"""The training data path (issue 17, items 3 and 6): foreground/background indices computed once and cached
with the prepared volume, crops that use them (plain and DP-SGD), uint8 labels, the prefetching loader
(on an injected device: the ``meta`` device catches a batch left on the host), and no host read of the
loss or of DTP's Dice per step."""

import math
import sys
import threading

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

import voxgrid
from voxgrid.datasets import write_nifti
from voxgrid.nodes.worker import patches, training
from voxgrid.nodes.worker.patches import (BG_KEY, FG_KEY, PatchLoader, finish_prepared, indices_match,
                                          patch_crop)
from voxgrid.nodes.worker.prepcache import PrepCache
from voxgrid.plan import build_network

LABELS = ["background", "pancreas", "tumor"]
PATCH = (16, 16, 16)


def _item(shape=(32, 32, 32), seed=0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1, *shape), generator=g)
    label = torch.zeros((1, *shape), dtype=dtype)
    label[0, 4:12, 6:14, 5:11] = 1
    label[0, 6:8, 8:10, 6:8] = 2
    return {"image": MetaTensor(image), "label": MetaTensor(label)}


@pytest.fixture
def scans(monkeypatch):
    """Counts MONAI's full-volume index scans inside RandCropByPosNegLabeld."""
    import monai.transforms.croppad.array as croppad

    calls = []
    real = croppad.map_binary_to_indices
    monkeypatch.setattr(croppad, "map_binary_to_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_indices_are_int32_and_split_every_voxel_into_foreground_and_background_for_uint8_labels():
    item = finish_prepared(_item(), train=True)
    assert item["label"].dtype == torch.uint8 and isinstance(item["label"], MetaTensor)
    fg, bg = item[FG_KEY], item[BG_KEY]
    assert fg.dtype == bg.dtype == torch.int32
    flat = item["label"].as_tensor().reshape(-1)
    assert torch.equal(fg.long(), torch.nonzero(flat > 0).reshape(-1))
    # MONAI's own pass over a uint8 label takes ~label bitwise: every voxel would be "background".
    assert torch.equal(bg.long(), torch.nonzero(flat == 0).reshape(-1))
    assert indices_match(item) and fg.numel() + bg.numel() == 32 ** 3
    val = finish_prepared(_item(), train=False)
    assert FG_KEY not in val and val["label"].dtype == torch.uint8  # validation volumes carry none


def test_cached_indices_crop_the_same_patches_as_monai_without_scanning_the_label(scans):
    old = Compose([SpatialPadd(keys=["image", "label"], spatial_size=PATCH),
                   RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=PATCH, pos=1,
                                          neg=1, num_samples=4, allow_smaller=False)])
    old.set_random_state(seed=7)
    reference = old(_item())
    assert len(scans) == 1  # MONAI scanned the whole label for its indices
    prepared = finish_prepared(_item(), train=True)
    scans.clear()
    new = patch_crop(PATCH, (1, 1), 4, [], seed=7)(prepared)
    assert not scans, "the crop rescanned the label instead of using the cached indices"
    assert len(new) == 4
    for a, b in zip(reference, new, strict=True):
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
        assert torch.equal(a["label"].as_tensor().to(torch.uint8), b["label"].as_tensor())
        assert b["label"].dtype == torch.uint8 and tuple(b["image"].shape) == (1, *PATCH)


def test_a_volume_smaller_than_the_patch_is_padded_with_indices_of_the_padded_label(scans):
    small = finish_prepared(_item(shape=(12, 20, 20)), train=True)
    out = patch_crop(PATCH, (1, 0), 3, [], seed=1)(small)  # foreground centres only
    assert not scans
    for s in out:
        assert tuple(s["label"].shape) == (1, *PATCH)
        assert (s["label"].as_tensor() > 0).any()  # centred on the (shifted) foreground


def test_an_old_cache_entry_without_indices_is_completed_once_and_written_back(tmp_path):
    image, label = _item()["image"].as_tensor()[0].numpy(), np.zeros((32, 32, 32), np.uint8)
    label[4:12, 6:14, 5:11] = 1
    write_nifti(tmp_path / "a.nii.gz", image, np.eye(4))
    write_nifti(tmp_path / "a-label.nii.gz", label, np.eye(4))
    vol = {"case_id": "a", "image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "a-label.nii.gz"),
           "kind": "nifti", "split": "train", "series_uid": None, "allow_resample": False}
    plan = voxgrid.unet_plan(LABELS, patch_size=PATCH, preprocessing=[])
    cache = PrepCache(tmp_path / "cache")
    lut = training.label_lut({1: "pancreas"}, plan)
    # what the cache held before indices were cached: a float32 label, no indices
    old = training._prepare_one(training.VolumeSpec.model_validate(vol), None, lut)
    assert old["label"].dtype == torch.float32
    from voxgrid.nodes.worker.prepcache import cache_key

    cache.put(cache_key(training.VolumeSpec.model_validate(vol), plan.preprocessing, plan.labels, lut), old)
    data = training.prepare([vol], {1: "pancreas"}, plan, cache=cache)
    item = data.splits["train"][0]
    assert cache.hits == 1 and cache.upgraded == 1 and item["label"].dtype == torch.uint8 and indices_match(item)
    again = training.prepare([vol], {1: "pancreas"}, plan, cache=PrepCache(tmp_path / "cache"))
    assert torch.equal(again.splits["train"][0][FG_KEY], item[FG_KEY])
    fresh = PrepCache(tmp_path / "cache")
    training.prepare([vol], {1: "pancreas"}, plan, cache=fresh)
    assert fresh.hits == 1 and fresh.upgraded == 0  # complete now: not rewritten


def _loader(n=3, **kw) -> PatchLoader:
    data = [finish_prepared(_item(seed=i), train=True) for i in range(n)]
    kw = {"batch_size": 2, "samples_per_volume": 3, "seed": 0, "device": "cpu", "on_device": False} | kw
    return PatchLoader(data, patch_crop(PATCH, (1, 1), kw["samples_per_volume"], [], 0), **kw)


def test_the_loader_draws_an_epoch_of_batches_on_the_device_it_was_given():
    pinned = []

    def pin(t):  # a CUDA host would pin; here record that every batch tensor passes through
        pinned.append(t.dtype)
        return t

    loader = _loader(device="meta", pin=pin)
    n = loader.batches_per_pass(3)
    assert n == 5  # 3 volumes x 3 patches in batches of 2: the last one smaller
    batches = list(loader.epoch(n))
    assert [x.shape[0] for x, _ in batches] == [2, 2, 2, 2, 1]
    for x, y in batches:
        assert x.device.type == y.device.type == "meta"  # nothing left on the host
        assert x.dtype == torch.float32 and y.dtype == torch.uint8 and tuple(y.shape[1:]) == (1, *PATCH)
    assert pinned == [torch.float32, torch.uint8] * 5
    assert len(list(loader.epoch(7))) == 7  # more steps than a pass: fresh passes


def test_the_loader_is_reproducible_and_runs_ahead_on_a_thread():
    a = [(x.clone(), y.clone()) for x, y in _loader().epoch(5)]
    loader = _loader()
    threads = []
    real = loader._batches

    def recording(n):
        threads.append(threading.current_thread().name)
        return real(n)

    loader._batches = recording
    b = list(loader.epoch(5))
    assert threads == ["patch-prefetch"]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert loader.crop_s > 0


def test_a_crop_error_reaches_the_training_thread():
    loader = _loader()
    loader.crop = lambda item: (_ for _ in ()).throw(RuntimeError("bad crop"))
    with pytest.raises(RuntimeError, match="bad crop"):
        list(loader.epoch(3))


def test_volumes_go_to_the_gpu_only_when_they_fit_in_its_free_memory():
    data = [finish_prepared(_item(), train=True)]
    need = patches.split_bytes(data)
    assert need == 32 ** 3 * 5  # float32 image + uint8 label
    cuda = torch.device("cuda", 1)
    assert patches.fits_on_device(data, cuda, free_bytes=lambda d: 4 * need + 1)
    assert not patches.fits_on_device(data, cuda, free_bytes=lambda d: 4 * need - 1)
    assert not patches.fits_on_device(data, torch.device("cpu"), free_bytes=lambda d: 10 ** 12)
    on = PatchLoader(data, patch_crop(PATCH, (1, 1), 2, [], 0), batch_size=2, samples_per_volume=2, seed=0,
                     device="meta", on_device=True)
    assert on.data[0]["image"].device.type == "meta" and on.data[0][FG_KEY].device.type == "cpu"
    batches = list(on.epoch(2))  # cropped where the volumes are: nothing comes back to the host
    assert len(batches) == 2 and all(x.device.type == y.device.type == "meta" for x, y in batches)
    assert on.wait_s == 0.0  # no thread: the device runs the crops asynchronously


class HostReads:
    """Counts reads of a tensor's value (float, item, tolist, bool) by voxgrid's code in the training
    thread: on a GPU each waits for the device. (Libraries' reads of host-side scalars, such as Adam's
    step count or MONAI's list of axes, are no such wait and are not counted.)"""

    def __init__(self, monkeypatch):
        self.count = 0
        me = threading.get_ident()
        for name in ("__float__", "item", "tolist", "__bool__"):
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                if threading.get_ident() == me and "site-packages" not in sys._getframe(1).f_code.co_filename:
                    self.count += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("dtp", [False, True])
def test_training_reads_nothing_back_from_the_device_per_step(monkeypatch, dtp):
    local = {"dtp": {"gamma": 1.0, "alpha": 0.5, "r": 1.0}} if dtp else {}
    data = [finish_prepared(_item(seed=i), train=True) for i in range(2)]
    reads = {}
    for steps in (2, 6):
        plan = voxgrid.unet_plan(LABELS, patch_size=PATCH, channels=(4, 8), strides=(2,), num_res_units=0,
                                 batch_size=2, samples_per_volume=2, local_epochs=1, steps_per_epoch=steps,
                                 local=local)
        trainer = training.Trainer(torch.device("cpu"))
        net = trainer.network(plan, build_network(plan).state_dict())
        kbar: dict = {}
        with monkeypatch.context() as m:
            counter = HostReads(m)
            loss, done = trainer.train(plan, net, data, seed=0, present={1, 2}, dtp_state=kbar)
        reads[steps] = counter.count
        assert done == steps and math.isfinite(loss)
        if dtp:
            assert set(kbar) == {1, 2} and all(0 <= v <= 1 for v in kbar.values())  # read back at the end
    assert reads[6] == reads[2] <= 2, reads  # per job (the mean loss; DTP's averages), not per step


def test_dp_sgd_crops_each_sampled_patient_from_the_cached_indices(scans):
    plan = voxgrid.unet_plan(LABELS, patch_size=PATCH, channels=(4, 8), strides=(2,), num_res_units=0,
                             batch_size=2, local_epochs=1, steps_per_epoch=2)
    plan = plan.model_copy(update={"privacy": {"mechanism": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                               "delta": 1e-5, "sample_rate": 1.0}})
    data = [finish_prepared(_item(seed=i), train=True) | {"patient": f"p{i}"} for i in range(2)]
    trainer = training.Trainer(torch.device("cpu"))
    net = trainer.network(plan, build_network(plan).state_dict())
    calls = []
    real = patches.EnsureIndicesd.__call__
    with pytest.MonkeyPatch.context() as m:
        m.setattr(patches.EnsureIndicesd, "__call__", lambda self, d: calls.append(indices_match(d)) or real(self, d))
        _, steps = trainer.train(plan, net, data, seed=0, present={1, 2})
    assert steps == 2 and len(calls) == 4 and all(calls)  # every patient, every step: its cached indices
    assert not scans  # and no pass over a label map
