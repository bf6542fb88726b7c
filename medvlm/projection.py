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

__all__ = ["MIP_FRAMES", "MIP_STEP_DEGREES", "mip_angle", "mip_edges", "mip_image", "mip_seen_from"]

MIP_STEP_DEGREES = 10
MIP_FRAMES = 360 // MIP_STEP_DEGREES
_MAX_COLUMNS = 256  # a MIP is an overview: at most this many columns (a PET's own matrix is about 128-200)
_OBLIQUE = math.sin(math.radians(22.5))  # a direction's share past which its letter joins the edge's label
_FRAMES: dict[int, dict] = {}  # id(volume) → {frame: projection, "lowest": the scan's lowest value}


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


@functools.lru_cache(maxsize=4 * MIP_FRAMES)
def _lines_of_sight(rows: int, columns: int, row_mm: float, column_mm: float,
                    frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """For an axial grid of (rows = Y, columns = X) voxels of that size in mm: the flat voxel indices the lines of
    sight of `frame` pass through (nearest voxel, one sample per step), grouped by image column; where each column
    starts among them; which columns cross the grid at all; and the columns' width in mm.

    The image is as wide as the grid's larger side (a scanner's field of view is round: its corners hold air,
    and a fixed width keeps the image still while it turns); the lines run across the whole grid.
    """
    height, width = rows * row_mm, columns * column_mm
    step = max(min(row_mm, column_mm), max(height, width) / _MAX_COLUMNS)
    across = np.arange(round(max(height, width) / step)) * step
    along = np.arange(math.ceil(math.hypot(height, width) / step)) * step
    across, along = across - across.mean(), along - along.mean()
    right, sight = _directions(frame)
    x = across[:, None] * right[0] + along[None, :] * sight[0]  # mm from the grid's centre, (column, sample)
    y = across[:, None] * right[1] + along[None, :] * sight[1]
    column = np.floor((columns - 1) / 2 + x / column_mm + 0.5).astype(np.int64)  # from the patient's left
    row = np.floor((rows - 1) / 2 + y / row_mm + 0.5).astype(np.int64)  # from posterior
    inside = (column >= 0) & (column < columns) & (row >= 0) & (row < rows)
    counts = inside.sum(axis=1)
    flat = (row * columns + column)[inside]  # row-major: each image column's samples together, in order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    crossed = counts > 0
    return flat, starts[crossed], crossed, step


def mip_image(volume: Volume, frame: int) -> tuple[np.ndarray, float, float]:
    """The MIP of `frame` as (image, row size mm, column size mm): a float (Z, columns) array, superior at the top,
    the values of the scan (a line of sight that misses the grid shows the scan's lowest value). Each frame is
    projected once per volume (volumes are not modified after loading), so turning back and forth stays fast."""
    frame %= MIP_FRAMES
    frames = _FRAMES.get(id(volume))
    if frames is None:
        frames = _FRAMES[id(volume)] = {"lowest": volume.data.min()}
        weakref.finalize(volume, _FRAMES.pop, id(volume), None)
    if frame not in frames:
        slices, rows, columns = volume.data.shape
        dz, dy, dx = volume.spacing
        flat, starts, crossed, step = _lines_of_sight(rows, columns, float(dy), float(dx), frame)
        samples = volume.data.reshape(slices, rows * columns)[:, flat]  # (Z, every sample of every line)
        image = np.full((slices, crossed.size), frames["lowest"], dtype=volume.data.dtype)
        image[:, crossed] = np.maximum.reduceat(samples, starts, axis=1)
        frames[frame] = (image[::-1], float(dz), step)
    return frames[frame]
