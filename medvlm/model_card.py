"""The model card (README.md) published with a checkpoint: what it is, how it was made, how it scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

EVAL_ROWS = (
    ("closed_accuracy", "Closed-ended VQA accuracy (answer letter rule)"),
    ("open_rouge1", "Open-ended VQA ROUGE-1"),
    ("open_meteor", "Open-ended VQA METEOR"),
    ("open_bertscore", "Open-ended VQA BERTScore F1"),
    ("report_bleu1", "Report BLEU-1"),
    ("report_rouge1", "Report ROUGE-1"),
    ("report_meteor", "Report METEOR"),
    ("report_bertscore", "Report BERTScore F1"),
    ("finding_f1", "Finding F1 (organ + kind + side)"),
    ("finding_recall_small", "Finding recall, lesions ≤ 8 mm"),
    ("finding_recall_large", "Finding recall, lesions > 8 mm"),
    ("selection_recall_large", "Lesions > 8 mm in a kept slab (the most that recall can reach)"),
    ("size_mae_mm", "Lesion size error (mm, mean absolute)"),
)

PUBLISHED = (  # (model, M3D-Cap report METEOR, M3D-VQA closed-ended accuracy %), as their papers report them
    ("Lian et al. 2026 (2D encoder; the paper this implements)", "50.13", "82.90"),
    ("Med3DVLM", "36.42", "79.95"),
    ("M3D-LaMed", "14.38", "75.78"),
)

INTENDED_USE = (
    "Research on 3D medical vision-language models: reports and answers about CT, MR and PET volumes, "
    "benchmarking on M3D-Cap / M3D-VQA, and demonstrations. Not for diagnosis, triage, screening or any "
    "decision about a patient."
)

LIMITATIONS = (
    "- **Not a medical device**; not cleared or approved by any regulator. Its output can be wrong, "
    "incomplete or invented (a fluent report is not a correct one).",
    "- Trained only on the data named under Training (for the `m3d-*` presets, M3D-Cap / M3D-VQA: public, "
    "de-identified CT and MR cases from Radiopaedia, reports in English); not validated on other hospitals, "
    "scanners, populations or languages.",
    "- It sees at most `slice_budget` slices of a scan, resized to the encoder's input: findings smaller "
    "than a few pixels there can be missed.",
    "- M3D's automatic metrics (BLEU, ROUGE, METEOR, BERTScore, the answer-letter rule) measure agreement "
    "with reference text, not clinical correctness.",
)
VIT3D_LIMITATION = ("- It sees the whole scan resampled to its 3D ViT's input volume: findings smaller than a few "
                    "voxels there can be missed.")
DEMO_LIMITATION = "- Trained on synthetic phantoms only: what it says about a real scan means nothing."

DEMO_NOTICE = (
    "**Trained on synthetic phantoms only — not for clinical use.** This checkpoint has never seen a real "
    "patient. It knows the phantoms of `python -m medvlm phantom`: CT torsos, MR brains built on the MNI152 "
    "template, PET bodies, and the lesions placed in them. On a real scan its words mean nothing."
)


def published_path(path: str) -> str:
    """A folder or file (a preset) as a model card shows it: as typed when relative, by its name when absolute."""
    return Path(path).name if Path(path).is_absolute() else path


def _value(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def evaluation_table(results: dict, targets: dict[str, str] | None = None) -> str:
    """Markdown table of the eval JSON's figures, with an optional target column."""
    targets = targets or {}
    lines = ["| metric | value | target |", "|---|---|---|"]
    lines += [f"| {label} | {_value(results.get(key))} | {targets.get(key, '')} |" for key, label in EVAL_ROWS]
    notes = results.get("notes") or {}
    if notes:
        lines.append("")
        lines += [f"- `{key}` is n/a: {reason}" for key, reason in sorted(notes.items())]
    return "\n".join(lines)


def _encoder_line(vision: dict, image_size: int) -> str:
    """The slice encoder in a phrase: a ViT-style tower by width, depth and patch; a ResNet by its stages."""
    if vision["model_type"] == "resnet":
        return (f"resnet (stage widths {vision['hidden_sizes']}, depths {vision['depths']}, {vision['layer_type']} "
                f"blocks, {image_size} px input)")
    return (f"{vision['model_type']} (hidden {vision['hidden_size']}, {vision['num_hidden_layers']} layers, "
            f"{image_size} px input, patch {vision['patch_size']})")


