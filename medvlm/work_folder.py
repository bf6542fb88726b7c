"""The work folder of a training run: what lets `train` stop and resume without training anything twice.

    WORK/run.json         what the run's stages were trained from (preset, seed, data, code versions)
    WORK/clock.json       the run's wall time over every invocation (RunClock)
    WORK/metrics.csv      the training figures (MetricsLog)
    WORK/state/STAGE/     epoch-NNN (accelerate's state after an epoch), weights.safetensors, done.json

A run resumes only in a folder whose run.json matches it (`claim_work_folder`); an epoch state counts once
all processes have written it (`save_epoch_state` renames it into place).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME

from .data import Sample
from .errors import UserInputError
from .preprocess import PREPROCESSING_VERSION

PARTIAL = ".partial"  # the suffix of an epoch state while its processes write it
EPOCH_STATE = re.compile(r"epoch-(\d+)(\.partial)?")  # a stage's state after an epoch, epoch-NNN


class RunClock:
    """The wall time a work folder's run has taken over every `train` of it: a run stopped and resumed counts
    both parts, a finished run run again adds its few seconds. Kept in WORK/clock.json by the main process,
    saved as the run goes (every metrics row, every finished phase) and when it ends, so a run killed
    without warning loses at most the time since its last row. `started` (`time.perf_counter()`): when this
    invocation began, if before the clock was made (the data read, the work folder checked)."""

    def __init__(self, path: Path, enabled: bool, started: float | None = None):
        self.path, self.enabled = path, enabled
        try:
            kept = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            kept = {}
        kept = kept if isinstance(kept, dict) else {}
        self.before = float(kept.get("seconds", 0.0))
        self.invocations = int(kept.get("invocations", 0)) + 1
        self.started = time.perf_counter() if started is None else started

    def seconds(self) -> float:
        """Seconds the run has taken so far, this invocation included."""
        return self.before + time.perf_counter() - self.started

    def save(self) -> None:
        """Record the run's time so far (the main process; written whole, then renamed)."""
        if self.enabled:
            written = self.path.with_suffix(PARTIAL)
            written.write_text(json.dumps({"seconds": round(self.seconds(), 1), "invocations": self.invocations}))
            written.replace(self.path)


class MetricsLog:
    """Training figures as CSV rows (stage, epoch, step, loss, lr, val_loss, seconds).

    Every 20 steps a row with the step's loss; at the end of each epoch a row with the epoch's mean
    training loss and the validation loss. `seconds`: the run's wall time so far, from `clock` (a resumed
    run's rows go on from where the stopped one's ended).
    """

    columns = ("stage", "epoch", "step", "loss", "lr", "val_loss", "seconds")

    def __init__(self, path: Path, enabled: bool, clock: RunClock | None = None):
        self.path, self.enabled = path, enabled
        self.clock = clock or RunClock(path.with_name("clock.json"), enabled=False)
        if enabled and not path.exists():
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)

    def forget(self, stage: str, first_epoch: int) -> None:
        """Drop the rows of `stage` from `first_epoch` on: an epoch stopped before its state was saved, trained
        again when the run resumes, is logged once."""
        if not (self.enabled and self.path.exists()):
            return
        with self.path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [row for row in rows[1:] if len(row) == len(self.columns) and row[1].isdigit()  # a killed run's
                and not (row[0] == stage and int(row[1]) >= first_epoch)]  # half-written row goes too
        if len(kept) < len(rows) - 1:
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerows([rows[0], *kept])

    def write(self, **row) -> None:
        if self.enabled:
            row.setdefault("seconds", round(self.clock.seconds(), 1))
            with self.path.open("a", newline="") as handle:
                csv.writer(handle).writerow([row.get(column, "") for column in self.columns])
            self.clock.save()


def epoch_states(state_dir: Path) -> tuple[list[Path], list[Path]]:
    """A stage's epoch states: (the complete ones, oldest first; the unfinished ones).

    Complete: renamed from epoch-NNN.partial to epoch-NNN (save_epoch_state) and holding the main process's
    random states, the last file accelerate's save_state writes (which an epoch-NNN cut off by a run of the
    code before states were renamed into place lacks).
    """
    states = [path for path in state_dir.glob("epoch-*") if path.is_dir() and EPOCH_STATE.fullmatch(path.name)]
    complete = [path for path in states
                if not path.name.endswith(PARTIAL) and (path / f"{RNG_STATE_NAME}_0.pkl").is_file()]
    complete.sort(key=lambda path: int(EPOCH_STATE.fullmatch(path.name)[1]))
    return complete, sorted(set(states) - set(complete))


class TiedHeadNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...lm_head.weight} while saving" warning at every epoch save.

    The demo LMs tie their output head to the input embeddings, so the two names share one tensor and
    safetensors stores it once; loading the state puts it back under both. A shared tensor named anything
    else still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Removed shared tensor" not in message:
            return True
        names = re.findall(r"'([^']+)'", message.partition(" while saving")[0])
        return not names or not all(name.endswith("lm_head.weight") for name in names)


logging.getLogger("accelerate.utils.other").addFilter(TiedHeadNotice())


def save_epoch_state(accelerator: Accelerator, state_dir: Path, epoch: int) -> None:
    """Save the stage's state after `epoch` as state_dir/epoch-NNN, in place of the older one.

    Every process writes its part into epoch-NNN.partial; the main process renames it once all have
    finished, so a run stopped while saving leaves the previous state, complete, to resume from.
    """
    partial = state_dir / f"epoch-{epoch:03d}{PARTIAL}"
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()  # save_state returns when this process has written its own part
    if accelerator.is_main_process:
        partial.rename(state_dir / partial.name.removesuffix(PARTIAL))
        for older in epoch_states(state_dir)[0][:-1]:  # the newest state is enough to resume; older ones fill the disk
            shutil.rmtree(older)


