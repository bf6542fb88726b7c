"""`python -m medvlm phantom`: a folder of phantoms in the M3D layout (DESIGN section 7).

    OUT/<modality>/phantom_<index>.npy   M3D volume (1, Z, Y, X) in [0, 1] (when "npy" is a format)
    OUT/<modality>/phantom_<index>.nii.gz / phantom_<index>_dicom/   (when asked)
    OUT/<modality>/phantom_<index>.txt   findings report
    OUT/M3D_Cap.json, OUT/M3D_VQA_{train,val,test}.csv, OUT/ground_truth.json

The first format names the image in the JSON, the CSVs and the ground truth, whose lesion
`center_voxel` is given on that file's canonical grid (for .npy: the resized M3D grid, whose real
spacing in mm is the entry's `spacing`, although `load_volume` takes .npy voxels as 1 mm).
M3D .npy intensities: CT is the mean of the lung (W1500/L-600) and soft-tissue (W400/L40) windows
so that both ground-glass nodules and hypodense liver lesions stay visible; MR and PET use the
robust 0.5–99.5 percentile range; then min-max scaled to [0, 1]; no foreground crop.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .data import GROUND_TRUTH_FILE, VQA_FILES
from .errors import UserInputError
from .phantom_text import VQA_COLUMNS

if TYPE_CHECKING:  # phantom.py re-exports write_phantom_set, so it is imported lazily here
    from .phantom import Phantom

SPLITS = ("train", "validation", "test")
FORMATS = ("npy", "nifti", "dicom")
M3D_SHAPE = (32, 256, 256)
LUNG_WINDOW, SOFT_TISSUE_WINDOW = (-1350.0, 150.0), (-160.0, 240.0)  # (low, high) HU
DICOM_RESCALE = {"CT": (1.0, -1024.0), "MR": (1.0, 0.0), "PT": (0.001, 0.0)}  # (slope, intercept)


def m3d_intensities(phantom: Phantom) -> np.ndarray:
    """The phantom's data windowed and min-max scaled to [0, 1], same shape (Z, Y, X)."""
    data = phantom.data
    if phantom.modality == "CT":
        unit = sum(np.clip((data - low) / (high - low), 0, 1) for low, high in (LUNG_WINDOW, SOFT_TISSUE_WINDOW)) / 2
    else:
        low, high = np.percentile(data[::2, ::2, ::2], [0.5, 99.5])
        unit = np.clip((data - low) / max(high - low, 1e-6), 0, 1)
    low, high = float(unit.min()), float(unit.max())
    return ((unit - low) / max(high - low, 1e-6)).astype(np.float32)


