"""`python -m medvlm info` and `view`: JSON facts, radiological PNGs, one-line errors with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import MARKED_SPACING
from PIL import Image

from medvlm.writers import save_dicom_series, save_nifti, save_npy

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "medvlm", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_info_prints_the_scan_facts(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path / "dicom", marked_ct, MARKED_SPACING, file_names="shuffled")
    nifti = save_nifti(tmp_path / "scan.nii.gz", marked_ct, MARKED_SPACING, "LAS", modality="CT")
    for scan, source, orientation in (([tmp_path / "dicom"], "dicom", "LPS"), (files, "dicom", "LPS"),
                                      ([nifti], "nifti", "LAS")):
        result = _cli("info", *scan)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"modality": "CT", "shape": [8, 20, 24], "spacing": [2.5, 0.8, 0.7],
                                             "orientation": orientation, "source": source, "units": "HU",
                                             "notes": []}
    (tmp_path / "dicom" / files[3].name).unlink()  # a missing slice is said, not hidden
    notes = json.loads(_cli("info", tmp_path / "dicom").stdout)["notes"]
    assert len(notes) == 1 and notes[0].startswith("1 slice(s) are missing from the series")


def test_info_on_an_m3d_npy_says_its_spacing_and_orientation_are_assumed(tmp_path, marked_ct):
    """M3D's .npy arrays store neither spacing nor orientation: `info` gives M3D's layout and 1 mm, and says both
    are assumed rather than stating them as facts of the file."""
    path = save_npy(tmp_path / "scan.npy", (marked_ct - marked_ct.min()) / np.ptp(marked_ct))
    result = _cli("info", path)
    facts = json.loads(result.stdout)
    assert facts["spacing"] == [1.0, 1.0, 1.0] and facts["source"] == "npy"
    assert any("stores no spacing or orientation" in note and "assumed" in note for note in facts["notes"])


def test_view_writes_an_axial_png_in_radiological_convention(tmp_path, marked_ct):
    scan = save_nifti(tmp_path / "scan.nii.gz", marked_ct, MARKED_SPACING, "LPS")
    out = tmp_path / "axial.png"
    result = _cli("view", scan, "--plane", "axial", "--index", "4", "--out", out)
    assert result.returncode == 0, result.stderr
    image = np.asarray(Image.open(out))
    height, width = image.shape
    assert image[height // 2, :3].min() > 200 and image[height // 2, width // 2:].max() < 200
    assert image[0, width // 2].min() > 200  # anterior at the top


def test_view_writes_a_mip_frame_and_names_the_frames_when_one_is_past_them(tmp_path):
    """`view --plane mip --index 9`: the PET seen from the patient's left (anterior on the image's left), without
    --window in inverted grey as a MIP is read; a frame past the last is one sentence, exit status 2."""
    uptake = np.ones((10, 20, 20), np.float32)
    uptake[4:6, 15:18, 9:11] = 9.0  # anterior (high y), in the middle from side to side
    scan = save_nifti(tmp_path / "pet.nii.gz", uptake, (4.0, 4.0, 4.0), modality="PT")
    out = tmp_path / "mip.png"
    result = _cli("view", scan, "--plane", "mip", "--index", "9", "--window", "auto", "--out", out)
    assert result.returncode == 0, result.stderr
    image = np.asarray(Image.open(out))
    columns = np.nonzero(image.max(axis=0) == image.max())[0]
    assert columns.max() < image.shape[1] / 2  # the hot spot on the left: anterior, seen from the left
    assert _cli("view", scan, "--plane", "mip", "--index", "9", "--out", out).returncode == 0
    inverted = np.asarray(Image.open(out)).astype(int)
    assert np.abs(inverted - (255 - image.astype(int))).max() <= 1  # the hot spot dark on white
    refused = _cli("view", scan, "--plane", "mip", "--index", "36", "--out", out)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: slice index 36 is out of range; the MIP has frames 0 to 35"


def _text_named_nifti(tmp_path):
    path = tmp_path / "report.nii.gz"
    path.write_text("not a scan\n")
    return path


def _text_named_uncompressed_nifti(tmp_path):
    path = tmp_path / "report.nii"
    path.write_text("not a scan\n")
    return path


def _2d_nifti(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), dtype=np.float32), np.eye(4)), path)
    return path


@pytest.mark.parametrize(("make_scan", "message"), [
    (lambda tmp_path: tmp_path / "missing.nii.gz", "does not exist"),
    (_text_named_nifti, "not a readable NIfTI"),
    (_text_named_uncompressed_nifti, "report.nii is not a readable NIfTI file (it does not begin with a NIfTI header)"),
    (_2d_nifti, "2D image"),
])
def test_bad_scans_exit_2_with_one_line(tmp_path, make_scan, message):
    for command in (["info"], ["view", "--out", tmp_path / "x.png"]):
        result = _cli(command[0], make_scan(tmp_path), *command[1:])
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert message in result.stderr


def test_view_with_an_index_out_of_range_exits_2(tmp_path, marked_ct):
    scan = save_nifti(tmp_path / "scan.nii", marked_ct, MARKED_SPACING)
    result = _cli("view", scan, "--plane", "coronal", "--index", "99", "--out", tmp_path / "x.png")
    assert result.returncode == 2 and "0 to 19" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_modality_reads_a_nifti_that_does_not_say_as_the_modality_given(tmp_path, marked_ct):
    """A PET saved without its modality reads as "other", whose windows hold no inverted grey; with --modality PT
    it is a PET, and the inverted window shows uptake dark on white."""
    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image((marked_ct + 1000.0).transpose(2, 1, 0), np.diag([0.7, 0.8, 2.5, 1.0])), path)
    assert json.loads(_cli("info", path).stdout)["modality"] == "OT"
    assert json.loads(_cli("info", path, "--modality", "PT").stdout)["modality"] == "PT"
    refused = _cli("view", path, "--window", "inverted", "--out", tmp_path / "other.png")
    assert refused.returncode == 2 and "inverted" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    shown = _cli("view", path, "--modality", "PT", "--window", "inverted", "--out", tmp_path / "pet.png")
    assert shown.returncode == 0, shown.stderr
    assert _cli("view", path, "--modality", "PT", "--out", tmp_path / "auto.png").returncode == 0
    inverted, auto = (np.asarray(Image.open(tmp_path / name).convert("L"), dtype=int)
                      for name in ("pet.png", "auto.png"))
    assert np.abs(inverted + auto - 255).max() <= 1  # the same slice, dark and light swapped


@pytest.mark.parametrize("command", [["report"], ["ask", "Which organ shows an abnormality?"]])
def test_a_reader_that_stops_reading_ends_the_command_quietly(command):
    """`python -m medvlm report SCAN | head -c 20`: the pipe closes before the report ends. The command stops as a
    program killed by SIGPIPE does (141), with nothing on stderr: no traceback, and no abort from a generation
    thread left running in torch."""
    scan = ROOT / "assets" / "examples" / "ct_chest_abdomen.nii.gz"
    arguments = [command[0], scan, *command[1:]]
    with subprocess.Popen([sys.executable, "-m", "medvlm", *map(str, arguments)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as process:
        process.stdout.read(2)  # the first characters, then the reader goes away
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""


def test_help_names_the_presets_and_the_ranges_a_command_takes(capsys, monkeypatch):
    """`train --help` lists the presets it can train (they were only listed by an error); `report --help` gives the
    range of --max-new-tokens and what --top-p does."""
    from medvlm.__main__ import build_parser
    from medvlm.train import PRESETS

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a preset's name
    for command in ("train", "report"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert all(preset.stem in printed for preset in PRESETS.glob("*.json")) and "tiny: a smoke test" in printed
    assert "most tokens to write, 1 to 1024 (default: 256)" in printed and "--top-p" in printed


def test_ablate_by_default_adds_to_the_committed_study_from_any_working_folder(tmp_path, monkeypatch):
    """README: the default --out is this repo's committed study; run from another folder it was a new
    ./assets/results there."""
    from medvlm.__main__ import build_parser

    monkeypatch.chdir(tmp_path)
    assert Path(build_parser().parse_args(["ablate"]).out) == ROOT / "assets" / "results"
