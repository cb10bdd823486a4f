"""The node's durable cache of preprocessed volumes, so a restarted executor does not re-read and
re-preprocess every DICOM series and NIfTI file of a dataset.

One entry per volume, at ``HOME/cache/prepared/<key>.safetensors``, where ``key`` is the SHA-256 of
the volume's source fingerprint (paths, kind, series UID, resampling flag, and size, mtime and inode
of every file it reads, label map included), the plan's preprocessing pipeline (JSON), the label
mapping, the MONAI version and :data:`FORMAT`. The tensors are stored with safetensors (never
pickle); the affines and other JSON-safe values sit as JSON in the safetensors header, with a
CRC-32 of the tensor bytes, so a truncated or damaged entry is detected, removed and rebuilt
instead of failing a job. Entries are written to a temporary file and renamed into place, so a
reader sees a whole entry or none.

An entry holds what :func:`.patches.finish_prepared` makes of a volume: image, uint8 label and, for a
training volume, its foreground/background indices (so crops never rescan the label). An older entry
without them (a float32 label, no indices) still loads: ``fetch`` completes it and writes it back.

Nothing in here leaves the node: keys are hashes, and the entries hold voxels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from voxgrid.nodes.worker.messages import VolumeSpec

log = logging.getLogger("voxgrid.prepcache")

#: Bump when what an entry holds, or how the readers build a volume, changes: old entries then miss.
FORMAT = 1
_SUFFIX = ".safetensors"


class CacheEntryError(ValueError):
    """A cache entry that cannot be trusted (truncated, damaged, or from another format)."""


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def source_fingerprint(volume: VolumeSpec) -> dict:
    """What identifies a volume's source on disk: its registry fields plus the size, mtime and inode of
    every file read (a DICOM folder recursively). Stat only, no content read: a rewritten file changes
    its mtime, and hashing a series' content would cost about as much as reading it. OSError if gone."""
    image = Path(volume.image)
    if image.is_dir():
        files = [[str(p.relative_to(image)), *_stat(p)] for p in sorted(image.rglob("*")) if p.is_file()]
    else:
        files = [[image.name, *_stat(image)]]
    label = volume.label
    return {
        "image": str(image.resolve()), "kind": volume.kind, "series_uid": volume.series_uid,
        "allow_resample": volume.allow_resample, "files": files,
        "label": str(Path(label).resolve()) if label else None, "label_file": _stat(Path(label)) if label else None,
    }


