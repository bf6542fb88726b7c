"""The whole model and its pipeline on a tiny random checkpoint."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_model import build_tiny_model, save_tiny_checkpoint

from medvlm.errors import CheckpointError, UserInputError
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.pipeline import (
    DEMO_CHECKPOINT,
    Pipeline,
    checkpoint_parameters,
    default_dtype,
    resolve_checkpoint,
    resolve_device,
    weights_digest,
)
from medvlm.volume import Volume, load_volume
from medvlm.writers import save_nifti

ROOT = Path(__file__).resolve().parent.parent


def ct_volume(seed: int = 0, slices: int = 20) -> Volume:
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 300, size=(slices, 40, 48)).astype(np.float32)
    return Volume(data, (2.0, 1.0, 1.0), np.eye(4), "CT", "nifti", "RAS")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-medvlm"))


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return Pipeline.from_pretrained(checkpoint)


def _visual_inputs(model, volume):
    from medvlm.preprocess import encoder_input

    pixel_values, heights = encoder_input(volume, model.config)
    return [pixel_values], [heights]


def test_save_and_load_give_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    model.eval()
    pixel_values, heights = _visual_inputs(model, ct_volume())
    n = model.config.num_visual_tokens
    input_ids = torch.tensor([[5, 6] + [model.config.image_token_id] * n + [7, 8]])
    with torch.no_grad():
        before = model(input_ids, pixel_values=pixel_values, heights=heights).logits
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "tokenizer.json").exists()
    reloaded = MedVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = reloaded(input_ids, pixel_values=pixel_values, heights=heights).logits
    torch.testing.assert_close(before, after)
    assert reloaded.slice_encoder.frozen


def test_a_convolutional_slice_encoder_keeps_its_batch_statistics(tmp_path):
    """A ResNet tower reads its last feature map as patch tokens; its batch-norm statistics are part of the
    frozen encoder: a training step leaves them alone, and saving and loading keeps them."""
    torch.manual_seed(0)
    resnet = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
              "layer_type": "basic"}
    model, tokenizer = build_tiny_model(vision_config=resnet)
    assert model.config.encoder_grid == (4, 4) and model.config.encoder_width == 16  # 32 px, stride 8
    tower = model.slice_encoder.vision_tower
    pixel_values, heights = _visual_inputs(model, ct_volume())
    with torch.no_grad():
        tower.train()(pixel_values=pixel_values[0])  # statistics of its own, as pre-training leaves them
    statistics = {name: buffer.clone() for name, buffer in tower.named_buffers()}
    n = model.config.num_visual_tokens
    input_ids = torch.tensor([[5, 6] + [model.config.image_token_id] * n + [7, 8]])
    model.train()
    model(input_ids, pixel_values=pixel_values, heights=heights, labels=input_ids).loss.backward()
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in tower.named_buffers())
    model.eval()
    with torch.no_grad():
        before = model(input_ids, pixel_values=pixel_values, heights=heights).logits
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = MedVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = reloaded(input_ids, pixel_values=pixel_values, heights=heights).logits
    torch.testing.assert_close(before, after)


def test_thin_slices_reach_the_encoder_as_the_mean_of_their_slab():
    """A CT of 1 mm slices goes to a checkpoint of 4 mm slabs as a thick-slice reconstruction: slab i is the
    mean of slices floor(i·Z/Z') to ceil((i+1)·Z/Z'), the bins of torch's adaptive average pooling."""
    from medvlm.preprocess import encoder_input

    model, _ = build_tiny_model()
    config = copy.deepcopy(model.config)  # encoder_input reads only the preprocessing fields
    config.slice_spacing_mm, config.max_input_slices = 4.0, 64
    hu = np.linspace(-300.0, 300.0, 30, dtype=np.float32)  # each slice one value: slab means are known
    data = np.broadcast_to(hu[:, None, None], (30, 8, 8)).copy()
    volume = Volume(data=data, spacing=(1.0, 1.0, 1.0), affine=np.eye(4), modality="CT", source="nifti",
                    orientation="RAS")
    pixel_values, heights = encoder_input(volume, config)
    assert pixel_values.shape[0] == heights.shape[0] == 8  # round(30 × 1 / 4) slabs
    slabs = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(hu)[None, None], 8)[0, 0]
    one_slab = encoder_input(Volume(data=np.broadcast_to(slabs[:, None, None].numpy(), (8, 8, 8)).copy(),
                                    spacing=(4.0, 1.0, 1.0), affine=np.eye(4), modality="CT", source="nifti",
                                    orientation="RAS"), config)[0]
    torch.testing.assert_close(pixel_values, one_slab)


