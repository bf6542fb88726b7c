"""What a training step sees: samples grouped by scan into batches, collated with their scans' features.

A scan's visual tokens are most of the cost of a step, so a batch brings several samples of the same
scan where it can, and the collator hands each scan's features out once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import Sample, build_labels
from .features import FeatureCache, VolumeFeatures


@dataclass
class Collator:
    """Samples → a padded batch: input_ids, attention_mask, labels (B, T), the scans' cached features
    and, with a phantom ground truth, their finding targets (B, F)."""

    tokenizer: object
    cache: FeatureCache | VolumeFeatures
    image_token: str
    num_visual_tokens: int
    max_length: int
    findings: dict[str, torch.Tensor] | None = None
    patch_findings: dict[str, torch.Tensor] | None = None  # per scan (kept, h, w, L) uint8, `lesion_patch_targets`

    def __call__(self, samples: list[Sample]) -> dict:
        encoded = [build_labels(self.tokenizer, s.messages, self.image_token, self.num_visual_tokens,
                                self.max_length) for s in samples]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        labels = torch.full((len(samples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, (ids, targets) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(targets)
            attention_mask[row, : len(ids)] = 1
        scans = {image: self.cache[image] for image in dict.fromkeys(s.image for s in samples)}  # one per scan
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "scans": [scans[s.image] for s in samples]}
        if self.findings:
            batch["finding_targets"] = torch.stack([self.findings[s.image] for s in samples])
        if self.patch_findings:
            batch["patch_targets"] = [self.patch_findings.get(s.image) for s in samples]
        return batch


class ScanGroupedBatches(torch.utils.data.Sampler):
    """Batches of sample indices in which each scan brings up to `samples_per_scan` of its samples.

    Every sample appears once per epoch, in a new random order each epoch; a scan's visual tokens
    are then computed once for all its samples in a batch, which is most of the cost of a step.
    """

    def __init__(self, samples: list[Sample], batch_size: int, samples_per_scan: int, seed: int, epoch: int = 0):
        self.by_image: dict[str, list[int]] = {}
        for index, sample in enumerate(samples):
            self.by_image.setdefault(sample.image, []).append(index)
        self.total, self.batch_size, self.samples_per_scan = len(samples), batch_size, samples_per_scan
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        groups = []
        for indices in self.by_image.values():
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            groups += [shuffled[i:i + self.samples_per_scan] for i in range(0, len(shuffled), self.samples_per_scan)]
        flat = [index for position in torch.randperm(len(groups), generator=generator).tolist()
                for index in groups[position]]
        return iter([flat[start:start + self.batch_size] for start in range(0, len(flat), self.batch_size)])
