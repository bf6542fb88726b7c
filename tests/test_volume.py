"""load_volume: every storage of the same scan gives the same canonical RAS+ grid; bad input is one VolumeError."""

import gzip
import shutil
import warnings
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import MARKED_SPACING
from pydicom.uid import RLELossless

from medvlm import volume as volume_module
from medvlm.errors import VolumeError
from medvlm.view_html import slice_view_html
from medvlm.volume import GUESSED_MODALITY, error_reason, load_volume
from medvlm.writers import save_dicom_enhanced, save_dicom_series, save_nifti, save_npy

PHI = {"PatientName": "Doe^Janet", "PatientID": "MRN-5551234", "PatientBirthDate": "19610214",
       "AccessionNumber": "ACC-998877", "InstitutionName": "St Elsewhere General"}


def _assert_same_scan(loaded, data, spacing=MARKED_SPACING):
    assert loaded.data.dtype == np.float32
    np.testing.assert_array_equal(loaded.data, data)
    np.testing.assert_allclose(loaded.spacing, spacing, rtol=1e-6)


def test_nifti_in_any_orientation_and_dicom_load_to_the_same_grid(tmp_path, marked_ct):
    loaded = {code: load_volume(save_nifti(tmp_path / f"{code}.nii.gz", marked_ct, MARKED_SPACING, code))
              for code in ("RAS", "LAS", "LPS")}
    save_dicom_series(tmp_path / "dicom", marked_ct, MARKED_SPACING, intercept=-1024, file_names="shuffled")
    loaded["dicom"] = load_volume(tmp_path / "dicom")
    for name, scan in loaded.items():
        _assert_same_scan(scan, marked_ct)
        np.testing.assert_allclose(scan.affine, loaded["RAS"].affine, atol=1e-4, err_msg=name)
        assert scan.modality == "CT"
    assert [loaded[k].orientation for k in ("RAS", "LAS", "LPS", "dicom")] == ["RAS", "LAS", "LPS", "LPS"]
    assert loaded["dicom"].source == "dicom" and loaded["RAS"].source == "nifti"
    # the canonical affine maps (z, y, x) indices to RAS: x grows toward the patient's right
    assert loaded["dicom"].affine[0, 2] > 0 and loaded["dicom"].affine[1, 1] > 0 and loaded["dicom"].affine[2, 0] > 0


def test_dicom_list_of_files_enhanced_and_compressed_load_the_same(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path / "plain", marked_ct, MARKED_SPACING, intercept=-1024, file_names="shuffled")
    _assert_same_scan(load_volume([str(f) for f in files]), marked_ct)
    save_dicom_series(tmp_path / "rle", marked_ct, MARKED_SPACING, intercept=-1024, transfer_syntax=RLELossless)
    _assert_same_scan(load_volume(tmp_path / "rle"), marked_ct)
    enhanced = load_volume(save_dicom_enhanced(tmp_path / "enhanced.dcm", marked_ct, MARKED_SPACING, intercept=-1024))
    _assert_same_scan(enhanced, marked_ct)
    assert enhanced.orientation == "LPS"


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, -1024.0), (2.0, -1000.0)])
def test_dicom_rescale_gives_hounsfield_units(tmp_path, slope, intercept):
    hu = np.full((3, 4, 5), -1000.0, dtype=np.float32)
    hu[1] = 40.0
    hu[2, 0, 0] = 1200.0
    files = save_dicom_series(tmp_path, hu, (1.0, 1.0, 1.0), intercept=intercept, slope=slope)
    stored = pydicom.dcmread(files[1]).pixel_array
    assert np.all(stored == (40.0 - intercept) / slope)  # the file holds raw integers, not HU
    np.testing.assert_array_equal(load_volume(tmp_path).data, hu)


def test_the_larger_of_two_interleaved_series_is_chosen_and_the_other_listed(tmp_path, marked_ct):
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, series_description="abdomen", file_names="shuffled")
    scout = np.zeros((3, 6, 6), dtype=np.float32)
    save_dicom_series(tmp_path, scout, (5.0, 2.0, 2.0), series_description="scout", file_names="shuffled",
                      series_number=2)
    scan = load_volume(tmp_path)
    _assert_same_scan(scan, marked_ct)
    assert scan.meta["series_number"] == 1
    assert scan.meta["other_series"] == [{"series_number": 2, "modality": "CT", "slices": 3}]


def test_spacing_comes_from_positions_not_slice_thickness(tmp_path, marked_ct):
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING):
        ds = pydicom.dcmread(path)
        ds.SliceThickness = 10.0  # wrong on purpose: thick reconstructions overlap, thin ones leave gaps
        ds.save_as(path)
    assert load_volume(tmp_path).spacing[0] == pytest.approx(MARKED_SPACING[0])


def test_a_missing_slice_is_drawn_from_its_neighbours_and_every_slice_keeps_its_position(tmp_path, marked_ct):
    whole = load_volume(save_nifti(tmp_path / "whole.nii.gz", marked_ct, MARKED_SPACING, "LPS"))
    files = save_dicom_series(tmp_path / "dicom", marked_ct, MARKED_SPACING)
    files[3].unlink()
    shutil.copy(files[5], tmp_path / "dicom" / "copy-of-slice-6")
    scan = load_volume(tmp_path / "dicom")
    assert scan.shape == whole.shape and scan.meta["missing_slices"] == 1 and scan.meta["duplicate_slices"] == 1
    np.testing.assert_allclose(scan.affine, whole.affine, atol=1e-4)  # the slices above the gap are not moved down
    kept = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(scan.data[kept], marked_ct[kept])
    np.testing.assert_allclose(scan.data[3], (marked_ct[2] + marked_ct[4]) / 2)
    assert scan.meta["notes"] == ["1 slice(s) are missing from the series (gaps of up to 5 mm between slices 2.5 mm "
                                  "apart); each is drawn from its two neighbours, so that every slice lies at its "
                                  "true position, and its caption says it was not acquired",
                                  "1 image(s) were in the upload twice; each is used once"]
    assert scan.meta["drawn_slices"] == [3]
    for index in range(len(marked_ct)):  # a density or a small lesion is not read off a slice no one imaged
        caption = slice_view_html(scan, "axial", index, "soft tissue", [])
        assert ("not acquired: drawn from the slices on either side" in caption) == (index == 3)