def test_an_m3d_npy_reaches_the_encoder_slice_by_slice_not_averaged_as_1_mm_slices(tmp_path):
    """An M3D .npy stores no spacing (M3D resampled every scan to 32 slices, each several mm): a checkpoint of
    4 mm slabs must not average its 32 slices into 8 as if they were 1 mm apart."""
    from medvlm.preprocess import encoder_input

    config = copy.deepcopy(build_tiny_model()[0].config)
    config.slice_spacing_mm, config.max_input_slices = 4.0, 64
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, 32, dtype=np.float32)[:, None, None], (32, 16, 16)).copy()
    np.save(tmp_path / "scan.npy", ramp[None])
    scan = load_volume(tmp_path / "scan.npy")
    assert not scan.spacing_known
    pixel_values, heights = encoder_input(scan, config)
    assert pixel_values.shape[0] == heights.shape[0] == 32
    assert len({round(float(value), 4) for value in pixel_values[:, 0, 8, 8]}) == 32  # every slice its own
    save_nifti(tmp_path / "scan.nii.gz", ramp, (1.0, 1.0, 1.0))  # the same slices 1 mm apart: 8 slabs of 4 mm
    assert load_volume(tmp_path / "scan.nii.gz").spacing_known
    assert encoder_input(load_volume(tmp_path / "scan.nii.gz"), config)[0].shape[0] == 8


def test_the_same_voxels_read_otherwise_are_another_scan_to_the_encoding_cache(tmp_path):
    """An M3D .npy (slices kept) and a 1 mm NIfTI (4 mm slabs) of the same voxels, or the same voxels as CT
    (windows) and as MR (percentiles), reach the encoder differently: they must not share a cached encoding."""
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, 32, dtype=np.float32)[:, None, None], (32, 16, 16)).copy()
    np.save(tmp_path / "scan.npy", ramp[None])
    save_nifti(tmp_path / "scan.nii.gz", ramp, (1.0, 1.0, 1.0), modality="OT")
    npy, nifti = load_volume(tmp_path / "scan.npy"), load_volume(tmp_path / "scan.nii.gz")
    assert np.array_equal(npy.data, nifti.data) and npy.spacing == nifti.spacing
    assert npy.fingerprint != nifti.fingerprint
    as_ct, as_mr = (Volume(nifti.data, nifti.spacing, nifti.affine, modality, "nifti", "RAS")
                    for modality in ("CT", "MR"))
    assert as_ct.fingerprint != as_mr.fingerprint


def test_non_square_pixels_reach_the_encoder_as_the_anatomy_looks():
    """A 40 mm disc on 1 × 2 mm pixels (half as many columns) is the same disc to the encoder as on 1 × 1 mm
    pixels, not an ellipse twice as tall as wide (the viewer draws it so, from the spacing, too)."""
    from medvlm.preprocess import encoder_input

    config = build_tiny_model()[0].config

    def disc(columns: int, column_mm: float) -> Volume:
        y = np.arange(64) + 0.5 - 32.0
        x = (np.arange(columns) + 0.5) * column_mm - columns * column_mm / 2
        data = np.where(y[:, None] ** 2 + x[None, :] ** 2 < 20.0**2, 100.0, -1000.0).astype(np.float32)
        return Volume(np.repeat(data[None], 4, axis=0), (8.0, 1.0, column_mm), np.eye(4), "CT", "nifti", "RAS")

    square, wide = encoder_input(disc(64, 1.0), config)[0], encoder_input(disc(32, 2.0), config)[0]
    assert (square - wide).abs().mean() < 0.05 * (square - square.mean()).abs().mean()