def cache_key(volume: VolumeSpec, pipeline: list[dict], labels: list[str], lut: np.ndarray) -> str:
    """SHA-256 (hex) of everything that decides a preprocessed volume: source, pipeline, label mapping, format."""
    import monai

    doc = {"format": FORMAT, "monai": monai.__version__, "source": source_fingerprint(volume),
           "pipeline": pipeline, "labels": list(labels), "lut": np.asarray(lut, dtype=np.uint8).tolist()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    # CRC-32 over the stored bytes: it catches truncation and damage at a few GB/s, where SHA-256 would
    # add a second per large CT volume; tampering is out of scope (whoever can write HOME owns the node).
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def _dense(t: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """A contiguous tensor to store, and the permutation that gives ``t`` back from it (None: as is).
    Readers return (X, Y, Z) views of (Z, Y, X) buffers: storing the buffer saves a transposing copy."""
    if t.is_contiguous():
        return t, None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    base = t.permute(order)
    if not base.is_contiguous():
        return t.contiguous(), None
    return base, [order.index(d) for d in range(t.dim())]


class PrepCache:
    """Preprocessed volumes on disk under ``root``; ``hits``, ``misses``, ``rebuilt`` and ``upgraded``
    (hits completed and written back) count lookups."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = self.misses = self.rebuilt = self.upgraded = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}{_SUFFIX}"

    # entries -----------------------------------------------------------------------------------
    def put(self, key: str, item: dict) -> bool:
        """Store one prepared item (a dict of tensors / MetaTensors and JSON values). False, with a log
        line, when the item holds something neither safetensors nor JSON can carry (then it is not cached)."""
        from monai.data import MetaTensor

        tensors, meta = {}, {}
        for name, value in item.items():
            if isinstance(value, torch.Tensor):
                plain = value.as_tensor() if isinstance(value, MetaTensor) else value
                tensors[name], permute = _dense(plain.detach().cpu())
                meta[name] = {"permute": permute}
                if isinstance(value, MetaTensor):
                    meta[name]["affine"] = value.affine.detach().cpu().double().tolist()
            else:
                try:
                    meta[name] = {"value": json.loads(json.dumps(value))}
                except (TypeError, ValueError):
                    log.info("not caching %s: field %r is neither a tensor nor JSON", key[:12], name)
                    return False
        header = {"format": str(FORMAT), "meta": json.dumps(meta), "crc32": _checksum(tensors)}
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=_SUFFIX)
        os.close(fd)
        try:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=header)
            # No fsync: an entry a crash leaves short fails its checks at the next load and is rebuilt.
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def load(self, key: str) -> dict | None:
        """The cached item, or None when absent. CacheEntryError when the entry is damaged."""
        from monai.data import MetaTensor
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
            if header.get("format") != str(FORMAT):
                raise CacheEntryError(f"format {header.get('format')!r}, expected {FORMAT}")
            if header.get("crc32") != _checksum(tensors):
                raise CacheEntryError("tensor bytes do not match their checksum")
            meta = json.loads(header["meta"])
            if set(tensors) - set(meta):
                raise CacheEntryError(f"tensors {sorted(set(tensors) - set(meta))} lack their meta")
            item: dict = {}
            for name, entry in meta.items():
                if "value" in entry:
                    item[name] = entry["value"]
                    continue
                if name not in tensors:
                    raise CacheEntryError(f"meta names tensor {name!r}, which the entry lacks")
                t = tensors[name] if entry["permute"] is None else tensors[name].permute(entry["permute"])
                item[name] = t if "affine" not in entry else \
                    MetaTensor(t, affine=torch.tensor(entry["affine"], dtype=torch.float64))
            return item
        except (SafetensorError, CacheEntryError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CacheEntryError(f"cache entry {path.name}: {type(exc).__name__}: {exc}") from exc

    def fetch(self, volume: VolumeSpec, pipeline: list[dict], labels: list[str], lut: np.ndarray,
              build: Callable[[], dict], complete: Callable[[dict], dict] | None = None) -> dict:
        """The prepared item for ``volume``: from the cache, else ``build()`` and stored. A damaged entry is
        removed and rebuilt; a cache that cannot be written (disk full, read-only) only costs speed.

        ``complete``: brings an item up to what the trainer keeps (uint8 label, a training volume's
        foreground/background indices; :func:`.patches.finish_prepared`), returning the item itself when
        it is complete. Applied to built items and to hits; a hit it changed (an entry written before
        indices were cached, or a volume that moved into the train split) is written back, so the work is
        done once, and no entry is ever refused for lacking them."""
        try:
            key = cache_key(volume, pipeline, labels, lut)
        except OSError:
            return build()  # the source is gone: let the reader raise its own error naming the file
        try:
            item = self.load(key)
        except CacheEntryError as exc:
            log.warning("rebuilding a damaged preprocessing cache entry: %s", exc)
            self.path(key).unlink(missing_ok=True)
            self.rebuilt += 1
            item = None
        if item is not None:
            self.hits += 1
            done = complete(item) if complete else item
            if done is not item:
                self.upgraded += 1
                self._store(key, done)
            return done
        self.misses += 1
        item = build()
        if complete:
            item = complete(item)
        self._store(key, item)
        return item

    def _store(self, key: str, item: dict) -> None:
        try:
            self.put(key, item)
        except OSError as exc:
            log.warning("could not write the preprocessing cache under %s: %s", self.root, exc)

    # owner housekeeping ------------------------------------------------------------------------
    def entries(self) -> list[Path]:
        """The complete entries (not the temporary files of writes in progress)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"*{_SUFFIX}") if not p.name.startswith(".tmp-"))

    def info(self) -> dict:
        """Entry count and total bytes, for the owner."""
        files = self.entries()
        return {"path": str(self.root), "entries": len(files), "bytes": sum(p.stat().st_size for p in files)}

    def clear(self) -> int:
        """Remove every entry (and leftover temporary files); returns how many entries were removed."""
        entries = self.entries()
        for p in entries + (sorted(self.root.glob(".tmp-*")) if self.root.is_dir() else []):
            p.unlink(missing_ok=True)
        return len(entries)