def _series_at(folder, heights_mm, whole_mm: bool = False) -> None:
    """A DICOM CT series with one axial slice at each height (mm, superior), each slice's voxels holding its own
    height in HU: the loaded volume shows where each of its slices came from. `whole_mm`: every ImagePositionPatient
    rounded to whole mm, as some exporters write them."""
    heights = np.asarray(heights_mm, dtype=np.float32)
    data = np.broadcast_to(heights[:, None, None], (len(heights), 6, 6)).copy()
    for path, height in zip(save_dicom_series(folder, data, (1.0, 1.0, 1.0)), heights, strict=True):
        ds = pydicom.dcmread(path)
        position = [*ds.ImagePositionPatient[:2], float(height)]
        ds.ImagePositionPatient = [float(round(value)) for value in position] if whole_mm else position
        ds.save_as(path)


def _drawn_heights(scan) -> np.ndarray:
    """The height (mm) each slice of a volume made by `_series_at` is drawn at, by its affine."""
    return scan.affine[2, 3] + scan.affine[2, 0] * np.arange(scan.shape[0])


def test_a_wide_gap_is_shown_empty_at_its_true_place(tmp_path):
    """Two blocks of a 3 mm series with three slices missing between them (more than MAX_MISSING_IN_A_GAP): the
    slices above the gap stay at their heights, and the gap is shown empty, not made up from either side."""
    _series_at(tmp_path, [3.0 * index for index in range(10)] + [3.0 * index + 9.0 for index in range(10, 20)])
    scan = load_volume(tmp_path)
    assert scan.shape[0] == 23 and scan.spacing[0] == pytest.approx(3.0) and scan.meta["empty_slices"] == 3
    assert "padding_voxels" not in scan.meta  # the scan's own pixels marked no padding
    from medvlm.view import opening_slice

    assert opening_slice(scan, "axial") == 9  # the middle slice (11) is empty: the viewer opens at the nearest image
    drawn = _drawn_heights(scan)
    np.testing.assert_allclose(scan.data[:10, 3, 3], drawn[:10], atol=1e-3)
    np.testing.assert_allclose(scan.data[13:, 3, 3], drawn[13:], atol=1e-3)  # each at its true height
    assert np.all(scan.data[10:13] == 0.0)  # empty: the scan's lowest value, black in every window
    assert scan.meta["notes"] == ["the series has no slices across a gap of 12 mm; the 3 slice(s) there are shown "
                                  "empty, at their true place, not made up from the slices on either side"]


def test_a_spacing_that_changes_within_a_series_keeps_every_slice_at_its_true_height(tmp_path):
    """3 mm slices at the skull base, 6 mm above it: drawn on a 3 mm grid, every slice at its own height and one
    drawn between each pair 6 mm apart (stacked at one step, those above would lie up to 24 mm too high)."""
    _series_at(tmp_path, [3.0 * index for index in range(9)] + [30.0 + 6.0 * index for index in range(11)])
    scan = load_volume(tmp_path)
    assert scan.shape[0] == 31 and scan.spacing[0] == pytest.approx(3.0)
    np.testing.assert_allclose(scan.data[:, 3, 3], _drawn_heights(scan), atol=1e-3)
    assert scan.meta["notes"] == ["slice gaps vary from 3 to 6 mm; the series is drawn on an even 3 mm grid, each "
                                  "slice within 0.75 mm of where it was taken, 11 of its 31 slices drawn between "
                                  "their two neighbours (each caption says which)"]
    assert scan.meta["drawn_slices"] == list(range(9, 30, 2))  # between the slices 6 mm apart


@pytest.mark.parametrize("toward", ["right", "left"])
def test_a_missing_slice_of_a_sagittal_series_is_named_where_the_viewer_shows_it(tmp_path, toward):
    """A sagittal series (its slices stepping toward the patient's right, as the volume's index does, or toward the
    left) with one file lost: the slice drawn in its place is the one named as drawn, counted as the viewer counts.
    Its images alternate 100 and 600, so the drawn one (the mean of two of 600, in place of a 100) is the middle of
    the one run of three alike."""
    values = np.where(np.arange(12) % 2, 600.0, 100.0).astype(np.float32)
    files = save_dicom_series(tmp_path, np.broadcast_to(values[:, None, None], (12, 8, 8)).copy(), (2.5, 1.0, 1.0))
    for slot, path in enumerate(files):
        ds = pydicom.dcmread(path)
        sign = 1.0 if toward == "right" else -1.0  # the normal (0, ±1, 0) × (0, 0, -1) = (∓1, 0, 0): LPS -x is right
        ds.ImageOrientationPatient = [0.0, sign, 0.0, 0.0, 0.0, -1.0]  # sagittal: columns inferior
        ds.ImagePositionPatient = [-2.5 * slot * sign, 0.0, 0.0]  # each slot one step along the normal
        ds.save_as(path)
    files[4].unlink()
    scan = load_volume(tmp_path)
    means = scan.data.mean(axis=(0, 1))  # (X,): each sagittal slice's value
    runs = [index for index in range(1, 11) if means[index - 1] == means[index] == means[index + 1]]
    assert scan.shape[2] == 12 and len(runs) == 1 and scan.meta["drawn_slices"] == runs
    drawn = runs[0]
    assert "not acquired" in slice_view_html(scan, "sagittal", drawn, "auto", [])
    assert "not acquired" not in slice_view_html(scan, "axial", 3, "auto", [])  # a reformat: no one slice


