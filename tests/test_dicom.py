"""DICOM series as scanners and PACS export them: several stacks in one series, tilted gantries, localizers,
files without a preamble. Each volume's content is known, so a mixed-up slice shows."""

import math
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import MARKED_SPACING
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset

from medvlm.errors import VolumeError
from medvlm.preprocess import window_range
from medvlm.view3d import default_threshold, threshold_range
from medvlm.volume import GUESSED_MODALITY, load_volume
from medvlm.writers import save_dicom_enhanced, save_dicom_series, save_nifti


def _edit(files, **attributes) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _two_stacks(folder, first, second, **labels):
    """Two stacks of one series at the same positions, file names shuffled together (as PACS exports name
    files by UID); labels: keyword → (value of the first stack, value of the second)."""
    uid = pydicom.uid.generate_uid()
    stacks = [save_dicom_series(folder, data, MARKED_SPACING, "MR", series_uid=uid, file_names="shuffled")
              for data in (first, second)]
    for index, files in enumerate(stacks):
        _edit(files, **{keyword: values[index] for keyword, values in labels.items()})
    return stacks


def test_the_echoes_of_one_series_are_never_mixed(tmp_path, marked_ct):
    _two_stacks(tmp_path, marked_ct + 3000, marked_ct, EchoTime=(20.0, 5.0))
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)  # every slice from the first echo (5 ms)
    assert any("echo time 5 ms is shown" in note for note in scan.meta["notes"])


def test_diffusion_shows_the_b0_stack_not_directions_mixed(tmp_path, marked_ct):
    uid = pydicom.uid.generate_uid()
    for b_value, data in ((1000.0, marked_ct + 100), (0.0, marked_ct), (1000.0, marked_ct + 200)):
        files = save_dicom_series(tmp_path, data, MARKED_SPACING, "MR", series_uid=uid, file_names="shuffled")
        _edit(files, DiffusionBValue=b_value)  # two directions share b = 1000: that stack repeats its positions
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    assert any("b-value 0 s/mm² is shown" in note for note in scan.meta["notes"])


def test_diffusion_shows_its_highest_b_value_where_it_is_one_stack(tmp_path, marked_ct):
    """The usual export, b = 0 and one b = 1000 (trace) image at each position: b = 1000 is shown, as diffusion is
    read (an acute infarct, bright at b = 1000, may not show at b = 0)."""
    infarct = marked_ct + 400.0
    _two_stacks(tmp_path, marked_ct, infarct, DiffusionBValue=(0.0, 1000.0))
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, infarct)
    assert any("(b-values 0, 1000 s/mm²); b-value 1000 s/mm² is shown" in note for note in scan.meta["notes"])


def test_stacks_that_state_nothing_take_the_lowest_instance_at_each_position(tmp_path, marked_ct):
    _, second = _two_stacks(tmp_path, marked_ct, marked_ct + 3000)
    for offset, path in enumerate(second):
        _edit([path], InstanceNumber=100 + offset)
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    assert any("lowest instance number is shown" in note for note in scan.meta["notes"])


def test_two_acquisitions_meeting_at_one_position_give_the_whole_scan(tmp_path, marked_ct):
    """A CT in two acquisitions whose ranges share one table position: the acquisition number does not make
    two stacks of the scan (each covers only part of it), so every position is kept, once."""
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, file_names="instance")
    middle = len(files) // 2
    for index, path in enumerate(files):
        _edit([path], AcquisitionNumber=1 if index <= middle else 2)
    again = pydicom.dcmread(files[middle])
    again.SOPInstanceUID, again.AcquisitionNumber, again.InstanceNumber = pydicom.uid.generate_uid(), 2, 50
    again.PixelData = (again.pixel_array + 7).astype(again.pixel_array.dtype).tobytes()
    again.save_as(tmp_path / "overlap.dcm")
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)  # the first reconstruction of the shared position
    assert any("lowest instance number is shown" in note for note in scan.meta["notes"])


def test_a_trigger_time_per_slice_is_not_a_stack_of_its_own(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, "MR", file_names="instance")
    for index, path in enumerate(files):
        _edit([path], TriggerTime=400.0 + 7 * index)
    copy = pydicom.dcmread(files[2])  # one image exported twice, under a new UID
    copy.SOPInstanceUID, copy.InstanceNumber = pydicom.uid.generate_uid(), 77
    copy.save_as(tmp_path / "again.dcm")
    np.testing.assert_array_equal(load_volume(tmp_path).data, marked_ct)


