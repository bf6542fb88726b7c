"""The ablation study's machinery: each switch removes its stage, the 3D baseline trains, the
small-lesion split, the data subsets, the summary, and `python -m medvlm ablate` end to end (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import tiny_config, tiny_tokenizer

import medvlm.modeling
from medvlm.ablation import SIZES, Run, plan, summarise, summary_table, training_subset
from medvlm.compressor import CrossAttentionBlock, DetailPreservingCompressor
from medvlm.data import CAP_FILE, GROUND_TRUTH_FILE, VQA_FILES
from medvlm.encoder import SliceEncoder
from medvlm.encoder3d import VolumeViT
from medvlm.errors import UserInputError
from medvlm.features import FeatureCache
from medvlm.fusion import SpatialFrequencyFusion
from medvlm.model_card import write_model_card
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.phantom import make_phantom, write_phantom_set
from medvlm.pipeline import Pipeline
from medvlm.preprocess import encoder_input
from medvlm.train import Collator, TrainingObjective, load_preset, read_samples, set_trainable, train
from medvlm.variants import VARIANTS, apply_overrides, variant_overrides
from medvlm.volume import Volume, load_volume

ROOT = Path(__file__).resolve().parent.parent
TINY_VOLUME = SIZES["tiny"].model_overrides  # an 8×32×32 volume in 2×8×8 patches: a 4×4×4 grid


def tiny_variant(variant: str) -> MedVLMForConditionalGeneration:
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    return MedVLMForConditionalGeneration(tiny_config(tokenizer, **TINY_VOLUME, **VARIANTS[variant]))


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_types(model: torch.nn.Module) -> set[type]:
    return {type(module) for module in model.modules()}


def ct_volume(slices: int = 30) -> Volume:
    data = np.random.default_rng(0).normal(0, 300, size=(slices, 40, 48)).astype(np.float32)
    return Volume(data, (2.0, 1.0, 1.0), np.eye(4), "CT", "nifti", "RAS")


@pytest.fixture(scope="module")
def variants() -> dict[str, MedVLMForConditionalGeneration]:
    return {name: tiny_variant(name) for name in VARIANTS}


# Each switch removes its stage ---------------------------------------------------------------------

def test_fusion_switches_remove_their_paths_and_only_them(variants):
    full = variants["full"]
    expected = {"spatial_only": {"gate", "frequency_filter"}, "frequency_only": {"gate", "spatial"},
                "average_fusion": {"gate"}}
    present = {name.split(".")[0] for name, _ in full.fusion.named_parameters()}
    for variant, removed in expected.items():
        model = variants[variant]
        names = {name.split(".")[0] for name, _ in model.fusion.named_parameters()}
        assert names == present - removed, variant
        removed_count = sum(p.numel() for name, p in full.fusion.named_parameters() if name.split(".")[0] in removed)
        assert parameters(full) - parameters(model) == removed_count, variant
        for part in ("slice_encoder", "compressor", "multi_modal_projector", "language_model"):  # everything else equal
            assert parameters(getattr(model, part)) == parameters(getattr(full, part)), (variant, part)


def test_average_pooling_compressor_has_no_cross_attention(variants):
    full, pooled = variants["full"], variants["average_compressor"]
    assert CrossAttentionBlock in module_types(full) and CrossAttentionBlock not in module_types(pooled)
    assert parameters(pooled.compressor) < parameters(full.compressor)
    assert parameters(full) - parameters(pooled) == parameters(full.compressor) - parameters(pooled.compressor)
    assert parameters(pooled.fusion) == parameters(full.fusion)


def test_uniform_selection_never_calls_the_selector(variants, monkeypatch):
    def selector_called(*args, **kwargs):
        raise AssertionError("the slice selector ran")

    monkeypatch.setattr(medvlm.modeling, "select_slices", selector_called)
    pixel_values, heights = encoder_input(ct_volume(), variants["full"].config)
    with pytest.raises(AssertionError, match="selector ran"):  # the patch bites where selection is on
        variants["full"].choose_slices(pixel_values, heights)
    uniform = variants["uniform_selection"]
    with torch.no_grad():
        scan = uniform.choose_slices(pixel_values, heights)
        tokens = uniform.visual_tokens_from_slices([scan]).visual_tokens
    budget = uniform.config.slice_budget
    assert scan.kept.tolist() == np.linspace(0, pixel_values.shape[0] - 1, budget).round().astype(int).tolist()
    assert scan.encoded == budget and scan.previewed == 0  # only the K slices it keeps went through the encoder
    assert tokens.shape == (1, uniform.config.num_visual_tokens, uniform.config.text_config.hidden_size)
    assert parameters(uniform) == parameters(variants["full"])  # selection has no weights: nothing else differs


def test_3d_baseline_replaces_stages_1_to_4_and_keeps_projector_and_lm(variants):
    full, vit3d = variants["full"], variants["vit3d"]
    gone = {SliceEncoder, SpatialFrequencyFusion, DetailPreservingCompressor}
    assert gone <= module_types(full) and not gone & module_types(vit3d)
    assert VolumeViT in module_types(vit3d) and VolumeViT not in module_types(full)
    for part in ("multi_modal_projector", "language_model"):
        assert parameters(getattr(vit3d, part)) == parameters(getattr(full, part))
    assert vit3d.config.num_visual_tokens == full.config.num_visual_tokens
    assert all(p.requires_grad for p in vit3d.volume_encoder.parameters())  # trained from scratch, not frozen
    pixel_values, heights = encoder_input(ct_volume(), vit3d.config)
    with torch.no_grad():
        scan = vit3d.choose_slices(pixel_values, heights)
        tokens = vit3d.visual_tokens_from_slices([scan]).visual_tokens
    assert tuple(scan.patches.shape) == (*TINY_VOLUME["volume_shape"], 3)  # the cached input: (D, H, W, C)
    assert scan.encoded == 0 and scan.kept.tolist() == list(range(pixel_values.shape[0]))
    assert tokens.shape == (1, vit3d.config.num_visual_tokens, vit3d.config.text_config.hidden_size)


def test_variant_overrides_and_the_3d_baseline_preset():
    assert variant_overrides("average_compressor", ["compressor_layers=3"]) == {"compressor_mode": "average",
                                                                               "compressor_layers": 3}
    with pytest.raises(ValueError, match="unknown variant"):
        variant_overrides("no_fusion")
    with pytest.raises(ValueError, match="not a MedVLMConfig setting"):
        variant_overrides(None, ["fusion=off"])
    preset = load_preset("ablation")
    baseline = apply_overrides(preset, VARIANTS["vit3d"])
    assert "encoder_pretraining" not in baseline and "encoder_pretraining" in preset  # the original is untouched
    for stage, original in zip(baseline["stages"], preset["stages"], strict=True):
        assert "fusion" not in stage["trainable"] and "compressor" not in stage["trainable"]
        assert stage["epochs"] == original["epochs"] and stage["batch_size"] == original["batch_size"]
        assert ("volume_encoder" in stage["trainable"]) == ("fusion" in original["trainable"])


def test_ablation_preset_is_the_demo_recipe_with_its_documented_changes():
    """Only the documented differences: so the study's findings are about the demo recipe."""
    demo, ablation = load_preset("demo"), load_preset("ablation")
    volume_settings = {"volume_shape", "volume_patch", "volume_layers", "volume_heads"}
    assert {k: v for k, v in ablation["model"].items() if k not in volume_settings} == demo["model"]
    probe, *stages = ablation["stages"]
    demo_probe, *demo_stages = demo["stages"]
    assert {**probe, "epochs": demo_probe["epochs"], "lr": demo_probe["lr"]} == demo_probe
    assert (probe["epochs"], probe["lr"]) == (30, 0.001)  # the demo's 360 probe steps on 192 scans, in 12-step epochs
    for stage, demo_stage in zip(stages, demo_stages, strict=True):
        assert {**stage, "epochs": demo_stage["epochs"]} == demo_stage
        assert stage["epochs"] <= demo_stage["epochs"]
    strip = ("description", "stages", "model")
    assert {k: v for k, v in ablation.items() if k not in strip} == {k: v for k, v in demo.items() if k not in strip}
    config = tiny_config(tiny_tokenizer(), **{k: ablation["model"][k] for k in volume_settings},
                         compressor_grid=ablation["model"]["compressor_grid"], visual_path="vit3d")
    assert config.volume_grid == (8, 8, 8)  # 512 patch tokens, pooled to the 4×4×4 visual tokens


