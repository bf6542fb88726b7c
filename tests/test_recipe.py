"""The real recipe (issue 7) at toy scale, offline: both M3D stages with a Hub encoder and LLM + LoRA, the
same run under `accelerate launch` with two CPU processes, the feature cache, sharded evaluation, and
publishing to the Hub.

The Hub is a local cache (HF_HUB_OFFLINE=1) in which the real presets' repo ids hold tiny stand-ins of
the same architectures: a CLIP model (openai/clip-vit-base-patch16) and a Qwen2 LM with a ChatML
tokenizer (Qwen/Qwen2.5-1.5B-Instruct). The presets' repo-id code path is what runs.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from hub_stand_ins import CLIP_REPO, COMMIT, QWEN_REPO, hub_snapshot, smoke_preset, write_stand_ins
from safetensors import safe_open
from tiny_model import build_tiny_model, save_tiny_checkpoint
from transformers import AutoModelForImageTextToText

from medvlm.__main__ import main
from medvlm.configuration import MedVLMConfig
from medvlm.errors import UserInputError
from medvlm.features import FeatureCache, VolumeFeatures, build_feature_cache, encoder_fingerprint
from medvlm.hub import CARD_MARK, push_checkpoint, renew_card
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.phantom import write_phantom_set
from medvlm.pipeline import Pipeline, weights_digest
from medvlm.train import PRESETS, Collator, TrainingObjective, load_preset, read_samples, scan_features
from medvlm.volume import load_volume

ROOT = Path(__file__).resolve().parent.parent
REAL_PRESETS = sorted(path.stem for path in PRESETS.glob("m3d-*.json"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> SimpleNamespace:
    """12 phantoms in the M3D .npy layout (8×32×32), the stand-in Hub cache, the toy preset."""
    root = tmp_path_factory.mktemp("recipe")
    data = root / "m3d"
    write_phantom_set(data, n=12, seed=5, formats=("npy",), npy_shape=(8, 32, 32), matrix=64)
    texts = [turn["content"] for sample in read_samples(data, "train") for turn in sample.messages]
    hub = root / "hub"
    weights = write_stand_ins(hub, texts)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return SimpleNamespace(root=root, data=data, hub=hub, preset=smoke_preset(root / "toy-m3d.json", "tiny"), env=env,
                           clip=weights[CLIP_REPO], language_model=weights[QWEN_REPO])


def run(*args: str, env: dict, processes: int = 1) -> subprocess.CompletedProcess:
    """`python -m medvlm ARGS`, or under `accelerate launch` with `processes` CPU processes (gloo)."""
    if processes == 1:
        command = [sys.executable, "-m", "medvlm", *args]
    else:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        # --cpu alone starts one process; a multi-process launch on CPUs is the DDP launcher with ACCELERATE_USE_CPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), "-m", "medvlm", *args]
        env = {**env, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(recipe) -> Path:
    out = recipe.root / "single" / "checkpoint"
    run("train", "--preset", str(recipe.preset), "--data", str(recipe.data), "--out", str(out), env=recipe.env)
    return out


@pytest.fixture(scope="module")
def double(recipe) -> SimpleNamespace:
    """Two processes: the feature cache with `features`, then training from it."""
    features, out = recipe.root / "double" / "features", recipe.root / "double" / "checkpoint"
    encoded = run("features", "--checkpoint-or-preset", str(recipe.preset), "--data", str(recipe.data), "--out",
                  str(features), "--shard-size", "4", env=recipe.env, processes=2)
    trained = run("train", "--preset", str(recipe.preset), "--data", str(recipe.data), "--out", str(out),
                  "--features", str(features), env=recipe.env, processes=2)
    return SimpleNamespace(features=features, checkpoint=out, printed=encoded.stdout + trained.stdout)


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def epoch_losses(checkpoint: Path) -> dict[str, list[float]]:
    """Per stage, the validation loss after each epoch, from metrics.csv."""
    rows = (checkpoint.parent / f"{checkpoint.name}-training" / "metrics.csv").read_text().splitlines()[1:]
    losses: dict[str, list[float]] = {}
    for row in rows:
        stage, _, _, _, _, val_loss, _ = row.split(",")
        if val_loss:
            losses.setdefault(stage, []).append(float(val_loss))
    return losses


# The presets ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_real_presets_are_the_m3d_recipe(name):
    preset = load_preset(name)
    config = MedVLMConfig(**preset["model"])
    assert (config.slice_budget, config.num_visual_tokens, config.image_size) == (32, 256, 224)
    assert config.encoder_grid == (14, 14) and config.encoder_width == 768  # ViT-B/16 at 224
    assert preset["language_model"]["pretrained"]["repo_id"] and preset["tokenizer"] == {"from_language_model": True}
    align, instruct = preset["stages"]
    assert align["tasks"] == ["report"] and "language_model" not in align["trainable"] and "lora" not in align
    assert set(instruct["tasks"]) == {"report", "vqa_closed", "vqa_open"}
    assert {key: instruct["lora"][key] for key in ("r", "alpha", "dropout")} == {"r": 16, "alpha": 32, "dropout": 0.05}
    assert (align["epochs"], align["lr"], instruct["epochs"], instruct["lr"]) == (3, 1e-4, 5, 5e-5)  # as M3D
    assert preset["mixed_precision"] == "bf16" and preset["language_model"]["gradient_checkpointing"]
    assert preset["max_length"] == 512 and preset["gradient_accumulation_steps"] >= 1


def test_real_presets_differ_only_in_their_sources():
    def recipe_only(preset: dict) -> dict:
        preset = json.loads(json.dumps(preset))
        for key in ("encoder_backend", "open_clip_name", "vision_config"):
            preset["model"].pop(key, None)
        preset["language_model"].pop("pretrained")
        for key in ("description", "encoder"):
            preset.pop(key, None)
        return preset

    recipes = [recipe_only(load_preset(name)) for name in REAL_PRESETS]
    assert len(REAL_PRESETS) >= 2 and all(recipe == recipes[0] for recipe in recipes)


# Both stages, one process and two -------------------------------------------------------------------------


@pytest.mark.slow
def test_both_stages_lower_the_loss_and_save_a_plain_checkpoint_the_pipeline_runs(single, recipe):
    losses = epoch_losses(single)
    assert set(losses) == {"align", "instruct"}
    for stage, values in losses.items():
        assert values[-1] < values[0], (stage, values)
    weights = tensors(single)
    assert not [key for key in weights if "lora_" in key or "base_layer" in key]  # LoRA merged, names plain
    tower = {key.removeprefix("slice_encoder.vision_tower."): value for key, value in weights.items()
             if key.startswith("slice_encoder.vision_tower.")}
    pretrained = {key: value for key, value in recipe.clip.items() if key.startswith("vision_model.")}
    assert tower and len(tower) == len(pretrained)
    for key, value in pretrained.items():  # the Hub encoder, frozen: still its own weights
        torch.testing.assert_close(tower[key.removeprefix("vision_model.")], value)
    query = "language_model.model.layers.0.self_attn.q_proj.weight"  # LoRA-tuned, then merged
    assert not torch.equal(weights[query], recipe.language_model["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(weights["language_model.model.norm.weight"], recipe.language_model["model.norm.weight"])

    config = json.loads((single / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    pipeline = Pipeline.from_pretrained(single)
    assert pipeline.tokenizer.eos_token == "<|im_end|>"  # the template's end of turn, found by the recipe
    assert pipeline.tokenizer.convert_tokens_to_ids("<image>") == config["image_token_id"]
    report = "".join(pipeline.report(load_volume(recipe.data / "ct" / "phantom_00000.npy"), max_new_tokens=24))
    assert report.strip()
    training = json.loads((single / "training.json").read_text())
    assert training["recipe"]["language_model"]["repo_id"] == QWEN_REPO and training["recipe"]["processes"] == 1


@pytest.mark.slow
def test_a_finished_run_resumes_without_changing_the_checkpoint(single, recipe):
    before, log = tensors(single), epoch_losses(single)
    run("train", "--preset", str(recipe.preset), "--data", str(recipe.data), "--out", str(single), env=recipe.env)
    assert epoch_losses(single) == log  # no stage trained again
    after = tensors(single)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)  # the trained weights, not fresh ones

    # Stopped after the last epoch of the LoRA stage, before it merged and saved: the epoch state (with the
    # adapters and the optimiser) is loaded, the adapters merged, and the checkpoint is the same.
    stage = single.parent / f"{single.name}-training" / "state" / "instruct"
    (stage / "done.json").unlink()
    (stage / "weights.safetensors").unlink()
    assert [path.name for path in stage.glob("epoch-*")] == ["epoch-002"]  # only the newest state is kept
    run("train", "--preset", str(recipe.preset), "--data", str(recipe.data), "--out", str(single), env=recipe.env)
    resumed = tensors(single)
    assert all(torch.allclose(resumed[key], before[key], atol=1e-6) for key in before)


@pytest.mark.slow
def test_two_processes_give_a_checkpoint_of_the_same_structure(single, double, recipe):
    one, two = tensors(single), tensors(double.checkpoint)
    assert {key: value.shape for key, value in one.items()} == {key: value.shape for key, value in two.items()}
    config = json.loads((single / "config.json").read_text())
    assert config == json.loads((double.checkpoint / "config.json").read_text())
    assert json.loads((double.checkpoint / "training.json").read_text())["recipe"]["processes"] == 2
    assert set(epoch_losses(double.checkpoint)) == {"align", "instruct"}
    Pipeline.from_pretrained(double.checkpoint)
    lines = double.printed.splitlines()  # what each command made, said once: each process printed it
    assert lines.count(str(double.checkpoint)) == lines.count(str(double.features / "features.json")) == 1


@pytest.mark.slow
def test_each_process_encodes_its_share_and_the_shards_merge(double, recipe):
    index = json.loads((double.features / "features.json").read_text())
    images = {s.image for split in ("train", "validation") for s in read_samples(recipe.data, split)}
    assert set(index["shards"]) == images
    shards = {shard for shard, _ in index["shards"].values()}
    assert {name.split("-")[2] for name in shards} == {"part000", "part001"}  # both processes wrote scans
    assert len({name.split("-")[1] for name in shards}) == 1  # in one round (one time stamp, from the main process)
    assert not list(double.features.glob("features-*.json"))  # the part indexes were merged away
    cache = FeatureCache.load(double.features)
    assert all(cache[image].patches.shape[1:] == (4, 4, 32) for image in images)  # 32 px / 8 px patches, width 32


# Feature cache ----------------------------------------------------------------------------------------------


def test_cached_features_give_the_loss_the_volumes_give(recipe):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    model.eval()
    samples = read_samples(recipe.data, "train")[:6]
    images = sorted({s.image for s in samples})

    def load(image):
        return load_volume(recipe.data / image)

    folder = recipe.root / "loss-cache"
    FeatureCache.build(model, images, load, progress=False).save(folder, shard_size=2)
    cached = FeatureCache.load(folder, encoder_fingerprint(model))
    objective = TrainingObjective(model, num_findings=0, finding_loss=0.0)
    losses = []
    for features in (cached, VolumeFeatures(model, load)):
        batch = Collator(tokenizer, features, model.config.image_token, model.config.num_visual_tokens, 256)(samples)
        with torch.no_grad():
            losses.append(objective(**batch).item())
    # The cache stores patches in float16: equal up to that rounding.
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def _counting_builds(monkeypatch) -> list:
    """Each scan `FeatureCache.build` encodes, as the cache is built: what a reused cache never does."""
    encoded, build = [], FeatureCache.build.__func__
    monkeypatch.setattr(FeatureCache, "build", classmethod(
        lambda cls, model, images, *args, **kwargs: encoded.extend(images) or build(cls, model, images, *args,
                                                                                      **kwargs)))
    return encoded


def test_a_feature_cache_of_older_preprocessing_is_encoded_again(recipe, tmp_path, monkeypatch):
    """Features cached from the encoder input of an older version are not this version's: encoded again."""
    import medvlm.features

    encoded = _counting_builds(monkeypatch)
    model, _ = build_tiny_model()
    images = sorted({s.image for s in read_samples(recipe.data, "train")})[:2]
    first = build_feature_cache(model, recipe.data, images, tmp_path)
    build_feature_cache(model, recipe.data, images, tmp_path)
    assert encoded == images  # the second call reused the cache
    monkeypatch.setattr(medvlm.features, "PREPROCESSING_VERSION", medvlm.features.PREPROCESSING_VERSION + 1)
    again = build_feature_cache(model, recipe.data, images, tmp_path)
    assert encoded == images * 2 and again.fingerprint != first.fingerprint
    assert json.loads((tmp_path / "features.json").read_text())["fingerprint"] == again.fingerprint


