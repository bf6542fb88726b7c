"""The benchmark: every figure present and measured, baselines measured on their own. No timing assertions."""

import math
import os
import re
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


def test_the_summary_table_names_every_figure_with_its_value_and_whether_it_met_its_target():
    """`bench` without --json prints this table: the machine, then every figure by name with its value (four
    significant digits, large ones in full), its target where it has one and whether this run met it, a share
    of a baseline judged against the baseline of the same run."""
    from medvlm.bench import TARGETS, machine, summary_table

    measured = {"load_nifti_s": 0.79, "load_dicom_s": 0.82, "slice_render_ms": 4.4, "view3d_s": 0.23,
                "view3d_bytes": 154_815, "view3d_naive_bytes": 5_673_196, "encode_s": 0.231,
                "encode_all_slices_s": 0.26, "kept_slices": 24, "total_slices": 47, "ttft_s": 1.12,
                "tokens_per_s": 240.0, "followup_ttft_s": 0.029, "peak_rss_mb": 2318.4, "app_ready_s": 9.7}
    assert set(measured) == set(FIGURES)
    about = machine()

    def table(**changed) -> dict[str, list[str]]:
        figures = {"machine": about, "size": "full", "device": "cpu", "repeats": 5,  # in run_benchmark's order
                   "inputs": {"ct_shape": list(SIZES["full"].ct_shape), "ct_dicom_files": 300},
                   **{key: measured[key] for key in ("load_nifti_s", "load_dicom_s", "slice_render_ms", "view3d_s",
                                                     "view3d_bytes", "view3d_naive_bytes")},
                   "checkpoint": {"checkpoint": "demo checkpoint", "revision": None, "device": "cpu", "demo": True},
                   **{key: measured[key] for key in ("encode_s", "encode_all_slices_s", "kept_slices",
                                                     "total_slices")},
                   "encode_parts": {"shipped_model_s": 0.063, "all_slices_model_s": 0.099},
                   **{key: measured[key] for key in ("ttft_s", "tokens_per_s", "followup_ttft_s")},
                   "mr_brain": {"shape": [160, 192, 160], "encode_s": 0.05, "kept_slices": 20, "total_slices": 40},
                   "peak_rss_mb": measured["peak_rss_mb"], "app_ready_s": measured["app_ready_s"]}
        figures.update(changed)
        header, *rows = summary_table(figures).splitlines()
        rows = rows[rows.index(next(row for row in rows if row.startswith("figure"))) + 1:]
        assert str(about["cpu"]) in header and f"{about['cores']} cores" in header and about["torch"] in header
        return {name: rest for name, *rest in (re.split(r"\s{2,}", row.strip()) for row in rows)}

    shown = table()
    for key, value in measured.items():
        assert float(shown[key][0].replace(",", "")) == pytest.approx(value, rel=5e-4), key
    assert shown["view3d_bytes"][0] == "154,815"  # not 1.548e+05
    assert set(TARGETS) <= set(shown) and all(len(shown[key]) == 3 for key in TARGETS)
    assert shown["load_nifti_s"][1:] == ["≤ 2", "yes"]
    assert shown["encode_s"][1:] == ["≤ 0.6 × encode_all_slices_s", "no"]  # 0.231 s is 0.89 × 0.26 s
    assert shown["followup_ttft_s"][2] == "yes" and shown["view3d_bytes"][2] == "yes"
    assert shown["mr_brain.encode_s"] == ["0.05"]  # the MR's figures too, with no target of their own
    assert "repeats" not in shown and "kept_slices" in shown and len(shown["kept_slices"]) == 1

    assert table(encode_s=0.15)["encode_s"][2] == "yes"  # under 0.6 × 0.26 s
    assert table(ttft_s=4.5)["ttft_s"][2] == "no" and table(ttft_s=4.5)["followup_ttft_s"][2] == "yes"
    assert table(view3d_naive_bytes=400_000)["view3d_bytes"][2] == "no"  # over a third of the baseline
    # a run the targets do not describe (the tiny size, another checkpoint) is not judged against them
    assert table(size="tiny")["ttft_s"][2] == "—"
    assert table(checkpoint={"checkpoint": "org/model", "demo": False})["load_nifti_s"][2] == "—"
