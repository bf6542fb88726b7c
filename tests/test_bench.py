"""The benchmark: every figure present and measured, baselines measured on their own. No timing assertions."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.bench import (
    SIZES,
    all_slices_pipeline,
    fit_grid,
    make_inputs,
    naive_view3d_json,
    real_size_config,
    real_size_tokenizer,
    run_benchmark,
)
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.pipeline import Pipeline
from medvlm.preprocess import encoder_input
from medvlm.volume import load_volume
from tests.tiny_model import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["load_nifti_s", "load_dicom_s", "peak_rss_mb", "slice_render_ms", "view3d_s", "view3d_bytes",
           "view3d_naive_bytes", "encode_s", "encode_all_slices_s", "kept_slices", "total_slices", "ttft_s",
           "tokens_per_s", "followup_ttft_s", "app_ready_s"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny model with a preview size, so that selection as shipped differs from encoding every slice."""
    torch.manual_seed(0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", selection_preview_size=16)


@pytest.fixture(scope="module")
def figures(tiny_checkpoint) -> dict:
    return run_benchmark(size="tiny", repeats=2, checkpoint=str(tiny_checkpoint), app_repeats=1)


@pytest.mark.slow  # `figures` runs the benchmark, `python app.py` launches included
def test_every_figure_is_present_and_positive(figures):
    for key in FIGURES:
        assert isinstance(figures[key], int | float) and math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["kept_slices"] <= figures["total_slices"]
    assert {"cpu", "cores", "torch"} <= set(figures["machine"])
    assert figures["inputs"]["ct_shape"] == list(SIZES["tiny"].ct_shape)
    assert figures["inputs"]["ct_dicom_files"] == SIZES["tiny"].ct_shape[0]


@pytest.mark.slow  # `figures` runs the benchmark, `python app.py` launches included
def test_baselines_are_measured_not_derived(figures, tiny_checkpoint, tmp_path):
    inputs = make_inputs(tmp_path, SIZES["tiny"])
    ct = load_volume(inputs.ct_nifti)
    assert figures["view3d_naive_bytes"] == len(naive_view3d_json(ct))  # its own figure, drawn and serialised
    assert '"type":"volume"' in naive_view3d_json(ct)

    shipped = Pipeline.from_pretrained(tiny_checkpoint, device="cpu")
    baseline = all_slices_pipeline(shipped)
    assert shipped.model.config.selection_preview_size == 16  # the shipped model is left as it is
    assert baseline.model.config.selection_preview_size is None
    assert baseline.model.language_model is shipped.model.language_model  # same weights, no copy
    pixel_values, heights = encoder_input(ct, shipped.model.config)
    with torch.inference_mode():
        previewed = shipped.model.choose_slices(pixel_values, heights)
        everything = baseline.model.choose_slices(pixel_values, heights)
    assert previewed.previewed == previewed.total and previewed.encoded == len(previewed.kept)
    assert everything.previewed == 0 and everything.encoded == everything.total == figures["total_slices"]


def test_the_ct_is_fitted_to_the_asked_grid_in_hounsfield_units():
    rng = np.random.default_rng(0)
    data = rng.uniform(-1000, 1500, size=(7, 10, 14)).astype(np.float32)
    fitted, spacing = fit_grid(data, (2.0, 0.8, 0.8), (13, 12, 12), fill=-1000.0)
    assert fitted.shape == (13, 12, 12) and fitted.dtype == np.float32
    assert spacing == (1.0, 0.8, 0.8)  # same z coverage over more slices
    np.testing.assert_allclose(fitted[[0, -1], 1:-1], data[[0, -1], :, 1:-1])  # ends kept, x cropped, y padded
    assert (fitted[:, 0] == -1000.0).all() and (fitted[:, -1] == -1000.0).all()
    inside = fitted[:, 1:-1]  # linear interpolation between slices: no value outside the scan's own range
    assert data.min() <= inside.min() and inside.max() <= data.max()


def test_real_size_configuration_is_the_one_promised():
    config = real_size_config(real_size_tokenizer())
    with torch.device("meta"):
        model = MedVLMForConditionalGeneration(config)
    lm_parameters = sum(p.numel() for p in model.language_model.parameters())
    assert 1.4e9 <= lm_parameters <= 1.6e9
    assert config.image_size == 224 and config.encoder_grid == (14, 14) and config.encoder_width == 768
    assert config.slice_budget == 32 and config.num_visual_tokens == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, "-m", "medvlm", "bench", "--device", "cuda"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "CUDA" in result.stderr and "--device cpu" in result.stderr