def test_a_sagittal_series_with_a_gap_opens_on_an_image_not_in_the_gap(tmp_path):
    """A scan opens in the plane it was acquired in, at its middle slice; where a gap (three files lost) leaves that
    slice empty, at the nearest that holds an image, as an axial series does."""
    from medvlm.view import acquired_plane, opening_slice

    image = np.random.default_rng(0).uniform(100, 900, (12, 8, 8)).astype(np.float32)
    files = save_dicom_series(tmp_path, image, (2.5, 1.0, 1.0), "MR")
    for slot, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # sagittal
        ds.ImagePositionPatient = [-2.5 * slot, 0.0, 0.0]
        ds.save_as(path)
    for index in (5, 6, 7):
        files[index].unlink()
    scan = load_volume(tmp_path)
    assert acquired_plane(scan) == "sagittal" and scan.meta["empty_slices"] == 3
    opening = opening_slice(scan, "sagittal")
    empty = [index for index in range(scan.shape[2]) if scan.data[:, :, index].max() == scan.data.min()]
    assert len(empty) == 3 and opening not in empty and min(abs(opening - index) for index in empty) == 1


def test_a_spacing_that_doubles_within_a_series_is_not_called_missing_slices(tmp_path):
    """20 slices 2.5 mm apart, then 6 at 5 mm: the series' spacing changes, nothing is missing from it; one or two
    gaps of two steps in a series are missing slices."""
    _series_at(tmp_path / "doubles", [2.5 * index for index in range(20)] + [52.5 + 5 * index for index in range(6)])
    scan = load_volume(tmp_path / "doubles")
    assert scan.shape[0] == 32 and "missing_slices" not in scan.meta
    assert scan.meta["notes"] == ["slice gaps vary from 2.5 to 5 mm; the series is drawn on an even 2.5 mm grid, "
                                  "every slice at its true position, 6 of its 32 slices drawn between their two "
                                  "neighbours (each caption says which)"]
    _series_at(tmp_path / "lost", [2.5 * index for index in range(30) if index not in (7, 20)])
    assert load_volume(tmp_path / "lost").meta["missing_slices"] == 2


@pytest.mark.parametrize(("heights", "slices", "says"), [
    # a fourfold spacing (2.5 mm, then 10 mm): the slices between are drawn, not left empty as files lost
    ([2.5 * index for index in range(20)] + [57.5 + 10 * index for index in range(9)], 56, "drawn on an even 2.5 mm"),
    ([1.25 * index for index in range(20)] + [28.75 + 5 * index for index in range(14)], 76, "an even 1.25 mm"),
    # one image 0.05 mm from another (a copy with a new UID): the grid keeps the series' own step
    ([2.5 * index for index in range(40)] + [50.05], 40, "drawn on an even 2.5 mm"),
    # one image far from the rest, or two acquisitions interleaved: no grid of mostly empty or made-up slices
    ([2.5 * index for index in range(40)] + [1200.0], 40, "1 image(s) of the series lie far from the other 40"),
    ([-600.0] + [2.5 * index for index in range(40)], 40, "1 image(s) of the series lie far from the other 40"),
    ([0.0, 2.5, 1000.0], 2, "1 image(s) of the series lie far from the other 2"),  # not 9 slices made up across 1 m
    ([2.5 * index for index in range(40)] + [80.3 + 2.5 * index for index in range(40)], None, "drawn on an even"),
    # one gap of 0.3 mm: as many slots as images, each slice still drawn at its place, not left where it was
    ([2.5 * index for index in range(25)] + [60.3 + 2.5 * index for index in range(25)], None, "an even"),
    # two packages of 5 mm offset by 1 mm (gaps of 1 and 4 mm): not stacked at the short gap
    (sorted([5.0 * index for index in range(30)] + [5.0 * index + 1 for index in range(30)]), None, "an even"),
])
def test_a_stray_or_changing_spacing_never_leaves_most_of_the_volume_empty(tmp_path, heights, slices, says):
    """None: at most four slices for each image (MAX_GRID_SLOTS)."""
    _series_at(tmp_path, heights)
    scan = load_volume(tmp_path)
    assert scan.shape[0] == slices if slices else scan.shape[0] <= 4 * len(heights)
    assert "empty_slices" not in scan.meta and any(says in note for note in scan.meta["notes"])
    # Each slice drawn where the affine says it is (the voxels hold their heights); an image left out far from the
    # rest, whose height is no slice's, included.
    drawn = _drawn_heights(scan)
    assert np.abs(scan.data[:, 3, 3] - drawn).max() <= 0.25 * scan.spacing[0] + 0.51  # HU rounds to whole


def test_a_fivefold_spacing_change_shows_every_slice_as_it_was_acquired(tmp_path):
    """1 mm slices, then 5 mm ones (or 3 mm, then 15 mm): drawn on the fine spacing, so that every slice is one of
    the grid's own, not a blend of two (a blend halves the contrast of a lesion seen in one slice)."""
    for fine, count in ((1.0, 40), (3.0, 30)):
        heights = [fine * index for index in range(count)] + [fine * (count - 1 + 5 * index) for index in range(1, 61)]
        _series_at(tmp_path / str(fine), heights)
        scan = load_volume(tmp_path / str(fine))
        assert scan.spacing[0] == pytest.approx(fine)
        drawn = scan.data[:, 3, 3]
        assert all(np.abs(drawn - height).min() <= 0.5 for height in heights)  # HU round to whole numbers


def test_the_median_of_the_other_gaps_is_each_gaps_own():
    """`_wide_gaps` judges each gap by the median of the others; taken from one sort, for a series of thousands."""
    from medvlm.slice_grid import medians_without_each

    rng = np.random.default_rng(0)
    for count in (1, 2, 3, 4, 9, 10):
        gaps = rng.integers(1, 5, count).astype(float)  # ties among them
        others = [np.median(np.delete(gaps, index)) if count > 1 else gaps[index] for index in range(count)]
        np.testing.assert_allclose(medians_without_each(gaps), others)


