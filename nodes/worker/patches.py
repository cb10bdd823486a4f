"""The training data path: foreground/background indices computed once per volume, patch crops that use
them, and a loader that keeps the device fed (issue 17, item 3).

Why. MONAI's ``RandCropByPosNegLabeld`` scans the whole label map for its foreground and background
voxels on every call unless it is handed the indices: 0.67 s for 4 patches of 96^3 from a
256 x 256 x 160 volume here, against a few ms with the indices given. So the indices are computed
when a volume is prepared (:func:`finish_prepared`, with MONAI's ``FgBgToIndicesd``), cached on disk
with it (:mod:`.prepcache`), and every crop, DP-SGD's per-patient ones included, uses them.

Memory. Labels are kept as uint8 class indices (1 byte a voxel, not float32's 4) from preparation to
the loss, which takes them as they are; the indices are int32 (fg + bg = one entry per voxel, 4 bytes),
so a prepared training volume holds 4 (image) + 1 (label) + 4 (indices) bytes a voxel, about what
image and float32 label took before. Validation and test volumes carry no indices.

Feeding. :class:`PatchLoader` draws an epoch's batches lazily: on a CPU thread that runs ahead of the
training step (pinned host memory and ``non_blocking`` copies on CUDA), or, when the split fits in the
GPU's free memory, with the volumes on the GPU so that crops and augmentation run there. The worker
is a daemon process, so it cannot use a ``DataLoader`` with worker processes.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, FgBgToIndicesd, MapTransform, RandCropByPosNegLabeld, SpatialPadd

#: Where a prepared training volume keeps its label's flat foreground / background voxel indices.
FG_KEY, BG_KEY = "fg_indices", "bg_indices"
INDEX_KEYS = (FG_KEY, BG_KEY)
IMAGE_LABEL = ("image", "label")


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


def label_as_uint8(label: torch.Tensor) -> torch.Tensor:
    """A label map of class indices (1, X, Y, Z) as uint8, its affine kept (plan classes fit: the label
    lookup table is uint8). Already uint8: returned as is."""
    return label if label.dtype == torch.uint8 else label.to(torch.uint8)


def indices_match(item: Mapping, label_key: str = "label") -> bool:
    """Whether ``item`` holds foreground and background indices that describe its label map: both
    present, together one per voxel (``FgBgToIndicesd`` without an image splits every voxel)."""
    if not all(k in item for k in INDEX_KEYS):
        return False
    voxels = math.prod(item[label_key].shape[1:])
    return sum(int(_plain(item[k]).numel()) for k in INDEX_KEYS) == voxels


class FgBgIndicesd(MapTransform):
    """The label's flat foreground (label > 0) and background (label == 0) voxel indices, as int32
    tensors under :data:`FG_KEY` and :data:`BG_KEY` (MONAI's ``FgBgToIndicesd``, whose int64 output
    would take 8 bytes a voxel). Indices of a volume over 2^31 voxels stay int64."""

    def __init__(self, label_key: str = "label", allow_missing_keys: bool = False):
        super().__init__([label_key], allow_missing_keys)
        self.label_key = label_key
        self._inner = FgBgToIndicesd(keys=label_key, fg_postfix="_fg", bg_postfix="_bg")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        # A bool mask, not the label: on a uint8 label MONAI's ``~any(label)`` is a bitwise not (~0 = 255,
        # ~1 = 254, both non-zero), so its background would be every voxel, foreground included.
        found = self._inner({self.label_key: _plain(d[self.label_key]) > 0})
        small = math.prod(d[self.label_key].shape[1:]) < 2**31
        for key, postfix in ((FG_KEY, "_fg"), (BG_KEY, "_bg")):
            t = _plain(found[f"{self.label_key}{postfix}"]).reshape(-1)
            d[key] = t.to(torch.int32) if small else t
        return d


class EnsureIndicesd(MapTransform):
    """Pad ``keys`` to at least ``spatial_size`` and make sure the indices describe the padded label.

    Cached indices are kept when nothing was padded (the usual case); a volume smaller than the patch,
    or an item without indices (an old cache entry, a validation volume), gets them computed here, for
    this call only: such a volume is small, or the caller should have prepared it (:func:`finish_prepared`)."""

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], label_key: str = "label"):
        super().__init__(keys)
        self.label_key = label_key
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self._pad = SpatialPadd(keys=keys, spatial_size=self.spatial_size)
        self._indices = FgBgIndicesd(label_key)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        shape = tuple(d[self.label_key].shape[1:])
        if any(s < p for s, p in zip(shape, self.spatial_size, strict=True)):
            d = self._pad(d)
        return d if indices_match(d, self.label_key) else self._indices(d)


def finish_prepared(item: dict, train: bool) -> dict:
    """A prepared volume as the trainer keeps it: label uint8, and, for a training volume, its
    foreground/background indices (computed here unless they already match the label).
    Returns ``item`` itself when nothing changed (so a cache hit that is complete is not rewritten)."""
    out = item
    if item["label"].dtype != torch.uint8:
        out = {**item, "label": label_as_uint8(item["label"])}
    if train and not indices_match(out):
        out = FgBgIndicesd()(out)
    return out


def patch_crop(patch_size: Sequence[int], pos_neg: Sequence[float], num_samples: int,
               augmentation: Sequence[Callable], seed: int) -> Compose:
    """A plan's training patches: padded to the patch size, cropped foreground/background balanced (as in
    the multi-site pancreas studies) around centres drawn from the volume's cached indices, then the plan's
    augmentation. Input: a prepared item (image (1, X, Y, Z) float32, label (1, X, Y, Z) uint8, indices);
    output: ``num_samples`` dicts with image and label of shape (1, *patch_size)."""
    crop = Compose([
        EnsureIndicesd(IMAGE_LABEL, patch_size),
        RandCropByPosNegLabeld(keys=list(IMAGE_LABEL), label_key="label", spatial_size=tuple(patch_size),
                               pos=pos_neg[0], neg=pos_neg[1], num_samples=num_samples, allow_smaller=False,
                               fg_indices_key=FG_KEY, bg_indices_key=BG_KEY),
        *augmentation,
    ])
    crop.set_random_state(seed=seed)
    return crop


def split_bytes(data: Sequence[Mapping]) -> int:
    """Bytes of the images and labels of ``data`` (what moving the split to a GPU would take)."""
    return sum(_plain(item[k]).nbytes for item in data for k in IMAGE_LABEL)


def fits_on_device(data: Sequence[Mapping], device: torch.device, share: float = 0.25,
                   free_bytes: Callable[[torch.device], int] | None = None) -> bool:
    """Whether the split's images and labels fit in ``share`` of the device's free memory (the rest is
    the network's, its activations' and the optimiser's). Never on a CPU or other non-CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free = (free_bytes or (lambda d: torch.cuda.mem_get_info(d)[0]))(device)
    return split_bytes(data) <= share * free


def to_device(item: Mapping, device: torch.device) -> dict:
    """The item's image and label on ``device``; indices stay on the host, where crop centres are drawn
    (a centre drawn on the GPU would cost a host sync per patch)."""
    return {k: (v.to(device) if k in IMAGE_LABEL else v) for k, v in item.items()}


def stack_batch(samples: Sequence[Mapping], pin: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches as a batch: image (B, 1, *patch) float32 and label (B, 1, *patch) uint8, pinned by ``pin``."""
    x = torch.stack([_plain(s["image"]) for s in samples])
    y = torch.stack([label_as_uint8(_plain(s["label"])) for s in samples])
    return (x, y) if pin is None else (pin(x), pin(y))


_DONE = object()


class PatchLoader:
    """An epoch's training batches, ``(image, label)`` on ``device``: image (B, 1, *patch) float32,
    label (B, 1, *patch) uint8.

    Each pass over the data shuffles the volumes, crops ``crop`` (``samples_per_volume`` patches a call)
    from a window of them, shuffles the window's patches and cuts batches of ``batch_size``; a pass ends
    with one smaller batch when the patches do not divide. An epoch of ``n_steps`` batches is one pass
    (``n_steps`` = ceil(patches / batch_size)) or runs on into fresh passes (more steps).

    ``on_device`` (None: :func:`fits_on_device`): volumes on the device, crops and augmentation there,
    in the training thread (CUDA runs them asynchronously). Otherwise a thread crops up to
    ``prefetch`` batches ahead, into pinned memory on CUDA (``pin``, for tests), copied without blocking.
    ``wait_s``: seconds the training thread waited for batches; ``crop_s``: seconds spent cropping."""

    def __init__(self, data: Sequence[Mapping], crop: Callable[[Mapping], list[dict]], *, batch_size: int,
                 samples_per_volume: int, seed: int, device: torch.device, on_device: bool | None = None,
                 prefetch: int = 2, pin: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not data:
            raise ValueError("the dataset's train split is empty")
        self.device = torch.device(device)
        self.on_device = fits_on_device(data, self.device) if on_device is None else on_device
        self.data = [to_device(d, self.device) for d in data] if self.on_device else list(data)
        self.crop, self.batch_size, self.rng = crop, batch_size, random.Random(seed)
        self.window = max(4 * batch_size, samples_per_volume)  # patches shuffled together
        self.prefetch = max(1, prefetch)
        if pin is None and self.device.type == "cuda" and not self.on_device:
            pin = torch.Tensor.pin_memory
        self.pin = pin
        self.wait_s = self.crop_s = 0.0

    def batches_per_pass(self, samples_per_volume: int) -> int:
        return math.ceil(len(self.data) * samples_per_volume / self.batch_size)

    def _pass(self) -> Iterator[list[dict]]:
        order = list(range(len(self.data)))
        self.rng.shuffle(order)
        window: list[dict] = []
        for k, i in enumerate(order):
            t0 = time.perf_counter()
            window += self.crop(self.data[i])
            self.crop_s += time.perf_counter() - t0
            last = k == len(order) - 1
            if len(window) >= self.window or last:
                self.rng.shuffle(window)
                while len(window) >= self.batch_size or (last and window):
                    yield window[:self.batch_size]
                    window = window[self.batch_size:]

    def _batches(self, n_steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        made = 0
        while made < n_steps:
            for samples in self._pass():
                yield stack_batch(samples, self.pin)
                made += 1
                if made == n_steps:
                    return

    def epoch(self, n_steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``n_steps`` batches on the device."""
        if self.on_device:
            yield from self._batches(n_steps)
            return
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(n_steps, q, stop), name="patch-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                t0 = time.perf_counter()
                got = q.get()
                self.wait_s += time.perf_counter() - t0
                if got is _DONE:
                    return
                if isinstance(got, BaseException):
                    raise got
                x, y = got
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue, then let it end
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.05)

    def _produce(self, n_steps: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self._batches(n_steps):
                if not _put(q, batch, stop):
                    return
            _put(q, _DONE, stop)
        except BaseException as exc:  # the training thread raises it
            _put(q, exc, stop)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer stopped; False if it did."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


__all__ = ["FG_KEY", "BG_KEY", "INDEX_KEYS", "FgBgIndicesd", "EnsureIndicesd", "PatchLoader",
           "finish_prepared", "fits_on_device", "indices_match", "label_as_uint8", "patch_crop", "stack_batch",
           "split_bytes", "to_device"]