def test_a_scan_rewritten_in_place_is_encoded_again_not_served_from_the_cache(tmp_path, monkeypatch, capsys):
    """Phantoms made again under the same paths (or one M3D volume fixed): the cache must not hand the model
    the old scans' features, nor `train --features` train on them. A scan copied without its file time (cp -r)
    or touched is the same scan: neither encoded again nor refused. A cache from before stamps were kept is
    used, with a note, rather than encoded again (M3D's is over a terabyte)."""
    data = Path(write_phantom_set(tmp_path / "data", 2, seed=5, modalities=("ct",), formats=("nifti",), matrix=32,
                                  split="train")["out"])
    encoded = _counting_builds(monkeypatch)
    model, _ = build_tiny_model()
    images = sorted({s.image for s in read_samples(data, "train")})
    first = build_feature_cache(model, data, images, tmp_path / "features")
    before = {image: first[image].patches.clone() for image in images}
    build_feature_cache(model, data, images, tmp_path / "features")
    assert encoded == images  # reused while the scans are as they were
    shutil.rmtree(data)
    write_phantom_set(tmp_path / "data", 2, seed=6, modalities=("ct",), formats=("nifti",), matrix=32,
                      split="train")  # other phantoms, the same file names
    again = build_feature_cache(model, data, images, tmp_path / "features")
    assert encoded == images * 2 and any(not torch.equal(before[image], again[image].patches) for image in images)
    scan = nib.load(data / images[0])  # rewritten after the cache was made: mirrored
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[::-1].copy(), scan.affine, scan.header), data / images[0])
    with pytest.raises(UserInputError, match=r"1 of the 2 scans changed since the feature cache .* again"):
        scan_features(model, read_samples(data, "train"), data, tmp_path, tmp_path / "features", from_volumes=False)
    third = build_feature_cache(model, data, images, tmp_path / "features")
    assert encoded == [*images, *images, images[0]]  # only the rewritten scan: M3D's cache is a terabyte
    assert not torch.equal(third[images[0]].patches, again[images[0]].patches)
    assert torch.equal(third[images[1]].patches, again[images[1]].patches)
    index = json.loads((tmp_path / "features" / "features.json").read_text())
    shards = {path.name for path in (tmp_path / "features").glob("*.safetensors")}
    assert shards == {shard for shard, _ in index["shards"].values()}  # no shard left that nothing points to
    for image in images:  # copied without their times, or touched
        os.utime(data / image, ns=(0, (data / image).stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    scan_features(model, read_samples(data, "train"), data, tmp_path, tmp_path / "features", from_volumes=False)
    assert "note: 2 of the scans have other file times than when the feature cache" in capsys.readouterr().out
    build_feature_cache(model, data, images, tmp_path / "features")  # records their new times
    assert encoded == [*images, *images, images[0]]
    scan_features(model, read_samples(data, "train"), data, tmp_path, tmp_path / "features", from_volumes=False)
    assert "other file times" not in capsys.readouterr().out
    index = json.loads((tmp_path / "features" / "features.json").read_text())
    del index["stamps"]  # as a cache made before stamps were kept
    (tmp_path / "features" / "features.json").write_text(json.dumps(index))
    capsys.readouterr()
    scan_features(model, read_samples(data, "train"), data, tmp_path, tmp_path / "features", from_volumes=False)
    build_feature_cache(model, data, images, tmp_path / "features")
    assert encoded == [*images, *images, images[0]]
    assert capsys.readouterr().out.count("2 scan(s) encoded before file stamps were kept") == 2


def test_a_blank_scan_in_the_data_is_refused_by_name_not_trained_on(tmp_path):
    """An M3D volume of zeros (a failed export) would teach the model to write a report about nothing: the feature
    cache refuses it as `Pipeline.encode` refuses it in the app, naming the file to fix or drop."""
    data = Path(write_phantom_set(tmp_path / "data", 2, seed=5, modalities=("ct",), formats=("npy",), matrix=32,
                                  split="train")["out"])
    model, _ = build_tiny_model()
    images = sorted({s.image for s in read_samples(data, "train")})
    np.save(data / images[1], np.zeros_like(np.load(data / images[1])))
    with pytest.raises(UserInputError, match=rf"^{re.escape(images[1])}: the scan holds nothing for the model"):
        build_feature_cache(model, data, images, tmp_path / "features")


def test_features_refuses_what_it_cannot_encode(recipe, tmp_path, capsys):
    assert main(["features", "--checkpoint-or-preset", "demo", "--data", str(recipe.data), "--out", str(tmp_path)]) == 2
    assert "pre-trains its encoder" in capsys.readouterr().err
    assert main(["features", "--checkpoint-or-preset", "demo", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "M3D" in error


def test_a_preset_whose_hub_repo_cannot_be_fetched_stops_with_one_line(recipe, tmp_path, monkeypatch, capsys):
    preset = json.loads(recipe.preset.read_text())
    preset["encoder"]["pretrained"]["repo_id"] = "someorg/no-such-tower"
    (tmp_path / "bad.json").write_text(json.dumps(preset))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(recipe.hub))
    status = main(["features", "--checkpoint-or-preset", str(tmp_path / "bad.json"), "--data", str(recipe.data),
                   "--out", str(tmp_path / "features")])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1 and "someorg/no-such-tower" in error


def test_train_refuses_a_missing_feature_cache_and_two_sources(recipe, tmp_path, capsys):
    common = ["train", "--preset", str(recipe.preset), "--data", str(recipe.data), "--out", str(tmp_path / "out")]
    assert main([*common, "--features", str(tmp_path / "nothing")]) == 2
    assert "no feature cache" in capsys.readouterr().err
    assert main([*common, "--features", str(tmp_path), "--from-volumes"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


# Evaluation ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_sharded_over_two_processes_scores_as_one(single, recipe):
    args = ("eval", "--checkpoint", str(single), "--data", str(recipe.data), "--split", "train", "--limit", "3",
            "--max-new-tokens", "8")
    alone = run(*args, env=recipe.env)
    shared = run(*args, env=recipe.env, processes=2)
    assert len(shared.stdout.strip().splitlines()) == 1  # only the main process prints
    one, two = json.loads(alone.stdout), json.loads(shared.stdout)
    assert (one.pop("processes"), two.pop("processes")) == (1, 2)
    one.pop("seconds"), two.pop("seconds")
    assert one == two and one["n"] == 3


# Publishing -----------------------------------------------------------------------------------------------


class FakeHub:
    """HfApi's calls that push makes, recorded; an upload lands in a local Hub cache as a download would."""

    def __init__(self, cache: Path):
        self.cache, self.calls = cache, []
        self.private: dict[str, bool] = {}  # by repo id, the repos created

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        self.private.setdefault(repo_id, bool(kwargs.get("private")))  # an existing repo keeps its visibility

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(private=self.private[repo_id])

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        """The files huggingface_hub's own filter keeps, as the real upload sends them."""
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", repo_id, kwargs))
        folder, snapshot = Path(folder_path), hub_snapshot(self.cache, repo_id)
        files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
        for file in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / file, snapshot / file)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}")


@pytest.mark.slow
def test_push_uploads_the_checkpoint_with_its_card_and_the_app_loads_it_by_repo_id(single, recipe, tmp_path,
                                                                                   monkeypatch):
    checkpoint = shutil.copytree(single, tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    url = push_checkpoint(checkpoint, "someorg/medvlm-m3d", private=True, api=hub,
                          evaluation={"n": 1, "split": "test", "samples": 11, "closed_accuracy": 0.25,
                                      "weights_sha256": weights_digest(checkpoint)})
    assert url.endswith(COMMIT)
    assert hub.calls[0] == ("create_repo", "someorg/medvlm-m3d", {"repo_type": "model", "private": True,
                                                                  "exist_ok": True})
    card = (checkpoint / "README.md").read_text()
    for words in ("Not a medical device", "## Intended use", "## Limitations", QWEN_REPO, CLIP_REPO, "LoRA on the LM",
                  "| align | report |", "M3D-LaMed | 14.38 | 75.78", "| this checkpoint | not evaluated | 25.00 |",
                  "Pipeline.from_pretrained('someorg/medvlm-m3d')"):
        assert words in card, words
    uploaded = hub_snapshot(hub.cache, "someorg/medvlm-m3d")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in uploaded.iterdir()}

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub.cache))
    pipeline = Pipeline.from_pretrained("someorg/medvlm-m3d")
    assert pipeline.describe()["checkpoint"] == "someorg/medvlm-m3d" and not pipeline.describe()["demo"]
    assert "importing it registers the model type `medvlm`" in card  # as the card says:
    assert isinstance(AutoModelForImageTextToText.from_pretrained("someorg/medvlm-m3d"), MedVLMForConditionalGeneration)


def uploaded_card(hub: FakeHub, repo_id: str) -> str:
    return (hub_snapshot(hub.cache, repo_id) / "README.md").read_text()


def test_a_later_push_brings_its_evaluation_and_repo_id_to_the_card_push_wrote(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    push_checkpoint(checkpoint, "someorg/first", api=hub)
    assert "## Evaluation" not in uploaded_card(hub, "someorg/first")
    assert "| this checkpoint | not evaluated | not evaluated |" in uploaded_card(hub, "someorg/first")

    push_checkpoint(checkpoint, "someorg/first", api=hub, evaluation={
        "n": 3, "split": "test", "samples": 9, "closed_accuracy": 0.5, "report_meteor": 0.25,
        "weights_sha256": weights_digest(checkpoint), "checkpoint": str(checkpoint)})
    card = uploaded_card(hub, "someorg/first")
    assert "## Evaluation" in card and "| this checkpoint | 25.00 | 50.00 |" in card

    push_checkpoint(checkpoint, "someorg/second", api=hub)  # a retry elsewhere keeps the evaluation
    card = uploaded_card(hub, "someorg/second")
    assert "Pipeline.from_pretrained('someorg/second')" in card and "someorg/first" not in card
    assert "| this checkpoint | 25.00 | 50.00 |" in card
    assert card == (checkpoint / "README.md").read_text()
    assert str(tmp_path) not in card  # eval was given a local folder; the card's record keeps its name alone


def test_training_again_into_a_pushed_folder_leaves_no_card_of_the_old_weights(tmp_path, capsys):
    """The card push wrote names the evaluation of the weights it was pushed with; trained again into that folder,
    the card describes the new weights without those figures (and push takes the folder again), while a card of
    the user's own is left as it is, with a note."""
    torch.manual_seed(0)
    out = save_tiny_checkpoint(tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    push_checkpoint(out, "someorg/model", revision="v1", api=hub, evaluation={
        "n": 3, "split": "test", "samples": 9, "closed_accuracy": 0.5, "weights_sha256": weights_digest(out)})
    assert "## Evaluation" in (out / "README.md").read_text()
    data = tmp_path / "data"
    write_phantom_set(data, n=3, seed=5, formats=("nifti",), matrix=32)
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out)]) == 0
    assert "now describes these, without held-out figures" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "## Evaluation" not in card and "# MedVLM 3D demo checkpoint" in card  # the tiny preset's own, new
    assert "Pipeline.from_pretrained('someorg/model', revision='v1')" in card
    push_checkpoint(out, "someorg/model", revision="v1", api=hub)  # refused while the card held the old figures
    assert "## Evaluation" not in uploaded_card(hub, "someorg/model")

    (out / "README.md").write_text("# Our model\n\nTrained by us.\n")
    assert renew_card(out).endswith("is a model card of yours, left as it is: it may describe the weights trained "
                                    "before")
    assert (out / "README.md").read_text() == "# Our model\n\nTrained by us.\n"


