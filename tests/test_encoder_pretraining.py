"""The demo encoder's pre-training targets: where a lesion is, on the encoder's own input grid."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny_model import tiny_config, tiny_tokenizer

from medvlm.encoder_pretraining import (
    augment,
    balanced_bce,
    lesion_maps,
    patch_detection,
    patch_targets,
    within_modality_auc,
)
from medvlm.preprocess import encoder_input
from medvlm.volume import Volume

SHAPE = (20, 64, 64)  # z, y, x voxels of 2 × 1 × 1 mm


def _ct_with_sphere(centre: tuple[int, int, int], diameter_mm: float) -> Volume:
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    data = np.full(SHAPE, 40.0, dtype=np.float32)  # soft tissue
    inside = ((z - centre[0]) * 2.0) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= (diameter_mm / 2) ** 2
    data[inside] = 900.0  # calcification
    affine = np.diag([2.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]
    return Volume(data, (2.0, 1.0, 1.0), affine, "CT", "npy", "RAS")


@pytest.fixture(scope="module")
def config():
    return tiny_config(tiny_tokenizer(), image_size=64, slice_spacing_mm=4.0)


def test_lesion_map_lies_where_the_encoder_sees_the_lesion(config):
    """The map marks the pixels, slabs and class of the sphere, in display orientation, with its diameter."""
    volume = _ct_with_sphere((10, 40, 16), diameter_mm=10)
    truth = {"spacing": [2.0, 1.0, 1.0],
             "lesions": [{"organ": "liver", "kind": "calcification", "center_voxel": [10, 40, 16], "diameter_mm": 10}]}
    classes = ["kidney cyst", "liver calcification"]
    pixels, _ = encoder_input(volume, config)
    coverage, diameter = lesion_maps(volume, truth, classes, pixels.shape[0], config.image_size)
    assert coverage.shape == (pixels.shape[0], 2, 64, 64) and diameter.shape == (pixels.shape[0], 64, 64)
    assert not coverage[:, 0].any(), "a class the scan does not hold is marked"
    marked = coverage[:, 1].astype(bool)
    image = pixels.mean(1).numpy()
    bright = image > np.median(image) + 0.01  # brighter than soft tissue
    assert bright.any()
    # Every slab and pixel where the calcification shows in the encoder's input is marked, and nearly only those.
    assert marked[bright].all()
    assert marked.sum() <= 2 * bright.sum()
    # Display orientation: the patient's left (high x) is on the image's right, anterior (high y) at the top.
    slab = int(np.argmax(marked.sum((1, 2))))
    rows, cols = np.nonzero(marked[slab])
    assert abs(rows.mean() - (63 - 40)) <= 1 and abs(cols.mean() - (63 - 16)) <= 1
    assert set(np.unique(diameter[marked])) == {10} and not diameter[~marked].any()
    assert not marked[0].any() and not marked[-1].any()  # slabs far from the sphere


def test_patch_targets_mark_any_patch_a_lesion_touches():
    coverage = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    coverage[0, 0, 15:17, 15:17] = 1  # four pixels at the corner of four 16-px patches
    diameter = coverage[:, 0] * 3
    present, size = patch_targets(coverage, diameter, 16)
    assert present.shape == (1, 1, 2, 2) and present.sum() == 4
    assert torch.equal(size, torch.full((1, 2, 2), 3.0))


def test_augmented_targets_follow_the_lesion():
    """However a batch is mirrored and turned, the patch that holds the bright lesion is the one its targets name."""
    pixels = torch.zeros(2, 3, 64, 64)
    pixels[:, :, 20:28, 36:44] = 1.0  # patch (row 1, column 2) of a 4×4 grid of 16-pixel patches
    present = torch.zeros(2, 1, 4, 4)
    present[:, 0, 1, 2] = 1
    diameter = present[:, 0] * 7
    placements = set()
    for seed in range(12):
        seen, targets, sizes = augment(pixels, present, diameter, torch.Generator().manual_seed(seed))
        brightest = int(torch.nn.functional.avg_pool2d(seen[0, :1], 16).flatten().argmax())
        assert brightest == int(targets[0, 0].flatten().argmax()) == int(sizes[0].flatten().argmax())
        assert targets.sum() == 2 and sizes.max() == 7
        placements.add(brightest)
    assert len(placements) >= 4  # it does move


def test_balanced_loss_punishes_predicting_nothing():
    """With one positive patch in a thousand, a plain mean rewards "no lesion anywhere"; the balanced loss does not."""
    targets = torch.zeros(1000)
    targets[7] = 1
    nothing = torch.full((1000,), -6.0)
    found = nothing.clone()
    found[7] = 6.0
    plain = torch.nn.functional.binary_cross_entropy_with_logits
    assert plain(nothing, targets) < 0.01  # what the old objective settled on
    assert balanced_bce(nothing, targets) > 2.0
    assert balanced_bce(found, targets) < 0.01


def test_pretrained_encoder_is_kept_and_reused(tmp_path, monkeypatch):
    """A resumed run, or a second ablation variant on the same data and seed, does not pre-train again."""
    import medvlm.encoder_pretraining as pretraining
    from medvlm.phantom import write_phantom_set

    write_phantom_set(tmp_path / "data", n=3, seed=5, formats=("nifti",), matrix=48)
    config = tiny_config(tiny_tokenizer())
    images = sorted(str(p.relative_to(tmp_path / "data")) for p in (tmp_path / "data").rglob("*.nii.gz"))
    settings = {"steps": 2, "batch_size": 16, "lr": 1e-3}
    first = pretraining.pretrain_encoder_once(tmp_path / "cache", config, tmp_path / "data", images, settings, 0.6,
                                              progress=False, held_out=images[:2])
    judged = first.summary["held_out_detection"]  # how well it finds lesions in scans set aside, in training.json
    assert judged["scans"] == 2 and all(0.0 <= auc <= 1.0 for auc in judged["auc"].values())
    calls = []
    monkeypatch.setattr(pretraining, "pretrain_encoder", lambda *args, **kwargs: calls.append(args) or first)
    again = pretraining.pretrain_encoder_once(tmp_path / "cache", config, tmp_path / "data", images, settings, 0.6,
                                              progress=False, held_out=images[:2])
    assert not calls and again.similarity_threshold == first.similarity_threshold
    assert all(torch.equal(again.state_dict[name], tensor) for name, tensor in first.state_dict.items())
    uniform = copy.deepcopy(config)
    uniform.slice_selection, uniform.slice_budget = "uniform", config.slice_budget + 1
    shared = pretraining.pretrain_encoder_once(tmp_path / "cache", uniform, tmp_path / "data", images, settings, 0.6,
                                               progress=False, held_out=images[:2])
    assert not calls and shared.similarity_threshold == first.similarity_threshold  # selection acts after it
    other_seed = pretraining.pretrain_encoder_once(tmp_path / "cache", config, tmp_path / "data", images, settings,
                                                   0.6, progress=False, seed=1, held_out=images[:2])
    assert other_seed is first and len(calls) == 1  # a different seed is a different encoder: trained anew
    monkeypatch.setattr(pretraining, "PREPROCESSING_VERSION", pretraining.PREPROCESSING_VERSION + 1)
    pretraining.pretrain_encoder_once(tmp_path / "cache", config, tmp_path / "data", images, settings, 0.6,
                                      progress=False, held_out=images[:2])
    assert len(calls) == 2  # slices read otherwise by a newer version: not the cached encoder's training data
    (tmp_path / "data" / images[-1]).touch()  # a scan rewritten in place (phantoms made again, a volume fixed)
    pretraining.pretrain_encoder_once(tmp_path / "cache", config, tmp_path / "data", images, settings, 0.6,
                                      progress=False, held_out=images[:2])
    assert len(calls) == 3


def test_lesion_finding_is_judged_within_the_modality_it_occurs_in():
    """A head that fires on every PET scan finds no lung hot spot: it must rank the PET scans holding one
    above the PET scans without, not above the CT scans."""
    classes = ["lung hypermetabolic focus", "lung solid nodule"]
    modalities = ["PT", "PT", "PT", "PT", "CT", "CT", "CT"]
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [0, 1], [0, 0], [0, 1]], dtype=bool)
    modality_only = np.array([[5.0, 0], [5, 0], [5, 0], [5, 0], [0, 1], [0, 1], [0, 1]])
    assert within_modality_auc(modality_only, labels, modalities, classes) == {
        "lung hypermetabolic focus": 0.5, "lung solid nodule": 0.5}
    finds_them = np.where(labels, 2.0, 1.0)
    assert within_modality_auc(finds_them, labels, modalities, classes) == {
        "lung hypermetabolic focus": 1.0, "lung solid nodule": 1.0}
    backwards = np.where(labels, 1.0, 2.0)
    assert within_modality_auc(backwards, labels, modalities, classes)["lung solid nodule"] == 0.0
    every_ct_holds_it = np.array([[0, 1]] * 7, dtype=bool) & (np.array(modalities) == "CT")[:, None]
    assert within_modality_auc(finds_them, every_ct_holds_it, modalities, classes) == {}  # nothing to rank against


def test_hard_negatives_weigh_the_normal_patches_that_look_like_a_lesion():
    """Ten lesion patches found; of 1,000 normal patches, 990 clearly normal and 10 scored like lesions. The
    plain balanced loss barely notices the 10 (they are 1 % of the negatives); with hard_negatives 0.01 the
    negatives' half is as much about them as about all the rest, and 0 is the plain loss."""
    targets = torch.cat([torch.ones(10), torch.zeros(1000)])
    lesion_like = torch.cat([torch.full((10,), 5.0), torch.full((990,), -5.0), torch.full((10,), 3.0)])
    all_clear = torch.cat([torch.full((10,), 5.0), torch.full((1000,), -5.0)])
    plain, hard = balanced_bce(lesion_like, targets), balanced_bce(lesion_like, targets, 0.01)
    assert hard > 10 * plain
    assert torch.isclose(balanced_bce(all_clear, targets, 0.01), balanced_bce(all_clear, targets))
    assert balanced_bce(lesion_like, targets, 0.0) == plain