def test_a_config_takes_whole_floats_numpy_numbers_and_zero_for_off():
    """A config edited by hand or saved by another tool (224.0, numpy scalars) loads as before; heads the model
    does not build are not checked."""
    from medvlm.configuration import MedVLMConfig

    config = MedVLMConfig(image_size=224.0, compressor_grid=[4.0, 8, 8], slice_budget=np.int64(32),
                          similarity_threshold=np.float32(0.95), slice_spacing_mm=0, selection_preview_size=0)
    assert (config.image_size, config.compressor_grid, config.slice_budget) == (224, [4, 8, 8], 32)
    assert type(config.slice_budget) is int and config.num_visual_tokens == 256
    MedVLMConfig(fusion_dim=18, compressor_heads=6)  # the 3D ViT's volume_heads 4 are never built here
    with pytest.raises(ValueError, match="fusion_dim 18 must divide into compressor_heads 4"):
        MedVLMConfig(fusion_dim=18, compressor_heads=4)


def test_placeholder_count_mismatch_raises():
    model, _ = build_tiny_model()
    n = model.config.num_visual_tokens
    visual_tokens = torch.zeros(1, n, model.config.text_config.hidden_size)
    too_few = torch.tensor([[5] + [model.config.image_token_id] * (n - 1)])
    with pytest.raises(ValueError, match="placeholder"):
        model(too_few, visual_tokens=visual_tokens)


def test_slice_heights_mean_the_same_in_bfloat16():
    """A GPU loads the model in bfloat16: where a kept slice lies must not turn into noise there."""
    torch.manual_seed(0)
    model, _ = build_tiny_model()
    heights = torch.linspace(0, 1, 24)[None]  # float32, as encoder_input gives them and the feature cache keeps them
    exact = model.slice_heights(heights)
    half = model.to(torch.bfloat16).slice_heights(heights).float()
    assert (half - exact).norm() < 0.02 * exact.norm()  # bfloat16's own rounding, not sines of noise


def test_training_gradients_skip_the_frozen_encoder():
    torch.manual_seed(0)
    model, _ = build_tiny_model()
    pixel_values, heights = _visual_inputs(model, ct_volume())
    n = model.config.num_visual_tokens
    input_ids = torch.tensor([[5] + [model.config.image_token_id] * n + [7, 8, 9]])
    model(input_ids, pixel_values=pixel_values, heights=heights, labels=input_ids).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("slice_encoder."):
            assert parameter.grad is None, name
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.fusion.gate.weight.grad.abs().sum() > 0


def test_streamed_report_equals_plain_greedy_generation(pipeline):
    volume = ct_volume()
    streamed = list(pipeline.report(volume, max_new_tokens=24))
    assert len(streamed) >= 1
    encoding = pipeline.encode(volume)
    config = pipeline.model.config
    from medvlm.prompt import prompt_text

    text = prompt_text(pipeline.tokenizer, [{"role": "user", "content": config.report_prompt}],
                       config.image_token, config.num_visual_tokens, add_generation_prompt=True)
    input_ids = pipeline.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    new_ids = pipeline.model.generate(input_ids, encoding.visual_tokens, max_new_tokens=24, do_sample=False,
                                      pad_token_id=pipeline.tokenizer.pad_token_id,
                                      eos_token_id=pipeline.tokenizer.eos_token_id)
    assert "".join(streamed) == pipeline.tokenizer.decode(new_ids[0], skip_special_tokens=True)


def test_follow_up_turn_reuses_the_encoded_scan(pipeline, monkeypatch):
    volume = ct_volume(seed=1)
    first = [{"role": "user", "content": "Which organ is abnormal?"}]
    answer = "".join(pipeline.chat(volume, first, max_new_tokens=8))
    calls = []
    original = pipeline.model.choose_slices
    monkeypatch.setattr(pipeline.model, "choose_slices", lambda *a, **k: calls.append(1) or original(*a, **k))
    follow_up = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Where is it?"}]
    again = "".join(pipeline.chat(volume, follow_up, max_new_tokens=8))
    assert again.strip()  # an answer, from the cached encoding
    assert calls == []
    pipeline.chat(ct_volume(seed=2), first, max_new_tokens=1)  # a different scan is encoded afresh
    assert calls == [1]


