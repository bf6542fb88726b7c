"""Ablation variants as configuration: one stage switched off, everything else as the preset says.

    python -m medvlm train --preset ablation --variant average_compressor --data D --out OUT
    python -m medvlm train --preset ablation --set fusion_mode=spatial --set compressor_mode=average ...

A variant is a set of `MedVLMConfig` overrides applied to the preset's model settings, so two runs
of one preset share data, seed, stages and optimiser steps and differ only in the switched stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from .configuration import MedVLMConfig

VARIANTS: dict[str, dict] = {
    "full": {},  # all five stages
    "uniform_selection": {"slice_selection": "uniform"},  # [2] off: K evenly spaced slices, the selector never runs
    "spatial_only": {"fusion_mode": "spatial"},  # [3] 3D-convolution path only
    "frequency_only": {"fusion_mode": "frequency"},  # [3] FFT global-filter path only
    "average_fusion": {"fusion_mode": "average"},  # [3] fixed ½·spatial + ½·frequency instead of the learned gate
    "average_compressor": {"compressor_mode": "average"},  # [4] pooled tokens, no detail pulled back
    "vit3d": {"visual_path": "vit3d"},  # [1–4] replaced by a 3D ViT trained from scratch on the volume
}
PRESET_BUILT = ("text_config", "image_token_id")  # set from the preset's language model and tokenizer
REPLACED_BY_VOLUME_ENCODER = ("fusion", "compressor")  # trainable parts the 3D baseline does not have


def parse_overrides(items: list[str]) -> dict:
    """`["fusion_mode=spatial", "compressor_grid=[2,4,4]"]` → {"fusion_mode": "spatial", "compressor_grid": [2, 4, 4]}.

    A value is read as JSON where it parses (numbers, lists, true/false/null), else as a string.
    """
    overrides = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"cannot read the setting {item!r}; write it as NAME=VALUE, e.g. fusion_mode=spatial")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        overrides[key.strip()] = value
    return overrides


def variant_overrides(variant: str | None, items: list[str] = ()) -> dict:
    """The overrides of a named variant (None: none), then the `NAME=VALUE` items on top."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    overrides = {**VARIANTS.get(variant, {}), **parse_overrides(list(items))}
    check_overrides(overrides)
    return overrides


def check_overrides(overrides: dict) -> None:
    """Raise ValueError unless every key is a MedVLMConfig setting a preset may override."""
    fields = {field.name for field in dataclasses.fields(MedVLMConfig)} - set(PRESET_BUILT)
    built = sorted(set(overrides) & set(PRESET_BUILT))
    if built:
        raise ValueError(f"cannot override {', '.join(built)}: set from the preset's language model and tokenizer")
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"cannot override {', '.join(unknown)}: not a MedVLMConfig setting (see "
                         "medvlm/configuration.py)")


def apply_overrides(preset: dict, overrides: dict) -> dict:
    """A copy of `preset` whose model settings take `overrides`; each key must be a MedVLMConfig field.

    The 3D baseline (`visual_path="vit3d"`) has no 2D encoder to pre-train, and trains its 3D
    encoder in every stage that trains the fusion or the compressor, the stages it replaces.
    """
    check_overrides(overrides)
    preset = copy.deepcopy(preset)
    preset["model"] = {**preset["model"], **copy.deepcopy(overrides)}
    if preset["model"].get("visual_path") == "vit3d":
        preset.pop("encoder_pretraining", None)
        preset.pop("keep_fraction", None)
        for stage in preset["stages"]:
            parts = ["volume_encoder" if part in REPLACED_BY_VOLUME_ENCODER else part for part in stage["trainable"]]
            stage["trainable"] = list(dict.fromkeys(parts))
    return preset


__all__ = ["VARIANTS", "apply_overrides", "check_overrides", "parse_overrides", "variant_overrides"]
