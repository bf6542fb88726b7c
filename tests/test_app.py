"""The demo's event handlers, called directly (no server, no browser), on a tiny random checkpoint."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest

from medvlm.view_html import scan_card
from medvlm.volume import Volume, load_volume
from medvlm.writers import save_dicom_series, save_nifti

ROOT = Path(__file__).resolve().parent.parent
MADE_UP_PATIENT = {  # identifiers a real study would carry: none may reach the page
    "PatientName": "Quimby^Harriet",
    "PatientID": "QX-4471902",
    "PatientBirthDate": "19380214",
    "AccessionNumber": "ACC77120934",
    "InstitutionName": "Saint Elsewhere Infirmary",
}


@pytest.fixture(scope="session")
def app_module(tmp_path_factory):
    """`app` imported with MEDVLM_CHECKPOINT pointing at a tiny random checkpoint (the model loads at import; the
    variable is restored after it, so that an app or bench started later by a test loads its own), and Gradio's
    upload folder (where sessions keep their report downloads, read at each upload) in the tests' own temporary
    folder."""
    if "app" in sys.modules:
        return sys.modules["app"]
    import torch

    from tests.tiny_model import save_tiny_checkpoint

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-uploads"))
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("MEDVLM_CHECKPOINT", str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))))
        return importlib.import_module("app")


@pytest.fixture(autouse=True)
def tabs_closed_in_this_test_alone(app_module, monkeypatch):
    """A closed tab's session hash is remembered (a load still running for it registers its scan as unused); the
    tests name their tabs "tab-a" and so on, each test afresh."""
    monkeypatch.setattr(app_module, "_ENDED_SESSIONS", {})


@pytest.fixture(autouse=True)
def tiny_answers_count_as_finished(app_module, monkeypatch):
    """The tiny random checkpoint never writes its end token, so every answer reaches its token limit: here that
    is not marked as cut off (a test of the marking restores `CutOff`), so that reports can finish."""
    monkeypatch.setattr(app_module, "CutOff", type("NotCutOff", (str,), {}))


def torso_ct(shape=(40, 64, 64), spacing=(5.0, 1.0, 1.0), seed=0) -> np.ndarray:
    """A CT-like torso in HU on the canonical grid: air, an elliptic body, a spine, a hypodense lesion on the right."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    data = np.full(shape, -1000.0, dtype=np.float32)
    data[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = 40.0
    data[(x**2 + (y + 0.45) ** 2 < 0.02)] = 700.0  # spine: posterior, midline
    data[((x - 0.4) ** 2 + y**2 + (z - 0.2) ** 2) < 0.04] = -20.0  # lesion toward the patient's right (x > 0)
    return data + np.random.default_rng(seed).normal(0, 10, shape).astype(np.float32)


@pytest.fixture
def ct_nifti(tmp_path) -> Path:
    return save_nifti(tmp_path / "torso.nii.gz", torso_ct(), (5.0, 1.0, 1.0), "LPS", dtype=np.int16, modality="CT")


@pytest.fixture
def dicom_with_identifiers(tmp_path) -> list[Path]:
    return save_dicom_series(tmp_path / "series", torso_ct(), (5.0, 1.0, 1.0), "CT", series_description="CHEST AX",
                             patient=MADE_UP_PATIENT, intercept=-1024.0, file_names="shuffled")


def loaded(app_module, files, session=None):
    """(session, load_scan's outputs by name) for an upload."""
    outputs = named(app_module, app_module.load_scan([str(f) for f in files], session))
    return outputs["session"], outputs


def named(app_module, outputs) -> dict:
    """A load's outputs by name (app.LOAD_OUTPUTS)."""
    return dict(zip(app_module.LOAD_OUTPUTS, outputs, strict=True))


def image_source(html: str) -> str:
    return re.search(r'src="(data:image/png;base64,[^"]+)"', html).group(1)


def test_scan_card_gives_the_facts_and_never_identifiers(app_module, dicom_with_identifiers):
    session, outputs = loaded(app_module, dicom_with_identifiers)
    card = outputs["card"]
    assert session.volume.modality == "CT"
    assert "CT (computed tomography)" in card
    assert "64 × 64 voxels × 40 axial slices" in card
    assert "1.00 × 1.00 mm in-plane, 5.00 mm between slices" in card
    assert "**Series** | number 1 |" in card
    shown = repr(outputs)  # the card among them
    for identifier in MADE_UP_PATIENT.values():
        for part in re.split(r"\^", identifier):
            assert part not in shown, f"{part!r} reached the page"


def test_an_m3d_npy_is_not_given_a_spacing_it_does_not_store(app_module, tmp_path):
    """M3D resampled every scan to one shape and kept no spacing: the card must not claim 1 mm slices."""
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).random((1, 32, 48, 48), dtype=np.float32))
    _, outputs = loaded(app_module, [tmp_path / "scan.npy"])
    assert "not stored in an M3D .npy" in outputs["card"] and "mm between slices" not in outputs["card"]
    assert "**Field of view** | unknown |" in outputs["card"]


def test_a_nifti_without_orientation_is_not_called_stored_as_las(app_module, tmp_path):
    """Both NIfTI orientation codes 0: nibabel reads the file as Analyze's LAS, a guess the card must not state as
    the file's own."""
    import nibabel as nib

    image = nib.Nifti1Image(torso_ct().transpose(2, 1, 0), np.diag([1.0, 1.0, 5.0, 1.0]))
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "unstated.nii")
    session, outputs = loaded(app_module, [tmp_path / "unstated.nii"])
    assert "**Orientation** | not stated (read as LAS), shown radiologically; sides in doubt |" in outputs["card"]
    assert "its sides may be swapped (left and right, front and back, head and feet)" in outputs["card"]
    *_, (report, download) = app_module.generate_report(session, 8, 0.0, 1.0)  # the sides it names are in doubt
    assert report.endswith(f"*{app_module.SIDES_IN_DOUBT}*")
    assert app_module.SIDES_IN_DOUBT in Path(download["value"]).read_text(encoding="utf-8")
    session.report_finished = False  # as a stopped report is: said incomplete, and the sides still in doubt
    stopped, _ = app_module.report_view(session)
    assert app_module.REPORT_STOPPED.strip() in stopped and stopped.endswith(f"*{app_module.SIDES_IN_DOUBT}*")
    session.release()


def test_a_series_description_is_never_shown_because_it_can_name_the_patient(app_module, tmp_path):
    files = save_dicom_series(tmp_path / "series", torso_ct(), (5.0, 1.0, 1.0), series_description="DOE JOHN CT AX",
                              series_number=7)
    session, outputs = loaded(app_module, files)
    shown = repr(outputs)  # the card among them
    assert "DOE" not in shown and "DOE" not in repr(session.volume.meta)
    assert "**Series** | number 7 |" in shown


def test_text_from_the_file_shows_as_written_on_the_scan_card(app_module, dicom_with_identifiers):
    session, _ = loaded(app_module, dicom_with_identifiers)
    session.volume.meta["manufacturer"] = "<b>Acme</b> | CT"
    card = scan_card(session.volume, session.label)
    assert "&lt;b&gt;Acme&lt;/b&gt; \\| CT" in card and "<b>" not in card


def test_a_window_typed_that_is_none_keeps_the_one_shown_and_says_what_to_type(app_module, ct_nifti):
    """The box would otherwise name a window the image is not in. Width and level as radiologists write them, with
    a slash or a space, are taken."""
    session, _ = loaded(app_module, [ct_nifti])
    lung, box = app_module.change_window(session, "axial", "lung", 21)
    assert "window lung" in lung and box == gr.skip()
    for nonsense in ("350", "abc", "0/50"):
        with pytest.warns(UserWarning, match="or a width/level such as 350/50"):
            view, box = app_module.change_window(session, "axial", nonsense, 21)
        assert view == lung and box == "lung"  # the lung window stays, and the box says so
    for typed in ("W 350 L 50", "350 50", "350/50"):
        view, box = app_module.change_window(session, "axial", typed, 21)
        assert "window typed · W 350 / L 50" in view and box == gr.skip()
    session.release()


def test_slice_image_follows_the_slider_and_the_window(app_module, ct_nifti):
    session, outputs = loaded(app_module, [ct_nifti])
    assert outputs["slider"]["maximum"] == 40 and outputs["slider"]["value"] == 21  # slider counts slices from 1
    middle = image_source(app_module.slice_html(session, "axial", "soft tissue", 21))
    assert image_source(outputs["slice"]) == middle
    assert image_source(app_module.slice_html(session, "axial", "soft tissue", 30)) != middle
    assert image_source(app_module.slice_html(session, "axial", "lung", 21)) != middle
    assert "window lung · W 1500 / L −600" in app_module.slice_html(session, "axial", "lung", 21)
    typed = app_module.slice_html(session, "axial", "W 400 / L 40", 21)  # typed into the window box
    assert image_source(typed) == middle and "window typed · W 400 / L 40" in typed
    assert image_source(app_module.slice_html(session, "axial", "not a window", 21)) == middle  # the default
    app_module.show_slice(session, "axial", "soft tissue", 30)
    slider, html, _ = app_module.change_plane(session, "coronal", "soft tissue")  # first time: the middle slice
    assert slider["maximum"] == 64 and "Coronal 33 / 64 from posterior" in html
    app_module.show_slice(session, "coronal", "soft tissue", 50)
    slider, html, _ = app_module.change_plane(session, "axial", "soft tissue")  # back where the axial view was
    assert slider["value"] == 30 and "Axial 30 / 40 from inferior" in html
    slider, html, _ = app_module.change_plane(session, "coronal", "soft tissue")
    assert slider["value"] == 50 and "Coronal 50 / 64" in html


def test_the_slice_caption_gives_the_values_an_auto_window_spans(app_module, tmp_path):
    """A PET or MR window comes from the scan's own values: the caption says which, as a CT window's W/L does."""
    pet = torso_ct() + 1000.0  # 0 … about 1750, uptake-like values
    pet[pet < 0] = 0.0
    session, _ = loaded(app_module, [save_nifti(tmp_path / "pet.nii.gz", pet, (5.0, 1.0, 1.0), modality="PT")])
    low, high = (float(v) for v in np.percentile(pet, [0.5, 99.5]))
    for window in ("auto", "inverted"):
        caption = app_module.slice_html(session, "axial", window, 20)
        assert f"({low:.4g} to {high:.4g})" in caption, window
    becquerels, _ = loaded(app_module, [save_nifti(tmp_path / "bq.nii.gz", pet * 20, (5.0, 1.0, 1.0), modality="PT")])
    caption = app_module.slice_html(becquerels, "axial", "auto", 20)  # Bq/mL: tens of thousands, no exponent
    assert f"(0 to {round(high * 20)})" in caption and "e+" not in caption


