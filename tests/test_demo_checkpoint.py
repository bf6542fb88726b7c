"""The shipped demo checkpoint: it loads by default, and it says true things about phantoms."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.encoder_pretraining import lesion_class, lesion_maps
from medvlm.evaluate import evaluate
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.phantom import write_phantom_set
from medvlm.phantom_set import write_examples
from medvlm.pipeline import DEMO_CHECKPOINT, Pipeline
from medvlm.preprocess import encoder_input
from medvlm.volume import load_volume

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"


def test_demo_checkpoint_is_small_and_loads_by_default():
    files = {path.name for path in DEMO_CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert sum(path.stat().st_size for path in DEMO_CHECKPOINT.iterdir()) <= 20 * 2**20
    pipeline = Pipeline.from_pretrained()
    assert pipeline.describe()["demo"] is True
    assert "not for clinical use" in (DEMO_CHECKPOINT / "README.md").read_text()


def test_report_on_the_example_ct_names_its_lesion():
    """The example CT holds one lesion (assets/examples/examples.json): a ground-glass nodule, right upper lobe."""
    result = subprocess.run([sys.executable, "-m", "medvlm", "report", str(EXAMPLES / "ct_chest_abdomen.nii.gz")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    report = result.stdout.lower()
    assert "ct" in report and "brain" not in report, result.stdout
    assert "ground-glass" in report and "right upper lobe" in report, result.stdout


def test_a_report_cut_off_at_its_token_limit_says_so():
    """A report that reaches --max-new-tokens before the model ends it ends mid-sentence: the library's stream
    ends with a CutOff chunk (no text), and the CLI says so on stderr; a report the model ends has neither."""
    from medvlm.pipeline import CutOff

    pipeline = Pipeline.from_pretrained()
    volume = load_volume(EXAMPLES / "ct_chest_abdomen.nii.gz")
    whole, short = list(pipeline.report(volume)), list(pipeline.report(volume, max_new_tokens=8))
    assert not any(isinstance(chunk, CutOff) for chunk in whole)
    assert isinstance(short[-1], CutOff) and short[-1].limit == 8 and short[-1] == ""
    assert "".join(whole).startswith("".join(short)) and len("".join(short)) < len("".join(whole))
    result = subprocess.run([sys.executable, "-m", "medvlm", "report", str(EXAMPLES / "ct_chest_abdomen.nii.gz"),
                             "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "".join(short).strip()
    assert "cut off at the limit of 8 new tokens" in result.stderr


def test_an_answer_cut_off_by_the_models_context_does_not_say_to_raise_max_new_tokens(capsys):
    """The model's context (the scan and the prompt in it) can end an answer before --max-new-tokens: raising that
    would not help. The note says which ended it, on stderr, a line of its own."""
    from medvlm.__main__ import _stream
    from medvlm.pipeline import CutOff

    _stream(iter(["The liver", CutOff(934, context=1024)]))
    printed = capsys.readouterr()
    assert printed.out == "The liver\n"
    assert printed.err == ("\n(cut off at the end of the model's context, 1024 tokens with the scan and the prompt; "
                           "no longer answer fits)\n")
    assert pickle.loads(pickle.dumps(CutOff(934, context=1024))).context == 1024  # across ZeroGPU's process boundary


SELECTION_DROPS_THE_MR_LESION = pytest.mark.xfail(
    strict=True, reason="the shipped checkpoint keeps 24 of the MR example's 46 slabs, none through its lesion "
    "(README, The demo checkpoint)")


def test_the_shipped_examples_are_what_the_code_writes_now(tmp_path):
    """assets/examples is `write_examples`'s: the same scans, facts and ground truth as the phantom and writer
    code make today (a DICOM series gets new UIDs and file names each time; the rest is the same)."""
    truth = write_examples(tmp_path)
    assert json.loads(json.dumps(truth)) == json.loads((EXAMPLES / "examples.json").read_text())
    for name in truth:
        shipped, made = load_volume(EXAMPLES / name), load_volume(tmp_path / name)
        assert np.array_equal(shipped.data, made.data) and shipped.spacing == made.spacing, name
        assert (shipped.modality, shipped.meta.get("series_number")) == (made.modality, made.meta.get("series_number"))


@pytest.mark.parametrize("name", ["ct_chest_abdomen.nii.gz",
                                  pytest.param("mr_brain.nii.gz", marks=SELECTION_DROPS_THE_MR_LESION),
                                  "pet_body.nii.gz"])
def test_slice_selection_keeps_a_slice_through_every_example_lesion(name):
    """Selection drops near-duplicate slices; one that shows a lesion is not a duplicate, and a lesion on no
    kept slice is lost to every later stage (the viewer marks the kept slices)."""
    truth = json.loads((EXAMPLES / "examples.json").read_text())[name]
    model = MedVLMForConditionalGeneration.from_pretrained(DEMO_CHECKPOINT).eval()
    volume = load_volume(EXAMPLES / name)
    pixel_values, heights = encoder_input(volume, model.config)
    with torch.inference_mode():
        kept = set(model.choose_slices(pixel_values, heights).kept.tolist())
    assert truth["lesions"]
    for lesion in truth["lesions"]:
        coverage, _ = lesion_maps(volume, {**truth, "lesions": [lesion]}, [lesion_class(lesion)],
                                  pixel_values.shape[0], model.config.image_size)
        showing = set(coverage[:, 0].any(axis=(1, 2)).nonzero()[0].tolist())
        assert showing & kept, f"{lesion_class(lesion)}: on input slices {sorted(showing)}, kept {sorted(kept)}"


@pytest.mark.slow
def test_eval_on_fresh_phantoms_beats_guessing(tmp_path):
    write_phantom_set(tmp_path, n=9, seed=424242, formats=("nifti",), matrix=160, split="test")
    scores = evaluate(None, tmp_path, split="test", progress=False)
    assert scores["n"] == 9
    assert scores["closed_accuracy"] > 0.45  # four choices: guessing scores 0.25


def test_eval_limited_to_reports_asks_no_questions(tmp_path):
    write_phantom_set(tmp_path, n=2, seed=424243, formats=("nifti",), matrix=64, split="test")
    scores = evaluate(None, tmp_path, split="test", progress=False, tasks=("report",))
    assert scores["n"] == scores["samples"] == 2  # one report prompt per scan, no VQA
    assert scores["closed_accuracy"] is None and scores["open_rouge1"] is None
    assert scores["report_rouge1"] is not None and scores["finding_f1"] is not None
