"""Training, the feature cache and evaluation, end to end on a tiny preset and a few phantoms."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny_model import tiny_config, tiny_tokenizer

from medvlm.__main__ import main
from medvlm.data import GROUND_TRUTH_FILE, Sample
from medvlm.errors import UserInputError
from medvlm.features import FeatureCache
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.phantom import write_phantom_set
from medvlm.pipeline import Pipeline
from medvlm.train import (
    ScanGroupedBatches,
    finding_targets,
    load_preset,
    probe_floors,
    read_samples,
    save_epoch_state,
    stage_seed,
    train,
)
from medvlm.volume import load_volume

ROOT = Path(__file__).resolve().parent.parent
EVAL_KEYS = {"closed_accuracy", "open_rouge1", "report_bleu1", "report_rouge1", "report_meteor", "report_bertscore",
             "finding_f1", "finding_recall_small", "finding_recall_large", "size_mae_mm", "n"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(folder, n=9, seed=3, formats=("nifti",), matrix=64)
    return folder


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "checkpoint"
    train("tiny", phantoms, out, seed=0)
    return out


def test_training_writes_a_checkpoint_the_pipeline_loads(trained, phantoms):
    assert (trained / "model.safetensors").exists() and (trained / "tokenizer.json").exists()
    # The weights are as readable as the rest (transformers writes them for this account alone): an app run by
    # another account can load them
    assert (trained / "model.safetensors").stat().st_mode & 0o777 == (trained / "config.json").stat().st_mode & 0o777
    summary = json.loads((trained / "training.json").read_text())
    assert summary["train_scans"] >= 5 and summary["encoder_pretraining"]["slices"] > 0
    pipeline = Pipeline.from_pretrained(trained)
    assert pipeline.model.slice_encoder.frozen
    assert pipeline.describe()["demo"] is True
    volume = load_volume(phantoms / "ct" / "phantom_00000.nii.gz")
    report = "".join(pipeline.report(volume, max_new_tokens=8))
    # The tiny preset learns little (its greedy report is blank lines), but the checkpoint answers: 8 new tokens,
    # the same ones each time.
    assert report and report == "".join(pipeline.report(volume, max_new_tokens=8))


def test_training_resumes_instead_of_starting_again(trained, phantoms):
    work = trained.with_name(trained.name + "-training")
    log = (work / "metrics.csv").read_text().splitlines()
    assert {"align", "instruct"} <= {line.split(",")[0] for line in log[1:]}
    assert (work / "state" / "instruct" / "done.json").exists()
    before = load_file(trained / "model.safetensors")
    again = train("tiny", phantoms, trained, seed=0)
    assert again == trained
    after = load_file(trained / "model.safetensors")  # the trained stages' weights, loaded, not drawn afresh
    assert set(after) == set(before) and [key for key in before if not torch.equal(before[key], after[key])] == []
    assert (work / "metrics.csv").read_text().splitlines() == log  # no stage trained twice


@pytest.mark.slow  # three training runs
def test_a_resumed_run_trains_the_same_weights_as_one_from_nothing(phantoms, tmp_path):
    """The same command gives the same checkpoint whether it ran once or was stopped and run again: with the
    encoder taken from its cache, or a stage loaded from its saved weights before a stage that draws random
    numbers (here its findings probe)."""
    preset = load_preset("tiny")
    for stage in preset["stages"]:
        stage["finding_loss"] = 1.0  # the probe's head is drawn at each stage's start
    probed = tmp_path / "tiny-probed.json"
    probed.write_text(json.dumps(preset))
    train(str(probed), phantoms, tmp_path / "once", seed=0)
    for name, kept in (("encoder-cached", "encoder"), ("stage-resumed", "state/align")):
        shutil.copytree(tmp_path / "once-training" / kept, tmp_path / f"{name}-training" / kept)
        shutil.copy(tmp_path / "once-training" / "run.json", tmp_path / f"{name}-training")
        train(str(probed), phantoms, tmp_path / name, seed=0)
    once = load_file(tmp_path / "once" / "model.safetensors")
    for name in ("encoder-cached", "stage-resumed"):
        again = load_file(tmp_path / name / "model.safetensors")
        assert [key for key in once if not torch.equal(once[key], again[key])] == [], name


@pytest.mark.slow  # two training runs
def test_stages_trained_on_an_encoder_pre_trained_again_are_not_resumed(phantoms, tmp_path):
    """The scans rewritten under the same paths (here every volume mirrored): the same command pre-trains the slice
    encoder again, and the stages trained on the old encoder's features are refused rather than saved with it."""
    data = shutil.copytree(phantoms, tmp_path / "data")
    out = tmp_path / "checkpoint"
    train("tiny", data, out, seed=0)
    mirror_volumes(data)
    with pytest.raises(UserInputError, match=r"holds stages trained on the features of another slice encoder "
                                              r"\(pre-trained again: the scans changed since\), and they"):
        train("tiny", data, out, seed=0)
    shutil.rmtree(tmp_path / "checkpoint-training" / "state")  # as the message says: the stages train again
    assert train("tiny", data, out, seed=0) == out
    touch_volumes(data)  # copied without their times (cp -r): the same scans, resumed
    assert train("tiny", data, out, seed=0) == out