def test_a_dynamic_series_is_judged_by_the_stack_it_shows(tmp_path, marked_ct, monkeypatch):
    """Its time points together hold more images than any grid side may, one time point does not."""
    import medvlm.volume as volume_module

    uid = pydicom.uid.generate_uid()
    for time_point in range(1, 5):  # 4 × 8 = 32 images
        files = save_dicom_series(tmp_path, marked_ct + 100 * (time_point - 1), MARKED_SPACING, "MR", series_uid=uid,
                                  file_names="shuffled")
        _edit(files, TemporalPositionIdentifier=time_point)
    monkeypatch.setattr(volume_module, "MAX_SIDE", 24)  # the grid is 8 × 20 × 24
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    assert any("time point 1 is shown" in note for note in scan.meta["notes"])


def test_enhanced_files_of_one_frame_each_load(tmp_path, marked_ct):
    """Some exports write an enhanced series as one file per slice: the geometry is in the functional groups."""
    whole = pydicom.dcmread(save_dicom_enhanced(tmp_path / "whole.dcm", marked_ct, MARKED_SPACING))
    (tmp_path / "whole.dcm").unlink()
    pixels = whole.pixel_array
    for index in range(len(pixels)):
        one = pydicom.dcmread(save_dicom_enhanced(tmp_path / "template.dcm", marked_ct, MARKED_SPACING))
        one.NumberOfFrames = 1
        one.PerFrameFunctionalGroupsSequence = [whole.PerFrameFunctionalGroupsSequence[index]]
        one.SeriesInstanceUID = whole.SeriesInstanceUID
        one.SOPInstanceUID = one.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        one.PixelData = np.ascontiguousarray(pixels[index]).tobytes()
        one.save_as(tmp_path / f"slice-{index:02d}.dcm")
    (tmp_path / "template.dcm").unlink()
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    np.testing.assert_allclose(scan.spacing, MARKED_SPACING, rtol=1e-6)


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_monochrome1_is_shown_as_meant_without_touching_hounsfield_units(tmp_path, marked_ct, modality):
    """MONOCHROME1 puts white at the lowest value: an MR is inverted (with a note), a CT keeps its HU."""
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, modality)
    _edit(files, PhotometricInterpretation="MONOCHROME1")
    scan = load_volume(tmp_path)
    if modality == "CT":
        np.testing.assert_array_equal(scan.data, marked_ct)
        assert not any("MONOCHROME1" in note for note in scan.meta.get("notes", []))
    else:
        np.testing.assert_array_equal(scan.data, marked_ct.max() + marked_ct.min() - marked_ct)
        assert any("values are inverted" in note for note in scan.meta["notes"])


def test_a_localizer_of_another_size_in_the_series_is_left_out(tmp_path, marked_ct):
    uid = "1.2.3.4"
    save_dicom_series(tmp_path / "series", marked_ct, MARKED_SPACING, series_uid=uid)
    localizer = save_dicom_series(tmp_path / "localizer", np.zeros((2, 32, 32), np.float32), MARKED_SPACING,
                                  series_uid=uid)
    _edit(localizer[:1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    localizer[1].unlink()
    scan = load_volume([tmp_path / "series", localizer[0]])
    np.testing.assert_array_equal(scan.data, marked_ct)
    assert any("another slice orientation or of another size" in note for note in scan.meta["notes"])


def test_files_without_preamble_or_file_meta_load(tmp_path, marked_ct):
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, intercept=-1024):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        with open(path, "wb") as handle:  # the bare data set, implicit VR little endian, as old exports wrote it
            raw = DicomFileLike(handle)
            raw.is_little_endian, raw.is_implicit_VR = True, True
            write_dataset(raw, ds)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(next(tmp_path.iterdir()))  # not readable without force
    np.testing.assert_array_equal(load_volume(tmp_path).data, marked_ct)


def test_the_upload_names_what_it_left_out(tmp_path, marked_ct):
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, series_description="abdomen")
    save_dicom_series(tmp_path, np.zeros((3, 6, 6), np.float32), (5.0, 2.0, 2.0), "MR", series_description="scout",
                      series_number=4)
    notes = load_volume(tmp_path).meta["notes"]
    assert notes == ["the upload holds 1 other series, not shown (series 4: MR, 3 image(s)); upload one series at a "
                     "time to see another"]


