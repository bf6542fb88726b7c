"""M3D-Cap and M3D-VQA readers (DESIGN section 7): one code path for the phantoms and the real data.

    root/M3D_Cap.json                    {"train"|"validation"|"test": [{"image": REL.npy, "text": REL.txt}]}
    root/M3D_VQA_{train,val,test}.csv    Image Path, Text, Question Type, Question, Choice A..D, Answer, Answer Choice

Every sample is a two-turn chat (user prompt, assistant reference) about one scan, with image
paths relative to `root`. `build_labels` turns a chat into token ids and training labels. A folder
that is not in the M3D layout raises UserInputError.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .configuration import REPORT_PROMPT
from .errors import UserInputError, VolumeError
from .prompt import prompt_text
from .volume import Volume, error_reason, listed_files, load_volume

# Other wordings of a checkpoint's `report_prompt`, which training asks too, for variety.
REPORT_PARAPHRASES = (
    "Describe the findings of this scan.",
    "Please write the findings for this medical image.",
    "What are the findings in this volume? Write a report.",
    "Generate a findings report for this examination.",
)
CAP_FILE = "M3D_Cap.json"
VQA_FILES = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"}
GROUND_TRUTH_FILE = "ground_truth.json"  # phantom sets only: every lesion of every volume
VQA_COLUMNS = ("Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")
QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
CHOICE_LETTERS = ("A", "B", "C", "D")
IGNORE_INDEX = -100  # label value the loss skips


@dataclass
class Sample:
    """One chat about one scan: the user's prompt and the reference answer."""

    image: str  # path of the .npy volume relative to the data root
    messages: list[dict]  # [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}]
    task: str  # "report" | "vqa_closed" | "vqa_open"
    question_type: int | None = None  # M3D-VQA type 1..5 (QUESTION_TYPES); None for reports
    answer_choice: str | None = None  # "A".."D" for closed-ended questions, else None


def check_split(split: str) -> None:
    """An M3D split name: train, validation or test."""
    if split not in VQA_FILES:
        raise UserInputError(f"unknown split {split!r}; use one of {', '.join(VQA_FILES)}")


def _chat(prompt: str, reference: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}]


def read_m3d_cap(root: str | Path, split: str, prompts: tuple[str, ...] = (REPORT_PROMPT,)) -> list[Sample]:
    """Report samples of `split` from root/M3D_Cap.json; each reference is the item's .txt file, stripped.

    With several `prompts`, item i gets prompts[i % len(prompts)] (deterministic variety for training).
    """
    check_split(split)
    root = Path(root)
    path = root / CAP_FILE
    if not path.is_file():
        raise UserInputError(f"no {CAP_FILE} in {root}; point to a folder in the M3D-Cap layout")
    try:
        table = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark some editors write
    except ValueError as error:  # UnicodeDecodeError among them
        raise UserInputError(f"{path} is not valid UTF-8 JSON ({error_reason(error)}); M3D-Cap needs keys train, "
                             "validation and test") from None
    if not isinstance(table, dict) or not isinstance(table.get(split), list):
        raise UserInputError(f"{path} has no {split!r} list; M3D-Cap needs keys train, validation and test")
    samples = []
    for index, item in enumerate(table[split]):
        if not isinstance(item, dict) or not all(isinstance(item.get(key), str) for key in ("image", "text")):
            raise UserInputError(f"item {index} of {split!r} in {path} lacks 'image' or 'text' (a path each); both "
                                 "are required")
        try:
            report = (root / item["text"]).read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else "not UTF-8 text"
            raise UserInputError(f"cannot read the report {item['text']} of item {index} of {split!r} in {path} "
                                 f"({reason}); restore it, save it as UTF-8, or fix {CAP_FILE}") from None
        samples.append(Sample(scan_name(root, item["image"]), _chat(prompts[index % len(prompts)], report), "report"))
    return samples


def load_scan(root: str | Path, image: str) -> Volume:
    """A scan the data names (`image`: a path relative to `root`, or absolute), read with `load_volume`; a refusal
    names it by that path, not its file name alone (in M3D-Cap thousands of files share a few names)."""
    try:
        return load_volume(Path(root) / image)
    except VolumeError as error:
        text, name = str(error), Path(image).name
        if text.startswith(f"{name} ") and image != name:
            raise VolumeError(image + text[len(name):]) from None
        raise


def scan_name(root: Path, image: str) -> str:
    """A scan's path as the data names it, relative to the data folder where an absolute one lies inside it (also
    through a link to the folder): one scan named both ways (absolute in M3D_Cap.json, relative in the CSV) is one
    scan, with one ground truth entry and one set of cached features. A relative one is kept as written (ground
    truth keys are too; "a/link/../b" is not "a/b" where "link" is a link)."""
    path = Path(image)
    if not path.is_absolute():
        return image
    for inside, folder in ((path, Path(root).absolute()), (path.resolve(), Path(root).resolve())):
        with contextlib.suppress(ValueError):
            return inside.relative_to(folder).as_posix()
    return image


