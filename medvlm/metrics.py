"""The M3D scoring protocol (DESIGN section 7) with established packages, plus phantom clinical metrics.

Reports and open answers, as M3D's scripts score them through Hugging Face `evaluate`: BLEU-1
(sacrebleu), ROUGE-1 F (rouge-score, no stemming: `evaluate`'s default), METEOR (nltk, words by
`word_tokenize`, as `evaluate`'s METEOR) and BERTScore F1 (bert-score, its default English model),
each per sample then averaged, all in [0, 1]. Closed answers: a hit when "<letter>." occurs in the
output, as M3D counts it. A metric whose resource is not available offline (WordNet and Punkt for
METEOR, BERTScore's model) is None with its reason in the result's "notes"; it is never approximated.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

SMALL_LESION_MM = 8.0  # lesions of at most this size count as small in finding_recall_small
BERTSCORE_LANG = "en"


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; pair them one to one")


def bleu1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level BLEU with unigrams only (sacrebleu, 13a tokens, brevity penalty), in [0, 1]."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(max_ngram_order=1, effective_order=True)
    return statistics.fmean(scorer.sentence_score(p, [r]).score / 100
                            for p, r in zip(predictions, references, strict=True))


def rouge1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-1 F-measure (rouge-score, no stemming, as M3D's `evaluate.load("rouge")`), in [0, 1]."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1"], use_stemmer=False)
    return statistics.fmean(scorer.score(target=r, prediction=p)["rouge1"].fmeasure
                            for p, r in zip(predictions, references, strict=True))


@functools.cache
def meteor_unavailable() -> str | None:
    """Why nltk's METEOR cannot run here (its WordNet corpus or Punkt sentence model is missing), or None."""
    from nltk.corpus import wordnet
    from nltk.tokenize import word_tokenize

    missing = []
    try:
        wordnet.ensure_loaded()
    except LookupError:
        missing.append("wordnet")
    try:
        word_tokenize("A test.")
    except LookupError:
        missing.append("punkt_tab")
    if missing:
        return (f"METEOR needs the NLTK data {' and '.join(missing)}, which cannot be found here; install it with "
                f"`python -m nltk.downloader {' '.join(missing)}` (or into the folder NLTK_DATA names) to score METEOR")
    return None


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean METEOR (nltk.translate.meteor_score on `word_tokenize` words, lowercased, as `evaluate`'s METEOR),
    in [0, 1]."""
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    return statistics.fmean(meteor_score([word_tokenize(r)], word_tokenize(p))
                            for p, r in zip(predictions, references, strict=True))


@functools.cache
def bertscore_unavailable() -> str | None:
    """Why BERTScore's default English model cannot be loaded here, or None when it is in the local cache.

    Looks only at the local Hugging Face cache, so it never waits on the network.
    """
    from bert_score.utils import lang2model
    from huggingface_hub import try_to_load_from_cache

    model = lang2model[BERTSCORE_LANG]
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return None
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (f"BERTScore needs the model {model}, which is not in the local Hugging Face cache and cannot be "
            f"downloaded here{offline}; download it into HF_HOME to score BERTScore")


def bertscore_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean BERTScore F1 with bert-score's default English model (roberta-large, no baseline rescaling)."""
    from bert_score import score

    _, _, f1 = score(list(predictions), list(references), lang=BERTSCORE_LANG, verbose=False)
    return float(f1.mean())


def _text_metrics(predictions: Sequence[str], references: Sequence[str],
                  optional: dict[str, tuple[Callable[[], str | None], Callable]]) -> dict[str, Any]:
    """BLEU-1, ROUGE-1 and the `optional` metrics (name → (reason-unavailable check, scorer)), with notes."""
    _check_pairs(predictions, references)
    names = ["bleu1", "rouge1", *optional]
    if not predictions:
        return {name: None for name in names} | {"notes": {name: "no samples to score" for name in names}}
    result: dict[str, Any] = {"bleu1": bleu1(predictions, references), "rouge1": rouge1(predictions, references)}
    notes = {}
    for name, (unavailable, scorer) in optional.items():
        reason = unavailable()
        result[name] = None if reason else scorer(predictions, references)
        if reason:
            notes[name] = reason
    return result | {"notes": notes}


def report_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Report scores {"bleu1", "rouge1", "meteor", "bertscore", "notes"}: each a mean in [0, 1] or None.

    "notes" maps each None metric to the reason it could not be computed.
    """
    return _text_metrics(predictions, references, {"meteor": (meteor_unavailable, meteor),
                                                   "bertscore": (bertscore_unavailable, bertscore_f1)})


def open_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Open-ended VQA scores {"bleu1", "rouge1", "meteor", "bertscore", "notes"}, as in `report_metrics`."""
    return _text_metrics(predictions, references, {"meteor": (meteor_unavailable, meteor),
                                                   "bertscore": (bertscore_unavailable, bertscore_f1)})


def closed_accuracy(outputs: Sequence[str], answer_choices: Sequence[str]) -> float:
    """Share of outputs that contain "<letter>." for their answer letter (M3D's rule), in [0, 1]."""
    _check_pairs(outputs, answer_choices)
    if not outputs:
        raise ValueError("closed accuracy needs at least one answer to score")
    return statistics.fmean(f"{letter}." in output for output, letter in zip(outputs, answer_choices, strict=True))


def _match_study(predicted: list, truth: list) -> tuple[list[tuple[Any, Any]], int]:
    """Pairs (true, predicted) with equal (organ, kind, side), each true finding used once, nearest size first;
    and the number of unmatched predictions."""
    unmatched = list(truth)
    pairs = []
    for guess in predicted:
        candidates = [t for t in unmatched if (t.organ, t.kind, t.side) == (guess.organ, guess.kind, guess.side)]
        if not candidates:
            continue
        best = min(candidates, key=lambda t: abs(t.size_mm - guess.size_mm)
                   if t.size_mm is not None and guess.size_mm is not None else float("inf"))
        unmatched.remove(best)
        pairs.append((best, guess))
    return pairs, len(predicted) - len(pairs)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def finding_metrics(predicted_reports: Sequence[str], true_findings: Sequence[list],
                    parse: Callable[[str], list]) -> dict[str, Any]:
    """Finding-level scores of reports against a phantom ground truth.

    `parse(report)` returns findings with attributes organ, kind, side and size_mm (mm or None);
    `true_findings[i]` lists the findings of study i. A predicted finding matches a true one with
    the same (organ, kind, side); each true finding is matched at most once.

    Normal studies: a study whose truth has no findings carries one "normal" label, and a report
    with no parsed findings predicts it; this label is counted in precision / recall / F1 like a
    finding (so an all-normal study read as normal is a hit, a normal study read with a lesion is
    a false positive and a missed label, an abnormal study read as normal is a false "normal" plus
    its missed lesions). Recall by size and size error count lesions only: small means true size
    ≤ SMALL_LESION_MM. Figures without a denominator are None.
    """
    _check_pairs(predicted_reports, true_findings)
    hits = false_positives = false_negatives = 0
    small, large, size_errors = [0, 0], [0, 0], []  # [found, total]
    for report, truth in zip(predicted_reports, true_findings, strict=True):
        predicted = parse(report)
        if not truth or not predicted:  # the per-study "normal" label, true and/or predicted
            hits += not truth and not predicted
            false_positives += bool(truth) and not predicted
            false_negatives += not truth and bool(predicted)
        pairs, unmatched = _match_study(predicted, truth)
        hits += len(pairs)
        false_positives += unmatched
        false_negatives += len(truth) - len(pairs)
        found = {id(t) for t, _ in pairs}
        for lesion in truth:
            if lesion.size_mm is not None:
                bucket = small if lesion.size_mm <= SMALL_LESION_MM else large
                bucket[0] += id(lesion) in found
                bucket[1] += 1
        size_errors += [abs(t.size_mm - p.size_mm) for t, p in pairs if t.size_mm is not None and p.size_mm is not None]
    return {
        "finding_precision": _ratio(hits, hits + false_positives),
        "finding_recall": _ratio(hits, hits + false_negatives),
        "finding_f1": _ratio(2 * hits, 2 * hits + false_positives + false_negatives),
        "finding_recall_small": _ratio(*small),
        "finding_recall_large": _ratio(*large),
        "size_mae_mm": statistics.fmean(size_errors) if size_errors else None,
    }