def test_positions_rounded_to_whole_mm_lie_on_the_series_grid(tmp_path):
    """2.5 mm slices whose positions an exporter rounded to whole mm (gaps of 2 and 3 mm): read as the even 2.5 mm
    series they are, whatever the count of slices and wherever they start (the median gap can be 2 or 3 mm)."""
    for count, start in ((40, 0.0), (41, 0.0), (60, 0.6)):  # the last: more gaps of 2 mm than of 3
        folder = tmp_path / f"{count}-{start}"
        _series_at(folder, [start + 2.5 * index for index in range(count)], whole_mm=True)
        scan = load_volume(folder)
        assert scan.shape[0] == count and scan.spacing[0] == pytest.approx(2.5, abs=0.01) and "notes" not in scan.meta
    _series_at(tmp_path / "lost", [2.5 * index for index in range(60) if index != 20], whole_mm=True)
    scan = load_volume(tmp_path / "lost")  # one file lost: a missing slice, not "uneven gaps"
    assert scan.shape[0] == 60 and scan.meta["missing_slices"] == 1 and "uneven_gaps" not in scan.meta
    # 1 mm slices at whole-mm heights (as scanners write them), three files lost: the gap shown empty at 1 mm steps
    # (every image a slot made the step 1.068 mm, each distance along the scan 7 % long)
    _series_at(tmp_path / "three-lost", [index for index in range(23) if index not in (10, 11, 12)], whole_mm=True)
    scan = load_volume(tmp_path / "three-lost")
    assert scan.shape[0] == 23 and scan.spacing[0] == pytest.approx(1.0) and scan.meta["empty_slices"] == 3


def test_missing_slices_count_against_the_slice_limit_before_pixels_are_read(tmp_path, monkeypatch):
    from medvlm import dicom

    files = save_dicom_series(tmp_path, np.zeros((12, 6, 6), dtype=np.float32), (2.5, 1.0, 1.0))
    for path in (files[3], files[7]):
        path.unlink()  # 10 images left, 12 slices once drawn
    monkeypatch.setattr(volume_module, "MAX_SIDE", 11)
    monkeypatch.setattr(dicom, "_read_pixels", lambda *args: pytest.fail("pixels read"))
    with pytest.raises(VolumeError, match="12 voxels along one side, more than the 11 allowed"):
        load_volume(tmp_path)


def test_the_scan_is_chosen_over_a_scout_of_too_few_images(tmp_path, marked_ct):
    """A CT scout (a frontal and a lateral view, or one view) beside a stackable series of another modality: the
    series that stacks is shown."""
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, modality="OT")
    views = save_dicom_series(tmp_path / "scout", np.zeros((2, 6, 6), dtype=np.float32), (5.0, 2.0, 2.0),
                              series_number=2)
    lateral = pydicom.dcmread(views[1])
    lateral.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # the second view in the sagittal plane
    lateral.save_as(views[1])
    scan = load_volume(tmp_path)
    assert scan.shape == marked_ct.shape and scan.meta["other_series"][0]["slices"] == 2
    views[1].unlink()
    assert load_volume(tmp_path).meta["other_series"][0]["slices"] == 1


def test_a_private_transfer_syntax_is_one_sentence(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING)
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"  # GE's private syntax: no decoder reads it
    ds.save_as(files[0], enforce_file_format=False)
    with pytest.raises(VolumeError, match=r"cannot be decoded .*export the series again, uncompressed"):
        load_volume(tmp_path)


def test_positions_rounded_by_the_exporter_give_the_true_slice_spacing(tmp_path):
    """0.625 mm slices whose positions an exporter wrote to 0.1 mm: gaps of 0.6 and 0.7 mm, even all the same."""
    data = np.zeros((24, 6, 6), dtype=np.float32)
    for path in save_dicom_series(tmp_path, data, (0.625, 1.0, 1.0)):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(f"{value:.1f}") for value in ds.ImagePositionPatient]
        ds.save_as(path)
    scan = load_volume(tmp_path)
    assert scan.spacing[0] == pytest.approx(0.625, abs=1e-3) and "notes" not in scan.meta


def test_uneven_gaps_that_are_no_missing_slices_are_said(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING)
    for path in files[4:]:  # the upper half 1.5 mm higher: a gap of 1.6 steps
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 1.5]
        ds.save_as(path)
    scan = load_volume(tmp_path)  # 19 mm from the first to the last: 8 steps of 2.375 mm
    assert scan.shape == (9, *marked_ct.shape[1:]) and scan.spacing[0] == pytest.approx(19 / 8)
    np.testing.assert_array_equal(scan.data[[0, -1]], marked_ct[[0, -1]])
    np.testing.assert_array_equal(scan.data[[1, 2, 3, 5, 6, 7]], marked_ct[[1, 2, 3, 4, 5, 6]])  # as taken
    assert scan.meta["notes"] == ["slice gaps vary from 2.5 to 4 mm; the series is drawn on an even 2.38 mm grid, "
                                  "each slice within 0.59 mm of where it was taken, 1 of its 9 slices drawn between "
                                  "their two neighbours (each caption says which)"]


def test_images_that_share_one_uid_but_not_a_position_are_all_kept(tmp_path, marked_ct):
    """A careless de-identifier gives every image the same SOPInstanceUID: they are still different slices."""
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds.save_as(path)
    scan = load_volume(tmp_path)
    _assert_same_scan(scan, marked_ct)
    assert "duplicate_slices" not in scan.meta


