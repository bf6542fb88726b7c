"""Shared fixtures: synthetic volumes whose content the tests know exactly."""

import numpy as np
import pytest

MARKED_SPACING = (2.5, 0.8, 0.7)  # (z, y, x) mm: anisotropic, so a swapped axis shows


@pytest.fixture
def marked_ct() -> np.ndarray:
    """A (Z, Y, X) = (8, 20, 24) RAS+ CT in HU: soft tissue with noise, air behind (low y), and bone-bright
    (1000 HU) markers on the patient's right (high x), anterior (high y, mid x) and over the two most
    superior slices' left half."""
    rng = np.random.default_rng(7)
    data = rng.integers(-40, 40, size=(8, 20, 24)).astype(np.float32)
    data[:, :2, :] = -1000.0  # air behind the patient
    data[:, 8:12, -4:] = 1000.0  # right
    data[:, -3:, 10:14] = 1000.0  # anterior
    data[-2:, :, :12] = 1000.0  # superior cap, patient's left half
    return data