def test_the_slice_caption_says_where_the_slice_lies_in_the_patient(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    first, last = (app_module.slice_html(session, "axial", "soft tissue", number) for number in (1, 40))
    assert re.search(r"Axial 1 / 40 from inferior · I \d+\.\d mm, 5\.00 mm apart · window", first)
    assert re.search(r"Axial 40 / 40 from inferior · S \d+\.\d mm, 5\.00 mm apart · window", last)


def test_window_choices_follow_the_modality(app_module, tmp_path):
    brain = save_nifti(tmp_path / "brain.nii.gz", torso_ct() + 1000, (1.0, 1.0, 1.0), modality="MR")
    _, outputs = loaded(app_module, [brain])
    assert [value for _, value in outputs["window"]["choices"]] == ["auto"] and outputs["window"]["value"] == "auto"
    labels = dict((value, label) for label, value in app_module.window_choices("CT"))
    assert labels["lung"] == "lung · W 1500 / L −600" and labels["soft tissue"] == "soft tissue · W 400 / L 40"
    assert [value for _, value in app_module.window_choices("PT")] == ["auto", "inverted"]
    pet = save_nifti(tmp_path / "pet.nii.gz", np.abs(torso_ct()) / 100, (4.0, 4.0, 4.0), modality="PT")
    session, _ = loaded(app_module, [pet])
    assert 'class="slice-frame inverted"' in app_module.slice_html(session, "axial", "inverted", 3)  # white frame
    assert 'class="slice-frame"' in app_module.slice_html(session, "axial", "auto", 3)


def test_a_pet_can_be_read_as_a_rotating_mip(app_module, tmp_path, ct_nifti, monkeypatch):
    """A PET offers the MIP beside the planes, and opens in it, in inverted grey, as nuclear medicine reads a PET
    first (a CT opens in its middle axial slice): the slider turns it, 10° a step, from the front view first; the
    caption says where each frame looks from, and going back to a plane names the slider a slice again."""
    _, ct = loaded(app_module, [ct_nifti])
    assert [value for _, value in ct["plane"]["choices"]] == ["axial", "coronal", "sagittal"]
    assert (ct["plane"]["value"], ct["window"]["value"], ct["slider"]["label"]) == ("axial", "soft tissue", "Slice")
    pet = save_nifti(tmp_path / "pet.nii.gz", np.abs(torso_ct()) / 100, (4.0, 4.0, 4.0), modality="PT")
    session, outputs = loaded(app_module, [pet])
    assert ("MIP", "mip") in outputs["plane"]["choices"]
    assert (outputs["plane"]["value"], outputs["window"]["value"]) == ("mip", "inverted")
    # the window box says how a window of one's own is typed for each: W/L in HU for a CT, a PET's range of values,
    # its own, which typed in shows the scan (no note that it shows it flat)
    assert "350/50" in ct["window"]["label"]
    suggested = re.fullmatch(r"Window \(or type a range: (0-\d+ inverted)\)", outputs["window"]["label"]).group(1)
    said = []
    monkeypatch.setattr(app_module.gr, "Info", lambda message, *args, **kwargs: said.append(message))
    view, _ = app_module.change_window(session, "mip", suggested, 1)
    assert f"window typed · {suggested.replace('-', ' to ')}" in view and not said
    view, _ = app_module.change_window(session, "mip", "0-6 inverted", 1)
    assert "window typed · 0 to 6 inverted" in view and 'class="slice-frame inverted"' in view and not said
    app_module.change_window(session, "mip", "350/50", 1)  # a CT's window on a PET: it says what would show it
    assert len(said) == 1 and "shows them in a few greys; try the range" in said[0]
    app_module.change_window(session, "mip", "350/50", 1)  # the box sends it again when it loses the focus
    assert len(said) == 1  # said once
    slider = outputs["slider"]
    assert (slider["maximum"], slider["value"], slider["label"]) == (36, 1, "MIP frame (10° each)")
    assert "MIP 1 / 36 · 0°, seen from the front · window inverted" in outputs["slice"]
    assert "kept-mark" not in outputs["slice"]
    status, _, view = app_module.encode_scan(session)  # the MIP's track shows its frames, not the kept slices
    assert "axial slices. Generate" in status and "green marks" not in status and "kept-mark" not in view
    slider, html, window = app_module.change_plane(session, "axial", "auto")
    assert slider["label"] == "Slice" and "Axial" in html
    slider, html, window = app_module.change_plane(session, "mip", "auto")  # in inverted grey again, and says so
    assert (slider["maximum"], slider["value"], slider["label"]) == (36, 1, "MIP frame (10° each)")
    assert "MIP 1 / 36 · 0°, seen from the front · window inverted" in html and window == "inverted"
    view, _ = app_module.show_slice(session, "mip", "inverted", 10)
    assert "MIP 10 / 36 · 90°, seen from the patient's left" in view and '"edge edge-left">A<' in view
    slider, html, window = app_module.change_plane(session, "axial", "inverted")  # the planes keep the window
    assert slider["label"] == "Slice" and "Axial" in html and "window inverted" in html
    assert isinstance(window, type(gr.skip()))
    slider, html, window = app_module.change_plane(session, "mip", "4/2")  # a window the reader chose stays
    assert slider["value"] == 10 and "window typed · W 4 / L 2" in html and isinstance(window, type(gr.skip()))
    session.release()


def test_a_spot_clicked_on_the_mip_is_found_and_marked_in_every_plane(app_module, tmp_path):
    """A reader clicks a hot spot on the MIP: the axial slice through its hottest voxel opens with the spot marked
    and its value in the caption, and the coronal and sagittal planes open through it, marked too; a slice that
    does not hold it is unmarked. A click on air finds nothing: the axial slice at its height, unmarked. What is no
    spot (an API client's) changes nothing."""
    uptake = np.where(torso_ct() < -500, 0.05, 1.0)  # air, and the body's background uptake
    uptake[30:34, 40:44, 10:14] = 6.0  # a hot spot toward the patient's left (low x), anterior (high y)
    uptake[31, 41, 11] = 9.0  # its hottest voxel
    pet = save_nifti(tmp_path / "pet.nii.gz", uptake, (4.0, 4.0, 4.0), modality="PT")
    session, _ = loaded(app_module, [pet])
    app_module.change_plane(session, "mip", "auto")
    # Seen from the front (frame 1), 64 columns of 4 mm, the patient's right on the left: x 11 is column 52.
    plane, slider, html = app_module.find_mip_spot(session, f"1 {(40 - 1 - 31 + 0.5) / 40} {(63 - 11 + 0.5) / 64}",
                                                   "inverted")
    assert (plane, slider["value"], slider["label"]) == ("axial", 32, "Slice") and "Axial 32 / 40" in html
    assert 'class="spot-mark"' in html and "cross-hair: the spot found from the MIP, 9<" in html
    slider, html, _ = app_module.change_plane(session, "coronal", "inverted")  # y 41: slice 42
    assert slider["value"] == 42 and 'class="spot-mark"' in html
    assert 'class="spot-mark"' not in app_module.show_slice(session, "coronal", "inverted", 20)[0]
    slider, html, _ = app_module.change_plane(session, "sagittal", "inverted")
    assert slider["value"] == 12 and 'class="spot-mark"' in html
    assert 'class="spot-mark"' in app_module.change_plane(session, "mip", "inverted")[1]  # on every frame
    # A row and a column beside it (a hand's miss): the same voxel. On air (the image's left edge): nothing.
    plane, slider, html = app_module.find_mip_spot(session, f"1 {(40 - 1 - 30 + 0.5) / 40} {(63 - 10 + 0.5) / 64}",
                                                   "inverted")
    assert slider["value"] == 32 and "the spot found from the MIP, 9<" in html
    plane, slider, html = app_module.find_mip_spot(session, f"1 {(40 - 1 - 31 + 0.5) / 40} 0.01", "inverted")
    assert slider["value"] == 32 and 'class="spot-mark"' not in html
    assert 'class="spot-mark"' not in app_module.change_plane(session, "coronal", "inverted")[1]
    for no_spot in ("top", "1 0.5", "1 nan 0.5", None, 3):
        assert all(isinstance(output, type(gr.skip())) for output in app_module.find_mip_spot(session, no_spot, "auto"))
    session.release()


def test_a_mip_frame_drawn_after_the_plane_changed_stays_off_the_page(app_module, tmp_path, monkeypatch):
    """A frame still being projected when the visitor presses another plane (or clicks a spot on the MIP) would
    land after that plane's slice, showing a MIP under the plane's controls: it is dropped, and the session keeps
    the view the visitor went to."""
    pet = save_nifti(tmp_path / "pet.nii.gz", np.abs(torso_ct()) / 100, (4.0, 4.0, 4.0), modality="PT")
    session, _ = loaded(app_module, [pet])
    app_module.change_plane(session, "mip", "auto")
    drawn = app_module.slice_view_html

    def slow_frame(volume, plane, *args):  # the plane is pressed while the frame is drawn
        if plane == "mip":
            app_module.change_plane(session, "axial", "auto")
        return drawn(volume, plane, *args)

    monkeypatch.setattr(app_module, "slice_view_html", slow_frame)
    view, slider = app_module.show_slice(session, "mip", "auto", 5)
    assert isinstance(view, type(gr.skip())) and isinstance(slider, type(gr.skip()))
    assert session.shown == ("axial", "auto") and session.shown_slices["mip"] == 1  # frame 5 was never shown
    view, _ = app_module.show_slice(session, "axial", "auto", 7)  # a slice asked for since is drawn
    assert "Axial 7 / 40" in view
    session.release()


def test_kept_slices_are_shown_after_encoding(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    status, kept, html = app_module.encode_scan(session)
    assert session.kept_slices and all(0 <= k < 40 for k in session.kept_slices)
    assert f"kept {len(session.kept_slices)} of 40 axial slices (green marks)" in status
    assert kept["choices"] == [str(k + 1) for k in session.kept_slices]
    assert html.count('class="kept-mark"') == len(session.kept_slices)
    assert "green: the slices the model kept" in html  # the track says what its marks are
    plane, slider, jumped, choice = app_module.jump_to_kept(session, kept["choices"][0], "soft tissue")
    assert plane == "axial" and slider["value"] == session.kept_slices[0] + 1
    assert "kept by the model" in jumped
    assert choice["value"] is None  # the same number can be clicked again once the user has scrolled away


def test_every_slice_a_kept_slab_averages_is_shown_as_read(app_module, tmp_path, monkeypatch):
    """Thin slices are read as slabs (the demo model's of about 4 mm, each the mean of three or four): the page counts,
    marks and names every slice of a kept slab as read by the model. It marked one slice a slab, so that the slice
    at a lesion's centre, read in its slab, showed as not kept. (Which slices a slab averages: test_model.py.)"""
    import torch

    from medvlm.pipeline import Encoding

    scan = save_nifti(tmp_path / "thin.nii.gz", torso_ct(shape=(120, 64, 64)), (1.25, 1.0, 1.0), "LPS",
                      dtype=np.int16, modality="CT")
    slabs = [(3, 6), (6, 9), (40, 43), (117, 119)]  # as 38 slabs of 120 slices lie: a shared slice, the last one
    monkeypatch.setattr(app_module, "encode_on_gpu", lambda volume: Encoding(torch.zeros(1, 4, 8), slabs, 38))
    session, _ = loaded(app_module, [scan])
    status, kept, html = app_module.encode_scan(session)
    read = {index for first, last in slabs for index in range(first, last + 1)}
    assert ("Ready: the model kept 4 of its 38 slabs of about 3.9 mm, covering 14 of 120 axial slices (green marks)"
            in status)
    assert kept["choices"] == ["5", "8", "42", "119"]  # each slab's middle slice: typed, its number picks it
    marks = re.findall(r'class="kept-mark" data-slice="(\d+)" style="left:([\d.]+)%;width:([\d.]+)%"', html)
    assert [(int(middle), float(left), float(width)) for middle, left, width in marks] == [
        (5, 2.5, 3.33), (8, 5.0, 3.33), (42, 33.33, 3.33), (119, 97.5, 2.5)]
    for index in range(120):
        view, _ = app_module.show_slice(session, "axial", "soft tissue", index + 1)
        assert ("kept by the model" in view) == (index in read), index
    view, _ = app_module.show_slice(session, "axial", "soft tissue", 42)
    assert "kept by the model (slab 41–44)" in view
    session.release()


def test_a_sagittal_acquisition_is_described_and_opened_as_acquired(app_module, tmp_path):
    """A sagittal MR series (15 images 4 mm apart, 0.9 mm pixels): the card gives its own images' size and spacing,
    not an axial reformat's (which said 0.90 mm between slices of a 4 mm series), the page opens on its middle
    sagittal image, and the plane question, which the model answers "axial" of every scan, is not suggested."""
    data = np.random.default_rng(0).normal(500, 50, (64, 60, 15)).astype(np.float32)  # canonical (Z, Y, X)
    scan = save_nifti(tmp_path / "sagittal.nii.gz", data, (0.9, 0.9, 4.0), "PIR", modality="MR")
    session, outputs = loaded(app_module, [scan])
    assert "| 60 × 64 voxels × 15 sagittal slices |" in outputs["card"]
    assert "| 0.90 × 0.90 mm in-plane, 4.00 mm between slices |" in outputs["card"]
    assert "| 54 × 58 × 60 mm |" in outputs["card"]  # the field of view in the same order
    assert outputs["plane"]["value"] == "sagittal" and "Sagittal 8 / 15" in outputs["slice"]
    suggested = [question for question, in outputs["suggestions"].constructor_args["samples"]]
    assert suggested and app_module.PLANE_QUESTION not in suggested
    status, _, _ = app_module.encode_scan(session)
    assert " of 64 axial slices (green marks in the axial view)." in status  # the model reads axial slices
    session.release()
    axial, outputs = loaded(app_module, [save_nifti(tmp_path / "axial.nii.gz", data, (0.9, 0.9, 4.0), "LPS",
                                                    modality="MR")])
    assert "| 15 × 60 voxels × 64 axial slices |" in outputs["card"] and outputs["plane"]["value"] == "axial"
    assert app_module.PLANE_QUESTION in [question for question, in outputs["suggestions"].constructor_args["samples"]]
    axial.release()


def test_a_point_clicked_on_a_slice_gives_its_value_and_opens_the_other_planes_through_it(app_module, tmp_path):
    """A viewer's probe: a CT's ground-glass nodule is read by its HU (fat, fluid, ground glass or calcium is the
    first question of a finding). The point is marked in every plane through it; a click that the viewer has moved
    on from since, or that is no point, changes nothing."""
    from medvlm.view import spot_position

    data = torso_ct()
    data[24:27, 30:33, 45:48] = -538.0  # a ground-glass focus toward the patient's right (high x)
    session, _ = loaded(app_module, [save_nifti(tmp_path / "ct.nii.gz", data, (5.0, 1.0, 1.0), "LPS",
                                                dtype=np.int16, modality="CT")])
    app_module.show_slice(session, "axial", "lung", 26)  # axial 26: z 25, as the viewer shows it
    down, across = spot_position(session.volume, "axial", 25, (25, 31, 46))
    html = app_module.mark_point(session, f"axial 26 {down} {across} 7", "lung")
    assert 'class="spot-mark"' in html and "cross-hair: the point clicked, −538 HU<" in html
    slider, html, _ = app_module.change_plane(session, "coronal", "lung")  # opens through it: y 31, slice 32
    assert slider["value"] == 32 and 'class="spot-mark"' in html and "−538 HU" in html
    slider, html, _ = app_module.change_plane(session, "sagittal", "lung")
    assert slider["value"] == 47 and 'class="spot-mark"' in html
    assert app_module.mark_point(session, f"axial 26 {down} {across} 8", "lung") == gr.skip()  # not shown now
    for no_point in ("axial 26 0.5", "mip 1 0.5 0.5", "axial x 0.5 0.5", None):
        assert app_module.mark_point(session, no_point, "lung") == gr.skip()
    session.release()


def test_3d_figure_stays_under_2_mb_for_a_large_ct():
    from medvlm.view3d import default_threshold, figure_3d, threshold_range

    shape = (300, 512, 512)
    data = torso_ct(shape, seed=1)
    data += np.random.default_rng(2).standard_normal(shape, dtype=np.float32) * 200  # a rough, noisy surface
    volume = Volume(data, (1.0, 0.7, 0.7), np.eye(4), "CT", "nifti", "LPS")
    figure = figure_3d(volume)
    assert len(figure.to_json()) <= 2_000_000
    assert len(figure.data) == 1 and len(figure.data[0].i) > 100  # a surface, not an empty plot
    low, high, _ = threshold_range(volume)
    assert low <= default_threshold(volume) <= high


def test_3d_labels_the_patients_sides_where_they_are():
    from medvlm.view3d import figure_3d

    data = np.full((30, 40, 50), -1000.0, dtype=np.float32)
    data[10:20, 10:30, 30:45] = 40.0  # a block in the patient's right half (x toward the right) and upper part
    data[2:8, 10:30, 5:15] = 40.0  # a smaller one low on the left
    figure = figure_3d(Volume(data, (2.0, 1.0, 1.0), np.eye(4), "CT", "nifti", "RAS"), threshold=-500.0)
    labels = {annotation.text.strip("<b>/"): annotation for annotation in figure.layout.scene.annotations}
    assert set(labels) == {"R", "L", "S", "I"}
    mesh = figure.data[0]
    assert labels["R"].x > max(mesh.x) > min(mesh.x) > labels["L"].x
    assert labels["S"].z > max(mesh.z) > min(mesh.z) > labels["I"].z
    upper = [x for x, z in zip(mesh.x, mesh.z, strict=True) if z > 19]  # the right-hand block's surface
    assert min(upper) > (labels["R"].x + labels["L"].x) / 2  # on the R label's side of the figure
    for axis in ("xaxis", "yaxis", "zaxis"):  # no arrow that reads left to right whichever way the axis points
        assert not figure.layout.scene[axis].title.text


def test_3d_keeps_the_anatomys_true_proportions():
    """A 30 mm cube in a scan that is wide, shallow and of middling height is drawn as a cube: every axis gets
    the same screen length per millimetre, however little of the scan the surface fills."""
    from medvlm.view3d import figure_3d

    data = np.full((60, 50, 250), -1000.0, dtype=np.float32)  # 120 × 100 × 500 mm (z, y, x)
    data[20:35, 10:40, 100:130] = 40.0  # 30 × 30 × 30 mm
    figure = figure_3d(Volume(data, (2.0, 2.0, 2.0), np.eye(4), "CT", "nifti", "RAS"), threshold=-500.0)
    scene, mesh = figure.layout.scene, figure.data[0]
    per_mm = [scene.aspectratio[name] / (scene[f"{name}axis"].range[1] - scene[f"{name}axis"].range[0])
              for name in "xyz"]
    assert max(per_mm) == pytest.approx(min(per_mm), rel=1e-6)
    for name in "xyz":  # the surface and its letters lie inside the scene
        low, high = scene[f"{name}axis"].range
        places = [*mesh[name], *(annotation[name] for annotation in scene.annotations)]
        assert low < min(places) and max(places) < high


def test_3d_threshold_without_a_surface_says_so(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    figure = app_module.show_3d(session, 5000.0)
    assert not figure.data and "No surface" in figure.layout.annotations[0].text
    assert figure.layout.xaxis.visible is False and figure.layout.yaxis.visible is False  # no bare chart around it


def test_a_wrong_file_gives_one_sentence_and_keeps_the_scan(app_module, ct_nifti, tmp_path):
    session, _ = loaded(app_module, [ct_nifti])
    junk = tmp_path / "scan.nii.gz"
    junk.write_bytes(os.urandom(2000))
    with pytest.warns(UserWarning):  # gr.Warning outside a running app
        same, outputs = loaded(app_module, [junk], session)
    assert same is session and session.volume is not None
    assert outputs["status"].startswith("⚠️ ") and "\n" not in outputs["status"] and "Traceback" not in outputs["status"]


def test_uploaded_files_are_deleted_once_read(app_module, ct_nifti):
    from gradio.processing_utils import get_upload_folder

    upload = Path(get_upload_folder()) / "medvlm-test-upload" / "torso.nii.gz"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(ct_nifti.read_bytes())
    session, _ = loaded(app_module, [upload])
    assert session.volume is not None
    assert not upload.exists() and not upload.parent.exists()
    assert ct_nifti.exists()  # files outside Gradio's upload folder are never touched


def test_two_visitors_uploading_the_same_file_at_once_both_get_their_scan(app_module, ct_nifti, monkeypatch):
    """Gradio keeps identical uploads at one path: the first load to finish does not delete the file under the
    other, which is deleted once both are done; an upload gone before its load says so, and what to do."""
    from gradio.processing_utils import get_upload_folder

    upload = Path(get_upload_folder()) / "medvlm-same-upload" / "torso.nii.gz"
    upload.parent.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(ct_nifti.read_bytes())
    read, second = app_module.load_volume, {}

    def read_while_another_reads(*args, **kwargs):
        if not second:  # the second visitor's load starts while the first one reads the file
            monkeypatch.setattr(app_module, "load_volume", read)
            second["outputs"] = named(app_module, app_module.load_scan([str(upload)], None,
                                                                       SimpleNamespace(session_hash="tab-2")))
        return read(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_volume", read_while_another_reads)
    first = named(app_module, app_module.load_scan([str(upload)], None, SimpleNamespace(session_hash="tab-1")))
    try:
        assert first["session"].volume is not None and second["outputs"]["session"].volume is not None
        assert not upload.exists() and not upload.parent.exists()  # deleted once the last load was done with it
        with pytest.warns(UserWarning):  # gr.Warning outside a running app
            gone = named(app_module, app_module.load_scan([str(upload)], None, SimpleNamespace(session_hash="tab-3")))
        assert gone["session"] is None and gone["status"] == f"⚠️ {app_module.UPLOAD_GONE}."
        rest = Path(get_upload_folder()) / "medvlm-rest-of-upload" / "IM2"  # the upload's other file goes too
        rest.parent.mkdir(parents=True, exist_ok=True)
        rest.write_bytes(b"a DICOM image with a patient's name")
        with pytest.warns(UserWarning):
            app_module.load_scan([str(upload), str(rest)], None, SimpleNamespace(session_hash="tab-4"))
        assert not rest.exists()
        assert not app_module._UPLOADS_READ  # nothing counted as being read any more
    finally:
        for tab in ("tab-1", "tab-2"):
            app_module.end_session(SimpleNamespace(session_hash=tab))


def test_report_streams_and_is_offered_as_markdown(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    updates = list(app_module.generate_report(session, 24, 0.0, 1.0))
    texts = [text for text, _ in updates]
    assert len(updates) >= 3 and texts[-1] and texts[0] != texts[-1]  # it grew, then the download came
    path = Path(updates[-1][1]["value"])
    written = path.read_text()
    assert texts[-1].strip() in written
    # a draft, said so before anything else, with the scan it is about and the line saying how often to trust it
    assert written.startswith("# Draft report written by a model\n\n**Not a radiologist's report.** Check every")
    assert "- Scan: uploaded scan; CT (computed tomography), 64 × 64 × 40 voxels" in written
    # ... and how it was written: a greedy draft is told from a sampled one
    assert "- Decoding: greedy decoding (temperature 0), at most 24 new tokens" in written
    assert app_module.decoding(256, 1.5, 0.9) == "sampled at temperature 1.5, top-p 0.9, at most 256 new tokens"
    assert app_module.decoding(256, 0.005, 0.9).startswith("greedy")  # below sampling's least: read as 0
    # named for what it is and when (not for the uploaded file, whose name can hold the patient's)
    assert re.fullmatch(r"medvlm-report-uploaded-scan-\d{8}-\d{4}\.md", path.name), path.name
    session.release()
    assert not path.exists()


def test_two_chat_turns_reuse_the_encoded_scan(app_module, ct_nifti, monkeypatch):
    session, _ = loaded(app_module, [ct_nifti])
    model = app_module.PIPELINE.model
    encodings = []
    choose = model.choose_slices
    monkeypatch.setattr(model, "choose_slices", lambda *a, **k: encodings.append(1) or choose(*a, **k))
    app_module.PIPELINE.forget(session.volume)
    first = list(app_module.chat("Which organ is abnormal?", session, 16, 0.0, 1.0))
    second = list(app_module.chat("Where is the lesion?", session, 16, 0.0, 1.0))
    assert len(first) >= 2 and second[-1][1] == ""
    history = second[-1][0]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "Where is the lesion?" and history[3]["content"]
    assert len(encodings) == 1  # the second turn reused the visual tokens


def test_a_new_upload_starts_a_new_conversation(app_module, ct_nifti, tmp_path):
    session, _ = loaded(app_module, [ct_nifti])
    list(app_module.chat("Where is the lesion?", session, 8, 0.0, 1.0))
    other = save_nifti(tmp_path / "other.nii.gz", torso_ct(seed=3), (5.0, 1.0, 1.0), modality="CT")
    fresh, outputs = loaded(app_module, [other], session)
    assert fresh is not session and fresh.messages == [] and outputs["chatbot"] == []
    assert session.volume is None  # the old scan was released


def test_the_upload_folds_away_once_a_scan_is_read_and_not_before(app_module, ct_nifti, tmp_path):
    """Folded, it leaves a laptop's window to the viewer; a refused upload leaves it open to try again."""
    bad = tmp_path / "notes.nii"
    bad.write_text("not a scan")
    with pytest.warns(UserWarning):
        _, refused = loaded(app_module, [bad])
    assert refused["scan_source"] == gr.skip()
    _, outputs = loaded(app_module, [ct_nifti])
    assert outputs["scan_source"] == gr.update(open=False, label="Load another scan")


def test_closing_the_tab_releases_the_scan_and_its_files(app_module, ct_nifti):
    tab = SimpleNamespace(session_hash="tab-1")  # what Gradio passes as gr.Request
    session = app_module.load_scan([str(ct_nifti)], None, tab)[0]
    list(app_module.generate_report(session, 8, 0.0, 1.0))
    folder, fingerprint = session.folder, session.volume.fingerprint
    assert folder.is_dir() and fingerprint in app_module.PIPELINE._encodings
    app_module.end_session(tab)
    assert session.volume is None and session.messages == [] and session.report == ""
    assert not folder.exists() and fingerprint not in app_module.PIPELINE._encodings


def _upload_as(app_module, tmp_path, tab: str, seed: int = 0):
    """load_scan of a fresh CT file from the browser tab `tab` (the upload is deleted once read)."""
    scan = save_nifti(tmp_path / f"{tab}.nii.gz", torso_ct(seed=seed), (5.0, 1.0, 1.0), modality="CT")
    return named(app_module, app_module.load_scan([str(scan)], None, SimpleNamespace(session_hash=tab)))


@pytest.fixture
def only_these_scans(app_module, monkeypatch):
    """The memory budget counts the scan of every open session: a test of it counts its own alone, whatever
    sessions other tests left open (an API client never closed)."""
    monkeypatch.setattr(app_module, "_OPEN_SESSIONS", weakref.WeakValueDictionary())


@pytest.mark.usefixtures("only_these_scans")
def test_scans_past_the_memory_budget_make_room_or_are_refused(app_module, tmp_path, monkeypatch):
    """Visitors uploading big scans cannot take the server down: past the budget a new scan takes the place of
    one unused for ten minutes, whose visitor is told why, and is otherwise refused with a sentence; a scan still
    waiting for the model, or one whose release would not make room, is not released."""
    first = _upload_as(app_module, tmp_path, "tab-a")["session"]
    size = first.volume.data.nbytes
    monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", int(size * 1.5))
    try:
        first.last_used -= app_module.MAKE_ROOM_IDLE_S  # ten minutes, but its encoding has not run yet
        refused = _upload_as(app_module, tmp_path, "tab-b")
        assert refused["session"] is None and "holds as many scans as its memory allows" in refused["status"]
        assert first.volume is not None
        app_module.encode_scan(first)
        first.last_used -= app_module.MAKE_ROOM_IDLE_S  # encoded, then ten minutes without a look or a question
        monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", int(size * 0.5))  # no room even without it
        too_large = _upload_as(app_module, tmp_path, "tab-b", seed=1)
        assert too_large["session"] is None and first.volume is not None  # a wait would not help: said so
        assert f"This scan needs {size / 2**20:,.0f} MB, more than the {size / 2**21:,.0f} MB this server" in too_large[
            "status"]
        monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", int(size * 1.5))
        second = _upload_as(app_module, tmp_path, "tab-c", seed=2)["session"]
        assert second.volume is not None and first.volume is None
        told = "closed to make room for other visitors, after 10 minutes without use; load it again"
        assert told in list(app_module.generate_report(first, 8, 0.0, 1.0))[-1][0]
        assert told in app_module.slice_html(first, "axial", "soft tissue", 1)
        assert told in app_module.encode_scan(first)[0]  # its encoding's turn came late
        monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", 10 * size)
        again = _upload_as(app_module, tmp_path, "tab-a", seed=3)["session"]  # the visitor loads a scan again
        assert again.volume is not None and second.volume is not None
    finally:
        for tab in ("tab-a", "tab-b", "tab-c"):
            app_module.end_session(SimpleNamespace(session_hash=tab))


@pytest.mark.usefixtures("only_these_scans")
def test_a_tab_closed_while_its_scan_is_read_neither_holds_it_from_others_nor_closes_theirs(app_module, tmp_path,
                                                                                            monkeypatch):
    """The tab's close runs at once, the load it left behind ends later. Its scan closes no one else's to fit, and
    after a minute's grace (a tab whose connection merely dropped goes on, and looks at it) another visitor's scan
    takes its place; the same tab's next load is its own, as before."""
    scan = save_nifti(tmp_path / "ct.nii.gz", torso_ct(), (5.0, 1.0, 1.0), modality="CT")
    tab = SimpleNamespace(session_hash="tab-closing")
    read = app_module.load_volume

    def closed_while_read(*args, **kwargs):
        app_module.end_session(tab)  # the visitor closes the tab while the file is read
        return read(*args, **kwargs)

    def load(hash_: str, seed: int = 0) -> dict:
        return _upload_as(app_module, tmp_path, hash_, seed=seed)

    idle = load("tab-idle")["session"]  # another visitor's scan, unused for ten minutes
    size = idle.volume.data.nbytes
    idle.last_used = idle.loaded_at = time.monotonic() - app_module.MAKE_ROOM_IDLE_S
    monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", int(size * 1.5))
    monkeypatch.setattr(app_module, "load_volume", closed_while_read)
    refused = named(app_module, app_module.load_scan([str(scan)], None, tab))
    assert refused["session"] is None and "lost its connection while the scan was read" in refused["status"]
    assert idle.volume is not None  # not closed for a page that may be gone

    monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", int(size * 2.5))
    late = named(app_module, app_module.load_scan([str(scan)], None, tab))["session"]
    assert late.volume is not None and late.busy  # a minute's grace for a tab that goes on
    late.last_used -= app_module.CLOSED_TAB_GRACE_S
    late.loaded_at -= app_module.CLOSED_TAB_GRACE_S
    monkeypatch.setattr(app_module, "load_volume", read)
    idle.in_use()  # its visitor is back
    newcomer = load("tab-new", seed=1)["session"]  # the closed tab's scan, unused, makes room
    assert newcomer.volume is not None and late.volume is None and idle.volume is not None
    monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", 10 * size)
    again = named(app_module, app_module.load_scan([str(scan)], None, tab))["session"]  # the tab goes on
    assert again.volume is not None and again.busy
    for hash_ in ("tab-closing", "tab-idle", "tab-new"):
        app_module.end_session(SimpleNamespace(session_hash=hash_))


@pytest.mark.usefixtures("only_these_scans")
def test_a_pets_mip_frames_count_in_the_memory_budget(app_module, tmp_path, monkeypatch):
    """A PET's MIP keeps its 36 frames once drawn: the budget counts them beside its voxels, so a PET whose voxels
    alone would fit is refused where the two do not."""
    pet = save_nifti(tmp_path / "pet.nii.gz", np.where(torso_ct() < -500, 0.05, 1.0), (4.0, 4.0, 4.0), modality="PT")
    voxels = 40 * 64 * 64 * 4
    frames = 36 * 40 * 64 * 4  # 36 frames of 40 rows and 64 columns (the grid's side: 64 voxels of 4 mm)
    for budget, fits in ((voxels + frames // 2, False), (voxels + frames, True)):
        monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", budget)
        tab = SimpleNamespace(session_hash=f"tab-p{budget}")
        outputs = named(app_module, app_module.load_scan([str(pet)], None, tab))
        assert (outputs["session"] is not None) == fits, budget
        app_module.end_session(tab)


@pytest.mark.usefixtures("only_these_scans")
def test_a_scan_never_encoded_makes_room_after_ten_minutes(app_module, tmp_path, monkeypatch):
    """An API client that loads scans and never asks for their encoding holds them no longer than anyone."""
    first = _upload_as(app_module, tmp_path, "tab-x")["session"]
    monkeypatch.setattr(app_module, "SCAN_MEMORY_BYTES", int(first.volume.data.nbytes * 1.5))
    try:
        first.loaded_at -= app_module.MAKE_ROOM_IDLE_S
        first.last_used -= app_module.MAKE_ROOM_IDLE_S
        second = _upload_as(app_module, tmp_path, "tab-y", seed=1)["session"]
        assert second.volume is not None and first.volume is None
    finally:
        for tab in ("tab-x", "tab-y"):
            app_module.end_session(SimpleNamespace(session_hash=tab))


def test_a_scan_unused_for_an_hour_is_released_and_its_visitor_told(app_module, tmp_path):
    """A tab left open, or an API client that never says goodbye, does not hold a scan (and its report file)
    for good: the sweep releases it after an hour without use, and the visitor is told so."""
    session = _upload_as(app_module, tmp_path, "tab-idle")["session"]
    list(app_module.generate_report(session, 8, 0.0, 1.0))
    folder = session.folder
    assert app_module.release_idle_sessions(app_module.SESSION_IDLE_S) == 0  # just used
    session.last_used -= app_module.SESSION_IDLE_S
    assert app_module.release_idle_sessions(app_module.SESSION_IDLE_S) == 1
    assert session.volume is None and not folder.exists()
    told = "closed after 60 minutes without use; load it again"
    assert told in list(app_module.generate_report(session, 8, 0.0, 1.0))[-1][0]
    _, question = list(app_module.chat("Where is the lesion?", session, 8, 0.0, 1.0))[-1]
    assert question == "Where is the lesion?"  # kept in the box, to ask again once the scan is loaded


def test_an_example_is_picked_by_its_row_or_its_name(app_module, tmp_path, monkeypatch):
    """The examples table sends the row's index (unchecked); an API client may send the name: both load it, and
    anything else is one sentence that names the examples."""
    folder = tmp_path / "examples"
    folder.mkdir()
    for name in ("b_scan", "a_scan"):
        save_nifti(folder / f"{name}.nii.gz", torso_ct(), (5.0, 1.0, 1.0), modality="CT")
    monkeypatch.setattr(app_module, "EXAMPLES_DIR", folder)
    assert app_module.load_example(1, None)[0].label == "example: b scan"
    assert app_module.load_example("a scan", None)[0].label == "example: a scan"
    assert app_module.load_example(["a scan"], None)[0].label == "example: a scan"
    for junk in (99, -1, True, "c scan", None, {"x": 1}):
        outputs = named(app_module, app_module.load_example(junk, None))
        assert outputs["session"] is None and "choose one of 'a scan', 'b scan'" in outputs["status"], junk


def test_an_example_shows_its_true_findings_apart_and_questions_for_its_modality(app_module, ct_nifti):
    """An example phantom comes with the report it was made with (closed, under the model's report), to check the
    model against; an upload has none. The suggested questions fit the scan: none about lungs on a brain MR."""
    truths = json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
    for name, label in (("ct_chest_abdomen.nii.gz", "ct chest abdomen"), ("mr_brain.nii.gz", "mr brain")):
        outputs = named(app_module, app_module.load_example(label, None))
        suggested = [sample[0] for sample in outputs["suggestions"].constructor_args["samples"]]
        box, truth = outputs["truth_box"], outputs["truth"]
        assert box["visible"] is True and box["open"] is False
        assert truths[name]["report"] in truth and "never shown it" in truth
        if name.startswith("mr"):
            assert "MR sequence" in " ".join(suggested) and not any("lung" in q or "CT" in q for q in suggested)
        else:
            assert "Which contrast phase is this CT?" in suggested
        outputs["session"].release()
    session, outputs = loaded(app_module, [ct_nifti])
    assert outputs["truth_box"]["visible"] is False and outputs["truth"] == ""  # an upload: no truth to show
    session.release()


def test_an_examples_true_findings_name_the_slice_through_each_lesions_centre(app_module):
    """As the viewer counts: from 1 at the feet. The slice named is the middle of the run of slices through which
    the lesion shows along its centre's line (so one slice off is caught)."""
    truths = json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
    linked = []  # (example, slice named)
    for name, entry in truths.items():
        volume = load_volume(ROOT / "assets" / "examples" / name)
        truth = app_module.example_truth(ROOT / "assets" / "examples" / name, volume.shape[0])
        # each a link that shows it (viewer.js writes "number count", or "number-window count", into a hidden box)
        links = re.findall(r"\[axial slice (\d+)\]\(#axial-\1-(\d+)-(\d+)(?:-([a-z]+))?\) of \d+", truth)
        named_slices = [int(number) for number, *_ in links]
        assert len(named_slices) == len(entry["lesions"]) > 0, truth
        for lesion, (_, row, column, seen_in) in zip(entry["lesions"], links, strict=True):
            assert [int(row), int(column)] == [round(c) + 1 for c in lesion["center_voxel"][1:]]  # its centre
            assert seen_in == ("lung" if entry["modality"] == "CT" and lesion["organ"] == "lung" else ""), truth
        for lesion, number in zip(entry["lesions"], named_slices, strict=True):
            _, y, x = (round(c) for c in lesion["center_voxel"])
            shows = np.abs(volume.data[:, y, x] - lesion["value"]) < 0.25 * abs(lesion["value"])
            assert shows[number - 1], (name, number)
            low = high = number - 1
            while low > 0 and shows[low - 1]:
                low -= 1
            while high < len(shows) - 1 and shows[high + 1]:
                high += 1
            assert abs((low + high) / 2 - (number - 1)) <= 0.5, (name, lesion["kind"], number, low, high)
            linked.append((name, number))
    name, number = linked[0]  # a link followed: the viewer shows that slice
    session, _ = loaded(app_module, [ROOT / "assets" / "examples" / name])
    _, y, x = (round(c) for c in truths[name]["lesions"][0]["center_voxel"])
    plane, slider, view, window = app_module.jump_to_linked_slice(session, f"{number}-{y + 1}-{x + 1} 3", "bone")
    assert plane == "axial" and slider["value"] == number and f"Axial {number} / " in view
    assert "window bone" in view and window == gr.skip()  # the window the viewer had
    assert 'class="spot-mark"' in view and "cross-hair: the lesion's centre, from the true findings" in view
    slider, view, _ = app_module.change_plane(session, "coronal", "bone")  # the other planes open through it
    assert slider["value"] == y + 1 and 'class="spot-mark"' in view
    link = f"{number}-{y + 1}-{x + 1}-lung 4"
    plane, slider, view, window = app_module.jump_to_linked_slice(session, link, "soft tissue")
    assert slider["value"] == number and "window lung" in view and window == "lung"  # a ground-glass nodule shows
    for no_link in ("", f"{number} 5", "a-b-c 6"):
        assert app_module.jump_to_linked_slice(session, no_link, "auto") == (gr.skip(),) * 4
    session.release()


def test_a_scan_read_as_another_modality_starts_again_as_that_modality(app_module, tmp_path, monkeypatch):
    """A PET NIfTI that does not say so loads as "other"; the visitor names it PET: its windows (inverted among them),
    card and suggested questions become a PET's and the conversation starts again (the model's input changed),
    the scan's voxels not read again; the same modality again changes nothing, and an unknown one is a sentence."""
    import nibabel as nib

    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(np.abs(torso_ct()).transpose(2, 1, 0), np.diag([1.0, 1.0, 5.0, 1.0])), path)
    session, outputs = loaded(app_module, [path])
    assert session.volume.modality == "OT" and outputs["modality"]["value"] == "OT"
    session.messages = [{"role": "user", "content": "Which organ?"}, {"role": "assistant", "content": "liver"}]
    voxels = session.volume.data
    said = []
    monkeypatch.setattr(app_module.gr, "Info", lambda message, *args, **kwargs: said.append(message))
    outputs = named(app_module, app_module.change_modality("PT", session))
    assert said == ["The scan is read as PET now: the report and the conversation about it start again."]
    pet = outputs["session"]
    assert pet is not session and pet.volume.modality == "PT" and pet.messages == [] and outputs["chatbot"] == []
    assert pet.volume.data is voxels and session.volume is None  # the old session let go of the scan
    assert "inverted" in [value for _, value in outputs["window"]["choices"]] and outputs["modality"]["value"] == "PT"
    assert "PET, as chosen on this page" in outputs["card"] and "does not say which modality" not in outputs["card"]
    assert "What imaging modality is this?" in [q for q, in outputs["suggestions"].constructor_args["samples"]]
    assert outputs["status"] == "The model is reading the scan …"
    # the box sends its value again when it loses the focus: nothing changes (on the page the event ends unseen at
    # its first step, `reading_as`)
    assert app_module.change_modality("PT", pet) == (pet, *[gr.skip()] * (len(app_module.LOAD_OUTPUTS) - 1))
    with pytest.raises(gr.Error) as unchanged:
        app_module.reading_as("PT", pet)
    assert not unchanged.value.visible and app_module.reading_as("MR", pet) == "Reading the scan …"
    refused = named(app_module, app_module.change_modality("SPECT", pet))
    assert refused["session"] is pet and pet.volume.modality == "PT"
    assert "'SPECT' is not a modality" in refused["status"]
    assert refused["modality"]["value"] == "PT"  # the list goes back to what the scan is read as
    stream = app_module.generate_report(pet, 1000, 0.0, 1.0)
    next(stream)
    mr = app_module.change_modality("MR", pet)[0]  # while a report streams: it ends quietly, as for a new scan
    assert list(stream) == [(app_module.REPORT_PLACEHOLDER, app_module.report_download(None))]
    assert mr.report == "" and not [t for t in threading.enumerate() if t.name == "medvlm-generate"]
    mr.release()


def test_a_pet_series_says_what_its_values_measure(app_module, tmp_path):
    """A PET series states its values' unit ((0054,1001) Units): the card, the caption's range and the 3D threshold
    name it (Bq/mL, or SUV), where before they said "intensity"; a series that states none names none."""
    import pydicom

    uptake = np.full((6, 24, 24), 200.0, np.float32)
    uptake[:, 8:16, 8:16] = 4000.0
    for units, said in (("BQML", "Bq/mL"), ("GML", "SUV (g/mL)"), (None, "")):
        folder = tmp_path / f"pet-{units}"
        for path in save_dicom_series(folder, uptake, (4.0, 4.0, 4.0), "PT"):
            if units:
                header = pydicom.dcmread(path)
                header.Units = units
                header.save_as(path)
        session, outputs = loaded(app_module, [folder])
        caption = app_module.slice_html(session, "axial", "auto", 3)
        if said:
            assert f"**Values** | {app_module.shown(said)} |" in outputs["card"]
            bracketed = {"Bq/mL": "Bq/mL", "SUV (g/mL)": "SUV, g/mL"}[said]  # not "(… SUV (g/mL))"
            assert f" {bracketed})" in caption
            assert outputs["threshold"]["label"] == f"Surface threshold ({bracketed})"
            suv_scales = [value for _, value in outputs["window"]["choices"] if value.startswith("SUV")]
            assert suv_scales == (["SUV 0-5", "SUV 0-5 inverted", "SUV 0-10 inverted"] if units == "GML" else [])
            as_mr = named(app_module, app_module.change_modality("MR", session))  # read as another modality: no unit
            assert "**Values**" not in as_mr["card"] and as_mr["threshold"]["label"] == "Surface threshold (intensity)"
            session = as_mr["session"]
        else:
            assert "**Values** | unit not stated in the file |" in outputs["card"]  # said, not left out
            assert outputs["threshold"]["label"] == "Surface threshold (intensity)"
        session.release()


def test_the_line_under_the_report_quotes_the_checkpoints_own_held_out_scores(app_module):
    """Under the report: check it against the images, with how often this checkpoint was right on held-out phantoms
    where it ships `medvlm eval`'s scores (the demo checkpoint does); a sentence without figures where it does
    not."""
    from medvlm.pipeline import DEMO_CHECKPOINT, Pipeline

    tiny = app_module.PIPELINE
    assert app_module.report_caveat(tiny) == ("*Check every finding against the images: a fluent report is not a "
                                              "correct one.*")
    demo = Pipeline(tiny.model, tiny.tokenizer, "demo checkpoint", folder=DEMO_CHECKPOINT)
    scores = json.loads((DEMO_CHECKPOINT / "eval_heldout.json").read_text())
    caveat = app_module.report_caveat(demo)
    assert f"on {scores['n']} held-out phantoms" in caveat
    assert f"named {scores['finding_recall']:.0%} of their findings" in caveat
    assert f"right answer to {scores['closed_accuracy']:.0%} of multiple-choice questions" in caveat
    assert "a side or an organ it names" not in caveat  # said of the phantom-trained demo model only
    shipped_demo = SimpleNamespace(held_out_scores=lambda: None, describe=lambda: {"demo": True})
    assert "mostly the modality: a side or an organ it names may not be the scan's" in app_module.report_caveat(
        shipped_demo)  # it names the right lung for a scan and its mirror image alike


def test_stop_ends_the_generation_thread(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    stream = app_module.generate_report(session, 1000, 0.0, 1.0)
    next(stream)
    app_module.stop_generation(session)
    rest = list(stream)
    assert len(rest) == 1 and rest[0][0].endswith(app_module.REPORT_STOPPED)  # no chunk after Stop: the note
    assert not [t for t in threading.enumerate() if t.name == "medvlm-generate"]


def test_stop_is_enabled_only_while_a_report_or_answer_is_written_or_waits(app_module, ct_nifti):
    """Generate report and Ask start disabled, until a scan is loaded. Stop starts disabled; asking for a report
    enables it until the report is written, and while a question asked
    meanwhile still waits it stays enabled; Stop (which cancels what waits) disables it. Without a scan, asking
    enables nothing."""
    by_id = {c.get("props", {}).get("elem_id"): c for c in app_module.build_demo().get_config_file()["components"]}
    assert by_id["stop-button"]["props"]["interactive"] is False  # before any scan
    # ... and Generate report and Ask, until there is a scan to ask about, and the plane and window, to view
    assert by_id["report-button"]["props"]["interactive"] is by_id["ask-button"]["props"]["interactive"] is False
    assert by_id["plane"]["props"]["interactive"] is by_id["window-select"]["props"]["interactive"] is False

    def enabled(update):
        return update["interactive"]

    assert app_module.asked_to_write("report", None) == gr.skip()  # no scan: nothing will be written
    session, outputs = loaded(app_module, [ct_nifti])
    assert enabled(outputs["report_button"]) and enabled(outputs["ask_button"])
    assert enabled(outputs["plane"]) and enabled(outputs["window"])
    assert enabled(app_module.asked_to_write("report", session))  # Generate report
    reporting = app_module.generate_report(session, 16, 0.0, 1.0)
    next(reporting)  # the report leaves the queue and streams
    assert enabled(app_module.stop_button_state(session))
    app_module.asked_to_write("chat_submit", session)  # a question asked (Enter) while the report streams: it waits
    list(reporting)
    assert enabled(app_module.stop_button_state(session))  # the report ended, the question still waits
    list(app_module.chat("Which organ shows an abnormality?", session, 16, 0.0, 1.0, asked_by="chat_submit"))
    assert not enabled(app_module.stop_button_state(session))  # both written: nothing to stop
    app_module.asked_to_write("report", session)
    app_module.stop_generation(session)  # Stop cancels the report waiting in the queue
    assert not enabled(app_module.stop_button_state(session))


def test_stop_before_an_answer_began_says_it_was_stopped(app_module, ct_nifti):
    """Stop while a question's answer has not begun (its handler is cancelled, and may end after Stop's view of the
    conversation is sent): the question shows with its answer marked stopped, not as a question left unanswered."""
    session, _ = loaded(app_module, [ct_nifti])
    earlier = [{"role": "user", "content": "Is there a lesion?"}, {"role": "assistant", "content": ""}]  # ended empty
    session.messages = [*earlier, {"role": "user", "content": "Where is the lesion?"},
                        {"role": "assistant", "content": ""}]  # as `chat` appends it, before it begins
    session.unbegun = session.messages[-1]
    assert app_module.chat_view(session) == [earlier[0], {"role": "user", "content": "Where is the lesion?"}]
    app_module.stop_generation(session)
    assert app_module.chat_view(session) == [earlier[0], {"role": "user", "content": "Where is the lesion?"},
                                             {"role": "assistant", "content": "[stopped before the answer began]"}]


def test_stop_or_clear_just_after_a_press_withdraws_the_request_the_page_sends_after_them(app_module, ct_nifti):
    """The page sends a question's request a moment after its first step (`asked_to_write`) returns, too late for
    a Stop or Clear pressed meanwhile to cancel it: that question is not answered. After Stop it shows as stopped
    before its answer began; after Clear the conversation stays empty and the report unwritten."""
    session, _ = loaded(app_module, [ct_nifti])
    app_module.asked_to_write("chat_submit", session)
    app_module.stop_generation(session)  # Stop, before the page sent the question
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0, asked_by="chat_submit"))
    assert app_module.chat_view(session) == [{"role": "user", "content": "Is there a lesion?"},
                                             {"role": "assistant", "content": "[stopped before the answer began]"}]
    assert not app_module.stop_button_state(session, ended="chat_submit")["interactive"]
    app_module.asked_to_write("chat_submit", session)  # asked again: answered
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0, asked_by="chat_submit"))
    assert app_module.chat_view(session)[-1]["content"].strip()
    assert "stopped" not in session.messages[-1]
    app_module.asked_to_write("report", session)
    app_module.asked_to_write("chat", session)
    app_module.clear_conversation(session)  # Clear all, before the page sent either
    assert list(app_module.generate_report(session, 16, 0.0, 1.0)) == [(gr.skip(), gr.skip())]
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0, asked_by="chat"))
    assert session.report == "" and app_module.chat_view(session) == []
    app_module.asked_to_write("chat", session)
    app_module.stop_generation(session)  # withdrawn, and then cancelled after all: the next press is answered
    app_module.asked_to_write("chat", session)
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0, asked_by="chat"))
    assert app_module.chat_view(session)[-1]["content"].strip() and "stopped" not in session.messages[-1]
    # An API client asks without the page's first step: Stop before its request withdraws nothing
    app_module.stop_generation(session)
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0))
    assert "stopped" not in session.messages[-1]
    # A session closed (idle, or to make room) while its question waits: the question is not answered "stopped",
    # the visitor is told why the scan was closed
    app_module.asked_to_write("chat", session)
    session.close("The scan was closed to make room for other visitors; load it again.")
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0, asked_by="chat"))
    assert app_module.chat_view(session) == []


