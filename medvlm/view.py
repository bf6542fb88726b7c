"""Slice images as a radiology viewer shows them: radiological convention, spacing-correct aspect ratio.

Axial: the patient's right on the image's left, anterior at the top. Coronal: superior at the top, the
patient's right on the left. Sagittal: superior at the top, anterior on the left. A slice index counts
along the canonical axis of `Volume.data`: axial from inferior, coronal from posterior, sagittal from the
patient's left. The view "mip" is the rotating maximum intensity projection (projection.py): its "slices"
are its frames, frame 0 seen from the front.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserInputError
from .limits import MAX_SIDE
from .preprocess import (
    AUTO_WINDOW,
    CT_WINDOWS,
    INVERTED_WINDOW,
    apply_window,
    default_window,
    known_window,
    robust_range,
    to_uint8,
    unknown_window,
    window_names,
    window_range,
)
from .projection import MIP_FRAMES, mip_angle, mip_image, mip_point, mip_seen_from, mip_voxel
from .volume import Volume

__all__ = [
    "MIP",
    "PLANES",
    "SLICE_ONE",
    "VIEWS",
    "acquired_plane",
    "mip_spot",
    "opening_slice",
    "opening_window",
    "plane_point",
    "png_path",
    "render_slice",
    "save_png",
    "slice_count",
    "slice_location",
    "slice_width_mm",
    "spot_position",
    "window_limits",
]

PLANES = ("axial", "coronal", "sagittal")
MIP = "mip"  # the rotating maximum intensity projection, shown as a plane whose slices are its frames
VIEWS = (*PLANES, MIP)
SLICE_ONE = {"axial": "inferior", "coronal": "posterior", "sagittal": "the patient's left"}  # each plane's index 0
_PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # the axis of data (Z, Y, X) each plane steps along
BACKGROUND_SHARE = 0.05  # of the "auto" range, above its lowest value: what a click on the MIP finds stands above it
_AUTO_RANGES: dict[int, tuple[float, float]] = {}  # id(volume) → its "auto" range, dropped when the volume is freed


def _check_plane(plane: str) -> int | None:
    """The axis of data a plane steps along; None for the MIP."""
    if plane not in VIEWS:
        raise UserInputError(f"unknown plane {plane!r}; choose one of {', '.join(VIEWS)}")
    return _PLANE_AXIS.get(plane)


def acquired_plane(volume: Volume) -> str:
    """The plane the scan's images were acquired in: the body axis nearest the one its stored slices step along
    (a DICOM series' slice normal, a NIfTI file's third axis), "axial" where that is superior–inferior."""
    return {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal"}.get(volume.orientation[-1:], "axial")


def slice_count(volume: Volume, plane: str) -> int:
    """How many slices the volume has in a plane (axial: Z, coronal: Y, sagittal: X), or frames the MIP."""
    axis = _check_plane(plane)
    return MIP_FRAMES if axis is None else volume.data.shape[axis]


def slice_width_mm(volume: Volume, plane: str, index: int) -> float:
    """How wide in the patient (mm) a slice of `plane`, or the MIP's frame `index`, is from its image's left edge to
    its right: with `render_slice`'s width in pixels, the size of one pixel (a viewer's ruler reads it)."""
    if _check_plane(plane) is None:
        image, _, column_mm = mip_image(volume, index)
        return image.shape[1] * column_mm
    _, rows, columns = volume.shape
    _, row_mm, column_mm = volume.spacing
    return rows * row_mm if plane == "sagittal" else columns * column_mm


def opening_slice(volume: Volume, plane: str) -> int:
    """The slice (from 0) a plane opens at: its middle one; the MIP's frame seen from the front. One of the plane
    the series was acquired in that a DICOM series' gap leaves empty (`meta["empty_slices"]`) gives way to the
    nearest that holds an image: a scan should not open on a black square."""
    if plane == MIP:
        return 0
    middle = slice_count(volume, plane) // 2
    if plane != acquired_plane(volume) or not volume.meta.get("empty_slices"):
        return middle
    axis, data = _PLANE_AXIS[plane], volume.data
    lowest = data.min()  # what an empty slice holds throughout (`dicom._fill_padding`)
    nearest = sorted(range(data.shape[axis]), key=lambda index: (abs(index - middle), index))
    return next((index for index in nearest if np.take(data, index, axis).max() > lowest), middle)


def mip_spot(volume: Volume, frame: int, down: float, across: float) -> tuple[int, int, int] | None:
    """The voxel (z, y, x) a click on the MIP of `frame` points at (`projection.mip_voxel`: from the pixel clicked, up
    to a brighter one within reach, the brightest along its line of sight); None where nothing there stands above the
    scan's background (air beside the body: the lowest BACKGROUND_SHARE of its "auto" range), or beside the field of
    view."""
    voxel = mip_voxel(volume, frame, down, across)
    low, high = window_limits(volume, AUTO_WINDOW)
    if voxel is None or not volume.data[voxel] > low + BACKGROUND_SHARE * (high - low):
        return None
    return voxel


def spot_position(volume: Volume, plane: str, index: int, voxel: tuple[int, int, int]) -> tuple[float, float] | None:
    """Where voxel (z, y, x) lies on `render_slice`'s image of slice `index` of `plane`, as (down, across)
    fractions of its height and width from its top left corner; None where that slice does not hold it. Every
    MIP frame shows it (`projection.mip_point`)."""
    axis = _check_plane(plane)
    if axis is None:
        return mip_point(volume, index, voxel)
    if voxel[axis] != index:
        return None
    slices, rows, columns = volume.shape
    z, y, x = voxel
    # As _display_slice lays them out: superior, anterior at the top; the patient's right, anterior on the left.
    down, across = {"axial": ((rows - 1 - y, rows), (columns - 1 - x, columns)),
                    "coronal": ((slices - 1 - z, slices), (columns - 1 - x, columns)),
                    "sagittal": ((slices - 1 - z, slices), (rows - 1 - y, rows))}[plane]
    return (down[0] + 0.5) / down[1], (across[0] + 0.5) / across[1]


def plane_point(volume: Volume, plane: str, index: int, down: float, across: float) -> tuple[int, int, int]:
    """The voxel (z, y, x) at (`down`, `across`) fractions of the height and width of `render_slice`'s image of slice
    `index` of `plane`, from its top left corner (a click on it): `spot_position` the other way."""
    _check_plane(plane)
    slices, rows, columns = volume.shape

    def cell(fraction: float, count: int) -> int:  # from the image's top or left edge
        return min(count - 1, max(0, int(fraction * count)))

    if plane == "axial":
        return index, rows - 1 - cell(down, rows), columns - 1 - cell(across, columns)
    if plane == "coronal":
        return slices - 1 - cell(down, slices), index, columns - 1 - cell(across, columns)
    return slices - 1 - cell(down, slices), rows - 1 - cell(across, rows), index


def opening_window(volume: Volume, plane: str) -> str:
    """The window a view opens in: a CT's preset nearest the window its header suggests (`scanner_window`: a head
    CT's brain window), else the modality's default; the MIP in inverted grey (uptake dark on white, as nuclear
    medicine reads a MIP) where the modality offers it."""
    if plane == MIP and INVERTED_WINDOW in window_names(volume.modality, volume.units):
        return INVERTED_WINDOW
    return scanner_window(volume) or default_window(volume.modality)


def scanner_window(volume: Volume) -> str | None:
    """The CT preset nearest the window the scan's header suggests (DICOM (0028,1050/1051) WindowCenter and
    WindowWidth, the first of several: a head CT's W 80 / L 40 is the brain window, its W 1500 the bone's), or None
    where there is none, the scan is not read as CT in HU, or no preset lies near it (width within half again or
    a third less, level within a quarter of the width)."""
    width, level = volume.meta.get("window_width"), volume.meta.get("window_center")
    if volume.modality != "CT" or volume.units != "HU" or not width or level is None or width <= 0:
        return None
    near = [(abs(math.log(preset_width / width)) + abs(preset_level - level) / width, name)
            for name, (preset_level, preset_width) in CT_WINDOWS.items()
            if 2 / 3 <= preset_width / width <= 1.5 and abs(preset_level - level) <= width / 4]
    return min(near)[1] if near else None


def slice_location(volume: Volume, plane: str, index: int) -> str:
    """Where slice `index` of a plane lies in the patient, as viewers give it: its centre's distance along the
    plane's body axis from the scanner's origin, with the side it lies toward ("S 12.5 mm", "R 3.0 mm"), and
    the slices' spacing in that plane. Empty for a volume whose spacing is unknown (an M3D .npy) or whose
    orientation is (a NIfTI that states none). For an oblique scan, the position along the body axis nearest to
    the plane's. For a MIP frame: how far it has turned, and from where it looks ("30°, seen from …")."""
    axis = _check_plane(plane)
    if axis is None:  # where it looks from only where the scan says which way the patient lies
        seen_from = "" if volume.meta.get("orientation_unknown") else f", seen from {mip_seen_from(index)}"
        return f"{mip_angle(index)}°{seen_from}"
    if not volume.spacing_known or volume.meta.get("orientation_unknown"):  # no scanner position to give
        return ""
    centre = (np.array(volume.shape, dtype=float) - 1) / 2
    centre[axis] = index
    ras = volume.affine[:3, :3] @ centre + volume.affine[:3, 3]  # (x → right, y → anterior, z → superior) mm
    position = float(ras[2 - axis])  # axial: z, coronal: y, sagittal: x
    side = ("IS", "PA", "LR")[axis][position >= 0]
    return f"{side} {abs(position):.1f} mm, {volume.spacing[axis]:.2f} mm apart"