def test_the_scan_is_chosen_over_a_dose_grid_of_more_frames(tmp_path, marked_ct):
    """An RT export: the CT beside its RTDOSE grid, which has more frames than the CT has slices."""
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING)
    dose = save_dicom_enhanced(tmp_path / "dose.dcm", np.full((12, 10, 12), 2.0, dtype=np.float32), (2.0, 2.0, 2.0))
    ds = pydicom.dcmread(dose)
    ds.Modality = "RTDOSE"
    ds.save_as(dose)
    scan = load_volume(tmp_path)
    _assert_same_scan(scan, marked_ct)
    assert scan.modality == "CT" and scan.meta["other_series"][0]["slices"] == 12


def test_zip_input_loads_and_never_writes_outside_a_temporary_folder(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path / "series", marked_ct, MARKED_SPACING, file_names="shuffled")
    archive = tmp_path / "upload" / "scan.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in files:
            zipped.write(path, f"study/series/{path.name}")
        zipped.writestr("../escaped.txt", "outside")
        zipped.writestr("/absolute.txt", "outside")
    _assert_same_scan(load_volume(archive), marked_ct)
    assert not list(tmp_path.rglob("escaped.txt")) and not list(tmp_path.rglob("absolute.txt"))


def test_meta_never_carries_patient_identifiers(tmp_path, marked_ct):
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, patient=PHI)
    scan = load_volume(tmp_path)
    text = repr(scan.meta) + repr(scan)
    for value in PHI.values():
        assert value not in text
        assert value.split("^")[0] not in text
    assert "1.2." not in repr(scan.meta)  # no UIDs either


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the test's own writing of the value
def test_a_malformed_value_is_not_quoted_on_stderr_or_in_the_log(tmp_path, marked_ct, capfd, caplog):
    """A site's UID that embeds a patient's ID and birth date, malformed (a component with a leading zero): pydicom's
    check would warn, quoting it, on stderr and in the server's log. It is read without the check."""
    from pydicom.dataelem import DataElement

    uid = "1.2.840.8675309.019610214.01"
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING):
        ds = pydicom.dcmread(path)
        ds["StudyInstanceUID"] = DataElement(0x0020000D, "UI", uid)
        ds.save_as(path)
    capfd.readouterr()  # what writing the files said
    caplog.clear()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    quoted = " ".join([*capfd.readouterr(), caplog.text, *(str(warning.message) for warning in warned)])
    assert "8675309" not in quoted and "19610214" not in quoted


def test_oblique_nifti_loads_on_the_closest_canonical_axes(tmp_path, marked_ct):
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
    path = tmp_path / "oblique.nii"
    nib.save(nib.Nifti1Image(marked_ct.transpose(2, 1, 0), affine), path)
    scan = load_volume(path)
    _assert_same_scan(scan, marked_ct)
    np.testing.assert_allclose(scan.affine[:3, 2], affine[:3, 0], atol=1e-6)  # the true oblique geometry is kept


def test_4d_nifti_gives_its_first_volume_and_says_so(tmp_path, marked_ct):
    frames = np.stack([marked_ct + 100 * t for t in range(5)], axis=-1)  # (Z, Y, X, T)
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(frames.transpose(2, 1, 0, 3), np.diag([0.7, 0.8, 2.5, 1.0])), path)
    scan = load_volume(path)
    _assert_same_scan(scan, marked_ct)
    assert scan.meta["frames"] == 5 and scan.meta["notes"] == ["the file holds 5 volumes (4D); the first is shown",
                                                               GUESSED_MODALITY["CT"]]


def test_a_nifti_that_does_not_state_its_modality_says_it_was_guessed(tmp_path, marked_ct):
    """NIfTI has no modality field: a CT's range of values reads as CT, anything else as "other", and the scan
    card says that this was read from the values, not from the file."""
    for data, modality in ((marked_ct, "CT"), (marked_ct + 1000.0, "OT")):  # an MR's values: no air in HU
        nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), np.diag([0.7, 0.8, 2.5, 1.0])), tmp_path / "scan.nii")
        scan = load_volume(tmp_path / "scan.nii")
        assert scan.modality == modality and scan.meta["notes"] == [GUESSED_MODALITY[modality]]
    stated = load_volume(save_nifti(tmp_path / "stated.nii.gz", marked_ct, MARKED_SPACING, modality="CT"))
    assert stated.modality == "CT" and "notes" not in stated.meta


def test_a_scan_read_as_the_modality_the_user_names_is_windowed_and_fed_to_the_model_as_one(tmp_path, marked_ct):
    """A PET NIfTI that does not say so reads as "other" (shown over its whole range, no inverted window); named PET,
    it is windowed and fed to the model as a PET, its voxels shared and the guess's note gone; a modality that is
    none of MedVLM's is refused with a sentence."""
    from medvlm.configuration import MedVLMConfig
    from medvlm.preprocess import encoder_input, window_names

    rng = np.random.default_rng(0)
    uptake = rng.gamma(2.0, 0.5, size=marked_ct.shape).astype(np.float32)
    uptake[4, 10, 10] = 60.0  # one hot voxel: the whole range is set by it, the robust range is not
    nib.save(nib.Nifti1Image(uptake.transpose(2, 1, 0), np.diag([0.7, 0.8, 2.5, 1.0])), tmp_path / "pet.nii")
    guessed = load_volume(tmp_path / "pet.nii")
    assert guessed.modality == "OT" and "inverted" not in window_names(guessed.modality)
    pet = guessed.as_modality("PT")
    assert pet.modality == "PT" and "inverted" in window_names(pet.modality)
    assert np.shares_memory(pet.data, guessed.data) and pet.fingerprint != guessed.fingerprint
    assert not pet.meta["notes"]  # the guess's note goes: the modality is no longer guessed
    # The model's input: "other" is scaled over its whole range, so one hot voxel darkens the rest; a PET over its
    # robust range, as the model was trained.
    config = MedVLMConfig()
    as_other, as_pet = (encoder_input(scan, config)[0] for scan in (guessed, pet))
    assert float(as_pet.median()) > float(as_other.median()) + 0.2
    assert pet.as_modality("PT") is pet
    with pytest.raises(VolumeError, match="'SPECT' is not a modality MedVLM 3D reads; use CT, MR, PT"):
        guessed.as_modality("SPECT")