def mirror_volumes(data: Path) -> None:
    """Rewrite every NIfTI volume of `data` under its path, mirrored: other scans."""
    for volume in sorted(data.rglob("*.nii.gz")):
        image = nib.load(volume)
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine, image.header), volume)


def touch_volumes(data: Path) -> None:
    """Give every NIfTI volume of `data` a later file time, as a copy that does not keep times (cp -r) does."""
    for volume in data.rglob("*.nii.gz"):
        os.utime(volume, ns=(volume.stat().st_atime_ns, volume.stat().st_mtime_ns + 10**9))


def frozen_preset(folder: Path) -> str:
    """The tiny preset with a frozen slice encoder, as the M3D presets' (no pre-training on the scans)."""
    path = folder / "tiny-frozen.json"
    path.write_text(json.dumps(load_preset("tiny") | {"encoder_pretraining": None}))
    return str(path)


@pytest.mark.slow  # four training runs
def test_stages_trained_on_a_frozen_encoders_features_of_rewritten_scans_are_not_resumed(phantoms, tmp_path,
                                                                                          monkeypatch):
    """The scans rewritten under the same paths, the encoder frozen: their features are encoded again, and the stages
    trained on the old ones are refused rather than saved with them. The same scans copied without their times
    (cp -r) resume, and are not encoded again (M3D's 120 k scans take days)."""
    preset, data = frozen_preset(tmp_path), shutil.copytree(phantoms, tmp_path / "data")
    out, work = tmp_path / "checkpoint", tmp_path / "checkpoint-training"
    train(preset, data, out, seed=0)
    mirror_volumes(data)
    with pytest.raises(UserInputError, match=r"holds stages trained on the features of other scans under the same "
                                              r"paths \(rewritten since\), and they would be resumed as this run's; "
                                              r"delete .*state"):
        train(preset, data, out, seed=0)
    shutil.rmtree(work / "state")  # as the message says: the stages train again, on the new features
    assert train(preset, data, out, seed=0) == out
    log, weights = (work / "metrics.csv").read_text(), load_file(out / "model.safetensors")
    touch_volumes(data)

    def encoding(*args, **kwargs):
        raise AssertionError("scans only copied were encoded again")

    monkeypatch.setattr(FeatureCache, "build", encoding)
    assert train(preset, data, out, seed=0) == out
    assert (work / "metrics.csv").read_text() == log  # resumed: no stage trained again
    again = load_file(out / "model.safetensors")
    assert [key for key in weights if not torch.equal(weights[key], again[key])] == []