def test_a_button_pressed_again_while_its_request_is_pending_leaves_stop_to_end_with_it(app_module, ct_nifti):
    """Gradio sends a button's event once until it ends: Generate report (or Ask) pressed again while its report
    waits or streams asks for nothing, and Stop is disabled once the one report is written. A question asked by
    another way (Enter) meanwhile does wait, and keeps Stop enabled until it is answered."""
    session, _ = loaded(app_module, [ct_nifti])
    app_module.asked_to_write("report", session)
    assert app_module.asked_to_write("report", session) == gr.skip()  # pressed again while the report waits
    reporting = app_module.generate_report(session, 16, 0.0, 1.0)
    next(reporting)
    assert app_module.asked_to_write("report", session) == gr.skip()  # ... and while it streams
    assert app_module.asked_to_write("chat_submit", session)["interactive"]  # Enter in the question box: it waits
    list(reporting)
    assert app_module.stop_button_state(session)["interactive"]
    list(app_module.chat("Is there a lesion?", session, 16, 0.0, 1.0, asked_by="chat_submit"))
    assert not app_module.stop_button_state(session)["interactive"]
    # Pressed again in the moment between its handler's return and the page letting go of the event: the page drops
    # the press, and the event's own step after it says so (Stop is not left waiting for it)
    list(app_module.generate_report(session, 16, 0.0, 1.0))
    assert app_module.asked_to_write("report", session)["interactive"]
    assert not app_module.stop_button_state(session, ended="report")["interactive"]
    # After Stop the page holds the event no more: pressed again, it asks for a report, which keeps Stop enabled
    # even when the stopped report's handler returns after that press
    stopped = app_module.generate_report(session, 1000, 0.0, 1.0)
    next(stopped)
    app_module.stop_generation(session)
    assert app_module.asked_to_write("report", session)["interactive"]
    list(stopped)
    assert app_module.stop_button_state(session)["interactive"]
    list(app_module.generate_report(session, 16, 0.0, 1.0))
    assert not app_module.stop_button_state(session)["interactive"]