def test_kept_slices_are_axial_indices_of_the_volume(pipeline):
    volume = ct_volume(seed=3, slices=30)
    encoding = pipeline.encode(volume)
    assert 1 <= len(encoding.kept_slices) <= pipeline.model.config.slice_budget
    assert encoding.kept_slices == sorted(encoding.kept_slices)
    assert all(0 <= index < 30 for index in encoding.kept_slices)


def test_kept_slabs_name_the_slices_the_encoder_averaged(pipeline):
    """More slices than the encoder takes are read as slabs, each the mean of a few: each kept slab names the first
    and last slice whose mean the encoder read for it, as the viewer marks them read."""
    from medvlm.preprocess import encoder_input

    data = np.random.default_rng(4).normal(0, 300, size=(400, 48, 48)).astype(np.float32)  # more than 320 slices
    volume = Volume(data, (2.0, 1.0, 1.0), np.eye(4), "CT", "nifti", "RAS")
    encoding = pipeline.encode(volume)
    pixel_values, _ = encoder_input(volume, pipeline.model.config)
    assert encoding.total_slices == len(pixel_values) < 400
    assert any(last > first for first, last in encoding.kept_slabs)  # some slabs average two slices
    for (first, last), kept in zip(encoding.kept_slabs, encoding.kept_inputs, strict=True):
        mean = np.repeat(data[first:last + 1].mean(axis=0, keepdims=True), 400, axis=0)  # that slab's mean everywhere
        alone = Volume(mean, (2.0, 1.0, 1.0), np.eye(4), "CT", "nifti", "RAS")
        torch.testing.assert_close(encoder_input(alone, pipeline.model.config)[0][0], pixel_values[kept],
                                   atol=1e-4, rtol=1e-4)
    assert all(first <= middle <= last for (first, last), middle in zip(encoding.kept_slabs, encoding.kept_slices,
                                                                        strict=True))


def test_stop_event_ends_generation(pipeline):
    import threading

    messages = [{"role": "user", "content": "Describe."}]
    full = "".join(pipeline.chat(ct_volume(), messages, max_new_tokens=200))  # greedy: the same answer every time
    stop = threading.Event()
    stream = pipeline.chat(ct_volume(), messages, max_new_tokens=200, stop=stop)
    stop.set()
    stopped = "".join(stream)
    assert len(stopped) < len(full) // 4 and full.startswith(stopped)
    assert not any(t.name == "medvlm-generate" for t in threading.enumerate())


def test_one_session_forgetting_a_shared_scan_keeps_it_for_the_others(pipeline):
    """Two sessions on the same example hold two volumes with the same content: one closing keeps the other's
    visual tokens; the last one closing drops them."""
    first, second = ct_volume(seed=4), ct_volume(seed=4)
    pipeline.encode(first)
    pipeline.encode(second)
    pipeline.encode(first)  # a follow-up turn of the first session holds nothing more
    pipeline.forget(first)
    assert first.fingerprint in pipeline._encodings
    pipeline.forget(first)  # forgetting twice changes nothing either
    assert first.fingerprint in pipeline._encodings
    pipeline.forget(second)
    assert first.fingerprint not in pipeline._encodings


def test_a_scan_forgotten_while_it_is_encoded_is_not_cached(pipeline, monkeypatch):
    """The session ends (a new scan, the tab closed) while its scan is still being encoded."""
    volume = ct_volume(seed=5)
    original = pipeline.model.choose_slices

    def choose_slices_then_session_ends(*args, **kwargs):
        pipeline.forget(volume)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline.model, "choose_slices", choose_slices_then_session_ends)
    encoding = pipeline.encode(volume)
    assert encoding.kept_slices  # the caller still gets its answer
    assert volume.fingerprint not in pipeline._encodings


