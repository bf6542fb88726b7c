"""Training with accelerate: the stages of a preset, resumable, from cached frozen-encoder features.

    python -m medvlm train --preset demo --data PHANTOMS --out assets/demo-model
    accelerate launch --config_file assets/accelerate/ddp.yaml -m medvlm train --preset m3d-biomedclip-qwen ...

A preset (medvlm/presets/NAME.json) fixes the model, the tokenizer and the stages. Each stage
names the tasks it trains on and the parts it trains (and, with `lora`, puts LoRA adapters on the
LM that are merged into it when the stage ends); everything else stays frozen. The 2D encoder is
always frozen here (the demo preset pre-trains its small encoder first, see encoder_pretraining.py;
the real presets take a pretrained one from the Hub, see pretrained.py), so its kept-slice
features are computed once and cached, each process encoding its share of the scans. Preset
keys for the accelerator: `mixed_precision` ("no", "bf16"), `gradient_accumulation_steps`.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import hashlib
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, get_cosine_schedule_with_warmup

from .batches import Collator, ScanGroupedBatches
from .configuration import MedVLMConfig
from .data import (
    CAP_FILE,
    GROUND_TRUTH_FILE,
    REPORT_PARAPHRASES,
    REPORT_PROMPT,
    VQA_FILES,
    Sample,
    check_split,
    load_scan,
    read_m3d_cap,
    read_m3d_vqa,
    scan_stamps,
)
from .errors import UserInputError
from .features import (
    FeatureCache,
    VolumeFeatures,
    build_feature_cache,
    encoder_fingerprint,
    process_state,
    same_content,
)
from .hub import PUBLISHED, renew_card
from .model_card import published_path
from .modeling import MedVLMForConditionalGeneration
from .pretrained import (
    attach_lora,
    load_pretrained_encoder,
    load_pretrained_weights,
    merge_lora,
    pretrained_text_config,
    pretrained_tokenizer,
    pretrained_vision_config,
)
from .tokenizer import IMAGE_TOKEN, train_tokenizer
from .variants import apply_overrides
from .work_folder import (
    CLOCK,
    METRICS,
    MetricsLog,
    RunClock,
    claim_inputs,
    claim_work_folder,
    resume_point,
    run_record,
    save_epoch_state,
)

PRESETS = Path(__file__).resolve().parent / "presets"
TRAINABLE_PARTS = {
    "fusion": ("input_projection", "slice_heights", "fusion"),
    "compressor": ("compressor",),
    "projector": ("multi_modal_projector",),
    "language_model": ("language_model",),
    "volume_encoder": ("volume_encoder",),  # the 3D baseline's encoder (visual_path="vit3d"), trained from scratch
}


PRESET_OBJECTS = ("model", "language_model", "tokenizer")  # the sections of a preset that training reads
STAGE_KEYS = ("name", "tasks", "trainable", "epochs", "lr", "batch_size")  # what each stage must say
STAGE_TASKS = ("report", "vqa_closed", "vqa_open")  # a Sample's task, as read_samples names them
LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}  # a stage's "lora": what `attach_lora` reads


def load_preset(name_or_path: str) -> dict:
    """A preset by name (medvlm/presets/NAME.json) or a path to a JSON file; a file that is not a preset
    (`preset_problem`) raises UserInputError naming it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.json"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.json")))
        raise UserInputError(f"no preset {name_or_path!r}; choose one of {names} or give a JSON file")
    try:
        preset = json.loads(path.read_text())
    except OSError as error:
        raise UserInputError(f"cannot read the preset {path} ({error.strerror}); give a JSON file") from None
    except ValueError as error:  # also a file that is not UTF-8 text
        raise UserInputError(f"the preset {path} is not valid JSON ({error}); fix the file") from None
    problem = preset_problem(preset)
    if problem:
        raise UserInputError(f"the preset {path} {problem}; see medvlm/presets/demo.json for one that trains")
    return preset


