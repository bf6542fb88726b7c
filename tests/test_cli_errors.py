"""A user's mistake on the command line ends with exit status 2 and one sentence on stderr, never a traceback."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlm.__main__ import main
from medvlm.errors import UserInputError
from medvlm.phantom import write_phantom_set
from medvlm.pipeline import DEMO_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent
SCAN = ROOT / "assets" / "examples" / "ct_chest_abdomen.nii.gz"


def refused(capsys, *args) -> str:
    """Run the command line; it must exit 2 with one line on stderr. That line."""
    status = main([str(arg) for arg in args])
    error = capsys.readouterr().err
    assert status == 2
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    return error


@pytest.mark.parametrize(("options", "message"), [
    (["--n", "0"], "cannot write 0 phantoms; ask for at least 1"),
    (["--n", "1", "--modality", "xx"], "use modalities from ct, mr, pt"),
    (["--n", "1", "--npy-shape", "a,b,c"], "--npy-shape takes three whole numbers"),
    (["--n", "1", "--npy-shape", "32,0,256"], "--npy-shape takes three whole numbers"),
    (["--n", "1", "--split", "training"], "unknown split 'training'"),
    (["--n", "1", "--matrix", "0"], "give a matrix from 16 to 1024"),
    (["--n", "1", "--lesion-size", "60,80"], "no CT lesion can be 60–80 mm across; CT phantom lesions are 2 to 40"),
    (["--n", "1", "--modality", "pt", "--lesion-size", "35,40"], "no PT lesion can be 35–40 mm across"),
])
def test_phantom_with_a_bad_option(tmp_path, capsys, options, message):
    assert message in refused(capsys, "phantom", tmp_path / "phantoms", *options)
    assert not (tmp_path / "phantoms").exists()


def test_phantoms_too_coarse_for_the_lesion_size_asked_say_so(tmp_path, capsys):
    args = ["phantom", str(tmp_path / "p"), "--n", "2", "--modality", "pt", "--lesion-size", "2,8", "--matrix", "64"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["lesions"] == 0
    assert "2 of 2 phantoms have pixels too coarse for lesions of 2,8 mm" in printed.err
    assert main(["phantom", str(tmp_path / "q"), "--n", "1", "--modality", "pt", "--lesion-size", "10,12",
                 "--matrix", "96"]) == 0  # this one draws no lesion by chance: no note
    assert "too coarse" not in capsys.readouterr().err


def test_phantom_into_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder\n")
    assert "notes.txt is a file, not a folder" in refused(capsys, "phantom", tmp_path / "notes.txt", "--n", "1")


def test_phantom_into_a_folder_that_holds_a_data_set_leaves_it_as_it_was(tmp_path, capsys):
    """Pointed at a data set by mistake (M3D's own, or phantoms written before), `phantom` would replace its index
    and leave its volumes among the new ones: it is refused, and the folder keeps its files."""
    real = tmp_path / "M3D"
    real.mkdir()
    (real / "M3D_Cap.json").write_text('{"train": [{"image": "ct/1.npy", "text": "ct/1.txt"}]}')
    assert "M3D already holds a data set (M3D_Cap.json); give a new or empty folder" in refused(
        capsys, "phantom", real, "--n", "1", "--matrix", "32")
    assert [path.name for path in real.iterdir()] == ["M3D_Cap.json"]
    assert "ct/1.npy" in (real / "M3D_Cap.json").read_text()
    assert main(["phantom", str(tmp_path / "p"), "--n", "1", "--matrix", "32"]) == 0
    assert "already holds a data set" in refused(capsys, "phantom", tmp_path / "p", "--n", "1", "--seed", "5")


def test_output_folders_that_cannot_be_made_are_one_sentence_before_any_work(tmp_path, capsys, monkeypatch):
    """A folder inside a file (or on a read-only disk, another user's): one sentence, not a traceback; an --out that
    is a file is refused before the ablation trains its first run or features encodes its first scan."""
    (tmp_path / "notes.txt").write_text("a file\n")
    inside_a_file = tmp_path / "notes.txt" / "phantoms"
    assert f"cannot write to {inside_a_file / 'ct'} (Not a directory); give a path you can write to" in refused(
        capsys, "phantom", inside_a_file, "--n", "1", "--matrix", "32")
    monkeypatch.setattr("medvlm.ablation.run_study", lambda *args, **kwargs: pytest.fail("the study ran"))
    monkeypatch.setattr("medvlm.features.encode_data_folder", lambda *args, **kwargs: pytest.fail("encoded"))
    for command in (["ablate", "--size", "tiny", "--seeds", "1"], ["features", "--checkpoint-or-preset", "tiny",
                                                                   "--data", str(tmp_path)]):
        assert f"{command[0]}: {tmp_path / 'notes.txt'} is a file, not a folder; give --out a folder" in refused(
            capsys, *command, "--out", tmp_path / "notes.txt")


def test_an_error_that_is_no_unwritable_path_keeps_its_traceback(monkeypatch):
    """A file of the program's own missing (a packaging fault) is our bug, not a path the user can change: it is not
    told as 'give a path you can write to', and a broken pipe that is not stdout's is not taken for `| head`."""
    import medvlm.__main__ as cli

    def missing_asset(args):
        Path("/nonexistent/medvlm/presets/asset.json").read_text()

    def broken_socket(args):
        raise BrokenPipeError(32, "Broken pipe")

    for run in (missing_asset, broken_socket):
        monkeypatch.setattr(cli, "cmd_info", run)
        with pytest.raises(OSError):
            main(["info", "scan.nii.gz"])


@pytest.mark.parametrize(("out", "message"), [
    (lambda tmp_path: (tmp_path / "slices.png").mkdir() or tmp_path / "slices.png", "Is a directory"),  # a folder
    (lambda tmp_path: "/proc/slice.png", "No such file or directory"),  # a folder where no file can be made
    (lambda tmp_path: (tmp_path / "notes.txt").write_text("x") and tmp_path / "notes.txt" / "slice.png",
     "notes.txt is a file, not a folder; choose another --out"),  # a file's name as the folder
    (lambda tmp_path: tmp_path / "slice.jpg", "slices are written as PNG; give a name ending in .png"),
])
def test_view_to_a_path_that_cannot_be_written(tmp_path, capsys, out, message):
    error = refused(capsys, "view", SCAN, "--out", out(tmp_path))
    assert message in error
    assert not (tmp_path / "slice.jpg").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--device", "gpu"], "unknown device 'gpu'; use cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    (["--device", "cuda:64"], "cuda:64"),
    (["--temperature", "0.5", "--top-p", "5"], "top-p 5.0 is out of range; use a value above 0 and at most 1"),
    (["--temperature", "0.5", "--top-p", "-0.5"], "top-p -0.5 is out of range"),
    (["--temperature", "-1"], "temperature -1 is out of range; use 0 for greedy decoding or 0.01 to 100"),
    (["--temperature", "1e-40"], "temperature 1e-40 is out of range"),  # would overflow the logits
    (["--temperature", "inf"], "temperature inf is out of range"),
    (["--max-new-tokens", "0"], "max new tokens 0 is out of range; use 1 to 1024"),
])
def test_report_and_ask_with_bad_model_options(capsys, options, message):
    assert message in refused(capsys, "report", SCAN, *options)
    assert message in refused(capsys, "ask", SCAN, "Where is the lesion?", *options)