def _another_scan(tmp_path, seed: int) -> Path:
    """A CT of its own content (its visual tokens are cached by no earlier test)."""
    return save_nifti(tmp_path / f"other-{seed}.nii.gz", torso_ct(seed=seed), (5.0, 1.0, 1.0), modality="CT")


def test_a_new_scan_while_the_report_streams_ends_the_report_quietly(app_module, ct_nifti, tmp_path):
    session, _ = loaded(app_module, [ct_nifti])
    stream = app_module.generate_report(session, 1000, 0.0, 1.0)
    next(stream)
    fresh, _ = loaded(app_module, [_another_scan(tmp_path, 21)], session)  # the user uploads another scan
    # no more text, nor a download of the old scan's report: the empty report last, or Gradio's final message would
    # repeat the last text sent
    no_download = {"__type__": "update", "value": None, "interactive": False}
    assert list(stream) == [(app_module.REPORT_PLACEHOLDER, no_download)]
    assert fresh.report == "" and fresh.folder is None
    assert not [t for t in threading.enumerate() if t.name == "medvlm-generate"]


def test_a_new_scan_while_an_answer_streams_keeps_it_out_of_the_new_conversation(app_module, ct_nifti, tmp_path):
    session, _ = loaded(app_module, [ct_nifti])
    stream = app_module.chat("Where is the lesion?", session, 1000, 0.0, 1.0)
    next(stream)
    fresh, _ = loaded(app_module, [_another_scan(tmp_path, 22)], session)
    assert list(stream) == [([], gr.skip())]  # the new scan's (empty) conversation, last: the chatbot keeps it
    assert fresh.messages == []


