"""Stage 4: compress the fused grid to N visual tokens without losing small details."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MedVLMConfig


class AxisPositions(nn.Module):
    """Learned 3D position embedding, factorised as one table per axis: (k, h, w) → (k·h·w, d)."""

    def __init__(self, grid: tuple[int, int, int], dim: int):
        super().__init__()
        self.slices = nn.Parameter(torch.zeros(grid[0], dim))
        self.rows = nn.Parameter(torch.zeros(grid[1], dim))
        self.cols = nn.Parameter(torch.zeros(grid[2], dim))

    def forward(self) -> torch.Tensor:
        table = self.slices[:, None, None] + self.rows[None, :, None] + self.cols[None, None, :]
        return table.flatten(0, 2)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries ← keys/values) then an MLP, both residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """queries (B, N, d), context (B, M, d), padding (B, M) True where a key is padding."""
        context = self.context_norm(context)
        attended, _ = self.attention(self.query_norm(queries), context, context,
                                     key_padding_mask=padding, need_weights=False)
        queries = queries + attended
        return queries + self.mlp(self.mlp_norm(queries))


class DetailPreservingCompressor(nn.Module):
    """Low-resolution queries that pull detail back from the high-resolution fused grid.

    The low-res track is the fused grid average-pooled over its real slices to
    `config.compressor_grid` (e.g. 4×8×8 = 256 tokens). Each low-res token, with a 3D position
    embedding, cross-attends to every high-res token (with its own position embedding) and so
    recovers what pooling blurred: small nodules, calcifications. `compressor_mode="average"`
    returns the pooled tokens alone (the ablation).
    """

    def __init__(self, config: MedVLMConfig):
        super().__init__()
        dim = config.fusion_dim
        self.low_grid = tuple(config.compressor_grid)
        self.mode = config.compressor_mode
        self.low_positions = AxisPositions(self.low_grid, dim)
        if self.mode == "cross_attention":
            self.high_positions = AxisPositions((config.slice_budget, *config.encoder_grid), dim)
            self.blocks = nn.ModuleList(
                CrossAttentionBlock(dim, config.compressor_heads) for _ in range(config.compressor_layers)
            )
        self.lesion_classes = config.compressor_lesion_classes
        if self.lesion_classes:
            self.lesion_head = nn.Linear(dim, self.lesion_classes)  # per-patch lesion scores (logits)
            self.lesion_embed = nn.Linear(self.lesion_classes, dim)  # their cell maximum, into the query
        self.norm = nn.LayerNorm(dim)

    def lesion_skip(self, fused: torch.Tensor, slice_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch lesion scores (B, K, h, w, L) and, per low-res cell, the embedding of their maximum over the
        cell's real patches (B, k·h'·w', d): a lesion of one patch moves its cell's token as much as a large one."""
        scores = self.lesion_head(fused)
        pooled = []
        for grid, mask in zip(scores, slice_mask, strict=True):
            real = grid[mask].permute(3, 0, 1, 2)  # (L, kept, h, w)
            pooled.append(F.adaptive_max_pool3d(real, self.low_grid).flatten(1).T)  # (k·h'·w', L)
        return scores, self.lesion_embed(torch.stack(pooled))

    def pool(self, fused: torch.Tensor, slice_mask: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w, d) → (B, k·h'·w', d): average over each scan's real slices only."""
        pooled = []
        for grid, mask in zip(fused, slice_mask, strict=True):
            real = grid[mask].permute(3, 0, 1, 2)  # (d, kept, h, w)
            pooled.append(F.adaptive_avg_pool3d(real, self.low_grid).flatten(1).T)  # (k·h'·w', d)
        return torch.stack(pooled)

    def forward(self, fused: torch.Tensor, slice_mask: torch.Tensor,
                return_scores: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """fused: (B, K, h, w, d), slice_mask: (B, K) → visual tokens (B, N, d), N = k·h'·w'; with
        `return_scores`, (tokens, per-patch lesion scores (B, K, h, w, L) or None without a lesion skip)."""
        queries = self.pool(fused, slice_mask) + self.low_positions()
        scores = None
        if self.lesion_classes:
            scores, skip = self.lesion_skip(fused, slice_mask)
            queries = queries + skip
        if self.mode == "cross_attention":
            context = fused.flatten(1, 3) + self.high_positions()  # (B, K·h·w, d)
            padding = ~slice_mask[:, :, None].expand(-1, -1, fused.shape[2] * fused.shape[3]).flatten(1)
            for block in self.blocks:
                queries = block(queries, context, padding)
        tokens = self.norm(queries)
        return (tokens, scores) if return_scores else tokens
