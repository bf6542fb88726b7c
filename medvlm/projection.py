"""The rotating maximum intensity projection (MIP), as nuclear medicine reads a PET: the brightest value along
each line of sight through the body, seen from all around it.

Frame 0 looks at the patient from the front (the patient's right on the image's left, as a coronal slice);
each next frame turns the point of view MIP_STEP_DEGREES about the body's long axis toward the patient's
left, so that frame 9 looks from the patient's left (anterior on the image's left, as a sagittal slice),
frame 18 from behind. The lines of sight run in mm, so the image keeps the body's proportions whatever the
voxel spacing; the superior end is at the top.
"""

from __future__ import annotations

import functools
import math
import weakref

import numpy as np

from .volume import Volume

__all__ = ["MIP_FRAMES", "MIP_STEP_DEGREES", "mip_angle", "mip_cache_bytes", "mip_edges", "mip_image", "mip_point",
           "mip_seen_from", "mip_slice", "mip_voxel"]

MIP_STEP_DEGREES = 10
MIP_FRAMES = 360 // MIP_STEP_DEGREES
_MAX_COLUMNS = 256  # a MIP is an overview: at most this many columns (a PET's own matrix is about 128-200)
SPOT_REACH = 0.02  # a click on the MIP climbs to a hot spot at most this share of its height and width away
_OBLIQUE = math.sin(math.radians(22.5))  # a direction's share past which its letter joins the edge's label
_FRAMES: dict[int, tuple[float, dict]] = {}  # id(volume) → (the scan's lowest value, {frame: projection})


def mip_angle(frame: int) -> int:
    """How far (degrees) the point of view of `frame` has turned from the front toward the patient's left."""
    return (frame % MIP_FRAMES) * MIP_STEP_DEGREES