@pytest.mark.slow  # two training runs
def test_a_feature_cache_and_run_from_before_content_digests_are_resumed(phantoms, tmp_path):
    """A work folder from before the scans' content was recorded (features.json without digests, run.json without
    the scans): it loads and resumes as before, and a scan encoded again gains its digest."""
    preset, data = frozen_preset(tmp_path), shutil.copytree(phantoms, tmp_path / "data")
    out, work = tmp_path / "checkpoint", tmp_path / "checkpoint-training"
    train(preset, data, out, seed=0)
    for path, key in ((work / "features" / "features.json", "digests"), (work / "run.json", "scans")):
        kept = json.loads(path.read_text())
        del kept[key]
        path.write_text(json.dumps(kept))
    log = (work / "metrics.csv").read_text()
    touched = min(json.loads((work / "features" / "features.json").read_text())["shards"])  # a scan of the cache
    os.utime(data / touched, ns=(0, (data / touched).stat().st_mtime_ns + 10**9))
    assert train(preset, data, out, seed=0) == out
    assert (work / "metrics.csv").read_text() == log  # resumed: no stage trained again
    digests = json.loads((work / "features" / "features.json").read_text())["digests"]
    assert list(digests) == [touched]  # encoded again, as its content could not be told; the others' still unknown
    assert "scans" not in json.loads((work / "run.json").read_text())


def test_a_scan_without_its_ground_truth_entry_is_refused_before_any_training(phantoms, tmp_path):
    """The encoder's pre-training would learn such a scan as lesion-free, and the findings probe stop the run later
    with a KeyError: said at once instead, naming the scan."""
    data = shutil.copytree(phantoms, tmp_path / "data")
    truth = json.loads((data / GROUND_TRUTH_FILE).read_text())
    dropped = json.loads((data / "M3D_Cap.json").read_text())["train"][0]["image"]
    del truth[dropped]
    (data / GROUND_TRUTH_FILE).write_text(json.dumps(truth))
    with pytest.raises(UserInputError, match=f"has no entry for 1 of the scans the data names \\(e.g. {dropped}\\)"):
        train("tiny", data, tmp_path / "checkpoint", seed=0)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint-training").exists()


def test_a_run_stopped_before_its_first_stage_keeps_its_clock_when_run_again(tmp_path):
    """The wall time of the encoder's pre-training (a quarter of an hour for the demo) counts in the model card: a run
    stopped before any stage finished, run again, keeps it (the inputs recorded since must not look like another
    run's)."""
    from medvlm.work_folder import CLOCK, claim_inputs, claim_work_folder

    record = {"preset": "p", "seed": 0, "data": "d", "version": "v"}
    claim_work_folder(tmp_path, record, is_main_process=True)
    claim_inputs(tmp_path, {"encoder": "e"}, is_main_process=True)
    (tmp_path / CLOCK).write_text('{"seconds": 900}')
    claim_work_folder(tmp_path, record, is_main_process=True)  # the same command again
    assert (tmp_path / CLOCK).exists()


def test_a_stage_with_nothing_to_train_on_is_refused_and_one_with_less_is_said(phantoms, tmp_path):
    """Without M3D_Cap.json the align stage ran no step and logged a loss of 0; without the VQA tables the instruct
    stage trained on reports alone, silently."""
    from medvlm.train import stage_data_notes

    data = shutil.copytree(phantoms, tmp_path / "data")
    (data / "M3D_Cap.json").unlink()
    with pytest.raises(UserInputError, match=r"stage align trains on report samples, and .* has none \(no "
                                             r"M3D_Cap\.json with a train split\)"):
        train("tiny", data, tmp_path / "checkpoint", seed=0)
    assert not (tmp_path / "checkpoint").exists()
    reports = [sample for sample in read_samples(phantoms, "train") if sample.task == "report"]
    assert stage_data_notes(load_preset("tiny"), reports, phantoms) == [
        f"note: stage instruct trains without vqa_closed, vqa_open samples: {phantoms} has none (no "
        "M3D_VQA_train.csv with a train split)"]