def test_macos_and_windows_clutter_beside_a_scan_is_ignored(tmp_path, marked_ct):
    nifti = save_nifti(tmp_path / "scan.nii.gz", marked_ct, MARKED_SPACING)
    with zipfile.ZipFile(tmp_path / "finder.zip", "w") as zipped:  # what macOS Finder's "Compress" writes
        zipped.write(nifti, "scan.nii.gz")
        zipped.writestr("__MACOSX/._scan.nii.gz", b"\x00\x05\x16\x07resource fork")
        zipped.writestr(".DS_Store", b"Bud1")
    folder = tmp_path / "usb"
    save_dicom_series(folder, marked_ct, MARKED_SPACING)
    (folder / "._IM0001.dcm").write_bytes(b"\x00\x05\x16\x07")
    (folder / "Thumbs.db").write_bytes(b"x")
    for source in (tmp_path / "finder.zip", folder):
        np.testing.assert_array_equal(load_volume(source).data, marked_ct)


def test_colour_nifti_is_refused_in_one_sentence(tmp_path, marked_ct):
    rgb = np.zeros(marked_ct.shape[::-1], dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    with pytest.raises(VolumeError, match=r"colour \(RGB\) or complex-valued voxels.*greyscale"):
        load_volume(path)


def test_notes_never_name_the_uploaded_file(tmp_path, marked_ct):
    data = marked_ct.copy()
    data[0, 0, :3] = np.nan
    scan = load_volume(save_nifti(tmp_path / "Doe_Janet_20260114.nii.gz", data, MARKED_SPACING))
    assert scan.meta["notes"] == [GUESSED_MODALITY["CT"],
                                  "3 voxels of the scan were not numbers (NaN or infinite) and are shown as -1000"]


def test_a_rescale_written_with_a_decimal_comma_still_gives_hounsfield_units(tmp_path, marked_ct):
    """Some exporters write RescaleIntercept "-1024,0": read as the default 0, every HU was 1024 too high (air at
    +24, soft tissue shown white) without a word."""
    for path in save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, intercept=-1024.0):
        stored = path.read_bytes()
        assert b"-1024.0" in stored
        path.write_bytes(stored.replace(b"-1024.0", b"-1024,0"))  # same length: the file stays valid
    np.testing.assert_array_equal(load_volume(tmp_path).data, marked_ct)


def test_a_rescale_that_cannot_be_used_is_refused_not_guessed(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, intercept=-1024.0)
    _edit(files, RescaleSlope=0)  # every value would be the intercept: a flat grey scan
    with pytest.raises(VolumeError, match=r"its RescaleSlope is '0\.0', which cannot turn its pixels into values"):
        load_volume(tmp_path)


def test_a_ct_without_rescale_is_read_as_stored_and_flagged_when_it_cannot_be_in_hu(tmp_path, marked_ct):
    """CT requires RescaleIntercept. Without it, signed values are taken as the HU they look like; values that are
    all 0 or more (raw detector numbers, air at 0 rather than −1000) are shown with a note that they are not HU, and
    their units (`info`'s "units") are not claimed to be HU."""
    for name, data in (("signed", marked_ct), ("raw", marked_ct + 1024)):
        files = save_dicom_series(tmp_path / name, data, MARKED_SPACING)
        for path in files:
            ds = pydicom.dcmread(path)
            del ds.RescaleIntercept, ds.RescaleSlope
            ds.save_as(path)
        scan = load_volume(tmp_path / name)
        np.testing.assert_array_equal(scan.data, data)
        flagged = any("likely not Hounsfield units" in note for note in scan.meta.get("notes", []))
        assert flagged == (name == "raw")
        assert scan.units == (None if name == "raw" else "HU")


def _outside_circle(shape) -> np.ndarray:
    """(Y, X) True outside the largest circle centred in an axial slice: where a CT's reconstruction stops."""
    rows, columns = shape[-2:]
    y, x = np.ogrid[:rows, :columns]
    return (y - (rows - 1) / 2) ** 2 + (x - (columns - 1) / 2) ** 2 > (min(rows, columns) / 2) ** 2