def window_limits(volume: Volume, window: str) -> tuple[float, float]:
    """The values a window shows from black to white (`preprocess.window_range`), the whole-volume "auto"
    percentiles computed once per volume (the "inverted" window reads them too), so that scrolling stays fast
    (volumes are not modified after loading)."""
    if window not in (AUTO_WINDOW, INVERTED_WINDOW):
        return window_range(volume, window)
    key = id(volume)
    if key not in _AUTO_RANGES:
        _AUTO_RANGES[key] = robust_range(volume.data)
        weakref.finalize(volume, _AUTO_RANGES.pop, key, None)
    return window_range(volume, window, robust=_AUTO_RANGES[key])


def _display_slice(volume: Volume, plane: str, index: int) -> tuple[np.ndarray, float, float]:
    """One slice in display orientation (a view, not a copy) and its (row, column) pixel size in mm."""
    data, (dz, dy, dx) = volume.data, volume.spacing
    if plane == "axial":  # (Y, X): anterior (high y) at the top, the patient's right (high x) on the left
        return data[index, ::-1, ::-1], dy, dx
    if plane == "coronal":  # (Z, X): superior (high z) at the top, the patient's right on the left
        return data[::-1, index, ::-1], dz, dx
    return data[::-1, :, index][:, ::-1], dz, dy  # sagittal (Z, Y): superior at the top, anterior on the left