def closed_prompt(row: dict) -> str:
    """M3D's closed-ended prompt: "<question> Choices: A. <a> B. <b> C. <c> D. <d>"."""
    choices = " ".join(f"{letter}. {row[f'Choice {letter}']}" for letter in CHOICE_LETTERS)
    return f"{row['Question']} Choices: {choices}"


def read_m3d_vqa(root: str | Path, split: str, closed: bool = True, open: bool = True) -> list[Sample]:
    """VQA samples of `split` from root/M3D_VQA_{train,val,test}.csv: closed-ended and/or open-ended per row.

    Closed: prompt `closed_prompt(row)`, reference "<letter>. <answer>"; open: the question, the answer.
    """
    check_split(split)
    path = Path(root) / VQA_FILES[split]
    if not path.is_file():
        raise UserInputError(f"no {VQA_FILES[split]} in {root}; point to a folder in the M3D-VQA layout")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark Excel writes
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames, list(reader)
    except UnicodeDecodeError:
        raise UserInputError(f"{path} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in Excel)") from None
    missing = [c for c in VQA_COLUMNS if c not in (fields or [])]
    if missing:
        raise UserInputError(f"{path} lacks the M3D-VQA columns {missing}; expected {', '.join(VQA_COLUMNS)}")
    samples = []
    for line, row in enumerate(rows, start=2):
        if any(row.get(column) is None for column in VQA_COLUMNS):
            raise UserInputError(f"{path}, line {line}: the row has fewer fields than the header; fix the row")
        try:  # "1.0" is 1: what pandas writes for a column that held an empty cell
            number = float(row["Question Type"])
        except (TypeError, ValueError):
            number = math.nan
        if not (number.is_integer() and 1 <= number <= 5):
            raise UserInputError(f"{path}, line {line}: Question Type {row['Question Type']!r} is not one of M3D-VQA's "
                                 "types 1 to 5 (plane, phase, organ, abnormality, location); fix the row")
        question_type = int(number)
        letter = row["Answer Choice"].strip().rstrip(".").upper()  # "b", "B." are B; the reference says "B."
        if letter not in CHOICE_LETTERS:
            raise UserInputError(f"{path}, line {line}: Answer Choice {row['Answer Choice']!r} is not one of "
                                 f"{', '.join(CHOICE_LETTERS)}; the closed-ended score would be wrong, so fix the row")
        if not row["Answer"].strip():
            raise UserInputError(f"{path}, line {line}: the Answer is empty, so the model would learn to answer with "
                                 "nothing and be scored against nothing; fix the row")
        if closed:
            samples.append(Sample(scan_name(root, row["Image Path"]),
                                  _chat(closed_prompt(row), f"{letter}. {row['Answer']}"), "vqa_closed", question_type,
                                  letter))
        if open:
            samples.append(Sample(scan_name(root, row["Image Path"]), _chat(row["Question"], row["Answer"]),
                                  "vqa_open", question_type))
    return samples


def scan_stamps(root: str | Path, images: list[str]) -> dict[str, list[int]]:
    """Per scan path (relative to `root`): [size in bytes, modification time in ns] of its file, or of the files
    of a DICOM folder that the loader reads (their total size and newest time). A scan rewritten since a cache
    was made shows here; the files themselves are not read (M3D holds 120 k volumes). A scan that is not there
    gets [-1, -1]."""
    stamps = {}
    for image in images:
        try:
            files = [file.stat() for file in listed_files(Path(root) / image)]  # the files the loader reads
            stamps[image] = [sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]
        except (OSError, UserInputError):  # not there, or not a scan: loading it will say why
            stamps[image] = [-1, -1]
    return stamps


def scan_digest(root: str | Path, image: str) -> str:
    """A digest of the content of the file(s) the loader reads for a scan (`image`: a path relative to `root`; a
    DICOM folder's files in order, each with its path inside the folder): the same for a copy of the data anywhere,
    whatever its file times. Every byte is read (in chunks), so it is taken only of scans being encoded or whose
    stamps (`scan_stamps`) changed. A scan that is not there raises OSError."""
    path = Path(root) / image
    digest = hashlib.blake2b(digest_size=16)
    for file in listed_files(path):  # sorted: a folder's files in a stable order
        with file.open("rb") as handle:
            content = hashlib.file_digest(handle, "blake2b").digest()
        digest.update(f"{file.relative_to(path).as_posix()}\0".encode() + content)
    return digest.hexdigest()


def build_labels(tokenizer, messages: list[dict], image_token: str, num_image_tokens: int,
                 max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for a chat whose last turn is the assistant's answer.

    The prompt is the chat template with the generation prompt (exactly what inference feeds),
    the image placeholder at the start of the first user turn expanded to `num_image_tokens`
    copies; labels are IGNORE_INDEX on it and the answer tokens (with its end-of-turn token) are
    learned. The answer is cut so the whole fits `max_length` tokens.
    """
    prompt = prompt_text(tokenizer, messages[:-1], image_token, num_image_tokens, add_generation_prompt=True)
    full = prompt_text(tokenizer, messages, image_token, num_image_tokens, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the answer in a way that changes the prompt; fix the template")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
    if len(prompt_ids) >= max_length:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit max_length {max_length}; raise it")
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids
