"""`python -m medvlm push CHECKPOINT REPO_ID`: publish a trained checkpoint to the Hugging Face Hub.

The folder `train` writes is already a plain MedVLM checkpoint (LoRA merged, safetensors, tokenizer
and chat template); this uploads it with its model card, so that `Pipeline.from_pretrained(REPO_ID)`
and the app (`MEDVLM_CHECKPOINT=REPO_ID`) load it. The token comes from `HF_TOKEN` or
`huggingface-cli login`, as huggingface_hub finds it.

The card is the folder's README.md. Push writes it with medvlm.model_card and ends it with a line that
records the repo id and evaluation it was written for, a digest of the weights it describes and one of
the text above; every later push rewrites such a card (for the new repo id, with the new evaluation or
else the recorded one, which push refuses to carry over to weights that have changed since). A card
without that line, or edited since, is the user's: it is uploaded as it is, never replaced. An
evaluation from `eval` names the weights it scored (weights_sha256); push refuses it for others.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .errors import CheckpointError, UserInputError
from .model_card import published_path, write_model_card
from .pipeline import HELD_OUT_EVALUATION, checkpoint_named, load_tokenizer, weights_digest

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# What a checkpoint folder publishes, by name at its top level (the config, the weights, whole or in shards, the
# tokenizer as transformers saves it, the chat template, the training record, the card and held-out scores): never
# a work folder, a feature cache or another file left there.
PUBLISHED = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
             "training.json", "README.md", HELD_OUT_EVALUATION)
CARD_MARK = "<!-- medvlm push: "  # opens the last line of a card push wrote (an HTML comment: the Hub hides it)


def check_checkpoint(folder: Path) -> None:
    """Raise CheckpointError unless `folder` holds a MedVLM checkpoint ready to publish: its files, and a
    tokenizer that `Pipeline.from_pretrained` will take (`load_tokenizer`: a chat template, the scan placeholder)."""
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {str(folder)!r}; give the folder `train --out` wrote")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{str(folder)!r} lacks {', '.join(missing)}; it is not a complete MedVLM checkpoint")
    load_tokenizer(folder, checkpoint_named(folder))


def training_command(folder: Path) -> str:
    """The `train` command that made the checkpoint, from its training.json (for the model card), whose folders
    are already as a card shows them (`publishable_training_record`)."""
    path = folder / "training.json"
    if not path.exists():
        return "# training command not recorded (no training.json)"
    training = json.loads(path.read_text())
    options = training.get("options", {})
    words = ["python", "-m", "medvlm", "train", "--preset", training["preset"], "--data", training["data"],
             "--out", folder.resolve().name, "--seed", str(training["seed"])]
    words += [item for key, value in training.get("config_overrides", {}).items()
              for item in ("--set", f"{key}={json.dumps(value)}")]
    words += [item for flag in ("work", "features") if options.get(flag) for item in (f"--{flag}", options[flag])]
    words += ["--from-volumes"] if options.get("from_volumes") else []
    processes = training.get("recipe", {}).get("processes", 1)
    prefix = f"accelerate launch --num_processes {processes} -m medvlm" if processes > 1 else "python -m medvlm"
    return shlex.join(words).replace("python -m medvlm", prefix, 1)


def publishable_training_record(folder: Path) -> None:
    """training.json's folders and preset file as a card shows them (`published_path`), for a record written
    before train did so: it is uploaded with the checkpoint."""
    path = folder / "training.json"
    if not path.exists():
        return
    training = json.loads(path.read_text())
    published = {**training, **{key: published_path(training[key]) for key in ("preset", "data", "features")
                                if isinstance(training.get(key), str)}}
    options = training.get("options")
    if isinstance(options, dict):
        published["options"] = {**options, **{key: published_path(options[key]) for key in ("work", "features")
                                              if isinstance(options.get(key), str)}}
    if published != training:
        path.write_text(json.dumps(published, indent=2))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def pushed_card(card: Path) -> dict | None:
    """What push wrote `card` for ({"repo_id", "revision", "evaluation", "weights", "sha256"}), or None for a
    card push did not write, or one edited since."""
    text = card.read_text() if card.exists() else ""
    if CARD_MARK not in text:
        return None
    body, mark = text.rsplit(CARD_MARK, 1)
    try:
        record = json.loads(mark.strip().removesuffix("-->"))
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("sha256") == _digest(body) else None


def write_card(folder: Path, repo_id: str, evaluation: dict | None, revision: str | None, weights: str) -> Path:
    """Write folder/README.md for `repo_id` (at branch `revision`) with medvlm.model_card, marked as push's own
    (see the module notes) with `weights`, the digest of the weights it describes."""
    if evaluation and isinstance(evaluation.get("checkpoint"), str):  # as eval was given it: maybe a local path
        evaluation = {**evaluation, "checkpoint": published_path(evaluation["checkpoint"])}
    card = write_model_card(folder, training_command(folder), evaluation=evaluation, repo_id=repo_id,
                            revision=revision)
    body = card.read_text()
    record = {"repo_id": repo_id, "revision": revision, "evaluation": evaluation, "weights": weights,
              "sha256": _digest(body)}
    mark = json.dumps(record).replace(">", "\\u003e")  # still JSON; no text in the evaluation can end the comment
    card.write_text(f"{body}{CARD_MARK}{mark} -->\n")
    return card


def renew_card(folder: Path) -> str:
    """After `train` wrote new weights into `folder`: a card push wrote for the weights before is written again
    for these, without the old evaluation (it scored other weights); a card of the user's is left as it is.
    Returns the note to print, or ""."""
    card = folder / "README.md"
    written = pushed_card(card)
    if written is None:
        return (f"note: {card} is a model card of yours, left as it is: it may describe the weights trained before"
                if card.exists() else "")
    weights = weights_digest(folder)  # hashed only for a card push wrote: a large checkpoint takes a while
    if written.get("weights") == weights:
        return ""
    write_card(folder, written["repo_id"], None, written.get("revision"), weights)
    return (f"note: {card} (the model card push wrote for the weights trained before) now describes these, "
            "without held-out figures: run `python -m medvlm eval` and push with --evaluation to add them")


@contextmanager
def _refusal_explained(repo_id: str) -> Iterator[None]:
    """Turn whatever the Hub raised into one UserInputError sentence."""
    try:
        yield
    except Exception as error:  # huggingface_hub raises many types: no token, forbidden, network
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"could not upload to {repo_id!r} on the Hugging Face Hub ({reason}); check HF_TOKEN "
                             "(write access), the repo id and your network") from None


def push_checkpoint(checkpoint: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
                    evaluation: dict | None = None, api: HfApi | None = None) -> str:
    """Upload a checkpoint folder to the Hub model repo `repo_id` (created if needed); returns the commit URL.

    The model card (README.md) is written first, or rewritten if push wrote it, for `repo_id` and with
    `evaluation` (the JSON of `python -m medvlm eval`; without it, the one the card had). A card the user
    wrote is uploaded as it is; given `evaluation`, push refuses rather than replace it. `revision`: a
    branch, created from main if new.
    """
    folder = Path(checkpoint)
    check_checkpoint(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserInputError(f"{repo_id!r} is not a Hub repo id; write it as 'org/name'") from None
    card = folder / "README.md"
    written = pushed_card(card)
    weights = weights_digest(folder)
    if evaluation is not None and not isinstance(evaluation, dict):
        raise UserInputError("the evaluation is not the JSON object `python -m medvlm eval` prints; pass that")
    if evaluation is not None and evaluation.get("weights_sha256") != weights:
        scored = ("scored another checkpoint than " + repr(str(folder)) + " holds (other weights, config.json or "
                  "tokenizer, or it is from before eval covered them)"
                  if evaluation.get("weights_sha256") else "does not say which weights it scored (no weights_sha256)")
        raise UserInputError(f"the evaluation {scored}; run `python -m medvlm eval` on this checkpoint and pass "
                             "that JSON")
    if written is not None and evaluation is None and written.get("evaluation") \
            and written.get("weights") != weights:  # no record (a card from before push kept one): unknown
        raise UserInputError(f"the evaluation in {str(card)!r} is not known to score the weights the folder holds "
                             "now (trained again since the last push, or a card from before push recorded the "
                             "weights, config.json and tokenizer, December 2026); "
                             "evaluate it again and pass --evaluation, or move README.md away to publish without "
                             "figures")
    publishable_training_record(folder)
    if written is not None or not card.exists():
        write_card(folder, repo_id, evaluation if evaluation is not None else (written or {}).get("evaluation"),
                   revision, weights)
    elif evaluation is not None:
        raise UserInputError(f"{str(card)!r} was not written by push or has been edited, so push will not replace it "
                             "to add --evaluation; put the figures into it yourself and push without --evaluation, "
                             "or move it away so that push writes the card")
    api = api or HfApi()
    with _refusal_explained(repo_id):
        api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)  # None: org default
        shown = api.repo_info(repo_id, repo_type="model").private is not True  # None: the Hub did not say
    if private and shown:  # create_repo leaves an existing repo's visibility as it is
        raise UserInputError(f"{repo_id!r} is public (or the Hub does not say it is private), so a --private push "
                             "could publish the checkpoint; make it private on the Hub first, or push to a new "
                             "repo id")
    with _refusal_explained(repo_id):
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                   commit_message="Upload MedVLM 3D checkpoint", allow_patterns=list(PUBLISHED))
    left = unpublished(folder)
    if left:
        print(f"note: {len(left)} file(s) in {folder} are no part of the checkpoint and were not uploaded (e.g. "
              f"{left[0]})", file=sys.stderr)
    return str(getattr(commit, "commit_url", commit))


def unpublished(folder: Path) -> list[str]:
    """The files in a checkpoint folder that push leaves out (paths relative to it; a clone's .git and other
    dotfiles not counted)."""
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    kept = set(filter_repo_objects(files, allow_patterns=list(PUBLISHED)))
    return [file for file in files if file not in kept]


__all__ = ["check_checkpoint", "push_checkpoint", "training_command"]