def test_training_into_the_working_folder_keeps_its_work_beside_it(phantoms, tmp_path, monkeypatch):
    """`--out .` (from inside the folder made for the checkpoint) crashed: the work folder is named from its name."""
    (tmp_path / "checkpoint").mkdir()
    monkeypatch.chdir(tmp_path / "checkpoint")
    train("tiny", phantoms, ".", seed=0)
    assert (tmp_path / "checkpoint" / "model.safetensors").exists() and (tmp_path / "checkpoint-training").is_dir()
    with pytest.raises(UserInputError, match="is the file system's root; give the checkpoint a folder of its own"):
        train("tiny", phantoms, "/", seed=0)


def test_the_card_names_the_kinds_of_sample_the_data_held(trained, tmp_path):
    """Data without the VQA tables trains its instruct stage on reports alone: the card says so, not "closed- and
    open-ended questions"."""
    from medvlm.model_card import write_model_card

    folder = Path(shutil.copytree(trained, tmp_path / "checkpoint"))
    record = json.loads((folder / "training.json").read_text())
    assert set(record["sample_tasks"]) == {"report", "vqa_closed", "vqa_open"}
    assert sum(record["sample_tasks"].values()) == record["train_samples"]
    (folder / "training.json").write_text(json.dumps(record | {"sample_tasks": {"report": 5}}))
    card = write_model_card(folder, "python -m medvlm train ...").read_text()
    assert "samples (reports (5))." in card and "| instruct | report |" in card


def test_each_stage_of_each_seed_draws_numbers_of_its_own():
    """Seed 0's second stage must not replay seed 1's first (seed + index would): replicate runs are independent."""
    stages = ("probe", "align", "instruct")
    assert len({stage_seed(seed, stage) for seed in range(50) for stage in stages}) == 50 * len(stages)


@pytest.mark.parametrize(("change", "differs"), [({"seed": 1}, "another seed"),
                                                ({"config_overrides": {"fusion_dim": 48}}, "another preset")])
def test_a_run_with_other_settings_is_refused_not_resumed(trained, phantoms, change, differs):
    work = trained.with_name(trained.name + "-training")
    before = {path: path.stat().st_mtime for path in [*work.rglob("*"), *trained.iterdir()]}
    with pytest.raises(UserInputError, match=f"holds a run trained with {differs}.*give another --out"):
        train("tiny", phantoms, trained, **{"seed": 0, **change})
    assert {path: path.stat().st_mtime for path in [*work.rglob("*"), *trained.iterdir()]} == before


def test_stages_trained_by_an_older_version_are_not_resumed(trained, phantoms, monkeypatch):
    """A version that draws its stages' random numbers, or reads the scans, otherwise would train other weights:
    the stages it finds are not passed off as its own."""
    import medvlm.work_folder

    monkeypatch.setattr(medvlm.work_folder, "TRAINING_VERSION", medvlm.work_folder.TRAINING_VERSION + 1)
    with pytest.raises(UserInputError, match=r"holds a run trained with an older version of medvlm.*another --out"):
        train("tiny", phantoms, trained, seed=0)


