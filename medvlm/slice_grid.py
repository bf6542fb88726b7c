"""Where a series' slices lie along their normal, and the even grid they are drawn on.

Positions come from DICOM headers (`dicom.load_dicom`): a series may have lost a file, change its spacing part of the
way (3 mm at the skull base, 6 mm above), hold two blocks far apart, or state positions rounded to 0.1 mm or whole
mm. Every slice keeps its true place: the missing slots are drawn from their neighbours, a wide gap is shown empty,
and a spacing that changes is drawn on the finer one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

__all__ = ["SliceGrid", "largest_block", "slice_grid"]

GAP_TOLERANCE = 0.1  # slice gaps within this share of the step are even
POSITION_PRECISION_MM = 0.1  # ... and within this: some exporters round ImagePositionPatient to 0.1 mm
MAX_MISSING_IN_A_GAP = 2  # missing slices drawn from their neighbours in one gap; a wider gap is not filled
MAX_GRID_SLOTS = 4  # slots per image a series' grid may have (a spacing four times finer in part of it)


@dataclass(frozen=True)
class SliceGrid:
    """The even grid a stack of slices is drawn on: `step` mm along the normal from one slot to the next, each
    slice's place on it in steps from the first slice, and the gaps (by the index of the slice below) shown empty.

    kind: "even" (the slices lie on its slots; some may be missing), "resampled" (a spacing that changes: each slice
    drawn on the slot within a quarter step of it, the slots between drawn from their neighbours), or "stacked"
    (positions no grid fits without mostly empty or made-up slices: one slice a slot, at the median gap, said to be
    approximate).
    """

    step: float
    places: np.ndarray
    kind: str
    empty_gaps: frozenset[int] = frozenset()

    @property
    def size(self) -> int:
        """How many slices the volume has on this grid (slot 0 at the first slice, the last at the last one)."""
        return math.floor(self.places[-1] + self._snap) + 1

    @property
    def _snap(self) -> float:
        """How far from a slot (in steps) a slice is drawn as the slot's own: 0 on an even grid, whose places are
        whole; a quarter step on a resampled one, so that few slices are blends of two (a blend halves the contrast
        of a lesion seen in one slice)."""
        return 0.25 if self.kind == "resampled" else 0.0

    def empty_slots(self) -> int:
        """How many slots lie in `empty_gaps` (known before any pixel is read)."""
        return sum(math.ceil(self.places[gap + 1] - self._snap) - math.floor(self.places[gap] + self._snap) - 1
                   for gap in self.empty_gaps)

    def draw(self, pixels: np.ndarray) -> tuple[np.ndarray, list[int], int]:
        """(slices, rows, columns) at `places` → every slot of the grid: a slice on a slot as it is, a slot between
        two slices linearly interpolated from them by distance, a slot in one of `empty_gaps` NaN (empty:
        `dicom._fill_padding`), not made up across it. Returns (the grid's slices, the slots interpolated, how many
        are empty)."""
        if self.kind != "resampled" and self.size == len(pixels):  # on its slots already
            return pixels, [], 0
        drawn = np.empty((self.size, *pixels.shape[1:]), dtype=pixels.dtype)
        interpolated, empty = [], 0
        for slot in range(self.size):
            above = min(int(np.searchsorted(self.places, slot)), len(self.places) - 1)
            nearest = min((above - 1, above), key=lambda index: abs(self.places[index] - slot)) if above else 0
            if abs(self.places[nearest] - slot) <= self._snap:
                drawn[slot] = pixels[nearest]
                continue
            below = above - 1
            if below in self.empty_gaps:
                drawn[slot], empty = np.nan, empty + 1
                continue
            weight = np.float32((slot - self.places[below]) / (self.places[above] - self.places[below]))
            drawn[slot] = (1 - weight) * pixels[below] + weight * pixels[above]
            interpolated.append(slot)
        return drawn, interpolated, empty


def slice_grid(positions: np.ndarray, rounding: float = 0.0) -> SliceGrid:
    """The grid of a stack of slices at these ascending positions (mm) along its normal.

    Even: every gap within GAP_TOLERANCE of a whole number of steps, or within POSITION_PRECISION_MM (exporters
    that round positions to 0.1 mm), or, for positions an exporter rounded by up to `rounding` mm along the normal
    (`dicom._rounding`), every position within that of the grid, and within half a step (or its slot is in doubt); the
    step is the least-squares fit of the positions to their slots. Otherwise (a spacing that changes within the
    series, 3 mm at the skull base and 6 mm above it) the grid's step is the series' finer spacing (its 10th
    percentile gap, no finer than MAX_GRID_SLOTS slots an image allow, a little finer so that the last slice lies on
    a slot), and every slice lies within a quarter step of its slot: stacked at one step, the slices past the change
    would be tens of mm from where they were taken.

    A gap wider than 1 + MAX_MISSING_IN_A_GAP times the spacing around it (the gaps on either side: files lost, or
    two blocks of one series) is shown empty rather than made up across; a run of wide gaps is a spacing, not a
    loss. A grid that would be mostly empty (more empty slots than images: one image far from the rest, two blocks
    far apart) or larger than MAX_GRID_SLOTS slots an image is not drawn: the slices are stacked at the median gap,
    approximately.
    """
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    one_slot = float(np.mean(gaps[gaps < 1.75 * median]))  # the gaps of one slot: 2 and 3 for 2.5 mm rounded to mm
    # The grid of the one-slot gaps, as for exact positions; but rounded positions whose grid leaves more gaps of
    # several slots than a few lost files would (at 45°, 2 mm slices rounded to whole mm lie exactly on a 1.41 mm
    # grid with every other slot empty) take the grid of every image a slot where that one fits too.
    grid = None
    for guess in (one_slot, float(positions[-1] - positions[0]) / len(gaps)) if rounding else (one_slot,):
        slots, step = _fitted_slots(positions, guess, rounding)
        counted = np.diff(slots)
        if counted.min() < 1 or not (
                np.all(np.abs(gaps - counted * step) <= GAP_TOLERANCE * step + POSITION_PRECISION_MM)
                or (rounding > 0 and _off_grid(slots, positions) <= min(rounding + POSITION_PRECISION_MM, step / 2))):
            continue
        if grid is None or not np.any(counted > 1):
            grid = SliceGrid(step, slots, "even", wide_gaps(gaps))
        if np.count_nonzero(counted > 1) <= max(MAX_MISSING_IN_A_GAP, len(gaps) // 10):
            break
    if grid is None or grid.size > MAX_GRID_SLOTS * len(positions):  # (or two packages interleaved unevenly)
        extent = float(positions[-1] - positions[0])  # no finer than MAX_GRID_SLOTS slots an image allow
        finer = max(float(np.percentile(gaps, 10)), extent / (MAX_GRID_SLOTS * len(positions) - 1))
        step = extent / math.ceil(extent / finer - 1e-6)
        grid = SliceGrid(step, (positions - positions[0]) / step, "resampled", wide_gaps(gaps))
    if grid.size > MAX_GRID_SLOTS * len(positions) or grid.empty_slots() > len(positions):
        return SliceGrid(median, np.arange(len(positions), dtype=float), "stacked")
    return grid


def _fitted_slots(positions: np.ndarray, step: float, rounding: float) -> tuple[np.ndarray, float]:
    """Each of these ascending positions' slot on a grid about `step` mm apart, from 0, and the grid's step (mm)."""
    slots = _slots_by_gap(positions, step)
    step = float(np.polyfit(slots, positions, 1)[0])
    if not rounding:
        slots = _slots_by_gap(positions, step)
        return slots, float(np.polyfit(slots, positions, 1)[0])
    for _ in range(3):  # by position: a gap between two rounded positions is off by up to twice their rounding
        step, start = (float(value) for value in np.polyfit(slots, positions, 1))
        slots = np.rint((positions - start) / step)
        slots -= slots[0]
    return slots, float(np.polyfit(slots, positions, 1)[0])


def _slots_by_gap(positions: np.ndarray, step: float) -> np.ndarray:
    """Each position's slot from 0, each gap counted in whole steps (at least one)."""
    return np.concatenate([[0.0], np.cumsum(np.maximum(np.rint(np.diff(positions) / step), 1.0))])