@pytest.mark.parametrize(("settings", "message"), [
    ({"temperature": 0.5, "top_p": 5.0}, "top-p 5.0 is out of range"),
    ({"temperature": 0.5, "top_p": 0.0}, "top-p 0.0 is out of range"),
    ({"temperature": -1.0, "top_p": 0.9}, "temperature -1 is out of range"),
    ({"temperature": 1e-40, "top_p": 0.9}, "temperature 1e-40 is out of range"),
    ({"temperature": float("nan"), "top_p": 0.9}, "temperature nan is out of range"),
])
def test_sampling_settings_out_of_range_are_one_sentence(pipeline, settings, message):
    with pytest.raises(UserInputError, match=message) as raised:
        pipeline.chat(ct_volume(), [{"role": "user", "content": "Describe."}], max_new_tokens=4, **settings)
    assert "\n" not in str(raised.value)


def test_a_device_this_machine_lacks_is_one_sentence():
    with pytest.raises(UserInputError, match="unknown device 'gpu'; use cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="needs a CUDA GPU"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == "cpu"


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A copy of the shipped demo checkpoint to spoil."""
    return Path(shutil.copytree(DEMO_CHECKPOINT, tmp_path / "demo-model"))


def test_a_checkpoint_cloned_without_git_lfs_says_to_pull(demo_copy):
    (demo_copy / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                 f"oid sha256:{'0' * 64}\nsize 8800000\n")
    with pytest.raises(CheckpointError, match="git lfs pull") as raised:
        Pipeline.from_pretrained(demo_copy)
    assert "model.safetensors" in str(raised.value) and "\n" not in str(raised.value)


def test_damaged_weights_are_one_sentence(demo_copy):
    weights = demo_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    with pytest.raises(CheckpointError, match=r"weights of checkpoint .* are damaged") as raised:
        Pipeline.from_pretrained(demo_copy)
    assert "\n" not in str(raised.value)


def test_weights_that_do_not_fit_the_config_are_refused_not_drawn_at_random(demo_copy, capsys):
    """A config.json edited after training, or weights of another model beside it: transformers would draw the
    missing weights at random, and serve nonsense from them, with only a table on stderr to say so."""
    from safetensors.torch import load_file, save_file

    weights = load_file(demo_copy / "model.safetensors")
    save_file({key: value for key, value in weights.items() if not key.startswith("multi_modal_projector.")},
              demo_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"do not fit .*\(4 weights missing, e\.g\. multi_modal_projector"):
        Pipeline.from_pretrained(demo_copy)
    save_file({**weights, "lora_A.weight": torch.zeros(2, 2)}, demo_copy / "model.safetensors",
              metadata={"format": "pt"})  # weights never merged, which the model would leave unused
    with pytest.raises(CheckpointError, match=r"do not fit .*\(1 weights the model has no place for, e\.g\. lora_A"):
        Pipeline.from_pretrained(demo_copy)
    save_file(weights, demo_copy / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((demo_copy / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (demo_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not fit .*\(weights of other shapes\).*do not belong together"):
        Pipeline.from_pretrained(demo_copy)
    assert capsys.readouterr().err == ""  # transformers' load report is not printed beside the sentence


def _hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """Lay out a Hugging Face Hub cache entry for repo_id at branch main, as huggingface_hub does."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_repo_id_resolves_offline_from_the_local_cache(checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _hub_cache(cache, "someorg/some-model", checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    folder = resolve_checkpoint("someorg/some-model")
    assert (folder / "config.json").exists()
    pipeline = Pipeline.from_pretrained("someorg/some-model")
    assert pipeline.describe()["checkpoint"] == "someorg/some-model"
    with pytest.raises(CheckpointError, match="someorg/missing-model"):
        Pipeline.from_pretrained("someorg/missing-model")


def test_a_hub_revision_that_cannot_write_a_prompt_is_named_with_its_revision(checkpoint, tmp_path, monkeypatch):
    """A user loading someone's checkpoint at a revision learns which version lacks its chat template, and that
    another revision may have one (the advice to save the template is the publisher's to follow)."""
    cache = tmp_path / "hub"
    _hub_cache(cache, "someorg/some-model", checkpoint)
    snapshot = next((cache / "models--someorg--some-model" / "snapshots").iterdir())
    (snapshot / "chat_template.jinja").unlink()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointError) as refused:
        Pipeline.from_pretrained("someorg/some-model", revision="main")
    assert str(refused.value).startswith("'someorg/some-model' at revision 'main' has no chat template")
    assert "take a revision that has one" in str(refused.value)


