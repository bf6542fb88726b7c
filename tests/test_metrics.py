"""M3D metrics on known inputs, offline honesty for METEOR / BERTScore, and phantom finding metrics."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from medvlm.evaluate import selection_recall
from medvlm.metrics import closed_accuracy, finding_metrics, open_metrics, report_metrics

REPORT = "A 12 mm solid nodule in the right lower lobe. The liver is normal."


def test_identical_text_scores_one_and_disjoint_text_zero():
    same = open_metrics([REPORT, "liver"], [REPORT, "liver"])
    assert same["bleu1"] == pytest.approx(1.0) and same["rouge1"] == pytest.approx(1.0)
    disjoint = open_metrics(["kidney cyst"], ["normal brain"])
    assert disjoint["bleu1"] == 0.0 and disjoint["rouge1"] == 0.0


def test_scores_are_per_sample_means():
    scores = open_metrics(["lung", "kidney"], ["lung", "spleen"])
    assert scores["bleu1"] == pytest.approx(0.5) and scores["rouge1"] == pytest.approx(0.5)


def test_unavailable_metrics_are_none_with_a_reason_never_approximated():
    scores = report_metrics([REPORT], [REPORT])
    for name in ("meteor", "bertscore"):
        if scores[name] is None:  # the reason says what to do, without this machine's folders (cards publish it)
            assert "cannot" in scores["notes"][name] and not re.search(r"['\s]/\w", scores["notes"][name])
        else:
            assert scores[name] == pytest.approx(1.0, abs=1e-3) and name not in scores["notes"]
    assert set(open_metrics(["a"], ["a"])) == {"bleu1", "rouge1", "meteor", "bertscore", "notes"}


def test_rouge_counts_words_as_written_as_m3d_does():
    """M3D scores with `evaluate.load("rouge")`, which does not stem: "nodules" is not "nodule"."""
    scores = open_metrics(["two nodules in the lungs"], ["a nodule in the lung"])
    assert scores["rouge1"] == pytest.approx(0.4)  # "in" and "the" of five words each (0.8 if stemmed)


def test_no_samples_gives_none_not_nan():
    scores = report_metrics([], [])
    assert all(scores[name] is None for name in ("bleu1", "rouge1", "meteor", "bertscore"))


def test_closed_accuracy_follows_m3d_rule():
    assert closed_accuracy(["A. liver"], ["A"]) == 1.0
    assert closed_accuracy(["A"], ["A"]) == 0.0
    assert closed_accuracy(["B. lung"], ["A"]) == 0.0
    assert closed_accuracy(["The answer is C. kidney", "D"], ["C", "D"]) == 0.5
    with pytest.raises(ValueError, match="pair"):
        closed_accuracy(["A."], ["A", "B"])


@dataclass
class Finding:
    organ: str
    kind: str
    side: str | None
    size_mm: float | None


def parse(report: str) -> list[Finding]:
    """Sentences like "12 mm cyst in the left kidney." → findings."""
    pattern = r"(\d+) mm (\w+) in the (?:(left|right) )?(\w+)"
    return [Finding(organ, kind, side or None, float(size)) for size, kind, side, organ in re.findall(pattern, report)]


def test_finding_metrics_on_a_missed_small_lesion_a_wrong_side_and_a_size_error():
    truth = [
        [Finding("lung", "nodule", "right", 5.0), Finding("liver", "cyst", None, 20.0)],
        [Finding("kidney", "cyst", "left", 12.0)],
        [],
    ]
    reports = [
        "24 mm cyst in the liver.",  # nodule (small) missed, cyst found 4 mm too large
        "12 mm cyst in the right kidney.",  # wrong side: a false positive and a miss
        "No focal lesion.",  # normal read as normal: a hit on the study's normal label
    ]
    scores = finding_metrics(reports, truth, parse)
    assert scores["finding_precision"] == pytest.approx(2 / 3)
    assert scores["finding_recall"] == pytest.approx(2 / 4)
    assert scores["finding_f1"] == pytest.approx(4 / 7)
    assert scores["finding_recall_small"] == 0.0
    assert scores["finding_recall_large"] == pytest.approx(0.5)
    assert scores["size_mae_mm"] == pytest.approx(4.0)


def test_finding_metrics_normals_and_empty_denominators():
    perfect = finding_metrics(["No focal lesion.", "No focal lesion."], [[], []], parse)
    assert perfect["finding_f1"] == 1.0 and perfect["finding_recall_small"] is None
    assert perfect["size_mae_mm"] is None
    hallucinated = finding_metrics(["6 mm nodule in the left lung."], [[]], parse)
    assert hallucinated["finding_precision"] == 0.0 and hallucinated["finding_recall"] == 0.0
    assert hallucinated["finding_f1"] == 0.0
    assert finding_metrics([], [], parse)["finding_f1"] is None


def test_selection_recall_counts_the_lesions_in_kept_slabs():
    # 40 slices of 1 mm in 10 slabs of 4 mm: slab 5 holds slices 20–23. A 2 mm lesion centred there reaches
    # slab 5 alone; a 12 mm one reaches slabs 4, 5 and 6.
    small = {"center_voxel": [21.5, 32, 32], "diameter_mm": 2.0}
    large = {"center_voxel": [21.5, 32, 32], "diameter_mm": 12.0}
    truth = {"a": {"shape": [40, 64, 64], "spacing": [1.0, 1.0, 1.0], "lesions": [small, large]},
             "normal": {"shape": [40, 64, 64], "spacing": [1.0, 1.0, 1.0], "lesions": []}}
    around = selection_recall(truth, {"a": ([4, 6], 10), "normal": ([0], 10), "not in truth": ([1], 10)})
    assert around == {"selection_recall": 0.5, "selection_recall_large": 1.0}
    assert selection_recall(truth, {"a": ([5], 10)}) == {"selection_recall": 1.0, "selection_recall_large": 1.0}
    assert selection_recall(truth, {"a": ([0, 9], 10)}) == {"selection_recall": 0.0, "selection_recall_large": 0.0}
    assert selection_recall(truth, {"normal": ([0], 10)}) == {"selection_recall": None,
                                                              "selection_recall_large": None}