def to_m3d(phantom: Phantom, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """M3D volume (Z', Y', X') in [0, 1] resized to `shape`, and the per-axis zoom factors new/old."""
    factors = np.asarray(shape, dtype=float) / np.asarray(phantom.data.shape)
    resized = ndimage.zoom(m3d_intensities(phantom), factors, order=1, grid_mode=True, mode="nearest")
    return np.clip(resized, 0, 1).astype(np.float32), factors


def _lesion_truth(phantom: Phantom, factors: np.ndarray | None) -> list[dict]:
    """Ground-truth lesion dicts; with zoom `factors`, `center_voxel` moves to the resized grid.

    `radius_voxels` (z, y, x): the sphere's semi-axes in voxels of that grid (anisotropic after resizing).
    """
    factors = np.ones(3) if factors is None else factors
    grid_spacing = np.asarray(phantom.spacing) / factors
    lesions = []
    for lesion in phantom.lesion_dicts():
        lesion["source_center_voxel"] = lesion["center_voxel"]
        lesion["center_voxel"] = [float(c) for c in (np.asarray(lesion["center_voxel"]) + 0.5) * factors - 0.5]
        lesion["radius_voxels"] = [float(r) for r in lesion["diameter_mm"] / 2 / grid_spacing]
        lesions.append(lesion)
    return lesions


def _write_volume(phantom: Phantom, stem: Path, fmt: str, npy_shape: tuple[int, int, int]) -> tuple[str, dict]:
    """Write one format; return its file suffix and the ground-truth grid facts for that file."""
    from .writers import save_dicom_series, save_nifti, save_npy

    if fmt == "npy":
        volume, factors = to_m3d(phantom, npy_shape)
        save_npy(stem.with_suffix(".npy"), volume)
        spacing = [float(s / f) for s, f in zip(phantom.spacing, factors, strict=True)]
        return ".npy", {"shape": list(volume.shape), "spacing": spacing, "lesions": _lesion_truth(phantom, factors)}
    if fmt == "nifti":
        save_nifti(stem.with_name(stem.name + ".nii.gz"), phantom.data, phantom.spacing, phantom.orientation,
                   modality=phantom.modality)
        suffix = ".nii.gz"
    elif fmt == "dicom":
        slope, intercept = DICOM_RESCALE[phantom.modality]
        save_dicom_series(stem.with_name(stem.name + "_dicom"), phantom.data, phantom.spacing, phantom.modality,
                          series_description=f"phantom {phantom.phase}", slope=slope, intercept=intercept)
        suffix = "_dicom"
    else:
        raise UserInputError(f"unknown phantom format {fmt!r}; use one of {', '.join(FORMATS)}")
    return suffix, {"shape": list(phantom.data.shape), "spacing": list(phantom.spacing),
                    "lesions": _lesion_truth(phantom, None)}


def assign_splits(n: int, seed: int, split: str | None, fractions: tuple[float, float] = (0.8, 0.1)) -> list[str]:
    """Split name per volume index: all `split`, or shuffled train/validation/test by `fractions`."""
    if split is not None:
        if split not in SPLITS:
            raise UserInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return [split] * n
    order = np.random.default_rng([seed, 7919]).permutation(n)
    n_val = max(round(n * fractions[1]), 1 if n >= 3 else 0)  # from 3 volumes on, no split is empty
    n_train = min(round(n * fractions[0]), n - n_val - (1 if n >= 3 else 0))
    names = ["train"] * n_train + ["validation"] * n_val + ["test"] * (n - n_train - n_val)
    return [names[rank] for rank in np.argsort(order)]


MIN_MATRIX, MAX_MATRIX = 16, 1024  # in-plane pixels: below, organs vanish; above, no scanner's matrix


def write_phantom_set(out_dir: str | Path, n: int, seed: int, modalities: tuple[str, ...] = ("ct", "mr", "pt"),
                      formats: tuple[str, ...] = ("npy",), split: str | None = None, *,
                      npy_shape: tuple[int, int, int] = M3D_SHAPE, matrix: int | None = None,
                      lesion_size_mm: tuple[float, float] | None = None) -> dict:
    """Write `n` phantoms (modalities in turn) with reports, M3D-Cap JSON, M3D-VQA CSVs and ground truth.

    Volume i is `make_phantom([seed, i], modality, matrix=matrix, lesion_size_mm=lesion_size_mm)`.
    npy_shape: (Z, Y, X) of the M3D arrays, e.g. (32, 96, 96) for fast training; lesion_size_mm:
    (min, max) diameter of every lesion, e.g. (2, 8) for the small-lesion benchmark. Returns a
    summary: out, n, per-split counts, files. A bad count, modality, format or split raises UserInputError.
    """
    from .phantom import lesion_diameters, make_phantom

    if n < 1:
        raise UserInputError(f"cannot write {n} phantoms; ask for at least 1")
    if matrix is not None and not MIN_MATRIX <= matrix <= MAX_MATRIX:
        raise UserInputError(f"cannot write phantoms of {matrix}×{matrix} pixels; give a matrix from {MIN_MATRIX} to "
                             f"{MAX_MATRIX} (the demo's is 160)")
    bad = [f for f in formats if f not in FORMATS] + [m for m in modalities if m.lower() not in ("ct", "mr", "pt")]
    if bad or not formats or not modalities:
        raise UserInputError(f"cannot write phantoms with modalities {list(modalities)} and formats {list(formats)}; "
                             "use modalities from ct, mr, pt and formats from npy, nifti, dicom")
    for modality in dict.fromkeys(m.lower() for m in modalities):
        low, high = lesion_diameters(modality)
        if lesion_size_mm is not None and (lesion_size_mm[0] > high or lesion_size_mm[1] < low):
            raise UserInputError(f"no {modality.upper()} lesion can be {lesion_size_mm[0]:g}–{lesion_size_mm[1]:g} mm "
                                 f"across; {modality.upper()} phantom lesions are {low:g} to {high:g} mm")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out} is a file, not a folder; give a folder to write the phantoms into")
    # A data set's index there (these phantoms', or M3D's own) would be replaced, and its volumes left beside the
    # new ones. A folder without one (a write that was interrupted) is written again.
    index = [name for name in ("M3D_Cap.json", *VQA_FILES.values(), GROUND_TRUTH_FILE) if (out / name).exists()]
    if index:
        raise UserInputError(f"{out} already holds a data set ({index[0]}); give a new or empty folder, or delete "
                             "that one first")
    splits = assign_splits(n, seed, split)
    captions: dict[str, list] = {name: [] for name in SPLITS}
    vqa_rows: dict[str, list] = {name: [] for name in SPLITS}
    ground_truth = {}
    lesions = too_coarse = 0
    for index in range(n):
        modality = modalities[index % len(modalities)].lower()
        phantom = make_phantom([seed, index], modality, matrix=matrix, lesion_size_mm=lesion_size_mm)
        rel = f"{modality}/phantom_{index:05d}"
        (out / modality).mkdir(parents=True, exist_ok=True)
        written = [_write_volume(phantom, out / rel, fmt, npy_shape) for fmt in formats]
        image = rel + written[0][0]
        lesions += len(phantom.lesions)
        # A lesion needs 1.5 pixels across in-plane (phantom.py): a --lesion-size below that draws none.
        too_coarse += lesion_size_mm is not None and 1.5 * phantom.spacing[1] > lesion_size_mm[1]
        (out / f"{rel}.txt").write_text(phantom.report + "\n")
        captions[splits[index]].append({"image": image, "text": f"{rel}.txt"})
        vqa_rows[splits[index]] += phantom.vqa(image, np.random.default_rng([seed, index, 1]))
        ground_truth[image] = {"modality": phantom.modality, "phase": phantom.phase,
                               "orientation": phantom.orientation, "source_shape": list(phantom.data.shape),
                               "source_spacing": list(phantom.spacing), **written[0][1]}
    (out / "M3D_Cap.json").write_text(json.dumps(captions, indent=1))
    for name, rows in vqa_rows.items():
        with open(out / VQA_FILES[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=VQA_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    (out / GROUND_TRUTH_FILE).write_text(json.dumps(ground_truth, indent=1))
    return {"out": str(out), "n": n, "splits": {name: len(items) for name, items in captions.items()},
            "vqa_rows": sum(len(rows) for rows in vqa_rows.values()), "formats": list(formats), "lesions": lesions,
            "too_coarse": too_coarse}


EXAMPLES = (  # (file name, modality, format): the app's example scans
    ("ct_chest_abdomen.nii.gz", "ct", "nifti"),
    ("ct_series_dicom.zip", "ct", "dicom"),
    ("mr_brain.nii.gz", "mr", "nifti"),
    ("pet_body.nii.gz", "pt", "nifti"),
)


def _example_phantom(modality: str, start: int, matrix: int) -> tuple[int, Phantom]:
    """The first phantom from seed `start` on that shows a lesion of at least 12 mm (an example worth a look)."""
    from .phantom import make_phantom

    seed = start
    while True:
        phantom = make_phantom([seed], modality, matrix=matrix)
        if any(lesion.diameter_mm >= 12 for lesion in phantom.lesions):
            return seed, phantom
        seed += 1


def write_examples(out_dir: str | Path, matrix: int = 224) -> dict:
    """Write the app's example scans (small files) and `examples.json` with their reports and lesions."""
    import zipfile

    from .writers import save_dicom_series, save_nifti

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for number, (name, modality, fmt) in enumerate(EXAMPLES):
        seed, phantom = _example_phantom(modality, 9000 + 100 * number, matrix)
        if fmt == "nifti":
            save_nifti(out / name, phantom.data, phantom.spacing, phantom.orientation, modality=phantom.modality,
                       dtype=np.float32 if phantom.modality == "PT" else np.int16)
        else:
            slope, intercept = DICOM_RESCALE[phantom.modality]
            series = out / (name + ".tmp")
            files = save_dicom_series(series, phantom.data, phantom.spacing, phantom.modality,
                                      series_description=f"phantom {phantom.phase}", slope=slope, intercept=intercept,
                                      file_names="shuffled")
            with zipfile.ZipFile(out / name, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in files:
                    archive.write(path, f"series/{path.name}")
            for path in files:
                path.unlink()
            series.rmdir()
        truth[name] = {"seed": seed, "modality": phantom.modality, "phase": phantom.phase,
                       "shape": list(phantom.data.shape), "spacing": list(phantom.spacing),
                       "report": phantom.report, "lesions": phantom.lesion_dicts()}
    (out / "examples.json").write_text(json.dumps(truth, indent=1))
    return truth