def _visual_lines(config: dict, vision: dict) -> list[str]:
    """The visual path in a few lines: the five stages, or the 3D ViT baseline that replaces stages 1–4."""
    tokens = f"grid {config['compressor_grid']} → {math.prod(config['compressor_grid'])} visual tokens"
    if config.get("visual_path") == "vit3d":
        return [f"- Visual path: the 3D baseline, a 3D ViT trained from scratch (no 2D encoder, slice selection, "
                f"fusion or compressor): the scan resampled to {config['volume_shape']} voxels, patches of "
                f"{config['volume_patch']}, {config['volume_layers']} layers of width {config['fusion_dim']}, pooled "
                f"to a {tokens}."]
    spacing = config.get("slice_spacing_mm")  # null or 0: the scan's own slices, not averaged into slabs
    slabs = f"slabs of {spacing} mm" if spacing else "the scan's slices kept as they are (no slabs)"
    return [f"- Slice encoder: {_encoder_line(vision, config['image_size'])}, frozen.",
            f"- Slice selection: {config['slice_selection']}, τ = {config['similarity_threshold']}, "
            f"budget K = {config['slice_budget']}; {slabs}, at most {config['max_input_slices']} per scan.",
            f"- Fusion: {config['fusion_mode']}, width {config['fusion_dim']}; compressor: "
            f"{config['compressor_mode']}, {tokens}."]


