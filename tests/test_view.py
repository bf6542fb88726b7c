"""render_slice shows a slice as a radiology viewer does: patient's right on the image's left, square pixels."""

import re

import numpy as np
import pydicom
import pytest
from conftest import MARKED_SPACING
from PIL import Image

from medvlm.errors import UserInputError
from medvlm.view import render_slice, save_png, slice_count, slice_location, spot_position, window_limits
from medvlm.view_html import slice_view_html, typed_window_note, window_box_label, window_label
from medvlm.volume import Volume, load_volume
from medvlm.writers import save_dicom_series

WHITE = 200  # bone markers (1000 HU) are white in the soft-tissue window; tissue is mid grey, air black


def _volume(data, spacing=MARKED_SPACING, modality="CT"):
    return Volume(data=data, spacing=spacing, affine=np.eye(4), modality=modality, source="nifti",
                  orientation="RAS")


def test_axial_shows_the_patients_right_on_the_left_and_anterior_at_the_top(tmp_path, marked_ct):
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, intercept=-1024, file_names="shuffled")
    image = render_slice(load_volume(tmp_path), "axial")
    height, width = image.shape
    right_marker_rows = image[height // 2 - 1: height // 2 + 1]
    assert right_marker_rows[:, :3].min() > WHITE  # the right-side marker: image's left edge
    assert right_marker_rows[:, width // 2:].max() < WHITE
    assert image[0, width // 2 - 1: width // 2 + 1].min() > WHITE  # the anterior marker: top row
    assert image[-1].max() == 0  # the air behind the patient: bottom row


def test_a_slice_is_located_in_the_patient_as_the_scanner_placed_it(tmp_path, marked_ct):
    """The table position a radiologist reads off a slice: the DICOM z of its ImagePositionPatient (superior
    positive), and for the other planes the side the slice lies toward."""
    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, file_names="shuffled")
    for path in files:  # the series from z = -112.5 mm (inferior) upward, 2.5 mm apart
        ds = pydicom.dcmread(path)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -112.5 + 2.5 * (int(ds.InstanceNumber) - 1)]
        ds.save_as(path)
    scan = load_volume(tmp_path)
    assert slice_location(scan, "axial", 0) == "I 112.5 mm, 2.50 mm apart"
    assert slice_location(scan, "axial", 7) == "I 95.0 mm, 2.50 mm apart"
    left, right = slice_location(scan, "sagittal", 0), slice_location(scan, "sagittal", scan.shape[2] - 1)
    assert left.startswith("L ") and right.startswith("R ") and left.endswith("0.70 mm apart")
    assert slice_location(scan, "coronal", 0).startswith("P ")  # coronal slices count from posterior
    npy = tmp_path / "scan.npy"
    np.save(npy, np.zeros((1, 4, 8, 8), np.float32) + np.arange(4, dtype=np.float32)[None, :, None, None] / 4)
    assert slice_location(load_volume(npy), "axial", 0) == ""  # M3D keeps no spacing: no position to give
    scan.meta["orientation_unknown"] = True  # a NIfTI that states no orientation: no side to name
    assert slice_location(scan, "sagittal", 0) == ""


def test_coronal_shows_superior_at_the_top_and_the_right_on_the_left(marked_ct):
    image = render_slice(_volume(marked_ct), "coronal", index=10)
    width = image.shape[1]
    assert image[:, :3].min() > WHITE  # the right-side marker runs along the left edge
    assert image[0, width // 2:].min() > WHITE  # the superior cap over the patient's left: top right
    assert image[-1, width // 2:].max() < WHITE


def test_sagittal_shows_anterior_on_the_left_and_superior_at_the_top(marked_ct):
    through_anterior_marker = render_slice(_volume(marked_ct), "sagittal", index=12)
    assert through_anterior_marker[:, 0].min() > WHITE
    assert through_anterior_marker[:, -1].max() == 0  # air behind the patient on the right
    through_cap = render_slice(_volume(marked_ct), "sagittal", index=5)
    assert through_cap[0, 5:-5].min() > WHITE and through_cap[-1, 5:-5].max() < WHITE


def test_slices_count_from_inferior_posterior_and_the_patients_left(tmp_path, marked_ct):
    """The viewer's caption says where slice 1 is (view.SLICE_ONE): the last slice of each plane is the other
    end, through the superior cap, the anterior marker and the right-side marker."""
    save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, intercept=-1024, file_names="shuffled")
    volume = load_volume(tmp_path)
    last = {plane: slice_count(volume, plane) - 1 for plane in ("axial", "coronal", "sagittal")}
    assert np.median(render_slice(volume, "axial", last["axial"])) > WHITE  # the cap covers half the last slice
    assert np.median(render_slice(volume, "axial", 0)) < WHITE
    for plane in ("coronal", "sagittal"):  # the marker runs head to foot: a white column in the far end's slice
        first, end = (render_slice(volume, plane, index) for index in (0, last[plane]))
        assert (end > WHITE).all(axis=0).any() and not (first > WHITE).all(axis=0).any(), plane


def test_pixels_are_square_in_millimetres():
    volume = _volume(np.zeros((6, 16, 16), dtype=np.float32), spacing=(5.0, 0.5, 0.5))
    assert render_slice(volume, "coronal").shape == (60, 16)  # 10 rows per 5 mm slice, not 1
    assert render_slice(volume, "sagittal").shape == (60, 16)
    assert render_slice(volume, "axial").shape == (16, 16)
    assert [slice_count(volume, plane) for plane in ("axial", "coronal", "sagittal")] == [6, 16, 16]


def test_middle_slice_by_default_and_out_of_range_names_the_range(marked_ct):
    volume = _volume(marked_ct)
    np.testing.assert_array_equal(render_slice(volume, "axial"), render_slice(volume, "axial", 4))
    with pytest.raises(UserInputError, match="0 to 7"):
        render_slice(volume, "axial", 8)
    with pytest.raises(UserInputError, match="auto"):
        render_slice(_volume(marked_ct, modality="MR"), "axial", window="lung")
    with pytest.raises(UserInputError, match="axial, coronal, sagittal"):
        render_slice(volume, "oblique")


def test_windows_change_the_picture(marked_ct):
    volume = _volume(marked_ct)
    soft, bone = render_slice(volume, "axial", window="soft tissue"), render_slice(volume, "axial", window="bone")
    assert soft.mean() > bone.mean()  # soft tissue is mid grey in its own window, near black in bone's
    mr = render_slice(_volume(marked_ct, modality="MR"), "axial")
    assert mr.dtype == np.uint8 and mr.max() == 255


def test_pet_inverted_shows_uptake_dark_on_white():
    data = np.zeros((5, 32, 32), np.float32)
    data[:, 4:28, 4:28] = 1.0  # body, background uptake
    data[2, 14:18, 14:18] = 8.0  # a hot spot
    pet = _volume(data, spacing=(4.0, 4.0, 4.0), modality="PT")
    auto, inverted = render_slice(pet, "axial", 2), render_slice(pet, "axial", 2, window="inverted")
    spot, air = (slice(14, 18), slice(14, 18)), (slice(0, 2), slice(0, 2))
    assert auto[spot].min() == 255 and auto[air].max() == 0
    assert inverted[spot].max() == 0 and inverted[air].min() == 255
    assert np.array_equal(inverted, 255 - auto)
    with pytest.raises(UserInputError, match="unknown window 'inverted' for this CT scan"):
        render_slice(_volume(data), "axial", window="inverted")


def test_a_window_typed_as_width_and_level_shows_those_values(marked_ct):
    """A radiologist's own window, typed as width/level (in HU for a CT, in the scan's units for an MR): "400/40"
    is the soft-tissue preset to the pixel; on an MR, values below level − width/2 are black and above it plus
    width/2 white; a width of 0, or words, are refused with a sentence."""
    ct = _volume(marked_ct)
    assert np.array_equal(render_slice(ct, "axial", window="400/40"), render_slice(ct, "axial", window="soft tissue"))
    assert np.array_equal(render_slice(ct, "axial", window="W 1500 / L -600"), render_slice(ct, "axial",
                                                                                            window="lung"))
    data = np.zeros((3, 8, 8), np.float32)
    data[:, :, :4], data[:, :, 4:6], data[:, :, 6:] = 100.0, 200.0, 300.0
    mr = render_slice(_volume(data, spacing=(1.0, 1.0, 1.0), modality="MR"), "axial", window="100/200")
    # columns are shown right to left (the patient's right on the viewer's left): x 0–3 are the last four
    assert (mr[:, 4:] == 0).all() and (mr[:, :2] == 255).all() and (mr[:, 2:4] == 128).all()
    assert np.array_equal(render_slice(ct, "axial", window="W 1500 / L −600"),  # as the app's caption prints it
                          render_slice(ct, "axial", window="lung"))
    lung = render_slice(ct, "axial", window="lung")
    # as radiologists also write it: spaces for the slash, labels in either order (Siemens' C for the level)
    for written in ("1500 -600", "1500/-600", "W 1500 L -600", "WW 1500 WL -600", "L -600 W 1500", "C -600 / W 1500"):
        assert np.array_equal(render_slice(ct, "axial", window=written), lung), written
    # no width of nothing (0, or one too small to divide by) and no width or level past any scan's values
    with pytest.raises(UserInputError, match="unknown window 'wide' for this PET scan; choose one of auto, inverted"):
        render_slice(_volume(data, spacing=(1.0, 1.0, 1.0), modality="PT"), "axial", window="wide")  # as a reader says
    assert np.array_equal(render_slice(ct, "axial", window="W 1 L 500"), render_slice(ct, "axial", window="1/500"))
    # ... or as the range it shows from black to white, lowest first, as nuclear medicine sets a PET's scale
    soft = render_slice(ct, "axial", window="soft tissue")  # W 400 / L 40: −160 to 240 HU
    for written in ("-160-240", "-160 to 240", "−160–240", " -160 - 240 "):
        assert np.array_equal(render_slice(ct, "axial", window=written), soft), written
    pet = _volume(data, spacing=(1.0, 1.0, 1.0), modality="PT")
    upright, inverted = render_slice(pet, "axial", window="150-250"), render_slice(pet, "axial", window="150-250 inv")
    assert (upright[:, 4:] == 0).all() and (upright[:, :2] == 255).all()  # 100 black, 300 white
    assert (inverted[:, 4:] == 255).all() and (inverted[:, :2] == 0).all()  # "inverted": the highest black
    assert np.array_equal(inverted, render_slice(pet, "axial", window="100/200 inverted"))
    assert window_label("0-6 inverted") == "typed · 0 to 6 inverted"
    assert window_label("350/50") == "typed · W 350 / L 50"
    # "1 500" may be a width of 1500 written with a thousands space, or width 1 and level 500: refused, not guessed,
    # and the refusal says why; "800 200" is a width and a level. In "-160 -40" the hyphen is a sign: no range.
    for junk in ("0/40", "0.000000001/1000000000", "9" * 400 + "/50", "400/" + "9" * 40, "wide", "40", "L 40",
                 "40 W 400", "400/40/10", "1 500", "W 1 500", "12 000", "2\u202f000", "1\xa0500", "1  500", "240-160",
                 "0-6-9", "inverted", "0-0", "-160 -40"):
        with pytest.raises(UserInputError, match="or a width/level such as 350/50"):
            render_slice(ct, "axial", window=junk)
    # ... and where it was typed as a window, the refusal says what was wrong with it
    for typed, why in (("1 500", "one number with a thousands space, or a width and a level? type the width/level "
                                 "with a slash"),
                       ("0/40", "its width must be at least 0.001"), ("40", "a width/level takes two numbers"),
                       ("240-160", "a range goes from the lowest value to the highest"),
                       ("400/" + "9" * 40, "no scan's values lie more than 1,000,000 from 0")):
        with pytest.raises(UserInputError, match=re.escape(f"({why}) for this CT scan")):
            render_slice(ct, "axial", window=typed)
    assert np.array_equal(render_slice(ct, "axial", window="800 200"), render_slice(ct, "axial", window="800/200"))
    assert np.array_equal(render_slice(ct, "axial", window="-160 - -40"), render_slice(ct, "axial", window="120/-100"))


def test_what_to_type_for_a_window_is_a_range_of_the_scans_own_values():
    """An M3D .npy's values run 0 to 1, a PET's in Bq/mL to thousands: the advice is a range of the scan's own values
    (rounded), which typed in shows the scan; a CT's is a width/level in HU."""
    data = np.zeros((3, 16, 16), np.float32)
    data[:, 4:12, 4:12] = np.linspace(0.05, 0.97, 64, dtype=np.float32).reshape(8, 8)
    m3d = _volume(data, spacing=(1.0, 1.0, 1.0), modality="OT")
    with pytest.raises(UserInputError, match=r"for this scan \(modality: other\); choose one of auto, or a range "
                                             r"such as 0-1, or a width/level such as 1/0.5"):
        render_slice(m3d, "axial", window="wide")
    assert window_box_label("OT", window_limits(m3d, "auto")) == "Window (or type a range: 0-1)"
    assert typed_window_note(m3d, "0-1") == "" and render_slice(m3d, "axial", window="0-1").max() > 200
    becquerels = _volume(data * 20_000, spacing=(2.0, 2.0, 2.0), modality="PT")
    assert window_box_label("PT", window_limits(becquerels, "auto")) == "Window (or type a range: 0-20000 inverted)"
    assert window_box_label("CT") == "Window (or type W/L: 350/50)"
    # no advice the box would refuse: values too small for a typed window get the usual example
    tiny = _volume(data * 1e-6, spacing=(1.0, 1.0, 1.0), modality="MR")
    assert window_box_label("MR", window_limits(tiny, "auto")) == "Window (or type a range: 100-800)"


def test_a_typed_window_that_shows_the_scan_flat_says_so_and_what_would_show_it():
    """350/50 typed on a PET whose uptake runs 0 to 6 draws a flat grey square: the viewer says where the scan's values
    lie and offers a range that shows them; a window that misses them altogether too; one that fits says nothing."""
    data = np.zeros((3, 16, 16), np.float32)
    data[:, 4:12, 4:12] = 6.0  # uptake up to SUV 6 in air of 0
    pet = _volume(data, spacing=(2.0, 2.0, 2.0), modality="PT")
    assert "shows them in a few greys; try the range 0-6" in typed_window_note(pet, "350/50")
    assert "shows them all in one grey" in typed_window_note(pet, "100-200")
    assert typed_window_note(pet, "0-6 inverted") == typed_window_note(pet, "auto") == ""


def test_a_512_axial_slice_shows_its_own_slice_one_pixel_per_voxel():
    """A clinical 512 × 512 CT (how fast it renders is `python -m medvlm bench`'s slice_render_ms): each slice
    index shows that slice, at full size, unresampled."""
    data = np.full((40, 512, 512), 40.0, np.float32)  # soft tissue
    for index in range(10):
        data[index, 10 * index:10 * index + 4, 300:304] = 1000.0  # a bone marker of 4 × 4 voxels, its own place
    volume = _volume(data, (1.0, 0.7, 0.7))
    for index in range(10):
        image = render_slice(volume, "axial", index)
        assert image.dtype == np.uint8 and image.shape == (512, 512)
        rows, columns = np.nonzero(image >= WHITE)  # flipped: anterior at the top, the patient's right on the left
        assert sorted(set(rows)) == list(range(508 - 10 * index, 512 - 10 * index)), index
        assert sorted(set(columns)) == list(range(208, 212)) and len(rows) == 16, index


def test_save_png_writes_the_image(tmp_path, marked_ct):
    image = render_slice(_volume(marked_ct), "axial")
    np.testing.assert_array_equal(np.asarray(Image.open(save_png(image, tmp_path / "slice.png"))), image)
    with pytest.raises(UserInputError, match="does not exist"):
        save_png(image, tmp_path / "missing" / "slice.png")


def test_the_rulers_pixel_size_is_the_slices_true_size_in_both_directions(marked_ct):
    """The viewer's ruler measures with `data-mm-per-pixel`: across and down each plane's image (and a MIP frame)
    it adds up to the scan's extent in mm; a scan of unknown spacing gives none, so the ruler cannot claim mm."""
    import re

    from medvlm.view_html import slice_view_html

    volume = _volume(marked_ct)  # (Z, Y, X) = (8, 20, 24) voxels of (2.5, 0.8, 0.7) mm
    extents = {"axial": (20 * 0.8, 24 * 0.7), "coronal": (8 * 2.5, 24 * 0.7), "sagittal": (8 * 2.5, 20 * 0.8)}
    for plane, (height_mm, width_mm) in extents.items():
        html = slice_view_html(volume, plane, 3, "soft tissue", [])
        mm = float(re.search(r'data-mm-per-pixel="([0-9.e-]+)"', html).group(1))
        rows, columns = render_slice(volume, plane, 3, "soft tissue").shape
        assert columns * mm == pytest.approx(width_mm, rel=1e-3), plane
        assert rows * mm == pytest.approx(height_mm, abs=mm), plane  # square pixels, to within one
    pet = _volume(marked_ct, modality="PT")
    mip = slice_view_html(pet, "mip", 9, "auto", [])  # as wide as the grid's larger side: 24 × 0.7 = 16.8 mm
    mm = float(re.search(r'data-mm-per-pixel="([0-9.e-]+)"', mip).group(1))
    assert render_slice(pet, "mip", 9, "auto").shape[1] * mm == pytest.approx(16.8, rel=0.05)
    volume.meta["spacing_known"] = False  # an M3D .npy: its voxels are drawn as 1 mm, not measured
    assert "data-mm-per-pixel" not in slice_view_html(volume, "axial", 3, "soft tissue", [])


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal", "mip"])
def test_a_spot_is_marked_where_the_image_shows_its_voxel(plane):
    """The cross-hair of a spot found from the MIP sits on its voxel in each plane's image (flipped to the
    radiological convention, stretched to square pixels) and in a MIP frame; a slice that misses it has none."""
    data = np.zeros((10, 20, 30), np.float32)
    voxel = (3, 15, 5)  # inferior, anterior, toward the patient's left
    data[voxel] = 9.0
    pet = _volume(data, spacing=(4.0, 2.0, 1.5), modality="PT")
    index = {"axial": 3, "coronal": 15, "sagittal": 5, "mip": 4}[plane]
    image = render_slice(pet, plane, index, "auto")
    down, across = spot_position(pet, plane, index, voxel)
    row, column = np.unravel_index(np.argmax(image), image.shape)
    assert abs(down * image.shape[0] - (row + 0.5)) <= 1 and abs(across * image.shape[1] - (column + 0.5)) <= 1
    if plane != "mip":
        assert spot_position(pet, plane, index + 1, voxel) is None


def test_units_from_the_file_stay_text_in_the_images_spoken_description():
    """A PET series' Units come from its header: a quote in them ends no attribute of the slice image."""
    data = np.ones((10, 20, 30), np.float32)
    data[3, 15, 5] = 9.0
    pet = _volume(data, spacing=(4.0, 2.0, 1.5), modality="PT")
    pet.meta["units"] = 'BQML" onload="alert(1)'
    image = re.search(r"<img [^>]*>", slice_view_html(pet, "axial", 3, "auto", [], (3, 15, 5))).group(0)
    assert 'onload="' not in image and "the spot found from the MIP, 9 BQML&quot; onload=&quot;alert(1" in image


def test_a_scan_that_states_no_orientation_shows_its_sides_in_doubt(tmp_path, marked_ct):
    """An M3D .npy holds voxels alone, and a NIfTI with qform and sform codes 0 states no orientation: both are shown
    as read (axial, radiologically), but the side letters on the slices and the 3D view carry a "?" and the card
    says so. The .npy's card said "LPS as stored" and its slices bore plain R and L, where a sagittal M3D stack
    showed as an axial slice with side letters: the classic wrong-side risk."""
    import nibabel as nib

    from medvlm.view3d import figure_3d
    from medvlm.view_html import scan_card

    np.save(tmp_path / "m3d.npy", marked_ct[None] / 1000.0)
    unstated = nib.Nifti1Image(marked_ct.transpose(2, 1, 0), np.diag([*MARKED_SPACING[::-1], 1.0]))
    unstated.set_sform(None, code=0)
    unstated.set_qform(None, code=0)
    nib.save(unstated, tmp_path / "unstated.nii")
    for name, orientation in (("m3d.npy", "not stored in an .npy: read as axial slices"),
                              ("unstated.nii", "not stated (read as LAS)")):
        scan = load_volume(tmp_path / name)
        assert orientation in scan_card(scan) and "sides in doubt" in scan_card(scan)
        for plane, letters in (("axial", "RLAP"), ("coronal", "RLSI"), ("sagittal", "APSI")):
            edges = re.findall(r'class="edge edge-\w+">([^<]*)<', slice_view_html(scan, plane, 3, "auto", []))
            assert edges == [f"{letter}?" for letter in letters], (name, plane)
        assert "Axial 4 / 8 ·" in slice_view_html(scan, "axial", 3, "auto", [])  # not "from inferior", unknown
        labels = [note["text"] for note in figure_3d(scan).layout.scene.annotations]
        assert labels and all(label.endswith("?</b>") for label in labels), name
    stated = load_volume(save_dicom_series(tmp_path / "series", marked_ct, MARKED_SPACING, "CT")[0].parent)
    edges = re.findall(r'class="edge edge-\w+">([^<]*)<', slice_view_html(stated, "axial", 3, "auto", []))
    assert edges == list("RLAP") and "Axial 4 / 8 from inferior ·" in slice_view_html(stated, "axial", 3, "auto", [])
    assert "as stored, shown radiologically" in scan_card(stated) and "in doubt" not in scan_card(stated)


@pytest.mark.parametrize(("center", "width", "opens"), [
    ([40.0, 300.0], [80.0, 1500.0], "brain"),  # a head CT's BRAIN\BONE: the first is the one suggested
    (-500.0, 1400.0, "lung"), (50.0, 350.0, "soft tissue"), (450.0, 2000.0, "bone"), (1000.0, 4000.0, "soft tissue"),
])
def test_a_ct_opens_in_the_preset_nearest_the_window_its_header_suggests(tmp_path, marked_ct, center, width, opens):
    """(0028,1050/1051): a head CT whose header suggests W 80 / L 40 opens in the brain window, where a subtle bleed
    shows; it opened in soft tissue (W 400), a flat grey brain. A window near no preset opens in soft tissue."""
    from medvlm.view import opening_window

    files = save_dicom_series(tmp_path, marked_ct, MARKED_SPACING, "CT")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth = center, width
        ds.save_as(path)
    scan = load_volume(tmp_path)
    assert opening_window(scan, "axial") == opening_window(scan, "coronal") == opens
    assert opening_window(scan.as_modality("MR"), "axial") == "auto"  # read as another modality: its own default


def test_the_card_gives_an_overlapping_reconstructions_thickness_and_how_the_patient_lay(tmp_path, marked_ct):
    """5 mm slices every 2.5 mm read as 2.5 mm slices where the card gave the spacing alone; a prone patient's images
    are shown anterior up, as every scan's are, where a PACS shows them as acquired: the card says both."""
    from medvlm.view_html import scan_card

    def card_of(folder: str, thickness_mm: float, position: str) -> str:
        for path in save_dicom_series(tmp_path / folder, marked_ct, (2.5, 0.7, 0.7), "CT"):
            ds = pydicom.dcmread(path)
            ds.SliceThickness, ds.PatientPosition = thickness_mm, position
            ds.save_as(path)
        return scan_card(load_volume(tmp_path / folder))

    card = card_of("prone", 5.0, "HFP")
    assert "| 0.70 × 0.70 mm in-plane, 2.50 mm between slices, each 5.00 mm thick |" in card
    assert "| **Patient** | prone, head first (shown as any scan is, anterior up) |" in card
    card = card_of("supine", 2.5, "HFS")
    assert "| 0.70 × 0.70 mm in-plane, 2.50 mm between slices |" in card and "| supine, head first |" in card


def test_a_point_clicked_on_a_slice_image_is_the_voxel_drawn_there():
    """`plane_point` undoes `spot_position` for every voxel of every plane (the radiological flips, anisotropic
    pixels drawn square), and a click anywhere within a voxel's pixels finds that voxel."""
    from medvlm.view import plane_point

    volume = Volume(np.zeros((5, 6, 7), np.float32), (3.0, 0.8, 1.1), np.eye(4), "CT", "nifti", "LPS")
    for z in range(5):
        for y in range(6):
            for x in range(7):
                for plane, index in (("axial", z), ("coronal", y), ("sagittal", x)):
                    down, across = spot_position(volume, plane, index, (z, y, x))
                    assert plane_point(volume, plane, index, down, across) == (z, y, x), plane
                    image = render_slice(volume, plane, index, "soft tissue")  # a click 0.4 of a pixel off
                    nudged = (down + 0.4 / image.shape[0], across - 0.4 / image.shape[1])
                    assert plane_point(volume, plane, index, *nudged) == (z, y, x), plane
