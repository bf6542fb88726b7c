"""Intensity windows and the fixed preprocessing that turns a volume into encoder input.

Display windows (for people) and model preprocessing (fixed per checkpoint, stored in its
config) share the same windowing function, so the model sees what the viewer shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .volume import Volume

# Radiology window presets as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (30.0, 150.0),
}
AUTO_WINDOW = "auto"  # robust percentile range: MR, PET and already-normalised volumes


def window_names(modality: str) -> list[str]:
    """The window presets offered for a modality: the CT presets for CT, else only "auto"."""
    return [*CT_WINDOWS, AUTO_WINDOW] if modality == "CT" else [AUTO_WINDOW]


def default_window(modality: str) -> str:
    """The window a viewer opens a scan with."""
    return "soft tissue" if modality == "CT" else AUTO_WINDOW


def robust_range(data: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Percentile intensity range of `data`, from a strided sample so it stays fast on big volumes.

    Non-finite voxels are ignored; a constant volume gets a range of width 1.
    """
    step = max(1, data.size // 2_000_000)
    sample = data.reshape(-1)[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def window_range(volume: Volume, window: str) -> tuple[float, float]:
    """(lowest, highest) intensity mapped to black and white for a named window.

    CT presets are level/width in HU; "auto" is the robust percentile range of the volume.
    """
    if window == AUTO_WINDOW:
        return robust_range(volume.data)
    if window not in CT_WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(window_names('CT'))}")
    level, width = CT_WINDOWS[window]
    return level - width / 2, level + width / 2


def apply_window(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map intensities linearly so `lo` → 0 and `hi` → 1, clipped; NaN becomes 0. float32, same shape."""
    scaled = (np.asarray(data, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(scaled, 0.0, 1.0, out=scaled)
    return np.nan_to_num(scaled, copy=False, nan=0.0)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit grey levels."""
    return (unit * 255.0 + 0.5).astype(np.uint8)