def test_eval_scores_the_hub_revision_it_is_given(checkpoint, tmp_path, monkeypatch):
    from medvlm.evaluate import evaluate
    from medvlm.phantom_set import write_phantom_set

    _hub_cache(tmp_path / "hub", "someorg/some-model", checkpoint)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    data = write_phantom_set(tmp_path / "phantoms", 1, seed=5, modalities=("ct",), formats=("nifti",), split="test",
                             matrix=32)["out"]
    settings = {"tasks": ("vqa_closed",), "max_new_tokens": 4, "progress": False}
    scores = evaluate("someorg/some-model", data, revision="main", **settings)
    assert scores["n"] == 1 and scores["revision"] == "main" and scores["max_new_tokens"] == 4
    assert scores["commit"] == "0123456789abcdef0123456789abcdef01234567"  # what "main" was when it was scored
    assert scores["weights_sha256"] == weights_digest(checkpoint)  # which weights the figures belong to
    assert Pipeline.from_pretrained("someorg/some-model", revision="main").describe()["revision"] == "main"
    with pytest.raises(CheckpointError, match="someorg/some-model"):  # a tag this cache does not hold
        evaluate("someorg/some-model", data, revision="v2.0", **settings)


def test_eval_asks_for_a_report_as_the_app_asks_this_checkpoint(checkpoint, tmp_path, monkeypatch):
    """A checkpoint with a report prompt of its own is scored on the request the app sends it, not the default."""
    from medvlm.evaluate import evaluate
    from medvlm.phantom_set import write_phantom_set

    own = Path(shutil.copytree(checkpoint, tmp_path / "own-prompt"))
    config = json.loads((own / "config.json").read_text())
    (own / "config.json").write_text(json.dumps(config | {"report_prompt": "Summarise this volume."}))
    data = write_phantom_set(tmp_path / "phantoms", 1, seed=5, modalities=("ct",), formats=("nifti",), split="test",
                             matrix=32)["out"]
    asked, chat = [], Pipeline.chat
    monkeypatch.setattr(Pipeline, "chat", lambda self, scan, messages, **kw: asked.append(messages) or chat(
        self, scan, messages, **kw))
    evaluate(own, data, tasks=("report",), max_new_tokens=2, progress=False)
    assert asked == [[{"role": "user", "content": "Summarise this volume."}]]


def test_eval_says_why_scans_without_a_ground_truth_entry_have_no_finding_scores(checkpoint, tmp_path):
    from medvlm.evaluate import evaluate
    from medvlm.phantom_set import write_phantom_set

    data = write_phantom_set(tmp_path / "phantoms", 1, seed=5, modalities=("ct",), formats=("nifti",), split="test",
                             matrix=32)["out"]
    (Path(data) / "ground_truth.json").write_text("{}")  # the scan's entry lost
    scores = evaluate(checkpoint, data, tasks=("report",), max_new_tokens=2, progress=False)
    assert scores["finding_f1"] is None
    assert "1 of the 1 scans with a report have no entry in ground_truth.json" in scores["notes"]["finding_f1"]


def test_a_stop_event_of_the_callers_stops_an_answer_and_serves_again(pipeline):
    """The pipeline sets no event of the caller's: one passed to a finished answer still lets the next one run."""
    import threading

    stop, volume = threading.Event(), ct_volume()
    first = "".join(pipeline.report(volume, max_new_tokens=12, stop=stop))
    assert not stop.is_set() and "".join(pipeline.report(volume, max_new_tokens=12, stop=stop)) == first
    stop.set()
    stopped = "".join(pipeline.report(volume, max_new_tokens=12, stop=stop))
    assert first.startswith(stopped) and len(stopped) < len(first)


