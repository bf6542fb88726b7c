"""CT series acquired with a tilted gantry: the table steps along the body while the slices are tilted to it, so
the stack is sheared. Each slice is shifted within its plane onto a rectangular grid (as dcm2niix corrects a tilt):
distances, coronal and sagittal views are true.

The series are written with every pixel holding a linear function of where it lies in the patient (LPS mm). Linear
interpolation keeps a linear function exact, so every voxel of the loaded volume must hold the function of where
the volume's affine puts it, whatever the shift, its sign or the frame's growth; a voxel that does not is padding.
"""

import math

import numpy as np
import pydicom
import pytest

from medvlm.errors import VolumeError
from medvlm.volume import load_volume
from medvlm.writers import save_dicom_series

SLICES, ROWS, COLUMNS = 24, 40, 48
PIXEL = (0.8, 0.7)  # mm between rows, between columns


def _value(lps: np.ndarray) -> np.ndarray:
    """The value a pixel at these LPS positions (…, 3) holds."""
    return lps @ np.array([2.0, 3.0, 5.0]) + 100.0


def _tilted_series(folder, rows_direction, columns_direction, table_step, slices: int = SLICES) -> None:
    """A CT series of `slices` images of ROWS × COLUMNS pixels with this orientation, image k at k × table_step (LPS
    mm), every pixel holding `_value` of its position."""
    rows_direction, columns_direction = np.asarray(rows_direction, float), np.asarray(columns_direction, float)
    files = save_dicom_series(folder, np.zeros((slices, ROWS, COLUMNS), np.float32), (2.5, *PIXEL))
    row_index, column_index = np.mgrid[:ROWS, :COLUMNS]
    for slot, path in enumerate(files):
        ds = pydicom.dcmread(path)
        origin = np.asarray(table_step, float) * slot
        lps = (origin + row_index[..., None] * PIXEL[0] * columns_direction
               + column_index[..., None] * PIXEL[1] * rows_direction)
        stored = np.rint((_value(lps) - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
        ds.ImageOrientationPatient = [*rows_direction, *columns_direction]
        ds.ImagePositionPatient = [float(value) for value in origin]
        ds.save_as(path)


def _held_and_expected(scan) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's value, and `_value` of the LPS position the scan's affine gives it."""
    index = np.stack(np.meshgrid(*map(np.arange, scan.shape), indexing="ij"), axis=-1).reshape(-1, 3)
    ras = index @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    return scan.data.reshape(-1), _value(ras * np.array([-1.0, -1.0, 1.0]))


@pytest.mark.parametrize(("degrees", "tilted_orientation"), [(20.0, True), (-15.0, True), (26.57, False)])
def test_a_tilted_gantry_is_drawn_on_a_rectangular_grid_with_every_voxel_where_the_affine_puts_it(
        tmp_path, degrees, tilted_orientation):
    """As scanners write a tilt (the orientation tilted about left–right, the table stepping along the body), and
    as some exporters do (an axial orientation, each position shifted front to back)."""
    angle = math.radians(degrees)
    if tilted_orientation:
        rows_direction, columns_direction = [1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)]
        table_step = [0.0, 0.0, 2.5]
    else:
        rows_direction, columns_direction = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
        table_step = [0.0, 2.5 * math.tan(angle), 2.5]
    _tilted_series(tmp_path, rows_direction, columns_direction, table_step)
    scan = load_volume(tmp_path)

    assert scan.meta["gantry_tilt_degrees"] == pytest.approx(abs(degrees), abs=0.01)
    assert any("gantry tilt" in note and "shifted within its plane" in note for note in scan.meta["notes"])
    axes = scan.affine[:3, :3]
    np.testing.assert_allclose(axes.T @ axes, np.diag(np.diag(axes.T @ axes)), atol=1e-6)  # rectangular: no shear
    between_planes = 2.5 * math.cos(angle) if tilted_orientation else 2.5
    assert sorted(scan.spacing) == pytest.approx(sorted([between_planes, *PIXEL]), abs=1e-4)

    held, expected = _held_and_expected(scan)
    padding = held.min()  # where a slice did not reach, the frame holds the scan's lowest value
    where_the_affine_says = np.abs(held - expected) <= 0.51  # the pixels were stored as whole numbers
    assert np.all(where_the_affine_says | (held == padding))
    # Every slice kept (a fractional shift leaves its outermost rows and columns half outside: padding), none cut off
    assert np.count_nonzero(where_the_affine_says) >= SLICES * (ROWS - 2) * (COLUMNS - 2)
    assert "padding_voxels" not in scan.meta  # the frame's margins are no padding of the scan's own


def test_a_series_stepping_along_its_normal_is_not_moved(tmp_path):
    _tilted_series(tmp_path, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.5])
    scan = load_volume(tmp_path)
    assert "gantry_tilt_degrees" not in scan.meta and "notes" not in scan.meta
    assert scan.shape == (SLICES, ROWS, COLUMNS)
    held, expected = _held_and_expected(scan)
    assert np.abs(held - expected).max() <= 0.51


@pytest.mark.parametrize(("degrees", "step", "slices"), [(12.0, 2.5, SLICES), (12.0, 2.0, SLICES), (30.0, 1.5, SLICES),
                                                         (45.0, 2.5, SLICES), (45.0, 2.0, SLICES), (5.0, 4.0, 60)])
def test_positions_rounded_to_whole_mm_tilt_nothing(tmp_path, degrees, step, slices):
    """An oblique MR stack stepping along its normal, its positions rounded to whole mm by the exporter: one slice
    a slot at the series' spacing, no gantry tilt made up from the rounding, no slice moved. Each was read as a
    spacing that varies, and drawn on a finer grid of blended slices: rounding each coordinate moves an oblique
    position further along its normal than an axial one (up to 0.71 mm at 45°, against 0.5); at 45° 2 mm slices
    rounded to whole mm lie exactly on a grid of 1.41 mm with every other slot empty; and a stack a few degrees
    off axial has rounding errors that drift slowly, then jump by a millimetre, which tilt a least-squares line."""
    angle = math.radians(degrees)
    rows_direction, columns_direction = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(angle), -math.sin(angle)])
    normal = np.cross(rows_direction, columns_direction)
    _tilted_series(tmp_path, rows_direction, columns_direction, step * normal, slices)
    for path in sorted(tmp_path.iterdir()):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(round(float(value) + 0.3)) for value in ds.ImagePositionPatient]
        ds.save_as(path)
    scan = load_volume(tmp_path)
    assert "gantry_tilt_degrees" not in scan.meta and scan.shape == (slices, ROWS, COLUMNS)
    assert scan.spacing[0] == pytest.approx(step, abs=0.02)
    assert not any("gaps" in note or "missing" in note for note in scan.meta.get("notes", []))


def test_a_tilted_series_too_large_once_made_rectangular_is_refused_before_its_pixels_are_read(tmp_path,
                                                                                               monkeypatch):
    """The grown frame counts against the size limits before any pixel is read (a 900-slice tilted CT took gigabytes
    before it was refused), and the refusal says why the scan is larger than its images."""
    import medvlm.dicom
    import medvlm.volume

    _tilted_series(tmp_path, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.5 * math.tan(math.radians(30.0)), 2.5])
    sheared = SLICES * ROWS * COLUMNS
    monkeypatch.setattr(medvlm.volume, "MAX_VOXEL_BYTES", 4 * sheared)  # the images fit, the grown frame does not

    def never(*args, **kwargs):
        raise AssertionError("pixels read")

    monkeypatch.setattr(medvlm.dicom, "_read_pixels", never)
    with pytest.raises(VolumeError, match=r"\(its tilted slices made rectangular\) has [\d,]+ voxels, more than"):
        load_volume(tmp_path)


def test_a_tilt_of_a_fraction_of_a_degree_over_a_long_stack_is_undone(tmp_path):
    """0.5° over 24 slices of 2.5 mm shifts the last slice by about 0.6 pixels: undone, and said."""
    _tilted_series(tmp_path, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.5 * math.tan(math.radians(0.5)), 2.5])
    scan = load_volume(tmp_path)
    assert scan.meta["gantry_tilt_degrees"] == pytest.approx(0.5, abs=0.01)
    held, expected = _held_and_expected(scan)
    assert np.all((np.abs(held - expected) <= 0.51) | (held == held.min()))
