"""Stage 3: re-stitch kept slices into 3D with a spatial path and a frequency path, gated."""

from __future__ import annotations

import torch
from torch import nn

from .configuration import MedVLMConfig


class SpatialFrequencyFusion(nn.Module):
    """Mixes a local 3D-convolution path and a global FFT-filter path with a per-position gate.

    Spatial path: depthwise 3×3×3 then pointwise convolution (edges, texture). Frequency path:
    FFT over the (K, h, w) grid, a learnable complex filter, inverse FFT (GFNet-style global
    filter, long-range structure across slices). Gate g ∈ [0, 1] per position and channel,
    computed from both paths: out = LayerNorm(x + g·spatial + (1 − g)·frequency).
    `config.fusion_mode` turns a path off ("spatial", "frequency") or fixes g = ½ ("average").
    """

    def __init__(self, config: MedVLMConfig):
        super().__init__()
        dim = config.fusion_dim
        height, width = config.encoder_grid
        self.mode = config.fusion_mode
        self.grid = (config.slice_budget, height, width)
        if self.mode != "frequency":
            self.spatial = nn.Sequential(
                nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim),
                nn.Conv3d(dim, dim, kernel_size=1),
                nn.GELU(),
            )
        if self.mode != "spatial":
            # Complex filter over the rfft grid, stored as (real, imaginary) pairs.
            self.frequency_filter = nn.Parameter(torch.zeros(*self.grid[:2], width // 2 + 1, dim, 2))
        if self.mode == "gated":
            self.gate = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def spatial_path(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w, d) → (B, K, h, w, d): local 3D convolution."""
        return self.spatial(grid.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)

    def frequency_path(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w, d) → (B, K, h, w, d): global filter in the 3D Fourier domain."""
        spectrum = torch.fft.rfftn(grid.float(), dim=(1, 2, 3), norm="ortho")  # (B, K, h, w//2+1, d)
        spectrum = spectrum * torch.view_as_complex(self.frequency_filter.float())
        filtered = torch.fft.irfftn(spectrum, s=self.grid, dim=(1, 2, 3), norm="ortho")
        return filtered.to(grid.dtype)

    def forward(self, grid: torch.Tensor, slice_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """grid: (B, K, h, w, d); slice_mask: (B, K) True for real slices, False for padding.

        Returns the fused grid (B, K, h, w, d), padding zeroed, and the gate (B, K, h, w, d) or None.
        """
        expected = self.grid
        if tuple(grid.shape[1:4]) != expected:
            raise ValueError(f"fusion expects a {expected} slice grid, got {tuple(grid.shape[1:4])}")
        valid = slice_mask[:, :, None, None, None].to(grid.dtype)
        grid = grid * valid
        gate = None
        if self.mode == "spatial":
            mixed = self.spatial_path(grid)
        elif self.mode == "frequency":
            mixed = self.frequency_path(grid)
        else:
            spatial, frequency = self.spatial_path(grid), self.frequency_path(grid)
            if self.mode == "gated":
                gate = torch.sigmoid(self.gate(torch.cat([spatial, frequency], dim=-1)))
                mixed = gate * spatial + (1 - gate) * frequency
            else:
                mixed = 0.5 * (spatial + frequency)
        return self.norm(grid + mixed) * valid, gate
