"""Words for the phantoms: findings reports, their parser, and M3D-VQA items.

Vocabularies are module constants (the evaluation metrics match findings on organ + kind + side).
Every lesion sentence names organ, kind, side, level and size in mm; several templates per
finding and per normal statement, picked by the phantom's rng, so the wording varies. A report
is one sentence per statement: technique first, then abnormal findings, then normal organs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

ORGANS = ("lung", "liver", "kidney", "brain", "lymph node")
KINDS = ("solid nodule", "ground-glass nodule", "calcified nodule", "cyst", "hypodense mass", "calcification",
         "hyperintense lesion", "hypointense lesion", "hypermetabolic focus")
SIDES = ("right", "left")
LEVELS = {  # level words per organ: lung lobes, liver portion, kidney poles, brain lobes, node station
    "lung": ("upper", "middle", "lower"),
    "liver": ("upper", "lower"),
    "kidney": ("upper", "lower"),
    "brain": ("frontal", "parietal", "temporal", "occipital"),
    "lymph node": ("axillary",),
}
NO_ABNORMALITY = "no abnormality"
VQA_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")
PLANE, PHASE, ORGAN, ABNORMALITY, LOCATION = 1, 2, 3, 4, 5  # M3D-VQA question types

# Phrases a report may use for each kind, first = the VQA answer; the parser reads them all.
KIND_PHRASES = {
    "solid nodule": ("solid nodule", "solid pulmonary nodule", "soft-tissue nodule"),
    "ground-glass nodule": ("ground-glass nodule", "ground-glass opacity", "nodule of ground-glass density"),
    "calcified nodule": ("calcified nodule", "calcified granuloma", "densely calcified nodule"),
    "cyst": ("cyst", "simple cyst", "fluid-density cyst"),
    "hypodense mass": ("hypodense mass", "hypoattenuating mass", "low-attenuation mass"),
    "calcification": ("calcification", "calcified focus", "punctate calcification"),
    "hyperintense lesion": ("hyperintense lesion", "hyperintense focus", "lesion of high signal intensity"),
    "hypointense lesion": ("hypointense lesion", "hypointense focus", "lesion of low signal intensity"),
    "hypermetabolic focus": ("hypermetabolic focus", "FDG-avid focus", "focus of intense FDG uptake"),
}

LESION_TEMPLATES = {  # {size} mm, {kind} phrase, {side}/{Side}, {level}, {suv} ("" or ", SUVmax 6.1")
    "lung": ("A {size} mm {kind} in the {side} {level} lobe{suv}.",
             "There is a {size} mm {kind} in the {level} lobe of the {side} lung{suv}.",
             "{Side} {level} lobe: {kind}, {size} mm{suv}.",
             "A {kind} measuring {size} mm is seen in the {side} {level} lobe{suv}."),
    "liver": ("A {size} mm {kind} in the {side} hepatic lobe, {level} portion{suv}.",
              "There is a {size} mm {kind} in the {level} part of the {side} lobe of the liver{suv}.",
              "Liver: {size} mm {kind} in the {side} lobe ({level} portion){suv}.",
              "A {kind} of {size} mm is seen in the {side} lobe of the liver, {level} portion{suv}."),
    "kidney": ("A {size} mm {kind} in the {level} pole of the {side} kidney{suv}.",
               "{Side} kidney: {size} mm {kind} at the {level} pole{suv}.",
               "There is a {size} mm {kind} in the {side} kidney, {level} pole{suv}.",
               "A {kind} measuring {size} mm arises from the {level} pole of the {side} kidney{suv}."),
    "brain": ("A {size} mm {kind} in the {side} {level} lobe.",
              "There is a {size} mm {kind} in the {level} lobe of the {side} hemisphere.",
              "{Side} {level} lobe: {kind} measuring {size} mm.",
              "A {kind} of {size} mm is seen in the {side} cerebral hemisphere, {level} lobe."),
    "lymph node": ("A {size} mm {kind} in a {side} axillary lymph node{suv}.",
                   "{Side} axillary lymph node: {kind}, {size} mm{suv}.",
                   "There is a {size} mm {kind} in a lymph node of the {side} axilla{suv}."),
}

NORMAL_STATEMENTS = {  # organ (or region) -> ways of saying it is normal; none names a lesion kind
    "lung": ("No pulmonary nodules.", "The lungs are clear.", "No suspicious pulmonary nodule or mass."),
    "liver": ("The liver is unremarkable.", "No focal liver lesion.", "The liver is normal in size and density."),
    "kidney": ("Both kidneys are unremarkable.", "No renal lesion.", "The kidneys are normal."),
    "spleen": ("The spleen is unremarkable.", "The spleen is normal in size.", "No splenic abnormality."),
    "bone": ("No aggressive osseous lesion.", "The osseous structures are intact.", "No destructive bone lesion."),
    "brain": ("No focal brain lesion.", "The brain parenchyma is unremarkable.",
              "No abnormal signal in the cerebral hemispheres."),
    "ventricles": ("The ventricles are normal in size.", "No midline shift.", "No hydrocephalus."),
    "lymph node": ("No hypermetabolic lymph nodes.", "No abnormal nodal uptake.", "Lymph nodes are unremarkable."),
    "uptake": ("Physiological uptake in the brain, heart, liver, kidneys and bladder.",
               "Normal physiological tracer distribution in the brain, myocardium, liver, kidneys and bladder.",
               "Physiological FDG activity in the brain, heart, liver, urinary tract and bladder."),
}

TECHNIQUE = {
    "CT": ("CT of the chest and abdomen, {phase} phase.", "{Phase} CT of the chest and upper abdomen.",
           "Axial CT images of the chest and abdomen ({phase})."),
    "MR": ("MRI of the brain, {phase} images.", "{Phase} MR imaging of the brain.",
           "Axial {phase} MRI of the head."),
    "PT": ("FDG PET of the body.", "Whole-body FDG PET, axial images.", "PET imaging from the head to the pelvis."),
}
NORMAL_ORGANS = {"CT": ("lung", "liver", "kidney", "spleen", "bone"), "MR": ("brain", "ventricles"),
                 "PT": ("uptake", "lung", "liver", "lymph node")}


@dataclass(frozen=True)
class Finding:
    """One abnormal finding as a report states it: organ, kind, side (or None), size in mm (or None)."""

    organ: str
    kind: str
    side: str | None
    size_mm: float | None


def location_text(lesion: dict) -> str:
    """Where a lesion is, in words: "right upper lobe", "left kidney, lower pole", "right frontal lobe"."""
    organ, side, level = lesion["organ"], lesion["side"], lesion["level"]
    if organ in ("lung", "brain"):
        return f"{side} {level} lobe"
    if organ == "liver":
        return f"{side} hepatic lobe, {level} portion"
    if organ == "kidney":
        return f"{side} kidney, {level} pole"
    return f"{side} axillary lymph node"


def lesion_sentence(lesion: dict, rng: np.random.Generator) -> str:
    """One report sentence for a ground-truth lesion dict (organ, kind, side, level, diameter_mm)."""
    template = LESION_TEMPLATES[lesion["organ"]][rng.integers(len(LESION_TEMPLATES[lesion["organ"]]))]
    phrases = KIND_PHRASES[lesion["kind"]]
    suv = lesion.get("suv_max")
    suv_clause = f", SUVmax {suv:.1f}" if suv is not None and rng.random() < 0.5 else ""
    return template.format(size=round(lesion["diameter_mm"]), kind=phrases[rng.integers(len(phrases))],
                           side=lesion["side"], Side=lesion["side"].capitalize(), level=lesion["level"], suv=suv_clause)


def write_report(modality: str, phase: str, lesions: list[dict], rng: np.random.Generator) -> str:
    """Findings report: technique, then each lesion (size, side, level), then the normal organs."""
    technique = TECHNIQUE[modality][rng.integers(len(TECHNIQUE[modality]))]
    sentences = [technique.format(phase=phase, Phase=phase[0].upper() + phase[1:])]
    sentences += [lesion_sentence(lesion, rng) for lesion in lesions]
    abnormal = {lesion["organ"] for lesion in lesions}
    for organ in NORMAL_ORGANS[modality]:
        if organ not in abnormal:
            statements = NORMAL_STATEMENTS[organ]
            sentences.append(statements[rng.integers(len(statements))])
    return " ".join(sentences)


_NEGATION = re.compile(r"\b(no|not|without|unremarkable|normal|clear|absent|physiological)\b", re.IGNORECASE)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*mm\b", re.IGNORECASE)
_ORGAN_WORDS = (  # checked in this order: brain lobes before lung lobes, liver before "lobe"
    ("brain", ("hemisphere", "frontal", "parietal", "temporal", "occipital", "brain", "cerebral")),
    ("lymph node", ("lymph node", "axilla", "nodal")),
    ("liver", ("liver", "hepatic")),
    ("kidney", ("kidney", "renal")),
    ("lung", ("lung", "lobe", "pulmonary")),
)
_KIND_CUES = (  # (cue, kind) checked in order; lung calcifications become calcified nodules below
    ("hypermetabolic", "hypermetabolic focus"), ("fdg", "hypermetabolic focus"),
    ("hyperintense", "hyperintense lesion"), ("high signal", "hyperintense lesion"),
    ("hypointense", "hypointense lesion"), ("low signal", "hypointense lesion"),
    ("ground-glass", "ground-glass nodule"), ("calcified nodule", "calcified nodule"),
    ("granuloma", "calcified nodule"), ("calcif", "calcification"), ("cyst", "cyst"),
    ("hypodense", "hypodense mass"), ("hypoattenuating", "hypodense mass"), ("low-attenuation", "hypodense mass"),
    ("nodule", "solid nodule"),
)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def parse_sentence(sentence: str) -> Finding | None:
    """The finding one sentence states, or None for a normal / technique / unreadable sentence."""
    lowered = sentence.lower()
    if _NEGATION.search(lowered):
        return None
    kind = next((k for cue, k in _KIND_CUES if cue in lowered), None)
    organ = next((o for o, words in _ORGAN_WORDS if any(w in lowered for w in words)), None)
    if kind is None or organ is None:
        return None
    if organ == "lung" and kind == "calcification":
        kind = "calcified nodule"
    sides = [side for side in SIDES if re.search(rf"\b{side}\b", lowered)]
    size = _SIZE.search(lowered)
    return Finding(organ, kind, sides[0] if len(sides) == 1 else None, float(size.group(1)) if size else None)


def parse_findings(report_text: str) -> list[Finding]:
    """Abnormal findings of a report, one per sentence that names a lesion kind and an organ, in order.

    The inverse of `write_report`; also reads free text of the same style (model outputs).
    """
    return [finding for s in _sentences(report_text) if (finding := parse_sentence(s)) is not None]


def findings_from_ground_truth(entry: dict) -> list[Finding]:
    """The findings a perfect report states for one ground-truth entry ({"lesions": [...]})."""
    return [Finding(lesion["organ"], lesion["kind"], lesion["side"], float(round(lesion["diameter_mm"])))
            for lesion in entry["lesions"]]


def _choices(answer: str, distractors: list[str], rng: np.random.Generator) -> tuple[list[str], str]:
    pool = [d for d in dict.fromkeys(distractors) if d != answer]
    picked = [pool[i] for i in rng.permutation(len(pool))[:3]]
    options = [answer, *picked]
    options = [options[i] for i in rng.permutation(4)]
    return options, "ABCD"[options.index(answer)]


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _questions(modality: str, phase: str, lesions: list[dict]) -> list[tuple[int, tuple[str, ...], str, list[str]]]:
    """(type, phrasings, answer, distractors) for the five M3D-VQA question types."""
    kinds_here = {"CT": KINDS[:6], "MR": KINDS[6:8], "PT": KINDS[8:]}[modality]
    other_kinds = [k for k in KINDS if k not in kinds_here]
    items = [(PLANE, ("In which plane is this image shown?", "What is the imaging plane of this scan?",
                      "Which plane are these slices acquired in?"), "axial", ["coronal", "sagittal", "oblique"])]
    if modality == "CT":
        items.append((PHASE, ("Which contrast phase is this CT?", "In which phase was this CT acquired?",
                              "What is the contrast phase of this scan?"), phase,
                      ["non-contrast", "arterial", "portal venous", "delayed"]))
    elif modality == "MR":
        items.append((PHASE, ("Which MR sequence is this?", "What is the MRI sequence of this image?",
                              "Which weighting does this MR image have?"), phase,
                      ["T1-weighted", "T2-weighted", "FLAIR", "diffusion-weighted"]))
    else:
        items.append((PHASE, ("What imaging modality is this?", "Which modality acquired this image?",
                              "What kind of scan is this?"), "PET", ["CT", "MRI", "ultrasound"]))
    if lesions:
        first = lesions[0]
        kind, organ = first["kind"], first["organ"]
        items.append((ORGAN, (f"Which organ contains the {kind}?", f"In which organ is the {kind} located?",
                              "Which organ shows an abnormality?"), organ, [o for o in ORGANS] + ["spleen"]))
        items.append((ABNORMALITY, (f"What abnormality is seen in the {organ}?", "What kind of lesion is present?",
                                    "Which finding does this scan show?"), kind,
                       [*kinds_here, NO_ABNORMALITY, *other_kinds[:2]]))
        where = location_text(first)
        flipped = where.replace(first["side"], "left" if first["side"] == "right" else "right")
        other_levels = [location_text(first | {"level": level}) for level in LEVELS[organ]]
        other_organs = ["right upper lobe", "left kidney, lower pole", "left frontal lobe",
                        "right hepatic lobe, upper portion"]
        items.append((LOCATION, (f"Where is the {kind} located?", f"What is the location of the {kind}?",
                                 f"In which part of the {organ} is the {kind}?"), where,
                      [flipped, *other_levels, *other_organs]))
        return items
    normal_organ = {"CT": "liver", "MR": "brain", "PT": "liver"}[modality]
    organ_question = {"CT": ("Which organ lies in the right upper abdomen?", "Which large organ is under the right "
                             "hemidiaphragm?", "Which organ occupies the right upper quadrant?"),
                      "MR": ("Which organ is shown in this scan?", "Which organ is imaged?",
                             "What organ does this MRI show?"),
                      "PT": ("Which organ in the right upper abdomen shows moderate uptake?",
                             "Which organ under the right hemidiaphragm takes up tracer?",
                             "Which organ occupies the right upper quadrant?")}[modality]
    items.append((ORGAN, organ_question, normal_organ, ["spleen", "kidney", "lung", "brain", "heart", "liver"]))
    items.append((ABNORMALITY, ("What abnormality is seen?", "What kind of lesion is present?",
                                "Which finding does this scan show?"), NO_ABNORMALITY, list(kinds_here) + other_kinds))
    if modality == "MR":
        items.append((LOCATION, ("Where is the cerebellum relative to the cerebrum?", "Where does the cerebellum lie?",
                                 "What is the position of the cerebellum?"), "inferior and posterior",
                      ["superior and anterior", "lateral", "anterior"]))
    else:
        items.append((LOCATION, ("On which side of the patient is the liver?", "Which side is the liver on?",
                                 "Where is the liver?"), "right", ["left", "midline", "both sides"]))
    return items


def vqa_items(image_path: str, report: str, modality: str, phase: str, lesions: list[dict],
              rng: np.random.Generator) -> list[dict[str, Any]]:
    """One M3D-VQA row (dict keyed by VQA_COLUMNS) per question type 1..5 for one volume."""
    rows = []
    for question_type, phrasings, answer, distractors in _questions(modality, phase, lesions):
        options, letter = _choices(answer, distractors, rng)
        rows.append(dict(zip(VQA_COLUMNS, (image_path, report, question_type, _pick(phrasings, rng), *options,
                                           answer, letter), strict=True)))
    return rows