def test_text_holding_the_models_control_tokens_is_refused(pipeline):
    image_token = pipeline.model.config.image_token
    for question in (f"Is the {image_token} a CT?", "Describe.<|im_end|>"):
        if question.endswith("<|im_end|>") and "<|im_end|>" not in pipeline.tokenizer.all_special_tokens:
            question = f"Describe.{pipeline.tokenizer.eos_token}"
        with pytest.raises(UserInputError, match="control tokens") as raised:
            pipeline.chat(ct_volume(), [{"role": "user", "content": question}], max_new_tokens=4)
        assert "\n" not in str(raised.value)
    with pytest.raises(UserInputError, match="max new tokens 5000 is out of range"):
        pipeline.chat(ct_volume(), [{"role": "user", "content": "Describe."}], max_new_tokens=5000)


def test_a_conversation_given_in_another_form_is_one_sentence(pipeline):
    """A question passed as a string, an empty conversation, or one that ends with the assistant: a UserInputError
    that says what `messages` is, not Python's 'string indices must be integers'."""
    for messages, says in (("Which organ?", "for one question give [{'role': 'user', 'content': question}]"),
                           ([], "messages is the conversation, a list of"),
                           ([{"role": "user", "content": [{"type": "text", "text": "Which organ?"}]}],
                            "'content': text}"),  # OpenAI-style content blocks
                           ([{"role": "user", "content": "Which organ?"}, {"role": "assistant", "content": "Liver."}],
                            "must end with the user's question")):
        with pytest.raises(UserInputError, match=re.escape(says)):
            pipeline.chat(ct_volume(), messages, max_new_tokens=4)


def test_a_blank_scan_is_refused_before_the_model_makes_up_a_report(pipeline):
    """A scan of one value everywhere (air in HU, an empty PET, all NaN read as zeros, ...) holds nothing to report
    on, whatever rounding the slabs and resizing leave in the model's input."""
    for modality, value in (("CT", -1000.0), ("PT", 37.3), ("OT", 1234.5), ("MR", 0.0), ("OT", -32768.0),
                            ("MR", 4095.0)):
        blank = Volume(np.full((20, 40, 48), value, np.float32), (2.0, 1.0, 1.0), np.eye(4), modality, "nifti", "RAS")
        with pytest.raises(UserInputError, match=r"holds nothing for the model to read \(one value everywhere"):
            pipeline.encode(blank)
        with pytest.raises(UserInputError, match="the scan holds nothing for the model to read"):
            "".join(pipeline.report(blank, max_new_tokens=4))
    faint = ct_volume()
    faint.data[:] = -1000.0
    faint.data[10, 20, 20:30] = -990.0  # one faint streak in one slice is something to read
    pipeline.encode(faint)
    bright = ct_volume()
    bright.data[:] = 3000.0
    bright.data[10] = 3500.0  # a CT whose every value lies above every window: nothing the model can see
    with pytest.raises(UserInputError, match="the scan holds nothing for the model to read"):
        pipeline.encode(bright)


