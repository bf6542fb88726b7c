"""Stand-ins for the real presets' Hub models, of the same architectures, laid out in a local Hub cache
under the real repo ids (so HF_HUB_OFFLINE=1 with HF_HUB_CACHE pointing there runs the presets' own
repo-id code path). "tiny" for the tests; "real": the real sizes from random weights, for a GPU smoke run
(tests/gpu_smoke.py) where the Hub cannot be reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from medvlm.train import load_preset

CLIP_REPO, QWEN_REPO = "openai/clip-vit-base-patch16", "Qwen/Qwen2.5-1.5B-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Qwen2.5's ChatML template, tools left out: a default system turn, <|im_end|> closes every turn.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LANGUAGE_MODEL_SIZES = {  # real: Qwen2.5-1.5B's shape
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 1024},
    "real": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "vocab_size": 151936, "rope_theta": 1e6},
}
VISION_SIZES = {  # real: ViT-B/16 at 224, BiomedCLIP's and CLIP ViT-B/16's shape
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8},
    "real": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "image_size": 224, "patch_size": 16},
}


def hub_snapshot(cache: Path, repo_id: str, branch: str = "main", commit: str = COMMIT) -> Path:
    """The snapshot folder of repo_id at `branch` (pointing at `commit`) in a Hugging Face Hub cache, as
    huggingface_hub lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return repo / "snapshots" / commit


def stand_in_language_model(texts: list[str], size: str = "tiny",
                            pretrain_steps: int = 40) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A Qwen2 LM with a byte-level BPE and Qwen's template; the tiny one briefly trained on `texts` so that it
    is "pretrained" on the domain. Its EOS is <|endoftext|> (as in Qwen base models): the recipe must find
    the end-of-turn token itself."""
    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([*texts, "You are a helpful assistant. system user assistant"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                        chat_template=QWEN_TEMPLATE)
    settings = {"vocab_size": len(tokenizer), "tie_word_embeddings": True, **LANGUAGE_MODEL_SIZES[size]}
    model = Qwen2ForCausalLM(Qwen2Config(**settings))
    if size == "tiny":
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batch = tokenizer(texts[:16], padding=True, truncation=True, max_length=96, return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        for _ in range(pretrain_steps):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.config.dtype = "bfloat16"  # as the real repo's config says; the recipe trains in float32 regardless
    return model, tokenizer


def stand_in_clip(size: str = "tiny") -> CLIPModel:
    """A full CLIP model (vision and a small text half, as the real repo holds both)."""
    torch.manual_seed(1)
    return CLIPModel(CLIPConfig(
        vision_config=VISION_SIZES[size],
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=16))


def write_stand_ins(cache: Path, texts: list[str], size: str = "tiny") -> dict[str, dict[str, torch.Tensor]]:
    """Both stand-ins into the Hub cache under the real repo ids; returns their state dicts by repo id."""
    language_model, tokenizer = stand_in_language_model(texts, size)
    language_model.save_pretrained(hub_snapshot(cache, QWEN_REPO))
    tokenizer.save_pretrained(hub_snapshot(cache, QWEN_REPO))
    clip = stand_in_clip(size)
    clip.save_pretrained(hub_snapshot(cache, CLIP_REPO))
    return {QWEN_REPO: language_model.state_dict(), CLIP_REPO: clip.state_dict()}


def smoke_preset(path: Path, size: str = "tiny") -> Path:
    """The m3d-clip-qwen preset as it ships (repo ids, stages, LoRA, accumulation, checkpointing), written to
    `path`: "real" with one epoch per stage; "tiny" at toy size (32 px, K = 4, 8 visual tokens, width 16),
    three epochs per stage at a higher learning rate, float32."""
    preset = load_preset("m3d-clip-qwen")
    if size == "tiny":
        preset["model"] |= {"image_size": 32, "slice_budget": 4, "fusion_dim": 16, "compressor_grid": [2, 2, 2],
                            "compressor_heads": 2, "compressor_layers": 1}
        preset |= {"max_length": 256, "mixed_precision": "no", "warmup_ratio": 0.0, "save_dtype": "float32"}
    for stage in preset["stages"]:
        stage |= {"epochs": 3, "lr": 3e-3, "batch_size": 4} if size == "tiny" else {"epochs": 1}
    path.write_text(json.dumps(preset))
    return path
