"""The rotating MIP shows a PET as nuclear medicine reads it: the brightest value along each line of sight, seen
from the front first, then turning toward the patient's left, in the body's true proportions."""

import numpy as np
import pytest

from medvlm.errors import UserInputError
from medvlm.projection import MIP_FRAMES, mip_edges, mip_image, mip_point, mip_seen_from, mip_voxel
from medvlm.view import render_slice, slice_count, slice_location
from medvlm.volume import Volume

SPACING = (4.0, 3.0, 2.0)  # (z, y, x) mm: each axis its own, so a swapped one shows
HOT = 10.0


def _pet(shape=(30, 40, 50)) -> Volume:
    """Uptake 1 everywhere and a hot cube (HOT) toward the patient's right (high x), anterior (high y) and
    superior (high z): centre voxel (z 23, y 31, x 39)."""
    data = np.ones(shape, np.float32)
    data[22:25, 30:33, 38:41] = HOT
    return Volume(data=data, spacing=SPACING, affine=np.diag([*SPACING[::-1], 1.0]), modality="PT", source="nifti",
                  orientation="RAS")


def _hot_spot(image: np.ndarray) -> tuple[int, float]:
    """The hot cube's (row, mean column) in a MIP frame."""
    rows, columns = np.nonzero(image == HOT)
    assert len(set(rows)) == 3  # three 4 mm slices, seen from any side
    return int(np.median(rows)), float(columns.mean())


def test_each_frame_shows_the_hot_spot_where_that_point_of_view_puts_it():
    """From the front the patient's right is on the image's left; from the patient's left, anterior is; from
    behind and from the right, the other way round. Distances from the image's centre are the spot's in mm."""
    pet = _pet()
    right_of_centre = (39 - 24.5) * 2.0  # mm toward the patient's right
    anterior_of_centre = (31 - 19.5) * 3.0  # mm toward anterior
    for frame, expected in ((0, -right_of_centre), (9, -anterior_of_centre), (18, right_of_centre),
                            (27, anterior_of_centre)):
        image, row_mm, column_mm = mip_image(pet, frame)
        assert image.max() == HOT and image.shape[0] == 30 and row_mm == 4.0
        row, column = _hot_spot(image)
        assert row == 30 - 1 - 23  # superior at the top
        offset = (column - (image.shape[1] - 1) / 2) * column_mm  # mm right of the image's centre
        assert offset == pytest.approx(expected, abs=column_mm), frame


def test_the_image_keeps_the_bodys_proportions_and_stays_still_while_it_turns():
    pet = _pet()
    shapes = {render_slice(pet, "mip", frame, "auto").shape for frame in range(MIP_FRAMES)}
    assert len(shapes) == 1  # every frame the same size: the image turns in place
    (height, width), = shapes
    assert height / width == pytest.approx((30 * 4.0) / (40 * 3.0), rel=0.05)  # 120 mm tall, 120 mm wide


def test_lines_of_sight_that_miss_the_body_show_its_lowest_value():
    """A flat grid (10 mm deep, 100 mm wide) seen from the side fills the middle of the image only."""
    slab = _pet((30, 10, 50)).data
    slab[:, :, :] = 5.0
    image, _, column_mm = mip_image(Volume(data=slab, spacing=(4.0, 1.0, 2.0), affine=np.eye(4), modality="PT",
                                           source="nifti", orientation="RAS"), 9)
    middle = image.shape[1] // 2
    assert (image[:, middle] == 5.0).all() and (image[:, 0] == 5.0).all()  # one value: the lowest is 5 too
    slab[0, 0, 0] = 0.0  # now the lowest value is 0: the columns past the slab show it
    image, _, column_mm = mip_image(Volume(data=slab, spacing=(4.0, 1.0, 2.0), affine=np.eye(4), modality="PT",
                                           source="nifti", orientation="RAS"), 9)
    assert (image[:, 0] == 0.0).all() and (image[1:, middle] == 5.0).all()
    assert np.count_nonzero(image[5]) * column_mm == pytest.approx(10.0, abs=2 * column_mm)


def test_edges_and_caption_say_where_the_frame_looks_from():
    assert mip_edges(0) == ("R", "L", "S", "I") and mip_seen_from(0) == "the front"
    assert mip_edges(9) == ("A", "P", "S", "I") and mip_seen_from(9) == "the patient's left"
    assert mip_edges(18) == ("L", "R", "S", "I") and mip_seen_from(18) == "behind"
    assert mip_edges(27) == ("P", "A", "S", "I") and mip_seen_from(27) == "the patient's right"
    assert mip_edges(3) == ("RA", "LP", "S", "I")  # 30°: the front and the patient's left both in view
    assert mip_seen_from(3) == "the front and the patient's left"
    pet = _pet()
    assert slice_location(pet, "mip", 3) == "30°, seen from the front and the patient's left"
    pet.meta["orientation_unknown"] = True  # a NIfTI that says not which way the patient lies: the angle alone
    assert slice_location(pet, "mip", 3) == "30°"