def test_push_uploads_the_checkpoint_alone_and_says_what_it_left(tmp_path, capsys):
    """A work folder kept inside the checkpoint (its feature cache, optimizer states) or a stray file never goes up
    with it: the checkpoint's own files do, and push says what it left."""
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    (checkpoint / "wk" / "features").mkdir(parents=True)
    (checkpoint / "wk" / "features" / "features-00000.safetensors").write_bytes(b"cache")
    (checkpoint / "notes.txt").write_text("patient list")
    (checkpoint / ".gitattributes").write_text("*.safetensors filter=lfs")  # a clone's: not counted as left out
    hub = FakeHub(tmp_path / "hub")
    push_checkpoint(checkpoint, "someorg/model", api=hub)
    uploaded = {path.relative_to(hub_snapshot(hub.cache, "someorg/model")).as_posix()
                for path in hub_snapshot(hub.cache, "someorg/model").rglob("*") if path.is_file()}
    assert uploaded == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                        "chat_template.jinja", "README.md"}  # the card push wrote, and what save_pretrained wrote
    assert "note: 2 file(s) in" in capsys.readouterr().err


def test_push_never_shows_figures_of_other_weights(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    scores = {"n": 3, "split": "test", "samples": 9, "closed_accuracy": 0.5, "max_new_tokens": 64,
              "revision": "v1", "commit": COMMIT, "weights_sha256": weights_digest(checkpoint)}
    push_checkpoint(checkpoint, "someorg/model", revision="v1", api=hub, evaluation=scores)
    card = uploaded_card(hub, "someorg/model")
    assert f"at commit `{COMMIT}` (`v1`), greedy decoding, at most 64 new tokens" in card
    assert "Pipeline.from_pretrained('someorg/model', revision='v1')" in card

    card = checkpoint / "README.md"  # as push wrote it before it recorded the weights
    body, mark = card.read_text().rsplit(CARD_MARK, 1)
    record = json.loads(mark.strip().removesuffix("-->"))
    record.pop("weights")
    card.write_text(f"{body}{CARD_MARK}{json.dumps(record)} -->\n")
    with pytest.raises(UserInputError, match=r"is not known to score the weights"):
        push_checkpoint(checkpoint, "someorg/model", api=hub)  # which weights those figures scored is unknown

    torch.manual_seed(1)
    save_tiny_checkpoint(checkpoint)  # trained again into the same folder
    hub.calls.clear()
    with pytest.raises(UserInputError, match=r"scored another checkpoint than .* holds"):
        push_checkpoint(checkpoint, "someorg/model", api=hub, evaluation=scores)
    with pytest.raises(UserInputError, match=r"is not known to score the weights.*evaluate it again"):
        push_checkpoint(checkpoint, "someorg/model", api=hub)  # the card's figures would be carried over
    assert hub.calls == []
    retrained = scores | {"closed_accuracy": 0.75, "weights_sha256": weights_digest(checkpoint)}
    push_checkpoint(checkpoint, "someorg/model", api=hub, evaluation=retrained)
    assert "| this checkpoint | not evaluated | 75.00 |" in uploaded_card(hub, "someorg/model")


def test_the_card_gives_the_command_that_trained_it_without_the_trainers_folders(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    training = json.loads((ROOT / "assets" / "demo-model" / "training.json").read_text())
    training |= {"data": "/home/someone/data/phantoms", "invocations": 2, "wall_seconds": 600.0,
                 "options": {"work": "/scratch/someone/run-work", "features": None, "from_volumes": True}}
    (checkpoint / "training.json").write_text(json.dumps(training))
    hub = FakeHub(tmp_path / "hub")
    push_checkpoint(checkpoint, "someorg/model", api=hub)
    card = uploaded_card(hub, "someorg/model")
    assert ("python -m medvlm train --preset demo --data phantoms --out checkpoint --seed 0 --work run-work "
            "--from-volumes") in card
    assert "wall time 10.0 minutes on the machine that trained it, over 2 runs of the command" in card
    assert "/home/someone" not in card and "/scratch" not in card
    uploaded = (hub_snapshot(hub.cache, "someorg/model") / "training.json").read_text()  # published with it
    assert "/home/someone" not in uploaded and "/scratch" not in uploaded and '"data": "phantoms"' in uploaded


def test_push_takes_only_an_evaluation_of_this_very_checkpoint(tmp_path, capsys):
    """The digest covers config.json: the same weights with another slice selection score differently. An
    evaluation that names no weights, or is no eval JSON at all, is refused too."""
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    scores = {"n": 3, "split": "test", "samples": 9, "closed_accuracy": 0.5,
              "weights_sha256": weights_digest(checkpoint)}
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"slice_selection": "uniform"}))
    with pytest.raises(UserInputError, match=r"another checkpoint .*\(other weights, config.json or tokenizer, or"):
        push_checkpoint(checkpoint, "someorg/model", api=hub, evaluation=scores)
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")  # another prompt format
    with pytest.raises(UserInputError, match=r"another checkpoint"):
        push_checkpoint(checkpoint, "someorg/model", api=hub, evaluation=scores)
    with pytest.raises(UserInputError, match=r"does not say which weights it scored"):
        push_checkpoint(checkpoint, "someorg/model", api=hub, evaluation={"n": 5, "closed_accuracy": "high"})
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["push", str(checkpoint), "someorg/model", "--evaluation", str(tmp_path / "list.json")]) == 2
    assert "is not the JSON object `python -m medvlm eval` prints" in capsys.readouterr().err
    assert hub.calls == []


