"""Standardized uptake values: a PET series stored in Bq/mL read as SUV (body weight), as PET is read.

SUVbw = activity concentration × the patient's weight / the injected dose decayed to the scan's start.
pysuv (validated against QIBA's digital reference object, with the vendors' timing conventions) computes the
factor from the series' header. Nothing of the patient is kept: the weight goes into the factor, and only the
factor is used.
"""

from __future__ import annotations

import warnings

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
    "SeriesTime": "the time of the scan",
    "DecayCorrection": "how its images were decay-corrected",
}
_UNREADABLE = "the series states a weight, dose or time that cannot be used"


def suv_factor(header) -> tuple[float | None, str]:
    """(factor, "") turning a Bq/mL series' values (after its rescale) into SUV (body weight), from one of its
    headers (a pydicom Dataset); else (None, why not), which completes "The values stay in Bq/mL: …": the
    header lacks what SUV needs, or its images are not attenuation-corrected or not decay-corrected to the
    scan's start."""
    try:
        with warnings.catch_warnings():  # a vendor's timing convention is chosen here, not warned about
            warnings.simplefilter("ignore")
            factor = pysuv.get_suv_factor(header, normalization="bw", philips_timing="zrad").suv_factor
    except pysuv.NACImageError:
        return None, "its images are not attenuation-corrected, and SUV needs them to be"
    except MissingDICOMTagError as missing:
        needed = _NEEDED.get(missing.tag_name.split()[0], missing.tag_name)
        return None, f"the series does not state {needed}, which SUV needs"
    except MissingPatientDataError as missing:
        return None, f"the series does not state the patient's {missing.field_name}, which SUV needs"
    except (ValueError, TypeError, ArithmeticError) as error:  # a weight of 0, decay to the injection, a bad time
        if "DecayCorrection" in str(error):
            return None, "its images are decay-corrected to another time than the scan's start"
        return None, _UNREADABLE
    if not 0 < factor < float("inf"):
        return None, _UNREADABLE
    return factor, ""
