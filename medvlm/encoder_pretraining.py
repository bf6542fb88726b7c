"""Demo stage 0: pre-train the small 2D slice encoder on phantom slices, then freeze it.

The real recipe starts from BiomedCLIP, pre-trained on PMC-15M and kept frozen. The demo has
no such encoder, so it makes one the same way in spirit: a small convolutional network (a
transformers ResNet) pre-trained on 2D slices with supervision it can get for free, here the
phantoms' ground truth. Each patch learns which lesion classes touch it and how large they are,
and each slice its modality; the pooled embedding used by slice selection thereby changes when a
lesion comes into view. Lesions touch well under 1 % of patches, so the lesion loss weighs
positives and negatives equally and half of every batch shows a lesion. Batches are mirrored,
turned and re-scaled in intensity (`augment`): the training scans hold only a few hundred lesions.

Two kinds of head (`heads` in the preset's `encoder_pretraining`): `per_class`, one detector per
lesion class (the shipped demo encoder), and `factored`, "is there a lesion" learning from every
lesion at once plus "which class, given one"; measured on held-out phantoms, the second finds
lesions better (see the demo model card).

The first demo encoder, a small ViT trained for fewer steps without augmentation, learned where
lesions tend to be, not what one looks like (held-out AUC 0.45 on a sphere no one could miss)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from torch import nn
from tqdm.auto import tqdm

from .configuration import MedVLMConfig
from .data import GROUND_TRUTH_FILE, load_scan, scan_stamps
from .encoder import SliceEncoder
from .errors import UserInputError
from .preprocess import PREPROCESSING_VERSION, encoder_input
from .volume import Volume

MODALITIES = ("CT", "MR", "PT", "OT")


def lesion_class(lesion: dict) -> str:
    """A ground-truth lesion's class for pre-training: "organ kind" (the side is left to the later stages)."""
    return f"{lesion['organ']} {lesion['kind']}"


def lesion_classes(ground_truth: dict) -> list[str]:
    """Every "organ kind" lesion class in the ground truth, sorted."""
    return sorted({lesion_class(lesion) for entry in ground_truth.values()
                   for lesion in entry["lesions"]})


