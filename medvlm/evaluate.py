"""`python -m medvlm eval`: score a checkpoint on an M3D-format split the way M3D's benchmark does.

Greedy decoding, at most 256 new tokens. Reports: BLEU-1, ROUGE-1, METEOR, BERTScore F1; closed
VQA: a hit when "<letter>." occurs in the answer; open VQA: BLEU-1 / ROUGE-1 / METEOR. With a
phantom ground truth beside the data, also finding-level precision / recall / F1, size error, and the
share of lesions that lie in a slab the model kept (`selection_recall`, the most recall can reach).

    python -m medvlm eval --checkpoint org/model --data M3D --split test
    accelerate launch --config_file assets/accelerate/ddp.yaml -m medvlm eval --checkpoint ... --data ...

Under accelerate each process answers the prompts of its share of the scans on its own device;
the answers are gathered in the original order and the main process scores them, so the figures
are those of one process.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .data import GROUND_TRUTH_FILE, Sample, load_scan
from .errors import UserInputError
from .features import process_state
from .metrics import SMALL_LESION_MM, closed_accuracy, finding_metrics, open_metrics, report_metrics
from .pipeline import Pipeline, weights_digest

M3D_MAX_NEW_TOKENS = 256


def generate_answers(pipeline: Pipeline, root: Path, samples: list[Sample], max_new_tokens: int,
                     progress: bool = True) -> tuple[list[str], dict[str, tuple[list[int], int]]]:
    """The model's greedy answer to each sample's prompt, each scan loaded and encoded once; and per scan,
    which encoder-input slabs the model kept and how many there were."""
    by_image: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_image[sample.image].append(index)
    answers = [""] * len(samples)
    kept: dict[str, tuple[list[int], int]] = {}
    with tqdm(total=len(samples), desc="generating", disable=not progress, unit="answer") as bar:
        for image, indices in by_image.items():
            volume = load_scan(root, image)
            for index in indices:
                prompt = samples[index].messages[:-1]
                if samples[index].task == "report":  # asked as the app asks this checkpoint
                    prompt = [{"role": "user", "content": pipeline.model.config.report_prompt}]
                answers[index] = "".join(pipeline.chat(volume, prompt, max_new_tokens=max_new_tokens)).strip()
                bar.update()
            encoding = pipeline.encode(volume)  # the cached encoding the answers came from
            kept[image] = (encoding.kept_inputs, encoding.total_slices)
            pipeline.forget(volume)
    return answers, kept


def selection_recall(truth: dict, kept: dict[str, tuple[list[int], int]]) -> dict[str, float | None]:
    """How many ground-truth lesions lie in a slab the model kept: the most finding recall its reports
    could reach, whatever the later stages make of them. `truth`: ground-truth entries by image;
    `kept`: per image, (kept slab indices, number of slabs). Overall and for lesions over 8 mm."""
    from .encoder_pretraining import lesion_slabs

    seen, large = [0, 0], [0, 0]  # [in a kept slab, total]
    for image, (slabs, total) in kept.items():
        entry = truth.get(image)
        if entry is None:
            continue
        for lesion in entry["lesions"]:
            shown = not lesion_slabs(lesion, entry["shape"][0], total, entry["spacing"][0]).keys().isdisjoint(slabs)
            for bucket in (seen, large) if round(lesion["diameter_mm"]) > SMALL_LESION_MM else (seen,):
                bucket[0] += shown
                bucket[1] += 1
    return {"selection_recall": seen[0] / seen[1] if seen[1] else None,
            "selection_recall_large": large[0] / large[1] if large[1] else None}


def evaluate(checkpoint: str | Path | None, data: str | Path, split: str = "test", limit: int | None = None,
             max_new_tokens: int = M3D_MAX_NEW_TOKENS, device: str | None = None,
             progress: bool = True, tasks: tuple[str, ...] | None = None, revision: str | None = None) -> dict | None:
    """Score a checkpoint (a folder, or a Hub repo id at `revision`) on `split` of `data`; `limit` keeps the
    first N scans. One JSON-ready dict.

    `tasks` keeps only those prompts ("report", "vqa_closed", "vqa_open"; None: all); the scores of
    a task left out are None.

    Under accelerate the scans are shared among the processes; the main process returns the
    scores, the others None.
    """
    from .train import read_samples

    root = Path(data)
    samples = [s for s in read_samples(root, split) if tasks is None or s.task in tasks]
    if not samples:
        raise UserInputError(f"{root} holds no {split} samples (M3D_Cap.json / M3D_VQA CSVs); point to a folder "
                             f"with a {split} split")
    images = list(dict.fromkeys(s.image for s in samples))[:limit]
    keep = set(images)
    samples = [s for s in samples if s.image in keep]
    absent = [image for image in images if not (root / image).exists()]
    if absent:  # found now, not after hours of answers about the scans before it
        raise UserInputError(f"{len(absent)} of the {len(images)} scans that {root}'s {split} split names are not "
                             f"there (e.g. {absent[0]}); restore them or fix the split's JSON and CSV")
    state = process_state()
    if device is None and state.num_processes > 1:  # each process on its own GPU; CPU processes share "cpu"
        device = str(state.device) if state.device.type == "cuda" else "cpu"
    pipeline = Pipeline.from_pretrained(checkpoint, revision=revision, device=device)
    started = time.perf_counter()
    with state.split_between_processes(images) as share:
        mine = set(share)
    indices = [index for index, sample in enumerate(samples) if sample.image in mine]
    answered, kept = generate_answers(pipeline, root, [samples[i] for i in indices], max_new_tokens,
                                      progress and state.is_local_main_process)
    pairs = list(zip(indices, answered, strict=True))
    kept_items = list(kept.items())
    if state.num_processes > 1:
        pairs = gather_object(pairs)
        kept_items = gather_object(kept_items)
    if not state.is_main_process:
        return None
    answers = [answer for _, answer in sorted(pairs)]
    if len(answers) != len(samples):
        raise RuntimeError(f"gathered {len(answers)} answers for {len(samples)} prompts")
    by_task: dict[str, list[tuple[Sample, str]]] = defaultdict(list)
    for sample, answer in zip(samples, answers, strict=True):
        by_task[sample.task].append((sample, answer))

    snapshot = pipeline.folder is not None and pipeline.folder.parent.name == "snapshots"  # a Hub download
    results: dict = {"checkpoint": pipeline.describe()["checkpoint"], "revision": revision,
                     "commit": pipeline.folder.name if snapshot else None,
                     "weights_sha256": weights_digest(pipeline.folder), "split": split, "n": len(images),
                     "samples": len(samples), "max_new_tokens": max_new_tokens, "processes": state.num_processes}
    notes: dict[str, str] = {}
    reports = by_task.get("report", [])
    report_scores = report_metrics([a for _, a in reports], [s.messages[-1]["content"] for s, _ in reports])
    notes |= {f"report_{k}": v for k, v in report_scores.pop("notes", {}).items()}
    results |= {f"report_{name}": value for name, value in report_scores.items()}
    closed = by_task.get("vqa_closed", [])
    results["closed_accuracy"] = closed_accuracy([a for _, a in closed], [s.answer_choice for s, _ in closed]) \
        if closed else None
    if not closed:
        notes["closed_accuracy"] = "no samples to score"
    opened = by_task.get("vqa_open", [])
    open_scores = open_metrics([a for _, a in opened], [s.messages[-1]["content"] for s, _ in opened])
    notes |= {f"open_{k}": v for k, v in open_scores.pop("notes", {}).items()}
    results |= {f"open_{name}": value for name, value in open_scores.items()}

    if (root / GROUND_TRUTH_FILE).exists():  # phantoms: every lesion is known
        from .phantom import findings_from_ground_truth, parse_findings

        truth = json.loads((root / GROUND_TRUTH_FILE).read_text())
        predicted = {s.image: a for s, a in reports}
        scored = [image for image in images if image in truth and image in predicted]
        unknown = [image for image in predicted if image not in truth]
        if unknown:  # their reports cannot be scored against lesions no one listed
            notes["finding_f1"] = (f"{len(unknown)} of the {len(predicted)} scans with a report have no entry in "
                                   f"{GROUND_TRUTH_FILE} (e.g. {unknown[0]}) and are not scored for findings")
        results |= finding_metrics([predicted[i] for i in scored],
                                   [findings_from_ground_truth(truth[i]) for i in scored], parse_findings)
        results |= selection_recall(truth, dict(kept_items))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["notes"] = notes
    return results
