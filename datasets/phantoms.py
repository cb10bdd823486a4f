"""Synthetic abdominal CT phantoms for several sites, each with its own scanner and label set.

Anatomy is drawn in normalised coordinates: [-1, 1] spans the field of view a volume of the site's
shape would have at the reference spacing (1.5, 1.5, 2.0) mm, so a site with coarser spacing sees
the same body smaller in voxels, as a real scanner would. Axes follow RAS: +x patient right (liver),
+y anterior, +z superior. Every case is deterministic in (site.seed, index).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from .dicom import write_dicom_series
from .nifti import write_nifti
from .volume import Volume

_REF_SPACING = (1.5, 1.5, 2.0)  # mm
_HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit CT scanner can report
# Label priority, lowest first: later classes override earlier ones where masks touch.
_CLASSES = ("liver", "kidney", "pancreas", "tumor")  # the order they are drawn in


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic site.

    labels: label value -> class name annotated at this site ("pancreas", "tumor", "liver", "kidney").
    shape: voxels (X, Y, Z). spacing: mm. hu_offset/hu_scale: scanner calibration, HU_out = HU * scale + offset.
    noise_sd: Gaussian noise in HU. tumor: whether images contain tumours. seed: base of every case's RNG.
    """

    name: str
    n_volumes: int
    labels: dict[int, str]
    shape: tuple[int, int, int] = (32, 32, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    noise_sd: float = 10.0
    tumor: bool = False
    seed: int = 0


def _site_name(i: int) -> str:
    return f"site-{chr(ord('a') + i)}" if i < 26 else f"site-{i:03d}"


def default_sites(n_sites: int = 3, shape=(32, 32, 32), n_volumes: int = 8, seed: int = 0) -> list[SiteSpec]:
    """Sites cycling three styles: a) pancreas labels only, no tumours; b) pancreas + tumour;
    c) few cases (max(3, n_volumes // 2)) on a different scanner: offset/scaled HU, more noise, coarser spacing."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    shape = tuple(int(s) for s in shape)
    both = {1: "pancreas", 2: "tumor"}
    styles = [
        dict(n_volumes=n_volumes, labels={1: "pancreas"}, tumor=False),
        dict(n_volumes=n_volumes, labels=both, tumor=True, hu_offset=5.0, noise_sd=12.0),
        dict(n_volumes=max(3, n_volumes // 2), labels=both, tumor=True, hu_offset=25.0, hu_scale=1.1,
             noise_sd=20.0, spacing=(1.6, 1.6, 2.5)),
    ]
    # Each site gets its own labels dict so one caller mutating it cannot change another site.
    return [
        SiteSpec(name=_site_name(i), shape=shape, seed=seed * 1009 + 101 * i + 7,
                 **{**styles[i % 3], "labels": dict(styles[i % 3]["labels"])})
        for i in range(n_sites)
    ]


def _ellipsoid(x, y, z, centre, axes) -> np.ndarray:
    """Squared ellipsoidal radius (< 1 inside), broadcast over the (X, 1, 1), (1, Y, 1), (1, 1, Z) grids."""
    return ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2


def _blur(image: np.ndarray) -> np.ndarray:
    """[1, 6, 1] / 8 along each axis: partial-volume edges, as a real point-spread function gives."""
    for axis in range(3):
        padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        n = image.shape[axis]
        shifted = [padded[(slice(None),) * axis + (slice(s, s + n),)] for s in range(3)]
        image = (shifted[0] + 6 * shifted[1] + shifted[2]) / 8
    return image


def _pancreas(rng, x, y, z):
    """A curved tube of ellipsoid beads from head (patient right) to tail (left, posterior, higher).
    Returns (squared radius field, bead centres (n, 3), in-plane radii (n,))."""
    shift = rng.uniform([-0.05, -0.04, -0.10], [0.05, 0.04, 0.10])
    scale = rng.uniform(0.85, 1.15)
    ctrl = np.array([[0.15, -0.05, -0.05], [-0.10, 0.03, 0.0], [-0.45, -0.12, 0.08]])
    ctrl = ctrl + rng.uniform(-0.04, 0.04, ctrl.shape) + shift
    t = np.linspace(0.0, 1.0, 12)[:, None]
    centres = (1 - t) ** 2 * ctrl[0] + 2 * (1 - t) * t * ctrl[1] + t**2 * ctrl[2]  # quadratic Bezier
    radii = scale * (0.14 - 0.04 * t[:, 0])
    heights = scale * (0.24 - 0.06 * t[:, 0])
    r2 = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), np.inf, dtype=np.float32)
    for c, r, h in zip(centres, radii, heights, strict=True):
        np.minimum(r2, _ellipsoid(x, y, z, c, (r, r, h)), out=r2)
    return r2, centres, radii


def make_phantom(site: SiteSpec, index: int) -> Volume:
    """Case `index` of `site`: image float32 (site.shape, HU after the site's scanner calibration and
    noise), label uint8 with the site's label values (0 background), affine diag(spacing) centred on 0.

    Tissues (HU before calibration): air -1000, subcutaneous and peripancreatic fat ~-100/-60, soft
    tissue ~40, liver ~60, kidneys ~30, vessels ~150/80, bone 400-700, pancreas ~100, tumour -10..20
    (hypodense, in ~80 % of cases when site.tumor, inside or on the edge of the pancreas). A class a
    site does not label is background; a tumour a site does not label stays pancreas where it overlaps it.
    """
    by_name = {name: value for value, name in site.labels.items()}
    unknown = set(by_name) - set(_CLASSES)
    if unknown:
        raise ValueError(f"site {site.name}: unknown label classes {sorted(unknown)}; known: {list(_CLASSES)}")
    rng = np.random.default_rng([site.seed, index])
    axes = [((np.arange(n) - (n - 1) / 2) * sp / (n * ref / 2)).astype(np.float32)
            for n, sp, ref in zip(site.shape, site.spacing, _REF_SPACING, strict=True)]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    hu = lambda mean, sd=5.0: float(rng.normal(mean, sd))  # noqa: E731 - per-case contrast timing varies

    body_scale = rng.uniform(0.92, 1.05)
    body = _ellipsoid(x, y, z, (0, 0, 0), (0.86 * body_scale, 0.64 * body_scale, np.inf)) < 1
    fat = rng.uniform(0.08, 0.14)
    inner = _ellipsoid(x, y, z, (0, 0, 0), (0.86 * body_scale * (1 - fat), 0.64 * body_scale * (1 - fat), np.inf)) < 1
    image = np.where(body, np.float32(hu(-100)), np.float32(-1000.0)).astype(np.float32)
    image[inner] = hu(40)

    j = lambda: rng.uniform(-0.04, 0.04, 3)  # noqa: E731 - per-organ position jitter
    masks = {}
    masks["liver"] = inner & (_ellipsoid(x, y, z, (0.48, 0.05, 0.30) + j(), (0.30, 0.36, 0.50)) < 1)
    masks["kidney"] = inner & (
        (_ellipsoid(x, y, z, (0.42, -0.32, -0.20) + j(), (0.12, 0.14, 0.30)) < 1)
        | (_ellipsoid(x, y, z, (-0.42, -0.32, -0.10) + j(), (0.12, 0.14, 0.30)) < 1)
    )
    image[masks["liver"]] = hu(60)
    image[masks["kidney"]] = hu(30)
    aorta = inner & (_ellipsoid(x, y, z, (-0.08, -0.20, 0), (0.06, 0.06, np.inf)) < 1)
    ivc = inner & (_ellipsoid(x, y, z, (0.10, -0.20, 0), (0.06, 0.06, np.inf)) < 1)
    image[aorta], image[ivc] = hu(150, 10), hu(80)
    vertebra = _ellipsoid(x, y, z, (0, -0.36, 0), (0.12, 0.12, np.inf))
    bone = body & ((vertebra < 1) | (_ellipsoid(x, y, z, (0, -0.52, 0), (0.06, 0.05, np.inf)) < 1))
    image[bone] = hu(400, 20)
    image[bone & (vertebra > 0.7)] = hu(700, 30)  # cortical rim
    soft = inner & ~bone
    for organ in ("liver", "kidney"):  # labels follow what was drawn last
        masks[organ] &= soft & ~aorta & ~ivc

    r2, centres, radii = _pancreas(rng, x, y, z)
    image[soft & (r2 < 1.8) & ~masks["liver"] & ~masks["kidney"]] = hu(-60)  # peripancreatic fat
    masks["pancreas"] = soft & (r2 < 1)
    image[masks["pancreas"]] = hu(100, 8)
    masks["tumor"] = np.zeros(site.shape, dtype=bool)
    if site.tumor and rng.random() < 0.8:
        k = int(rng.integers(2, len(centres) - 1))
        direction = rng.normal(size=3)
        centre = centres[k] + direction / np.linalg.norm(direction) * radii[k] * rng.uniform(0, 0.6)
        rt = rng.uniform(0.09, 0.15)
        masks["tumor"] = soft & (_ellipsoid(x, y, z, centre, (rt, rt, 1.3 * rt)) < 1)
        image[masks["tumor"]] = rng.uniform(-10, 20)

    image = _blur(image) * site.hu_scale + site.hu_offset
    image += rng.standard_normal(site.shape, dtype=np.float32) * np.float32(site.noise_sd)
    image = np.clip(image, *_HU_RANGE).astype(np.float32)

    label = np.zeros(site.shape, dtype=np.uint8)
    for name in _CLASSES:
        if name in by_name:
            label[masks[name]] = by_name[name]

    affine = np.diag([*map(float, site.spacing), 1.0])
    affine[:3, 3] = -(np.array(site.shape) - 1) / 2 * np.array(site.spacing)
    return Volume(image=image, affine=affine, label=label)


def _uid(site: SiteSpec, index: int, what: str) -> str:
    """A DICOM UID that is the same for the same site, case and `what` ("study", "series") on every run."""
    return generate_uid(entropy_srcs=[site.name, str(site.seed), str(index), what])


def write_site(site: SiteSpec, out_dir: str | Path, fmt: str = "nifti") -> Path:
    """Write all cases of `site` under out_dir: images/<case>.nii.gz (fmt "nifti") or images/<case>/
    DICOM series with fake PHI (fmt "dicom"), plus labels/<case>.nii.gz; case ids "<site>-000", ...
    Returns out_dir, ready for scan_folder(out_dir / "images", out_dir / "labels")."""
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got {fmt!r}")
    out_dir = Path(out_dir)
    for index in range(site.n_volumes):
        case = f"{site.name}-{index:03d}"
        volume = make_phantom(site, index)
        if fmt == "nifti":
            write_nifti(out_dir / "images" / f"{case}.nii.gz", volume.image, volume.affine)
        else:
            phi = np.random.default_rng([site.seed, index, 1])
            write_dicom_series(
                out_dir / "images" / case, volume.image, volume.affine,
                patient_name=f"PHANTOM^{site.name.upper()}^{index:03d}",
                patient_id=f"PH-{site.name.upper()}-{index:04d}",
                series_description=f"{site.name} phantom CT",
                study_instance_uid=_uid(site, index, "study"), series_instance_uid=_uid(site, index, "series"),
                institution_name=f"{site.name.title()} Phantom Hospital",
                accession_number=f"ACC{site.seed % 1000:03d}{index:05d}",
                birth_date=f"{phi.integers(1940, 1990)}{phi.integers(1, 13):02d}{phi.integers(1, 29):02d}",
                study_date=f"2025{phi.integers(1, 13):02d}{phi.integers(1, 29):02d}",
            )
        write_nifti(out_dir / "labels" / f"{case}.nii.gz", volume.label, volume.affine)
    return out_dir