def test_ask_with_a_question_too_long_to_read(capsys):
    assert "more than the 2,000 allowed; ask a shorter one" in refused(capsys, "ask", SCAN, "why " * 600)
    assert "the question is empty; ask something about the scan" in refused(capsys, "ask", SCAN, "   ")


def test_ask_usage_shows_one_question_after_the_scan_files(capsys):
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    assert "ask [options] SCAN [SCAN ...] QUESTION" in capsys.readouterr().out


def test_train_into_a_file_and_features_with_no_shard(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("notes")
    data = tmp_path / "data"
    write_phantom_set(data, n=2, seed=5, formats=("nifti",), matrix=32)
    assert "afile.txt is a file, not a folder; give --out a folder" in refused(
        capsys, "train", "--preset", "tiny", "--data", data, "--out", tmp_path / "afile.txt")
    assert not (tmp_path / "afile.txt-training").exists()
    assert "--shard-size is the number of scans per file, at least 1" in refused(
        capsys, "features", "--checkpoint-or-preset", "demo", "--data", data, "--out", tmp_path / "f",
        "--shard-size", "0")
    assert "--revision picks a version of a Hub checkpoint, and tiny is a preset" in refused(
        capsys, "features", "--checkpoint-or-preset", "tiny", "--data", data, "--out", tmp_path / "f",
        "--revision", "v9")
    for command in ("train", "phantom"):
        arguments = ["--preset", "tiny", "--data", data, "--out", tmp_path / "out"] if command == "train" else [
            tmp_path / "out", "--n", "2"]
        for seed in ("-1", str(2**32)):  # numpy's error, after train had made its folders
            assert f"{command}: --seed must be a whole number from 0 to 4294967295, not {seed}" in refused(
                capsys, command, *arguments, "--seed", seed)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-training").exists()
    data_copy = tmp_path / "data-copy"
    write_phantom_set(data_copy, n=2, seed=5, formats=("nifti",), matrix=32)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "list.txt").write_text("patients")
    for out, work, says in (
            (data_copy, None, "is, holds or lies inside the data folder data-copy; give the checkpoint a folder"),
            (data_copy / "ct" / "run", None, "is, holds or lies inside the data folder"),
            (tmp_path / "ck", tmp_path / "ck" / "work", "lies inside --out"),
            (tmp_path / "notes", None, "holds other files (e.g. list.txt) and no checkpoint; give --out a new or")):
        extra = ["--work", work] if work else []
        assert says in refused(capsys, "train", "--preset", "tiny", "--data", data_copy, "--out", out, *extra)
    from medvlm.train import check_output_folders

    (tmp_path / "clone" / ".git").mkdir(parents=True)  # a fresh clone of a Hub repo: its card and dotfiles
    (tmp_path / "clone" / "README.md").write_text("# our model")
    (tmp_path / "clone" / ".gitattributes").write_text("*.safetensors filter=lfs")
    check_output_folders(data_copy, tmp_path / "clone", tmp_path / "clone-training")  # taken
    (tmp_path / "project").mkdir()  # a README alone is a project's, which push would publish as the model card
    (tmp_path / "project" / "README.md").write_text("# our lab's notes")
    with pytest.raises(UserInputError, match=r"holds other files \(e.g. README.md\) and no checkpoint"):
        check_output_folders(data_copy, tmp_path / "project", tmp_path / "project-training")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "features.json").write_text("{}")  # any cache: none fits an encoder trained afresh
    assert "this preset pre-trains its slice encoder on the training scans, so no feature cache made before" in refused(
        capsys, "train", "--preset", "tiny", "--data", data, "--out", tmp_path / "out", "--features",
        tmp_path / "cache")


