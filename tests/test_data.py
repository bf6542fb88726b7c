"""M3D-Cap / M3D-VQA readers on a tiny folder written in the published layout, and label building."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from medvlm.data import (
    IGNORE_INDEX,
    REPORT_PROMPT,
    VQA_COLUMNS,
    build_labels,
    load_scan,
    read_m3d_cap,
    read_m3d_vqa,
)
from medvlm.errors import VolumeError

VQA_ROW = {"Image Path": "ct/0001.npy", "Text": "A 12 mm nodule in the right lung.", "Question Type": "3",
           "Question": "Which organ shows an abnormality?", "Choice A": "liver", "Choice B": "lung",
           "Choice C": "kidney", "Choice D": "spleen", "Answer": "lung", "Answer Choice": "B"}


@pytest.fixture
def m3d_root(tmp_path):
    """A folder in M3D's layout: one volume per split, its report, the Cap JSON and the VQA CSVs."""
    (tmp_path / "ct").mkdir()
    volume = np.linspace(0, 1, 2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    cap = {}
    for split, name in (("train", "0001"), ("validation", "0002"), ("test", "0003")):
        np.save(tmp_path / "ct" / f"{name}.npy", volume)
        (tmp_path / "ct" / f"{name}.txt").write_text(f"Report {name}: no focal lesion.\n")
        cap[split] = [{"image": f"ct/{name}.npy", "text": f"ct/{name}.txt"}]
    (tmp_path / "M3D_Cap.json").write_text(json.dumps(cap))
    for csv_split in ("train", "val", "test"):
        with (tmp_path / f"M3D_VQA_{csv_split}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=VQA_COLUMNS)
            writer.writeheader()
            writer.writerow(VQA_ROW)
    return tmp_path


def test_cap_reads_report_text_with_the_inference_prompt(m3d_root):
    [sample] = read_m3d_cap(m3d_root, "validation")
    assert sample.image == "ct/0002.npy" and sample.task == "report"
    assert sample.messages == [{"role": "user", "content": REPORT_PROMPT},
                               {"role": "assistant", "content": "Report 0002: no focal lesion."}]


def test_vqa_closed_and_open_follow_m3d_prompts(m3d_root):
    closed, opened = read_m3d_vqa(m3d_root, "validation")
    assert closed.task == "vqa_closed" and closed.answer_choice == "B" and closed.question_type == 3
    assert closed.messages[0]["content"] == ("Which organ shows an abnormality? "
                                             "Choices: A. liver B. lung C. kidney D. spleen")
    assert closed.messages[1]["content"] == "B. lung"
    assert opened.task == "vqa_open" and opened.answer_choice is None
    assert [m["content"] for m in opened.messages] == ["Which organ shows an abnormality?", "lung"]
    assert [s.task for s in read_m3d_vqa(m3d_root, "test", open=False)] == ["vqa_closed"]


def test_missing_file_and_wrong_columns_say_what_is_wrong(m3d_root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match=r"M3D_Cap\.json"):
        read_m3d_cap(empty, "train")
    with pytest.raises(ValueError, match=r"M3D_VQA_val\.csv"):
        read_m3d_vqa(empty, "validation")
    (m3d_root / "M3D_VQA_train.csv").write_text("Image Path,Question\nct/0001.npy,What?\n")
    with pytest.raises(ValueError, match="Answer Choice"):
        read_m3d_vqa(m3d_root, "train")
    with pytest.raises(ValueError, match="unknown split"):
        read_m3d_cap(m3d_root, "val")


def _write_vqa(path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=VQA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(("written", "read"), [("b", "B"), ("B.", "B"), (" C ", "C")])
def test_an_answer_choice_written_loosely_is_read_as_its_letter(m3d_root, written, read):
    _write_vqa(m3d_root / "M3D_VQA_test.csv", [{**VQA_ROW, "Answer Choice": written}])
    closed, _ = read_m3d_vqa(m3d_root, "test")
    assert closed.answer_choice == read and closed.messages[1]["content"].startswith(f"{read}. ")


@pytest.mark.parametrize("written", ["", "E", "B. lung"])
def test_an_answer_choice_that_is_no_letter_is_refused_not_scored(m3d_root, written):
    """An empty letter would score nearly every answer right ("." is in most), another nearly every one wrong."""
    _write_vqa(m3d_root / "M3D_VQA_test.csv", [VQA_ROW, {**VQA_ROW, "Answer Choice": written}])
    with pytest.raises(ValueError, match=r"M3D_VQA_test\.csv, line 3: Answer Choice .* is not one of A, B, C, D"):
        read_m3d_vqa(m3d_root, "test")


def test_a_scan_that_cannot_be_read_is_named_by_its_path_in_the_data(m3d_root):
    """In M3D-Cap thousands of files share a few names (Axial_C__portal_venous_phase.npy): the refusal names the
    scan by its path in the data folder, so that the one file can be found."""
    (m3d_root / "ct" / "series-7").mkdir()
    np.save(m3d_root / "ct" / "series-7" / "Axial.npy", np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(VolumeError, match=r"^ct/series-7/Axial\.npy has shape \(4, 8, 8, 3\)"):
        load_scan(m3d_root, "ct/series-7/Axial.npy")
    assert load_scan(m3d_root, "ct/0001.npy").shape == (2, 4, 4)


def test_a_question_type_is_one_of_m3ds_five(m3d_root):
    """"1.0" (pandas writes it for a column that held an empty cell) is type 1; 0 or 7 is no M3D-VQA type."""
    _write_vqa(m3d_root / "M3D_VQA_test.csv", [{**VQA_ROW, "Question Type": "1.0"}])
    assert read_m3d_vqa(m3d_root, "test")[0].question_type == 1
    for written in ("0", "7", "x"):
        _write_vqa(m3d_root / "M3D_VQA_test.csv", [VQA_ROW, {**VQA_ROW, "Question Type": written}])
        with pytest.raises(ValueError, match=rf"line 3: Question Type '{written}' is not one of M3D-VQA's types 1"):
            read_m3d_vqa(m3d_root, "test")


def test_an_empty_answer_is_refused_not_taught(m3d_root):
    """An empty Answer would teach the model to answer with nothing, and score an open answer against nothing."""
    _write_vqa(m3d_root / "M3D_VQA_test.csv", [VQA_ROW, {**VQA_ROW, "Answer": " "}])
    with pytest.raises(ValueError, match=r"M3D_VQA_test\.csv, line 3: the Answer is empty"):
        read_m3d_vqa(m3d_root, "test")


def test_a_scan_named_by_its_absolute_path_is_the_scan_named_relative_to_the_data(m3d_root):
    """M3D_Cap.json naming a scan by its absolute path and the CSV by its path in the folder: one scan (one ground
    truth entry, one set of cached features), not two."""
    cap = json.loads((m3d_root / "M3D_Cap.json").read_text())
    cap["test"][0]["image"] = str((m3d_root / "ct" / "0003.npy").resolve())
    (m3d_root / "M3D_Cap.json").write_text(json.dumps(cap))
    _write_vqa(m3d_root / "M3D_VQA_test.csv", [{**VQA_ROW, "Image Path": "ct/0003.npy"}])
    assert {sample.image for sample in read_m3d_cap(m3d_root, "test") + read_m3d_vqa(m3d_root, "test")} == {
        "ct/0003.npy"}
    (m3d_root.parent / "linked").symlink_to(m3d_root)  # the data reached through a link to its folder
    cap["test"][0]["image"] = str(m3d_root.parent / "linked" / "ct" / "0003.npy")
    (m3d_root.parent / "linked" / "M3D_Cap.json").write_text(json.dumps(cap))
    assert read_m3d_cap(m3d_root, "test")[0].image == "ct/0003.npy"
    outside = "/elsewhere/ct/0009.npy"  # a scan outside the folder keeps its path
    cap["test"][0]["image"] = outside
    (m3d_root / "M3D_Cap.json").write_text(json.dumps(cap))
    assert read_m3d_cap(m3d_root, "test")[0].image == outside


def test_files_as_editors_and_spreadsheets_save_them_are_read_or_refused_in_one_sentence(m3d_root):
    _write_vqa(m3d_root / "M3D_VQA_test.csv", [VQA_ROW], encoding="utf-8-sig")  # Excel's CSV UTF-8: a BOM
    assert read_m3d_vqa(m3d_root, "test")[0].answer_choice == "B"
    cap = m3d_root / "M3D_Cap.json"
    cap.write_text(cap.read_text(), encoding="utf-8-sig")
    (m3d_root / "ct" / "0003.txt").write_text("No focal lesion.", encoding="utf-8-sig")
    assert read_m3d_cap(m3d_root, "test")[0].messages[1]["content"] == "No focal lesion."  # the BOM is no text
    refusals = {
        "M3D_VQA_test.csv": ("Image Path,Question Type\nct/0003.npy,caf\xe9\n".encode("latin-1"), "is not UTF-8"),
        "M3D_Cap.json": (json.dumps({"test": None}).encode(), "has no 'test' list"),
    }
    for name, (content, says) in refusals.items():
        before = (m3d_root / name).read_bytes()
        (m3d_root / name).write_bytes(content)
        with pytest.raises(ValueError, match=says):
            read_m3d_vqa(m3d_root, "test") if name.endswith(".csv") else read_m3d_cap(m3d_root, "test")
        (m3d_root / name).write_bytes(before)
    short = ",".join(VQA_COLUMNS) + "\nct/0003.npy,A report.\n"  # a row with two of its ten fields
    (m3d_root / "M3D_VQA_test.csv").write_text(short)
    with pytest.raises(ValueError, match="line 2: the row has fewer fields than the header"):
        read_m3d_vqa(m3d_root, "test")
    cap.write_text(json.dumps({"test": [{"image": None, "text": "ct/0003.txt"}]}))
    with pytest.raises(ValueError, match=r"item 0 of 'test' .* lacks 'image' or 'text'"):
        read_m3d_cap(m3d_root, "test")
    (m3d_root / "ct" / "0003.txt").write_bytes("Lésion".encode("latin-1"))
    cap.write_text(json.dumps({"test": [{"image": "ct/0003.npy", "text": "ct/0003.txt"}]}))
    with pytest.raises(ValueError, match=r"\(not UTF-8 text\); restore it, save it as UTF-8"):
        read_m3d_cap(m3d_root, "test")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template whose turns end with </s>, and an <image> token."""
    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "user", "assistant", ":", "Which", "organ", "?", "B", ".",
             "lung"]
    model = models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   additional_special_tokens=["<s>", "<image>"], chat_template=template)


def test_labels_cover_only_the_answer_and_its_end_of_turn():
    tokenizer = tiny_tokenizer()
    messages = [{"role": "user", "content": "Which organ ?"}, {"role": "assistant", "content": "B . lung"}]
    input_ids, labels = build_labels(tokenizer, messages, "<image>", num_image_tokens=3, max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    assert tokens[:4] == ["<s>", "user", ":", "<image>"] and tokens.count("<image>") == 3
    learned = [tokenizer.convert_ids_to_tokens(i) for i in labels if i != IGNORE_INDEX]
    assert learned == ["B", ".", "lung", "</s>"]
    assert len(input_ids) == len(labels) and "<unk>" not in tokens
    short_ids, short_labels = build_labels(tokenizer, messages, "<image>", num_image_tokens=3,
                                           max_length=len(tokens) - 2)
    assert len(short_ids) == len(tokens) - 2 and [i for i in short_labels if i != IGNORE_INDEX] == labels[-4:-2]
    with pytest.raises(ValueError, match="max_length"):
        build_labels(tokenizer, messages, "<image>", num_image_tokens=3, max_length=5)
