"""Stage 2: keep the informative slices, drop near-duplicate neighbours."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_slices(pooled: torch.Tensor, threshold: float, budget: int) -> torch.Tensor:
    """Indices of the slices to keep, ascending, at most `budget` of them.

    pooled: (Z, C) one pooled embedding per slice. Walking from the first slice, a slice whose
    cosine similarity to the last kept slice is ≥ `threshold` (τ) is dropped. If more than
    `budget` (K) survive, the K least redundant survivors are kept (redundancy: the highest
    similarity to a surviving neighbour), in their original order.
    """
    if pooled.ndim != 2 or pooled.shape[0] == 0:
        raise ValueError(f"need a (Z, C) matrix of slice embeddings with Z ≥ 1, got shape {tuple(pooled.shape)}")
    unit = F.normalize(pooled.float(), dim=-1)
    similarity_to_next = (unit[1:] * unit[:-1]).sum(-1).tolist()
    kept = [0]
    for index in range(1, unit.shape[0]):
        similarity = (
            similarity_to_next[index - 1] if kept[-1] == index - 1 else float(unit[index] @ unit[kept[-1]])
        )
        if similarity < threshold:
            kept.append(index)
    survivors = torch.tensor(kept, dtype=torch.long)
    if len(kept) <= budget:
        return survivors
    neighbour_similarity = (unit[survivors[1:]] * unit[survivors[:-1]]).sum(-1)  # (S-1,)
    redundancy = torch.full((len(kept),), -1.0)
    redundancy[1:] = torch.maximum(redundancy[1:], neighbour_similarity)
    redundancy[:-1] = torch.maximum(redundancy[:-1], neighbour_similarity)
    least_redundant = torch.topk(-redundancy, budget).indices
    return survivors[least_redundant].sort().values


def uniform_slices(num_slices: int, budget: int) -> torch.Tensor:
    """`budget` evenly spaced slice indices over `num_slices` (all of them if there are fewer)."""
    if num_slices <= budget:
        return torch.arange(num_slices)
    return torch.linspace(0, num_slices - 1, budget).round().long().unique()