def test_stages_of_a_run_that_recorded_no_settings_are_not_resumed(phantoms, tmp_path):
    (tmp_path / "work" / "state" / "align").mkdir(parents=True)  # a work folder from before run.json
    (tmp_path / "work" / "state" / "align" / "done.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"recorded no settings.*delete its state folder"):
        train("tiny", phantoms, tmp_path / "checkpoint", seed=0, work=tmp_path / "work")
    assert not (tmp_path / "checkpoint").exists()


def test_training_asks_for_reports_as_the_checkpoint_will_be_asked(phantoms, tmp_path, monkeypatch):
    """A preset's own report prompt is what its training and validation reports answer (paraphrases beside it):
    the text the model reads in each batch, not the default prompt."""
    from medvlm.batches import Collator
    from medvlm.configuration import REPORT_PROMPT
    from medvlm.data import REPORT_PARAPHRASES

    own = "Summarise this volume."
    read, collate = [], Collator.__call__

    def reading(self, samples):
        batch = collate(self, samples)
        read.extend((sample.image, sample.task, self.tokenizer.decode(ids))
                    for sample, ids in zip(samples, batch["input_ids"].tolist(), strict=True))
        return batch

    monkeypatch.setattr(Collator, "__call__", reading)
    out = train("tiny", phantoms, tmp_path / "checkpoint", seed=0, config_overrides={"report_prompt": own})
    assert json.loads((out / "config.json").read_text())["report_prompt"] == own
    validation = {item["image"] for item in json.loads((phantoms / "M3D_Cap.json").read_text())["validation"]}
    reports = [(image in validation, text) for image, task, text in read if task == "report"]
    validation_reports = [text for held_out, text in reports if held_out]
    training_reports = [text for held_out, text in reports if not held_out]
    assert validation_reports and all(own in text for text in validation_reports)
    assert any(own in text for text in training_reports)
    for paraphrase in REPORT_PARAPHRASES:
        assert any(paraphrase in text for text in training_reports), paraphrase
    assert not any(REPORT_PROMPT in text for _, _, text in read)


def test_a_run_that_trained_nothing_gives_way_to_the_corrected_command(phantoms, tmp_path, monkeypatch):
    """A run stopped (or failed) before any stage or epoch state leaves nothing to resume: the next command,
    with other settings, trains, and its card counts only its own time."""
    import medvlm.train

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medvlm.train, "build_model", stopped)
    with pytest.raises(KeyboardInterrupt):
        train("tiny", phantoms, tmp_path / "checkpoint", seed=1)
    monkeypatch.undo()
    (tmp_path / "checkpoint-training" / "state" / "align" / "epoch-000.partial").mkdir(parents=True)  # half saved
    assert train("tiny", phantoms, tmp_path / "checkpoint", seed=0) == tmp_path / "checkpoint"
    training = json.loads((tmp_path / "checkpoint" / "training.json").read_text())
    assert training["seed"] == 0 and training["invocations"] == 1


def test_a_run_killed_without_warning_keeps_its_time_up_to_its_last_metrics_row(tmp_path):
    """SIGKILL or the OOM killer skip every `finally`: the clock is saved with each metrics row."""
    from medvlm.train import MetricsLog, RunClock

    (tmp_path / "clock.json").write_text(json.dumps({"seconds": 900.0, "invocations": 1}))
    log = MetricsLog(tmp_path / "metrics.csv", True, RunClock(tmp_path / "clock.json", True))
    log.write(stage="align", epoch=0, step=20, loss=1.0)
    kept = json.loads((tmp_path / "clock.json").read_text())
    assert kept["invocations"] == 2 and kept["seconds"] >= 900.0
    assert float((tmp_path / "metrics.csv").read_text().splitlines()[-1].split(",")[-1]) >= 900.0


def test_a_similarity_threshold_given_replaces_the_calibrated_one(phantoms, tmp_path):
    out = train("tiny", phantoms, tmp_path / "checkpoint", seed=0, config_overrides={"similarity_threshold": 0.5})
    assert json.loads((out / "config.json").read_text())["similarity_threshold"] == 0.5


