"""Intensity windows and the fixed preprocessing that turns a volume into encoder input.

Display windows (for people) and model preprocessing (fixed per checkpoint, stored in its
config) share the same windowing function, so the model sees what the viewer shows.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserInputError

if TYPE_CHECKING:
    import torch

    from .volume import Volume

# Radiology window presets as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (30.0, 150.0),
}
# The version of `scan_encoder_input`: raise it whenever what the encoder reads of some scan changes, so that
# feature caches, pre-trained encoders and training runs made from the old input are not taken for new ones.
# 2: an M3D .npy (spacing unknown) keeps its slices instead of being averaged into slabs as 1 mm slices.
PREPROCESSING_VERSION = 2
AUTO_WINDOW = "auto"  # robust percentile range: MR, PET and already-normalised volumes
INVERTED_WINDOW = "inverted"  # PET: the same range in inverted grey, uptake dark on white, as PET is often read
SUV_UNITS = "SUV (g/mL)"  # a PET's values as SUV (body weight): (0054,1001) GML, or a Bq/mL series converted
# A PET in SUV on a fixed scale, as PET is read (the same uptake looks the same on every scan): (black, white) in
# SUV; the inverted ones show uptake dark on white, the MIP's customary look.
SUV_WINDOWS: dict[str, tuple[float, float]] = {
    "SUV 0-5": (0.0, 5.0),
    "SUV 0-5 inverted": (5.0, 0.0),
    "SUV 0-10 inverted": (10.0, 0.0),
}
BLANK_SPREAD = 1e-3  # an encoder input channel spanning less (normalised) shows nothing: a CT outside every window


def window_names(modality: str, units: str | None = None) -> list[str]:
    """The window presets offered for a modality: the CT presets and "auto" for CT, "auto" and "inverted" for
    PET, and the SUV_WINDOWS for a PET whose `units` (`meta["units"]`) are SUV, else only "auto"."""
    if modality == "CT":
        return [*CT_WINDOWS, AUTO_WINDOW]
    if modality == "PT":
        return [AUTO_WINDOW, INVERTED_WINDOW, *(SUV_WINDOWS if units == SUV_UNITS else [])]
    return [AUTO_WINDOW]


# A window typed as its width and level, as radiologists say and write it: "350/50", "W 350 / L 50", "W 350 L 50",
# "350 50", "1500/-600" (or with the minus sign the app's captions print, so that one copied from them reads back);
# with its labels, also level first: "L 50 W 350", or "C 50 W 350" as Siemens labels the level (centre).
_NUMBER, _SIGNED = r"(\d+(?:\.\d+)?)", r"([-−]?\d+(?:\.\d+)?)"
_WIDTH_LABEL, _LEVEL_LABEL = r"WW?\s*:?\s*", r"(?:WL|L|C)\s*:?\s*"
_TYPED_WINDOW = re.compile(rf"\s*(?:{_WIDTH_LABEL})?{_NUMBER}"  # the width
                           rf"(?:\s*/\s*|\s+|\s*(?=WL|L|C))"  # a slash, a space, or straight on to the level's label
                           rf"(?:{_LEVEL_LABEL})?{_SIGNED}\s*", re.IGNORECASE)  # the level
_LEVEL_FIRST = re.compile(rf"\s*{_LEVEL_LABEL}{_SIGNED}\s*/?\s*{_WIDTH_LABEL}{_NUMBER}\s*", re.IGNORECASE)
# ... or as the range of values it shows from black to white, lowest first, as nuclear medicine sets a PET's scale:
# "0-6", "0–6", "0 to 6", "-160-240", "-160 - 240"; either form followed by "inverted" (or "inv") shows the highest
# black. A hyphen with a space before it and none after is the next number's sign: "-160 -40" is no range.
_SIGNED_ONLY = re.compile(rf"\s*(?:{_WIDTH_LABEL}|{_LEVEL_LABEL})?{_SIGNED}\s*", re.IGNORECASE)  # "40", "L 40"
_RANGE = re.compile(rf"\s*{_SIGNED}(?:\s*(?:–|to)\s*|-\s*|\s+-\s+){_SIGNED}\s*", re.IGNORECASE)
_INVERTED = re.compile(r"(.*?)\s+inv(?:erted)?\s*", re.IGNORECASE | re.DOTALL)
TYPED_WINDOW_LIMITS = (1e-3, 1e6)  # a typed width's least and most, and the most a value lies from 0
# "1 500", "W 1 500" or "12 000": one number written with a thousands space (a width of 1500 with no level), or
# width 1 and level 500? Refused rather than guessed; "1500/-600" or "W 1 L 500" say which. ("800 200" is a width
# and a level: no one writes 800200 for a window.)
_THOUSANDS = re.compile(rf"\s*(?:{_WIDTH_LABEL})?(?:\d\s+\d{{3}}|\d{{1,3}}\s+0\d\d)\s*", re.IGNORECASE)  # any space


@dataclass(frozen=True)
class TypedWindow:
    """A window typed into the viewer's box, in the scan's units (HU for CT): the values it shows black and white
    (`black` above `white` when inverted), and whether it was typed as a range rather than as width/level."""

    black: float
    white: float
    as_range: bool = False

    @property
    def level(self) -> float:
        return (self.black + self.white) / 2

    @property
    def width(self) -> float:
        return abs(self.white - self.black)


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


def typed_window(window: object) -> TypedWindow | None:
    """The window typed as width/level (`_TYPED_WINDOW`, `_LEVEL_FIRST`) or as a range (`_RANGE`), maybe inverted
    (`_INVERTED`), or None for anything else: a width outside TYPED_WINDOW_LIMITS, a value further from 0 than its
    most, a range whose highest value comes first, or two bare numbers that read as one with a thousands space
    (`_THOUSANDS`)."""
    return _read_typed_window(window)[0]


def _read_typed_window(window: object) -> tuple[TypedWindow | None, str]:
    """`typed_window`, and for text typed as a window but refused, why: a clause for `unknown_window`."""
    if not isinstance(window, str):
        return None, ""
    inverted = _INVERTED.fullmatch(window)
    text = inverted.group(1) if inverted else window
    if _THOUSANDS.fullmatch(text):
        return None, "one number with a thousands space, or a width and a level? type the width/level with a slash"
    as_range = False
    if match := _TYPED_WINDOW.fullmatch(text):
        width, level = float(match.group(1)), _number(match.group(2))
    elif match := _LEVEL_FIRST.fullmatch(text):
        level, width = _number(match.group(1)), float(match.group(2))
    elif match := _RANGE.fullmatch(text):
        low, high = _number(match.group(1)), _number(match.group(2))
        if high <= low:
            return None, "a range goes from the lowest value to the highest"
        width, level, as_range = high - low, (low + high) / 2, True
    else:
        return None, "a width/level takes two numbers" if _SIGNED_ONLY.fullmatch(text) else ""
    least, most = TYPED_WINDOW_LIMITS
    if width < least:
        return None, f"its width must be at least {least:g}"
    if not (width <= most and abs(level) + width / 2 <= most):
        return None, f"no scan's values lie more than {most:,.0f} from 0"
    low, high = level - width / 2, level + width / 2
    return (TypedWindow(high, low, as_range) if inverted else TypedWindow(low, high, as_range)), ""


def unknown_window(window: object, modality: str, units: str | None = None,
                   values: tuple[float, float] | None = None) -> str:
    """The sentence that refuses `window` for a scan of this modality (and units), and says why where it was typed
    as a window, and what it may be instead (`typed_window_example`, from the scan's `values` where given)."""
    said = {"PT": "this PET scan", "OT": "this scan (modality: other)"}.get(modality, f"this {modality} scan")
    why = _read_typed_window(window)[1]
    return (f"unknown window {str(window)[:40]!r}{f' ({why})' if why else ''} for {said}; choose one of "
            f"{', '.join(window_names(modality, units))}, or {typed_window_example(modality, values=values)}")


def typed_window_example(modality: str, short: bool = False, values: tuple[float, float] | None = None) -> str:
    """What to type for a window of one's own in a scan of this modality: the advice a refusal gives, or with
    `short` the hint a label gives. A CT by width/level in HU; any other scan by the range of its values, a PET's
    inverted as its MIP. Where its `values` (the "auto" range) are given, the range is the scan's own, rounded: an
    M3D .npy's values run 0 to 1 and a PET's in Bq/mL to thousands; else SUV 0-6 for a PET, 100-800 for another."""
    if modality == "CT":
        return "W/L: 350/50" if short else "a width/level such as 350/50"
    def written(low: float, high: float) -> tuple[str, str]:  # as a range, and as width/level
        return f"{low:g}-{high:g}", f"{high - low:g}/{(low + high) / 2:g}"

    span, width_level = written(*_rounded_range(*values)) if values else ("", "")
    if typed_window(span) is None or typed_window(width_level) is None:  # none given, or one the box would refuse
        span, width_level = written(*((0, 6) if modality == "PT" else (100, 800)))
    if modality == "PT":
        return (f"a range: {span} inverted" if short else
                f"a range such as {span} ({span} inverted: uptake dark on white), or a width/level such as "
                f"{width_level}")
    return f"a range: {span}" if short else f"a range such as {span}, or a width/level such as {width_level}"


def _rounded_range(low: float, high: float) -> tuple[float, float]:
    """(low, high) widened to round numbers, multiples of half the span's leading power of ten: 0.0102 to 0.9958
    is 0 to 1, 12 to 1450 is 0 to 1500, 0.1 to 7.3 is 0 to 7.5."""
    step = 10.0 ** math.floor(math.log10(high - low)) / 2 if high > low else 1.0
    return (round(math.floor(low / step) * step, 12) + 0.0, round(math.ceil(high / step) * step, 12) + 0.0)


def known_window(window: object, modality: str, units: str | None = None) -> bool:
    """Whether a viewer can show a scan of this modality (and units) in `window`: one of its presets, or one typed
    (`typed_window`)."""
    return window in window_names(modality, units) or typed_window(window) is not None


def default_window(modality: str) -> str:
    """The window a viewer opens a scan with."""
    return "soft tissue" if modality == "CT" else AUTO_WINDOW


def open_range(lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) as given when hi > lo; else a range from lo wide enough to divide by at any magnitude (a constant
    scan, even of 1e38, maps to black instead of dividing by zero)."""
    return (lo, hi) if hi > lo else (lo, lo + max(1.0, abs(lo) * 1e-6))


def robust_range(data: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Percentile intensity range of `data`, from a strided sample so it stays fast on big volumes.

    Non-finite voxels are ignored; a constant volume gets a range just above its value (`open_range`).
    """
    step = max(1, data.size // 2_000_000)
    sample = data.reshape(-1)[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [low, high])
    return open_range(float(lo), float(hi))


def window_range(volume: Volume, window: str, robust: tuple[float, float] | None = None) -> tuple[float, float]:
    """The intensities mapped to black and to white by a named window (`apply_window`'s lo, hi).

    CT presets are level/width in HU; a typed width/level (`typed_window`) is in the scan's own units; "auto"
    is the robust percentile range of the volume (`robust`, where the caller keeps it), and "inverted" the same
    range the other way round (the highest intensity black).
    """
    if window in (AUTO_WINDOW, INVERTED_WINDOW):
        lo, hi = robust or robust_range(volume.data)
        return (hi, lo) if window == INVERTED_WINDOW else (lo, hi)
    if window in SUV_WINDOWS:
        return SUV_WINDOWS[window]
    if (typed := typed_window(window)) is not None:
        return typed.black, typed.white
    if window not in CT_WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(window_names('CT'))}, or a "
                         "width/level such as 350/50")
    level, width = CT_WINDOWS[window]
    return level - width / 2, level + width / 2