def test_a_conversation_longer_than_the_model_reads_is_refused_and_an_answer_ends_within_it(pipeline, monkeypatch):
    """The LM reads its context (the scan's tokens included) and no further: an answer is cut to fit, and a
    conversation that leaves no room for one is refused with what to do."""
    from medvlm.prompt import prompt_text

    config = pipeline.model.config
    context = config.text_config.max_position_embeddings
    asked = []
    generate = pipeline.model.generate
    monkeypatch.setattr(pipeline.model, "generate", lambda *args, **kwargs: (asked.append(kwargs["max_new_tokens"]),
                                                                            generate(*args, **kwargs))[1])

    def length(messages: list[dict]) -> int:
        text = prompt_text(pipeline.tokenizer, messages, config.image_token, config.num_visual_tokens,
                           add_generation_prompt=True)
        return len(pipeline.tokenizer(text, add_special_tokens=False).input_ids)

    def earlier_turns(messages: list[dict], at_least: int) -> list[dict]:
        while length(messages) < at_least:
            messages = [{"role": "user", "content": "Where is the lesion? " * 40},
                        {"role": "assistant", "content": "Liver."}, *messages]
        return messages

    question = [{"role": "user", "content": "And its size?"}]
    near_the_end = earlier_turns(question, context - 600)
    "".join(pipeline.chat(ct_volume(), near_the_end, max_new_tokens=1024))
    assert asked == [context - length(near_the_end)] and asked[0] < 1024
    with pytest.raises(UserInputError, match=r"the conversation has grown to [\d,]+ tokens .*start a new conversation"):
        pipeline.chat(ct_volume(), earlier_turns(near_the_end, context - 16), max_new_tokens=64)


@pytest.mark.parametrize(("capability", "parameters", "dtype"), [
    ((7, 5), 1_540_000_000, torch.float32),  # a T4 and Qwen2.5-1.5B: 6.2 GB in float32 of its 16 GB
    ((7, 5), 3_820_000_000, torch.bfloat16),  # a T4 and Phi-3-mini: 15.3 GB would not fit, emulated bfloat16 does
    ((8, 6), 1_540_000_000, torch.bfloat16),  # an A10G
    ((9, 0), 3_820_000_000, torch.bfloat16),  # an H100
])
def test_bfloat16_on_gpus_that_compute_in_it_float32_on_older_ones_where_it_fits(monkeypatch, capability, parameters,
                                                                                  dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=16e9))
    assert default_dtype("cuda", parameters) == dtype and default_dtype("cuda:1", parameters) == dtype
    assert default_dtype("cpu", parameters) == torch.float32


def test_the_parameters_of_a_checkpoint_are_counted_from_its_headers(checkpoint, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "model.safetensors")
    assert checkpoint_parameters(checkpoint) == sum(tensor.numel() for tensor in tensors.values()) > 0
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)  # damaged: load_model says so, not this count
    assert checkpoint_parameters(tmp_path) == 0


def test_a_revision_with_a_local_folder_is_refused_not_ignored(checkpoint):
    for folder, named in ((checkpoint, "a local folder"), (None, "the demo checkpoint")):
        with pytest.raises(CheckpointError, match=f"a revision \\('v2'\\) names a version of a Hub repo.*{named}"):
            Pipeline.from_pretrained(folder, revision="v2")


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json"):
        Pipeline.from_pretrained(tmp_path)
    for config, sentence in (([1, 2], "is a None model, not a MedVLM checkpoint"),
                             ({"model_type": "medvlm"}, "describes no language model")):  # not a 7B default
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=sentence):
            Pipeline.from_pretrained(tmp_path)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "medvlm", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_cli_report_and_ask_stream_text(checkpoint, tmp_path):
    from medvlm.writers import save_nifti

    scan = save_nifti(tmp_path / "scan.nii.gz", ct_volume().data, (2.0, 1.0, 1.0))
    report = _cli("report", scan, "--checkpoint", checkpoint, "--max-new-tokens", "12")
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip()
    question = "Which organ is abnormal?"
    answer = _cli("ask", scan, question, "--checkpoint", checkpoint, "--max-new-tokens", "6")
    assert answer.returncode == 0, answer.stderr
    asked = [{"role": "user", "content": question}]
    greedy = "".join(Pipeline.from_pretrained(checkpoint).chat(load_volume(scan), asked, max_new_tokens=6))
    assert greedy.strip() and answer.stdout.strip() == greedy.strip()  # the model's answer to that question


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    scan_path = tmp_path / "scan.npy"
    np.save(scan_path, np.random.default_rng(0).random((1, 8, 16, 16), dtype=np.float32))
    result = _cli("report", scan_path, "--checkpoint", "someorg/not-there")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "someorg/not-there" in result.stderr and "Traceback" not in result.stderr