def check_lesions_to_learn(root: Path) -> None:
    """Raise UserInputError unless the phantom ground truth of `root` holds a lesion.

    Pre-training teaches the encoder to find lesions, one head per lesion class of the data folder
    (`lesion_classes`); with none there is nothing to learn and no class to size its heads by, so `train` refuses
    before any long work. (A smoke test whose few training scans happen to hold none, beside validation scans that
    do, still runs.)
    """
    path = Path(root) / GROUND_TRUTH_FILE
    if not path.is_file():
        raise UserInputError(f"{root} has no {GROUND_TRUTH_FILE}, so the slice encoder cannot be pre-trained on its "
                             "scans; train on phantoms (python -m medvlm phantom) or use a preset with a pretrained "
                             "encoder")
    try:
        classes = lesion_classes(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserInputError(f"{path} is not the ground truth `python -m medvlm phantom` writes (a JSON object of "
                             "scans, each with its lesions); write the phantoms again") from None
    if not classes:
        raise UserInputError(f"the scans in {root} hold no lesions, so the slice encoder cannot be pre-trained to find "
                             "them; make more phantoms (--n) or use scans with lesions")


def lesion_slabs(lesion: dict, slices: int, num_inputs: int, spacing_z: float) -> dict[int, float]:
    """The encoder-input slabs a ground-truth lesion reaches, each with how far (mm) its nearest point lies
    from the lesion's centre along z (0 for the slab that holds the centre).

    The volume's `slices` axial slices (`spacing_z` mm apart) are averaged into `num_inputs` equal slabs, as
    `encoder_input` does; the lesion is a sphere (`center_voxel`, `diameter_mm`).
    """
    z = lesion["center_voxel"][0]
    radius = lesion["diameter_mm"] / 2
    half_mm = slices / num_inputs * spacing_z / 2
    reached = {}
    for slab in range(num_inputs):
        centre = (slab + 0.5) * slices / num_inputs - 0.5
        dz = max(abs(centre - z) * spacing_z - half_mm, 0.0)  # nearest point of the slab
        if dz < radius:
            reached[slab] = dz
    return reached


def lesion_maps(volume: Volume, truth: dict, classes: list[str], num_inputs: int,
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which encoder-input pixels each lesion class covers, and the diameter of what covers them.

    Returns coverage (Z', classes, S, S) uint8 in {0, 1} and diameter (Z', S, S) uint8 in mm (0
    where no lesion). `truth` is the scan's ground-truth entry: lesions are spheres
    (`center_voxel` (z, y, x) in `volume.data`, `diameter_mm`) on a grid of `truth["spacing"]` mm
    (an M3D .npy loads as 1 mm voxels, but its real spacing is there). The geometry follows
    `encoder_input`: display orientation, padded square, resized to S, Z' slabs.
    """
    lesions = truth.get("lesions", [])
    slices, rows, cols = volume.shape
    spacing_z, spacing_y, spacing_x = truth.get("spacing", volume.spacing)
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    scale = size / side
    pixel_mm = max(spacing_y, spacing_x) / scale
    grid = np.arange(size, dtype=np.float32) + 0.5
    coverage = np.zeros((num_inputs, len(classes), size, size), dtype=np.uint8)
    diameter = np.zeros((num_inputs, size, size), dtype=np.uint8)
    for lesion in lesions:
        channel = classes.index(lesion_class(lesion))
        _, y, x = lesion["center_voxel"]
        radius = lesion["diameter_mm"] / 2
        row = (rows - 1 - y + top + 0.5) * scale
        col = (cols - 1 - x + left + 0.5) * scale
        for slab, dz in lesion_slabs(lesion, slices, num_inputs, spacing_z).items():
            in_plane = math.sqrt(radius**2 - dz**2) / pixel_mm
            disk = ((grid[:, None] - row) ** 2 + (grid[None, :] - col) ** 2) <= max(in_plane, 0.5) ** 2
            coverage[slab, channel] |= disk
            np.maximum(diameter[slab], np.where(disk, round(lesion["diameter_mm"]), 0).astype(np.uint8),
                       out=diameter[slab])
    return coverage, diameter


class SliceHeads(nn.Module):
    """What every pre-training head kind shares: per patch the lesion diameter, per slice the modality."""

    hard_negatives = 0.0  # see `balanced_bce`

    def add_size_and_modality(self, width: int) -> None:
        """Made after a subclass's own layers: for a seed, `PerClassHeads` starts from the weights the shipped
        demo encoder's heads started from."""
        self.diameter = nn.Linear(width, 1)
        self.modality = nn.Linear(2 * width, len(MODALITIES))  # on the pooled (mean, max) embedding

    def size_and_modality_loss(self, features, size_mm: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """The diameter where there is a lesion (L1, in cm) and the modality of each slice (cross-entropy)."""
        loss = F.cross_entropy(self.modality(features.pooled), modality)
        lesion = size_mm > 0
        if lesion.any():
            loss = loss + F.l1_loss(self.diameter(features.patches)[..., 0][lesion], size_mm[lesion] / 10)
        return loss


class PerClassHeads(SliceHeads):
    """Per patch, which lesion classes touch it: one detector per class."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.coverage = nn.Linear(width, num_classes)
        self.add_size_and_modality(width)

    def class_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Per patch and lesion class, a score that rises with the evidence for it: (..., h, w, classes)."""
        return self.coverage(patches)

    def loss(self, features, present: torch.Tensor, size_mm: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """What pre-training minimises for a batch of slices: lesion classes per patch (balanced BCE), diameter
        and modality. `present` (B, classes, h, w) and `size_mm` (B, h, w) are on the grid of
        `features.patches` (B, h, w, width)."""
        return (balanced_bce(self.coverage(features.patches), present.permute(0, 2, 3, 1), self.hard_negatives)
                + self.size_and_modality_loss(features, size_mm, modality))


class FactoredHeads(SliceHeads):
    """Per patch: does a lesion touch it, and which class of lesion it is if one does. "Is there a lesion"
    learns from every lesion of the training scans at once, where a detector per class learns from a few
    dozen."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.lesion = nn.Linear(width, 1)
        self.kind = nn.Linear(width, num_classes)
        self.add_size_and_modality(width)

    def class_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """log P(a lesion of each class touches the patch): (..., h, w, classes)."""
        return F.logsigmoid(self.lesion(patches)) + F.log_softmax(self.kind(patches), dim=-1)

    def loss(self, features, present: torch.Tensor, size_mm: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Whether a lesion touches each patch (balanced BCE), which classes touch it where one does
        (cross-entropy on the normalised class targets), diameter and modality; shapes as in
        `PerClassHeads.loss`."""
        classes = present.permute(0, 2, 3, 1)  # (B, h, w, classes)
        touched = classes.amax(dim=-1)
        loss = balanced_bce(self.lesion(features.patches)[..., 0], touched, self.hard_negatives)
        lesion = touched > 0
        if lesion.any():
            targets = classes[lesion] / classes[lesion].sum(-1, keepdim=True)
            loss = loss + 0.5 * F.cross_entropy(self.kind(features.patches)[lesion], targets)
        return loss + self.size_and_modality_loss(features, size_mm, modality)


SLICE_HEADS = {"per_class": PerClassHeads, "factored": FactoredHeads}


def slice_heads(settings: dict) -> type[PerClassHeads | FactoredHeads]:
    """The kind of head `encoder_pretraining.heads` names (default per_class); ValueError for another name."""
    kind = settings.get("heads", "per_class")
    if kind not in SLICE_HEADS:
        raise ValueError(f"unknown encoder_pretraining heads {kind!r}; choose from {', '.join(SLICE_HEADS)}")
    return SLICE_HEADS[kind]


def hard_negative_share(settings: dict) -> float:
    """`encoder_pretraining.hard_negatives` (default 0: every negative patch weighs alike), checked."""
    share = settings.get("hard_negatives", 0.0)
    if not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f"encoder_pretraining hard_negatives must be a share in [0, 1), not {share!r}")
    return float(share)


@dataclass
class SliceSet:
    """Every training slice: inputs (N, 3, S, S) float16; per encoder patch, the lesion classes that touch it
    (N, classes, h, w) and the largest diameter there (N, h, w), uint8 (mm); modality (N,)."""

    inputs: torch.Tensor
    present: torch.Tensor
    diameter: torch.Tensor
    modality: torch.Tensor

    @property
    def with_lesion(self) -> torch.Tensor:
        """Indices of the slices that show part of a lesion."""
        return torch.nonzero(self.diameter.flatten(1).amax(1) > 0)[:, 0]


def build_slice_set(config: MedVLMConfig, root: Path, images: list[str], ground_truth: dict,
                    classes: list[str], progress: bool) -> SliceSet:
    inputs, present, diameter, modality = [], [], [], []
    patch = config.encoder_stride
    for image in tqdm(images, desc="preparing slices", disable=not progress, unit="scan"):
        volume = load_scan(root, image)
        pixel_values, _ = encoder_input(volume, config)
        covered, sizes = lesion_maps(volume, ground_truth.get(image, {}), classes, pixel_values.shape[0],
                                     config.image_size)
        touched, largest = patch_targets(torch.from_numpy(covered), torch.from_numpy(sizes), patch)
        inputs.append(pixel_values.half())
        present.append(touched.to(torch.uint8))
        diameter.append(largest.to(torch.uint8))
        modality.append(torch.full((pixel_values.shape[0],), MODALITIES.index(volume.modality)))
    return SliceSet(torch.cat(inputs), torch.cat(present), torch.cat(diameter), torch.cat(modality))


def patch_targets(coverage: torch.Tensor, diameter: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch of `patch` pixels: which classes touch it (B, classes, h, w) in {0, 1}, and the largest
    diameter there (B, h, w) mm, from the pixel maps of `lesion_maps`."""
    return F.max_pool2d(coverage.float(), patch), F.max_pool2d(diameter[:, None].float(), patch)[:, 0]


def balanced_bce(logits: torch.Tensor, targets: torch.Tensor, hard_negatives: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy with positives and negatives weighted equally: lesions touch <1 % of patches,
    so a plain mean is minimised by predicting "nothing" everywhere.

    hard_negatives > 0: the negatives' half is instead the mean of two, the loss over all negatives and
    over the hardest `hard_negatives` share of them (highest loss first). A scan holds thousands of
    normal patches to a lesion's few, so what decides whether its highest patch is a lesion is the few
    normal patches that look most like one; a plain mean weighs them like all the others.
    """
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    positives = targets.sum()
    negative_loss = (losses * (1 - targets)).sum() / (targets.numel() - positives).clamp(min=1)
    if hard_negatives > 0:
        negatives = losses[targets == 0]
        if negatives.numel():
            hardest = negatives.topk(max(1, int(negatives.numel() * hard_negatives))).values.mean()
            negative_loss = (negative_loss + hardest) / 2
    return negative_loss + (losses * targets).sum() / positives.clamp(min=1)


@dataclass
class PretrainedEncoder:
    """The result of stage 0: the tower's weights, τ calibrated on them, and a summary for the model card."""

    state_dict: dict
    similarity_threshold: float | None
    summary: dict


def pretrain_encoder(config: MedVLMConfig, root: Path, images: list[str], settings: dict, keep_fraction: float | None,
                     progress: bool = True, seed: int = 0, held_out: list[str] = ()) -> PretrainedEncoder:
    """Train a slice encoder of `config` on the slices of `images` (paths under `root`); with `held_out`
    scans, the summary says how well the result finds lesions in them (`held_out_detection`)."""
    heads_kind = slice_heads(settings)
    torch.manual_seed(seed)
    ground_truth = json.loads((root / GROUND_TRUTH_FILE).read_text())
    classes = lesion_classes(ground_truth)
    encoder = SliceEncoder(config)
    slices = build_slice_set(config, root, images, ground_truth, classes, progress)
    heads = heads_kind(config.encoder_width, len(classes))
    heads.hard_negatives = hard_negative_share(settings)
    encoder.vision_tower.requires_grad_(True)
    parameters = [*encoder.vision_tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings["lr"], weight_decay=0.05)
    steps, batch_size, patch = settings["steps"], settings["batch_size"], encoder.patch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings["lr"], total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    with_lesion = slices.with_lesion
    # Half of each batch shows a lesion, half is drawn from all slices: lesions touch well under 1 % of patches.
    shown = batch_size // 2 if len(with_lesion) else 0
    preview = config.selection_preview_size
    summary = {"slices": len(slices.inputs), "slices_with_lesion": len(with_lesion), "classes": classes,
               "steps": steps}
    losses = []
    bar = tqdm(range(steps), desc="pre-training the slice encoder", disable=not progress, unit="step")
    for _ in bar:
        lesion_half = with_lesion[torch.randint(len(with_lesion), (shown,), generator=generator)] if shown else []
        batch = torch.cat([torch.as_tensor(lesion_half, dtype=torch.long),
                           torch.randint(len(slices.inputs), (batch_size - shown,), generator=generator)])
        pixels = slices.inputs[batch].float()
        present, diameter = slices.present[batch].float(), slices.diameter[batch].float()
        if settings.get("augment"):
            pixels, present, diameter = augment(pixels, present, diameter, generator)
        if preview and torch.rand(1, generator=generator).item() < settings.get("preview_fraction", 0.0):
            pixels = F.interpolate(pixels, size=(preview, preview), mode="bilinear", antialias=True)
            present = F.adaptive_max_pool2d(present, preview // patch)  # a preview patch covers several
            diameter = F.adaptive_max_pool2d(diameter[:, None], preview // patch)[:, 0]
        loss = heads.loss(encoder(pixels), present, diameter, slices.modality[batch])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tenth = max(1, steps // 10)
    summary["first_loss"] = round(float(np.mean(losses[:tenth])), 4)  # mean over the first and last tenth of steps
    summary["last_loss"] = round(float(np.mean(losses[-tenth:])), 4)
    encoder.freeze().eval()
    threshold = calibrate_threshold(encoder, slices, preview, keep_fraction) if keep_fraction else None
    summary["similarity_threshold"] = threshold
    held_out = [image for image in held_out if image in ground_truth]
    if held_out:
        summary["held_out_detection"] = held_out_detection(encoder, heads.eval(), config, root, held_out,
                                                           ground_truth, classes)
    return PretrainedEncoder(encoder.state_dict(), threshold, summary)


def augment(pixels: torch.Tensor, present: torch.Tensor, diameter: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch seen another way: mirrored left–right at random, turned by a random multiple of 90°, and each
    slice's intensities scaled and shifted by up to 10 %. The turns and mirror act on whole patches, so the
    patch targets (B, classes, h, w) and diameters (B, h, w) follow exactly; a lesion class names no side.

    Without it, a small encoder learns the few hundred lesions of the training scans by heart (held-out scan
    AUC 0.76 against 0.99 on its own scans, on CT phantoms); with it, 0.86 on both."""
    if torch.rand(1, generator=generator).item() < 0.5:
        pixels, present, diameter = pixels.flip(-1), present.flip(-1), diameter.flip(-1)
    turns = int(torch.randint(4, (1,), generator=generator))
    pixels, present, diameter = (torch.rot90(tensor, turns, dims=(-2, -1)) for tensor in (pixels, present, diameter))
    count = len(pixels)
    gain = torch.empty(count, 1, 1, 1).uniform_(0.9, 1.1, generator=generator)
    shift = torch.empty(count, 1, 1, 1).uniform_(-0.1, 0.1, generator=generator)
    return pixels * gain + shift, present, diameter


@torch.no_grad()
def held_out_detection(encoder: SliceEncoder, heads: PerClassHeads | FactoredHeads, config: MedVLMConfig, root: Path,
                       images: list[str], ground_truth: dict, classes: list[str]) -> dict:
    """How well the pre-trained encoder finds each lesion class in scans it has not seen.

    A scan's score for a class is its highest class score over the scan's slices and patches, the
    evidence the later stages can draw on; per class, the ROC AUC of that score between the scans
    that hold the class and the other scans of the same modality (`within_modality_auc`).

    `patch`: per modality, how well the heads' highest class score marks the patches a lesion touches
    (`patch_detection`). A scan holds thousands of patches to a lesion's few, so a patch AUC that
    looks high can still leave a scan's highest patch a normal one: its average precision says so.
    """
    scores, labels, modalities = [], [], []
    patch_scores, patch_labels, patch_modalities = [], [], []
    for image in images:
        volume = load_scan(root, image)
        pixel_values, _ = encoder_input(volume, config)
        features = encoder(pixel_values)
        class_scores = heads.class_scores(features.patches).float()  # (Z', h, w, classes)
        scores.append(class_scores.amax(dim=(0, 1, 2)).numpy())
        found = {lesion_class(lesion) for lesion in ground_truth[image]["lesions"]}
        labels.append([name in found for name in classes])
        modalities.append(volume.modality)
        coverage, sizes = lesion_maps(volume, ground_truth[image], classes, pixel_values.shape[0], config.image_size)
        touched, _ = patch_targets(torch.from_numpy(coverage), torch.from_numpy(sizes), encoder.patch_size)
        patch_scores.append(class_scores.amax(dim=-1).flatten().numpy())
        patch_labels.append(touched.amax(dim=1).flatten().numpy() > 0)
        patch_modalities += [volume.modality] * patch_labels[-1].size
    per_class = within_modality_auc(np.array(scores), np.array(labels), modalities, classes)
    mean = round(float(np.mean(list(per_class.values()))), 3) if per_class else None
    return {"scans": len(images), "mean_auc": mean, "auc": per_class,
            "patch": patch_detection(np.concatenate(patch_scores), np.concatenate(patch_labels), patch_modalities)}


def patch_detection(scores: np.ndarray, touched: np.ndarray, modalities: list[str]) -> dict:
    """Per modality, how well `scores` (patches,) mark the patches a lesion touches (`touched`, bool):
    ROC AUC, average precision (1: every touched patch outranks every other; the base rate, the share of
    touched patches, is what scores that know nothing get) and that base rate. Modalities without both
    kinds of patch are left out."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    modalities = np.asarray(modalities)
    result = {}
    for modality in dict.fromkeys(modalities.tolist()):
        mine = modalities == modality
        labels = touched[mine]
        if labels.all() or not labels.any():
            continue
        result[modality] = {"auc": round(float(roc_auc_score(labels, scores[mine])), 3),
                            "average_precision": round(float(average_precision_score(labels, scores[mine])), 3),
                            "base_rate": round(float(labels.mean()), 4), "patches": int(labels.size)}
    return result


def within_modality_auc(scores: np.ndarray, labels: np.ndarray, modalities: list[str], classes: list[str]) -> dict:
    """Per lesion class, the ROC AUC of `scores` (scans, classes) for `labels` (scans, classes) bool among the
    scans of the modality the class occurs in (0.5: chance; 1: every scan holding it outranks every scan
    without). A class occurs in one modality (a lung nodule in CT, a hot spot in PET); judged against all
    scans, telling CT from PET would pass for finding nodules. Classes without both kinds of scan are left out."""
    modalities = np.asarray(modalities)
    result = {}
    for index, name in enumerate(classes):
        holding = labels[:, index]
        if not holding.any():
            continue
        same = modalities == modalities[holding][0]
        positive, negative = scores[same & holding, index], scores[same & ~holding, index]
        if len(negative):
            statistic = mannwhitneyu(positive, negative, alternative="two-sided").statistic
            result[name] = round(float(statistic) / (len(positive) * len(negative)), 3)
    return result


# Settings of what happens after the encoder: it is pre-trained on every slice whatever they say, so the
# uniform-sampling ablation shares the full model's encoder.
SELECTION_FIELDS = ("slice_selection", "similarity_threshold", "slice_budget")


def pretrain_encoder_once(cache: Path, config: MedVLMConfig, root: Path, images: list[str], settings: dict,
                          keep_fraction: float | None, progress: bool = True, seed: int = 0,
                          held_out: list[str] = ()) -> PretrainedEncoder:
    """`pretrain_encoder`, kept in the folder `cache` under a key of everything it depends on (the scans' files
    as they are now among it: a scan rewritten in place trains a new encoder).

    A resumed training run, and the ablation study's variants that share data and seed, pre-train
    the encoder once instead of once each.
    """
    from .features import FEATURE_FIELDS

    key = json.dumps({"root": str(Path(root).resolve()), "images": images, "settings": settings,
                      "stamps": scan_stamps(root, [*images, *held_out]),  # the scans as they are now
                      "preprocessing": PREPROCESSING_VERSION,
                      "keep_fraction": keep_fraction, "seed": seed, "held_out": list(held_out),
                      "vision": config.vision_config.to_dict(),
                      **{name: getattr(config, name) for name in FEATURE_FIELDS if name not in SELECTION_FIELDS}},
                     sort_keys=True, default=str)
    path = Path(cache) / f"encoder-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        return PretrainedEncoder(**torch.load(path, weights_only=True))
    result = pretrain_encoder(config, root, images, settings, keep_fraction, progress, seed, held_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(asdict(result), partial)
    partial.replace(path)  # atomic: another process sees the whole file or none
    return result


@torch.no_grad()
def calibrate_threshold(encoder: SliceEncoder, slices: SliceSet, preview: int | None, keep_fraction: float) -> float:
    """τ such that a slice differs enough from its neighbour about `keep_fraction` of the time.

    Measured on training slices (consecutive slices of each scan), once, before the model that
    carries τ in its config is built.
    """
    sample = slices.inputs[:4096].float()
    if preview:
        sample = F.interpolate(sample, size=(preview, preview), mode="bilinear", antialias=True)
    pooled = F.normalize(torch.cat([encoder(chunk).pooled for chunk in sample.split(256)]), dim=-1)
    neighbour_similarity = (pooled[1:] * pooled[:-1]).sum(-1)
    return round(float(torch.quantile(neighbour_similarity, keep_fraction)), 5)
