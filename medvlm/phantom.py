"""Synthetic phantoms whose content is known exactly (DESIGN section 5): CT torso, MR brain, PET body.

Every phantom is built on the canonical grid `data[z, y, x]` (RAS+: x toward the patient's Right,
y toward Anterior, z toward Superior), spacing (z, y, x) in mm. Anatomy is drawn as a label map of
ellipsoids in millimetres (so a smaller `matrix` gives the same anatomy at coarser spacing), mapped
to intensities (CT: Hounsfield units; PET: SUV), then lesions are painted as spheres and noise is
added. The MR brain is the MNI152 2009a T1 template (assets/mni152) resampled to the drawn spacing.

Lesion geometry (`Lesion`): `center_voxel` (z, y, x) indices in `data`; `center_mm` (z, y, x) mm from
the centre of voxel (0, 0, 0), i.e. `center_voxel * spacing`; `value` the painted intensity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .phantom_text import (
    KINDS,
    LEVELS,
    ORGANS,
    SIDES,
    Finding,
    findings_from_ground_truth,
    parse_findings,
    vqa_items,
    write_report,
)

__all__ = ["KINDS", "LEVELS", "ORGANS", "SIDES", "Finding", "Lesion", "Phantom", "findings_from_ground_truth",
           "make_phantom", "parse_findings", "write_phantom_set"]

MNI_DIR = Path(__file__).resolve().parent.parent / "assets" / "mni152"
ORIENTATIONS = ("LPS", "RAS", "LAS")  # how a phantom is stored on disk (writers reorient)

# CT label map: label -> (name, HU). Order of drawing matters (later overwrites earlier).
CT_TISSUES = {0: ("air", -1000.0), 1: ("fat", -100.0), 2: ("muscle", 40.0), 3: ("lung", -850.0),
              4: ("heart", 40.0), 5: ("liver", 60.0), 6: ("spleen", 50.0), 7: ("kidney", 35.0),
              8: ("bone", 700.0), 9: ("aorta", 40.0), 10: ("axilla", 40.0)}
CT_PHASES = {  # contrast phase -> HU of enhancing tissues
    "non-contrast": {},
    "arterial": {"aorta": 300.0, "kidney": 150.0, "liver": 70.0, "spleen": 110.0, "heart": 250.0},
    "portal venous": {"aorta": 160.0, "kidney": 180.0, "liver": 110.0, "spleen": 120.0, "heart": 150.0},
}
PET_SUV = {"air": 0.0, "fat": 0.3, "muscle": 0.7, "lung": 0.4, "heart": 3.5, "liver": 2.2, "spleen": 1.8,
           "kidney": 4.0, "bone": 1.0, "aorta": 1.6, "axilla": 0.7, "brain": 8.0, "bladder": 12.0}
LESION_DIAMETER_MM = {  # kind -> (min, max) diameter
    "solid nodule": (4, 30), "ground-glass nodule": (6, 30), "calcified nodule": (2, 10), "cyst": (5, 40),
    "hypodense mass": (10, 40), "calcification": (2, 10), "hyperintense lesion": (4, 30),
    "hypointense lesion": (4, 30), "hypermetabolic focus": (8, 30)}
CT_LESION_VALUE = {"solid nodule": 30.0, "ground-glass nodule": -500.0, "calcified nodule": 650.0, "cyst": 5.0,
                   "hypodense mass": 20.0, "calcification": 650.0}
CT_LESION_CHOICES = (("lung", "solid nodule"), ("lung", "ground-glass nodule"), ("lung", "calcified nodule"),
                     ("liver", "cyst"), ("liver", "hypodense mass"), ("liver", "calcification"),
                     ("kidney", "cyst"), ("kidney", "calcification"))
SizeRange = tuple[float, float] | None  # (min, max) lesion diameter in mm asked for; None: each kind's own range
LESION_KINDS = {"ct": sorted({kind for _, kind in CT_LESION_CHOICES}),  # by modality
                "mr": ["hyperintense lesion", "hypointense lesion"], "pt": ["hypermetabolic focus"]}


def _diameter_range(kind: str, size_mm: SizeRange) -> tuple[float, float]:
    """(min, max) diameter in mm of a lesion kind, narrowed to `size_mm` when given (empty when min > max)."""
    low, high = LESION_DIAMETER_MM[kind]
    return (low, high) if size_mm is None else (max(low, size_mm[0]), min(high, size_mm[1]))


def _can_be_drawn(kind: str, size_mm: SizeRange) -> bool:
    low, high = _diameter_range(kind, size_mm)
    return low <= high


def lesion_diameters(modality: str) -> tuple[float, float]:
    """The smallest and largest diameter (mm) a lesion of the modality ("ct", "mr", "pt") can have."""
    ranges = [LESION_DIAMETER_MM[kind] for kind in LESION_KINDS[modality]]
    return min(low for low, _ in ranges), max(high for _, high in ranges)


@dataclass
class Lesion:
    """Ground truth of one lesion: a sphere of `diameter_mm` at `center_voxel` painted at `value`."""

    organ: str  # ORGANS
    kind: str  # KINDS
    side: str  # SIDES: the patient's right or left
    level: str  # LEVELS[organ]
    diameter_mm: float
    center_voxel: tuple[float, float, float]  # (z, y, x) indices in the phantom's data
    center_mm: tuple[float, float, float]  # (z, y, x) mm from voxel (0, 0, 0)
    value: float  # painted before noise, so its mean: HU (CT), template-scaled intensity (MR), SUV (PET)
    suv_max: float | None = None  # PET: its hottest voxel, noise and all (`_hottest`)


@dataclass
class Phantom:
    """One synthetic scan: canonical data (Z, Y, X) float32, spacing (z, y, x) mm, text and labels."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    modality: str  # "CT", "MR", "PT"
    phase: str  # CT contrast phase, MR sequence, or "PET"
    orientation: str  # stored orientation for NIfTI output
    lesions: list[Lesion]
    report: str
    labels: np.ndarray = field(repr=False)  # (Z, Y, X) uint8 organ labels (CT/PET) or brain mask (MR)
    label_names: dict[int, str] = field(default_factory=dict)
    noise_sd: float = 0.0  # Gaussian noise s.d.: HU (CT), scaled units (MR), fraction of the value (PET)

    def lesion_dicts(self) -> list[dict]:
        """The lesions as JSON-ready dicts (the ground-truth record)."""
        return [asdict(lesion) for lesion in self.lesions]

    def vqa(self, image_path: str, rng: np.random.Generator) -> list[dict]:
        """M3D-VQA rows for this phantom stored at `image_path`."""
        return vqa_items(image_path, self.report, self.modality, self.phase, self.lesion_dicts(), rng)


