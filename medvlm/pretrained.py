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
instead; the tower is timm's ViT built from the architecture alone (encoder.py), and its weights are
the vision trunk's tensors in the open_clip checkpoint of that Hub repo (open_clip itself is not needed).
"""

from __future__ import annotations

import contextlib
import pickle

import torch
from huggingface_hub import hf_hub_download
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import logging as transformers_logging

from .errors import CheckpointError, UserInputError
from .tokenizer import IMAGE_TOKEN


def _source(section: dict) -> tuple[str, str | None]:
    pretrained = section["pretrained"]
    return pretrained["repo_id"], pretrained.get("revision")


def _reason(error: Exception) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def _from_hub(load, section: dict, **kwargs):
    """`load(repo_id, revision=..., **kwargs)` for the preset section's source; a repo that cannot be found or
    fetched is the user's to fix (CheckpointError, one line), not a traceback."""
    repo_id, revision = _source(section)
    try:
        return load(repo_id, revision=revision, **kwargs)
    except OSError as error:  # transformers' and huggingface_hub's way of saying: not found, offline, gated
        where = repr(repo_id) + (f" at revision {revision!r}" if revision else "")
        raise CheckpointError(f"could not load {where} from the Hugging Face Hub ({_reason(error)}); check the "
                              "preset's repo id, your network or HF_TOKEN") from None


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


# The file an open_clip model's Hub repo keeps its weights in (BiomedCLIP's only one), and where in it
# the vision trunk's tensors lie (open_clip's CLIP.visual is a TimmModel holding the timm model as .trunk).
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_TRUNK_PREFIX = "visual.trunk."


def open_clip_trunk_weights(open_clip_name: str) -> dict[str, torch.Tensor]:
    """The vision trunk's weights in an open_clip checkpoint on the Hub ("hf-hub:ORG/NAME"), by their names in
    the trunk (`visual.trunk.` removed); a file that cannot be read is a CheckpointError."""
    section = {"pretrained": {"repo_id": open_clip_name.removeprefix("hf-hub:")}}
    path = _from_hub(hf_hub_download, section, filename=OPEN_CLIP_WEIGHTS)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"the open_clip checkpoint {path} cannot be read ({_reason(error)}); "
                              "delete it from the Hugging Face cache and run again to download it anew") from None
    return {key.removeprefix(OPEN_CLIP_TRUNK_PREFIX): value for key, value in weights.items()
            if key.startswith(OPEN_CLIP_TRUNK_PREFIX)}


def load_open_clip_trunk(trunk: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` into `trunk` when they are exactly its tensors (names and shapes); else a CheckpointError."""
    expected = trunk.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & weights.keys() if weights[key].shape != expected[key].shape)
    if missing or unexpected or reshaped:
        example = OPEN_CLIP_TRUNK_PREFIX + (missing or unexpected or reshaped)[0]
        raise CheckpointError(f"the open_clip checkpoint of {source} does not hold the vision trunk this model "
                              f"builds ({len(missing)} tensors missing, {len(unexpected)} unexpected, "
                              f"{len(reshaped)} of another shape, e.g. {example}); check the config's open_clip_name")
    trunk.load_state_dict(weights)


def load_pretrained_encoder(model, preset: dict) -> None:
    """Copy the Hub weights of the preset's pretrained vision tower into a freshly built model (strict).

    A transformers tower's come from the preset's `encoder.pretrained` repo; an open_clip trunk's (BiomedCLIP)
    from the open_clip checkpoint that `open_clip_name` names. Called after the model is built, so its own
    weight initialisation (post_init) has already run and does not touch them. The 3D baseline has no 2D
    encoder: nothing to load.
    """
    if model.config.visual_path != "slices":
        return
    encoder = preset.get("encoder", {})
    if model.config.encoder_backend == "open_clip":
        name = model.config.open_clip_name
        load_open_clip_trunk(model.slice_encoder.vision_tower.trunk, open_clip_trunk_weights(name), name)
    elif "pretrained" in encoder:
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


__all__ = ["attach_lora", "end_of_turn_token", "load_open_clip_trunk", "load_pretrained_encoder",
           "load_pretrained_weights", "merge_lora", "open_clip_trunk_weights", "pretrained_text_config",
           "pretrained_tokenizer", "pretrained_vision_config"]
