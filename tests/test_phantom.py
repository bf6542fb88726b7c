"""Phantoms: determinism, lesions inside their organ at the stated intensity, reports, M3D files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from medvlm.phantom import KINDS, ORGANS, SIDES, make_phantom, parse_findings, sphere_box, write_phantom_set
from medvlm.phantom_text import VQA_COLUMNS, findings_from_ground_truth

MODALITIES = ("ct", "mr", "pt")
ORGAN_LABEL = {"lung": "lung", "liver": "liver", "kidney": "kidney", "lymph node": "axilla", "brain": "brain"}


def _lesion_voxels(phantom, lesion) -> tuple[tuple, np.ndarray]:
    return sphere_box(phantom.data.shape, phantom.spacing, np.asarray(lesion.center_voxel), lesion.diameter_mm / 2)


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_phantom_other_seed_other_phantom(modality):
    first, again, other = (make_phantom(seed, modality, matrix=64) for seed in (5, 5, 6))
    assert np.array_equal(first.data, again.data) and first.report == again.report
    assert first.data.shape != other.data.shape or not np.array_equal(first.data, other.data)
    assert first.report != other.report


@pytest.mark.parametrize("modality", MODALITIES)
def test_lesions_lie_inside_their_organ_at_the_stated_intensity(modality):
    seen = 0
    for seed in range(8):
        phantom = make_phantom(seed, modality, matrix=64)
        for lesion in phantom.lesions:
            assert lesion.organ in ORGANS and lesion.kind in KINDS and lesion.side in SIDES
            box, mask = _lesion_voxels(phantom, lesion)
            organ = next(k for k, v in phantom.label_names.items() if v == ORGAN_LABEL[lesion.organ])
            assert np.all(phantom.labels[box][mask] == organ), f"{lesion} leaves its organ"
            inside = phantom.data[box][mask]
            noise_sd = phantom.noise_sd * (lesion.value if modality == "pt" else 1.0)
            assert abs(inside.mean() - lesion.value) < 4 * noise_sd / np.sqrt(inside.size), lesion
            if modality == "pt":  # SUVmax as a reader measures it: the hottest voxel, not the painted mean
                assert lesion.suv_max == round(float(inside.max()), 1), lesion
            x_mm = (lesion.center_voxel[2] - (phantom.data.shape[2] - 1) / 2) * phantom.spacing[2]
            if modality != "mr":  # body phantoms are centred on x = 0 mm; +x is the patient's right
                assert (x_mm > 0) == (lesion.side == "right")
            seen += 1
    assert seen > 0


def test_liver_on_the_patients_right_spleen_on_the_left():
    phantom = make_phantom(1, "ct", matrix=64)
    names = {v: k for k, v in phantom.label_names.items()}
    columns = np.arange(phantom.data.shape[2])
    liver_x = columns[np.any(phantom.labels == names["liver"], axis=(0, 1))].mean()
    spleen_x = columns[np.any(phantom.labels == names["spleen"], axis=(0, 1))].mean()
    assert liver_x > spleen_x  # x index grows toward the patient's right (RAS+)
    assert np.median(phantom.data[phantom.labels == names["lung"]]) < -700


def test_reports_vary_and_parse_back_to_the_ground_truth():
    reports = set()
    for seed in range(40):
        phantom = make_phantom(seed, MODALITIES[seed % 3], matrix=48)
        reports.add(phantom.report)
        truth = findings_from_ground_truth({"lesions": phantom.lesion_dicts()})
        assert parse_findings(phantom.report) == truth, phantom.report
    assert len(reports) == 40
    assert parse_findings("A 14 mm solid nodule in the right upper lobe. The liver is unremarkable.")[0].size_mm == 14


def test_realistic_ct_has_a_clinical_grid_and_spacing():
    phantom = make_phantom(11, "ct")  # how long it takes is `python -m medvlm bench`'s business
    slices, rows, cols = phantom.data.shape
    assert 24 <= slices <= 300 and 384 <= rows <= 512 and rows == cols
    assert 0.6 <= phantom.spacing[1] <= 1.0 and 0.6 <= phantom.spacing[0] <= 5.0


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    summary = write_phantom_set(out, n=6, seed=3, formats=("npy", "nifti", "dicom"), npy_shape=(32, 48, 48),
                                matrix=48)
    return out, summary


def test_m3d_cap_json_has_three_splits_whose_files_exist(phantom_set):
    out, _summary = phantom_set
    captions = json.loads((out / "M3D_Cap.json").read_text())
    assert list(captions) == ["train", "validation", "test"] and sum(map(len, captions.values())) == 6
    for items in captions.values():
        for item in items:
            assert (out / item["image"]).exists() and (out / item["text"]).exists()
            assert np.load(out / item["image"]).shape == (1, 32, 48, 48)
    truth = json.loads((out / "ground_truth.json").read_text())
    assert set(truth) == {item["image"] for items in captions.values() for item in items}


def test_vqa_csv_has_the_m3d_columns_and_consistent_answers(phantom_set):
    out, _ = phantom_set
    rows = 0
    for name in ("M3D_VQA_train.csv", "M3D_VQA_val.csv", "M3D_VQA_test.csv"):
        with open(out / name, newline="") as handle:
            reader = csv.DictReader(handle)
            assert tuple(reader.fieldnames) == VQA_COLUMNS
            for row in reader:
                choices = [row[f"Choice {letter}"] for letter in "ABCD"]
                assert len(set(choices)) == 4 and row["Answer"] == row[f"Choice {row['Answer Choice']}"]
                assert 1 <= int(row["Question Type"]) <= 5 and (out / row["Image Path"]).exists()
                rows += 1
    assert rows == 6 * 5


def test_written_nifti_and_dicom_load_back_with_shape_and_spacing(phantom_set):
    from medvlm.volume import load_volume

    out, _ = phantom_set
    truth = json.loads((out / "ground_truth.json").read_text())
    for image, entry in list(truth.items())[:3]:
        stem = image.removesuffix(".npy")
        for path in (out / f"{stem}.nii.gz", out / f"{stem}_dicom"):
            volume = load_volume(path)
            assert list(volume.shape) == entry["source_shape"]
            assert np.allclose(volume.spacing, entry["source_spacing"], atol=1e-3)
            assert volume.modality == entry["modality"]


def test_npy_ground_truth_points_at_the_lesion_in_the_m3d_array(phantom_set):
    from medvlm.phantom_set import m3d_intensities
    from medvlm.volume import load_volume

    out, _ = phantom_set
    truth = json.loads((out / "ground_truth.json").read_text())
    checked = 0
    for image, entry in truth.items():
        index = int(image.split("_")[-1].removesuffix(".npy"))
        phantom = make_phantom([3, index], entry["modality"].lower(), matrix=48)
        source = m3d_intensities(phantom)
        m3d = load_volume(out / image).data
        for lesion in entry["lesions"]:
            if min(lesion["radius_voxels"]) >= 1.0:
                expected = source[tuple(np.round(lesion["source_center_voxel"]).astype(int))]
                assert abs(m3d[tuple(np.round(lesion["center_voxel"]).astype(int))] - expected) < 0.15
                checked += 1
    assert checked > 0