def _off_grid(slots: np.ndarray, positions: np.ndarray) -> float:
    """How far (mm) positions lie from an even grid with these slots at most: the least, over every line, of the
    largest distance of a position from the line at its slot. Rounded positions lie within their rounding of such
    a line; a least-squares line can lie further from some (the rounding errors of a near-axial stack drift slowly
    along it, then jump by a millimetre)."""

    def width(step: float) -> float:  # of the narrowest band of this slope that holds every position (mm)
        residuals = positions - step * slots
        return float(residuals.max() - residuals.min())

    # The width is convex in the slope, and at least |slope - best| × span - the best width, so the best slope lies
    # within twice the least-squares line's width over the span of it: a golden-section search finds it.
    fitted = float(np.polyfit(slots, positions, 1)[0])
    reach = 2 * width(fitted) / max(float(slots[-1] - slots[0]), 1.0)
    low, high = fitted - reach, fitted + reach
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, right) if width(left) <= width(right) else (left, high)
    return width((low + high) / 2) / 2


def largest_block(positions: np.ndarray) -> slice:
    """The run of slices (by index) with the most images between two wide gaps (`wide_gaps`); the first of equals."""
    bounds = [0, *(gap + 1 for gap in sorted(wide_gaps(np.diff(positions)))), len(positions)]
    start, stop = max(pairwise(bounds), key=lambda block: block[1] - block[0])
    return slice(start, stop)


def medians_without_each(values: np.ndarray) -> np.ndarray:
    """For each value, the median of the others (of one value: itself), from one sort: linear, not quadratic, in
    a series of thousands of images."""
    count = len(values)
    if count < 2:
        return values.astype(float)
    order = np.argsort(values, kind="stable")
    ordered = values[order].astype(float)
    rank = np.empty(count, dtype=int)
    rank[order] = np.arange(count)

    def without(position: int) -> np.ndarray:  # each one's others, sorted, at `position`
        return np.where(position < rank, ordered[position], ordered[min(position + 1, count - 1)])

    middle = (count - 1) // 2  # the others are count - 1
    return without(middle) if (count - 1) % 2 else (without(middle - 1) + without(middle)) / 2


def wide_gaps(gaps: np.ndarray) -> frozenset[int]:
    """The gaps (by the index of the slice below) wider than 1 + MAX_MISSING_IN_A_GAP times the spacing around
    them: the median of the gaps on either side, or the series' median or mean gap if wider (two acquisitions
    interleaved alternate short and long gaps, none of them lost), each without this gap (of three images, the
    gaps of 2.5 mm and 1 m have a median of half a metre)."""
    wide, medians = set(), medians_without_each(gaps)
    means = (gaps.sum() - gaps) / (len(gaps) - 1) if len(gaps) > 1 else gaps
    for index, gap in enumerate(gaps):
        around = [gaps[other] for other in (index - 1, index + 1) if 0 <= other < len(gaps)]
        spacing = max(float(np.median(around)) if around else gap, float(medians[index]), float(means[index]))
        if gap > (1 + MAX_MISSING_IN_A_GAP + GAP_TOLERANCE) * spacing:
            wide.add(index)
    return frozenset(wide)