def write_model_card(folder: str | Path, command: str, evaluation: dict | None = None,
                     targets: dict[str, str] | None = None, evaluation_command: str | None = None,
                     repo_id: str | None = None, revision: str | None = None) -> Path:
    """Write folder/README.md from the checkpoint's config.json and training.json and an eval result.

    `repo_id`, `revision`: the Hub repo (and branch) the card goes to, named in its usage example.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
    demo = config.get("demo", False)
    vision, text = config["vision_config"], config["text_config"]
    front = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [medical, 3d, radiology, vision-language, medvlm]",
        "---",
    ]
    body = [
        "# MedVLM 3D " + ("demo checkpoint" if demo else "checkpoint"),
        "",
        DEMO_NOTICE if demo else "**Not a medical device.** For research; not for clinical decisions.",
        "",
        "## Model",
        "",
        *_visual_lines(config, vision),
        f"- Language model: {text['model_type']} (hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"vocabulary {text['vocab_size']}).",
        "",
        "## Training",
        "",
        f"```bash\n{command}\n```",
        "",
    ]
    if training:
        body += [f"- Seed {training.get('seed')}, {training.get('train_scans')} training scans, "
                 f"{training.get('train_samples')} training samples; wall time "
                 f"{training.get('wall_seconds', 0) / 60:.1f} minutes on the machine that trained it"
                 + (f", over {runs} runs of the command (a run stopped and resumed, or run again)."
                    if (runs := training.get("invocations", 1)) > 1 else "."), ""]
    detection = training.get("encoder_pretraining", {}).get("held_out_detection")
    if detection and detection.get("mean_auc") is not None:
        body += [f"- Slice encoder pre-training, judged on {detection['scans']} validation scans: the head finds "
                 f"each lesion class with a mean AUC of {detection['mean_auc']:.2f} (per class, the scans that "
                 "hold it against the other scans of its modality, scored by the head's highest logit; 0.5 is "
                 "chance). Per class: " + ", ".join(f"{name} {auc:.2f}" for name, auc in detection["auc"].items())
                 + ".", ""]
        if detection.get("patch"):
            body += ["- Per patch (does a lesion touch it; the heads' highest class score), in the same scans: "
                     + "; ".join(f"{modality} AUC {figures['auc']:.2f}, average precision "
                                 f"{figures['average_precision']:.3f} (base rate {figures['base_rate']:.4f})"
                                 for modality, figures in detection["patch"].items())
                     + ". A scan holds thousands of patches to a lesion's few: unless the average precision is "
                       "high, a scan's highest patch is a normal one.", ""]
    probe = training.get("probe")
    if probe:
        body += [f"- Findings probe on the visual tokens (trained with the visual stages, not kept): validation loss "
                 f"{probe['val_bce']:.3f}, against {probe['priors']:.3f} for the class priors and "
                 f"{probe['modality']:.3f} for each finding's rate within the scan's modality. Near the latter, the "
                 "tokens tell the modality and little about the lesions.", ""]
    if training.get("recipe"):
        body += recipe_section(training, config.get("visual_path", "slices"))
    if evaluation:
        body += ["## Evaluation", ""]
        if evaluation_command:
            body += [f"```bash\n{evaluation_command}\n```", ""]
        commit, revision = evaluation.get("commit"), evaluation.get("revision")
        scored = (f" at commit `{commit}`" + (f" (`{revision}`)" if revision and revision != commit else "")
                  if commit else f" at revision `{revision}`" if revision else "")
        held_out = " held-out" if evaluation.get("split") in ("test", "validation") else ""  # not trained on
        body += [f"{evaluation.get('n')}{held_out} scans ({evaluation.get('samples')} prompts), split "
                 f"`{evaluation.get('split')}`{scored}, greedy decoding, at most "
                 f"{evaluation.get('max_new_tokens', 256)} new tokens.", "",
                 evaluation_table(evaluation, targets), ""]
    if not demo:
        body += ["## Published results on M3D (for comparison)", "", published_table(evaluation), ""]
    limitations = [LIMITATIONS[0], DEMO_LIMITATION, *LIMITATIONS[2:]] if demo else list(LIMITATIONS)
    if config.get("visual_path") == "vit3d":
        limitations[2] = VIT3D_LIMITATION
    body += ["## Intended use", "", INTENDED_USE, "", "## Limitations", "", *limitations, ""]
    body += ["## Use", "", "```python", "from medvlm import Pipeline, load_volume", "",
             f"pipeline = Pipeline.from_pretrained({_checkpoint_argument(folder, demo, repo_id, revision)})",
             "print(''.join(pipeline.report(load_volume('scan.nii.gz'))))", "```", "",
             "`pipeline.model` is the `transformers` model, `medvlm.MedVLMForConditionalGeneration`; importing it "
             "registers the model type `medvlm` with transformers' Auto classes (`AutoModelForImageTextToText`), "
             "which then load this checkpoint too.", ""]
    path = folder / "README.md"
    path.write_text("\n".join([*front, "", *body]))
    return path


def _checkpoint_argument(folder: Path, demo: bool, repo_id: str | None, revision: str | None) -> str:
    """What the card's usage example passes to Pipeline.from_pretrained: the Hub repo (and branch) the card
    goes to; else None for the demo checkpoint (bundled with MedVLM 3D), or the folder."""
    if repo_id:
        return repr(repo_id) + (f", revision={revision!r}" if revision else "")
    return "None" if demo else repr(str(folder))


def _source(source) -> str:
    if isinstance(source, dict):
        revision = f" @ {source['revision']}" if source.get("revision") else ""
        return f"`{source['repo_id']}`{revision} (Hugging Face Hub)"
    return str(source)


TASK_WORDS = {"report": "reports", "vqa_closed": "closed-ended questions", "vqa_open": "open-ended questions"}


def recipe_section(training: dict, visual_path: str = "slices") -> list[str]:
    """Data and recipe lines from training.json: sources, stages, precision, processes. The kinds of sample
    the data held (`sample_tasks`; a record from before it was kept: all three) are the ones named."""
    recipe = training["recipe"]
    held = training.get("sample_tasks") or dict.fromkeys(TASK_WORDS)
    kinds = ", ".join(TASK_WORDS[task] + (f" ({count:,})" if count else "") for task, count in held.items())
    lines = ["### Data", "", f"- `{training.get('data')}` (M3D layout: M3D_Cap.json, M3D_VQA_*.csv): "
             f"{training.get('train_scans')} training scans, {training.get('train_samples')} samples "
             f"({kinds}).", "", "### Recipe", "",
             (f"- Slice encoder: {_source(recipe['encoder'])}, frozen." if visual_path != "vit3d"
              else "- 3D ViT: trained from scratch in the stages below."),
             f"- Language model: {_source(recipe['language_model'])}.",
             f"- Mixed precision {recipe['mixed_precision']}, gradient accumulation "
             f"{recipe['gradient_accumulation_steps']}, gradient checkpointing "
             f"{'on' if recipe['gradient_checkpointing'] else 'off'}, {recipe['processes']} process(es), "
             f"max length {recipe['max_length']} tokens, AdamW, cosine schedule.", "",
             "| stage | tasks | trains | epochs | lr | batch / process |", "|---|---|---|---|---|---|"]
    for stage in recipe["stages"]:
        parts = list(stage["trainable"])
        if stage.get("lora"):
            lora = stage["lora"]
            parts.append(f"LoRA on the LM (r {lora['r']}, α {lora['alpha']}, dropout {lora.get('dropout', 0)}), "
                         "merged at the end")
        tasks = ", ".join(task for task in stage["tasks"] if task in held)
        lines.append(f"| {stage['name']} | {tasks} | {', '.join(parts)} | {stage['epochs']} | "
                     f"{stage['lr']} | {stage['batch_size']} |")
    return [*lines, ""]


def published_table(evaluation: dict | None) -> str:
    """The published M3D figures beside this checkpoint's (or "not evaluated")."""
    lines = ["| model | M3D-Cap METEOR | M3D-VQA closed-ended accuracy (%) |", "|---|---|---|"]
    lines += [f"| {name} | {meteor} | {accuracy} |" for name, meteor, accuracy in PUBLISHED]
    meteor = (evaluation or {}).get("report_meteor")
    accuracy = (evaluation or {}).get("closed_accuracy")
    ours = [f"{100 * value:.2f}" if isinstance(value, float) else "not evaluated" for value in (meteor, accuracy)]
    lines.append(f"| this checkpoint | {ours[0]} | {ours[1]} |")
    return "\n".join(lines)