@dataclass
class Grid:
    """Voxel-centre coordinates in mm of a (Z, Y, X) grid; x, y centred on the body axis."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    z0: float  # mm of slice 0 in the anatomy frame

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        (nz, ny, nx), (sz, sy, sx) = self.shape, self.spacing
        return (self.z0 + np.arange(nz) * sz, (np.arange(ny) - (ny - 1) / 2) * sy, (np.arange(nx) - (nx - 1) / 2) * sx)

    def to_voxel(self, point_mm: tuple[float, float, float]) -> np.ndarray:
        (_nz, ny, nx), (sz, sy, sx) = self.shape, self.spacing
        z, y, x = point_mm
        return np.array([(z - self.z0) / sz, y / sy + (ny - 1) / 2, x / sx + (nx - 1) / 2])


def paint_ellipsoid(labels: np.ndarray, grid: Grid, center: tuple, radii: tuple, label: int,
                    inside: np.ndarray | None = None) -> None:
    """Set `label` on voxels of the ellipsoid (centre, radii: (z, y, x) mm), only within its bounding box.

    `inside` (labels allowed to be overwritten) confines it, e.g. liver only within soft tissue.
    """
    lo = np.floor(grid.to_voxel(tuple(c - r for c, r in zip(center, radii, strict=True)))).astype(int)
    hi = np.ceil(grid.to_voxel(tuple(c + r for c, r in zip(center, radii, strict=True)))).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, labels.shape)
    if np.any(hi <= lo):
        return
    zs, ys, xs = (axis[a:b] for axis, a, b in zip(grid.axes(), lo, hi, strict=True))
    inside_ellipsoid = (((zs[:, None, None] - center[0]) / radii[0]) ** 2
                        + ((ys[None, :, None] - center[1]) / radii[1]) ** 2
                        + ((xs[None, None, :] - center[2]) / radii[2]) ** 2) <= 1.0
    box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if inside is not None:
        inside_ellipsoid &= np.isin(box, inside)
    box[inside_ellipsoid] = label


def sphere_box(shape: tuple, spacing: tuple, center_voxel: np.ndarray, radius_mm: float):
    """(slices, mask) of the voxels whose centres lie within `radius_mm` of `center_voxel`."""
    spacing = np.asarray(spacing, dtype=float)
    lo = np.maximum(np.floor(center_voxel - radius_mm / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(center_voxel + radius_mm / spacing).astype(int) + 1, shape)
    axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, center_voxel, spacing, strict=True)]
    mask = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2 <= radius_mm**2
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), mask


def place_sphere(host: np.ndarray, spacing: tuple, diameter_mm: float, rng: np.random.Generator,
                 tries: int = 60) -> np.ndarray | None:
    """A random centre (z, y, x voxel) where a sphere of `diameter_mm` (+ half a voxel of margin) lies inside `host`."""
    radius_mm = diameter_mm / 2 + min(spacing) / 2
    reach = radius_mm / np.asarray(spacing)
    shape = np.asarray(host.shape)
    for _ in range(tries):
        points = rng.integers(0, shape, size=(4096, 3))  # rejection sampling: cheap even for small organs
        inside = points[host[tuple(points.T)]]
        if len(inside) == 0:
            continue
        center = inside[0].astype(float)
        if np.any(center - reach < 0) or np.any(center + reach > shape - 1):
            continue
        box, mask = sphere_box(host.shape, spacing, center, radius_mm)
        if host[box][mask].all():
            return center
    return None


def paint_lesion(data: np.ndarray, spacing: tuple, center: np.ndarray, diameter_mm: float, value: float) -> None:
    """Fill the lesion sphere with `value` (before noise, so the mean inside is `value`)."""
    box, mask = sphere_box(data.shape, spacing, center, diameter_mm / 2)
    data[box][mask] = value


def _acquisition(rng: np.random.Generator, matrix: int | None, fov_mm: float, inplane: tuple[float, float],
                 z_choices: tuple[float, ...], coverage_mm: float, max_slices: int) -> tuple[int, float, float, int]:
    """(matrix, in-plane spacing, slice spacing, slice count) for a field of view and a z coverage."""
    if matrix is None:
        spacing_xy = float(rng.uniform(*inplane))
        matrix = min(int(math.ceil(fov_mm / spacing_xy / 16) * 16), 512)
        spacing_xy = max(spacing_xy, fov_mm / matrix)
    else:
        spacing_xy = fov_mm / matrix
    spacing_z = float(rng.choice(z_choices))
    slices = int(np.clip(round(coverage_mm / spacing_z), 24, max_slices))
    if slices * spacing_z < 0.5 * coverage_mm and max_slices < 300:  # small volumes: thicker slices, same coverage
        spacing_z = coverage_mm / slices
    return matrix, spacing_xy, spacing_z, slices


def _torso_labels(grid: Grid, rng: np.random.Generator, with_head: bool = False) -> np.ndarray:
    """Label map of a torso (CT_TISSUES labels; 11 brain, 12 bladder when `with_head`), z = 0 at the diaphragm."""
    labels = np.zeros(grid.shape, dtype=np.uint8)
    half_width, half_depth = rng.uniform(150, 175), rng.uniform(100, 120)
    fat = rng.uniform(10, 25)
    _, ys, xs = grid.axes()
    body = (ys[:, None] / half_depth) ** 2 + (xs[None, :] / half_width) ** 2
    inner = (ys[:, None] / (half_depth - fat)) ** 2 + (xs[None, :] / (half_width - fat)) ** 2
    cross_section = np.where(inner <= 1, 2, np.where(body <= 1, 1, 0)).astype(np.uint8)
    zs = grid.axes()[0]
    torso = (zs > -420) & (zs < 260)
    labels[torso] = cross_section
    rib_depth, rib_width = half_depth - fat - 12, half_width - fat - 12
    rib_ring = (inner <= 1) & ((ys[:, None] / rib_depth) ** 2 + (xs[None, :] / rib_width) ** 2 > 1)
    lung_x, lung_top = half_width * 0.45, rng.uniform(190, 220)
    for side in (1, -1):  # right (x > 0) then left
        paint_ellipsoid(labels, grid, (lung_top / 2 - 10, -5, side * lung_x), (lung_top / 2 + 10, half_depth * 0.7,
                        half_width * 0.38), 3, inside=[2])
        paint_ellipsoid(labels, grid, (160, 0, side * (half_width - fat - 30)), (50, 40, 30), 10, inside=[2])
    labels[zs <= 0] = np.where(labels[zs <= 0] == 3, 2, labels[zs <= 0])  # diaphragm: no lung below z = 0
    paint_ellipsoid(labels, grid, (60, 30, -25), (55, 50, 60), 4, inside=[2, 3])
    paint_ellipsoid(labels, grid, (-70, 5, 0.25 * half_width), (75, 0.75 * half_depth, 0.7 * half_width), 5, inside=[2])
    paint_ellipsoid(labels, grid, (-60, -40, -0.6 * half_width), (50, 40, 30), 6, inside=[2])
    for side in (1, -1):
        paint_ellipsoid(labels, grid, (-130, -55, side * 0.42 * half_width), (55, 30, 28), 7, inside=[2, 5, 6])
    paint_ellipsoid(labels, grid, (-80, -25, -20), (400, 12, 12), 9, inside=[2, 4])
    spine = (ys[:, None] + half_depth * 0.62) ** 2 + xs[None, :] ** 2 <= 18**2
    for index, z in enumerate(zs):
        if torso[index]:
            bone = spine if (z % 32) < 27 else np.zeros_like(spine)  # vertebral bodies with discs between
            if 0 < z < 230 and (z % 25) < 9:  # ribs every 25 mm
                bone = bone | rib_ring
            labels[index][bone & (labels[index] != 10)] = 8  # the axillary soft tissue lies outside the ribs
    if with_head:
        paint_ellipsoid(labels, grid, (400, 10, 0), (90, 95, 75), 2)
        paint_ellipsoid(labels, grid, (405, 10, 0), (75, 80, 62), 11)
        paint_ellipsoid(labels, grid, (-380, 30, 0), (35, 35, 45), 12, inside=[2])
    return labels


def _lung_level(side: str, z: float, top: float) -> str:
    """Lobe by height in the lung (documented simplification of the fissures): thirds right, halves left."""
    fraction = z / top
    if side == "left":
        return "upper" if fraction > 0.5 else "lower"
    return "upper" if fraction > 0.6 else "middle" if fraction > 0.3 else "lower"


def _describe(organ: str, center_mm: tuple, organ_mask: np.ndarray, grid: Grid) -> tuple[str, str]:
    """(side, level) of a lesion centre (anatomy-frame z, y, x mm) in its organ."""
    z, _, x = center_mm
    side = "right" if x > 0 else "left"
    zs = grid.axes()[0][np.any(organ_mask, axis=(1, 2))]
    if organ == "lung":
        return side, _lung_level(side, z, zs.max())
    if organ in ("liver", "kidney"):
        return side, "upper" if z > (zs.min() + zs.max()) / 2 else "lower"
    return side, "axillary"


def _insert_body_lesions(values: np.ndarray, labels: np.ndarray, grid: Grid, choices: list[tuple[str, str]],
                         value_of, rng: np.random.Generator, size_mm: SizeRange = None) -> list[Lesion]:
    """Paint lesions (organ, kind) into `values` inside their organ; return the ground truth."""
    organ_labels = {"lung": 3, "liver": 5, "kidney": 7, "lymph node": 10}
    lesions = []
    for organ, kind in choices:
        low, high = _diameter_range(kind, size_mm)
        low = max(low, 1.5 * grid.spacing[1])  # at least 1.5 pixels across, or it cannot be seen in-plane
        if low > high:
            continue
        diameter = float(round(rng.uniform(low, high)))
        if size_mm is not None:  # rounding must not leave the asked range
            diameter = float(np.clip(diameter, *size_mm))
        organ_mask = labels == organ_labels[organ]
        center = place_sphere(organ_mask, grid.spacing, diameter, rng)
        if center is None:
            continue
        zs, ys, xs = grid.axes()
        anatomy_mm = (zs[int(center[0])], ys[int(center[1])], xs[int(center[2])])
        side, level = _describe(organ, anatomy_mm, organ_mask & (np.sign(anatomy_mm[2]) * grid.axes()[2] > 0), grid)
        value = value_of(kind, values[tuple(center.astype(int))])
        paint_lesion(values, grid.spacing, center, diameter, value)
        lesions.append(Lesion(organ, kind, side, level, diameter, tuple(float(c) for c in center),
                              tuple(float(c * s) for c, s in zip(center, grid.spacing, strict=True)), float(value),
                              float(value) if kind == "hypermetabolic focus" else None))
    return lesions


def make_ct(rng: np.random.Generator, matrix: int | None = None, lesion_size_mm: SizeRange = None) -> Phantom:
    """CT torso in HU: fat, muscle, lungs, heart, liver, spleen, kidneys, aorta, spine, ribs; 0–3 lesions."""
    small = matrix is not None
    matrix, spacing_xy, spacing_z, slices = _acquisition(
        rng, matrix, rng.uniform(360, 420), (0.6, 1.0),
        (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0), rng.uniform(120, 380), 64 if small else 300)
    coverage = slices * spacing_z
    lowest = max(-200.0, 40 - coverage)  # the scan always holds the lung bases and the liver dome
    z0 = rng.uniform(lowest, max(lowest, min(-40.0, 230 - coverage)))
    grid = Grid((slices, matrix, matrix), (spacing_z, spacing_xy, spacing_xy), z0)
    labels = _torso_labels(grid, rng)
    phase = str(rng.choice(list(CT_PHASES)))
    hu = {label: CT_PHASES[phase].get(name, value) for label, (name, value) in CT_TISSUES.items()}
    values = np.array([hu.get(i, 0.0) for i in range(256)], dtype=np.float32)[labels]
    count = int(rng.integers(0, 4))
    kinds = [choice for choice in CT_LESION_CHOICES if _can_be_drawn(choice[1], lesion_size_mm)]  # all, by default
    choices = [kinds[i] for i in rng.integers(len(kinds), size=count)]
    lesions = _insert_body_lesions(values, labels, grid, choices, lambda kind, _: CT_LESION_VALUE[kind], rng,
                                   lesion_size_mm)
    noise_sd = float(rng.uniform(5, 25))
    values += rng.standard_normal(values.shape, dtype=np.float32) * np.float32(noise_sd)
    report = write_report("CT", phase, [asdict(lesion) for lesion in lesions], rng)
    names = {label: name for label, (name, _) in CT_TISSUES.items()}
    return Phantom(values, grid.spacing, "CT", phase, str(rng.choice(ORIENTATIONS)), lesions, report, labels, names,
                   noise_sd)


def make_pet(rng: np.random.Generator, matrix: int | None = None, lesion_size_mm: SizeRange = None) -> Phantom:
    """PET body (head to pelvis) in SUV at ~4 mm: physiological uptake and 0–3 hot spots (lung, liver, node)."""
    small = matrix is not None
    matrix, spacing_xy, spacing_z, slices = _acquisition(
        rng, matrix, rng.uniform(500, 600), (3.6, 4.7), (3.0, 4.0), rng.uniform(820, 900), 64 if small else 300)
    grid = Grid((slices, matrix, matrix), (spacing_z, spacing_xy, spacing_xy), 480 - slices * spacing_z)
    labels = _torso_labels(grid, rng, with_head=True)
    names = {label: name for label, (name, _) in CT_TISSUES.items()} | {11: "brain", 12: "bladder"}
    suv = {label: PET_SUV[name] * rng.uniform(0.85, 1.15) for label, name in names.items()}
    values = np.array([suv.get(i, 0.0) for i in range(256)], dtype=np.float32)[labels]
    values = ndimage.gaussian_filter(values, sigma=3.0 / np.asarray(grid.spacing))  # scanner blur, ~7 mm FWHM
    count = int(rng.integers(0, 4))
    sites = ("lung", "liver", "lymph node")
    choices = [(sites[i], "hypermetabolic focus") for i in rng.integers(len(sites), size=count)]
    lesions = _insert_body_lesions(values, labels, grid, choices, lambda *_: round(float(rng.uniform(4, 15)), 1), rng,
                                   lesion_size_mm)
    noise_sd = float(rng.uniform(0.05, 0.15))  # relative: counting noise grows with activity
    values *= 1 + rng.standard_normal(values.shape, dtype=np.float32) * np.float32(noise_sd)
    np.maximum(values, 0, out=values)
    lesions = [replace(lesion, suv_max=_hottest(values, grid.spacing, lesion)) for lesion in lesions]
    report = write_report("PT", "PET", [asdict(lesion) for lesion in lesions], rng)
    return Phantom(values, grid.spacing, "PT", "PET", str(rng.choice(ORIENTATIONS)), lesions, report, labels, names,
                   noise_sd)


def _hottest(values: np.ndarray, spacing: tuple, lesion: Lesion) -> float:
    """A PET lesion's SUVmax as a reader measures it: its hottest voxel as imaged, noise and all, to 0.1 (the value
    painted into it is its mean, some 20–50 % lower)."""
    box, mask = sphere_box(values.shape, spacing, np.asarray(lesion.center_voxel), lesion.diameter_mm / 2)
    return round(float(values[box][mask].max()), 1)


def _mni_lobe(x: float, y: float, z: float) -> str:
    """Lobe of an MNI point (mm), a coarse documented map: occipital behind y = -70; temporal below
    z = -5 lateral to |x| = 28 and behind y = 25; frontal in front of y = -20; parietal otherwise."""
    if y < -70:
        return "occipital"
    if z < -5 and abs(x) > 28 and y < 25:
        return "temporal"
    return "frontal" if y > -20 else "parietal"


def _load_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 T1 and grey+white probability as (Z, Y, X) float32 arrays, and the MNI mm of voxel 0 (z, y, x)."""
    import nibabel as nib

    t1 = nib.load(MNI_DIR / "mni152_t1_2mm.nii.gz")
    brain = nib.load(MNI_DIR / "mni152_brain_2mm.nii.gz")
    origin = t1.affine[:3, 3][::-1].copy()
    return (np.asarray(t1.dataobj, dtype=np.float32).transpose(2, 1, 0),
            np.asarray(brain.dataobj, dtype=np.float32).transpose(2, 1, 0), origin)