def apply_window(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map intensities linearly so `lo` → 0 and `hi` → 1 (lo > hi inverts), clipped; NaN becomes 0. float32,
    same shape."""
    scaled = (np.asarray(data, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return np.nan_to_num(scaled, copy=False, nan=0.0)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit grey levels."""
    return (unit * 255.0 + 0.5).astype(np.uint8)


def encoder_input(volume: Volume, config, device: torch.device | str | None = None) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """(pixel_values, heights) of `scan_encoder_input`: what the slice encoder reads of the volume, blank or not."""
    pixel_values, heights, _ = scan_encoder_input(volume, config, device)
    return pixel_values, heights


def readable_encoder_input(volume: Volume, config, device: torch.device | str | None = None) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """`encoder_input`, refusing a scan that holds nothing to read: one value in every voxel, or a CT whose every
    value lies outside every window. What a report or a training sample is made from (stages 1–2 of
    `Pipeline.encode` and of the feature cache), so that no model describes an empty picture."""
    pixel_values, heights, blank = scan_encoder_input(volume, config, device)
    spread = pixel_values.amax(dim=(0, 2, 3)) - pixel_values.amin(dim=(0, 2, 3))  # per channel
    if blank or bool((spread < BLANK_SPREAD).all()):
        raise UserInputError("the scan holds nothing for the model to read (one value everywhere, or none inside "
                             "its windows); check that the file holds the image you meant")
    return pixel_values, heights


def scan_encoder_input(volume: Volume, config, device: torch.device | str | None = None) -> tuple[torch.Tensor,
                                                                                               torch.Tensor, bool]:
    """The fixed, per-checkpoint preprocessing from a volume to the slice encoder's input.

    Slices are taken as a radiologist sees them (row 0 anterior, column 0 the patient's right),
    padded square with the volume's lowest value, resized to `config.image_size` (non-square pixels:
    each axis to its share of the square in mm, then padded), averaged into
    slabs of `config.slice_spacing_mm` (a volume whose spacing is unknown, an M3D .npy, keeps its slices;
    at most `config.max_input_slices` either way), then mapped to one
    channel per CT window (MR/PET: robust percentile range; OT: min-max) and normalised.

    Returns pixel_values (Z', 3, S, S) float32 and the height of each slice's centre in the scan as a
    fraction (Z',), 0 at the bottom of the lowest (most inferior) slice and 1 at the top of the highest, both
    on `device` (None: the CPU), and whether the scan is blank (one value in every voxel, not counting NaN and ±Inf:
    nothing for a model to read, which its input cannot tell exactly after the resizing's rounding); on a
    GPU the voxels go over once and the resizing runs there.
    """
    import torch
    import torch.nn.functional as F

    data = np.ascontiguousarray(volume.data, dtype=np.float32)  # no copy for a loaded volume
    num_slices, rows, cols = data.shape
    if volume.modality == "CT":
        ranges = [(level - width / 2, level + width / 2) for level, width in config.ct_windows]
    elif volume.modality in ("MR", "PT"):
        ranges = [robust_range(data)] * len(config.image_mean)
    else:
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        ranges = [open_range(lo, hi)] * len(config.image_mean)
    with warnings.catch_warnings():  # a memory-mapped .npy is read-only, and torch warns; nothing here writes
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        voxels = torch.from_numpy(data).to(device)  # (Z, Y, X); on the CPU it shares the volume's memory, unwritten
    lowest, highest = (float(v) for v in torch.aminmax(voxels))  # one pass; NaN or ±Inf anywhere shows here
    all_finite = math.isfinite(lowest) and math.isfinite(highest)
    if all_finite:
        blank = lowest == highest
    else:  # rare (a loaded volume has none): the finite values, copied
        finite = data[np.isfinite(data)]
        blank = finite.size == 0 or float(finite.min()) == float(finite.max())
        lowest = float(finite.min()) if finite.size else 0.0
    background = lowest
    if not all_finite:
        voxels = torch.nan_to_num(voxels, nan=background, posinf=background, neginf=background)
    target = num_slices
    if config.slice_spacing_mm and volume.spacing_known and volume.spacing[0] < config.slice_spacing_mm:
        target = max(1, round(num_slices * volume.spacing[0] / config.slice_spacing_mm))
    target = min(target, config.max_input_slices)
    if target < num_slices:
        # Slab averaging along z, as a thick-slice reconstruction does. It is linear and acts on z alone, so it
        # commutes with the in-plane flip, pad and resize below: done first, they touch Z' slices instead of Z.
        voxels = _slab_means(voxels, target)  # (Z', Y, X)
    slices = voxels.flip(1, 2)  # display orientation: row 0 anterior, column 0 the patient's right
    size = config.image_size
    row_mm, col_mm = volume.spacing[1:]
    if math.isclose(row_mm, col_mm, rel_tol=1e-3):
        side = max(rows, cols)
        top, left = (side - rows) // 2, (side - cols) // 2
        if rows != cols:
            slices = F.pad(slices, (left, side - cols - left, top, side - rows - top), value=background)
        slices = F.interpolate(slices[:, None], size=(size, size), mode="bilinear", antialias=side > size,
                               align_corners=False)[:, 0]  # (Z', S, S)
    else:  # pixels not square: each axis resized to its share of the square in mm, or the picture stretches
        side_mm = max(rows * row_mm, cols * col_mm)
        height, width = (max(1, round(size * n * mm / side_mm)) for n, mm in ((rows, row_mm), (cols, col_mm)))
        slices = F.interpolate(slices[:, None], size=(height, width), mode="bilinear",
                               antialias=rows > height or cols > width, align_corners=False)[:, 0]
        top, left = (size - height) // 2, (size - width) // 2
        slices = F.pad(slices, (left, size - width - left, top, size - height - top), value=background)

    channels = [((slices - lo) / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in ranges]
    pixel_values = torch.stack(channels, dim=1)  # (Z', 3, S, S)
    mean = torch.tensor(config.image_mean, device=slices.device).view(1, -1, 1, 1)
    std = torch.tensor(config.image_std, device=slices.device).view(1, -1, 1, 1)
    heights = (torch.arange(target, dtype=torch.float32, device=slices.device) + 0.5) / target
    return (pixel_values - mean) / std, heights, blank


def slab_bounds(count: int, target: int) -> list[tuple[int, int]]:
    """The slices each of `target` slabs of `count` slices averages, as (start, stop) indices, stop excluded: the
    bins of `adaptive_avg_pool1d`, slab i from floor(i·count/target) to ceil((i+1)·count/target) (neighbouring
    slabs share a slice where count/target is not whole). target == count: one slice each."""
    return [(index * count // target, -(-(index + 1) * count // target)) for index in range(target)]


def slab_middle(first: int, last: int) -> int:
    """The middle slice of a slab of slices `first` … `last`: where a viewer goes to show it."""
    return (first + last) // 2


def _slab_means(voxels: torch.Tensor, target: int) -> torch.Tensor:
    """(Z, Y, X) → (target, Y, X): the mean of each slab, with the bins of `adaptive_avg_pool1d` (slab i runs
    from floor(i·Z/target) to ceil((i+1)·Z/target)).

    On the CPU numpy adds the slices of a slab, a reduction along the outer axis that it does faster than torch
    and, single-threaded, without slowing down when another process shares the cores (300×512×512 CT: 0.025 s
    against 0.05 s idle, 0.36 s beside a training job); elsewhere torch does it on the device."""
    import torch

    bounds = slab_bounds(voxels.shape[0], target)
    if voxels.device.type != "cpu":
        return torch.stack([voxels[start:stop].mean(dim=0) for start, stop in bounds])
    data = voxels.numpy()
    means = np.empty((target, *data.shape[1:]), dtype=np.float32)
    for index, (start, stop) in enumerate(bounds):
        np.add.reduce(data[start:stop], axis=0, out=means[index])
        np.divide(means[index], np.float32(stop - start), out=means[index])
    return torch.from_numpy(means)