@pytest.mark.parametrize(("setting", "says"), [
    ("slice_budget=-1", "slice_budget must be a whole number of at least 1, not -1"),
    ("slice_budget=abc", "slice_budget must be a whole number of at least 1, not 'abc'"),
    ("image_size=0", "image_size must be a whole number of at least 1, not 0"),
    ("compressor_heads=3", "fusion_dim 16 must divide into compressor_heads 3 attention heads"),
    ("compressor_lesion_classes=-2", "compressor_lesion_classes must be a whole number of at least 1, not -2"),
    ("compressor_grid=[1]", "compressor_grid must be three whole numbers"),
    ("similarity_threshold=5", "similarity_threshold is a cosine similarity from -1 to 1, not 5"),
    ("image_token_id=5", "cannot override image_token_id: set from the preset's language model and tokenizer"),
])
def test_a_bad_model_setting_is_one_sentence_before_any_work(phantoms, tmp_path, capsys, setting, says):
    out = tmp_path / "checkpoint"
    assert main(["train", "--preset", "tiny", "--data", str(phantoms), "--out", str(out), "--set", setting]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and says in error, error
    assert not out.exists() and not out.with_name("checkpoint-training").exists()


def test_a_run_on_other_data_is_refused_not_resumed(trained, phantoms, tmp_path):
    other = shutil.copytree(phantoms, tmp_path / "phantoms")
    report = other / json.loads((other / "M3D_Cap.json").read_text())["train"][0]["text"]
    report.write_text(report.read_text() + " A new finding.")  # a report written again, differently
    with pytest.raises(UserInputError, match="holds a run trained with other data"):
        train("tiny", other, trained, seed=0)


class StoppedWhileSaving(Exception):
    """The process killed in the middle of accelerate's save_state."""


@pytest.mark.parametrize("left_as", ["epoch-001.partial", "epoch-001"])  # epoch-001: how the code before left it
def test_a_run_stopped_while_saving_an_epoch_resumes_from_the_epoch_before(left_as, phantoms, tmp_path, monkeypatch,
                                                                           capsys):
    preset = load_preset("tiny")
    preset["stages"][0]["epochs"] = 2  # align saves epoch 1 beside a complete epoch 0
    two_epochs = tmp_path / "tiny-two-epochs.json"
    two_epochs.write_text(json.dumps(preset))
    out = tmp_path / "checkpoint"
    save_state = Accelerator.save_state

    def stopped_in_epoch_1(self, output_dir, **kwargs):
        saved = save_state(self, output_dir, **kwargs)
        if Path(output_dir).name.startswith("epoch-001"):
            for name in ("optimizer.bin", "random_states_0.pkl"):  # cut off before its last files
                (Path(output_dir) / name).unlink()
            raise StoppedWhileSaving
        return saved

    monkeypatch.setattr(Accelerator, "save_state", stopped_in_epoch_1)
    with pytest.raises(StoppedWhileSaving):
        train(str(two_epochs), phantoms, out, seed=0)
    monkeypatch.undo()
    work = tmp_path / "checkpoint-training"
    stopped = json.loads((work / "clock.json").read_text())  # the stopped run's time is kept for the card
    assert stopped["invocations"] == 1 and stopped["seconds"] > 0
    align = work / "state" / "align"
    next(align.glob("epoch-001*")).rename(align / left_as)
    assert sorted(path.name for path in align.iterdir()) == ["epoch-000", left_as]

    capsys.readouterr()
    assert train(str(two_epochs), phantoms, out, seed=0) == out
    printed = capsys.readouterr().out
    assert f"removing {left_as}" in printed and "stage align: resuming after epoch 1" in printed
    assert sorted(path.name for path in align.iterdir()) == ["done.json", "epoch-001", "weights.safetensors"]
    assert Pipeline.from_pretrained(out).describe()["demo"] is True
    # The card's wall time is both runs', and metrics.csv's clock goes on from where the stopped run's ended.
    training = json.loads((out / "training.json").read_text())
    assert training["invocations"] == 2 and training["wall_seconds"] > stopped["seconds"]
    rows = [line.split(",") for line in (work / "metrics.csv").read_text().splitlines()[1:]]
    seconds = [float(row[-1]) for row in rows]
    assert seconds == sorted(seconds) and seconds[-1] > stopped["seconds"]
    logged = [(row[0], row[1], row[2], row[5] != "") for row in rows]  # stage, epoch, step, epoch's end
    assert len(logged) == len(set(logged))  # the stopped epoch, trained again, is logged once


def test_saving_an_epoch_does_not_warn_about_the_tied_output_head(tmp_path, caplog):
    """The demo LMs tie their output head to the input embeddings: accelerate stores the tensor once and warned
    "Removed shared tensor ... check that you don't receive any warning while reloading" at every epoch."""
    tokenizer = tiny_tokenizer()
    text_config = {**tiny_config(tokenizer).text_config.to_dict(), "tie_word_embeddings": True}
    model = MedVLMForConditionalGeneration(tiny_config(tokenizer, text_config=text_config))
    head, embeddings = model.language_model.lm_head.weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embeddings.data_ptr()
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    caplog.set_level(logging.WARNING)
    save_epoch_state(accelerator, tmp_path, 0)
    assert "Removed shared tensor" not in caplog.text
    with torch.no_grad():
        embeddings.zero_()
    accelerator.load_state(tmp_path / "epoch-000")
    assert prepared.language_model.lm_head.weight.abs().sum() > 0  # the head came back, tied
    assert prepared.language_model.lm_head.weight.data_ptr() == prepared.get_input_embeddings().weight.data_ptr()
    logging.getLogger("accelerate.utils.other").warning("Removed shared tensor {'fusion.weight'} while saving.")
    assert "{'fusion.weight'}" in caplog.text  # any other shared tensor still warns


def test_feature_cache_round_trips(trained, phantoms, tmp_path):
    model = MedVLMForConditionalGeneration.from_pretrained(trained)
    images = ["ct/phantom_00000.nii.gz", "mr/phantom_00001.nii.gz"]
    cache = FeatureCache.build(model, images, lambda image: load_volume(phantoms / image), progress=False)
    cache.save(tmp_path / "features", shard_size=1)
    assert len(list((tmp_path / "features").glob("features-*.safetensors"))) == 2
    loaded = FeatureCache.load(tmp_path / "features", cache.fingerprint)
    for image in images:
        torch.testing.assert_close(loaded[image].patches, cache[image].patches)
        assert loaded[image].kept.tolist() == cache[image].kept.tolist()
    with pytest.raises(ValueError, match="another encoder"):
        FeatureCache.load(tmp_path / "features", "not-this-encoder")


def test_batches_group_samples_of_a_scan_and_cover_every_sample():
    samples = [Sample(image=f"scan{i // 5}", messages=[], task="vqa_closed") for i in range(20)]
    batches = ScanGroupedBatches(samples, batch_size=8, samples_per_scan=4, seed=0)
    first, second = list(batches), list(batches)
    assert sorted(i for batch in first for i in batch) == list(range(20))
    assert first != second  # a new order each epoch
    scans_per_batch = [len({samples[i].image for i in batch}) for batch in first]
    assert max(scans_per_batch) <= 4  # 8 samples from groups of up to 4 of one scan


def test_finding_targets_follow_the_ground_truth(phantoms):
    truth = json.loads((phantoms / "ground_truth.json").read_text())
    images = sorted(truth)
    classes, targets = finding_targets(phantoms, images)
    for image in images:
        expected = {f"{l['organ']} {l['kind']} {l['side']}" for l in truth[image]["lesions"]}  # noqa: E741
        assert {c for c, flag in zip(classes, targets[image].tolist(), strict=True) if flag} == expected


def test_eval_prints_the_m3d_metrics(trained, phantoms, tmp_path):
    """On a machine without WordNet or roberta-large (empty NLTK and Hugging Face folders, offline), METEOR and
    BERTScore are null with the reason, not made up."""
    empty = {name: tmp_path / name for name in ("nltk_data", "hf_home", "hf_hub")}
    for folder in empty.values():
        folder.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NLTK_DATA": str(empty["nltk_data"]), "HF_HOME": str(empty["hf_home"]),
           "HF_HUB_CACHE": str(empty["hf_hub"]), "HUGGINGFACE_HUB_CACHE": str(empty["hf_hub"]),
           "TRANSFORMERS_CACHE": str(empty["hf_hub"])}
    # nltk also looks in ~/nltk_data, /usr/share/nltk_data and the interpreter's prefix: only NLTK_DATA here.
    only_nltk_data = ("import os, runpy, nltk.data; nltk.data.path[:] = [os.environ['NLTK_DATA']]; "
                      "runpy.run_module('medvlm', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", only_nltk_data, "eval", "--checkpoint", str(trained), "--data",
                             str(phantoms), "--split", "train", "--limit", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) >= EVAL_KEYS and scores["n"] == 2
    assert scores["report_meteor"] is None and scores["notes"]["report_meteor"]  # no WordNet offline: said so
    assert scores["open_bertscore"] is None and scores["notes"]["open_bertscore"]  # no roberta-large offline
    assert 0.0 <= scores["closed_accuracy"] <= 1.0
    assert scores["selection_recall"] is None or 0.0 <= scores["selection_recall"] <= 1.0  # None: no lesions


