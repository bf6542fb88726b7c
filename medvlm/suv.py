"""Standardized uptake values: a PET series stored in Bq/mL read as SUV (body weight), as PET is read.

SUVbw = activity concentration × the patient's weight / the injected dose decayed to the scan's start.
pysuv (validated against QIBA's digital reference object, with the vendors' timing conventions) computes the
factor from the series' header. Nothing of the patient is kept: the weight goes into the factor, and only the
factor is used.
"""

from __future__ import annotations

import pysuv
from pysuv.dicom.reader import MissingDICOMTagError, MissingPatientDataError

from .preprocess import SUV_UNITS

__all__ = ["CONVERTIBLE_UNITS", "SUV_UNITS", "suv_factor"]

CONVERTIBLE_UNITS = ("BQML",)  # (0054,1001) values an SUV factor applies to (counts need a vendor's own factor)
# What SUV needs, as a reader names it, by the DICOM keyword pysuv reports missing.
_NEEDED = {
    "PatientWeight": "the patient's weight",
    "RadionuclideTotalDose": "the injected dose",
    "RadiopharmaceuticalStartTime": "the time of the injection",
    "RadionuclideHalfLife": "the tracer's half-life",
    "RadiopharmaceuticalInfoSequence": "the injected dose and its time",
    "RadiopharmaceuticalInformationSequence": "the injected dose and its time",
    "SeriesTime": "the time of the scan",
    "DecayCorrection": "how its images were decay-corrected",
    "Units": "what its values measure",
    "RescaleSlope": "its values' rescale",
    "RescaleIntercept": "its values' rescale",
}
# What a header may state and still be a patient's PET: outside these, a typo (a dose in MBq where Bq belong, a
# time of day mistyped) would scale every SUV by orders of magnitude, so the values stay as stored.
PLAUSIBLE_WEIGHT_KG = (1.0, 400.0)
PLAUSIBLE_DOSE_MBQ = (1.0, 20_000.0)  # a child's few MBq to a generator's rubidium, with room
PLAUSIBLE_UPTAKE_MIN = (-10.0, 24 * 60.0)  # from injection to scan; Philips' frame timing can start a little early


def suv_factor(header) -> tuple[float | None, str]:
    """(factor, "") turning a Bq/mL series' values (after its rescale) into SUV (body weight), from one of its
    headers (a pydicom Dataset); else (None, why not), which completes "The values stay in Bq/mL: …": the
    header lacks what SUV needs, states a weight, dose or time no patient's PET has, or its images are not
    attenuation-corrected or not decay-corrected to the scan's start."""
    try:
        stated = pysuv.get_suv_parameters(header, philips_timing="zrad")
        if not _plausible(stated):
            return None, _implausible(stated)
        factor = pysuv.get_suv_factor(header, normalization="bw", philips_timing="zrad").suv_factor
    except pysuv.NACImageError as error:
        if error.corrections is None:
            return None, "the series does not say its images are attenuation-corrected, and SUV needs them to be"
        return None, "its images are not attenuation-corrected, and SUV needs them to be"
    except MissingDICOMTagError as missing:
        needed = _NEEDED.get(missing.tag_name.split()[0], "what SUV is computed from")
        return None, f"the series does not state {needed}, which SUV needs"
    except MissingPatientDataError as missing:
        return None, f"the series does not state the patient's {missing.field_name}, which SUV needs"
    except (ValueError, TypeError, ArithmeticError) as error:  # a weight of 0, another decay correction, a bad time
        return None, _decay_refused(header) if "DecayCorrection" in str(error) else _UNUSABLE
    return (factor, "") if 0 < factor < float("inf") else (None, _UNUSABLE)


_UNUSABLE = "the series states a weight, dose or time that SUV cannot be computed from"


def _decay_refused(header) -> str:
    """Why SUV is not computed for images decay-corrected otherwise than to the scan's start."""
    if str(header.get("DecayCorrection", "")).strip().upper() == "NONE":
        return "its images are not decay-corrected, and SUV needs them to be"
    return "its images are decay-corrected to another time than the scan's start, which SUV here needs"


def _plausible(stated) -> bool:
    ranges = ((stated.patient_weight_kg, PLAUSIBLE_WEIGHT_KG), (stated.injected_dose_mbq, PLAUSIBLE_DOSE_MBQ),
              (stated.elapsed_time_min, PLAUSIBLE_UPTAKE_MIN))
    return all(low <= value <= high for value, (low, high) in ranges) and stated.half_life_min > 0


def _implausible(stated) -> str:
    """What in the header no patient's PET has (never its value: the weight is the patient's)."""
    if not PLAUSIBLE_WEIGHT_KG[0] <= stated.patient_weight_kg <= PLAUSIBLE_WEIGHT_KG[1]:
        return "the patient's weight in the series is not one a patient has (under 1 kg or over 400 kg)"
    if not PLAUSIBLE_DOSE_MBQ[0] <= stated.injected_dose_mbq <= PLAUSIBLE_DOSE_MBQ[1]:
        return ("the injected dose in the series is not one a PET is made with (under 1 MBq or over 20 GBq; "
                "a dose written in MBq where the field holds Bq?)")
    if not PLAUSIBLE_UPTAKE_MIN[0] <= stated.elapsed_time_min <= PLAUSIBLE_UPTAKE_MIN[1]:
        return "the series puts the injection after the scan or more than a day before it"
    return _UNUSABLE