# The 3D baseline trains ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(folder, n=6, seed=3, formats=("nifti",), matrix=48)
    return folder


def test_3d_baseline_loss_falls_in_a_few_steps(phantoms):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = MedVLMForConditionalGeneration(tiny_config(tokenizer, **TINY_VOLUME, visual_path="vit3d"))
    samples = [s for s in read_samples(phantoms, "train") if s.task == "report"][:4]
    cache = FeatureCache.build(model, [s.image for s in samples], lambda image: load_volume(phantoms / image),
                               progress=False)
    batch = Collator(tokenizer, cache, model.config.image_token, model.config.num_visual_tokens, 256)(samples)
    objective = TrainingObjective(model, num_findings=0, finding_loss=0.0)
    trainable = set_trainable(model, ["volume_encoder", "projector", "language_model"])
    before = {name: p.detach().clone() for name, p in model.volume_encoder.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(12):
        loss = objective(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(not torch.equal(before[name], p) for name, p in model.volume_encoder.named_parameters())


def test_3d_baseline_trains_end_to_end_and_the_pipeline_reads_it(phantoms, tmp_path):
    checkpoint = train("tiny", phantoms, tmp_path / "vit3d", seed=0, work=tmp_path / "work",
                       config_overrides={**TINY_VOLUME, **VARIANTS["vit3d"]})
    summary = json.loads((checkpoint / "training.json").read_text())
    assert summary["config_overrides"]["visual_path"] == "vit3d" and summary["encoder_pretraining"] == {}
    pipeline = Pipeline.from_pretrained(checkpoint)
    assert isinstance(pipeline.model.volume_encoder, VolumeViT)
    volume = load_volume(phantoms / "ct" / "phantom_00000.nii.gz")
    report = "".join(pipeline.report(volume, max_new_tokens=4))
    assert report and report == "".join(pipeline.report(volume, max_new_tokens=4))  # 4 tokens, the same each time
    card = write_model_card(checkpoint, "python -m medvlm train ...").read_text()  # describes the model it is
    assert "a 3D ViT trained from scratch" in card and "3D ViT: trained from scratch in the stages" in card
    assert not any(words in card for words in ("Slice encoder", "Slice selection", "Fusion", "slice_budget"))


# The small-lesion split ---------------------------------------------------------------------------

def test_small_lesion_split_has_only_2_to_8_mm_lesions(tmp_path):
    from medvlm.__main__ import main

    assert main(["phantom", str(tmp_path), "--n", "8", "--seed", "11", "--modality", "ct,mr", "--matrix", "128",
                 "--format", "nifti", "--split", "test", "--lesion-size", "2,8"]) == 0
    truth = json.loads((tmp_path / GROUND_TRUTH_FILE).read_text())
    sizes = [lesion["diameter_mm"] for scan in truth.values() for lesion in scan["lesions"]]
    assert len(sizes) >= 4 and all(2 <= size <= 8 for size in sizes)
    reports = [(tmp_path / image).with_name(Path(image).name.split(".")[0] + ".txt").read_text() for image in truth]
    assert any("mm" in report for report in reports)


def test_lesion_size_leaves_the_default_phantoms_alone():
    default, again = make_phantom([11, 0], "ct", matrix=64), make_phantom([11, 0], "ct", matrix=64,
                                                                            lesion_size_mm=None)
    assert np.array_equal(default.data, again.data) and default.report == again.report
    sizes = [lesion.diameter_mm for seed in range(12) for lesion in make_phantom([11, seed], "ct", matrix=128).lesions]
    assert max(sizes) > 8  # without the range, lesions up to 40 mm


# Data subsets, plan and summary -------------------------------------------------------------------

def test_training_subsets_are_nested_stratified_and_keep_validation(tmp_path):
    pool = tmp_path / "pool"
    write_phantom_set(pool, n=30, seed=5, formats=("npy",), npy_shape=(4, 8, 8), matrix=32)
    pool_train = {item["image"] for item in json.loads((pool / CAP_FILE).read_text())["train"]}
    kept = {}
    for fraction in (0.1, 0.5):
        folder = training_subset(pool, fraction, tmp_path / f"f{fraction}")
        captions = json.loads((folder / CAP_FILE).read_text())
        kept[fraction] = {item["image"] for item in captions["train"]}
        assert captions["validation"] == json.loads((pool / CAP_FILE).read_text())["validation"]
        assert {s.image for s in read_samples(folder, "train")} == kept[fraction]  # VQA rows follow the captions
        assert all((folder / image).exists() for image in kept[fraction])
        assert (folder / VQA_FILES["validation"]).read_text() == (pool / VQA_FILES["validation"]).read_text()
    assert kept[0.1] < kept[0.5] < pool_train
    assert {image.split("/")[0] for image in kept[0.1]} == {"ct", "mr", "pt"}  # every modality, even at 10 %
    assert len(kept[0.5]) == pytest.approx(len(pool_train) / 2, abs=2)
    assert training_subset(pool, 1.0, tmp_path / "all") == pool


def test_plan_compares_every_variant_per_seed_and_the_curve():
    runs = plan(SIZES["small"], seeds=2)
    assert {(r.variant, r.seed) for r in runs if r.fraction == 1.0} == {(v, s) for v in VARIANTS for s in (0, 1)}
    assert {(r.variant, r.fraction) for r in runs if r.fraction < 1.0} == {
        (v, f) for v in ("full", "vit3d") for f in (0.1, 0.25, 0.5)}
    assert len(runs) == len({r.name for r in runs}) == 26
    assert Run("vit3d", 1, 0.25).name == "vit3d-025pct-seed1"


def test_plan_finishes_one_seed_before_the_next():
    runs = plan(SIZES["small"], seeds=2)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)


def test_a_checkout_holding_the_results_goes_on_where_they_stop(tmp_path, monkeypatch):
    """ablations.json is the ledger: its runs are not trained again, the missing ones are."""
    import medvlm.ablation as ablation

    planned = plan(SIZES["tiny"], seeds=1)
    recorded = [{"variant": r.variant, "seed": r.seed, "fraction": r.fraction, "name": r.name, "train_scans": 9,
                 "metrics": {"finding_f1": 0.5, "closed_accuracy": 0.5}, "wall_seconds": {"total": 1.0}}
                for r in planned]
    out = tmp_path / "results"
    out.mkdir()
    (out / "ablations.json").write_text(json.dumps({"study": {"size": "tiny"}, "runs": recorded[:-1]}))
    trained = []
    monkeypatch.setattr(ablation, "run_one", lambda run, *args: trained.append(run.name) or recorded[-1])
    result = ablation.run_study(out, size="tiny", seeds=1, work=tmp_path / "work", progress=False)
    assert trained == [planned[-1].name] and result["complete"]
    assert [r["name"] for r in result["runs"]] == [r.name for r in planned]
    # Run again once finished: the table, without its phantoms made again (1.5 GB for the small study)
    monkeypatch.setattr(ablation, "write_study_data", lambda *args: pytest.fail("the study's data made again"))
    again = ablation.run_study(out, size="tiny", seeds=1, work=tmp_path / "work", progress=False)
    assert again == json.loads(json.dumps(result)) == json.loads((out / "ablations.json").read_text())


def test_a_study_never_replaces_finished_runs_it_does_not_plan(tmp_path, monkeypatch):
    """Hours of finished runs are kept: another study size, or fewer seeds, in the same OUT is refused before
    anything is trained or written."""
    import medvlm.ablation as ablation

    two_seeds = plan(SIZES["tiny"], seeds=2)
    recorded = [{"variant": r.variant, "seed": r.seed, "fraction": r.fraction, "name": r.name} for r in two_seeds]
    out = tmp_path / "results"
    out.mkdir()
    ledger = json.dumps({"study": {"size": "tiny", "seeds": [0, 1]}, "runs": recorded})
    (out / "ablations.json").write_text(ledger)
    monkeypatch.setattr(ablation, "run_one", lambda *args: pytest.fail("trained a run"))
    with pytest.raises(UserInputError, match=r"holds 9 finished runs this study does not plan .*--seeds 2"):
        ablation.run_study(out, size="tiny", seeds=1, work=tmp_path / "work", progress=False)
    with pytest.raises(UserInputError, match=r"holds the results of the 'tiny' study \(18 runs\).*another --out"):
        ablation.run_study(out, size="small", seeds=2, work=tmp_path / "work", progress=False)
    assert (out / "ablations.json").read_text() == ledger and not (tmp_path / "work").exists()

    renamed = json.dumps({"study": {"size": "tiny", "seeds": [0, 1]},
                          "runs": [*recorded, {"name": "gone-variant-100pct-seed0"}]})
    (out / "ablations.json").write_text(renamed)  # a run of a variant this version no longer has: no seed count helps
    with pytest.raises(UserInputError, match=r"holds 1 finished run .*gone-variant.*not runs of this") as err:
        ablation.run_study(out, size="tiny", seeds=2, work=tmp_path / "work", progress=False)
    assert "--seeds" not in str(err.value)


def test_summary_is_mean_and_sample_sd_over_seeds():
    def record(variant, seed, fraction, f1, scans):
        return {"variant": variant, "seed": seed, "fraction": fraction, "train_scans": scans,
                "metrics": {"finding_f1": f1, "closed_accuracy": 0.5, "small_lesion_recall": None}}

    records = [record("full", 0, 1.0, 0.6, 100), record("full", 1, 1.0, 0.8, 100), record("vit3d", 0, 0.1, 0.2, 10)]
    summary = summarise(records)
    f1 = summary["headline"]["full"]["finding_f1"]
    assert f1["mean"] == pytest.approx(0.7) and f1["std"] == pytest.approx(np.std([0.6, 0.8], ddof=1)) and f1["n"] == 2
    assert summary["headline"]["full"]["small_lesion_recall"] == {"mean": None, "std": None, "n": 0}
    assert "vit3d" not in summary["headline"]  # no full-data run of it yet
    assert summary["data_efficiency"]["vit3d"]["0.1"]["train_scans"] == 10
    assert summary["data_efficiency"]["vit3d"]["0.1"]["finding_f1"]["std"] is None  # one seed: no error bar


def test_probe_figure_is_the_probe_stages_last_validation_loss(tmp_path):
    from medvlm.train import MetricsLog, probe_validation_loss

    log = MetricsLog(tmp_path / "metrics.csv", enabled=True)
    assert probe_validation_loss(tmp_path) is None  # a preset without a probe stage
    log.write(stage="probe", epoch=0, step=12, loss=0.4, val_loss=0.22)
    log.write(stage="probe", epoch=1, step=20, loss=0.3)  # a step row: no validation
    log.write(stage="probe", epoch=1, step=24, loss=0.2, val_loss=0.15)
    log.write(stage="align", epoch=0, step=12, loss=6.0, val_loss=5.0)
    assert probe_validation_loss(tmp_path) == 0.15


def test_image_blind_floor_is_every_scan_read_as_normal(tmp_path):
    from medvlm.ablation import image_blind_reference

    write_phantom_set(tmp_path / "pool", n=10, seed=8, formats=("npy",), matrix=48)
    write_phantom_set(tmp_path / "heldout", n=8, seed=9, formats=("npy",), matrix=48, split="test")
    floor = image_blind_reference({"train": tmp_path / "pool", "heldout": tmp_path / "heldout"})
    truth = json.loads((tmp_path / "heldout" / GROUND_TRUTH_FILE).read_text())
    normal = sum(not entry["lesions"] for entry in truth.values())
    lesions = sum(len(entry["lesions"]) for entry in truth.values())
    precision, recall = normal / len(truth), normal / (normal + lesions)  # one "normal" label per normal scan
    assert floor["finding_f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert 0 < floor["probe_val_bce"] < float("inf")  # a finding only the validation scans hold costs, but finitely
    assert 0 < floor["probe_val_bce_modality"] < float("inf")


# The command, end to end --------------------------------------------------------------------------

@pytest.mark.slow
def test_ablate_runs_end_to_end_and_resumes(tmp_path):
    command = [sys.executable, "-m", "medvlm", "ablate", "--size", "tiny", "--seeds", "1", "--out",
               str(tmp_path / "results"), "--work", str(tmp_path / "work")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "ablations.json").read_text())
    assert result["complete"] and result["study"]["size"] == "tiny"
    assert {"phantoms", "seeds", "variants", "machine", "planned_runs", "image_blind"} <= set(result["study"])
    assert {(r["variant"], r["fraction"]) for r in result["runs"]} == {
        *((v, 1.0) for v in VARIANTS), ("full", 0.5), ("vit3d", 0.5)}
    for run in result["runs"]:
        assert {"variant", "seed", "fraction", "train_scans", "metrics", "wall_seconds"} <= set(run)
        assert {"finding_f1", "closed_accuracy", "small_lesion_recall", "encoded_fraction",
                "encoder_work"} <= set(run["metrics"])
        assert run["wall_seconds"]["total"] > 0
    headline = result["summary"]["headline"]
    assert set(headline) == set(VARIANTS) and set(headline["full"]["finding_f1"]) == {"mean", "std", "n"}
    assert headline["vit3d"]["encoded_fraction"]["n"] == 0  # no 2D encoder in the 3D baseline
    assert 0 < headline["uniform_selection"]["encoded_fraction"]["mean"] <= 1
    assert set(result["summary"]["data_efficiency"]) == {"full", "vit3d"}
    assert (tmp_path / "results" / "data_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `full` |" in (tmp_path / "results" / "ablations.log").read_text()

    scores = sorted((tmp_path / "work" / "tiny" / "runs").glob("*/scores.json"))
    stamps = [path.stat().st_mtime for path in scores]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [path.stat().st_mtime for path in scores] == stamps  # nothing trained or scored twice
    assert json.loads((tmp_path / "results" / "ablations.json").read_text())["runs"] == result["runs"]


def test_readme_quotes_the_committed_study():
    """The README's tables are the committed run's own summary, and that summary is its ablations.json's."""
    results = ROOT / "assets" / "results"
    log = (results / "ablations.log").read_text()
    assert log == summary_table(json.loads((results / "ablations.json").read_text())) + "\n"
    readme = (ROOT / "README.md").read_text()
    assert [line for line in log.splitlines() if line.startswith("|") and line not in readme] == []
    assert (results / "data_efficiency.png").stat().st_size > 0