@pytest.mark.parametrize(("text", "message"), [
    ('{"model": {}}', "lacks 'language_model'; see medvlm/presets/demo.json"),
    ("[1, 2]", "holds a list, not a JSON object"),
    ('{"model": {"image_size": 32,}', "is not valid JSON (Expecting property name"),
    ('{"model": {}, "language_model": {"from_scratch": {"model_type": "llama"}}, "tokenizer": {}}',
     "names no tokenizer (tokenizer needs 'from_language_model': true, or a whole 'vocab_size')"),
    ('{"model": {}, "language_model": {"from_scratch": {"model_type": "llama"}}, "tokenizer": {"vocab_size": 99}, '
     '"max_length": 64, "stages": [{"name": "a", "tasks": ["report"], "trainable": "projector", "epochs": 1, '
     '"lr": 0.001, "batch_size": 2}]}', "has a stage 1 whose 'trainable' is not a list of parts"),
])
def test_train_with_a_preset_file_that_is_no_preset(tmp_path, capsys, text, message):
    preset = tmp_path / "my.json"
    preset.write_text(text)
    error = refused(capsys, "train", "--preset", preset, "--data", tmp_path, "--out", tmp_path / "checkpoint")
    assert f"the preset {preset} " in error and message in error
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize(("setting", "message"), [
    ('ct_windows=["nope"]', "ct_windows must be 3 [level, width] pairs in HU, one per encoder channel"),
    ("ct_windows=[[40, 400], [-600, 0], [400, 1800]]", "each width above 0"),
    ("demo=maybe", "demo must be true or false"),
    ("image_std=[0.5, 0.5]", "image_mean and image_std must be lists of numbers, one per encoder channel"),
])
def test_train_with_a_preprocessing_setting_that_cannot_work(tmp_path, capsys, setting, message):
    out = tmp_path / "checkpoint"
    assert message in refused(capsys, "train", "--preset", "tiny", "--data", tmp_path, "--out", out, "--set", setting)
    assert not out.exists()