def test_the_mip_opens_seen_from_the_front_and_names_its_frames_when_one_is_out_of_range():
    pet = _pet()
    assert slice_count(pet, "mip") == MIP_FRAMES == 36
    assert (render_slice(pet, "mip") == render_slice(pet, "mip", 0)).all()
    with pytest.raises(UserInputError, match="the MIP has frames 0 to 35"):
        render_slice(pet, "mip", 36)


@pytest.mark.parametrize(("shape", "spacing"), [((8, 60, 60), (4.0, 4.0, 4.0)), ((4, 440, 440), (3.0, 1.65, 1.65))])
def test_a_single_hot_voxel_shows_at_its_full_value_from_every_side(shape, spacing):
    """A small lesion must not fade in and out as the MIP turns: every voxel counts in one column of every frame,
    also where the image has fewer columns than the grid (440 voxels across, at most 256 columns)."""
    data = np.ones(shape, np.float32)
    data[shape[0] // 2, shape[1] // 3, 2 * shape[2] // 3 + 1] = HOT  # off-centre, on no symmetry axis
    pet = Volume(data=data, spacing=spacing, affine=np.eye(4), modality="PT", source="nifti", orientation="RAS")
    assert [float(mip_image(pet, frame)[0].max()) for frame in range(MIP_FRAMES)] == [HOT] * MIP_FRAMES


def test_voxels_wider_one_way_than_the_other_leave_no_empty_column_inside_the_body():
    """With 4 × 3 mm voxels a side view has 3 mm columns over 4 mm voxels: each column the body covers shows it,
    none shows the lowest value in stripes."""
    data = np.full((4, 40, 50), 5.0, np.float32)
    data[:, 0, 0] = 0.0  # the lowest value, which an empty column would show
    pet = Volume(data=data, spacing=(4.0, 4.0, 3.0), affine=np.eye(4), modality="PT", source="nifti",
                 orientation="RAS")
    for frame in range(MIP_FRAMES):
        body = np.flatnonzero(mip_image(pet, frame)[0][1] == 5.0)  # the columns showing the body, one row
        assert body.size and np.all(np.diff(body) == 1), frame  # one unbroken run


def test_a_spot_clicked_on_the_mip_is_found_in_the_volume_from_every_side():
    """A reader clicks a hot spot on the MIP to find it in the slices: the voxel found is the brightest along that
    line of sight at that height, in the hot cube (its middle, seen square on), whichever side the MIP is seen
    from, and also where the click falls just beside it (a hand misses by a few pixels); a warm voxel in front of
    it on the same line, or a hotter one at another height, is not taken for it. Beside the field of view there
    is none."""
    pet = _pet()
    pet.data[23, 31, 10] = 3.0  # warm, on the hot cube's line of sight from the patient's right and left
    pet.data[5, 31, 39] = 20.0  # hotter, below it
    for frame in range(MIP_FRAMES):
        down, across = mip_point(pet, frame, (23, 31, 39))
        image = mip_image(pet, frame)[0]
        z, y, x = mip_voxel(pet, frame, down, across)
        assert z == 23 and pet.data[z, y, x] == HOT and (frame % 9 or (y, x) == (31, 39)), frame
        for row, column in ((2, 2), (-2, -2), (2, 0)):  # just past its edge (it is 3 voxels wide): still the cube
            z, y, x = mip_voxel(pet, frame, down + row / image.shape[0], across + column / image.shape[1])
            assert pet.data[z, y, x] == HOT, (frame, row, column)
        assert image[int(down * image.shape[0]), int(across * image.shape[1])] == HOT  # where the image shows it
    assert mip_voxel(pet, 9, 0.5, 0.999) is not None  # from the side the grid's 120 mm fill the image
    assert mip_voxel(pet, 0, 0.5, 0.999) is None  # from the front its 100 mm leave the image's edges empty


def test_a_click_on_a_lesion_beside_a_hotter_organ_stays_on_the_lesion():
    """A lesion two voxels from a hotter organ (the kidney, the bladder): a click on the lesion marks the lesion,
    not the organ within reach; a click on the organ marks the organ."""
    data = np.ones((20, 128, 128), np.float32)  # a click reaches 3 of its MIP's 128 columns (SPOT_REACH)
    data[10, 60, 60] = 5.0  # the lesion
    data[10, 60, 63] = 10.0  # the organ, 3 voxels to the patient's right (higher x)
    pet = Volume(data=data, spacing=(4.0, 4.0, 4.0), affine=np.eye(4), modality="PT", source="nifti",
                 orientation="RAS")
    for voxel in ((10, 60, 60), (10, 60, 63)):
        assert mip_voxel(pet, 0, *mip_point(pet, 0, voxel)) == voxel
