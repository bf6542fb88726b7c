"""MedVLMForConditionalGeneration: the five stages of DESIGN section 1 as one transformers model.

volume slices ─► [1] SliceEncoder (frozen 2D tower) ─► [2] slice selection ─► [3] fusion
─► [4] compressor ─► [5] projector ─► visual tokens spliced into the LM prompt ─► text

`visual_path="vit3d"` (the ablation study's 3D baseline) replaces stages 1–4 with a 3D ViT trained
from scratch on the resampled volume (encoder3d.py); projector and LM are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN

from .compressor import AxisPositions, DetailPreservingCompressor
from .configuration import MedVLMConfig
from .encoder import SliceEncoder
from .encoder3d import VolumeViT
from .fusion import SpatialFrequencyFusion
from .selection import select_slices, uniform_slices


@dataclass
class ScanSlices:
    """One scan after stages 1–2: the kept slices' patch grids and where they lie.

    patches: (k, h, w, C); kept: (k,) indices into the encoder input's slices; heights: (k,)
    fraction of the scan's height; encoded / previewed: slices run through the encoder at full
    size / at the preview size (the encoder work this scan cost). For the 3D baseline
    (`visual_path="vit3d"`) patches is its input, the resampled volume (D, H, W, C), and every
    slice counts as kept; no 2D encoder runs.
    """

    patches: torch.Tensor
    kept: torch.Tensor
    heights: torch.Tensor
    total: int
    encoded: int
    previewed: int = 0


@dataclass
class VisualEncoding:
    """Stages 1–5 for a batch: visual tokens (B, N, H) and, per scan, its kept slice indices."""

    visual_tokens: torch.Tensor
    kept_slices: list[torch.Tensor] = field(default_factory=list)
    gate: torch.Tensor | None = None
    lesion_scores: torch.Tensor | None = None  # (B, K, h, w, L) per-patch lesion logits (compressor_lesion_classes)


class SliceHeightEmbedding(nn.Module):
    """Where a kept slice lies along the scan (0 bottom … 1 top), as sinusoids → (…, d)."""

    def __init__(self, dim: int, frequencies: int = 16):
        super().__init__()
        self.frequency_count = frequencies
        self.project = nn.Linear(2 * frequencies, dim)

    def forward(self, heights: torch.Tensor) -> torch.Tensor:
        # Angles in float32 whatever the model's dtype (so no buffer, which .to(bfloat16) would round): at
        # 2^15·π, bfloat16's 8-bit mantissa would leave sines of noise.
        frequencies = 2.0 ** torch.arange(self.frequency_count, device=heights.device, dtype=torch.float32) * math.pi
        angles = heights.float()[..., None] * frequencies
        return self.project(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.project.weight.dtype))


class MultiModalProjector(nn.Module):
    """Two-layer MLP from compressor width d to the LM's hidden size H."""

    def __init__(self, config: MedVLMConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.fusion_dim, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(tokens)))


class MedVLMPreTrainedModel(PreTrainedModel):
    config: MedVLMConfig
    config_class = MedVLMConfig
    base_model_prefix = "medvlm"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SpatialFrequencyFusion) and hasattr(module, "frequency_filter"):
            # Start near the identity filter (1 + 0i) so the frequency path passes the grid through.
            identity = torch.zeros_like(module.frequency_filter)
            identity[..., 0] = 1.0
            init.copy_(module.frequency_filter, identity + 0.02 * torch.randn_like(identity))
        elif isinstance(module, AxisPositions):
            for table in (module.slices, module.rows, module.cols):
                init.normal_(table, std=0.02)


