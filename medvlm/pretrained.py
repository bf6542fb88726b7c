"""The real configuration's parts from the Hugging Face Hub: a pretrained slice encoder, an instruct LM
with its own tokenizer, and LoRA on that LM (DESIGN section 1, "real" column).

A preset names them by repo id (and optionally a revision):

    "encoder":        {"pretrained": {"repo_id": "openai/clip-vit-base-patch16", "revision": null}}
    "language_model": {"pretrained": {"repo_id": "Qwen/Qwen2.5-1.5B-Instruct", "revision": null},
                       "gradient_checkpointing": true}
    "tokenizer":      {"from_language_model": true}
    stage:            {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}}

Downloads go through huggingface_hub, so HF_HUB_OFFLINE=1 and its cache apply. BiomedCLIP is
not a transformers model: its preset sets `encoder_backend = "open_clip"` and `open_clip_name`
instead, and open_clip brings its weights when the tower is built (encoder.py).
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import logging as transformers_logging

from .errors import CheckpointError, UserInputError
from .tokenizer import IMAGE_TOKEN


def _source(section: dict) -> tuple[str, str | None]:
    pretrained = section["pretrained"]
    return pretrained["repo_id"], pretrained.get("revision")


def _from_hub(load, section: dict, **kwargs):
    """`load(repo_id, revision=..., **kwargs)` for the preset section's source; a repo that cannot be found or
    fetched is the user's to fix (CheckpointError, one line), not a traceback."""
    repo_id, revision = _source(section)
    try:
        return load(repo_id, revision=revision, **kwargs)
    except OSError as error:  # transformers' way of saying: not found, offline, gated, no network
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = repr(repo_id) + (f" at revision {revision!r}" if revision else "")
        raise CheckpointError(f"could not load {where} from the Hugging Face Hub ({reason}); check the preset's "
                              "repo id, your network or HF_TOKEN") from None


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (Qwen <|im_end|>, Phi-3 <|end|>,
    Llama 3 <|eot_id|>): generation must stop there, whatever the tokenizer calls its EOS."""
    marker = "MEDVLM_ANSWER_END"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    after = tokenizer(rendered.split(marker, 1)[1], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {
        index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return tokenizer.convert_ids_to_tokens(after[0]) if after and after[0] in special else None


def pretrained_tokenizer(language_model: dict):
    """The LM's own tokenizer with the image placeholder added, a pad token, and its end-of-turn token as EOS."""
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, language_model)
    if not tokenizer.chat_template:
        raise UserInputError(f"{_source(language_model)[0]} has no chat template; use an instruct (chat) model")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    turn_end = end_of_turn_token(tokenizer)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pretrained_text_config(language_model: dict, tokenizer) -> PreTrainedConfig:
    """The LM's config from the Hub, in float32 (bf16 comes from mixed precision), its vocabulary large
    enough for the added placeholder."""
    config = _from_hub(AutoConfig.from_pretrained, language_model)
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = torch.float32
    return config


def pretrained_vision_config(encoder: dict) -> PreTrainedConfig:
    """The vision tower's config from the Hub: a CLIP / SigLIP repo gives its vision half."""
    config = _from_hub(AutoConfig.from_pretrained, encoder)
    config = getattr(config, "vision_config", None) or config
    config.dtype = torch.float32
    return config


@contextlib.contextmanager
def _quiet_loading():
    """A vision tower taken out of a full CLIP / SigLIP checkpoint leaves its text half behind, which
    transformers reports weight by weight: expected here, so not shown."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def load_pretrained_encoder(model, preset: dict) -> None:
    """Copy the Hub weights of the preset's pretrained vision tower into a freshly built model (strict)."""
    encoder = preset.get("encoder", {})
    if "pretrained" in encoder:
        tower_class = type(model.slice_encoder.vision_tower)
        with _quiet_loading():
            tower = _from_hub(tower_class.from_pretrained, encoder, config=model.config.vision_config,
                              dtype=torch.float32)
        model.slice_encoder.vision_tower.load_state_dict(tower.state_dict())


def load_pretrained_weights(model, preset: dict) -> None:
    """Copy the Hub weights of the preset's pretrained encoder and LM into a freshly built model.

    A strict load: a stand-in of another architecture, or a missing weight, raises.
    """
    load_pretrained_encoder(model, preset)
    language_model = preset["language_model"]
    if "pretrained" in language_model:
        pretrained = _from_hub(AutoModelForCausalLM.from_pretrained, language_model, dtype=torch.float32)
        pretrained.resize_token_embeddings(model.config.text_config.vocab_size)
        model.language_model.load_state_dict(pretrained.state_dict())


def attach_lora(language_model: torch.nn.Module, settings: dict) -> PeftModel:
    """Put LoRA adapters into the LM in place (M3D: r 16, α 32, dropout 0.05); only they train.

    The returned PeftModel is the handle to merge them with (`merge_lora`); the LM module itself,
    still where the MedVLM model holds it, runs with the adapters.
    """
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings.get("dropout", 0.0),
                        target_modules=settings.get("target_modules", "all-linear"), bias="none")
    return get_peft_model(language_model, config)


def merge_lora(adapted: PeftModel) -> torch.nn.Module:
    """Fold the adapters into the LM's weights and remove them: a plain LM again, same module names."""
    return adapted.merge_and_unload()


__all__ = ["attach_lora", "end_of_turn_token", "load_pretrained_encoder", "load_pretrained_weights", "merge_lora",
           "pretrained_text_config", "pretrained_tokenizer", "pretrained_vision_config"]