def test_a_ct_stored_with_an_offset_chosen_as_ct_is_said_to_be_likely_not_in_hu(tmp_path, marked_ct):
    """A CT stored as HU + 1024 without its scl_inter (as some converters and dataset exports do) reads as "other";
    chosen as CT on the page, it was shown in HU windows without a word (air grey, all tissue white). Now it is said,
    as a DICOM CT without its rescale is, and its values have no unit; read as another modality again, the note
    goes. A true CT chosen as CT says nothing of it."""
    nib.save(nib.Nifti1Image((marked_ct + 1024).astype(np.uint16).transpose(2, 1, 0), np.diag([1.0, 1.0, 2.5, 1.0])),
             tmp_path / "offset.nii.gz")
    guessed = load_volume(tmp_path / "offset.nii.gz")
    assert guessed.modality == "OT"
    chosen = guessed.as_modality("CT")
    assert chosen.meta["hu_unlikely"] and chosen.units is None
    assert any("likely not Hounsfield units (air lies near −1000; a CT stored with an offset such as +1024" in note
               for note in chosen.meta["notes"])
    again = chosen.as_modality("MR")
    assert "hu_unlikely" not in again.meta and not any("Hounsfield" in note for note in again.meta["notes"])
    true_ct = load_volume(save_nifti(tmp_path / "mr.nii.gz", marked_ct, MARKED_SPACING, modality="MR"))
    assert true_ct.as_modality("CT").units == "HU" and not true_ct.as_modality("CT").meta["notes"]


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
def test_nifti_scaling_gives_hounsfield_units(tmp_path, marked_ct, name):
    """Raw integers with the header's scl_slope / scl_inter, as scanners write CT: the HU come back, compressed
    (read through ISA-L) or not."""
    hu = 2 * np.floor(marked_ct / 2)  # what 2 HU steps can store
    image = nib.Nifti1Image(((hu.transpose(2, 1, 0) + 1000) / 2).astype(np.int16), np.diag([0.7, 0.8, 2.5, 1]))
    image.header.set_slope_inter(2.0, -1000.0)
    nib.save(image, tmp_path / name)
    _assert_same_scan(load_volume(tmp_path / name), hu)


@pytest.mark.parametrize(("unit", "per_mm"), [("mm", 1.0), ("unknown", 1.0), ("meter", 0.001), ("micron", 1000.0)])
def test_nifti_spacing_comes_out_in_mm_whatever_unit_the_header_states(tmp_path, marked_ct, unit, per_mm):
    z, y, x = MARKED_SPACING
    image = nib.Nifti1Image(marked_ct.transpose(2, 1, 0), np.diag([x * per_mm, y * per_mm, z * per_mm, 1]))
    image.header.set_xyzt_units(unit)
    nib.save(image, tmp_path / "scan.nii.gz")
    _assert_same_scan(load_volume(tmp_path / "scan.nii.gz"), marked_ct)


def test_nifti_modality_is_stored_or_guessed(tmp_path, marked_ct):
    assert load_volume(save_nifti(tmp_path / "mr.nii", marked_ct, MARKED_SPACING, modality="MR")).modality == "MR"
    t1 = np.abs(marked_ct) + 10
    assert load_volume(save_nifti(tmp_path / "t1.nii", t1, MARKED_SPACING)).modality == "OT"
    ct = load_volume(save_nifti(tmp_path / "ct.nii.gz", marked_ct, MARKED_SPACING, dtype=np.int16))
    assert ct.modality == "CT"  # values span air (-1000) to bone (1000)
    np.testing.assert_array_equal(ct.data, marked_ct)


@pytest.mark.parametrize("leading_one", [True, False])
def test_npy_in_display_order(tmp_path, leading_one):
    display = np.zeros((4, 6, 8), dtype=np.float32)  # arr[d]: row 0 anterior, column 0 the patient's right
    display[:, 0, :] = 0.5
    display[:, :, 0] = 1.0
    np.save(tmp_path / "scan.npy", display[None] if leading_one else display)
    scan = load_volume(tmp_path / "scan.npy")
    assert scan.shape == (4, 6, 8) and scan.spacing == (1.0, 1.0, 1.0) and scan.modality == "OT"
    assert scan.orientation == "LPS" and scan.source == "npy"
    assert np.all(scan.data[:, :, -1] == 1.0)  # column 0 is the patient's right: the highest x
    assert np.all(scan.data[:, -1, :-1] == 0.5)  # row 0 is anterior: the highest y


def test_save_npy_round_trips(tmp_path, marked_ct):
    unit = (marked_ct - marked_ct.min()) / (marked_ct.max() - marked_ct.min())
    path = save_npy(tmp_path / "scan.npy", unit)
    assert np.load(path).shape == (1, 8, 20, 24)
    np.testing.assert_array_equal(load_volume(path).data, unit.astype(np.float32))


def _garbage(tmp_path, name, content: bytes | None):
    """A file of `content`; None: a zip holding one text file."""
    path = tmp_path / name
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a scan")
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(("name", "content", "message"), [
    ("notes.nii.gz", b"this is a text file\n", "NIfTI"),
    ("empty.nii", b"", "NIfTI"),
    ("noise.dcm", bytes(range(256)) * 8, r"noise\.dcm is not a scan file MedVLM 3D reads"),
    ("noise.zip", b"PK\x03\x04" + bytes(500), "zip"),
    ("noise.npy", b"\x93NUMPY garbage", r"\.npy"),
    ("chest.png", b"\x89PNG\r\n\x1a\n" + bytes(100), r"chest\.png is a picture, not a scan: one image holds no volume"),
    ("report.pdf", b"%PDF-1.4" + bytes(100), r"report\.pdf is not a scan file MedVLM 3D reads"),
    ("study.zip", None, r"study\.zip holds no DICOM images \(its one file is not one\)"),
    ("empty.zip", b"PK\x05\x06" + bytes(18), r"empty\.zip holds no files"),  # a zip of nothing
])
def test_unreadable_files_raise_one_clear_error(tmp_path, name, content, message):
    with pytest.raises(VolumeError, match=message) as caught:
        load_volume(_garbage(tmp_path, name, content))
    assert "\n" not in str(caught.value)
    assert str(tmp_path) not in str(caught.value)  # an upload's server-side folder means nothing to its sender