def _square_pixels(image: np.ndarray, row_mm: float, column_mm: float) -> np.ndarray:
    """Stretch the axis with the larger pixel size so one pixel is square in mm (at most MAX_SIDE a side)."""
    rows, columns = image.shape
    height, width = rows * row_mm, columns * column_mm
    scale = 1.0 / min(row_mm, column_mm)
    scale = min(scale, MAX_SIDE / max(height, width)) if max(height, width) * scale > MAX_SIDE else scale
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (width, height)
    if size == (columns, rows):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def render_slice(volume: Volume, plane: str, index: int | None = None, window: str | None = None) -> np.ndarray:
    """One slice as a uint8 (H, W) grey image, radiological convention, square pixels in mm.

    plane: "axial", "coronal", "sagittal" or "mip"; index: slice along that plane's axis, or the MIP's frame
    (None: `opening_slice`);
    window: a preset of `preprocess.window_names(volume.modality, volume.units)`, or a width/level
    such as "350/50" (`preprocess.typed_window`; None: `opening_window`).
    Raises UserInputError for an unknown plane or window, or an index out of range.
    """
    count = slice_count(volume, plane)
    index = opening_slice(volume, plane) if index is None else index
    if not 0 <= index < count:
        what = "the MIP has frames" if plane == MIP else f"the {plane} plane has slices"
        raise UserInputError(f"slice index {index} is out of range; {what} 0 to {count - 1}")
    window = opening_window(volume, plane) if window is None else window
    units = volume.units
    if not known_window(window, volume.modality, units):
        raise UserInputError(unknown_window(window, volume.modality, units, window_limits(volume, AUTO_WINDOW)))
    lo, hi = window_limits(volume, window)
    image, row_mm, column_mm = mip_image(volume, index) if plane == MIP else _display_slice(volume, plane, index)
    return _square_pixels(to_uint8(apply_window(image, lo, hi)), row_mm, column_mm)


def png_path(path: str | Path) -> Path:
    """`path` as a Path when it names a .png file (checked before a scan is loaded to be written there)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserInputError(f"cannot write {path.name}: slices are written as PNG; give a name ending in .png")
    return path


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W) grey image as PNG; a path that cannot be written (a missing folder, a folder's
    own name, no permission) or does not end in .png is a user error."""
    path = png_path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise UserInputError(f"cannot write {path}: {path.parent} is a file, not a folder; choose another --out")
    if not path.parent.is_dir():
        raise UserInputError(f"cannot write {path}: folder {path.parent} does not exist; create it or choose "
                             "another --out")
    try:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")
    except OSError as error:
        raise UserInputError(f"cannot write {path}: {error.strerror or error}; choose another --out") from None
    return path