class MedVLMForConditionalGeneration(MedVLMPreTrainedModel):
    """A 3D medical VLM from a 2D encoder: scan slices in, report or answer out.

    Parts: `slice_encoder` (frozen 2D tower), `slice_heights` + `input_projection` (slice tokens
    to the fusion width d, with where each slice lies), `fusion`, `compressor`,
    `multi_modal_projector`, `language_model` (any AutoModelForCausalLM). The 3D baseline has
    `volume_encoder` (a trainable 3D ViT) in place of the first five.
    """

    def __init__(self, config: MedVLMConfig):
        super().__init__(config)
        if config.visual_path == "vit3d":
            self.volume_encoder = VolumeViT(config)
        else:
            self.slice_encoder = SliceEncoder(config)
            self.input_projection = nn.Linear(config.encoder_width, config.fusion_dim)
            self.slice_heights = SliceHeightEmbedding(config.fusion_dim)
            self.fusion = SpatialFrequencyFusion(config)
            self.compressor = DetailPreservingCompressor(config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self._freeze_slice_encoder()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> MedVLMForConditionalGeneration:
        """As PreTrainedModel.from_pretrained (with `output_loading_info`, (model, info)); the slice encoder comes
        back frozen."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze_slice_encoder()
        return loaded

    def _freeze_slice_encoder(self) -> None:
        if self.config.visual_path == "slices":  # the 3D baseline's encoder trains from scratch
            self.slice_encoder.freeze()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # Stages 1–2 -------------------------------------------------------------------------------

    def choose_slices(self, pixel_values: torch.Tensor, heights: torch.Tensor) -> ScanSlices:
        """Stages 1–2 for one scan: pixel_values (Z, 3, S, S), heights (Z,) → the kept slices.

        "uniform" selection takes K evenly spaced slices without looking at them. "similarity"
        compares pooled embeddings of neighbours (from a cheap preview encoding when
        `selection_preview_size` is set) and encodes at full size only the slices it keeps.
        The 3D baseline keeps every slice: its "encoding" is the volume resampled for its 3D ViT.
        """
        config, total = self.config, pixel_values.shape[0]
        if config.visual_path == "vit3d":
            volume = self.volume_encoder.resample(pixel_values)  # (D, H, W, C)
            return ScanSlices(volume, torch.arange(total, device=heights.device), heights, total, encoded=0)
        if config.slice_selection == "uniform":
            kept = uniform_slices(total, config.slice_budget)
            patches = self.slice_encoder(pixel_values[kept]).patches
            return ScanSlices(patches, kept, heights[kept], total, encoded=len(kept))
        preview = config.selection_preview_size
        if preview and preview < pixel_values.shape[-1]:
            small = F.interpolate(pixel_values, size=(preview, preview), mode="bilinear", antialias=True)
            kept = select_slices(self.slice_encoder(small).pooled, config.similarity_threshold,
                                 config.slice_budget)
            patches = self.slice_encoder(pixel_values[kept]).patches
            return ScanSlices(patches, kept, heights[kept], total, encoded=len(kept), previewed=total)
        features = self.slice_encoder(pixel_values)
        kept = select_slices(features.pooled, config.similarity_threshold, config.slice_budget)
        return ScanSlices(features.patches[kept], kept, heights[kept], total, encoded=total)

    # Stages 3–5 -------------------------------------------------------------------------------

    def visual_tokens_from_slices(self, scans: list[ScanSlices]) -> VisualEncoding:
        """Stages 3–5 for a batch of scans → visual tokens (B, N, H) in the LM's embedding space.

        The 3D baseline runs its 3D ViT on the scans' resampled volumes instead.
        """
        if self.config.visual_path == "vit3d":
            weight = self.multi_modal_projector.linear_1.weight
            volumes = torch.stack([scan.patches for scan in scans]).to(weight.device, weight.dtype)  # (B, D, H, W, C)
            visual_tokens = self.multi_modal_projector(self.volume_encoder(volumes))
            return VisualEncoding(visual_tokens, [scan.kept for scan in scans])
        budget = self.config.slice_budget
        height, width = self.config.encoder_grid
        dtype = self.input_projection.weight.dtype
        device = self.input_projection.weight.device
        grid = torch.zeros(len(scans), budget, height, width, self.config.encoder_width, dtype=dtype, device=device)
        heights = torch.zeros(len(scans), budget, dtype=torch.float32, device=device)  # see SliceHeightEmbedding
        slice_mask = torch.zeros(len(scans), budget, dtype=torch.bool, device=device)
        for row, scan in enumerate(scans):
            count = scan.patches.shape[0]
            if count > budget:
                raise ValueError(f"cannot take {count} slices, the slice budget is {budget}")
            grid[row, :count] = scan.patches.to(device, dtype)
            heights[row, :count] = scan.heights.to(device, torch.float32)
            slice_mask[row, :count] = True
        tokens = self.input_projection(grid) + self.slice_heights(heights)[:, :, None, None]  # (B, K, h, w, d)
        fused, gate = self.fusion(tokens, slice_mask)
        compressed, lesion_scores = self.compressor(fused, slice_mask, return_scores=True)  # (B, N, d)
        return VisualEncoding(self.multi_modal_projector(compressed), [scan.kept for scan in scans], gate,
                              lesion_scores)

    def visual_tokens_per_sample(self, scans: list[ScanSlices]) -> torch.Tensor:
        """Visual tokens (B, N, H) for a batch that may ask about the same scan several times (`encode_distinct`)."""
        return self.encode_distinct(scans)[0]

    def encode_distinct(self, scans: list[ScanSlices]) -> tuple[torch.Tensor, VisualEncoding, list[ScanSlices]]:
        """Each distinct scan of a batch (by identity, as a feature cache hands them out) through stages 3–5 once:
        (visual tokens per sample (B, N, H), shared by a scan's samples; the distinct scans' encoding, with
        their lesion scores; the distinct scans, in the encoding's order)."""
        unique = list({id(scan): scan for scan in scans}.values())
        row = {id(scan): index for index, scan in enumerate(unique)}
        encoding = self.visual_tokens_from_slices(unique)
        return encoding.visual_tokens[[row[id(scan)] for scan in scans]], encoding, unique

    def get_image_features(self, pixel_values: list[torch.Tensor], heights: list[torch.Tensor]) -> VisualEncoding:
        """All five stages: per scan pixel_values (Z_i, 3, S, S) and heights (Z_i,) → VisualEncoding."""
        scans = [self.choose_slices(p, h) for p, h in zip(pixel_values, heights, strict=True)]
        return self.visual_tokens_from_slices(scans)

    # Prompt and LM ----------------------------------------------------------------------------

    def merge_visual_tokens(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Embed input_ids (B, T) and put visual_tokens (B, N, H) at the image placeholders.

        Raises ValueError when the number of placeholders differs from the number of visual tokens.
        """
        embeds = self.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.config.image_token_id
        found, expected = int(placeholders.sum()), visual_tokens.shape[0] * visual_tokens.shape[1]
        if found != expected:
            raise ValueError(
                f"the prompt holds {found} image placeholder tokens but the scans gave {expected} visual "
                f"tokens; expand {self.config.image_token!r} to {self.config.num_visual_tokens} copies per scan"
            )
        mask = placeholders[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, visual_tokens.to(embeds.device, embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: list[torch.Tensor] | None = None,
        heights: list[torch.Tensor] | None = None,
        scans: list[ScanSlices] | None = None,
        visual_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """LM forward with the scan's visual tokens in place of the placeholders.

        The scans come as one of: `visual_tokens` (B, N, H); `scans`, kept slices already
        encoded (the training feature cache); or per-scan `pixel_values` and `heights`.
        Returns the language model's CausalLMOutput (loss when `labels` are given).
        """
        if visual_tokens is None and scans is not None:
            visual_tokens = self.visual_tokens_per_sample(scans)
        if visual_tokens is None and pixel_values is not None:
            visual_tokens = self.get_image_features(pixel_values, heights).visual_tokens
        if visual_tokens is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        else:
            inputs_embeds = self.merge_visual_tokens(input_ids, visual_tokens)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   labels=labels, **kwargs)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Generate from a prompt whose placeholders take `visual_tokens`; returns new token ids only."""
        inputs_embeds = self.merge_visual_tokens(input_ids, visual_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            **generate_kwargs)


AutoConfig.register("medvlm", MedVLMConfig, exist_ok=True)
AutoModel.register(MedVLMConfig, MedVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MedVLMConfig, MedVLMForConditionalGeneration, exist_ok=True)

__all__ = ["MedVLMForConditionalGeneration", "MedVLMPreTrainedModel", "ScanSlices", "VisualEncoding"]