def test_an_example_picked_while_the_scan_is_encoded_changes_nothing(app_module, tmp_path, monkeypatch):
    """The old scan's kept slices do not reach the new scan's page, and its visual tokens are not cached."""
    session, _ = loaded(app_module, [_another_scan(tmp_path, 23)])
    old_fingerprint = session.volume.fingerprint
    model = app_module.PIPELINE.model
    choose = model.choose_slices
    replaced = []

    def choose_while_another_scan_loads(*args, **kwargs):
        replaced.append(loaded(app_module, [_another_scan(tmp_path, 24)], session)[0])
        return choose(*args, **kwargs)

    monkeypatch.setattr(model, "choose_slices", choose_while_another_scan_loads)
    outputs = app_module.encode_scan(session)
    assert replaced and outputs == (gr.skip(),) * 3
    assert replaced[0].kept_slices == []
    assert old_fingerprint not in app_module.PIPELINE._encodings


def test_a_load_cancels_the_old_scans_encoding_but_not_a_report_or_answer(app_module):
    """Uploading, uploading a folder or picking an example cancels an encoding in flight; a report or answer is
    left to stop itself when a new scan replaces its own (cancelled, it would end mid-sentence with no note, and
    an upload that is refused would cut off the report of the scan that stays)."""
    functions = app_module.demo.fns.values()
    ids = {function.api_name: function._id for function in functions}
    encodes = {ids[name] for name in ("encode_scan", "encode_folder", "encode_example")}
    answers = {ids[name] for name in ("report", "chat", "chat_submit", "chat_suggested")}
    for load in ("load_scan", "load_folder", "load_example"):
        first = app_module.demo.fns[ids[load]]
        while first.trigger_after is not None:  # a load follows the status line's "Reading the scan …"
            first = app_module.demo.fns[first.trigger_after]
        (target,) = first.targets
        cancelled = {fn_id for function in functions if target in function.targets for fn_id in function.cancels}
        assert encodes <= cancelled and not answers & cancelled, load