@pytest.mark.parametrize(("spoiled", "message"), [
    ("lfs pointer", "git lfs pull"),
    ("damaged", "are damaged"),
    ("no tokenizer", "has no tokenizer (tokenizer.json or tokenizer_config.json)"),
    ("needs timm", "timm is not installed; install it (pip install timm)"),
])
def test_report_with_a_spoiled_checkpoint(tmp_path, capsys, monkeypatch, spoiled, message):
    checkpoint = Path(shutil.copytree(DEMO_CHECKPOINT, tmp_path / "demo-model"))
    file = checkpoint / "model.safetensors"
    if spoiled == "lfs pointer":  # a clone without git-lfs
        file.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize 8800000\n")
    elif spoiled == "damaged":  # a download cut short
        file.write_bytes(file.read_bytes()[:5000])
    elif spoiled == "no tokenizer":  # weights copied without the tokenizer
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (checkpoint / name).unlink()
    else:  # a BiomedCLIP checkpoint on a machine without timm (an optional dependency)
        monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails, whether or not it is installed
        config = json.loads((checkpoint / "config.json").read_text())
        config.update(encoder_backend="open_clip",
                      open_clip_name="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
        (checkpoint / "config.json").write_text(json.dumps(config))
    assert message in refused(capsys, "report", SCAN, "--checkpoint", checkpoint)


@pytest.mark.parametrize(("command", "message"), [
    (["eval"], "holds neither M3D_Cap.json nor M3D_VQA_test.csv"),
    (["eval", "--device", "gpu"], "unknown device 'gpu'"),
    (["eval", "--split", "testing"], "unknown split 'testing'"),
    (["eval", "--limit", "0"], "--limit must be at least 1"),
    (["train", "--out", "{tmp}/checkpoint"], "holds neither M3D_Cap.json nor M3D_VQA_train.csv"),
    (["features", "--checkpoint-or-preset", "demo", "--out", "{tmp}/features"], "holds neither M3D_Cap.json"),
])
def test_commands_on_a_folder_that_is_not_m3d_data(tmp_path, capsys, command, message):
    data = tmp_path / "not-m3d"
    data.mkdir()
    (data / "notes.txt").write_text("no M3D_Cap.json here\n")
    args = [arg.format(tmp=tmp_path) for arg in command]
    assert message in refused(capsys, *args, "--data", data)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "features").exists()
    if "holds neither" in message:  # ... and a folder's name mistyped
        assert f"there is no folder {tmp_path / 'typo'}; point --data to an M3D-format folder" in refused(
            capsys, *args, "--data", tmp_path / "typo")


def test_eval_on_a_vqa_row_whose_question_type_is_not_a_number(tmp_path, capsys):
    from medvlm.data import VQA_COLUMNS, VQA_FILES

    data = tmp_path / "m3d"
    data.mkdir()
    row = dict.fromkeys(VQA_COLUMNS, "x") | {"Question Type": "plane", "Answer Choice": "A"}
    (data / VQA_FILES["test"]).write_text(",".join(VQA_COLUMNS) + "\n" + ",".join(row.values()) + "\n")
    assert "line 2: Question Type 'plane' is not one of M3D-VQA's types 1 to 5" in refused(
        capsys, "eval", "--data", data)


