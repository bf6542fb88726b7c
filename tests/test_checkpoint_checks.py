"""A checkpoint that cannot write a report is refused when it is loaded or pushed, in one sentence; what a
checkpoint publishes about its training names no folder of the trainer's."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_model import save_tiny_checkpoint

from medvlm.__main__ import main
from medvlm.hub import publishable_training_record, training_command
from medvlm.model_card import write_model_card
from medvlm.phantom import write_phantom_set
from medvlm.train import PRESETS

ROOT = Path(__file__).resolve().parent.parent
SCAN = ROOT / "assets" / "examples" / "ct_chest_abdomen.nii.gz"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


def spoil(checkpoint: Path, folder: Path, how: str) -> Path:
    """A copy of the checkpoint with one thing a report needs gone or changed."""
    spoiled = Path(shutil.copytree(checkpoint, folder))
    if how == "no chat template":  # copied without the tokenizer's template
        (spoiled / "chat_template.jinja").unlink()
    elif how == "no tokenizer.json":  # tokenizer_config.json alone names no vocabulary
        (spoiled / "tokenizer.json").unlink()
    else:  # the config of another tokenizer: the scan placeholder is another token
        config = json.loads((spoiled / "config.json").read_text())
        (spoiled / "config.json").write_text(json.dumps(config | {"image_token_id": config["image_token_id"] + 4}))
    return spoiled


@pytest.mark.parametrize(("how", "report_says", "push_says"), [
    ("no chat template", "has no chat template (chat_template.jinja)", "has no chat template"),
    ("no tokenizer.json", "has no tokenizer.json", "lacks tokenizer.json"),
    ("another image token", "does not read the scan placeholder '<image>' as token 7, as its config.json says",
     "does not read the scan placeholder"),
])
def test_a_checkpoint_that_cannot_write_a_report_is_refused_by_report_and_push(checkpoint, tmp_path, capsys, how,
                                                                               report_says, push_says):
    spoiled = spoil(checkpoint, tmp_path / "spoiled", how)
    for command, says in ((["report", SCAN, "--checkpoint", spoiled, "--device", "cpu"], report_says),
                          (["push", spoiled, "org/model"], push_says)):
        assert main([str(word) for word in command]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and says in error, error
    assert not (spoiled / "README.md").exists()  # push stopped before writing the card


def test_the_intact_checkpoint_reports(checkpoint, capsys):
    assert main(["report", str(SCAN), "--checkpoint", str(checkpoint), "--device", "cpu", "--max-new-tokens",
                 "2"]) == 0
    error = capsys.readouterr().err.strip()  # no warning; only, where 2 tokens do not end the report, that note
    assert error in ("", "(cut off at the limit of 2 new tokens; raise --max-new-tokens for the whole answer)")


def test_a_card_says_slices_are_kept_as_they_are_when_no_slab_thickness_is_set(tmp_path):
    """The m3d presets set slice_spacing_mm to null: M3D's arrays are already resampled to 32 slices."""
    torch.manual_seed(0)
    folder = save_tiny_checkpoint(tmp_path / "checkpoint", slice_spacing_mm=None)
    card = write_model_card(folder, "python -m medvlm train ...").read_text()
    assert "None mm" not in card
    assert "budget K = 6; the scan's slices kept as they are (no slabs), at most 320 per scan." in card