def test_a_refused_upload_leaves_the_report_being_written_to_its_end(app_module, ct_nifti, tmp_path):
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    stream = app_module.generate_report(session, 24, 0.0, 1.0)
    next(stream)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a scan")
    with pytest.warns(UserWarning):
        refused = named(app_module, app_module.load_scan([str(tmp_path / "photo.jpg")], session))
    assert refused["session"] is session and refused["status"].startswith("⚠️")
    text, download = list(stream)[-1]
    assert download["interactive"] is True and "Stopped" not in text


def test_a_report_stopped_by_a_question_is_not_offered_as_finished(app_module, ct_nifti):
    """A question asked while the report streams stops the report (one generation at a time): the report says
    it is incomplete, and its download is not offered, whatever the question's own generation does."""
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    reporting = app_module.generate_report(session, 64, 0.0, 1.0)
    next(reporting)
    list(app_module.chat("Which organ is abnormal?", session, 4, 0.0, 1.0))
    text, download = list(reporting)[-1]
    assert text.endswith(app_module.REPORT_STOPPED) and download["interactive"] is False


def test_after_stop_or_clear_the_page_shows_what_the_session_holds(app_module, ct_nifti):
    """Gradio cancels the running event at Stop and Clear, and a chunk it had already sent can reach the page after
    their reply: a queued view of the session follows both, so the page ends as the session is. A report cut
    off by the cancel (its generator closed at a chunk) is marked incomplete there, with no download."""
    functions = app_module.demo.fns.values()
    ids = {function.api_name: function._id for function in functions}
    for button in ("stop", "clear"):
        following = [function for function in functions
                     if function.trigger_after == ids[button] and function.fn is app_module.conversation_view]
        assert len(following) == 1 and following[0].queue is not False, button
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    reporting = app_module.generate_report(session, 64, 0.0, 1.0)
    first_text, _ = next(reporting)
    reporting.close()  # what Gradio's cancel does to the handler
    _, text, download = app_module.conversation_view(session)
    assert text == first_text + app_module.REPORT_STOPPED and download["interactive"] is False
    app_module.clear_conversation(session)
    assert app_module.conversation_view(session)[:2] == ([], app_module.REPORT_PLACEHOLDER)


def test_a_request_made_for_a_scan_since_replaced_changes_nothing(app_module, ct_nifti, tmp_path):
    """A report or question still waiting in the queue when a new scan loads was asked about the old scan: the page
    sent that scan's token with it, and it is not run on the new one."""
    session, outputs = loaded(app_module, [ct_nifti])
    old_token = outputs["scan_token"]
    assert old_token == session.token
    fresh, outputs = loaded(app_module, [_another_scan(tmp_path, 24)], session)
    assert outputs["scan_token"] == fresh.token != old_token
    assert list(app_module.generate_report(fresh, 8, 0.0, 1.0, old_token)) == [(gr.skip(), gr.skip())]
    assert list(app_module.chat("Where is the lesion?", fresh, 8, 0.0, 1.0, old_token)) == [(gr.skip(), gr.skip())]
    assert fresh.report == "" and fresh.messages == []
    assert list(app_module.generate_report(fresh, 8, 0.0, 1.0, fresh.token))[-1][1]["interactive"] is True
    # a refused upload keeps the token
    refused = named(app_module, app_module.load_scan([str(tmp_path / "missing.nii.gz")], fresh))
    assert refused["scan_token"] == gr.skip()


def test_the_ready_line_comes_in_the_view_the_visitor_went_to(app_module, ct_nifti):
    """The model reads the scan while the visitor scrolls: its kept slices arrive without moving the viewer back
    to where the load left it, and the ready line comes also when a report asked for first read the scan."""
    session, _ = loaded(app_module, [ct_nifti])
    app_module.change_plane(session, "coronal", "lung")
    app_module.show_slice(session, "coronal", "lung", 50)
    list(app_module.generate_report(session, 4, 0.0, 1.0))  # encodes the scan on its way
    status, _, view = app_module.encode_scan(session)
    assert status.startswith("Ready:") and "Coronal 50 / 64" in view and "window lung" in view
    assert app_module.encode_scan(session) == (gr.skip(), gr.skip(), gr.skip())
    # Read as another modality while the viewer showed coronal: the page's controls go back to the new scan's first
    # view (axial, its middle slice, its default window), and the ready view is that one, not the old one.
    again = app_module.change_modality("MR", session)[0]
    status, _, view = app_module.encode_scan(again)
    assert status.startswith("Ready:") and "Axial 21 / 40" in view and "window auto" in view
    again.release()


def test_a_report_or_answer_cut_off_at_its_token_limit_says_so(app_module, ct_nifti, monkeypatch):
    from medvlm.pipeline import CutOff

    monkeypatch.setattr(app_module, "CutOff", CutOff)  # the real marking (the tiny model never ends on its own)
    session, _ = loaded(app_module, [ct_nifti])
    text, download = list(app_module.generate_report(session, 8, 0.0, 1.0))[-1]
    assert text.endswith(app_module.REPORT_CUT_OFF.format(limit=8)) and download["interactive"] is False
    answer = list(app_module.chat("Which organ is abnormal?", session, 8, 0.0, 1.0))[-1][0][-1]["content"]
    assert answer.endswith(app_module.ANSWER_CUT_OFF.format(limit=8))
    assert not session.messages[-1]["content"].endswith("]")  # the model is not told
    # Ended by the model's context before Max new tokens (the scan and the conversation filled the rest): raising Max
    # new tokens would not help, and it is not what they are told
    monkeypatch.setattr(app_module.PIPELINE.model.config.text_config, "max_position_embeddings", 300)
    answer = list(app_module.chat("Which organ is abnormal?", session, 512, 0.0, 1.0))[-1][0][-1]["content"]
    assert answer.endswith(app_module.ANSWER_OUT_OF_CONTEXT) and "limit of" not in answer
    text, _ = list(app_module.generate_report(session, 512, 0.0, 1.0))[-1]
    assert text.endswith(app_module.REPORT_OUT_OF_CONTEXT)


def test_a_stopped_answer_says_so_and_the_model_is_not_told(app_module, ct_nifti, monkeypatch):
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    answering = app_module.chat("Which organ is abnormal?", session, 64, 0.0, 1.0)
    partial = next(answering)[0][-1]["content"]
    app_module.stop_generation(session)
    # What the page shows after Stop (`conversation_view`, which can run before the handler sees the stop): the
    # answer as far as it got, marked.
    assert app_module.conversation_view(session)[0][-1]["content"] == partial + app_module.ANSWER_STOPPED
    shown = list(answering)[-1][0]
    assert shown[-1]["content"].startswith(partial) and shown[-1]["content"].endswith(app_module.ANSWER_STOPPED)
    assert not session.messages[-1]["content"].endswith(app_module.ANSWER_STOPPED)
    given = []
    real_chat = app_module.PIPELINE.chat
    monkeypatch.setattr(app_module.PIPELINE, "chat", lambda encoding, messages, **kw: (given.append(messages),
                                                                                        real_chat(encoding, messages,
                                                                                                  **kw))[1])
    answered = list(app_module.chat("How large is it?", session, 4, 0.0, 1.0))[-1][0]
    assert answered[1]["content"].endswith(app_module.ANSWER_STOPPED)  # the stopped one still says so
    assert not answered[-1]["content"].endswith(app_module.ANSWER_STOPPED)  # the finished one does not
    assert all(set(message) == {"role", "content"} and "stopped" not in message["content"]
               for message in given[0])


