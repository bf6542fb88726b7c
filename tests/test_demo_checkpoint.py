"""The shipped demo checkpoint: it loads by default, and it says true things about phantoms."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medvlm.evaluate import evaluate
from medvlm.phantom import write_phantom_set
from medvlm.pipeline import DEMO_CHECKPOINT, Pipeline

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


@pytest.mark.slow
def test_eval_on_fresh_phantoms_beats_guessing(tmp_path):
    write_phantom_set(tmp_path, n=9, seed=424242, formats=("nifti",), matrix=160, split="test")
    scores = evaluate(None, tmp_path, split="test", progress=False)
    assert scores["n"] == 9
    assert scores["closed_accuracy"] > 0.45  # four choices: guessing scores 0.25