def test_probe_floors_are_the_priors_and_the_modality_rates(tmp_path):
    # One finding; the training CT scans both hold it, the MR scans never do. Smoothed (add one half):
    # overall 2.5 / 5 = 0.5; within CT 2.5 / 3, within MR 0.5 / 3. On one CT scan with it and one MR without.
    cyst = {"organ": "liver", "kind": "cyst", "side": "right", "diameter_mm": 12.0, "center_voxel": [1, 1, 1]}
    truth = {name: {"modality": modality, "lesions": [cyst] if modality == "CT" else []}
             for name, modality in (("a", "CT"), ("b", "CT"), ("c", "MR"), ("d", "MR"), ("e", "CT"), ("f", "MR"))}
    (tmp_path / "ground_truth.json").write_text(json.dumps(truth))
    floors = probe_floors(tmp_path, ["a", "b", "c", "d"], ["e", "f"])
    assert floors["priors"] == pytest.approx(math.log(2), abs=1e-4)
    assert floors["modality"] == pytest.approx(-math.log(2.5 / 3), abs=1e-4)
    assert probe_floors(tmp_path / "no-truth", ["a"], ["e"]) is None


def test_the_lesion_skip_trains_from_the_lesions_patches(phantoms, tmp_path):
    """`compressor_lesion_classes` with a stage's `patch_loss`: the compressor's per-patch lesion scorer learns from
    the ground truth's lesion positions (its weights move from where a run without the loss leaves them), and
    the checkpoint keeps it; a class count that is not the data's is one sentence before any stage trains."""
    from medvlm.encoder_pretraining import lesion_classes

    count = len(lesion_classes(json.loads((phantoms / GROUND_TRUTH_FILE).read_text())))
    with pytest.raises(UserInputError, match=f"compressor_lesion_classes is {count + 1} but the training scans "
                                             f"hold {count} lesion classes; set it to that"):
        train("tiny", phantoms, tmp_path / "wrong", seed=0, config_overrides={"compressor_lesion_classes": count + 1})
    heads = {}
    for weight in (0.0, 1.0):
        preset = load_preset("tiny")
        for stage in preset["stages"]:
            stage["patch_loss"] = weight
        path = tmp_path / f"patch-{weight}.json"
        path.write_text(json.dumps(preset))
        out = train(str(path), phantoms, tmp_path / f"patch-{weight}", seed=0,
                    config_overrides={"compressor_lesion_classes": count})
        assert json.loads((out / "config.json").read_text())["compressor_lesion_classes"] == count
        heads[weight] = load_file(out / "model.safetensors")["compressor.lesion_head.weight"]
    assert not torch.equal(heads[0.0], heads[1.0])


def test_a_run_without_a_validation_split_says_so_rather_than_a_loss_of_nan(tmp_path, capsys):
    data = tmp_path / "data"
    write_phantom_set(data, n=3, seed=3, formats=("nifti",), matrix=64, split="train")
    train("tiny", data, tmp_path / "checkpoint", seed=0)
    printed = capsys.readouterr().out
    assert "training loss" in printed and "no validation split to score" in printed and "nan" not in printed