def test_clear_while_the_report_streams_leaves_no_report_behind(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    stream = app_module.generate_report(session, 1000, 0.0, 1.0)
    next(stream)
    app_module.clear_conversation(session)
    list(stream)
    assert session.report == "" and session.folder is None  # no report file written for the cleared report


def test_clear_while_an_answer_streams_keeps_it_out_of_the_empty_conversation(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    stream = app_module.chat("Where is the lesion?", session, 1000, 0.0, 1.0)
    next(stream)
    app_module.clear_conversation(session)
    list(stream)
    assert session.messages == []
    answer = list(app_module.chat("Which organ is abnormal?", session, 8, 0.0, 1.0))[-1][0]
    assert [message["role"] for message in answer] == ["user", "assistant"]


def test_a_refused_question_is_not_kept_in_the_conversation(app_module, ct_nifti):
    """A question holding a control token is refused with a sentence, and the next question is answered."""
    session, _ = loaded(app_module, [ct_nifti])
    list(app_module.chat("Where is the lesion?", session, 8, 0.0, 1.0))
    for refused, sentence in (("What is <image> here?", "holds '&lt;image&gt;', one of the model's control tokens"),
                              ("why " * 600, "more than the 2,000 allowed")):  # the toast renders HTML
        with pytest.warns(UserWarning, match=sentence):  # gr.Warning outside a running app
            history, box = list(app_module.chat(refused, session, 8, 0.0, 1.0))[-1]
        assert box == refused.strip()  # left in the box, to edit
        assert [message["content"] for message in history][0::2] == ["Where is the lesion?"]
        assert [message["content"] for message in session.messages][0::2] == ["Where is the lesion?"]
    with pytest.warns(UserWarning, match="Type a question about the scan first"):  # Enter on an empty box
        assert list(app_module.chat("   ", session, 8, 0.0, 1.0))[-1][1] == ""
    # A conversation too long for the model's context: the refusal says how to start again on this page
    held = session.messages
    session.messages = [{"role": role, "content": "liver lesion " * 300} for role in ("user", "assistant") * 2]
    with pytest.warns(UserWarning, match=r"start a new conversation with the chat's bin icon, or Clear all\.$"):
        list(app_module.chat("Where is it?", session, 8, 0.0, 1.0))
    session.messages = held
    history = list(app_module.chat("Which organ is abnormal?", session, 8, 0.0, 1.0))[-1][0]
    assert [message["content"] for message in history][0::2] == ["Where is the lesion?", "Which organ is abnormal?"]


def test_a_blank_scan_shows_in_the_viewer_and_the_model_says_it_cannot_read_it(app_module, tmp_path, monkeypatch):
    """Every voxel NaN (read as 0): the slices show what the file holds, and the status line says why there will
    be no report instead of the model making one up."""
    path = save_nifti(tmp_path / "blank.nii.gz", np.full((20, 32, 32), np.nan, np.float32), (2.0, 1.0, 1.0))
    session, _ = loaded(app_module, [path])
    with pytest.warns(UserWarning, match="holds nothing for the model to read"):
        status, kept, view = app_module.encode_scan(session)
    assert status.startswith("⚠️ The scan holds nothing for the model to read (one value everywhere")
    assert kept == gr.skip() and view == gr.skip()  # no kept slices offered; the slice shown stays
    assert session.encoding is None and "slice-image" in app_module.slice_html(session, "axial", "auto", 10)
    disabled = {"__type__": "update", "interactive": False}
    assert app_module.asking_buttons(session) == (disabled, disabled)  # Generate report and Ask: nothing to ask
    # A report asked for all the same is refused with that sentence at once (the model does not read the scan again
    # only to refuse it again), and Stop is disabled after it: there is nothing to stop.
    monkeypatch.setattr(app_module, "encode_on_gpu", lambda volume: pytest.fail("the scan was read again"))
    assert app_module.asked_to_write("report", session)["interactive"]
    report, _ = list(app_module.generate_report(session, 16, 0.0, 1.0))[-1]
    assert report.startswith("*⚠️ The scan holds nothing for the model to read")
    assert not app_module.stop_button_state(session)["interactive"]
    with pytest.warns(UserWarning, match="^The scan holds nothing for the model to read"):  # a question: said
        assert list(app_module.chat("Where is the lesion?", session, 16, 0.0, 1.0))[-1] == ([], "Where is the lesion?")


def test_numbers_typed_past_a_sliders_ends_go_to_the_nearest_end_and_the_box_says_so(app_module, ct_nifti):
    """The slice and threshold boxes take any number (their events skip gr.Slider's range check): past an end
    it shows the last (or first) slice, or the surface at that end, and the box is set to it; an emptied slice
    box shows the middle slice."""
    session, outputs = loaded(app_module, [ct_nifti])
    count, (low, high) = outputs["slider"]["maximum"], session.threshold_range
    for typed, shown_number in ((999, count), (-5, 1), (None, count // 2 + 1)):
        view, box = app_module.show_slice(session, "axial", "soft tissue", typed)
        assert f"Axial {shown_number} / {count}" in view and box == shown_number
    view, box = app_module.show_slice(session, "axial", "soft tissue", 3)
    assert "Axial 3 /" in view and box == gr.skip()  # in range: the box is left as typed
    view, box = app_module.show_slice(session, "axial", "soft tissue", 2.9)
    assert "Axial 3 /" in view and box == 3  # the nearest slice, and the box says which
    slider, view, _ = app_module.change_plane(session, None, "soft tissue")  # an API client's plane: none: axial,
    assert "Axial 3 / " in view and slider["value"] == 3  # where the axial view was
    plot, box = app_module.redraw_3d(session, 99999.0)
    drawn_at = plot.data[0].name if plot.data else plot.layout.annotations[0].text
    assert box == high and f"{high:g}" in drawn_at
    middle = (low + high) / 2
    assert app_module.redraw_3d(session, middle)[1] == gr.skip()
    for sent in ("abc", [3], float("nan"), float("inf"), True, 10**400):  # what an API client can send, unchecked
        view, box = app_module.show_slice(session, "no such plane", "soft tissue", sent)
        assert f"Axial {count // 2 + 1} / {count}" in view and box == count // 2 + 1
        # nothing drawn anew; the box says the threshold the surface is drawn at
        assert app_module.redraw_3d(session, sent) == (gr.skip(), middle)


def test_a_question_shows_in_the_chat_as_typed_not_as_markdown(app_module):
    """"3*4*5 mm" must not show with an italic 4: the chat does not render Markdown."""
    config = app_module.build_demo().get_config_file()
    chatbot = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "chatbot")
    assert chatbot["props"]["render_markdown"] is False


def test_what_gradio_leaves_in_its_upload_folder_is_swept_after_an_hour(app_module, tmp_path, monkeypatch):
    """An upload cut off half-way leaves a partial file (here with a patient's name in its DICOM header) that
    Gradio never deletes; the app's sweep does, as it does Gradio's empty tmp files and emptied folders, and
    leaves what is recent, what a session keeps, and what Gradio's own sweep looks after."""
    uploads = tmp_path / "uploads"
    old = {"partial": uploads / "tmpab12cd34", "empty": uploads / "tmpq9x8w7v6", "folder": uploads / ("ab" * 32)}
    kept = {"recent": uploads / "tmpnew12345", "session file": uploads / "tmpkept1234",
            "gradio's": uploads / ("cd" * 32), "session": uploads / f"{app_module.SESSION_FOLDER_PREFIX}x1",
            "other": uploads / "scan.png", "not gradio's": uploads / "tmp", "empty, not gradio's": uploads / "data"}
    for path in [*old.values(), *kept.values()]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name in ("ab" * 32, "cd" * 32, "data") or path.name.startswith(app_module.SESSION_FOLDER_PREFIX):
            path.mkdir()
        else:
            path.write_bytes(b"DICM PatientName=Quimby^Harriet" if path.name == "tmpab12cd34" else b"")
    (kept["gradio's"] / "scan.nii.gz").write_bytes(b"scan")
    hour_ago = time.time() - 3700
    for path in [*old.values(), *kept.values()]:
        if path is not kept["recent"]:
            os.utime(path, (hour_ago, hour_ago))
    monkeypatch.setattr(app_module, "_SESSION_FILES", {str(kept["session file"])})
    monkeypatch.setattr(app_module.tempfile, "gettempdir", lambda: str(uploads))
    assert app_module.sweep_upload_leftovers(uploads, 3600) == []  # the system's temporary folder is shared
    monkeypatch.undo()
    monkeypatch.setattr(app_module, "_SESSION_FILES", {str(kept["session file"])})
    assert sorted(app_module.sweep_upload_leftovers(uploads, 3600)) == sorted(old.values())
    assert all(path.exists() for path in kept.values()) and not any(path.exists() for path in old.values())
    assert app_module.sweep_upload_leftovers(tmp_path / "never made", 3600) == []


def test_serving_the_page_starts_one_upload_sweep_and_log_filter(app_module, monkeypatch):
    """Served (twice here, as the tests serve it), the process sweeps its upload folder in one thread, and its log
    leaves out an upload cut off (`CutOffUploadNotice`) with one filter: none piles up with each launch."""
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **settings: settings)
    for _ in range(2):
        app_module.launch(app_module.build_demo(), server_port=7999)
    assert sum(thread.name == "medvlm-sweep" and thread.daemon for thread in threading.enumerate()) == 1
    log = logging.getLogger("uvicorn.error")
    for notice in (app_module.CutOffUploadNotice, app_module.UnknownEndpointNotice):
        assert sum(isinstance(kept, notice) for kept in log.filters) == 1


def test_a_constant_scan_of_huge_values_loads_with_its_page(app_module, tmp_path):
    """Extreme but finite values (a constant 1e38 array) get a slice image, a 3D range and a threshold."""
    path = tmp_path / "flat.npy"
    np.save(path, np.full((8, 32, 32), 1e38, dtype=np.float32))
    session, outputs = loaded(app_module, [path])
    assert session.volume is not None and not outputs["status"].startswith("⚠️")
    slider = outputs["threshold"]
    assert slider["minimum"] < slider["maximum"] and slider["minimum"] <= slider["value"] <= slider["maximum"]


def test_generation_settings_out_of_range_get_one_sentence(app_module, ct_nifti, monkeypatch):
    session, _ = loaded(app_module, [ct_nifti])
    report, _ = list(app_module.generate_report(session, 16, 0.5, 5.0))[-1]  # said in the report box
    assert report.startswith("*⚠️ Top-p 5.0 is out of range") and report.endswith(".*")
    assert not app_module._STOP_EVENTS
    # A temperature the slider's box takes but sampling cannot use (0.005) is read as 0, greedy, and said so
    said = []
    monkeypatch.setattr(app_module.gr, "Info", lambda message, *args, **kwargs: said.append(message))
    greedy = list(app_module.generate_report(session, 16, 0.0, 1.0))[-1][0]
    assert list(app_module.generate_report(session, 16, 0.005, 1.0))[-1][0] == greedy
    assert said == ["Temperature 0.005 is read as 0, greedy decoding: sampling starts at 0.01."]


def test_the_app_listens_on_this_machine_unless_told_otherwise(app_module, monkeypatch):
    class Served:  # stands in for gr.Blocks: what launch() would serve with
        def queue(self, **options):
            return self

        def launch(self, **settings):
            return settings

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app_module.launch(Served())["server_name"] == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "someone/medvlm-3d")  # a Hugging Face Space, even one that sets nothing else
    assert app_module.launch(Served())["server_name"] == "0.0.0.0"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what a Hugging Face Space sets
    assert app_module.launch(Served())["server_name"] == "0.0.0.0"
    spacefile = (ROOT / "Spacefile").read_text()  # Deta Space's proxy must reach the app too
    assert re.search(r'- name: GRADIO_SERVER_NAME\n(?:\s+\w+: .*\n)*?\s+default: "0\.0\.0\.0"', spacefile)


def served_in_process(app_module):
    """The page as `launch` serves it (its settings, queue included), but in this process with no socket: a
    client for Gradio's own routes."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    demo = app_module.build_demo()

    class InProcess:  # stands in for the Blocks `launch` serves, and hands its settings to the real one
        def queue(self, **options):
            demo.queue(**options)
            return self

        def launch(self, **settings):
            mountable = inspect.signature(gr.mount_gradio_app).parameters
            return gr.mount_gradio_app(FastAPI(), demo, "/", **{k: v for k, v in settings.items() if k in mountable})

    return TestClient(app_module.launch(InProcess()))


def test_a_file_over_the_upload_limit_is_refused_with_a_sentence(app_module, monkeypatch):
    """The page tells the browser the limit (it refuses a bigger file before sending it), and the server refuses
    one sent anyway, by an API client, with a sentence that names the limit; a file within it is taken."""
    from medvlm.limits import MAX_UPLOAD_BYTES

    assert served_in_process(app_module).get("/config").json()["max_file_size"] == MAX_UPLOAD_BYTES
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 1000)  # a gigabyte would take too long to send
    client = served_in_process(app_module)
    assert client.get("/config").json()["max_file_size"] == 1000
    refused = client.post("/gradio_api/upload", files={"files": ("scan.nii.gz", b"\0" * 1001)})
    assert refused.status_code == 413 and refused.text == "File size exceeded maximum allowed size of 1000 bytes."
    taken = client.post("/gradio_api/upload", files={"files": ("scan.nii.gz", b"\0" * 1000)})
    assert taken.status_code == 200
    (path,) = taken.json()
    assert Path(path).read_bytes() == b"\0" * 1000
    app_module._delete_uploads([path])


def test_max_new_tokens_past_the_cap_gets_the_caps_answer_and_says_so(app_module, ct_nifti, monkeypatch):
    """An API client can ask for any number of new tokens: past MAX_NEW_TOKENS it gets the report the cap gives,
    marked as cut off at the cap, and a warning; the library itself refuses such a number with a sentence."""
    import medvlm.pipeline
    from medvlm.errors import UserInputError
    from medvlm.pipeline import CutOff

    monkeypatch.setattr(app_module, "CutOff", CutOff)  # the real marking (the tiny model never ends on its own)
    monkeypatch.setattr(app_module, "MAX_NEW_TOKENS", 5)  # a cap the tiny model reaches at once
    monkeypatch.setattr(medvlm.pipeline, "MAX_NEW_TOKENS", 5)
    session, _ = loaded(app_module, [ct_nifti])
    with pytest.warns(UserWarning, match="At most 5 new tokens are generated per answer; asked for 50"):
        asked_for_more, download = list(app_module.generate_report(session, 50, 0.0, 1.0))[-1]
    at_the_cap = list(app_module.generate_report(session, 5, 0.0, 1.0))[-1][0]
    assert asked_for_more == at_the_cap != app_module.REPORT_PLACEHOLDER  # the same five tokens, greedy
    assert asked_for_more.endswith(app_module.REPORT_CUT_OFF.format(limit=5)) and download["interactive"] is False
    with pytest.raises(UserInputError, match="max new tokens 1000000 is out of range; use 1 to 5"):
        app_module.PIPELINE.chat(session.volume, [{"role": "user", "content": "Where?"}], max_new_tokens=10**6)
    session.release()


def test_uploads_never_read_are_swept_within_two_hours(app_module):
    every, older_than = app_module.demo.delete_cache
    assert every + older_than <= 2 * 3600


def test_examples_folder_may_be_empty(app_module, tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "EXAMPLES_DIR", tmp_path / "none")
    assert app_module.list_examples() == []
    outputs = named(app_module, app_module.load_example("ct torso", None))
    assert outputs["session"] is None and outputs["status"].startswith("⚠️")


def test_model_badge_names_checkpoint_and_device(app_module):
    badge = app_module.model_badge(app_module.PIPELINE)
    assert "cpu" in badge or "cuda" in badge
    assert app_module.PIPELINE.describe()["checkpoint"] in badge
    pinned = SimpleNamespace(describe=lambda: {**app_module.PIPELINE.describe(), "checkpoint": "org/model",
                                               "revision": "v1.2"})
    assert "`org/model` at revision `v1.2` on" in app_module.model_badge(pinned)  # which version serves the Space


def test_a_scan_memory_budget_of_no_number_stops_the_app_before_its_model_loads():
    """An operator's typo in MEDVLM_SCAN_MEMORY_MB is told at once, not after minutes of downloading weights."""
    env = {**os.environ, "MEDVLM_SCAN_MEMORY_MB": "1GB", "MEDVLM_CHECKPOINT": "/nonexistent/checkpoint",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "MEDVLM_SCAN_MEMORY_MB must be a number" in result.stderr
    assert "checkpoint" not in result.stderr and "loading" not in result.stdout + result.stderr


def test_an_unreachable_checkpoint_stops_the_app_with_one_line():
    env = {**os.environ, "MEDVLM_CHECKPOINT": "/nonexistent/checkpoint", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def app_started_with(monkeypatch, **environment: str):
    """app.py run afresh in this process (its model loads at import) with these environment variables set."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("app_started_afresh", ROOT / "app.py")
    started = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, started)
    spec.loader.exec_module(started)
    return started


def test_medvlm_revision_serves_that_revision_and_one_not_in_the_cache_stops_the_app_with_one_line(
        tmp_path, monkeypatch, capsys):
    """MEDVLM_REVISION pins which version of a Hub checkpoint a Space serves: the app runs that revision's weights
    and its badge names it; a revision the Hub (here its local cache, offline) does not hold stops it with one line."""
    import torch

    from tests.hub_stand_ins import hub_snapshot
    from tests.tiny_model import build_tiny_model

    cache, repo_id, weights = tmp_path / "hub", "someorg/medvlm-3d", {}
    for seed, branch, commit in ((0, "main", "a" * 40), (1, "v2", "b" * 40)):  # the same model, other weights
        torch.manual_seed(seed)
        model, tokenizer = build_tiny_model()
        snapshot = hub_snapshot(cache, repo_id, branch, commit)
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        weights[branch] = model.state_dict()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    served = app_started_with(monkeypatch, HF_HUB_OFFLINE="1", MEDVLM_CHECKPOINT=repo_id, MEDVLM_REVISION="v2")
    running = served.PIPELINE.model.state_dict()
    for branch, expected in (("v2", True), ("main", False)):
        assert all(torch.equal(running[name], tensor) for name, tensor in weights[branch].items()) is expected, branch
    badges = [c["props"]["value"] for c in served.demo.get_config_file()["components"]
              if repo_id in str(c.get("props", {}).get("value"))]
    assert len(badges) == 1 and f"`{repo_id}` at revision `v2` on" in badges[0]
    capsys.readouterr()

    with pytest.raises(SystemExit) as stopped:
        app_started_with(monkeypatch, MEDVLM_REVISION="v9")
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error
    assert (f"checkpoint '{repo_id}' at revision 'v9' is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
            "keeps it from being downloaded; download it once with the network, or check the repo id") in error


def test_a_refusal_reaches_the_page_as_its_sentence_from_a_zerogpu_worker(app_module, ct_nifti):
    """ZeroGPU hands back only gr.Error's message from its worker process (any other exception becomes its
    class name), so the GPU function itself ends a refused request with gr.Error and the sentence."""
    session, _ = loaded(app_module, [ct_nifti])
    encoding = app_module.encode_on_gpu(session.volume)
    with pytest.raises(gr.Error, match="one of the model's control tokens"):
        list(app_module.stream_on_gpu(encoding, [{"role": "user", "content": "Is <image> normal?"}], "none",
                                      8, 0.0, 1.0))
    with pytest.raises(gr.Error, match="temperature 500 is out of range"):
        list(app_module.stream_on_gpu(encoding, None, "none", 8, 500.0, 1.0))


def test_a_gpu_worker_gets_the_sessions_encoding_never_the_volume(app_module, ct_nifti, monkeypatch):
    """On ZeroGPU each GPU call may run in a worker process whose pipeline cache is empty, and its arguments are
    pickled across: the report and the answers reuse the encoding the session kept, and no volume crosses."""
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    crossed = []
    stream = app_module.stream_on_gpu
    monkeypatch.setattr(app_module, "stream_on_gpu", lambda *args: crossed.append(args) or stream(*args))
    encodings = []
    model = app_module.PIPELINE.model
    choose = model.choose_slices
    monkeypatch.setattr(model, "choose_slices", lambda *a, **k: encodings.append(1) or choose(*a, **k))
    app_module.PIPELINE._encodings.clear()  # what a fresh worker process holds
    assert list(app_module.generate_report(session, 8, 0.0, 1.0))
    assert list(app_module.chat("Where is the lesion?", session, 8, 0.0, 1.0))
    assert encodings == [] and len(crossed) == 2  # the scan was not encoded again
    assert all(len(pickle.dumps(args)) < 100_000 for args in crossed)  # the volume alone is 655 kB


def test_a_failed_upload_over_a_loaded_scan_keeps_its_warning(app_module, ct_nifti, tmp_path):
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    bad = tmp_path / "notes.nii"
    bad.write_text("not a scan")
    with pytest.warns(UserWarning):
        session, outputs = loaded(app_module, [bad], session)
    assert outputs["status"].startswith("⚠️") and session.volume is not None
    # what the model still answers about
    assert outputs["status"].endswith("The scan shown (uploaded scan) stays loaded.")
    status, _, _ = app_module.encode_scan(session)  # the load's chain runs on
    assert status == gr.skip(), "the warning was overwritten"  # the status line is left as the load set it


def test_a_refused_upload_is_not_named_on_the_page(app_module, tmp_path):
    """A file is often named for its patient: the warning and the status line call it "the uploaded file"."""
    import zipfile

    zipped = tmp_path / "study01.zip"  # a readable zip, its one file named for the patient in a folder named so
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("DOE_JANE_19610402/DOE_JANE_CT.nii.gz", b"not a scan")
    for name in ("Doe_Jane_1961-04-02.nii.gz", "Doe Jane CT.nii.gz", "Doe Jane CT.zip", zipped.name):
        bad = tmp_path / name
        if not bad.exists():
            bad.write_bytes(b"not a scan")
        with pytest.warns(UserWarning) as warned:
            _, outputs = loaded(app_module, [bad])
        for said in (outputs["status"], str(warned[0].message)):
            assert "doe" not in said.lower(), said
        assert "File the" not in outputs["status"], outputs["status"]  # the reason names it no more
        assert outputs["status"].startswith("⚠️ The uploaded file is not a readable"), outputs["status"]


def test_the_scan_card_pads_an_odd_number_of_facts_with_an_empty_cell(app_module, tmp_path):
    files = save_dicom_series(tmp_path / "series", torso_ct(), (5.0, 1.0, 1.0), series_number=None)
    card = loaded(app_module, files)[1]["card"]
    last_row = card.splitlines()[-1]
    assert last_row.endswith("|  |  |") and card.count("\n| **") == 4  # seven facts, then an empty pair


def test_the_upload_box_is_emptied_once_its_files_are_read(app_module):
    """The box would otherwise still list the deleted files, and send them again with the next upload."""
    emptying = [block for block in app_module.demo.fns.values() if block.fn is app_module.empty_upload]
    assert len(emptying) == 1 and emptying[0].outputs[0].label.startswith("Scan:")


def test_the_page_shares_nothing_and_its_bin_icon_and_threshold_box_act(app_module):
    demo = app_module.build_demo()
    config = demo.get_config_file()
    by_id = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
    chatbot, threshold = by_id["chatbot"], by_id["threshold-slider"]
    assert "share" not in chatbot["props"]["buttons"]  # Share would post the conversation to the Space's Discussions

    def handlers(component, event):
        return [d for d in config["dependencies"] if [component["id"], event] in map(list, d["targets"])
                and d["outputs"]]

    assert [d["api_name"] for d in handlers(chatbot, "clear")] == ["clear_chat"]  # else it empties only the screen
    redraw = handlers(threshold, "input")  # dragging, the number box's Enter, the arrow keys
    assert [d["api_name"] for d in redraw] == ["show_3d"] and redraw[0]["trigger_mode"] == "always_last"
    assert threshold["id"] in redraw[0]["outputs"]  # a number typed past an end is set back to it
    assert by_id["slice-slider"]["id"] in handlers(by_id["slice-slider"], "input")[0]["outputs"]
    typed = {fn.api_name: fn.preprocess for fn in demo.fns.values() if fn.api_name in ("show_3d", "show_slice")}
    assert typed == {"show_3d": False, "show_slice": False}  # a number typed past an end reaches the handler


@pytest.mark.parametrize(("modality", "unit"), [("CT", "HU"), ("PT", "intensity")])
def test_the_surface_threshold_opens_on_a_step_of_its_slider_and_names_its_unit(app_module, modality, unit):
    data = np.random.default_rng(4).gamma(2.0, 1.4803, (20, 32, 32)).astype(np.float32)  # PET-like, unround values
    if modality == "CT":
        data = data * 317.3 - 1000.0
    volume = Volume(data, (4.0, 2.0, 2.0), np.eye(4), modality, "nifti", "RAS")
    outputs = named(app_module, app_module._new_scan(volume, "test", None, None, time.monotonic()))
    threshold = outputs["threshold"]
    steps = threshold["value"] / threshold["step"]
    assert abs(steps - round(steps)) < 1e-6 and threshold["minimum"] <= threshold["value"] <= threshold["maximum"]
    assert threshold["value"] == round(threshold["value"], 6)  # the number box shows 0.7, not 0.7000000000000001
    assert threshold["label"] == f"Surface threshold ({unit})"
    outputs["session"].release()


def test_a_failed_encoding_leaves_no_stop_event_behind(app_module, ct_nifti, monkeypatch):
    session, _ = loaded(app_module, [ct_nifti])  # not encoded yet, as for an API client that asks at once

    def out_of_memory(volume):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(app_module, "encode_on_gpu", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(app_module.generate_report(session, 8, 0.0, 1.0))
    assert not any(key.startswith(f"{id(session)}-") for key in app_module._STOP_EVENTS)


def test_a_stopped_report_says_it_is_incomplete_and_is_not_offered_for_download(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    finished = list(app_module.generate_report(session, 16, 0.0, 1.0))
    assert finished[-1][1]["interactive"] is True  # a whole report: its download is offered

    stream = app_module.generate_report(session, 64, 0.0, 1.0)
    first_text, download = next(stream)
    assert download == {"__type__": "update", "value": None, "interactive": False}  # the old report's download goes
    app_module.stop_generation(session)  # what the Stop button does besides cancelling the event
    text, download = list(stream)[-1]
    assert text.startswith(first_text) and text.endswith(app_module.REPORT_STOPPED)
    assert "Only a whole report can be downloaded" in text  # why there is no download
    assert download["interactive"] is False


def test_the_chat_bin_forgets_the_conversation_and_keeps_the_report(app_module, ct_nifti):
    session, _ = loaded(app_module, [ct_nifti])
    app_module.encode_scan(session)
    list(app_module.generate_report(session, 8, 0.0, 1.0))
    list(app_module.chat("Where is the lesion?", session, 8, 0.0, 1.0))
    report = session.report
    assert app_module.clear_chat(session) == [] and session.messages == []
    assert session.report == report and report
    history = list(app_module.chat("Which organ is abnormal?", session, 8, 0.0, 1.0))[-1][0]
    assert history[0]["content"] == "Which organ is abnormal?" and len(history) == 2  # the old turns are gone

    answering = app_module.chat("Where is the lesion?", session, 64, 0.0, 1.0)
    next(answering)
    app_module.clear_chat(session)  # while the answer streams: it stops at once, and is not kept
    assert list(answering) == [([], gr.skip())]  # no chunk after the bin, and the empty conversation last
    assert session.messages == []
    reporting = app_module.generate_report(session, 16, 0.0, 1.0)
    next(reporting)
    app_module.clear_chat(session)  # a report streaming goes on to its end and its download
    assert list(reporting)[-1][1]["interactive"] is True


def test_the_ready_line_says_what_the_upload_left_out(app_module, tmp_path):
    files = save_dicom_series(tmp_path / "a", torso_ct(), (5.0, 1.0, 1.0), "CT")
    files += save_dicom_series(tmp_path / "b", np.zeros((3, 8, 8), np.float32), (5.0, 2.0, 2.0), "MR",
                               series_number=4)
    session, _ = loaded(app_module, files)
    status, _, _ = app_module.encode_scan(session)
    assert status.startswith("Ready") and "Note: the upload holds 1 other series, not shown (series 4: MR" in status


def test_a_small_pet_hot_spot_survives_the_3d_downsampling():
    from medvlm.view3d import figure_3d

    data = np.zeros((160, 160, 160), dtype=np.float32)  # 640 mm across at 4 mm: grid blocks of several voxels
    data[40:120, 40:120, 40:120] = 1.0  # a body
    data[78:80, 98:100, 58:60] = 10.0  # an 8 mm focus, ten times the body's uptake
    figure = figure_3d(Volume(data, (4.0, 4.0, 4.0), np.eye(4), "PT", "nifti", "RAS"), threshold=5.0)
    assert figure.data and len(figure.data[0].i) > 0  # the focus has a surface of its own


def test_a_suggestion_puts_its_question_in_the_box_and_junk_puts_nothing(app_module):
    """The table sends the clicked row ([question]); an API client may send nothing, which used to be a traceback."""
    assert app_module.suggested_question(["Where is the lesion?"]) == "Where is the lesion?"
    for junk in (None, [], [3], "Where?"):
        assert app_module.suggested_question(junk) == ""


def test_an_upload_cut_off_leaves_no_traceback_in_the_log_and_other_errors_still_do(app_module):
    """A visitor who goes away mid-upload is no failure of the server's (the partial file is swept)."""
    import logging
    import sys

    from starlette.requests import ClientDisconnect

    def record(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:
            return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application",
                                     None, sys.exc_info())

    notice = app_module.CutOffUploadNotice()
    assert not notice.filter(record(ClientDisconnect()))
    assert notice.filter(record(RuntimeError("a real failure")))


def test_a_request_that_names_no_endpoint_is_logged_in_one_line(app_module):
    """POST /gradio_api/run/predict (Gradio 3's route, which old clients and bots probe) made Gradio log 60 lines of
    traceback: a public Space's log could be filled with them. One line, without the traceback."""
    from gradio.route_utils import FnIndexInferError

    def logged(error: Exception) -> str:
        try:
            raise error
        except Exception:
            record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application",
                                       None, sys.exc_info())
        assert app_module.UnknownEndpointNotice().filter(record)  # still logged, as a line
        return logging.Formatter().format(record)

    line = logged(FnIndexInferError("Could not infer function index for API name: predict"))
    assert "Traceback" not in line and len(line.splitlines()) == 1 and "named no endpoint" in line
    forged = logged(FnIndexInferError("Could not infer function index for API name: x\nINFO: all is well"))
    assert len(forged.splitlines()) == 1  # the name comes from the request's URL: no line of a caller's own
    assert "Traceback" in logged(RuntimeError("a real failure"))  # any other error keeps its traceback


@pytest.mark.parametrize("setting", ["abc", "0", "-5", "nan", "inf"])
def test_a_scan_memory_budget_that_is_no_number_of_megabytes_stops_the_app_with_one_line(app_module, setting,
                                                                                            capsys):
    with pytest.raises(SystemExit) as stopped:
        app_module.scan_memory_budget(setting)
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and "MEDVLM_SCAN_MEMORY_MB" in error
    assert app_module.scan_memory_budget("512") == 512 * 2**20
    assert app_module.scan_memory_budget("") == app_module.machine_memory_bytes() // 2