def test_training_from_a_preset_file_publishes_its_name_not_its_folder(tmp_path, capsys):
    data = tmp_path / "data"
    write_phantom_set(data, n=3, seed=5, formats=("nifti",), matrix=32)
    (tmp_path / "presets-of-someone").mkdir()
    preset = shutil.copy(PRESETS / "tiny.json", tmp_path / "presets-of-someone" / "my.json")
    out = tmp_path / "checkpoint"
    assert main(["train", "--preset", str(preset), "--data", str(data), "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "training.json").read_text())["preset"] == "my.json"
    card = write_model_card(out, training_command(out)).read_text()
    assert "--preset my.json" in card and "presets-of-someone" not in card and str(tmp_path) not in card
    record = json.loads((out / "training.json").read_text())
    (out / "training.json").write_text(json.dumps(record | {"preset": str(preset)}))  # as train wrote it before
    publishable_training_record(out)  # what push does before uploading it
    assert json.loads((out / "training.json").read_text())["preset"] == "my.json"


def test_held_out_scores_are_quoted_only_for_the_weights_they_scored(checkpoint, tmp_path):
    """A checkpoint trained again into its folder keeps the old `eval_heldout.json`: the app would say how often the
    old model was right under the new one's reports. Scores name the weights they scored (`weights_sha256`); others
    are not quoted."""
    from medvlm.pipeline import DEMO_CHECKPOINT, HELD_OUT_EVALUATION, Pipeline, weights_digest

    assert Pipeline.from_pretrained(None).held_out_scores()["n"] >= 200  # the demo's own, shipped with it
    folder = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))
    scores = json.loads((DEMO_CHECKPOINT / HELD_OUT_EVALUATION).read_text())
    (folder / HELD_OUT_EVALUATION).write_text(json.dumps(scores))  # the demo's scores beside other weights
    assert Pipeline.from_pretrained(folder).held_out_scores() is None
    (folder / HELD_OUT_EVALUATION).write_text(json.dumps(scores | {"weights_sha256": weights_digest(folder)}))
    assert Pipeline.from_pretrained(folder).held_out_scores()["n"] == scores["n"]
    (folder / HELD_OUT_EVALUATION).write_text(json.dumps({k: v for k, v in scores.items() if k != "weights_sha256"}))
    assert Pipeline.from_pretrained(folder).held_out_scores() is None  # from before eval named the weights


def test_a_checkpoint_that_is_no_folder_says_what_it_is(tmp_path, capsys, monkeypatch):
    """A file given as the checkpoint, or a folder's name mistyped (no '/': a Hub repo id too) while the Hub is off:
    what it is and what to do, not the Hub client's 'Name or service not known' or its three sentences."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    for checkpoint, says in (
        (tmp_path / "notes.txt", f"'{tmp_path / 'notes.txt'}' is a file, not a checkpoint folder; give the folder"),
        ("my-checkpont", "checkpoint 'my-checkpont' is not in the local Hugging Face cache (and there is no folder "
                         "'my-checkpont' here), and HF_HUB_OFFLINE=1 keeps it from being downloaded"),
        ("checkpoints/run1", "checkpoint 'checkpoints/run1' is not in the local Hugging Face cache (and there is no "
                             "folder 'checkpoints/run1' here)"),  # its parent folder mistyped or missing too
    ):
        assert main(["report", str(SCAN), "--checkpoint", str(checkpoint)]) == 2
        error = capsys.readouterr().err
        assert says in error and len(error.strip().splitlines()) == 1


def test_a_checkpoint_without_weights_or_with_a_larger_tokenizer_is_refused(checkpoint, tmp_path, capsys):
    """Copied without its weights: said so, not transformers' 'Error no file named …'. A tokenizer of more tokens
    than the language model reads (another checkpoint's): refused before its last tokens index past the model."""
    no_weights = Path(shutil.copytree(checkpoint, tmp_path / "no-weights"))
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    larger = Path(shutil.copytree(checkpoint, tmp_path / "larger-tokenizer"))
    config = json.loads((larger / "config.json").read_text())
    config["text_config"]["vocab_size"] = 8  # the weights are never read: the tokenizer is checked first
    (larger / "config.json").write_text(json.dumps(config))
    for folder, says in ((no_weights, "has no weights (model.safetensors); copy the whole checkpoint folder"),
                         (larger, "tokens, and its language model reads 8; they do not belong together")):
        assert main(["report", str(SCAN), "--checkpoint", str(folder)]) == 2
        error = capsys.readouterr().err
        assert says in error and len(error.strip().splitlines()) == 1
