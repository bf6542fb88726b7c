"""A tiny random MedVLM checkpoint for tests: every stage real, every size small."""

from __future__ import annotations

from pathlib import Path

from medvlm.configuration import MedVLMConfig
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.tokenizer import IMAGE_TOKEN, train_tokenizer

CORPUS = [
    "A 14 mm solid nodule in the right upper lobe. The liver is unremarkable.",
    "No focal lesion. The kidneys are normal. A 6 mm cyst in the left kidney.",
    "Where is the lesion? Which organ is abnormal? Axial plane. Computed tomography.",
] * 20


def tiny_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=320)


def tiny_config(tokenizer, **overrides) -> MedVLMConfig:
    """Encoder 32 px / 8 px patches (4×4 grid), width 32; LM hidden 32, 2 layers; K = 6, N = 8."""
    settings = dict(
        vision_config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 2048},
        image_size=32, slice_budget=6, fusion_dim=16, compressor_grid=[2, 2, 2], compressor_heads=2,
        compressor_layers=1, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    settings.update(overrides)
    return MedVLMConfig(**settings)


def build_tiny_model(**overrides):
    """(model, tokenizer), random weights, seed fixed by the caller."""
    tokenizer = tiny_tokenizer()
    return MedVLMForConditionalGeneration(tiny_config(tokenizer, **overrides)), tokenizer


def save_tiny_checkpoint(folder: Path, **overrides) -> Path:
    model, tokenizer = build_tiny_model(**overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