MNI_SPACING_MM = 2.0


def make_mr(rng: np.random.Generator, matrix: int | None = None, lesion_size_mm: SizeRange = None) -> Phantom:
    """MR brain on the MNI152 T1 template (T1- or T2-like contrast), arbitrary scale; 0–3 lesions by lobe."""
    t1, brain_probability, origin = _load_mni()
    extent = (np.asarray(t1.shape) - 1) * MNI_SPACING_MM  # (z, y, x) mm
    small = matrix is not None
    matrix, spacing_xy, spacing_z, slices = _acquisition(
        rng, matrix, float(extent[1]) + 8, (0.9, 1.2), (1.0, 1.5, 3.0, 4.0, 5.0), float(extent[0]),
        64 if small else 300)
    spacing = (spacing_z, spacing_xy, spacing_xy)
    shape = (slices, matrix, matrix)
    centre_mm = origin + extent / 2
    first_mm = centre_mm - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)  # MNI mm of output voxel 0
    scale = np.asarray(spacing) / MNI_SPACING_MM
    offset = (first_mm - origin) / MNI_SPACING_MM

    def resample(volume: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(volume, scale, offset=offset, output_shape=shape, order=1, cval=0.0)

    image, brain = resample(t1), resample(brain_probability) > 200
    sequence = str(rng.choice(["T1-weighted", "T2-weighted"]))
    if sequence == "T2-weighted":  # crude T2 contrast: fluid bright, white matter dark, background stays dark
        image = np.where(image > 15, 270 - image, 0).astype(np.float32)
    bright, typical = np.percentile(image[brain], [99, 50])
    zs, ys, xs = (first_mm[a] + np.arange(shape[a]) * spacing[a] for a in range(3))
    cortex = (np.abs(xs)[None, None, :] >= 12) & ~((zs[:, None, None] < -25) & (ys[None, :, None] < -40)) \
        & ~((zs[:, None, None] < -10) & (np.abs(xs)[None, None, :] < 25))  # no cerebellum, brainstem, midline
    lesions = []
    for _ in range(int(rng.integers(0, 4))):
        kind = str(rng.choice(LESION_KINDS["mr"]))
        low, high = _diameter_range(kind, lesion_size_mm)
        diameter = float(round(rng.uniform(max(low, 1.5 * spacing_xy), max(high, 1.5 * spacing_xy))))
        if lesion_size_mm is not None:
            if 1.5 * spacing_xy > lesion_size_mm[1]:  # too coarse to show a lesion of the asked size
                continue
            diameter = float(np.clip(diameter, *lesion_size_mm))
        center = place_sphere(brain & cortex, spacing, diameter, rng)
        if center is None:
            continue
        z, y, x = (first_mm + center * np.asarray(spacing)).tolist()
        value = float(1.3 * bright if kind == "hyperintense lesion" else 0.25 * typical)
        paint_lesion(image, spacing, center, diameter, value)
        lesions.append(Lesion("brain", kind, "right" if x > 0 else "left", _mni_lobe(x, y, z), diameter,
                              tuple(float(c) for c in center), tuple(float(c) for c in center * np.asarray(spacing)),
                              value))
    intensity_scale = np.float32(rng.uniform(0.5, 10.0))
    noise_sd = float(rng.uniform(0.01, 0.04) * bright)
    image = image + rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_sd)
    image *= intensity_scale
    for lesion in lesions:
        lesion.value *= float(intensity_scale)
    report = write_report("MR", sequence, [asdict(lesion) for lesion in lesions], rng)
    return Phantom(image.astype(np.float32), spacing, "MR", sequence, str(rng.choice(ORIENTATIONS)), lesions, report,
                   brain.astype(np.uint8), {0: "background", 1: "brain"}, noise_sd * float(intensity_scale))