def resume_point(state_dir: Path, accelerator: Accelerator) -> Path | None:
    """The newest complete epoch state of a stage, or None; unfinished ones (a run stopped while saving) are
    removed, and said so."""
    complete, unfinished = epoch_states(state_dir)
    if unfinished:
        accelerator.print(f"stage {state_dir.name}: removing {', '.join(path.name for path in unfinished)}, left "
                          "unfinished by a run stopped while saving it")
        if accelerator.is_main_process:
            for path in unfinished:
                shutil.rmtree(path)
    return complete[-1] if complete else None


RUN_RECORD = "run.json"  # in the work folder: what its stages and states were trained from
CLOCK = "clock.json"  # in the work folder: the run's wall time over every invocation (RunClock)
METRICS = "metrics.csv"  # in the work folder: the training figures (MetricsLog)
RECORDED = {"preset": "another preset", "seed": "another seed", "data": "other data",  # run.json's keys, in words
            "version": "an older version of medvlm (other stage seeds or preprocessing)"}
# Raise it when the same preset, seed and data would train other weights (how a stage draws its random numbers):
# stages trained before cannot be resumed as this version's. 2: each stage's seed from `stage_seed`.
TRAINING_VERSION = 2


def run_record(preset: dict, seed: int, samples: list[Sample]) -> dict[str, str | int]:
    """What a run's stages depend on: the preset after overrides, the seed, the data as read (every
    sample's scan path, task and text; a volume rewritten under the same path with the same text is not
    seen), and the versions of the training and preprocessing code. Digests, so the record stays small for
    M3D's 600 k samples."""
    data = hashlib.sha256()
    for sample in samples:
        data.update(json.dumps(dataclasses.astuple(sample), ensure_ascii=False).encode())
    return {"preset": hashlib.sha256(json.dumps(preset, sort_keys=True).encode()).hexdigest(), "seed": seed,
            "data": data.hexdigest(), "version": f"training {TRAINING_VERSION}, preprocessing {PREPROCESSING_VERSION}"}


def _trained(work: Path) -> bool:
    """Whether the work folder holds a finished stage or epoch: what a run would resume."""
    return any(path.name == "done.json" or (EPOCH_STATE.fullmatch(path.name) and not path.name.endswith(PARTIAL))
               for path in (work / "state").glob("*/*"))


# What else a run's stages were trained from, known once the model is built and the features cached (run.json's
# keys, in words). The scans by their content, not their file times: a copy of the data that does not keep them
# (cp -r, a node's local disk) would refuse every resume.
TRAINED_FROM = {"encoder": "the features of another slice encoder (pre-trained again: the scans changed since)",
                "scans": "the features of other scans under the same paths (rewritten since)"}


def claim_inputs(work: Path, inputs: dict[str, str], is_main_process: bool) -> None:
    """Resume only stages trained from these inputs (TRAINED_FROM: the slice encoder's
    `features.encoder_fingerprint`, the scans' `FeatureCache.content_digest`): a run on scans rewritten under the
    same paths would otherwise save an encoder pre-trained again, or a frozen encoder's features encoded again, with
    stages trained on the old features. The main process records them in run.json (a run from before it did so, or
    one that recorded no input, is resumed as before); a run that trained no stage gives way."""
    path = work / RUN_RECORD
    try:
        kept = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        kept = {}
    differ = [TRAINED_FROM[key] for key, value in inputs.items() if kept.get(key) not in (None, value)]
    if differ and _trained(work):
        raise UserInputError(f"{work} holds stages trained on {' and '.join(differ)}, and they would be resumed as "
                             f"this run's; delete {work / 'state'} to train the stages again (the encoder and "
                             "feature cache are kept)")
    if is_main_process and any(kept.get(key) != value for key, value in inputs.items()):
        written = path.with_suffix(".partial")
        written.write_text(json.dumps({**kept, **inputs}, indent=2))
        written.replace(path)


def claim_work_folder(work: Path, record: dict, is_main_process: bool) -> None:
    """Resume only a run of the same preset, seed and data: the work folder's stages and states were trained
    from what its run.json records, and loading them into another run would pass them off as its own
    (another tokenizer reads their token ids as other words). A run that left no stage or epoch state (it
    failed or was stopped before one) is replaced. The main process records the run."""
    path = work / RUN_RECORD
    trained = _trained(work)
    try:
        kept = json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        kept = {}
    if kept is not None and trained:
        differ = [RECORDED[key] for key in record if kept.get(key) != record[key]]
        if differ:
            raise UserInputError(f"{work} holds a run trained with {' and '.join(differ)}, and its stages "
                                 "would be resumed as this run's; give another --out (or --work), or delete that "
                                 "folder to train from the start")
    elif trained:
        raise UserInputError(f"{work} holds stages of a run that recorded no settings ({RUN_RECORD}, written since "
                             "December 2026), so they cannot be resumed safely; delete its state folder to train "
                             "the stages from the start (the feature cache beside it is reused)")
    elif is_main_process and (kept is None or any(kept.get(key) != value for key, value in record.items())):
        for left in (CLOCK, METRICS):  # another run's time and figures, from before it trained anything
            (work / left).unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        written = path.with_suffix(".partial")  # renamed when whole: the other processes may read it meanwhile
        written.write_text(json.dumps(record, indent=2))
        written.replace(path)