def _directions(frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(toward the image's right, along the line of sight) as unit (x, y) vectors in the patient (x toward the
    patient's right, y toward anterior)."""
    theta = math.radians(mip_angle(frame))
    right = np.array([-math.cos(theta), -math.sin(theta)])  # from the front: toward the patient's left
    sight = np.array([math.sin(theta), -math.cos(theta)])  # from the front: anterior to posterior
    return right, sight


def _letters(direction: np.ndarray) -> str:
    """The orientation letters of an (x, y) direction in the patient: "R", "A", or "RA" for an oblique one, the
    larger share first."""
    x, y = direction
    parts = [(abs(x), "R" if x > 0 else "L"), (abs(y), "A" if y > 0 else "P")]
    return "".join(letter for share, letter in sorted(parts, reverse=True) if share > _OBLIQUE)


def mip_edges(frame: int) -> tuple[str, str, str, str]:
    """The letters at the image's edges (left, right, top, bottom) for `frame`: ("RA", "LP", "S", "I") at 30°."""
    right, _ = _directions(frame)
    return _letters(-right), _letters(right), "S", "I"


def mip_seen_from(frame: int) -> str:
    """Where the point of view of `frame` lies, in words: "the front", "the patient's left", "the front and the
    patient's left" (between them)."""
    _, sight = _directions(frame)
    names = {"A": "the front", "P": "behind", "R": "the patient's right", "L": "the patient's left"}
    return " and ".join(names[letter] for letter in _letters(-sight))


_CHUNK_VALUES = 8_000_000  # voxels gathered at once (32 MB of float32), so a big scan's frame needs little memory


def _column_grid(rows: int, columns: int, row_mm: float, column_mm: float) -> tuple[float, int]:
    """(the image columns' width in mm, how many there are) for an axial grid of (rows = Y, columns = X) voxels of
    that size: as wide as the grid's larger side, with at most _MAX_COLUMNS columns (`_image_columns`)."""
    height, width = rows * row_mm, columns * column_mm
    step = max(min(row_mm, column_mm), max(height, width) / _MAX_COLUMNS)
    return step, round(max(height, width) / step)


def _across(y, x, rows: int, columns: int, row_mm: float, column_mm: float, frame: int):
    """Where voxel centres (y, x) of such a grid fall across `frame`'s image, in columns from its left (a column's
    centre at a whole number)."""
    step, count = _column_grid(rows, columns, row_mm, column_mm)
    right, _ = _directions(frame)
    x_mm = (x - (columns - 1) / 2) * column_mm  # toward the patient's right (index from the left)
    y_mm = (y - (rows - 1) / 2) * row_mm  # toward anterior (index from posterior)
    return (y_mm * right[1] + x_mm * right[0]) / step + (count - 1) / 2


@functools.lru_cache(maxsize=MIP_FRAMES)  # one grid's frames: a PET's are small, a 512 × 512 grid's a few MB each
def _image_columns(rows: int, columns: int, row_mm: float, column_mm: float,
                   frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """For an axial grid of (rows = Y, columns = X) voxels of that size in mm, seen as `frame` sees it: the flat
    voxel indices grouped by the image column they fall in, where each column's group starts, which columns hold
    a voxel at all, and the columns' width in mm.

    A voxel falls in every column whose centre its footprint covers (its width seen from this side), and at least
    in the nearest one: every voxel counts, however small a hot spot and however the view turns, and no column
    inside the body is left empty where the voxels are wider one way than the other. The image is as wide as the
    grid's larger side (a scanner's field of view is round: its corners hold air, and a fixed width keeps the image
    still while it turns), with at most _MAX_COLUMNS columns.
    """
    step, count = _column_grid(rows, columns, row_mm, column_mm)
    right, _ = _directions(frame)
    across = _across(np.arange(rows)[:, None], np.arange(columns)[None, :], rows, columns, row_mm, column_mm,
                     frame).reshape(-1)
    # Half a footprint, in columns; a hair wider, so that footprints that tile the row meet on a column's centre
    # instead of both missing it by a rounding error.
    half = (abs(right[0]) * column_mm + abs(right[1]) * row_mm) / step / 2 + 1e-6
    nearest = np.floor(across + 0.5)
    first = np.minimum(np.ceil(across - half), nearest).astype(np.int64)
    last = np.maximum(np.ceil(across + half) - 1, nearest).astype(np.int64)
    voxels, column = [], []
    for k in range(int(np.max(last - first)) + 1):  # a footprint's columns, one at a time (one to three of them)
        covered = first + k <= last
        voxels.append(np.flatnonzero(covered))
        column.append(first[covered] + k)
    voxels, column = np.concatenate(voxels), np.concatenate(column)
    inside = (column >= 0) & (column < count)
    voxels, column = voxels[inside], column[inside]
    order = np.argsort(column, kind="stable")
    counts = np.bincount(column, minlength=count)
    crossed = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[crossed]
    return voxels[order].astype(np.int32), starts, crossed, step


def mip_image(volume: Volume, frame: int) -> tuple[np.ndarray, float, float]:
    """The MIP of `frame` as (image, row size mm, column size mm): a float (Z, columns) array, superior at the top,
    the values of the scan (a column no voxel falls in shows the scan's lowest value; NaN voxels are passed over).
    Each frame is projected once per volume (volumes are not modified after loading), so turning back and forth
    stays fast."""
    frame %= MIP_FRAMES
    if id(volume) not in _FRAMES:
        _FRAMES[id(volume)] = (np.nanmin(volume.data), {})
        weakref.finalize(volume, _FRAMES.pop, id(volume), None)
    lowest, frames = _FRAMES[id(volume)]
    if frame not in frames:
        slices, rows, columns = volume.data.shape
        dz, dy, dx = volume.spacing
        order, starts, crossed, step = _image_columns(rows, columns, float(dy), float(dx), frame)
        image = np.full((slices, crossed.size), lowest, dtype=volume.data.dtype)
        chunk = max(1, _CHUNK_VALUES // max(1, order.size))
        for first in range(0, slices, chunk):  # a few slices at a time: the gathered voxels stay small
            voxels = volume.data[first:first + chunk].reshape(-1, rows * columns)[:, order]
            image[first:first + chunk, crossed] = np.fmax.reduceat(voxels, starts, axis=1)
        frames[frame] = (image[::-1], float(dz), step)
    return frames[frame]


def mip_cache_bytes(volume: Volume) -> int:
    """The memory `mip_image` keeps for `volume` once all its frames are drawn: a server's memory budget counts it
    beside the voxels of a scan whose MIP it offers."""
    slices, rows, columns = volume.data.shape
    _, dy, dx = volume.spacing
    return MIP_FRAMES * slices * _column_grid(rows, columns, float(dy), float(dx))[1] * volume.data.itemsize


def mip_slice(volume: Volume, down: float) -> int:
    """The axial slice (from 0) a MIP's image shows `down` its height (a fraction from the top: the last slice)."""
    slices = volume.data.shape[0]
    return slices - 1 - min(slices - 1, max(0, math.floor(down * slices)))


def mip_voxel(volume: Volume, frame: int, down: float, across: float,
              reach: float = SPOT_REACH) -> tuple[int, int, int] | None:
    """The voxel (z, y, x) a reader points at with a click on the MIP of `frame` at `down` and `across` its image
    (fractions of its height and width from its top left corner). From the pixel clicked, the spot climbs to a
    brighter neighbouring pixel while there is one within `reach` of the click (a share of the image's height and
    width, at least one row and one column): a hand that misses a small hot spot by a few pixels still finds it,
    and one on a lesion stays on it beside a hotter organ. The voxel is the brightest along that pixel's line of
    sight, and of several as bright (a uniform hot region) the one nearest their middle. None where no voxel falls
    near that spot (beside the field of view), or all of them are NaN."""
    frame %= MIP_FRAMES
    slices, rows, columns = volume.data.shape
    image = mip_image(volume, frame)[0]  # superior at the top
    count = image.shape[1]
    start = (slices - 1 - mip_slice(volume, down), min(count - 1, max(0, math.floor(across * count))))  # from the top
    reach_rows, reach_columns = max(1, round(reach * slices)), max(1, round(reach * count))
    _, dy, dx = volume.spacing
    order, starts, crossed, _ = _image_columns(rows, columns, float(dy), float(dx), frame)
    level = np.where(np.isnan(image) | ~crossed[None, :], -np.inf, image)  # no voxel there: nothing to climb to
    row, column = start
    while True:
        top, left = max(row - 1, start[0] - reach_rows, 0), max(column - 1, start[1] - reach_columns, 0)
        around = level[top:min(row + 2, start[0] + reach_rows + 1), left:min(column + 2, start[1] + reach_columns + 1)]
        up, over = np.unravel_index(np.argmax(around), around.shape)
        if not around[up, over] > level[row, column]:
            break
        row, column = top + int(up), left + int(over)
    if not np.isfinite(level[row, column]):
        return None
    place = int(np.count_nonzero(crossed[:column]))  # the column's place among those a voxel falls in
    voxels = order[starts[place]:starts[place + 1] if place + 1 < starts.size else order.size]
    z = slices - 1 - row
    values = volume.data[z].reshape(-1)[voxels]
    tied = np.flatnonzero(values == np.nanmax(values))
    y, x = np.divmod(voxels[tied].astype(np.int64), columns)
    pick = np.argmin((y - y.mean()) ** 2 + (x - x.mean()) ** 2)
    return z, int(y[pick]), int(x[pick])


def mip_point(volume: Volume, frame: int, voxel: tuple[int, int, int]) -> tuple[float, float]:
    """Where voxel (z, y, x) lies on the MIP of `frame`, as (down, across) fractions of its image's height and width
    from its top left corner (`mip_voxel`'s spot): the same point seen from each side."""
    slices, rows, columns = volume.data.shape
    z, y, x = voxel
    _, dy, dx = volume.spacing
    _, count = _column_grid(rows, columns, float(dy), float(dx))
    across = _across(y, x, rows, columns, float(dy), float(dx), frame % MIP_FRAMES)
    return (slices - 1 - z + 0.5) / slices, float(across + 0.5) / count
