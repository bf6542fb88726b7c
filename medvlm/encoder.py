"""Stage 1: a pretrained 2D encoder, kept frozen, applied slice by slice."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel

from .configuration import MedVLMConfig
from .errors import CheckpointError


@dataclass
class SliceFeatures:
    """What the encoder gives for Z slices: patch grids (Z, h, w, C) and pooled embeddings (Z, 2C)."""

    patches: torch.Tensor
    pooled: torch.Tensor


# The vision trunk of each open_clip model this backend builds: the timm architecture that the model's
# open_clip_config.json names (vision_cfg.timm_model_name), written here so that building needs no network.
OPEN_CLIP_TRUNKS = {
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224": "vit_base_patch16_224",
}


class OpenClipTower(nn.Module):
    """The vision trunk of an open_clip model (BiomedCLIP: a timm ViT-B/16 at 224), tokens out.

    Built from the architecture alone, as `AutoModel.from_config` builds a transformers tower: no network,
    no weights, and safe on the meta device that `from_pretrained` builds on. A new model gets the open_clip
    checkpoint's weights from `load_pretrained_encoder` (pretrained.py); a saved MedVLM checkpoint carries
    them itself. timm is optional: only this backend needs it.
    """

    def __init__(self, config: MedVLMConfig):
        super().__init__()
        name = config.open_clip_name
        if name not in OPEN_CLIP_TRUNKS:
            raise ValueError(f"open_clip_name must be one of {', '.join(OPEN_CLIP_TRUNKS)}, not {name!r}")
        try:
            import timm
        except ImportError as error:
            raise CheckpointError("BiomedCLIP's slice encoder is a timm ViT, and timm is not installed; install it "
                                  "(pip install timm) to use this model") from error
        architecture = OPEN_CLIP_TRUNKS[name]
        # Tokens out, so no classifier and no pooling; a dynamic image size interpolates the position
        # embeddings for a smaller preview, as the transformers towers' interpolate_pos_encoding does.
        self.trunk = timm.create_model(architecture, pretrained=False, num_classes=0, global_pool="",
                                       dynamic_img_size=True)
        built = (self.trunk.patch_embed.patch_size[0], self.trunk.num_features)
        if built != (config.encoder_stride, config.encoder_width):
            raise ValueError(f"the open_clip trunk {architecture} has {built[0]}-pixel patches of width {built[1]} "
                             f"but vision_config says {config.encoder_stride} and {config.encoder_width}; "
                             "make vision_config describe the trunk")

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
            self.vision_tower = OpenClipTower(config)
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