def test_a_private_push_to_a_public_repo_is_refused_before_uploading(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    push_checkpoint(checkpoint, "someorg/model", api=hub)
    hub.calls.clear()
    with pytest.raises(UserInputError, match=r"'someorg/model' is public.*make it private on the Hub first"):
        push_checkpoint(checkpoint, "someorg/model", private=True, api=hub)
    assert [call[0] for call in hub.calls] == ["create_repo"]  # nothing uploaded
    assert not hub.private["someorg/model"]
    push_checkpoint(checkpoint, "someorg/private", private=True, api=hub)
    assert hub.private["someorg/private"] and hub.calls[-1][0] == "upload_folder"
    hub.private["someorg/unsaid"] = None  # a repo whose visibility the Hub's answer leaves out
    with pytest.raises(UserInputError, match="or the Hub does not say it is private"):
        push_checkpoint(checkpoint, "someorg/unsaid", private=True, api=hub)


@pytest.mark.parametrize("by_hand", ["written", "edited"])
def test_push_will_not_replace_a_card_written_or_edited_by_hand(by_hand, tmp_path):
    torch.manual_seed(0)
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    hub = FakeHub(tmp_path / "hub")
    if by_hand == "written":
        (checkpoint / "README.md").write_text("# Our model\n\nTrained by us; see our paper.\n")
    else:
        push_checkpoint(checkpoint, "someorg/model", api=hub)
        card = (checkpoint / "README.md").read_text()
        (checkpoint / "README.md").write_text(card.replace("## Intended use", "Trained by us.\n\n## Intended use"))
        hub.calls.clear()
    card = (checkpoint / "README.md").read_text()
    with pytest.raises(UserInputError, match=r"README.md' was not written by push or has been edited.*--evaluation"):
        push_checkpoint(checkpoint, "someorg/model", api=hub, evaluation={"n": 3, "closed_accuracy": 0.5,
                                                                          "weights_sha256": weights_digest(checkpoint)})
    assert hub.calls == [] and (checkpoint / "README.md").read_text() == card  # nothing uploaded or changed

    push_checkpoint(checkpoint, "someorg/model", api=hub)  # without --evaluation: uploaded as it is
    assert uploaded_card(hub, "someorg/model") == card


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["push", str(tmp_path), "someorg/model"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "config.json" in error
    assert main(["push", str(tmp_path / "missing"), "someorg/model"]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


def test_push_says_in_one_line_why_the_hub_refused(tmp_path):
    class Unauthorised(FakeHub):
        def create_repo(self, repo_id, **kwargs):
            raise PermissionError("401 Client Error: Unauthorized\nInvalid credentials in Authorization header")

    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserInputError, match=r"'someorg/model'.*401 Client Error: Unauthorized\); check HF_TOKEN"):
        push_checkpoint(tmp_path, "someorg/model", api=Unauthorised(tmp_path / "hub"))


def test_push_refuses_a_bad_repo_id(tmp_path, capsys):
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["push", str(tmp_path), "not a repo id"]) == 2
    assert "org/name" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()  # nothing written before the input is known good


# The accelerate configurations the README names ---------------------------------------------------------


def test_accelerate_configs_load_and_the_readme_names_only_those():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": ("MULTI_GPU", 8, 1), "ddp-2nodes": ("MULTI_GPU", 16, 2), "deepspeed-zero2": ("DEEPSPEED", 8, 1),
                "fsdp": ("FSDP", 8, 1)}
    folder = ROOT / "assets" / "accelerate"
    assert {path.stem for path in folder.glob("*.yaml")} == set(expected)
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(folder / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
        assert config.mixed_precision == "bf16"
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"assets/accelerate/([\w-]+)\.yaml", readme))
    assert named == set(expected)
    for preset in re.findall(r"--preset (m3d-[\w-]+)", readme):
        assert (PRESETS / f"{preset}.json").exists()
