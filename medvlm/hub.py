"""`python -m medvlm push CHECKPOINT REPO_ID`: publish a trained checkpoint to the Hugging Face Hub.

The folder `train` writes is already a plain MedVLM checkpoint (LoRA merged, safetensors, tokenizer
and chat template); this uploads it with its model card, so that `Pipeline.from_pretrained(REPO_ID)`
and the app (`MEDVLM_CHECKPOINT=REPO_ID`) load it. The token comes from `HF_TOKEN` or
`huggingface-cli login`, as huggingface_hub finds it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import CheckpointError, UserInputError
from .model_card import write_model_card

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
NOT_PUBLISHED = ("*-training/**", "state/**", "features/**", ".cache/**")  # work files that never go up


def check_checkpoint(folder: Path) -> None:
    """Raise CheckpointError unless `folder` holds a MedVLM checkpoint ready to publish."""
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {str(folder)!r}; give the folder `train --out` wrote")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} lacks {', '.join(missing)}; it is not a complete MedVLM checkpoint")
    if json.loads((folder / "config.json").read_text()).get("model_type") != "medvlm":
        raise CheckpointError(f"{str(folder)!r} is not a MedVLM checkpoint (config.json model_type is not 'medvlm')")


def training_command(folder: Path) -> str:
    """The `train` command that made the checkpoint, from its training.json (for the model card)."""
    path = folder / "training.json"
    if not path.exists():
        return "# training command not recorded (no training.json)"
    training = json.loads(path.read_text())
    words = ["python", "-m", "medvlm", "train", "--preset", training["preset"], "--data", training["data"],
             "--out", folder.name, "--seed", str(training["seed"])]
    words += [item for key, value in training.get("config_overrides", {}).items()
              for item in ("--set", f"{key}={json.dumps(value)}")]
    processes = training.get("recipe", {}).get("processes", 1)
    prefix = f"accelerate launch --num_processes {processes} -m medvlm" if processes > 1 else "python -m medvlm"
    return shlex.join(words).replace("python -m medvlm", prefix, 1)


def push_checkpoint(checkpoint: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
                    evaluation: dict | None = None, api: HfApi | None = None) -> str:
    """Upload a checkpoint folder to the Hub model repo `repo_id` (created if needed); returns the commit URL.

    A model card (README.md) is written first unless the folder has one; `evaluation` (the JSON of
    `python -m medvlm eval`) goes into it. `revision`: a branch, created from main if new.
    """
    folder = Path(checkpoint)
    check_checkpoint(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserInputError(f"{repo_id!r} is not a Hub repo id; write it as 'org/name'") from None
    if not (folder / "README.md").exists():
        write_model_card(folder, training_command(folder), evaluation=evaluation, repo_id=repo_id)
    api = api or HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                   commit_message="Upload MedVLM 3D checkpoint", ignore_patterns=list(NOT_PUBLISHED))
    except Exception as error:  # huggingface_hub raises many types: no token, forbidden, network
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"could not upload to {repo_id!r} on the Hugging Face Hub ({reason}); check HF_TOKEN "
                             "(write access), the repo id and your network") from None
    return str(getattr(commit, "commit_url", commit))


__all__ = ["check_checkpoint", "push_checkpoint", "training_command"]