def test_a_bad_hard_negative_share_stops_train_with_one_line(tmp_path, capsys):
    from medvlm.__main__ import main
    from medvlm.train import load_preset

    preset = load_preset("demo")
    preset["encoder_pretraining"]["hard_negatives"] = 2
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    assert main(["train", "--preset", str(tmp_path / "preset.json"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: train: encoder_pretraining hard_negatives must be a share in [0, 1), not 2"


def test_patch_detection_shows_what_a_high_auc_hides_among_thousands_of_normal_patches():
    """1,000 CT patches, 10 touched by a lesion. A scorer that puts every lesion patch above 960 normal ones
    but below 30 others has an AUC of 0.97, yet a scan read by its highest patch finds a normal one: its
    average precision (10 / 40) says so. PET patches, none touched, have nothing to rank and are left out."""
    touched = np.zeros(1000, dtype=bool)
    touched[:10] = True
    misled = np.zeros(1000)
    misled[:10], misled[10:40] = 1.0, 2.0
    modalities = ["CT"] * 1000
    judged = patch_detection(misled, touched, modalities)["CT"]
    assert judged == {"auc": 0.97, "average_precision": 0.25, "base_rate": 0.01, "patches": 1000}
    perfect = patch_detection(touched.astype(float), touched, modalities)["CT"]
    assert perfect["auc"] == perfect["average_precision"] == 1.0
    with_pet = patch_detection(np.concatenate([misled, misled]), np.concatenate([touched, np.zeros(1000, bool)]),
                               modalities + ["PT"] * 1000)
    assert set(with_pet) == {"CT"}


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["per_class", "factored"])
def test_demo_pretraining_finds_a_lesion_no_one_could_miss(tmp_path, heads):
    """CT volumes of a uniform soft-tissue body with a spine; half hold a 16 mm sphere 80 HU brighter than the body.
    Pre-trained with the demo preset's recipe (tower, loss, augmentation) for 150 steps on 200 of them, with
    either kind of head, the encoder must tell the others that hold a sphere from those that do not, and rank the
    sphere's patches above nearly all the others. The demo's first recipe, a small ViT, failed this (AUC 0.45): it
    learned where lesions tend to be, not what one looks like."""
    import nibabel as nib

    from medvlm.configuration import MedVLMConfig
    from medvlm.encoder_pretraining import pretrain_encoder
    from medvlm.train import load_preset

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:24, :128, :128]
    body = (((y - 64) / 50) ** 2 + ((x - 64) / 60) ** 2 <= 1)[0]
    spine = ((y - 100) ** 2 + (x - 64) ** 2 <= 64)[0]
    truth = {}
    for index in range(260):
        data = np.repeat(np.where(body, 40.0, -1000.0).astype(np.float32)[None], 24, axis=0)
        data[:, spine] = 700.0
        data += rng.normal(0, 10, data.shape).astype(np.float32)
        lesions = []
        if index % 2 == 0:
            centre = [float(rng.uniform(5, 19)), float(rng.uniform(35, 85)), float(rng.uniform(30, 98))]
            data[((z - centre[0]) * 4) ** 2 + ((y - centre[1]) * 1.5) ** 2 + ((x - centre[2]) * 1.5) ** 2 <= 64] = 120.0
            lesions.append({"organ": "liver", "kind": "cyst", "diameter_mm": 16.0, "center_voxel": centre})
        name = f"scan{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), np.diag([1.5, 1.5, 4.0, 1.0])), tmp_path / name)
        truth[name] = {"lesions": lesions, "spacing": [4.0, 1.5, 1.5]}
    (tmp_path / "ground_truth.json").write_text(json.dumps(truth))
    preset = load_preset("demo")
    images = sorted(truth)
    settings = {**preset["encoder_pretraining"], "steps": 150, "heads": heads}
    result = pretrain_encoder(MedVLMConfig(**preset["model"]), tmp_path, images[:200], settings, None,
                              progress=False, held_out=images[200:])
    judged = result.summary["held_out_detection"]
    assert judged["auc"]["liver cyst"] >= 0.9
    patches = judged["patch"]["CT"]  # the sphere touches under 1 % of the patches: precision, not only AUC
    assert patches["auc"] >= 0.9 and patches["average_precision"] >= 0.5


def test_an_unknown_kind_of_pretraining_head_stops_train_with_one_line(tmp_path, capsys):
    from medvlm.__main__ import main
    from medvlm.train import load_preset

    preset = load_preset("demo")
    preset["encoder_pretraining"]["heads"] = "per_organ"
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    assert main(["train", "--preset", str(tmp_path / "preset.json"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: train: unknown encoder_pretraining heads 'per_organ'; choose from per_class, factored"
    assert not (tmp_path / "out").exists()


def test_the_model_card_gives_per_patch_precision_beside_the_scan_auc(tmp_path):
    """A checkpoint whose training.json holds per-patch figures shows them in its card, AUC beside average
    precision and base rate, so a reader sees that a high AUC can still leave a scan's top patch a normal one."""
    import shutil

    from medvlm.model_card import write_model_card
    from medvlm.pipeline import DEMO_CHECKPOINT

    shutil.copy(DEMO_CHECKPOINT / "config.json", tmp_path)
    training = json.loads((DEMO_CHECKPOINT / "training.json").read_text())
    training["encoder_pretraining"]["held_out_detection"]["patch"] = {
        "CT": {"auc": 0.918, "average_precision": 0.034, "base_rate": 0.0028, "patches": 54848}}
    (tmp_path / "training.json").write_text(json.dumps(training))
    card = write_model_card(tmp_path, "python -m medvlm train ...").read_text()
    assert "CT AUC 0.92, average precision 0.034 (base rate 0.0028)" in card
    assert "mean AUC of" in card


def test_the_model_card_reads_the_findings_probe_against_its_floors(tmp_path):
    """A run's probe loss is shown beside both floors, so a reader can tell tokens that tell only the modality."""
    import shutil

    from medvlm.model_card import write_model_card
    from medvlm.pipeline import DEMO_CHECKPOINT

    shutil.copy(DEMO_CHECKPOINT / "config.json", tmp_path)
    training = json.loads((DEMO_CHECKPOINT / "training.json").read_text())
    training["probe"] = {"val_bce": 0.1241, "priors": 0.18227, "modality": 0.12395}
    (tmp_path / "training.json").write_text(json.dumps(training))
    card = write_model_card(tmp_path, "python -m medvlm train ...").read_text()
    assert "validation loss 0.124, against 0.182 for the class priors and 0.124 for each finding's rate" in card
    del training["probe"]
    (tmp_path / "training.json").write_text(json.dumps(training))
    assert "Findings probe" not in write_model_card(tmp_path, "python -m medvlm train ...").read_text()