def _state_padding(files, vr: str, value: int, limit: int | None = None) -> None:
    """Write (0028,0120) PixelPaddingValue, and (0028,0121) PixelPaddingRangeLimit, with the VR a scanner chose."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, vr, value)
        if limit is not None:
            ds.add_new(0x00280121, vr, limit)
        ds.save_as(path)


@pytest.mark.parametrize("vr", ["SS", "US"])
@pytest.mark.parametrize("padding_hu", [-3024.0, 62512.0], ids=["signed", "unsigned"])
def test_a_ct_padding_ring_is_shown_as_air_not_as_an_extreme_value(tmp_path, marked_ct, padding_hu, vr):
    """A CT pads outside its reconstruction circle with -2000 (signed pixels: -3024 HU once rescaled), or with
    those bits read unsigned (63536: +62,512 HU), whichever VR the scanner wrote the padding value in. Inside
    the circle the HU stay; the ring becomes air, so windows and the 3D range span the patient only."""
    ring = _outside_circle(marked_ct.shape)
    ct = marked_ct.copy()
    ct[:, ring] = padding_hu
    files = save_dicom_series(tmp_path, ct, MARKED_SPACING, intercept=-1024.0)
    assert pydicom.dcmread(files[0]).PixelRepresentation == (padding_hu < 0)
    _state_padding(files, vr, -2000 if vr == "SS" else 63536)
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data[:, ~ring], marked_ct[:, ~ring])
    assert (scan.data[:, ring] == -1000.0).all()  # the lowest HU inside the circle: air
    low, high = window_range(scan, "auto")
    assert -1000.0 <= low < high <= 1000.0
    low, high, _ = threshold_range(scan)
    assert -1000.0 <= low < high <= 1000.0
    assert scan.meta["padding_voxels"] == ring.sum() * len(files) and "notes" not in scan.meta


@pytest.mark.parametrize(("bits", "signed", "vr", "written", "padding"), [
    (16, True, "US", 63536, -2000), (16, False, "SS", -2000, 63536), (8, True, "US", 255, -1),
    (8, False, "US", 255, 255), (32, True, "US", 63536, -2000), (32, False, "US", 63536, 63536)])
def test_the_padding_value_is_read_as_the_pixels_are_stored(bits, signed, vr, written, padding):
    """(0028,0120) is US or SS, 16 bits at most, whatever the pixels: its bits are read again as the pixels are
    (signed or not; 8-bit pixels in 8 bits), so a signed CT's -2000 written as US 63536 is still -2000."""
    from pydicom.dataset import Dataset

    from medvlm.dicom import _padding_range

    header = Dataset()
    header.BitsAllocated, header.PixelRepresentation = bits, int(signed)
    header.add_new(0x00280120, vr, written)
    assert _padding_range(header) == (padding, padding)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_an_mr_padded_with_a_large_value_keeps_its_auto_window_and_3d_surface(tmp_path, marked_ct, photometric):
    """An MR padded with 65535: the auto window and the 3D view's Otsu surface stay on the head (between
    background at 40 and tissue near 1000) instead of the padding; MONOCHROME1 (padding is its black) too."""
    ring = _outside_circle(marked_ct.shape)
    mr = marked_ct + 1040.0  # background 40, tissue about 1000, bright markers 2040
    stored = mr.copy()
    if photometric == "MONOCHROME1":
        stored = mr.max() + mr.min() - mr
    stored[:, ring] = 65535.0
    files = save_dicom_series(tmp_path, stored, MARKED_SPACING, "MR")
    _edit(files, PhotometricInterpretation=photometric)
    _state_padding(files, "US", 65535)
    scan = load_volume(tmp_path)
    inside = mr[:, ~ring]
    if photometric == "MONOCHROME1":
        inside = stored[:, ~ring].max() + stored[:, ~ring].min() - stored[:, ~ring]
    np.testing.assert_array_equal(scan.data[:, ~ring], inside)
    assert (scan.data[:, ring] == inside.min()).all()  # black, whichever way the series stores it
    assert window_range(scan, "auto")[1] <= inside.max()
    assert 40.0 < default_threshold(scan) < 1000.0