def test_a_damaged_zip_member_is_named_without_its_folder(tmp_path):
    """PACS exports name a series' folder for the patient; a corrupt download's message names the damaged file
    alone, never that folder."""
    import zipfile

    upload = tmp_path / "study.zip"
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("Doe_Jane_PID7781234/IM00", b"DICM" * 64)
    data = bytearray(upload.read_bytes())
    data[data.index(b"DICM") + 9] ^= 0xFF  # one byte of the member flipped: its CRC no longer matches
    upload.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match=r"study\.zip has a damaged or encrypted member .*'IM00'") as caught:
        load_volume(upload)
    assert "Doe_Jane" not in str(caught.value)


@pytest.mark.parametrize(("message", "shown"), [
    ("Empty file: '/tmp/gradio/65b4ab/empty.nii'", "Empty file: 'empty.nii'"),
    ("Empty file: '/srv/app data/gradio/ab/scan.nii'", "Empty file: 'scan.nii'"),  # a folder with a space
    ("No such file: 'C:\\\\Users\\\\bob\\\\scan.nii.gz'", "No such file: 'scan.nii.gz'"),  # doubled backslashes
    ("File /a/b/c.dcm: truncated", "File c.dcm: truncated"),
    ("File /tmp/gradio/ab/Doe.nii.gz is not a gzip file", "the file is not a gzip file"),  # named once, by us
    ("File /tmp/gradio/ab/Doe Jane.nii.gz is not a gzip file", "the file is not a gzip file"),  # a name with a space
    ("see https://nipy.org/nibabel/errors.html", "see https://nipy.org/nibabel/errors.html"),  # a URL stays whole
    ("see 'https://nipy.org/nibabel/errors.html'", "see 'https://nipy.org/nibabel/errors.html'"),
    # a zip's member in a folder named for the patient, as PACS exports name them
    ("Bad CRC-32 for file 'Doe_Jane_PID7781234/IM00'", "Bad CRC-32 for file 'IM00'"),
    ("512/512/300 and/or (0020,0011) pylibjpeg/pylibjpeg-openjpeg", "512/512/300 and/or (0020,0011) "
     "pylibjpeg/pylibjpeg-openjpeg"),
])
def test_a_library_message_names_the_file_never_its_folders(message, shown):
    assert error_reason(ValueError(message)) == shown


def test_a_library_message_that_ends_its_first_line_with_a_colon_keeps_the_reason_below():
    """pydicom's "... raised by all available plugins:" says nothing until the next line says what failed."""
    message = ("Unable to decode as exceptions were raised by all available plugins:\n"
               "  pylibjpeg: Error decoding the J2K data: failed to read the header\n  gdcm: not installed")
    assert error_reason(ValueError(message)) == ("Unable to decode as exceptions were raised by all available plugins: "
                                                 "pylibjpeg: Error decoding the J2K data: failed to read the header")


def test_a_long_library_message_is_cut_between_words():
    shown = error_reason(ValueError("The number of bytes of pixel data is less than expected " + "word " * 40))
    assert len(shown) <= 162 and shown.endswith("word …")


def test_a_file_cut_short_in_a_zip_is_named_as_zipped_and_not_called_compressed(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path / "series", marked_ct, MARKED_SPACING)
    files[2].write_bytes(files[2].read_bytes()[:-300])  # uncompressed, its last rows lost in a copy
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zipped:
        for path in files:
            zipped.write(path, f"CT/{path.name}")
    with pytest.raises(VolumeError) as caught:
        load_volume(tmp_path / "study.zip")
    message = str(caught.value)
    # which image, as a PACS lists it (the app shows no file name: it can be the patient's)
    assert (f"the pixel data of {files[2].name} (image 3 of {len(files)} from the first along the series, instance "
            "number 3) cannot be decoded") in message
    assert message.endswith("the file is cut short or damaged; copy or export the series again")


def test_a_folder_holding_only_a_zip_loads_the_zip_but_a_zip_in_a_zip_is_not_opened(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path / "series", marked_ct, MARKED_SPACING)
    (tmp_path / "upload").mkdir()
    with zipfile.ZipFile(tmp_path / "upload" / "study.zip", "w") as zipped:
        for path in files:
            zipped.write(path, path.name)
    (tmp_path / "upload" / ".DS_Store").write_bytes(b"clutter")
    _assert_same_scan(load_volume(tmp_path / "upload"), marked_ct)
    _assert_same_scan(load_volume([tmp_path / "upload" / "study.zip", tmp_path / "upload" / ".DS_Store"]), marked_ct)
    with zipfile.ZipFile(tmp_path / "outer.zip", "w") as zipped:
        zipped.write(tmp_path / "upload" / "study.zip", "study.zip")
    with pytest.raises(VolumeError, match="holds no DICOM images"):
        load_volume(tmp_path / "outer.zip")


def test_a_zipped_file_with_a_long_name_in_any_script_loads(tmp_path, marked_ct):
    """Member names are kept (for messages about them) within the 255 bytes a file system allows a name."""
    files = save_dicom_series(tmp_path / "series", marked_ct, MARKED_SPACING)
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as zipped:
        for number, path in enumerate(files):
            zipped.write(path, f"{'断层扫描' * 30}{number}.dcm")
    _assert_same_scan(load_volume(tmp_path / "study.zip"), marked_ct)


