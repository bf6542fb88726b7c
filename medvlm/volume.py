"""Scan loading: NIfTI, DICOM series (folder, files, zip) and M3D-style .npy, to one canonical `Volume`.

The canonical grid: `data[z, y, x]` float32 with x toward the patient's Right, y toward Anterior,
z toward Superior (RAS+), so `data[z]` is an axial slice; CT in Hounsfield units.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VolumeError

__all__ = ["Volume", "VolumeError", "load_volume"]


@dataclass
class Volume:
    """One 3D scan on the canonical RAS+ grid.

    data: float32 (Z, Y, X); spacing: (z, y, x) in mm; affine: 4×4 mapping (z, y, x, 1) voxel
    indices to RAS millimetres; modality: "CT", "MR", "PT" or "OT"; source: "nifti", "dicom"
    or "npy"; orientation: axis codes of the file as stored (e.g. "LPS"); meta: PHI-free facts.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    source: str
    orientation: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the voxels and their spacing: equal scans share encoded features."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(self.data).view(np.uint8).reshape(-1))
        digest.update(np.asarray(self.spacing, dtype=np.float64).tobytes())
        digest.update(str(self.data.shape).encode())
        return digest.hexdigest()


def load_volume(src: str | Path | list[str | Path]) -> Volume:
    """Read a NIfTI file, a DICOM series (folder, list of files, .zip) or a .npy array.

    Raises VolumeError, with a message that says what was wrong, for anything it cannot read.
    """
    raise NotImplementedError
