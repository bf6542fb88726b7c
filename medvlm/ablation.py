"""`python -m medvlm ablate`: does each stage earn its place? Ablations and data efficiency on phantoms.

    python -m medvlm ablate --out assets/results [--size small|full] [--seeds 2] [--work DIR]

1. Writes three phantom sets with fixed seeds: a training pool (80 % train, 10 % validation), a
   held-out set, and a small-lesion set whose lesions are all 2–8 mm (CT and MR: a PET voxel is
   ~4 mm, too coarse for them).
2. Trains, with one preset, the full model, each single-stage ablation of variants.py and the 3D
   baseline, for every seed: same data, seeds, stages and optimiser steps, only the switched stage
   differs. Then the full model and the 3D baseline on 10/25/50 % of the training scans (nested
   subsets, stratified by modality; the 2D encoder is pre-trained on the same subset, so the 2D
   path gets no data the 3D baseline does not).
3. Scores each checkpoint with medvlm.evaluate on the held-out set (finding F1, closed-VQA
   accuracy, …) and the small-lesion set (recall of lesions ≤ 8 mm), and counts the 2D encoder's
   work on the held-out scans.
4. Writes OUT/ablations.json (every run; mean ± sample s.d. over seeds), OUT/data_efficiency.png
   and OUT/ablations.log (the summary table), rewritten after every run.

WORK (default OUT-training, beside OUT) holds, per size, the phantoms, checkpoints, training
states and the pre-trained 2D encoders (variants with the same data and seed share one).
Resumable: a run recorded in OUT/ablations.json or WORK/SIZE/runs/NAME/scores.json is not
repeated, and an interrupted training resumes from its last epoch. Runs go seed by seed.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import CAP_FILE, GROUND_TRUTH_FILE, VQA_FILES, load_scan
from .errors import UserInputError
from .variants import VARIANTS

HEADLINE_METRICS = ("finding_f1", "closed_accuracy", "small_lesion_recall", "probe_val_bce", "encoded_fraction",
                    "encoder_work")
CURVE_METRICS = ("finding_f1", "closed_accuracy")
CURVE_VARIANTS = ("full", "vit3d")
TRAIN_SEED, HELDOUT_SEED, SMALL_LESION_SEED = 31000, 31001, 31002  # phantom seeds, disjoint from the demo's
SMALL_LESION_MM = (2.0, 8.0)


@dataclass(frozen=True)
class StudySize:
    """How big the study is: phantom counts, their in-plane matrix, the training preset, the data fractions."""

    train_phantoms: int  # training pool: 80 % train, 10 % validation, 10 % unused
    heldout_phantoms: int
    small_lesion_phantoms: int
    matrix: int  # in-plane size of every phantom
    preset: str  # medvlm/presets/NAME.json
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    model_overrides: dict = field(default_factory=dict)  # for every run (e.g. the 3D ViT's size in a tiny study)


SIZES = {
    "small": StudySize(train_phantoms=240, heldout_phantoms=60, small_lesion_phantoms=60, matrix=160,
                       preset="ablation"),
    "full": StudySize(train_phantoms=600, heldout_phantoms=150, small_lesion_phantoms=150, matrix=160,
                      preset="ablation"),
    "tiny": StudySize(train_phantoms=12, heldout_phantoms=3, small_lesion_phantoms=2, matrix=48, preset="tiny",
                      fractions=(0.5, 1.0),
                      model_overrides={"volume_shape": [8, 32, 32], "volume_patch": [2, 8, 8], "volume_layers": 1,
                                       "volume_heads": 2}),  # a smoke test of the machinery; learns nothing
}


@dataclass(frozen=True)
class Run:
    """One training run of the study: a variant of variants.py, a training seed, a fraction of the training scans."""

    variant: str
    seed: int
    fraction: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.variant}-{round(self.fraction * 100):03d}pct-seed{self.seed}"


def plan(size: StudySize, seeds: int) -> list[Run]:
    """Every run, seed by seed: each variant on all the data, then the data-efficiency curve's other points.

    So a study stopped part-way holds whole seeds: every comparison, with fewer error bars.
    """
    runs = []
    for seed in range(seeds):
        runs += [Run(variant, seed) for variant in VARIANTS]
        runs += [Run(variant, seed, fraction) for variant in CURVE_VARIANTS for fraction in size.fractions
                 if fraction < 1.0]
    return runs


def finished_runs(out: Path, size_name: str, planned: list[Run]) -> dict[str, dict]:
    """The runs that OUT/ablations.json already records for this study, by name.

    The results file is the study's ledger: a fresh checkout that holds it (the work folder gone)
    goes on with the runs still missing instead of starting over. A ledger of another study size, or
    with runs this plan lacks (more seeds), is refused (UserInputError): writing this study's results
    would drop them.
    """
    path = out / "ablations.json"
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    recorded = {record["name"]: record for record in result.get("runs", [])}
    kept_size = result.get("study", {}).get("size")
    if kept_size != size_name and recorded:
        raise UserInputError(f"{out} holds the results of the {kept_size!r} study ({len(recorded)} runs), which "
                             f"the {size_name!r} study's would replace; give another --out")
    dropped = sorted(set(recorded) - {run.name for run in planned})
    if dropped:
        seeds = len(result.get("study", {}).get("seeds", []))
        covers = seeds > 0 and set(recorded) <= {run.name for run in plan(SIZES[size_name], seeds)}
        remedy = (f"run it with --seeds {seeds}, or give another --out" if covers else
                  "give another --out (they are not runs of this version's variants and seeds)")
        runs = "1 finished run" if len(dropped) == 1 else f"{len(dropped)} finished runs"
        raise UserInputError(f"{out} holds {runs} this study does not plan (e.g. {dropped[0]}), which its results "
                             f"would drop; {remedy}")
    return recorded


# Data ---------------------------------------------------------------------------------------------

def write_study_data(work: Path, size: StudySize) -> dict[str, Path]:
    """The three phantom sets (written once, then reused): {"train", "heldout", "small_lesion"} → folder."""
    from .phantom import write_phantom_set

    sets = {"train": (size.train_phantoms, TRAIN_SEED, None, ("ct", "mr", "pt"), None),
            "heldout": (size.heldout_phantoms, HELDOUT_SEED, "test", ("ct", "mr", "pt"), None),
            "small_lesion": (size.small_lesion_phantoms, SMALL_LESION_SEED, "test", ("ct", "mr"), SMALL_LESION_MM)}
    folders = {}
    for name, (count, seed, split, modalities, lesion_size) in sets.items():
        folder = work / "data" / name
        if not (folder / GROUND_TRUTH_FILE).exists():  # written last: its presence means the set is complete
            write_phantom_set(folder, n=count, seed=seed, modalities=modalities, formats=("nifti",), split=split,
                              matrix=size.matrix, lesion_size_mm=lesion_size)
        folders[name] = folder
    return folders


def training_subset(pool: Path, fraction: float, out: Path, seed: int = TRAIN_SEED) -> Path:
    """A data folder holding `fraction` of the pool's training scans and all its validation scans.

    Per modality, the scans are taken in one fixed shuffled order, so a smaller fraction's scans are
    part of every larger one. The volumes are not copied: the modality folders are linked.
    """
    if fraction >= 1.0:
        return pool
    if (out / GROUND_TRUTH_FILE).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    captions = json.loads((pool / CAP_FILE).read_text())
    by_modality: dict[str, list[str]] = {}
    for item in captions["train"]:
        by_modality.setdefault(item["image"].split("/")[0], []).append(item["image"])
    keep = set()
    for number, (modality, images) in enumerate(sorted(by_modality.items())):
        order = np.random.default_rng([seed, number]).permutation(len(images))
        keep |= {images[i] for i in order[:max(1, round(fraction * len(images)))]}
        link = out / modality
        if not link.exists():
            link.symlink_to((pool / modality).resolve(), target_is_directory=True)
    captions["train"] = [item for item in captions["train"] if item["image"] in keep]
    (out / CAP_FILE).write_text(json.dumps(captions, indent=1))
    for split, name in VQA_FILES.items():
        with open(pool / name, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [row for row in reader if split != "train" or row["Image Path"] in keep]
            columns = reader.fieldnames
        with open(out / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    (out / GROUND_TRUTH_FILE).write_text((pool / GROUND_TRUTH_FILE).read_text())
    return out


# One run ------------------------------------------------------------------------------------------

@torch.inference_mode()
def encoder_work(checkpoint: Path, data: Path) -> dict:
    """How much of the 2D encoder's work the held-out scans cost, from stages 1–2 on each.

    encoded_fraction: slices encoded at full size / input slices. encoder_work: the same with the
    selection preview's slices counted at their pixel share, (preview / image_size)², of a full
    pass (a ViT's cost grows with its patch count); 1.0 is encoding every slice once. None for the
    3D baseline, which runs no 2D encoder.
    """
    from .features import scan_slices
    from .pipeline import checkpoint_named, load_model

    model = load_model(checkpoint, checkpoint_named(checkpoint)).eval()  # float32, as `evaluate` runs it
    config = model.config
    if config.visual_path == "vit3d":
        return {"encoded_fraction": None, "encoder_work": None, "input_slices": None}
    truth = json.loads((data / GROUND_TRUTH_FILE).read_text())
    total = encoded = previewed = 0
    for image in sorted(truth):
        scan = scan_slices(model, load_scan(data, image), image)
        total, encoded, previewed = total + scan.total, encoded + scan.encoded, previewed + scan.previewed
    preview_share = ((config.selection_preview_size or config.image_size) / config.image_size) ** 2
    return {"encoded_fraction": encoded / total, "encoder_work": (encoded + preview_share * previewed) / total,
            "input_slices": total}


def run_one(run: Run, size: StudySize, folders: dict[str, Path], work: Path) -> dict:
    """Train, score and time one run; its record is kept in WORK/runs/NAME/scores.json."""
    from .evaluate import evaluate
    from .train import probe_validation_loss, train

    folder = work / "runs" / run.name
    scores_file = folder / "scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    resumed = (folder / "training").exists()
    data = training_subset(folders["train"], run.fraction, work / "data" / f"train-{round(run.fraction * 100):03d}pct")
    started = time.perf_counter()
    checkpoint = train(size.preset, data, folder / "checkpoint", seed=run.seed, work=folder / "training",
                       config_overrides={**size.model_overrides, **VARIANTS[run.variant]},
                       encoder_cache=work / "encoders")  # variants with equal data and seed share it
    trained = time.perf_counter()
    heldout = evaluate(checkpoint, folders["heldout"], split="test", progress=False)
    small = evaluate(checkpoint, folders["small_lesion"], split="test", progress=False, tasks=("report",))
    work_counts = encoder_work(checkpoint, folders["heldout"])
    done = time.perf_counter()
    training = json.loads((checkpoint / "training.json").read_text())
    record = {
        **asdict(run), "name": run.name, "train_scans": training["train_scans"],
        "metrics": {
            "finding_f1": heldout.get("finding_f1"), "finding_precision": heldout.get("finding_precision"),
            "finding_recall": heldout.get("finding_recall"), "closed_accuracy": heldout.get("closed_accuracy"),
            "report_bleu1": heldout.get("report_bleu1"), "report_rouge1": heldout.get("report_rouge1"),
            "size_mae_mm": heldout.get("size_mae_mm"), "small_lesion_recall": small.get("finding_recall_small"),
            "small_lesion_f1": small.get("finding_f1"), "probe_val_bce": probe_validation_loss(folder / "training"),
            **work_counts,
        },
        "wall_seconds": {"train": round(trained - started, 1), "eval": round(done - trained, 1),
                         "total": round(done - started, 1)},
        "resumed": resumed,  # True: "train" covers only the part trained by the last invocation
    }
    scores_file.write_text(json.dumps(record, indent=1))
    return record


# Summary ------------------------------------------------------------------------------------------

def image_blind_reference(folders: dict[str, Path]) -> dict:
    """What a model that ignores the image scores: the floor each run is read against.

    finding_f1: reports that name no finding (every held-out scan read as normal). probe_val_bce: the
    probe predicting each finding at its frequency among the training scans, on the validation scans,
    what it scores when the visual tokens tell it nothing; probe_val_bce_modality: at its frequency among
    the training scans of the scan's modality, what visual tokens that tell only the modality reach.
    small_lesion_recall: 0. closed_accuracy: 0.25, guessing among four choices (an LM can beat it from
    the questions alone).
    """
    from .metrics import finding_metrics
    from .phantom import findings_from_ground_truth, parse_findings
    from .train import probe_floors, read_samples

    truth = json.loads((folders["heldout"] / GROUND_TRUTH_FILE).read_text())
    findings = [findings_from_ground_truth(truth[image]) for image in sorted(truth)]
    silent = finding_metrics([""] * len(findings), findings, parse_findings)
    pool = folders["train"]
    train_images, val_images = ([*dict.fromkeys(s.image for s in read_samples(pool, split))]
                                for split in ("train", "validation"))
    floors = probe_floors(pool, train_images, val_images)
    return {"finding_f1": silent["finding_f1"], "closed_accuracy": 0.25, "small_lesion_recall": 0.0,
            "probe_val_bce": floors["priors"], "probe_val_bce_modality": floors["modality"]}


def mean_std(values: list) -> dict:
    """{"mean", "std" (sample s.d., None for one value), "n"} over the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present)}


