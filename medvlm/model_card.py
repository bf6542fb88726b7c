"""The model card (README.md) published with a checkpoint: what it is, how it was made, how it scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

EVAL_ROWS = (
    ("closed_accuracy", "Closed-ended VQA accuracy (answer letter rule)"),
    ("open_rouge1", "Open-ended VQA ROUGE-1"),
    ("report_bleu1", "Report BLEU-1"),
    ("report_rouge1", "Report ROUGE-1"),
    ("report_meteor", "Report METEOR"),
    ("report_bertscore", "Report BERTScore F1"),
    ("finding_f1", "Finding F1 (organ + kind + side)"),
    ("finding_recall_small", "Finding recall, lesions ≤ 8 mm"),
    ("finding_recall_large", "Finding recall, lesions > 8 mm"),
    ("size_mae_mm", "Lesion size error (mm, mean absolute)"),
)

DEMO_NOTICE = (
    "**Trained on synthetic phantoms only — not for clinical use.** This checkpoint has never seen a real "
    "patient. It knows the phantoms of `python -m medvlm phantom`: CT torsos, MR brains built on the MNI152 "
    "template, PET bodies, and the lesions placed in them. On a real scan its words mean nothing."
)


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


def write_model_card(folder: str | Path, command: str, evaluation: dict | None = None,
                     targets: dict[str, str] | None = None, evaluation_command: str | None = None) -> Path:
    """Write folder/README.md from the checkpoint's config.json and training.json and an eval result."""
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
        f"- Slice encoder: {vision['model_type']} (hidden {vision['hidden_size']}, {vision['num_hidden_layers']} "
        f"layers, {config['image_size']} px input, patch {vision['patch_size']}), frozen.",
        f"- Slice selection: {config['slice_selection']}, τ = {config['similarity_threshold']}, "
        f"budget K = {config['slice_budget']}; slabs of {config['slice_spacing_mm']} mm, at most "
        f"{config['max_input_slices']} per scan.",
        f"- Fusion: {config['fusion_mode']}, width {config['fusion_dim']}; compressor: {config['compressor_mode']}, "
        f"grid {config['compressor_grid']} → {math.prod(config['compressor_grid'])} visual tokens.",
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
                 f"{training.get('wall_seconds', 0) / 60:.1f} minutes on the machine that trained it.", ""]
    if evaluation:
        body += ["## Evaluation", ""]
        if evaluation_command:
            body += [f"```bash\n{evaluation_command}\n```", ""]
        body += [f"{evaluation.get('n')} held-out scans ({evaluation.get('samples')} prompts), split "
                 f"`{evaluation.get('split')}`, greedy decoding, at most 256 new tokens.", "",
                 evaluation_table(evaluation, targets), ""]
    body += ["## Use", "", "```python", "from medvlm import Pipeline, load_volume", "",
             f"pipeline = Pipeline.from_pretrained({'None' if demo else repr(str(folder))})",
             "print(''.join(pipeline.report(load_volume('scan.nii.gz'))))", "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join([*front, "", *body]))
    return path