def test_a_padding_range_covers_both_its_limits_and_nothing_beyond(tmp_path, marked_ct):
    """(0028,0121) PixelPaddingRangeLimit: every stored value from PixelPaddingValue to it, both included, is
    padding (background noise outside the body); a bright voxel one below the range is kept."""
    ring = _outside_circle(marked_ct.shape)
    mr = marked_ct + 1040.0
    mr[3, 10, 12] = 3999.0  # real, just below the range
    noise = np.random.default_rng(5).integers(4000, 4096, size=(len(mr), int(ring.sum()))).astype(np.float32)
    noise[0, :2] = 4000.0, 4095.0
    mr[:, ring] = noise
    _state_padding(save_dicom_series(tmp_path, mr, MARKED_SPACING, "MR"), "US", 4000, 4095)
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data[:, ~ring], mr[:, ~ring])
    assert (scan.data[:, ring] == 40.0).all() and scan.data.max() == 3999.0


def test_padding_stated_by_some_files_of_a_series_is_padding_in_all(tmp_path, marked_ct):
    """Some exports keep PixelPaddingValue in only some of a series' files: it describes the equipment that
    made the series (General Equipment Module), so the ring of every slice is air, not only of those files."""
    ring = _outside_circle(marked_ct.shape)
    ct = marked_ct.copy()
    ct[:, ring] = -3024.0
    files = save_dicom_series(tmp_path, ct, MARKED_SPACING, intercept=-1024.0)
    _state_padding(files[::2], "SS", -2000)
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data[:, ~ring], marked_ct[:, ~ring])
    assert scan.data.min() == -1000.0


def test_a_series_whose_every_pixel_is_padding_is_refused_not_shown_blank(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path, marked_ct + 1040.0, MARKED_SPACING, "MR")
    _state_padding(files, "US", 0, 65535)  # a range that leaves no patient data
    with pytest.raises(VolumeError, match="every pixel of the series is marked as padding"):
        load_volume(tmp_path)


def test_an_oblique_acquisition_says_its_planes_are_the_nearest_ones(tmp_path, marked_ct):
    """An MR tilted 40° about left–right (an AC-PC aligned brain, a spine) is shown along its own axes: the
    views' plane names and side letters are the nearest ones, and the scan card says so."""
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, "MR")
    tilt = math.radians(40.0)
    rows, columns = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    normal = np.cross(rows, columns)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [*rows, *columns]
        ds.ImagePositionPatient = list(normal * float(ds.ImagePositionPatient[2]))
        ds.save_as(path)
    scan = load_volume(tmp_path)
    assert scan.meta["obliquity_degrees"] == pytest.approx(40.0, abs=0.1)
    assert any("at an angle to the body's axes (up to 40°)" in note for note in scan.meta["notes"])
    straight = load_volume(save_dicom_series(tmp_path / "straight", marked_ct, MARKED_SPACING, "MR")[0].parent)
    assert "obliquity_degrees" not in straight.meta and "notes" not in straight.meta


def test_a_nifti_that_states_no_orientation_or_two_says_its_sides_are_in_doubt(tmp_path, marked_ct):
    """qform_code = sform_code = 0: nibabel falls back on Analyze's LAS, and other tools read such a file
    mirrored; a qform and sform that disagree are read by the sform, where some tools take the qform."""
    data = marked_ct.transpose(2, 1, 0)  # stored (x, y, z)
    unstated = nib.Nifti1Image(data, np.diag([*MARKED_SPACING[::-1], 1.0]))
    unstated.set_sform(None, code=0)
    unstated.set_qform(None, code=0)
    nib.save(unstated, tmp_path / "unstated.nii")
    scan = load_volume(tmp_path / "unstated.nii")
    assert scan.meta["orientation_unknown"] and scan.orientation == "LAS"
    assert any("states no orientation" in note and "its sides may be swapped (left and right, front and back" in note
               for note in scan.meta["notes"])
    two = nib.Nifti1Image(data, None)
    two.set_qform(np.diag([-MARKED_SPACING[2], *MARKED_SPACING[1::-1], 1.0]), code=1)  # LAS
    two.set_sform(np.diag([*MARKED_SPACING[::-1], 1.0]), code=1)  # RAS
    nib.save(two, tmp_path / "two.nii")
    scan = load_volume(tmp_path / "two.nii")
    assert scan.orientation == "RAS" and "orientation_unknown" not in scan.meta
    assert any("two orientations disagree (qform LAS, sform RAS)" in note for note in scan.meta["notes"])
    bad_quaternion = nib.Nifti1Image(data, np.diag([*MARKED_SPACING[::-1], 1.0]))
    bad_quaternion.header["qform_code"] = 1
    for name in ("quatern_b", "quatern_c", "quatern_d"):  # b² + c² + d² > 1: nibabel cannot read the qform
        bad_quaternion.header[name] = 0.8
    nib.save(bad_quaternion, tmp_path / "bad_quaternion.nii")
    scan = load_volume(tmp_path / "bad_quaternion.nii")  # read by its sform, as before, not a traceback
    assert scan.orientation == "RAS" and any("qform cannot be read" in note for note in scan.meta["notes"])
    save_nifti(tmp_path / "stated.nii.gz", marked_ct, MARKED_SPACING, "LPS", modality="CT")
    assert "notes" not in load_volume(tmp_path / "stated.nii.gz").meta