def test_files_beside_a_nifti_are_counted_as_left_out(tmp_path, marked_ct):
    nifti = save_nifti(tmp_path / "scan.nii.gz", marked_ct, MARKED_SPACING, modality="CT")
    picture = _garbage(tmp_path, "Doe_John.png", b"\x89PNG\r\n\x1a\n" + bytes(100))
    scan = load_volume([nifti, picture])
    _assert_same_scan(scan, marked_ct)
    assert scan.meta["notes"] == ["1 other file(s) in the upload are not part of the scan and were left out"]
    assert "notes" not in load_volume(nifti).meta


def test_missing_path_is_named(tmp_path):
    with pytest.raises(VolumeError, match=r"nowhere\.nii\.gz does not exist"):
        load_volume(tmp_path / "nowhere.nii.gz")


def test_truncated_nifti_is_refused(tmp_path, marked_ct):
    path = save_nifti(tmp_path / "scan.nii.gz", marked_ct, MARKED_SPACING)
    whole = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(whole[: len(whole) - 500]))
    with pytest.raises(VolumeError, match="truncated"):
        load_volume(path)


def test_a_compressed_nifti_named_nii_is_told_its_name(tmp_path, marked_ct):
    compressed = save_nifti(tmp_path / "scan.nii.gz", marked_ct, MARKED_SPACING)
    misnamed = compressed.rename(tmp_path / "scan.nii")
    with pytest.raises(VolumeError, match=r"^scan.nii is a gzip-compressed NIfTI file named as an uncompressed one; "
                                          r"rename it to end in .nii.gz$"):
        load_volume(misnamed)


def test_2d_images_and_object_arrays_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), dtype=np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeError, match="2D image"):
        load_volume(tmp_path / "slice.nii.gz")
    one = save_dicom_series(tmp_path / "one", np.zeros((1, 8, 8), dtype=np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(VolumeError, match=r"^folder one holds one DICOM image, which is no volume; upload the whole "
                                          r"series: all of its files$"):
        load_volume(tmp_path / "one")
    with pytest.raises(VolumeError, match=r"^IM0001.dcm holds one DICOM image, .*: its folder, or a \.zip of it"):
        load_volume(one[0])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match=r"\.npy"):
        load_volume(tmp_path / "objects.npy")


def test_a_series_split_into_one_series_a_file_is_told_so(tmp_path, marked_ct):
    """A de-identifier that gives every file a new SeriesInstanceUID: eight images, eight series of one, no volume."""
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(path)
    with pytest.raises(VolumeError, match=r"holds 8 DICOM images, each in a series of its own \(every file has its "
                                          r"own SeriesInstanceUID\), so none stacks into a volume; export"):
        load_volume(tmp_path)


def test_limits_are_checked_from_headers(tmp_path, monkeypatch):
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))  # 2.7·10¹³ voxels
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\x00" * 4)  # no voxels at all: refused before any are read
    with pytest.raises(VolumeError, match="more than the 2048 allowed"):
        load_volume(path)
    monkeypatch.setattr(volume_module, "MAX_ZIP_ENTRIES", 3)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zipped:
        for number in range(5):
            zipped.writestr(f"{number}.dcm", b"x")
    with pytest.raises(VolumeError, match="more than the 3 allowed"):
        load_volume(tmp_path / "many.zip")


def test_colour_dicom_is_refused(tmp_path, marked_ct):
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING):
        ds = pydicom.dcmread(path)
        grey = ds.pixel_array
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = np.repeat((grey % 256).astype(np.uint8)[..., None], 3, axis=-1).tobytes()
        ds.save_as(path)
    with pytest.raises(VolumeError, match="colour images are not supported"):
        load_volume(tmp_path)


def test_a_zip_or_folder_holding_one_nifti_loads_it(tmp_path, marked_ct):
    (tmp_path / "upload").mkdir()
    nifti = save_nifti(tmp_path / "upload" / "scan.nii.gz", marked_ct, MARKED_SPACING, "LPS")
    (tmp_path / "upload" / "sidecar.json").write_text("{}")
    with zipfile.ZipFile(tmp_path / "scan.zip", "w") as zipped:
        zipped.write(nifti, "scan.nii.gz")
    for source in (tmp_path / "scan.zip", tmp_path / "upload"):
        scan = load_volume(source)
        _assert_same_scan(scan, marked_ct)
        assert scan.source == "nifti" and scan.orientation == "LPS"


def test_zip_folders_left_by_a_crash_are_removed_once_stale(tmp_path, monkeypatch):
    """A process killed while reading a zip leaves its extracted series (patient names in the headers) in the
    temporary folder; the app's sweep removes such folders once untouched for an hour, not one being read."""
    import os
    import tempfile
    from pathlib import Path

    from medvlm.volume import ZIP_FOLDER_PREFIX, remove_stale_zip_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale, fresh = (Path(tempfile.mkdtemp(prefix=ZIP_FOLDER_PREFIX)) for _ in range(2))
    (stale / "00001").mkdir()
    (stale / "00001" / "slice.dcm").write_bytes(b"DICM")
    other = Path(tempfile.mkdtemp(prefix="someone-else-"))
    for path in (stale, other):
        os.utime(path, (0, 0))
    assert remove_stale_zip_folders(3600) == [stale]
    assert not stale.exists() and fresh.is_dir() and other.is_dir()


def test_two_scans_uploaded_together_are_refused_in_a_sentence(tmp_path, marked_ct):
    """Two NIfTI files in one upload: which one was meant is not guessed."""
    paths = [save_nifti(tmp_path / f"{name}.nii.gz", marked_ct, MARKED_SPACING) for name in ("first", "second")]
    with pytest.raises(VolumeError, match=r"^the upload holds 2 NIfTI or \.npy files; upload one scan at a time$"):
        load_volume(paths)