def summarise(records: list[dict]) -> dict:
    """Mean ± s.d. over seeds: per variant on all the data (headline), per variant and fraction (curve)."""
    headline, curve = {}, {}
    for variant in VARIANTS:
        full_data = [r for r in records if r["variant"] == variant and r["fraction"] >= 1.0]
        if full_data:
            headline[variant] = {metric: mean_std([r["metrics"].get(metric) for r in full_data])
                                 for metric in HEADLINE_METRICS}
    for variant in CURVE_VARIANTS:
        points = {}
        for fraction in sorted({r["fraction"] for r in records if r["variant"] == variant}):
            at = [r for r in records if r["variant"] == variant and r["fraction"] == fraction]
            points[f"{fraction:g}"] = {"train_scans": at[0]["train_scans"],
                                       **{metric: mean_std([r["metrics"].get(metric) for r in at])
                                          for metric in CURVE_METRICS}}
        if points:
            curve[variant] = points
    return {"headline": headline, "data_efficiency": curve}


def _figure(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _row(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]


def summary_table(result: dict) -> str:
    """The log summary in Markdown, quoted as is by the README: the headline table (every variant on all
    the training scans), the data-efficiency points and the wall times; mean ± sample s.d. over seeds."""
    study, summary = result["study"], result["summary"]
    lines = [f"MedVLM ablation study, size {study['size']}: {len(result['runs'])} of {study['planned_runs']} "
             "runs done" + ("" if result["complete"] else " (incomplete)"), ""]
    headline = [[f"`{variant}`", stats["finding_f1"]["n"], *(_figure(stats[m]) for m in HEADLINE_METRICS)]
                for variant, stats in summary["headline"].items()]
    curve = [[f"`{variant}`", fraction, point["train_scans"], point["finding_f1"]["n"],
              *(_figure(point[m]) for m in CURVE_METRICS)]
             for variant, points in summary["data_efficiency"].items() for fraction, point in points.items()]
    blind = study.get("image_blind", {})
    headline.append(["image-blind floor", "—",
                     *(_figure({"mean": blind.get(metric), "std": None}) for metric in HEADLINE_METRICS)])
    if blind.get("probe_val_bce_modality") is not None:  # studies logged before it was measured lack it
        headline.append(["modality-only floor", "—", *(_figure({"mean": blind["probe_val_bce_modality"]
                                                                if metric == "probe_val_bce" else None, "std": None})
                                                       for metric in HEADLINE_METRICS)])
    lines += [*_table(["variant", "seeds", *HEADLINE_METRICS], headline), "",
              *_table(["data efficiency", "fraction", "training scans", "seeds", *CURVE_METRICS], curve)]
    seconds = [r["wall_seconds"]["total"] for r in result["runs"]]
    if seconds:
        lines += ["", f"Wall time per run: median {statistics.median(seconds):.0f} s, max {max(seconds):.0f} s, "
                      f"all runs {sum(seconds) / 3600:.2f} h."]
    return "\n".join(lines)


def plot_data_efficiency(summary: dict, path: Path, floor: dict | None = None) -> Path:
    """finding F1 and closed-VQA accuracy against training scans, mean ± s.d. over seeds, one line per variant;
    `floor` (image_blind_reference's figures) is drawn as a dashed line: a point on it says nothing of the scan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"full": "full model (2D encoder, five stages)", "vit3d": "3D ViT from scratch"}
    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(10, 4), constrained_layout=True)
    for axis, metric in zip(axes, CURVE_METRICS, strict=True):
        for variant, points in summary["data_efficiency"].items():
            shown = [p for p in points.values() if p[metric]["mean"] is not None]
            axis.errorbar([p["train_scans"] for p in shown], [p[metric]["mean"] for p in shown],
                          yerr=[p[metric]["std"] or 0.0 for p in shown], marker="o", capsize=3,
                          label=labels.get(variant, variant))
        if floor and floor.get(metric) is not None:
            axis.axhline(floor[metric], color="grey", linestyle="--", linewidth=1, label="image-blind floor")
        axis.set_xscale("log")
        scans = sorted({p["train_scans"] for points in summary["data_efficiency"].values() for p in points.values()})
        axis.set_xticks(scans, [str(count) for count in scans])
        axis.minorticks_off()
        axis.set_xlabel("training volumes (phantoms)")
        axis.set_ylabel(metric)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("Data efficiency on held-out phantoms (mean ± s.d. over seeds)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_results(out: Path, size_name: str, size: StudySize, seeds: int, records: list[dict],
                  planned: list[Run], folders: dict[str, Path]) -> dict:
    """OUT/ablations.json, OUT/ablations.log and (with data-efficiency points) OUT/data_efficiency.png."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {name: len(json.loads((folder / GROUND_TRUTH_FILE).read_text())) for name, folder in folders.items()}
    result = {
        "study": {"size": size_name, **asdict(size), "seeds": list(range(seeds)), "planned_runs": len(planned),
                  "variants": VARIANTS, "phantoms": counts,
                  "phantom_seeds": {"train": TRAIN_SEED, "heldout": HELDOUT_SEED, "small_lesion": SMALL_LESION_SEED},
                  "small_lesion_mm": list(SMALL_LESION_MM), "image_blind": image_blind_reference(folders),
                  "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                              "processor": platform.processor() or platform.machine()}},
        "complete": len(records) == len(planned),
        "runs": records,
        "summary": summarise(records),
    }
    (out / "ablations.json").write_text(json.dumps(result, indent=1))
    (out / "ablations.log").write_text(summary_table(result) + "\n")
    if result["summary"]["data_efficiency"]:
        plot_data_efficiency(result["summary"], out / "data_efficiency.png", result["study"]["image_blind"])
    return result


def run_study(out: str | Path, size: str = "small", seeds: int = 2, work: str | Path | None = None,
              progress: bool = True) -> dict:
    """The whole study (see the module docstring); returns what OUT/ablations.json holds."""
    if size not in SIZES:
        raise ValueError(f"unknown study size {size!r}; choose one of {', '.join(SIZES)}")
    if seeds < 1:
        raise ValueError(f"cannot run the study with {seeds} seeds; give at least 1 (2 for error bars)")
    study, out = SIZES[size], Path(out)
    work = (Path(work) if work else out.resolve().with_name(out.resolve().name + "-training")) / size
    planned = plan(study, seeds)
    finished = finished_runs(out, size, planned)  # before anything is written
    if planned and all(run.name in finished for run in planned):  # done: its table, without making its data again
        result = json.loads((out / "ablations.json").read_text())
        if progress:
            print(summary_table(result), flush=True)
        return result
    folders = write_study_data(work, study)
    records = []
    for number, run in enumerate(planned, 1):
        if run.name in finished:
            records.append(finished[run.name])
            continue
        if progress:
            print(f"[{number}/{len(planned)}] {run.name}", flush=True)
        records.append(run_one(run, study, folders, work))
        write_results(out, size, study, seeds, records, planned, folders)  # after every run: a stop loses one
    result = write_results(out, size, study, seeds, records, planned, folders)
    if progress:
        print(summary_table(result), flush=True)
    return result


__all__ = ["SIZES", "Run", "StudySize", "plan", "run_study", "summarise", "training_subset", "write_study_data"]
