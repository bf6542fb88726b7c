"""A PET series stored in Bq/mL is read as SUV (body weight), as PET is read: a lesion's value is its uptake
relative to the dose per gram of patient, whatever the dose and the time since injection. Where the header lacks
what SUV needs, the values stay in Bq/mL and a note says why."""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medvlm.view_html import scan_card, slice_view_html
from medvlm.volume import load_volume
from medvlm.writers import save_dicom_series

F18_HALF_LIFE_S = 6586.2
WEIGHT_KG, DOSE_BQ = 73.4, 370e6  # a weight no other number in the scan shares
INJECTED, SCANNED = "100000", "110000"  # an hour of uptake
BACKGROUND, LESION = 5000.0, 20000.0  # Bq/mL


def _bqml_series(folder, **overrides):
    """A PET series in Bq/mL with a lesion, and the header SUV needs (overrides: keyword → value, None drops;
    "tracer": the same for the radiopharmaceutical's item)."""
    uptake = np.full((6, 24, 24), BACKGROUND, np.float32)
    uptake[2:4, 8:12, 8:12] = LESION
    files = save_dicom_series(folder, uptake, (4.0, 4.0, 4.0), "PT")
    tracer = Dataset()
    tracer.RadionuclideTotalDose = DOSE_BQ
    tracer.RadionuclideHalfLife = F18_HALF_LIFE_S
    tracer.RadiopharmaceuticalStartTime = INJECTED
    for keyword, value in overrides.pop("tracer", {}).items():
        setattr(tracer, keyword, value)
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
    assert float(np.nanmax(scan.data)) == pytest.approx(expected, rel=1e-4)  # ≈ 5.8: a lesion's SUV, not 20000
    assert float(np.median(scan.data)) == pytest.approx(expected * BACKGROUND / LESION, rel=1e-4)
    assert scan.meta["units"] == "SUV (g/mL)" and not scan.meta.get("notes")
    shown = scan_card(scan, "uploaded scan") + slice_view_html(scan, "axial", 2, "auto", []) + str(scan.meta)
    assert str(WEIGHT_KG) not in shown  # the weight goes into the factor: never shown, never kept
    assert "| **Values** | SUV (g/mL), body weight, from Bq/mL |" in scan_card(scan, "uploaded scan")
    as_mr = scan.as_modality("MR")  # its values are no longer a PET's: no unit, no conversion named
    assert "**Values**" not in scan_card(as_mr, "uploaded scan")


@pytest.mark.parametrize(("overrides", "why"), [
    ({"PatientWeight": None}, "the series does not state the patient's weight, which SUV needs"),
    ({"RadiopharmaceuticalInformationSequence": Sequence([])},
     "the series does not state the injected dose and its time, which SUV needs"),
    ({"CorrectedImage": ["DECY"]}, "its images are not attenuation-corrected, and SUV needs them to be"),
    ({"CorrectedImage": None},
     "the series does not say its images are attenuation-corrected, and SUV needs them to be"),
    ({"DecayCorrection": "ADMIN"},
     "its images are decay-corrected to another time than the scan's start, which SUV here needs"),
    ({"DecayCorrection": "NONE"}, "its images are not decay-corrected, and SUV needs them to be"),
    # Typos that would scale every SUV by orders of magnitude: no patient's PET states them.
    ({"PatientWeight": 0.0}, "the patient's weight in the series is not one a patient has (under 1 kg or over 400 kg)"),
    ({"PatientWeight": 900.0},
     "the patient's weight in the series is not one a patient has (under 1 kg or over 400 kg)"),
    ({"tracer": {"RadionuclideTotalDose": 370.0}},  # MBq written where Bq belong
     "the injected dose in the series is not one a PET is made with (under 1 MBq or over 20 GBq; a dose written in "
     "MBq where the field holds Bq?)"),
    ({"tracer": {"RadiopharmaceuticalStartTime": "115000"}},
     "the series puts the injection after the scan or more than a day before it"),
    ({"tracer": {"RadiopharmaceuticalStartTime": "99"}},
     "the series puts the injection after the scan or more than a day before it"),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")  # pydicom, writing the mistyped time "99"
def test_without_what_suv_needs_the_values_stay_in_bqml_and_a_note_says_why(tmp_path, overrides, why):
    scan = load_volume(_bqml_series(tmp_path, **overrides))
    assert float(np.nanmax(scan.data)) == pytest.approx(LESION)
    assert scan.meta["units"] == "Bq/mL"
    assert scan.meta["notes"] == [f"the values stay in Bq/mL, not SUV: {why}"]


def test_a_pet_in_suv_offers_fixed_suv_scales_and_one_in_bqml_does_not(tmp_path):
    """On a fixed SUV scale the same uptake looks the same on every scan: the lesion (SUV ≈ 5.8) is white on
    "SUV 0-5" and a little darker than mid grey on "SUV 0-10 inverted"; the background (≈ 1.45) is dark grey, and
    light grey inverted."""
    from medvlm.preprocess import window_names
    from medvlm.view import render_slice

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
    assert str(WEIGHT_KG) not in result.stdout
