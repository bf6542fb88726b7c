"""Stage 1: a pretrained 2D encoder, kept frozen, applied slice by slice."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel

from .configuration import MedVLMConfig


@dataclass
class SliceFeatures:
    """What the encoder gives for Z slices: patch grids (Z, h, w, C) and pooled embeddings (Z, 2C)."""

    patches: torch.Tensor
    pooled: torch.Tensor


class OpenClipTower(nn.Module):
    """The vision trunk of an open_clip model (BiomedCLIP: a timm ViT-B/16), tokens out.

    Built from the architecture alone (no weights are downloaded here); the checkpoint's
    safetensors carry the weights. open_clip is optional: only this backend needs it.
    """

    def __init__(self, name: str):
        super().__init__()
        try:
            import open_clip
        except ImportError as error:
            raise ImportError(
                "this checkpoint's slice encoder is an open_clip model; install open_clip_torch to use it"
            ) from error
        self.trunk = open_clip.create_model(name, pretrained=None).visual.trunk

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) → tokens (N, T, C), patch tokens last."""
        return self.trunk.forward_features(pixel_values)


class SliceEncoder(nn.Module):
    """Encodes slices independently with a frozen 2D vision tower.

    Any transformers vision tower (ViT, CLIP, SigLIP, DINOv2, or a convolutional ResNet, whose
    last feature map is read as h·w tokens) built from `config.vision_config`, or an open_clip
    trunk (`config.encoder_backend = "open_clip"`). Patch tokens are the last h·w tokens of the
    tower's output (class and register tokens come first); the pooled
    embedding is their mean and their channel-wise maximum side by side, the same for every
    backend: the mean follows the anatomy, the maximum changes when a small lesion comes into view.
    """

    def __init__(self, config: MedVLMConfig):
        super().__init__()
        self.patch_size = config.encoder_stride
        self.batch_size = config.encoder_batch_size
        self.backend = config.encoder_backend
        if self.backend == "open_clip":
            self.vision_tower = OpenClipTower(config.open_clip_name)
        else:
            self.vision_tower = AutoModel.from_config(config.vision_config)
        # ViT-style towers interpolate their position embeddings for a smaller preview; a CNN has none.
        self.tower_kwargs = ({"interpolate_pos_encoding": True} if "interpolate_pos_encoding"
                             in inspect.signature(self.vision_tower.forward).parameters else {})

    def freeze(self) -> SliceEncoder:
        """Stop gradients into the tower, and keep it in eval mode: the 2D encoder stays as pretrained
        (batch norm included, whose running statistics would otherwise drift in a training loop)."""
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()
        return self

    def train(self, mode: bool = True) -> SliceEncoder:
        super().train(mode)
        if self.frozen:
            self.vision_tower.eval()
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision_tower.parameters())

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.backend == "open_clip":
            return self.vision_tower(pixel_values)
        tokens = self.vision_tower(pixel_values=pixel_values, **self.tower_kwargs).last_hidden_state
        return tokens.flatten(2).transpose(1, 2) if tokens.ndim == 4 else tokens  # a CNN's (n, C, h, w) map

    def forward(self, pixel_values: torch.Tensor) -> SliceFeatures:
        """pixel_values (Z, 3, S, S) → SliceFeatures with patches (Z, S/p, S/p, C), pooled (Z, 2C).

        S may be smaller than the configured size (a cheap preview); position embeddings are
        interpolated. Runs in chunks of `encoder_batch_size` slices, without autograd when frozen.
        """
        side = pixel_values.shape[-1] // self.patch_size
        dtype = next(self.vision_tower.parameters()).dtype
        grids = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for chunk in pixel_values.split(self.batch_size):
                tokens = self._tokens(chunk.to(dtype))[:, -side * side:]  # (n, h·w, C)
                grids.append(tokens.unflatten(1, (side, side)))
        patches = torch.cat(grids)
        pooled = torch.cat([patches.mean(dim=(1, 2)), patches.amax(dim=(1, 2))], dim=-1)
        return SliceFeatures(patches=patches, pooled=pooled)
