"""The 3D baseline of the ablation study: a small 3D ViT trained from scratch on the whole volume.

M3D-style (M3D-LaMed: 3D patches of a resampled volume, a ViT, spatial pooling to the visual
tokens). It takes the same encoder input as the five-stage path (windowed, normalised slices
(Z', C, S, S)), resampled to `config.volume_shape` (D, H, W); its tokens have the fusion width d
and are average-pooled to `config.compressor_grid`, so the projector and the LM get as many tokens
of the same width as the five-stage path gives them. `visual_path="vit3d"` selects it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compressor import AxisPositions
from .configuration import MedVLMConfig


class VolumeViT(nn.Module):
    """3D patch embedding, `volume_layers` pre-norm transformer blocks, 3D average pooling to N tokens.

    Example (defaults): a 32×128×128 volume in 4×16×16 patches is an 8×8×8 grid of 512 tokens,
    pooled to a 4×8×8 grid of 256 visual tokens.
    """

    def __init__(self, config: MedVLMConfig):
        super().__init__()
        dim = config.fusion_dim
        self.volume_shape = tuple(config.volume_shape)
        self.token_grid = tuple(config.compressor_grid)
        patch = tuple(config.volume_patch)
        self.patch_embedding = nn.Conv3d(len(config.image_mean), dim, kernel_size=patch, stride=patch)
        self.positions = AxisPositions(config.volume_grid, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, config.volume_heads, 4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.volume_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def resample(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder input (Z', C, S, S) → the volume this encoder reads, (D, H, W, C) channels last.

        In-plane first (antialiased when shrinking), then linear along z; no gradients (it is input).
        """
        depth, height, width = self.volume_shape
        with torch.no_grad():
            slices = pixel_values.float()
            if tuple(slices.shape[-2:]) != (height, width):
                slices = F.interpolate(slices, size=(height, width), mode="bilinear", align_corners=False,
                                       antialias=slices.shape[-1] > width)
            volume = slices.permute(1, 0, 2, 3)[None]  # (1, C, Z', H, W)
            volume = F.interpolate(volume, size=(depth, height, width), mode="trilinear", align_corners=False)
        return volume[0].permute(1, 2, 3, 0).to(pixel_values.dtype)  # (D, H, W, C)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """volumes (B, D, H, W, C) → visual tokens (B, N, d), N = prod(compressor_grid)."""
        if tuple(volumes.shape[1:4]) != self.volume_shape:
            raise ValueError(f"the 3D encoder expects {self.volume_shape} volumes, got {tuple(volumes.shape[1:4])}")
        tokens = self.patch_embedding(volumes.permute(0, 4, 1, 2, 3))  # (B, d, g_d, g_h, g_w)
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2) + self.positions()  # (B, g, d)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens).transpose(1, 2).unflatten(2, grid)  # (B, d, g_d, g_h, g_w)
        return F.adaptive_avg_pool3d(tokens, self.token_grid).flatten(2).transpose(1, 2)  # (B, N, d)


__all__ = ["VolumeViT"]
