"""A PET series stored in Bq/mL is read as SUV (body weight), as PET is read: a lesion's value is its uptake
relative to the dose per gram of patient, whatever the dose and the time since injection. Where the header lacks
what SUV needs, the values stay in Bq/mL and a note says why."""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medvlm.view_html import scan_card
from medvlm.volume import load_volume
from medvlm.writers import save_dicom_series

F18_HALF_LIFE_S = 6586.2
WEIGHT_KG, DOSE_BQ = 70.0, 370e6
INJECTED, SCANNED = "100000", "110000"  # an hour of uptake
BACKGROUND, LESION = 5000.0, 20000.0  # Bq/mL


def _bqml_series(folder, **overrides):
    """A PET series in Bq/mL with a lesion, and the header SUV needs (overrides: keyword → value, None drops)."""
    uptake = np.full((6, 24, 24), BACKGROUND, np.float32)
    uptake[2:4, 8:12, 8:12] = LESION
    files = save_dicom_series(folder, uptake, (4.0, 4.0, 4.0), "PT")
    tracer = Dataset()
    tracer.RadionuclideTotalDose = DOSE_BQ
    tracer.RadionuclideHalfLife = F18_HALF_LIFE_S
    tracer.RadiopharmaceuticalStartTime = INJECTED
    header = {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
              "PatientWeight": WEIGHT_KG, "SeriesTime": SCANNED, "AcquisitionTime": SCANNED,
              "RadiopharmaceuticalInformationSequence": Sequence([tracer]), **overrides}
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in header.items():
            if value is not None:
                setattr(ds, keyword, value)
            elif keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
    return folder


def test_a_bqml_series_is_read_as_suv_body_weight(tmp_path):
    scan = load_volume(_bqml_series(tmp_path))
    dose_at_scan = DOSE_BQ * 2 ** (-3600 / F18_HALF_LIFE_S)  # decayed for the hour from injection to scan
    expected = LESION * WEIGHT_KG * 1000 / dose_at_scan
    assert float(np.nanmax(scan.data)) == pytest.approx(expected, rel=1e-4)  # ≈ 5.5: a lesion's SUV, not 20000
    assert float(np.median(scan.data)) == pytest.approx(expected * BACKGROUND / LESION, rel=1e-4)
    assert scan.meta["units"] == "SUV (g/mL)" and not scan.meta.get("notes")
    assert not any(str(WEIGHT_KG) in str(value) for value in scan.meta.values())  # the weight is not kept
    assert "| **Values** | SUV (g/mL), body weight, from Bq/mL |" in scan_card(scan, "uploaded scan")
    as_mr = scan.as_modality("MR")  # its values are no longer a PET's: no unit, no conversion named
    assert "**Values**" not in scan_card(as_mr, "uploaded scan")


@pytest.mark.parametrize(("overrides", "why"), [
    ({"PatientWeight": None}, "the series does not state the patient's weight, which SUV needs"),
    ({"CorrectedImage": ["DECY"]}, "its images are not attenuation-corrected, and SUV needs them to be"),
    ({"DecayCorrection": "ADMIN"}, "its images are decay-corrected to another time than the scan's start"),
    ({"PatientWeight": 0.0}, "the series states a weight, dose or time that cannot be used"),
])
def test_without_what_suv_needs_the_values_stay_in_bqml_and_a_note_says_why(tmp_path, overrides, why):
    scan = load_volume(_bqml_series(tmp_path, **overrides))
    assert float(np.nanmax(scan.data)) == pytest.approx(LESION)
    assert scan.meta["units"] == "Bq/mL"
    assert scan.meta["notes"] == [f"the values stay in Bq/mL, not SUV: {why}"]


def test_a_pet_in_suv_offers_fixed_suv_scales_and_one_in_bqml_does_not(tmp_path):
    """On a fixed SUV scale the same uptake looks the same on every scan: the lesion (SUV ≈ 5.5) is white on
    "SUV 0-5" and a little darker than mid grey on "SUV 0-10 inverted"; the background (≈ 1.4) is dark grey, and
    light grey inverted."""
    from medvlm.preprocess import window_names
    from medvlm.view import render_slice
    from medvlm.view_html import slice_view_html

    scan = load_volume(_bqml_series(tmp_path / "suv"))
    windows = window_names(scan.modality, scan.meta["units"])
    assert windows == ["auto", "inverted", "SUV 0-5", "SUV 0-5 inverted", "SUV 0-10 inverted"]
    lesion, background = float(np.nanmax(scan.data)), float(np.median(scan.data))
    for window, black, white in (("SUV 0-5", 0, 5), ("SUV 0-10 inverted", 10, 0)):
        image = render_slice(scan, "axial", 2, window)
        for value, pixels in ((lesion, image[image.shape[0] // 2, image.shape[1] // 2]), (background, image[0, 0])):
            expected = 255 * min(1.0, max(0.0, (value - black) / (white - black)))
            assert abs(int(pixels) - expected) <= 1, (window, value)
    html = slice_view_html(scan, "axial", 2, "SUV 0-10 inverted", [])
    assert "window SUV 0–10 inverted ·" not in html and "window SUV 0–10 inverted</div>" in html
    assert 'class="slice-frame inverted"' in html  # white around an image white where nothing is taken up
    stays = load_volume(_bqml_series(tmp_path / "bqml", PatientWeight=None))
    assert window_names(stays.modality, stays.meta["units"]) == ["auto", "inverted"]  # Bq/mL: no SUV scale


def test_info_says_a_pet_is_in_suv(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-m", "medvlm", "info", str(_bqml_series(tmp_path))], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert (facts["modality"], facts["units"], facts["notes"]) == ("PT", "SUV (g/mL)", [])