def test_each_image_of_a_pet_series_is_rescaled_by_its_own_slope_and_intercept(tmp_path):
    """A PET scanner chooses RescaleSlope per image, so that each slice's activity fills the 16 bits: every value
    is its stored pixel times its own image's slope (and plus its own intercept), never the first image's."""
    stored = np.random.default_rng(3).integers(0, 4000, size=(6, 10, 12)).astype(np.float32)
    slopes = 0.25 * np.arange(1, len(stored) + 1)  # binary fractions: exact in float32
    intercepts = -2.0 * np.arange(len(stored))
    files = save_dicom_series(tmp_path, stored, MARKED_SPACING, "PT")  # slope 1: the pixels are `stored`
    for path, slope, intercept in zip(files, slopes, intercepts, strict=True):
        _edit([path], RescaleSlope=float(slope), RescaleIntercept=float(intercept))
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, stored * slopes[:, None, None] + intercepts[:, None, None])


def _orientation(row_to_column_degrees: float) -> list[float]:
    """ImageOrientationPatient of axial rows (toward the patient's left) whose columns lie at this angle to them."""
    angle = math.radians(row_to_column_degrees)
    return [1.0, 0.0, 0.0, round(math.cos(angle), 6), round(math.sin(angle), 6), 0.0]


NO_GEOMETRY = "images without ImagePositionPatient or ImageOrientationPatient, so they cannot be stacked"
NOT_PERPENDICULAR = r"ImageOrientationPatient whose row and column directions are {}° apart, not perpendicular \(within"


@pytest.mark.parametrize(("keyword", "value", "said"), [
    ("ImagePositionPatient", None, NO_GEOMETRY),
    ("ImageOrientationPatient", None, NO_GEOMETRY),
    ("ImageOrientationPatient", _orientation(0.0), NOT_PERPENDICULAR.format("0.0")),
    ("ImageOrientationPatient", _orientation(10.0), NOT_PERPENDICULAR.format("10.0")),
    ("ImageOrientationPatient", _orientation(45.0), NOT_PERPENDICULAR.format("45.0")),
], ids=["no-position", "no-orientation", "parallel-directions", "directions-10-degrees-apart",
        "directions-45-degrees-apart"])
def test_images_whose_geometry_cannot_place_them_are_refused_in_one_sentence(tmp_path, marked_ct, keyword, value,
                                                                             said):
    """One image of the series without a position or an orientation (value None: the attribute left out), or with
    row and column directions that are no plane's, cannot be put in a volume: refused, saying which attribute is
    wrong and what to do."""
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING)
    ds = pydicom.dcmread(files[3])
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    ds.save_as(files[3])
    with pytest.raises(VolumeError, match=said) as refused:
        load_volume(tmp_path)
    what_was_wrong, what_to_do = str(refused.value).split("; ")
    assert "\n" not in what_was_wrong + what_to_do and "export" in what_to_do


def test_directions_a_rounding_off_a_right_angle_still_load(tmp_path, marked_ct):
    """Exporters round the direction cosines (to 6 digits, some to 4): row and column directions a few hundredths of
    a degree off a right angle are still one plane, loaded as the series was acquired."""
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING)
    _edit(files, ImageOrientationPatient=[round(value, 4) for value in _orientation(89.97)])
    scan = load_volume(tmp_path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    np.testing.assert_allclose(scan.spacing, MARKED_SPACING, rtol=1e-3)
