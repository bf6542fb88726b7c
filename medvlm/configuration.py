"""MedVLMConfig: everything that fixes one checkpoint, preprocessing included."""

from __future__ import annotations

import math
import numbers
from dataclasses import field

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .preprocess import CT_WINDOWS

ENCODER_WINDOWS = ("soft tissue", "lung", "bone")  # the viewer's presets a checkpoint's channels show by default

REPORT_PROMPT = "Write a radiology report for this scan."  # the default `report_prompt`


class MedVLMConfig(PreTrainedConfig):
    """Configuration of `MedVLMForConditionalGeneration`, the five stages of DESIGN section 1.

    `vision_config` is the 2D slice encoder (any transformers vision tower; ViT by default) and
    `text_config` the causal LM. The slice preprocessing lives here too, so a checkpoint carries it.
    """

    model_type = "medvlm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None

    # Slice preprocessing, fixed per checkpoint.
    image_size: int = 224  # encoder input side in pixels; slices are padded square, then resized
    ct_windows: list = field(default_factory=lambda: [list(CT_WINDOWS[name]) for name in ENCODER_WINDOWS])
    # CT: one (level, width) HU window per encoder channel; MR/PET: robust percentile range; OT: min-max
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel normalisation
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    slice_spacing_mm: float | None = None  # thin slices are averaged into slabs this thick; None keeps them
    max_input_slices: int = 320  # more slices than this are averaged down to this many before encoding

    # [1] Slice encoder: frozen, slice by slice.
    encoder_backend: str = "transformers"  # "transformers" (vision_config) or "open_clip"
    open_clip_name: str | None = None  # e.g. "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    encoder_batch_size: int = 64  # slices per encoder forward pass (bounds activation memory)

    # [2] Slice selection.
    slice_selection: str = "similarity"  # "similarity" (cosine, threshold τ) or "uniform" (evenly spaced)
    similarity_threshold: float = 0.95  # τ: a slice this similar to the last kept one is dropped
    slice_budget: int = 32  # K: at most this many slices go on; fewer are padded and masked
    selection_preview_size: int | None = None  # choose slices from encodings at this side; None: full size

    # [3] Spatial-frequency fusion.
    fusion_dim: int = 256  # d: channel width of the fused K×h×w grid
    fusion_mode: str = "gated"  # "gated", "spatial" (conv path only), "frequency" (FFT only), "average"

    # [4] Detail-preserving compressor.
    compressor_grid: list = field(default_factory=lambda: [4, 8, 8])  # low-res (slices, rows, cols)
    compressor_mode: str = "cross_attention"  # or "average": pooled tokens only, no detail pulled back
    compressor_layers: int = 2  # cross-attention blocks
    compressor_heads: int = 8
    # Lesion skip: a per-patch linear lesion scorer on the fused grid (this many organ-kind classes; 0: none), its
    # scores max-pooled over each visual token's cell and added to that token's query. A lesion touches ~0.1 % of
    # the patches: average pooling (and a channel-wise max of raw features) drowns it; the max of a lesion score
    # keeps it. Trained with per-patch targets from the phantom ground truth (a stage's `patch_loss`).
    compressor_lesion_classes: int = 0

    # [5] Projector and prompt.
    projector_hidden_act: str = "gelu"
    image_token: str = "<image>"  # placeholder in the prompt, expanded to num_visual_tokens copies
    image_token_id: int = -1  # its id in the tokenizer; set when the tokenizer is attached
    report_prompt: str = REPORT_PROMPT  # what `report`, the app and `eval` ask for a report; training asks it too
    demo: bool = False  # trained on synthetic phantoms only: the app says "not for clinical use"

    # The 3D baseline of the ablation study (M3D-style): a 3D ViT trained from scratch replaces stages 1–4.
    visual_path: str = "slices"  # "slices": stages 1–4 above; "vit3d": a 3D ViT on the resampled volume
    volume_shape: list = field(default_factory=lambda: [32, 128, 128])  # (D, H, W) the encoder input is resampled to
    volume_patch: list = field(default_factory=lambda: [4, 16, 16])  # 3D patch (d, h, w) in voxels
    volume_layers: int = 4  # transformer blocks of width fusion_dim
    volume_heads: int = 4

    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, allowed in {
            "slice_selection": ("similarity", "uniform"),
            "fusion_mode": ("gated", "spatial", "frequency", "average"),
            "compressor_mode": ("cross_attention", "average"),
            "encoder_backend": ("transformers", "open_clip"),
            "visual_path": ("slices", "vit3d"),
        }.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("image_size", "max_input_slices", "encoder_batch_size", "slice_budget", "fusion_dim",
                     "compressor_layers", "compressor_heads", "volume_layers", "volume_heads"):
            setattr(self, name, _whole(name, getattr(self, name)))
        for name in ("compressor_grid", "volume_shape", "volume_patch"):
            sides = getattr(self, name)
            if not isinstance(sides, (list, tuple)) or len(sides) != 3:
                raise ValueError(f"{name} must be three whole numbers [depth, rows, columns], not {sides!r}")
            setattr(self, name, [_whole(name, side) for side in sides])
        # 0 switches the preview and the slab averaging off, as null does.
        if self.selection_preview_size is not None and self.selection_preview_size != 0:
            self.selection_preview_size = _whole("selection_preview_size", self.selection_preview_size)
        if self.compressor_lesion_classes != 0:  # 0: no lesion skip
            self.compressor_lesion_classes = _whole("compressor_lesion_classes", self.compressor_lesion_classes)
        _check_channels(self.image_mean, self.image_std)
        _check_windows(self.ct_windows, len(self.image_mean))
        if not isinstance(self.demo, bool):
            raise ValueError(f"demo must be true or false (trained on phantoms only or not), not {self.demo!r}")
        spacing, threshold = self.slice_spacing_mm, self.similarity_threshold
        if spacing is not None and not (_is_number(spacing) and spacing >= 0):
            raise ValueError(f"slice_spacing_mm must be a thickness in mm (0 or null: no slabs), not {spacing!r}")
        if not (_is_number(threshold) and -1.0 <= threshold <= 1.0):
            raise ValueError(f"similarity_threshold is a cosine similarity from -1 to 1, not {threshold!r}")
        built_heads = ["volume_heads"] if self.visual_path == "vit3d" else \
            ["compressor_heads"] if self.compressor_mode == "cross_attention" else []
        for heads in built_heads:
            if self.fusion_dim % getattr(self, heads):
                raise ValueError(f"fusion_dim {self.fusion_dim} must divide into {heads} {getattr(self, heads)} "
                                 "attention heads of equal width")
        if self.visual_path == "vit3d":
            grid = self.volume_grid
            if any(side % patch for side, patch in zip(self.volume_shape, self.volume_patch, strict=True)):
                raise ValueError(f"volume_shape {list(self.volume_shape)} must be a multiple of volume_patch "
                                 f"{list(self.volume_patch)} along each axis")
            if any(patches < tokens for patches, tokens in zip(grid, self.compressor_grid, strict=True)):
                raise ValueError(f"the 3D ViT's {list(grid)} patch grid cannot be pooled to the "
                                 f"{list(self.compressor_grid)} visual-token grid; use smaller volume_patch")

    @property
    def encoder_stride(self) -> int:
        """Pixels per encoder patch along a side: the patch size of a ViT-style tower, the output stride of a
        convolutional one (a transformers ResNet: a stride-4 stem, then ×2 per stage after the first)."""
        vision = self.vision_config
        if vision.model_type == "resnet":
            stages = len(vision.depths) - (0 if vision.downsample_in_first_stage else 1)
            return 4 * 2**stages
        patch = vision.patch_size
        return patch[0] if isinstance(patch, (list, tuple)) else patch

    @property
    def encoder_grid(self) -> tuple[int, int]:
        """(h, w) patch grid the slice encoder gives for one slice at `image_size`."""
        side = self.image_size // self.encoder_stride
        return side, side

    @property
    def encoder_width(self) -> int:
        """C: channel width of the slice encoder's patch tokens (a convolutional tower: its last stage's)."""
        vision = self.vision_config
        return vision.hidden_sizes[-1] if vision.model_type == "resnet" else vision.hidden_size

    @property
    def volume_grid(self) -> tuple[int, int, int]:
        """(d, h, w) patch grid of the 3D baseline's ViT: volume_shape / volume_patch per axis."""
        return tuple(side // patch for side, patch in zip(self.volume_shape, self.volume_patch, strict=True))

    @property
    def num_visual_tokens(self) -> int:
        """N: visual tokens handed to the LM per scan."""
        return math.prod(self.compressor_grid)


def _is_number(value) -> bool:
    """A finite real number: int, float or a numpy scalar (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_channels(mean, std) -> None:
    """Per-channel normalisation: as many means as standard deviations, numbers, each deviation above 0."""
    if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) >= 1
            and all(map(_is_number, [*mean, *std])) and min(std) > 0):
        raise ValueError(f"image_mean and image_std must be lists of numbers, one per encoder channel, each "
                         f"image_std above 0, not {mean!r} and {std!r}")


def _check_windows(windows, channels: int) -> None:
    """CT windows as preprocessing reads them: one [level, width] pair in HU per encoder channel, width above 0."""
    pairs = windows if isinstance(windows, (list, tuple)) else []
    if len(pairs) != channels or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(_is_number, pair)) and pair[1] > 0
            for pair in pairs):
        raise ValueError(f"ct_windows must be {channels} [level, width] pairs in HU, one per encoder channel, each "
                         f"width above 0 (e.g. [[40, 400], [-600, 1500], [400, 1800]]), not {windows!r}")


def _whole(name: str, value) -> int:
    """A count or a size as an int: a whole number of at least 1 (224.0 and numpy integers are read as such)."""
    if _is_number(value) and float(value).is_integer() and value >= 1:
        return int(value)
    shown = repr(value) if isinstance(value, str) else value
    raise ValueError(f"{name} must be a whole number of at least 1, not {shown}")


__all__ = ["MedVLMConfig"]