def _json_kind(value) -> str:
    """What JSON calls a parsed value's type, with its article."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "a number")


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def preset_problem(preset) -> str | None:
    """What keeps a parsed preset from training, as a phrase, or None. It must be a JSON object with the
    objects of PRESET_OBJECTS, a language model (`pretrained` with a `repo_id`, or `from_scratch` with a
    `model_type`), a tokenizer (`from_language_model` true, or a `vocab_size`), a whole `max_length`, and
    a list of `stages`, each an object with STAGE_KEYS whose `trainable` parts are TRAINABLE_PARTS and whose
    values `stage_problem` accepts, under distinct names."""
    if not isinstance(preset, dict):
        return f"holds {_json_kind(preset)}, not a JSON object"
    for key in PRESET_OBJECTS:
        if not isinstance(preset.get(key), dict):
            return f"has {_json_kind(preset[key])} as {key!r}, not an object" if key in preset else f"lacks {key!r}"
    language_model, tokenizer = preset["language_model"], preset["tokenizer"]
    pretrained, scratch = language_model.get("pretrained"), language_model.get("from_scratch")
    if not ((isinstance(pretrained, dict) and isinstance(pretrained.get("repo_id"), str))
            or (isinstance(scratch, dict) and isinstance(scratch.get("model_type"), str))):
        return ("names no language model (language_model needs 'pretrained' with a 'repo_id', or 'from_scratch' "
                "with a 'model_type')")
    if tokenizer.get("from_language_model") is not True and not _is_whole(tokenizer.get("vocab_size")):
        return "names no tokenizer (tokenizer needs 'from_language_model': true, or a whole 'vocab_size')"
    if not _is_whole(preset.get("max_length")):
        return "has no whole 'max_length' (the most tokens a sample may have)"
    stages = preset.get("stages")
    if not isinstance(stages, list) or not stages:
        return "has no 'stages' (a list of training stages)"
    for number, stage in enumerate(stages, 1):
        missing = [key for key in STAGE_KEYS if key not in stage] if isinstance(stage, dict) else list(STAGE_KEYS)
        if missing:
            return f"has a stage {number} without {', '.join(map(repr, missing))}"
        trainable = stage["trainable"]
        if not isinstance(trainable, list):
            return f"has a stage {number} whose 'trainable' is not a list of parts (e.g. [\"projector\"])"
        unknown = [part for part in trainable if part not in list(TRAINABLE_PARTS)]
        if unknown:
            return f"has a stage {number} that trains {unknown[0]!r}, not one of {', '.join(TRAINABLE_PARTS)}"
        problem = stage_problem(stage)
        if problem:
            return f"has a stage {number} whose {problem}"
    names = [stage["name"] for stage in stages]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        return f"has two stages named {repeated!r} (each keeps its state in a folder of its name)"
    return None


def _is_number(value, low: float = 0.0, above: bool = False) -> bool:
    """A JSON number (not true/false) that is finite and at least `low` (above it with `above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > low if above else value >= low


def stage_problem(stage: dict) -> str | None:
    """What is wrong with one stage's values, as "'KEY' is VALUE, not WHAT IS ALLOWED", or None.

    Checked where the preset is read, so a hand-written preset fails before the encoder is pre-trained
    and the features cached, not in the middle of the stage. `trainable` is checked by `preset_problem`.
    """
    # (key, whether the stage must have it, whether its value is allowed, what is allowed)
    checks = (
        ("name", True, lambda v: isinstance(v, str) and v.strip() != "" and "/" not in v and "\\" not in v
         and v not in (".", ".."), "a name that can be a folder's (e.g. \"align\")"),
        ("tasks", True, lambda v: isinstance(v, list) and v != [] and all(task in STAGE_TASKS for task in v),
         f"a list of tasks from {', '.join(STAGE_TASKS)}"),
        ("epochs", True, _is_whole, "a whole number of at least 1"),
        ("lr", True, lambda v: _is_number(v, above=True), "a learning rate above 0 (e.g. 0.001)"),
        ("batch_size", True, _is_whole, "a whole number of at least 1"),
        ("samples_per_scan", False, _is_whole, "a whole number of at least 1"),
        ("finding_loss", False, _is_number, "a weight of 0 or more"),
        ("lm_loss", False, _is_number, "a weight of 0 or more"),
        ("patch_loss", False, _is_number, "a weight of 0 or more"),
        ("lora", False, lambda v: v is None or (isinstance(v, dict) and _is_whole(v.get("r"))
                                                and _is_number(v.get("alpha"), above=True)
                                                and _is_number(v.get("dropout", 0.0)) and v.get("dropout", 0.0) < 1
                                                and set(v) <= LORA_KEYS),
         "an object with a whole 'r', an 'alpha' above 0, a 'dropout' from 0 to below 1 and perhaps "
         "'target_modules', no other key"),
    )
    for key, required, allowed, what in checks:
        if (required or key in stage) and not allowed(stage[key]):
            return f"{key!r} is {json.dumps(stage[key])}, not {what}"
    unknown = sorted(set(stage) - {key for key, *_ in checks} - {"trainable"})
    if unknown:
        known = ", ".join(key for key, *_ in checks)
        return f"{unknown[0]!r} is not a stage setting (a stage takes {known} and trainable)"
    if not stage["trainable"] and not stage.get("lora"):
        return "'trainable' is [], not a list of the parts it trains (or a 'lora' for the language model)"
    return None


def read_samples(root: Path, split: str, prompts: tuple[str, ...] = (REPORT_PROMPT,)) -> list[Sample]:
    """Report and VQA samples of one split of an M3D-format folder (M3D-Cap, M3D-VQA, or both)."""
    check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"there is no folder {root}; point --data to an M3D-format folder (python -m medvlm "
                             "phantom writes one)")
    if not (root / CAP_FILE).exists() and not (root / VQA_FILES[split]).exists():
        raise UserInputError(f"{root} holds neither {CAP_FILE} nor {VQA_FILES[split]}; point to an M3D-format "
                             "folder")
    samples = read_m3d_cap(root, split, prompts) if (root / CAP_FILE).exists() else []
    return samples + (read_m3d_vqa(root, split) if (root / VQA_FILES[split]).exists() else [])


def build_tokenizer(preset: dict, samples: list[Sample]):
    """A BPE trained on the samples' text (`tokenizer.train_bpe`), or the pretrained LM's own tokenizer."""
    settings = preset["tokenizer"]
    if settings.get("from_language_model"):
        return pretrained_tokenizer(preset["language_model"])
    texts = [turn["content"] for sample in samples for turn in sample.messages]
    return train_tokenizer(texts, vocab_size=settings["vocab_size"])


def build_config(preset: dict, tokenizer, **overrides) -> MedVLMConfig:
    """The model configuration of a preset, sized to the tokenizer; pretrained parts take their Hub configs."""
    language_model = preset["language_model"]
    if "pretrained" in language_model:
        text_config = pretrained_text_config(language_model, tokenizer)
    else:
        text_settings = dict(language_model["from_scratch"])
        text_config = AutoConfig.for_model(text_settings.pop("model_type"), vocab_size=len(tokenizer),
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                           bos_token_id=None, **text_settings)
    settings = {**preset["model"], **overrides}
    if "pretrained" in preset.get("encoder", {}):
        settings["vision_config"] = pretrained_vision_config(preset["encoder"])
    return MedVLMConfig(**settings, text_config=text_config,
                        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def build_model(preset: dict, tokenizer, root: Path, images: list[str], progress: bool, seed: int,
                encoder_cache: Path, held_out: list[str] = (),
                keep_threshold: bool = False) -> tuple[MedVLMForConditionalGeneration, dict]:
    """A fresh model from a preset: pretrained parts from the Hub; with `encoder_pretraining`, its slice
    encoder is pre-trained first (or taken from `encoder_cache`, where an equal one was kept) and judged
    on the `held_out` scans, and τ calibrated to the preset's `keep_fraction` unless `keep_threshold` (a τ
    given with --set)."""
    config = build_config(preset, tokenizer)
    settings = preset.get("encoder_pretraining")
    encoder = None
    if settings:
        from .encoder_pretraining import pretrain_encoder_once

        encoder = pretrain_encoder_once(encoder_cache, config, root, images, settings, preset.get("keep_fraction"),
                                        progress, seed, held_out)
        if encoder.similarity_threshold is not None and not keep_threshold:
            config = build_config(preset, tokenizer, similarity_threshold=encoder.similarity_threshold)
    set_seed(seed)  # the new parts start the same whether the encoder was pre-trained just now or came from its cache
    model = MedVLMForConditionalGeneration(config)
    if encoder is None:
        load_pretrained_weights(model, preset)
        return model, {}
    model.slice_encoder.load_state_dict(encoder.state_dict)
    return model, encoder.summary


def build_encoding_model(preset: dict) -> MedVLMForConditionalGeneration:
    """The preset's model for stages 1–2 only, what the feature cache needs: its encoder as training builds
    it (pretrained from the Hub, or open_clip's) with a one-layer stand-in LM, so no LLM is loaded."""
    if preset.get("encoder_pretraining"):
        raise UserInputError("this preset pre-trains its encoder on the training data, so `train` caches its "
                             "features itself; give a trained checkpoint instead")
    settings = dict(preset["model"])
    if "pretrained" in preset.get("encoder", {}):
        settings["vision_config"] = pretrained_vision_config(preset["encoder"])
    stand_in = AutoConfig.for_model("llama", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                    num_attention_heads=1, num_key_value_heads=1, vocab_size=8)
    model = MedVLMForConditionalGeneration(MedVLMConfig(**settings, text_config=stand_in))
    load_pretrained_encoder(model, preset)
    return model


TASK_SOURCES = {"report": CAP_FILE, "vqa_closed": VQA_FILES["train"], "vqa_open": VQA_FILES["train"]}


def stage_data_notes(preset: dict, samples: list[Sample], root: Path) -> list[str]:
    """Refuse a stage that would train on nothing (the data lacks every task it trains on: it ran no step and
    logged a loss of 0); a note for each stage that trains on fewer kinds of sample than its preset names."""
    present = {sample.task for sample in samples}
    notes = []
    for stage in preset["stages"]:
        missing = [task for task in stage["tasks"] if task not in present]
        sources = " and ".join(sorted({TASK_SOURCES[task] for task in missing}))
        if missing == stage["tasks"]:
            raise UserInputError(f"stage {stage['name']} trains on {', '.join(missing)} samples, and {root} has none "
                                 f"(no {sources} with a train split); give data that has them, or a preset without "
                                 "that stage")
        if missing:
            notes.append(f"note: stage {stage['name']} trains without {', '.join(missing)} samples: {root} has none "
                         f"(no {sources} with a train split)")
    return notes


def check_output_folders(data: Path, out: Path, work: Path) -> None:
    """The checkpoint folder holds the checkpoint alone: not the data (nor inside it, nor around it), not the work
    folder (the feature cache, optimizer states), not other files (a fresh clone of a Hub repo, its README and
    dotfiles, is fine)."""
    data, checkpoint, working = data.resolve(), out.resolve(), work.resolve()
    if checkpoint == data or data in checkpoint.parents or checkpoint in data.parents:
        raise UserInputError(f"--out {out} is, holds or lies inside the data folder {data.name}; give the checkpoint "
                             "a folder of its own")
    if working == checkpoint or checkpoint in working.parents:
        raise UserInputError(f"--work {work} lies inside --out {out}; give it a folder beside the checkpoint, which "
                             "would otherwise hold its feature cache and optimizer states")
    clone = (checkpoint / ".git").exists()  # a fresh clone of a Hub repo: its card, .git and .gitattributes
    others = [] if not checkpoint.is_dir() or (checkpoint / "config.json").exists() else [
        path.name for path in checkpoint.iterdir() if not (clone and (path.name.startswith(".") or any(
            fnmatch.fnmatch(path.name, name) for name in PUBLISHED)))]
    if others:
        raise UserInputError(f"{out} holds other files (e.g. {sorted(others)[0]}) and no checkpoint; give --out a new "
                             "or empty folder, so that the checkpoint is not mixed with them")


def check_ground_truth(root: Path, samples: list[Sample]) -> None:
    """Phantom data (a ground_truth.json): every scan the samples name has its entry, which the encoder's
    pre-training and the findings probe learn from (a scan without one would be taught as lesion-free, then stop
    the run). Refused before any long work."""
    path = root / GROUND_TRUTH_FILE
    if not path.exists():
        return
    try:
        truth = json.loads(path.read_text())
    except ValueError:
        truth = None
    if not isinstance(truth, dict):
        raise UserInputError(f"{path} is not the ground truth `python -m medvlm phantom` writes (a JSON object of "
                             "scans, each with its lesions); write the phantoms again")
    missing = sorted({sample.image for sample in samples} - set(truth))
    if missing:
        raise UserInputError(f"{path} has no entry for {len(missing)} of the scans the data names (e.g. {missing[0]}); "
                             "write the phantoms again, or name each scan as the ground truth does")


def finding_targets(root: Path, images: list[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Per scan, which "organ kind side" findings its phantom ground truth holds: (classes, multi-hot).

    Empty when the data has no ground_truth.json (the real M3D data).
    """
    path = root / GROUND_TRUTH_FILE
    if not path.exists():
        return [], {}
    truth = json.loads(path.read_text())
    names = {image: {f"{lesion['organ']} {lesion['kind']} {lesion['side']}" for lesion in truth[image]["lesions"]}
             for image in images if image in truth}
    classes = sorted(set().union(*names.values())) if names else []
    targets = {image: torch.tensor([float(c in found) for c in classes]) for image, found in names.items()}
    return classes, targets


def lesion_patch_targets(root: Path, features, images: list[str],
                         config: MedVLMConfig) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Per scan, which "organ kind" lesion classes touch each patch of its kept slices, from the phantom ground
    truth (the geometry of the encoder's pre-training, `encoder_pretraining.lesion_maps`): (classes, per scan
    (kept, h, w, classes) uint8). The compressor's lesion skip learns from them (a stage's `patch_loss`).
    Empty without a ground truth, or when training reads volumes instead of a feature cache."""
    from .encoder_pretraining import lesion_classes, lesion_maps, patch_targets

    path = root / GROUND_TRUTH_FILE
    if not path.exists() or not isinstance(features, FeatureCache):
        return [], {}
    truth = json.loads(path.read_text())
    classes = lesion_classes(truth)  # every class of the data folder, as the encoder's pre-training names them
    targets = {}
    for image in images:
        if image not in truth:
            continue
        scan = features[image]
        if not truth[image]["lesions"]:
            height, width = scan.patches.shape[1:3]
            targets[image] = torch.zeros(len(scan.kept), height, width, len(classes), dtype=torch.uint8)
            continue
        volume = load_scan(root, image)
        coverage, sizes = lesion_maps(volume, truth[image], classes, scan.total, config.image_size)
        touched, _ = patch_targets(torch.from_numpy(coverage), torch.from_numpy(sizes), config.encoder_stride)
        targets[image] = touched[scan.kept].permute(0, 2, 3, 1).to(torch.uint8)  # (kept, h, w, classes)
    return classes, targets


def probe_floors(root: Path, train_images: list[str], val_images: list[str]) -> dict[str, float] | None:
    """What the findings probe scores on the validation scans (mean BCE) without reading the visual tokens
    for findings: `priors`, each finding at its frequency among the training scans; `modality`, at its
    frequency among the training scans of the same modality, which any visual path that tells CT from MR
    from PET reaches. A probe near `modality` has learnt nothing about lesions. Frequencies are smoothed
    (add one half), so a finding no training scan holds costs finitely. None without a ground truth.
    """
    classes, targets = finding_targets(root, sorted({*train_images, *val_images}))
    if not classes or not val_images:
        return None
    modality = {image: entry["modality"] for image, entry in json.loads((root / GROUND_TRUTH_FILE).read_text()).items()}

    def frequency(images: list[str]) -> torch.Tensor:
        return (sum((targets[image] for image in images), torch.zeros(len(classes))) + 0.5) / (len(images) + 1)

    overall = frequency(train_images)
    within = {name: frequency([i for i in train_images if modality[i] == name])
              for name in {modality[i] for i in train_images}}
    truth = torch.stack([targets[image] for image in val_images])
    floors = {"priors": overall.expand_as(truth),
              "modality": torch.stack([within.get(modality[i], overall) for i in val_images])}
    return {name: round(float(F.binary_cross_entropy(guess, truth)), 5) for name, guess in floors.items()}


def probe_validation_loss(training: Path) -> float | None:
    """The finding probe's loss on the validation scans after the probe stage (its last epoch in metrics.csv).

    The probe is a linear read-out of which findings a scan holds from its visual tokens, trained with
    the visual stages before the LM sees them: its loss measures what the visual path passes on, even
    where the LM has not learnt to put it in words. None when the preset has no probe stage.
    """
    with open(training / "metrics.csv", newline="") as handle:
        losses = [row["val_loss"] for row in csv.DictReader(handle) if row["stage"] == "probe" and row["val_loss"]]
    return float(losses[-1]) if losses else None


def probe_record(root: Path, train_samples: list[Sample], val_samples: list[Sample], work: Path) -> dict | None:
    """For training.json: the findings probe's last validation loss beside its floors (`probe_floors`).
    None when no probe stage ran or the data has no ground truth."""
    val_bce = probe_validation_loss(work) if (work / "metrics.csv").exists() else None
    floors = probe_floors(root, sorted({s.image for s in train_samples}), sorted({s.image for s in val_samples}))
    return {"val_bce": val_bce, **floors} if val_bce is not None and floors else None


class TrainingObjective(nn.Module):
    """What a stage minimises: the LM loss on the answers, plus, where the data has a phantom
    ground truth and the stage asks for it (`finding_loss`), a linear probe on the visual tokens
    that must tell which findings the scan holds. The probe makes the visual tokens carry the
    findings from the start, so the LM learns to read them instead of guessing from its prior;
    it is not part of the saved checkpoint. With the compressor's lesion skip (`patch_loss`), also
    the skip's per-patch lesion scores against the ground truth's lesion positions.
    """

    def __init__(self, model: MedVLMForConditionalGeneration, num_findings: int, finding_loss: float,
                 lm_loss: float = 1.0, patch_loss: float = 0.0):
        super().__init__()
        self.model = model
        self.lm_loss = lm_loss
        # Per-patch lesion targets for the compressor's lesion skip (compressor_lesion_classes), balanced BCE.
        self.patch_loss = patch_loss if model.config.compressor_lesion_classes else 0.0
        self.finding_loss = finding_loss if num_findings else 0.0
        hidden = model.config.text_config.hidden_size
        self.probe = nn.Linear(2 * hidden, num_findings) if self.finding_loss else None

    def forward(self, input_ids, attention_mask, labels, scans, finding_targets=None,
                patch_targets=None) -> torch.Tensor:
        if self.patch_loss and patch_targets is not None:
            visual_tokens, patch = self.patch_term(scans, patch_targets)
            loss = self.patch_loss * patch
        else:
            visual_tokens = self.model.visual_tokens_per_sample(scans)
            loss = visual_tokens.new_zeros(())
        if self.lm_loss:  # a probe-only stage skips the LM altogether
            output = self.model(input_ids, attention_mask=attention_mask, visual_tokens=visual_tokens, labels=labels)
            loss = loss + self.lm_loss * output.loss
        if self.probe is not None and finding_targets is not None:
            summary = torch.cat([visual_tokens.mean(1), visual_tokens.amax(1)], dim=-1)
            loss = loss + self.finding_loss * F.binary_cross_entropy_with_logits(self.probe(summary), finding_targets)
        return loss

    def patch_term(self, scans, patch_targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens per sample, as `visual_tokens_per_sample`, and the lesion skip's per-patch loss over the
        batch's distinct scans with a target (balanced BCE over their kept slices' patches)."""
        from .encoder_pretraining import balanced_bce

        visual_tokens, encoding, unique = self.model.encode_distinct(scans)
        targets = {id(scan): target for scan, target in zip(scans, patch_targets, strict=True)}
        scores, picked, truth = encoding.lesion_scores, [], []
        for index, scan in enumerate(unique):
            if (target := targets[id(scan)]) is not None:
                picked.append(scores[index, : target.shape[0]].flatten(0, 2))
                truth.append(target.to(scores.device, scores.dtype).flatten(0, 2))
        if not picked:
            return visual_tokens, visual_tokens.new_zeros(())
        return visual_tokens, balanced_bce(torch.cat(picked).float(), torch.cat(truth).float())


def set_trainable(model: MedVLMForConditionalGeneration, parts: list[str],
                  lora: bool = False) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the named parts and, with `lora`, the LM's LoRA adapters.

    The slice encoder is never trained here.
    """
    unknown = set(parts) - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {sorted(TRAINABLE_PARTS)}")
    model.requires_grad_(False)
    for part in parts:
        for module_name in TRAINABLE_PARTS[part]:
            getattr(model, module_name).requires_grad_(True)
    if lora:
        for name, parameter in model.language_model.named_parameters():
            if "lora_" in name:  # peft's prefix for the adapter matrices
                parameter.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def validation_loss(model, loader, accelerator: Accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        loss = model(**batch)
        total += accelerator.gather(loss.detach()[None]).sum().item()
        count += accelerator.num_processes
    model.train()
    return total / max(count, 1)


def make_accelerator(preset: dict) -> Accelerator:
    """An Accelerator with the preset's mixed precision and gradient accumulation.

    One per stage, so that a stage's saved state holds that stage's model, optimiser and scheduler only.
    """
    return Accelerator(mixed_precision=preset.get("mixed_precision", "no"),
                       gradient_accumulation_steps=preset.get("gradient_accumulation_steps", 1))


STAGE_WEIGHTS = "weights.safetensors"  # what a finished stage changed, loaded again when a run resumes


def changed_modules(stage: dict) -> list[str]:
    """The model's modules a stage changes: its trainable parts, and the whole LM when it merges LoRA into it."""
    names = [name for part in stage["trainable"] for name in TRAINABLE_PARTS[part]]
    return list(dict.fromkeys(names + (["language_model"] if stage.get("lora") else [])))


def save_stage_weights(model: MedVLMForConditionalGeneration, stage: dict, path: Path) -> None:
    tensors = {f"{module_name}.{key}": value.detach().to("cpu", copy=True).contiguous()
               for module_name in changed_modules(stage)
               for key, value in getattr(model, module_name).state_dict().items()}
    save_file(tensors, path)


def load_stage_weights(model: MedVLMForConditionalGeneration, path: Path) -> None:
    result = model.load_state_dict(load_file(path, device=str(model.device)), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} holds weights this model does not have ({result.unexpected_keys[0]}, ...); "
                         "it was trained with another preset: delete the work folder to start again")


def stage_seed(seed: int, stage: str) -> int:
    """The seed a training stage's random numbers start from, one for each run seed and stage: no stage of one
    seed draws the numbers of a stage of another (seed + index would give seed 0's second stage seed 1's first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}".encode()).digest()[:4], "little")


def run_stage(stage: dict, model, tokenizer, features: FeatureCache | VolumeFeatures, train_samples: list[Sample],
              val_samples: list[Sample], preset: dict, out: Path, log: MetricsLog, seed: int,
              findings: tuple[list[str], dict[str, torch.Tensor]] = ([], {}),
              patch_findings: tuple[list[str], dict[str, torch.Tensor]] = ([], {})) -> None:
    """One training stage: its tasks, its trainable parts (and LoRA, merged at the end), AdamW + cosine
    schedule, a resumable state per epoch; a finished stage's weights are loaded instead of trained again."""
    name = stage["name"]
    state_dir = out / "state" / name
    done_marker, weights = state_dir / "done.json", state_dir / STAGE_WEIGHTS
    accelerator = make_accelerator(preset)
    if done_marker.exists() and weights.exists():
        load_stage_weights(model, weights)
        accelerator.print(f"stage {name}: already trained, its weights loaded (resume)")
        return
    samples = [s for s in train_samples if s.task in stage["tasks"]]
    validation = [s for s in val_samples if s.task in stage["tasks"]][:256]
    classes, targets = findings
    objective = TrainingObjective(model, len(classes), stage.get("finding_loss", 0.0), stage.get("lm_loss", 1.0),
                                  stage.get("patch_loss", 0.0) if patch_findings[1] else 0.0)
    collate = Collator(tokenizer, features, model.config.image_token, model.config.num_visual_tokens,
                       preset["max_length"], targets if objective.probe is not None else None,
                       patch_findings[1] if objective.patch_loss else None)
    batches = ScanGroupedBatches(samples, stage["batch_size"], stage.get("samples_per_scan", 1), seed)
    loader = DataLoader(samples, batch_sampler=batches, collate_fn=collate)
    val_loader = DataLoader(validation, batch_size=stage["batch_size"], collate_fn=collate)
    adapters = attach_lora(model.language_model, stage["lora"]) if stage.get("lora") else None
    parameters = set_trainable(model, stage["trainable"], lora=adapters is not None)
    if objective.probe is not None:
        parameters += list(objective.probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=stage["lr"], weight_decay=preset.get("weight_decay", 0.0))
    total_steps = stage["epochs"] * math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(preset.get("warmup_ratio", 0.0) * total_steps),
                                                total_steps)
    wrapped, optimizer, loader, val_loader, scheduler = accelerator.prepare(objective, optimizer, loader, val_loader,
                                                                            scheduler)
    first_epoch = 0
    resume = resume_point(state_dir, accelerator)
    if resume:
        accelerator.load_state(resume)
        first_epoch = int(resume.name.removeprefix("epoch-")) + 1
        batches.epoch = first_epoch
        accelerator.print(f"stage {name}: resuming after epoch {first_epoch}")
    log.forget(name, first_epoch)
    start = time.perf_counter()
    step = first_epoch * len(loader)
    wrapped.train()
    for epoch in range(first_epoch, stage["epochs"]):
        progress = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{stage['epochs']}",
                        disable=not accelerator.is_local_main_process)
        losses = []
        for batch in progress:
            with accelerator.accumulate(wrapped):
                loss = wrapped(**batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % 20 == 0:
                log.write(stage=name, epoch=epoch, step=step, loss=round(losses[-1], 5),
                          lr=scheduler.get_last_lr()[0])
        val = validation_loss(wrapped, val_loader, accelerator) if validation else float("nan")
        mean_loss = sum(losses) / max(len(losses), 1)
        validated = f"validation loss {val:.4f}" if validation else "no validation split to score"
        accelerator.print(f"stage {name} epoch {epoch + 1}: training loss {mean_loss:.4f}, {validated}")
        log.write(stage=name, epoch=epoch, step=step, loss=round(mean_loss, 5), val_loss=round(val, 5))
        save_epoch_state(accelerator, state_dir, epoch)
    if adapters is not None:
        merge_lora(adapters)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_stage_weights(model, stage, weights)
        done_marker.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    accelerator.wait_for_everyone()


def scan_features(model: MedVLMForConditionalGeneration, samples: list[Sample], root: Path, work: Path,
                  features: str | Path | None, from_volumes: bool) -> FeatureCache | VolumeFeatures:
    """Where training gets each scan's kept slices: a saved cache (`features`), the volumes themselves
    (`from_volumes`: the frozen encoder runs on every batch), or a cache built in `work` (the default). A saved
    cache that lacks scans, or holds some rewritten since (other file stamps and other content), is refused; scans
    only copied or touched since are read whole on every run, until `features` records their new stamps."""
    load = functools.partial(load_scan, root)
    if from_volumes:
        return VolumeFeatures(model, load)
    images = sorted({s.image for s in samples})
    if features is None:
        return build_feature_cache(model, root, images, work / "features")
    cache = FeatureCache.load(features, encoder_fingerprint(model))
    missing = [image for image in images if image not in cache]
    if missing:
        raise UserInputError(f"the feature cache in {features} lacks {len(missing)} of the {len(images)} scans "
                             f"(e.g. {missing[0]}); run `python -m medvlm features` on {root} with the train and "
                             "validation splits (its default --split)")
    state = process_state()
    changed = [cache.changed(scan_stamps(root, images)) if state.is_main_process else None]
    if state.num_processes > 1:  # the main process's stamps for all: every process hashes its share of the same scans
        broadcast_object_list(changed)
    copied = same_content(root, {image: cache.digests[image] for image in changed[0] if image in cache.digests})
    rewritten = [image for image in changed[0] if image not in copied]
    if rewritten:
        raise UserInputError(f"{len(rewritten)} of the {len(images)} scans changed since the feature cache in "
                             f"{features} was made (e.g. {rewritten[0]}); run `python -m medvlm features` on {root} "
                             "again")
    if copied:
        state.print(f"note: {len(copied)} of the scans have other file times than when the feature cache in {features} "
                    f"was made, and the same content; run `python -m medvlm features` on {root} again to record them "
                    "(until then each run reads them whole to tell)")
    if cache.unstamped(images):
        state.print(f"note: {cache.unstamped(images)}")
    return cache


def _readable_as_the_rest(checkpoint: Path) -> None:
    """Give the weights the permissions its config.json has (the umask's): transformers writes them through a
    private temporary file, readable by this account alone, and an app run by another account (a service, a shared
    disk) could not load them."""
    mode = (checkpoint / "config.json").stat().st_mode & 0o777
    for weights in checkpoint.glob("*.safetensors"):
        weights.chmod(mode)


def recipe_summary(preset: dict, accelerator: Accelerator) -> dict:
    """How the checkpoint was trained, for training.json and the model card."""
    language_model, encoder = preset["language_model"], preset.get("encoder", {})
    return {
        "language_model": language_model.get("pretrained", "trained from scratch"),
        "encoder": encoder.get("pretrained") or preset["model"].get("open_clip_name") or
        ("pre-trained on the training scans" if preset.get("encoder_pretraining") else "random"),
        "stages": preset["stages"], "max_length": preset["max_length"],
        "mixed_precision": preset.get("mixed_precision", "no"),
        "gradient_accumulation_steps": preset.get("gradient_accumulation_steps", 1),
        "gradient_checkpointing": bool(language_model.get("gradient_checkpointing")),
        "processes": accelerator.num_processes,
    }


def train(preset_name: str, data: str | Path, out: str | Path, seed: int = 0, work: str | Path | None = None,
          config_overrides: dict | None = None, features: str | Path | None = None,
          from_volumes: bool = False, encoder_cache: str | Path | None = None) -> Path:
    """Train a checkpoint from a preset on an M3D-format data folder; returns the checkpoint folder.

    `work` (default: OUT-training beside OUT) keeps the feature cache, resumable states and
    metrics.csv, and in run.json what the stages were trained from, so that they resume only for the same run: the
    scans' content among it, except for `from_volumes` or a cache from before content digests were kept (those
    resume as before). The checkpoint folder receives only what is published: a plain MedVLM checkpoint
    (LoRA merged). `config_overrides` replace model settings of the preset (an ablation variant, see
    variants.py). `features`: a cache from `python -m medvlm features`; `from_volumes`: no cache.
    `encoder_cache` (default: WORK/encoder) keeps the demo encoder's pre-training for runs that repeat it.
    """
    started = time.perf_counter()  # the run's clock counts the data's reading too (not the imports before it)
    preset = apply_overrides(load_preset(preset_name), config_overrides or {})
    if features is not None and preset.get("encoder_pretraining"):
        raise UserInputError("this preset pre-trains its slice encoder on the training scans, so no feature cache "
                             "made before fits it; train without --features (train caches the features itself)")
    if features is not None and not (Path(features) / "features.json").is_file():
        raise UserInputError(f"no feature cache (features.json) in {features}; run `python -m medvlm features`")
    root, out = Path(data), Path(out)
    # A data folder of the wrong shape stops the run here, before anything is written.
    report_prompt = preset["model"].get("report_prompt", REPORT_PROMPT)  # the checkpoint's, as the app asks
    train_samples = read_samples(root, "train", prompts=(report_prompt, *REPORT_PARAPHRASES))
    val_samples = read_samples(root, "validation", prompts=(report_prompt,))
    if not train_samples:
        raise UserInputError(f"{root} holds no training samples (M3D_Cap.json / M3D_VQA_train.csv); point to a "
                             "folder with a train split")
    check_ground_truth(root, train_samples + val_samples)
    for note in stage_data_notes(preset, train_samples, root):
        process_state().print(note)
    if preset.get("encoder_pretraining"):
        from .encoder_pretraining import check_lesions_to_learn

        check_lesions_to_learn(root)
    if not out.resolve().name:
        raise UserInputError(f"--out {out} is the file system's root; give the checkpoint a folder of its own")
    work_given, work = work, Path(work) if work else out.resolve().with_name(out.resolve().name + "-training")
    for folder, option in ((out, "--out"), (work, "--work")):
        if folder.exists() and not folder.is_dir():
            raise UserInputError(f"{folder} is a file, not a folder; give {option} a folder to write")
    check_output_folders(root, out, work)
    accelerator = make_accelerator(preset)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserInputError("train does not support FSDP yet (merging LoRA and saving a stage need the sharded "
                             "weights gathered); launch with assets/accelerate/ddp.yaml or deepspeed-zero2.yaml")
    claim_work_folder(work, run_record(preset, seed, train_samples + val_samples), accelerator.is_main_process)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    clock = RunClock(work / CLOCK, accelerator.is_main_process, started)
    try:
        set_seed(seed)
        random.seed(seed)
        tokenizer = build_tokenizer(preset, train_samples)
        images = sorted({s.image for s in train_samples})
        model, encoder_summary = build_model(preset, tokenizer, root, images, accelerator.is_local_main_process,
                                             seed, Path(encoder_cache) if encoder_cache else work / "encoder",
                                             held_out=sorted({s.image for s in val_samples}),
                                             keep_threshold="similarity_threshold" in (config_overrides or {}))
        claim_inputs(work, {"encoder": encoder_fingerprint(model)}, accelerator.is_main_process)
        if preset["language_model"].get("gradient_checkpointing"):
            model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        model.to(accelerator.device)
        clock.save()  # the encoder's pre-training can take a quarter of an hour
        scans = scan_features(model, train_samples + val_samples, root, work, features, from_volumes)
        content = (scans.content_digest({s.image for s in train_samples + val_samples})
                   if isinstance(scans, FeatureCache) else None)
        if content is not None:
            claim_inputs(work, {"scans": content}, accelerator.is_main_process)
        clock.save()
        log = MetricsLog(work / METRICS, accelerator.is_main_process, clock)
        findings = finding_targets(root, sorted({s.image for s in train_samples + val_samples}))
        patch_findings = ([], {})
        if model.config.compressor_lesion_classes:
            patch_findings = lesion_patch_targets(root, scans, sorted({s.image for s in train_samples}), model.config)
            if patch_findings[0] and len(patch_findings[0]) != model.config.compressor_lesion_classes:
                raise UserInputError(f"compressor_lesion_classes is {model.config.compressor_lesion_classes} but the "
                                     f"training scans hold {len(patch_findings[0])} lesion classes; set it to that")
        for stage in preset["stages"]:
            # Each stage draws from its own seed, so it trains the same whether the stages before it trained in
            # this process or were loaded from their saved weights (a resume); an epoch resumed restores its own.
            set_seed(stage_seed(seed, stage["name"]))
            run_stage(stage, model, tokenizer, scans, train_samples, val_samples, preset, work, log, seed, findings,
                      patch_findings)
        if accelerator.is_main_process:
            if model.language_model.is_activation_checkpointing:
                model.language_model.activation_checkpointing_disable()
            model.requires_grad_(False)
            model.to(getattr(torch, preset.get("save_dtype", "float32"))).save_pretrained(out)
            kinds = Counter(sample.task for sample in train_samples)
            tokenizer.save_pretrained(out)
            _readable_as_the_rest(out)
            (out / "training.json").write_text(json.dumps({
                # Published with the checkpoint: folders and a preset file as typed, an absolute one by its
                # name (model_card).
                "preset": published_path(preset_name), "config_overrides": config_overrides or {},
                "data": published_path(str(root)),
                "seed": seed, "options": {"work": None if work_given is None else published_path(str(work_given)),
                                          "features": None if features is None else published_path(str(features)),
                                          "from_volumes": from_volumes},
                "train_samples": len(train_samples), "train_scans": len(images),
                "sample_tasks": {task: kinds[task] for task in STAGE_TASKS if kinds[task]},
                "encoder_pretraining": encoder_summary,
                "features": "volumes" if from_volumes else published_path(str(features or work / "features")),
                "recipe": recipe_summary(preset, accelerator), "wall_seconds": round(clock.seconds(), 1),
                "invocations": clock.invocations, "probe": probe_record(root, train_samples, val_samples, work),
            }, indent=2))
            renewed = renew_card(out)
            if renewed:
                accelerator.print(renewed)
    finally:
        clock.save()
    accelerator.wait_for_everyone()
    return out