def test_eval_names_a_missing_scan_before_answering_about_any(tmp_path, capsys, monkeypatch):
    """On M3D's test set a scan missing near the end would cost hours of answers about the ones before it."""
    from medvlm.data import VQA_COLUMNS, VQA_FILES

    data = tmp_path / "m3d"
    (data / "ct").mkdir(parents=True)
    np.save(data / "ct" / "there.npy", np.zeros((1, 4, 8, 8), np.float32))
    rows = [dict.fromkeys(VQA_COLUMNS, "x") | {"Question Type": "1", "Answer Choice": "A", "Image Path": image}
            for image in ("ct/there.npy", "ct/gone.npy")]
    (data / VQA_FILES["test"]).write_text("\n".join(",".join(row) for row in [VQA_COLUMNS, *map(dict.values, rows)]))
    monkeypatch.setattr("medvlm.pipeline.Pipeline.from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert "1 of the 2 scans that" in refused(capsys, "eval", "--data", data)


@pytest.mark.parametrize(("command", "says"), [
    (["train", "--preset", "tiny", "--data", "data", "--out", "checkpoint"], "stopped; run the same command again"),
    (["report", SCAN], "stopped"),
])
def test_ctrl_c_says_it_stopped_and_how_to_resume(monkeypatch, capsys, command, says):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("medvlm.train.train", interrupted)
    monkeypatch.setattr("medvlm.pipeline.Pipeline.from_pretrained", interrupted)
    assert main([str(word) for word in command]) == 130
    error = capsys.readouterr().err.strip()
    assert error.startswith(says) and "Traceback" not in error
    assert ("resume" in error) == (command[0] == "train")  # a report starts again from nothing


def test_train_on_scans_without_lesions_refuses_before_pre_training(tmp_path, capsys, monkeypatch):
    """The demo encoder learns to find lesions; scans with none (or no ground truth) leave it nothing to learn."""
    data = tmp_path / "data"
    write_phantom_set(data, n=1, seed=5, formats=("nifti",), matrix=64)
    assert not any(entry["lesions"] for entry in json.loads((data / "ground_truth.json").read_text()).values())
    monkeypatch.setattr("medvlm.encoder_pretraining.pretrain_encoder", lambda *a, **k: pytest.fail("pre-trained"))
    out = tmp_path / "checkpoint"
    says = (f"the scans in {data} hold no lesions, so the slice encoder cannot be pre-trained to find them; make "
            "more phantoms (--n) or use scans with lesions")
    assert says in refused(capsys, "train", "--preset", "tiny", "--data", data, "--out", out)
    (data / "ground_truth.json").write_text("[1, 2")
    assert "ground_truth.json is not the ground truth `python -m medvlm phantom` writes" in refused(
        capsys, "train", "--preset", "tiny", "--data", data, "--out", out)
    (data / "ground_truth.json").unlink()
    assert "has no ground_truth.json, so the slice encoder cannot be pre-trained on its scans" in refused(
        capsys, "train", "--preset", "tiny", "--data", data, "--out", out)
    assert not out.exists() and not (tmp_path / "checkpoint-training").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"epochs": -1}, "has a stage 1 whose 'epochs' is -1, not a whole number of at least 1"),
    ({"lr": "fast"}, "has a stage 1 whose 'lr' is \"fast\", not a learning rate above 0 (e.g. 0.001)"),
    ({"lr": 0}, "has a stage 1 whose 'lr' is 0, not a learning rate above 0"),
    ({"batch_size": 2.5}, "has a stage 1 whose 'batch_size' is 2.5, not a whole number of at least 1"),
    ({"batch_size": True}, "has a stage 1 whose 'batch_size' is true, not a whole number of at least 1"),
    ({"tasks": ["captions"]}, "has a stage 1 whose 'tasks' is [\"captions\"], not a list of tasks from report, "
                              "vqa_closed, vqa_open"),
    ({"tasks": []}, "has a stage 1 whose 'tasks' is [], not a list of tasks"),
    ({"trainable": []}, "has a stage 1 whose 'trainable' is [], not a list of the parts it trains"),
    ({"samples_per_scan": 0}, "has a stage 1 whose 'samples_per_scan' is 0, not a whole number of at least 1"),
    ({"finding_loss": -1.0}, "has a stage 1 whose 'finding_loss' is -1.0, not a weight of 0 or more"),
    ({"lora": {"r": "16"}}, "has a stage 1 whose 'lora' is {\"r\": \"16\"}, not an object with a whole 'r'"),
    ({"lora": {"r": 16, "alpha": 32, "dropuot": 0.1}}, "whose 'lora' is {\"r\": 16, \"alpha\": 32, \"dropuot\": 0.1}"),
    ({"name": "a/b"}, "has a stage 1 whose 'name' is \"a/b\", not a name that can be a folder's"),
    ({"name": "instruct"}, "has two stages named 'instruct'"),
    ({"epoch": 2}, "has a stage 1 whose 'epoch' is not a stage setting (a stage takes name, tasks, epochs, lr"),
])
def test_train_with_a_preset_file_whose_stage_has_a_bad_value(tmp_path, capsys, change, message):
    """A hand-written preset is refused as it is read, not after the encoder's pre-training and feature caching."""
    from medvlm.train import PRESETS

    preset = json.loads((PRESETS / "tiny.json").read_text())
    preset["stages"][0] |= change
    path = tmp_path / "my.json"
    path.write_text(json.dumps(preset))
    data = tmp_path / "data"
    write_phantom_set(data, n=2, seed=5, formats=("nifti",), matrix=32)
    error = refused(capsys, "train", "--preset", path, "--data", data, "--out", tmp_path / "checkpoint")
    assert f"the preset {path} " in error and message in error
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "checkpoint-training").exists()