MAKERS = {"ct": make_ct, "mr": make_mr, "pt": make_pet}


def make_phantom(seed: int | list[int], modality: str = "ct", *, matrix: int | None = None,
                 lesion_size_mm: SizeRange = None) -> Phantom:
    """One phantom of `modality` ("ct", "mr", "pt"), deterministic for `seed`.

    `matrix` None: a realistic acquisition (CT 384–512 in-plane, up to 300 slices); an int: that
    in-plane size with the same anatomy in mm (coarser spacing) and at most 64 slices.
    `lesion_size_mm` (min, max): every lesion's diameter in that range (kinds that cannot be that
    size are not drawn; a lesion too small for the pixel spacing is left out), e.g. (2, 8) for the
    small-lesion benchmark; None: each kind's own range, as before.
    """
    key = modality.lower()
    if key not in MAKERS:
        raise ValueError(f"unknown phantom modality {modality!r}; use one of {', '.join(MAKERS)}")
    if lesion_size_mm is not None and not 0 < lesion_size_mm[0] <= lesion_size_mm[1]:
        raise ValueError(f"cannot draw lesions of {lesion_size_mm[0]}–{lesion_size_mm[1]} mm; give 0 < min ≤ max")
    return MAKERS[key](np.random.default_rng(seed), matrix, lesion_size_mm)


from .phantom_set import write_phantom_set  # noqa: E402  (re-exported: the CLI imports it from here)
