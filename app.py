"""MedVLM 3D demo: upload a CT, MR or PET scan, scroll it, turn it in 3D, get a report, ask about it.

UI only: every event handler below is a plain function of its inputs (tests call them without a
browser); the model, scans and pictures come from `medvlm`. Nothing here imports torch.

    python app.py                                  # http://localhost:7860, the demo checkpoint
    MEDVLM_CHECKPOINT=org/model python app.py      # a Hub checkpoint (MEDVLM_REVISION pins a revision)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import spaces
from gradio.processing_utils import get_upload_folder
from gradio.route_utils import FnIndexInferError
from starlette.requests import ClientDisconnect

from medvlm.errors import UserInputError
from medvlm.limits import MAX_NEW_TOKENS, MAX_QUESTION_CHARS, MAX_UPLOAD_BYTES
from medvlm.pipeline import MIN_TEMPERATURE, START_AGAIN, CutOff, Encoding, Pipeline
from medvlm.preprocess import AUTO_WINDOW, default_window, known_window, unknown_window
from medvlm.projection import MIP_STEP_DEGREES, mip_cache_bytes, mip_slice
from medvlm.view import (
    MIP,
    PLANES,
    VIEWS,
    acquired_plane,
    mip_spot,
    opening_slice,
    opening_window,
    plane_point,
    slice_count,
    window_limits,
)
from medvlm.view3d import default_threshold, figure_3d, surface_grid, threshold_range
from medvlm.view_html import (
    CLICKED,
    FROM_MIP,
    LESION_CENTRE,
    MODALITY_NAMES,
    empty_view_html,
    kept_summary,
    offers_mip,
    plane_choices,
    scan_card,
    shown,
    slice_view_html,
    typed_window_note,
    unbracketed,
    window_box_label,
    window_choices,
)
from medvlm.volume import MODALITIES, Volume, load_volume, remove_stale_zip_folders, zip_member_names

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EXAMPLES_DIR = ASSETS_DIR / "examples"
PLANE_QUESTION = "Which plane are these slices acquired in?"  # not for a scan acquired in another (`suggestions_for`)
# Suggested questions per modality, in the phrasings of the phantoms' question types (medvlm.phantom_text): the ones
# the demo model was taught. A question about lungs is no use on a brain MR, and the modality question was only
# ever asked of PET phantoms.
SUGGESTED_QUESTIONS = {
    "CT": ["Which organ shows an abnormality?", "What kind of lesion is present?", "Which contrast phase is this CT?",
           PLANE_QUESTION],
    "MR": ["Which finding does this scan show?", "Which organ shows an abnormality?", "Which MR sequence is this?",
           PLANE_QUESTION],
    "PT": ["Which organ shows an abnormality?", "What kind of lesion is present?", "What imaging modality is this?",
           PLANE_QUESTION],
    "OT": ["Which organ shows an abnormality?", "What kind of lesion is present?",
           PLANE_QUESTION],
}
DEMO_WARNING = "trained on synthetic phantoms — not for clinical use"
PRIVACY_NOTE = ("Nothing you upload is kept: the file is read into memory (a zip unpacked into a temporary folder "
                "while it is read) and deleted, and the scan, "
                "report and conversation are discarded when you close the page, or after an hour without use. Do "
                "not upload identifiable patient data to a public Space.")
# Uploads are deleted as soon as they are read; as a backstop for one never read (an abandoned or failed
# request), Gradio deletes its temporary files older than an hour every ten minutes: (every, older than) in s.
# `sweep_upload_leftovers` does the same, on the same clock, for what Gradio leaves and never deletes.
DELETE_CACHE = (600, 3600)
# A session's scan is released after an hour without use (a tab left open, or an API client that never said
# goodbye: Gradio ends only the sessions whose page closes); the visitor then loads it again.
SESSION_IDLE_S = 3600
# The scans all sessions hold may take at most this many bytes of memory together (MEDVLM_SCAN_MEMORY_MB; by default
# half the machine's): a scan past it first releases scans unused for MAKE_ROOM_IDLE_S, least recently used
# first, and is otherwise refused, so that visitors uploading big CTs cannot take the server down.
MAKE_ROOM_IDLE_S = 600
# Requests that may wait in the queue, of every kind together; one more is told the queue is full. It bounds what
# a script can pile up, but scrolling waits in the same queue, so it is set well above what visitors queue: a
# lower one would let one client's burst of reports refuse everyone's slices.
QUEUE_SIZE = 500
# What a load updates, in order: `_new_scan`'s outputs and build_demo's scan_outputs.
LOAD_OUTPUTS = ("session", "status", "card", "plane", "window", "slider", "slice", "kept", "threshold", "chatbot",
                "report", "download", "scan_token", "suggestions", "modality", "truth_box", "truth", "scan_source",
                "report_button", "ask_button")
SCAN_SOURCE_OPEN = "Load a scan"
SCAN_SOURCE_FOLDED = "Load another scan"  # once a scan is read, which then needs the room
OUT_OF_MEMORY = "The server ran out of memory reading this scan; try again in a few minutes, or with a smaller scan"
SESSION_FOLDER_PREFIX = "medvlm-session-"  # a session's own folder in the upload folder (its report download)
REPORT_PLACEHOLDER = "*The report appears here: press **Generate report**.*"
# Only a whole report is offered for download, with the page's caveat at its top: a part of one, passed on, could be
# read as all the model found. The incomplete one says so, and how to get a whole one.
REPORT_STOPPED = ("\n\n*Stopped: this report is incomplete. Only a whole report can be downloaded: press Generate "
                  "report for one.*")
ANSWER_STOPPED = " … [stopped: this answer is incomplete]"  # the chat shows text as typed, not Markdown
ANSWER_STOPPED_UNBEGUN = "[stopped before the answer began]"
# An answer that reached its Max new tokens before its end: {limit} is that number.
REPORT_CUT_OFF = ("\n\n*Cut off at the limit of {limit} new tokens: this report is incomplete. Only a whole report "
                  "can be downloaded: raise Max new tokens under Generation settings.*")
ANSWER_CUT_OFF = " … [cut off at the limit of {limit} new tokens]"
# ... or at the end of the model's context, before its Max new tokens: the scan and the conversation filled the rest.
REPORT_OUT_OF_CONTEXT = ("\n\n*Cut off at the end of the model's context: this report is incomplete, and no longer "
                         "one fits.*")
ANSWER_OUT_OF_CONTEXT = " … [cut off at the end of the model's context; start a new conversation for a longer answer]"


# The model ------------------------------------------------------------------------------------

def load_pipeline(checkpoint: str | None, revision: str | None) -> Pipeline:
    """Load the checkpoint (a folder, a Hub repo id, None for the demo one), saying what happens.

    A checkpoint that cannot be found, fetched or loaded ends the program with one line on stderr
    and exit status 2 (CheckpointError's message), not a traceback.
    """
    name = checkpoint or "the demo checkpoint"
    print(f"MedVLM 3D: loading {name}" + (f" at revision {revision}" if revision else "") + " …", flush=True)
    start = time.perf_counter()
    try:
        pipeline = Pipeline.from_pretrained(checkpoint, revision=revision)
    except UserInputError as error:
        print(f"MedVLM 3D cannot start: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"MedVLM 3D: loaded on {pipeline.describe()['device']} in {time.perf_counter() - start:.1f} s", flush=True)
    return pipeline


def machine_memory_bytes() -> int:
    """This machine's memory, or its container's limit where that is lower (a Space's, under cgroups)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): a laptop's worth
        total = 16 * 2**30
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            total = min(total, int(Path(limit).read_text().strip()))
        except (OSError, ValueError):  # not there, or "max": no limit
            continue
    return total


def scan_memory_budget(setting: str | None) -> int:
    """Bytes the sessions' scans may take together: MEDVLM_SCAN_MEMORY_MB's megabytes, else half this machine's
    memory. A setting that is not a number above 0 ends the program with one line (exit status 2)."""
    if not (setting or "").strip():
        return machine_memory_bytes() // 2
    try:
        megabytes = float(setting)
    except ValueError:
        megabytes = math.nan
    if not (math.isfinite(megabytes) and megabytes > 0):
        print(f"MedVLM 3D cannot start: MEDVLM_SCAN_MEMORY_MB must be a number of megabytes above 0, not "
              f"{setting!r}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return int(megabytes * 2**20)


SCAN_MEMORY_BYTES = scan_memory_budget(os.environ.get("MEDVLM_SCAN_MEMORY_MB"))  # before minutes of model loading
# Loaded at import, outside any GPU function, as ZeroGPU requires; moved to CUDA when there is one.
PIPELINE = load_pipeline(os.environ.get("MEDVLM_CHECKPOINT") or None, os.environ.get("MEDVLM_REVISION") or None)


@spaces.GPU
def encode_on_gpu(volume: Volume) -> Encoding:
    """Run the five stages for this scan: its visual tokens (on the CPU) and kept slices, for the session to keep.

    Returned, not only left in the pipeline's cache: on ZeroGPU this runs in a worker process, whose cache
    the next GPU call may not see, and the tokens are small where the volume is not (300 MB for a large CT).
    A scan the model cannot read raises gr.Error with the pipeline's sentence (see `stream_on_gpu`).
    """
    try:
        return PIPELINE.encode(volume).to("cpu")
    except UserInputError as error:
        raise gr.Error(shown(str(error))) from None


@spaces.GPU
def stream_on_gpu(encoding: Encoding, messages: list[dict] | None, stop_key: str, max_new_tokens: int,
                  temperature: float, top_p: float) -> Iterator[str]:
    """Stream a report (messages None) or the next chat answer about an encoded scan, chunk by chunk, on the
    GPU when there is one.

    The stop event is looked up by key, not passed: ZeroGPU pickles the arguments for its worker process, and
    an event cannot be pickled. In that worker the lookup finds no event (or a copy), so there Stop ends what
    the browser receives (the handler stops reading and closes the stream) rather than the generation. A refused
    request ends it with gr.Error and the pipeline's sentence: ZeroGPU hands any other exception raised in
    its worker back as just the exception's class name.
    """
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "stop": _STOP_EVENTS.get(stop_key)}
    try:
        if messages is None:
            yield from PIPELINE.report(encoding, **settings)
        else:
            yield from PIPELINE.chat(encoding, messages, **settings)
    except UserInputError as error:
        raise gr.Error(shown(str(error))) from None


# Per-session state ------------------------------------------------------------------------------

@dataclass
class ScanSession:
    """One browser tab's scan and conversation (held in a gr.State, never in a global).

    folder: this session's own files (the report download), inside Gradio's upload folder so that
    Gradio serves them without copying them; deleted by `delete_files` (Clear, a new scan, the tab closing).
    """

    volume: Volume | None = None
    label: str = ""  # what the scan card calls the scan: an example's name, or "uploaded scan"
    truth: str = ""  # an example phantom's findings report (`example_truth`); "" for an upload
    encoding: Encoding | None = None  # the scan as the model sees it, from `encode_on_gpu`
    # {"role", "content": str}; an answer cut short also "stopped": True, or "cut_off": its token limit and
    # "out_of_context": whether the model's context set that limit (the chat says so; the model is given role and
    # content only)
    messages: list[dict] = field(default_factory=list)
    answering: dict | None = None  # the answer in `messages` being written, marked stopped if Stop comes first
    unbegun: dict | None = None  # the answer in `messages` asked for and not begun yet, marked stopped by Stop
    report: str = ""
    report_finished: bool = False  # whether `report` was written to its end (not stopped, cleared or cut off)
    report_cut_off: int = 0  # the new-token limit the report reached before its end (0: it did not)
    report_out_of_context: bool = False  # ... which the model's context set, not Max new tokens
    cleared: int = 0  # how many times Clear emptied the report and conversation: a generation from before stops there
    chat_cleared: int = 0  # how many times the conversation was emptied (Clear, or the chat's bin icon)
    folder: Path | None = None
    stop_key: str = ""  # key of the running generation's stop event in _STOP_EVENTS
    stop_kind: str = ""  # what that generation writes: "report" or "chat"
    # The page's events ("report", "chat", "chat_submit", "chat_suggested") that asked for a report or an answer not yet
    # started (`asked_to_write`), and the one whose handler runs (the event, a key of that run; `_writing`)
    waiting: set[str] = field(default_factory=set)
    writing: tuple[str, int] = ("", 0)
    # Those of them that Stop or Clear withdrew before the page had sent their request (it sends it a moment after
    # `asked_to_write` returns, and a cancel cannot reach a request not sent yet): "stopped" or "cleared"
    withdrawn: dict[str, str] = field(default_factory=dict)
    threshold_range: tuple[float, float] = (-math.inf, math.inf)  # the 3D threshold slider's, for this scan
    threshold: float | None = None  # the threshold the 3D surface was last drawn at
    shown_slices: dict[str, int] = field(default_factory=dict)  # plane → the slice (from 1) last shown in it
    shown: tuple[str, str | None] = ("axial", None)  # the plane and window the viewer last showed
    spot: tuple[int, int, int] | None = None  # the voxel (z, y, x) last found from a click on the MIP or a slice
    spot_found: str = FROM_MIP  # how `spot` was found (the MIP, a click, an example's true findings), as said
    # How often the visitor changed the plane or jumped to a slice: a slice asked for before that and drawn after
    # it (a MIP frame still being projected) is not put on the page, where it would show under the new controls.
    view_changes: int = 0
    # Which scan the page holds: loads send it to a hidden box, and the model events send it back as the page
    # held it when the button was pressed, so that a request still waiting when a new scan came is not run on it.
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    loaded_at: float = field(default_factory=time.monotonic)  # when the scan was loaded (monotonic s)
    last_used: float = field(default_factory=time.monotonic)  # when the visitor last looked or asked (monotonic s)
    closed: str = ""  # why the scan was released for the visitor (unused too long), said when they come back
    unreadable: str = ""  # why the model refused the scan (a blank one): it will never be encoded
    ready: bool = False  # the status line said the model has read the scan (`encode_scan`)

    @property
    def kept_slices(self) -> list[int]:
        """Axial indices of the slices the model kept (each kept slab's middle one); empty until the scan is
        encoded."""
        return self.encoding.kept_slices if self.encoding is not None else []

    @property
    def kept_slabs(self) -> list[tuple[int, int]]:
        """The first and last axial index of each slab the model kept; empty until the scan is encoded."""
        return self.encoding.kept_slabs if self.encoding is not None else []

    def own_folder(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=SESSION_FOLDER_PREFIX, dir=get_upload_folder()))
        return self.folder

    @property
    def generating(self) -> bool:
        """Whether a report or an answer is being written for it."""
        return self.stop_key in _STOP_EVENTS

    @property
    def busy(self) -> bool:
        """Whether the model works for it, or will: an answer being written, or its scan loaded less than
        MAKE_ROOM_IDLE_S ago and not yet encoded (after that, an API client that never asks for the encoding
        would hold its scan for good)."""
        waiting = (self.volume is not None and self.encoding is None and not self.unreadable
                   and time.monotonic() - self.loaded_at < MAKE_ROOM_IDLE_S)
        return waiting or self.generating

    def in_use(self) -> None:
        """The visitor looked at the scan or asked about it: it is not idle."""
        self.last_used = time.monotonic()

    def close(self, reason: str) -> None:
        """Release the scan for the server's sake, and say why when the visitor comes back."""
        self.release()
        self.closed = reason

    def release(self) -> None:
        """Forget the scan: its cached visual tokens, its files, the conversation."""
        stop_generation(self, withdraw=False)
        if self.volume is not None:
            PIPELINE.forget(self.volume)
        self.delete_files()
        self.volume, self.encoding, self.messages, self.report = None, None, [], ""

    def keep_file(self, path: Path) -> Path:
        """`path` (in this session's folder) stays downloadable until the session deletes it (see _SESSION_FILES)."""
        _SESSION_FILES.add(os.path.abspath(path))
        return path

    def delete_files(self) -> None:
        """Delete this session's folder and what was in it."""
        if self.folder is None:
            return
        inside = os.path.abspath(self.folder) + os.sep
        _SESSION_FILES.difference_update([path for path in list(_SESSION_FILES) if path.startswith(inside)])
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


# Gradio's `delete_cache` sweep (DELETE_CACHE) ages every file the app hands out, session reports among them,
# but a report must stay downloadable as long as its session lasts. The sweep spares the paths a component
# lists in `keep_in_cache`: the download button lists this set, of the files sessions keep (`keep_file`)
# until they delete them (`delete_files`, at the latest when the tab closes).
_SESSION_FILES: set[str] = set()

# The sessions with a scan, by Gradio session hash, to release them when their tab closes or they sit unused,
# and to count the memory their scans take; weak references: the gr.State owns each session.
_OPEN_SESSIONS: weakref.WeakValueDictionary[str, ScanSession] = weakref.WeakValueDictionary()
_OPEN_SESSIONS_LOCK = threading.Lock()
# Stop events of running generations, by key; an entry lives as long as its generation.
_STOP_EVENTS: dict[str, threading.Event] = {}


# Tabs closed, by session hash, with when (time.monotonic): a load that was reading a scan for one meanwhile
# registers it as unused (`_new_scan`).
_ENDED_SESSIONS: dict[str, float] = {}
ENDED_SESSIONS_KEPT_S = 2 * 3600  # longer than any load takes
CLOSED_TAB_GRACE_S = 60  # a scan read for a tab closed meanwhile: unused after this, unless the tab looks at it


def end_session(request: gr.Request) -> None:
    """The tab closed (or its connection dropped: Gradio cannot tell): release its scan now rather than when Gradio
    drops the state an hour later, and remember when, so that a scan its load was still reading is not kept for
    no one (`_new_scan`)."""
    with _OPEN_SESSIONS_LOCK:
        session = _OPEN_SESSIONS.pop(request.session_hash, None) if request and request.session_hash else None
        if request and request.session_hash:
            now = time.monotonic()
            _ENDED_SESSIONS[request.session_hash] = now
            for ended in [key for key, when in _ENDED_SESSIONS.items() if now - when > ENDED_SESSIONS_KEPT_S]:
                del _ENDED_SESSIONS[ended]
    if session is not None:
        session.release()


def scan_bytes(volume: Volume) -> int:
    """The memory a scan holds in a session: its voxels, and the most its MIP's frames take where it offers one."""
    return volume.data.nbytes + (mip_cache_bytes(volume) if offers_mip(volume.modality) else 0)


def _sessions_with_scans() -> list[tuple[ScanSession, int]]:
    """(session, bytes of its scan) of the open sessions that hold one; with _OPEN_SESSIONS_LOCK held."""
    held = []
    for session in list(_OPEN_SESSIONS.values()):
        volume = session.volume  # read once: another thread may release it meanwhile
        if volume is not None:
            held.append((session, scan_bytes(volume)))
    return held


def release_idle_sessions(idle_for: float) -> int:
    """Release the scans of sessions unused for `idle_for` seconds or more (not while an answer is being
    written for one); returns how many."""
    now = time.monotonic()
    with _OPEN_SESSIONS_LOCK:
        idle = [session for session, _ in _sessions_with_scans()
                if now - session.last_used >= idle_for and not session.generating]
    for session in idle:
        session.close(f"The scan was closed after {idle_for / 60:.0f} minutes without use; load it again.")
    return len(idle)


def make_room(needed: int, replacing: ScanSession | None, close_others: bool = True) -> bool:
    """Whether a scan of `needed` bytes fits SCAN_MEMORY_BYTES beside the other sessions' scans (not the one it
    replaces): as they are, or (`close_others`) once enough of the scans unused for MAKE_ROOM_IDLE_S (and not
    waiting for the model) are released, least recently used first; none is released when that would not be
    enough. Call it with _OPEN_SESSIONS_LOCK held, and register the new scan before letting go of the lock."""
    held = [(session, size) for session, size in _sessions_with_scans() if session is not replacing]
    total = sum(size for _, size in held)
    if total + needed <= SCAN_MEMORY_BYTES:
        return True
    if not close_others:
        return False
    now = time.monotonic()
    idle = sorted(((session, size) for session, size in held
                   if not session.busy and now - session.last_used >= MAKE_ROOM_IDLE_S),
                  key=lambda item: item[0].last_used)
    chosen, freed = [], 0
    for session, size in idle:
        if total - freed + needed <= SCAN_MEMORY_BYTES:
            break
        chosen.append(session)
        freed += size
    if total - freed + needed > SCAN_MEMORY_BYTES:
        return False
    for session in chosen:
        session.close(f"The scan was closed to make room for other visitors, after {MAKE_ROOM_IDLE_S / 60:.0f} "
                      "minutes without use; load it again.")
    return True


# Scan in ------------------------------------------------------------------------------------------

def list_examples() -> list[Path]:
    """Example scans in assets/examples: NIfTI, .npy and .zip files, and DICOM series folders."""
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(path for path in EXAMPLES_DIR.iterdir() if not path.name.startswith(".")
                  and not path.name.lower().endswith((".md", ".txt", ".json")))


def example_label(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npy", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("_", " ").replace("-", " ")


LESION_WINDOWS = {"lung": "lung"}  # a CT lesion in this organ is shown in this window: in soft tissue, lung is black


def example_truth(path: Path, slices: int) -> str:
    """The findings report an example phantom was made with (assets/examples/examples.json), and the axial slice
    through each lesion's centre, counted from 1 at the feet of the `slices` the viewer shows, as a link that shows
    it, its centre marked (viewer.js, `jump_to_linked_slice`), in the window it is read in (LESION_WINDOWS); "" for
    a scan not listed.
    A lesion whose entry is not as expected is left out, not the report."""
    try:
        entry = json.loads((EXAMPLES_DIR / "examples.json").read_text(encoding="utf-8")).get(path.name, {})
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(entry, dict):
        return ""
    where = []
    for lesion in entry.get("lesions") or []:
        try:
            place = " ".join(str(part) for part in (lesion.get("side"), lesion.get("level")) if part)
            number, row, column = (round(coordinate) + 1 for coordinate in lesion["center_voxel"])
            seen_in = LESION_WINDOWS.get(lesion["organ"]) if entry.get("modality") == "CT" else None
            anchor = f"axial-{number}-{row}-{column}" + (f"-{seen_in}" if seen_in else "")
            where.append(f"- {lesion['kind']}, {lesion['diameter_mm']:.0f} mm, {lesion['organ']}"
                         f"{f' ({place})' if place else ''}: [axial slice {number}](#{anchor}) of {slices}")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            continue
    report = str(entry.get("report", ""))
    return report + ("\n\nWhere each lesion lies (its centre):\n" + "\n".join(where) if report and where else "")


def report_caveat(pipeline: Pipeline) -> str:
    """The line under the report: check it against the images, with how often this checkpoint was right on
    held-out scans where it ships those scores."""
    scores = pipeline.held_out_scores() or {}
    recall, closed, count = (scores.get(key) for key in ("finding_recall", "closed_accuracy", "n"))
    # The demo's visual tokens carry little beyond the modality (its model card): the side it names is its prior's,
    # the same for a scan and its mirror image.
    sides = (" What it reads of the image is mostly the modality: a side or an organ it names may not be the scan's."
             if pipeline.describe()["demo"] else "")
    if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in (recall, closed, count)):
        return f"*Check every finding against the images: a fluent report is not a correct one.{sides}*"
    return (f"*Check every finding against the images: on {count} held-out phantoms, this model's reports named "
            f"{recall:.0%} of their findings, and it chose the right answer to {closed:.0%} of multiple-choice "
            f"questions.{sides}*")


SIDES_IN_DOUBT = "The file states no orientation: the sides this report names may be the other ones."


def sides_in_doubt(volume: Volume) -> str:
    """A line for a report about a scan whose file states no orientation (`meta["orientation_unknown"]`: the model
    read it in an assumed one), else ""."""
    return f"\n\n*{SIDES_IN_DOUBT}*" if volume.meta.get("orientation_unknown") else ""


# Gradio keeps an upload at a path made from its content, so two visitors who upload the same file at once are
# handed one path: each upload is deleted once the last load reading it is done, not by the first.
_UPLOADS_READ: Counter[Path] = Counter()
_UPLOADS_READ_LOCK = threading.Lock()
UPLOAD_GONE = ("The upload was gone before it could be read (someone else may have uploaded the same file at that "
               "moment, or the upload was cut off); upload it again")


def _reading_uploads(paths: list[str]) -> bool:
    """Count a load's uploads as being read; False when one is gone already (the rest, unless another load reads
    them, deleted: they are no scan now)."""
    resolved = [Path(path).resolve() for path in paths]
    with _UPLOADS_READ_LOCK:
        if not all(path.exists() for path in resolved):
            _delete_uploads([str(path) for path in resolved if _UPLOADS_READ[path] <= 0])
            return False
        _UPLOADS_READ.update(resolved)
        return True


def _done_reading_uploads(paths: list[str]) -> None:
    """A load is done with its uploads: those no other load is reading are deleted."""
    resolved = [Path(path).resolve() for path in paths]
    with _UPLOADS_READ_LOCK:  # deleted within it: a load that finds an upload there has it counted first
        _UPLOADS_READ.subtract(resolved)
        done = [path for path in resolved if _UPLOADS_READ[path] <= 0]
        for path in done:
            _UPLOADS_READ.pop(path, None)
        _delete_uploads([str(path) for path in done])


def load_scan(files: list[str] | str | None, session: ScanSession | None, request: gr.Request | None = None):
    """An upload (one file, several DICOM files, a folder's files or a zip) becomes the session's scan.

    The uploaded files are deleted as soon as they are read. A file that cannot be read leaves the
    current scan as it was and says why in the status line.
    """
    started = time.monotonic()
    paths = [files] if isinstance(files, str) else list(files or [])
    if not paths:
        return _unchanged(session, "Upload a scan, or pick an example.")
    if not _reading_uploads(paths):
        gr.Warning(UPLOAD_GONE)
        return _unchanged(session, f"⚠️ {UPLOAD_GONE}.")
    try:
        volume = load_volume(paths[0] if len(paths) == 1 else paths)
    except UserInputError as error:
        message = without_file_names(str(error), paths)
        gr.Warning(shown(message))
        return _unchanged(session, f"⚠️ {message}")
    except MemoryError:  # the server's memory, not the file: others' scans fill it, or the scan is very large
        gr.Warning(OUT_OF_MEMORY)
        return _unchanged(session, f"⚠️ {OUT_OF_MEMORY}.")
    finally:
        _done_reading_uploads(paths)
    return _new_scan(volume, "uploaded scan", session, request, started)


_SHORTEST_NAME_WITHHELD = 5  # shorter file names ("1", "IM2") hold no one's name, and could match a number


def without_file_names(message: str, paths: list[str]) -> str:
    """A reader's message about an upload with the uploaded files' names, and those of the files in an uploaded
    zip, said as "the uploaded file": a file is often named for its patient, and the page may be on a shared
    screen. (The CLI names the file it was given.)"""
    names = {str(path) for path in paths} | {Path(path).name for path in paths}
    for path in paths:
        names.update(zip_member_names(Path(path)))
    for name in sorted((name for name in names if len(name) >= _SHORTEST_NAME_WITHHELD), key=len, reverse=True):
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", "the uploaded file", message)  # whole paths first
    return sentence(message)


def reading_the_scan() -> str:
    """The status line as soon as a scan is given, until it is read."""
    return "Reading the scan …"


def reading_as(modality: str, session: ScanSession | None) -> str:
    """The status line as soon as another modality is chosen for the scan (`reading_the_scan`). The one it is read as
    already (the box sends its value again each time it loses the focus) ends the event here, unseen: nothing after
    it runs (the scan is not read again, nor the model's reading of it cancelled and begun again)."""
    if session is not None and session.volume is not None and session.volume.modality == modality:
        raise gr.Error("the scan is read as this modality already", visible=False, print_exception=False)
    return reading_the_scan()


def empty_upload() -> None:
    """The upload box lets go of the files it showed: they were deleted once read, and an upload added to them
    would send them again."""
    return None


def load_example(choice: object, session: ScanSession | None, request: gr.Request | None = None):
    """One of the example scans in assets/examples: the examples table sends its row's index; an API client may
    send that, or the example's name (also as [name]). The value comes unchecked (`preprocess=False`)."""
    started = time.monotonic()
    examples = list_examples()
    choice = choice[0] if isinstance(choice, list) and choice else choice
    if isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < len(examples):
        chosen = examples[choice]
    else:
        chosen = next((path for path in examples if example_label(path) == choice), None)
    if chosen is None and not examples:
        return _unchanged(session, "⚠️ This server has no example scans; upload one.")
    if chosen is None:
        names = ", ".join(repr(example_label(path)) for path in examples)
        return _unchanged(session, f"⚠️ There is no example {str(choice)[:40]!r}; choose one of {names}.")
    try:
        volume = load_volume(chosen)
    except UserInputError as error:
        return _unchanged(session, f"⚠️ {error}")
    except MemoryError:
        return _unchanged(session, f"⚠️ {OUT_OF_MEMORY}.")
    truth = example_truth(chosen, slice_count(volume, "axial"))
    return _new_scan(volume, f"example: {example_label(chosen)}", session, request, started, truth=truth)


def _new_scan(volume: Volume, label: str, session: ScanSession | None, request: gr.Request | None,
              reading_since: float, truth: str = ""):
    """A fresh session for the scan (the previous one is released): a new conversation starts, with questions
    suggested for its modality. `reading_since`: when the scan's reading began (time.monotonic); `truth`: an
    example phantom's findings report, shown apart from the model's.

    A tab closed while its scan was read (Gradio also takes a tab whose connection dropped for a closed one, and
    such a tab goes on) gets the scan only where it fits beside the others as they are, none closed for it, and as
    unused but for CLOSED_TAB_GRACE_S: time for a tab that goes on to look at it (`encode_scan` follows at once),
    after which a scan others need takes its place."""
    plane, window, middle = _first_view(volume)
    count = slice_count(volume, plane)
    grid = surface_grid(volume)[0]
    low, high, step = threshold_range(volume, grid)
    decimals = max(0, -math.floor(math.log10(step)))  # the step is a power of ten: no float noise in the box
    threshold = min(high, max(low, round(round(default_threshold(volume, grid) / step) * step, decimals)))
    unit = unbracketed(volume.units or "intensity")  # HU, Bq/mL, SUV
    with _OPEN_SESSIONS_LOCK:  # from the memory check to the new scan's registration: two loads at once add up
        ended = _ENDED_SESSIONS.get(request.session_hash) if request is not None else None
        closed_meanwhile = ended is not None and ended >= reading_since
        if closed_meanwhile and not make_room(scan_bytes(volume), session, close_others=False):
            return _unchanged(session, "⚠️ The page lost its connection while the scan was read; load it again.")
        if scan_bytes(volume) > SCAN_MEMORY_BYTES:  # no wait makes room for it
            message = (f"This scan needs {scan_bytes(volume) / 2**20:,.0f} MB, more than the "
                       f"{SCAN_MEMORY_BYTES / 2**20:,.0f} MB this server holds for all its visitors' scans "
                       "(MEDVLM_SCAN_MEMORY_MB); upload a smaller scan, or run the app where it may take more")
            gr.Warning(message)
            return _unchanged(session, f"⚠️ {message}.")
        if not make_room(scan_bytes(volume), session):
            message = ("The server holds as many scans as its memory allows; try again in a few minutes, or run "
                       "the app on your own machine")
            gr.Warning(message)
            return _unchanged(session, f"⚠️ {message}.")
        if session is not None:  # only now: until the new scan is ready, the session keeps the one it had
            session.release()
        session = ScanSession(volume=volume, label=label, truth=truth, threshold_range=(low, high))
        if request is not None and request.session_hash:
            _OPEN_SESSIONS[request.session_hash] = session
    outputs = (
        session,
        "The model is reading the scan …",
        scan_card(volume, label),
        gr.update(choices=plane_choices(volume.modality), value=plane, interactive=True),
        gr.update(choices=window_choices(volume.modality, volume.units), value=window, interactive=True,
                  label=window_box_label(volume.modality, window_limits(volume, AUTO_WINDOW))),
        gr.update(minimum=1, maximum=count, value=middle, interactive=True, label=slider_label(plane)),
        slice_html(session, plane, window, middle),
        gr.update(choices=[], value=None),
        gr.update(minimum=low, maximum=high, step=step, value=threshold, interactive=True,
                  label=f"Surface threshold ({unit})"),
        [],
        REPORT_PLACEHOLDER,
        report_download(None),
        session.token,
        gr.Dataset(samples=[[question] for question in suggestions_for(volume)]),
        gr.update(value=volume.modality, interactive=True),
        gr.update(visible=bool(truth), open=False),
        f"{shown(truth)}\n\n*The phantom's ground truth (assets/examples/examples.json): what this example was made "
        "with. The model is never shown it.*" if truth else "",
        gr.update(open=False, label=SCAN_SOURCE_FOLDED),
        gr.update(interactive=True),  # Generate report and Ask: disabled until there is a scan to ask about
        gr.update(interactive=True),
    )
    if closed_meanwhile:
        session.last_used = session.loaded_at = time.monotonic() - MAKE_ROOM_IDLE_S + CLOSED_TAB_GRACE_S
    return outputs


def suggestions_for(volume: Volume) -> list[str]:
    """The questions suggested for a scan: those of its modality, less the acquisition plane's where it was not
    acquired axially (the model reads every scan as axial slices, and answers "axial")."""
    questions = SUGGESTED_QUESTIONS.get(volume.modality, SUGGESTED_QUESTIONS["OT"])
    return [question for question in questions if question != PLANE_QUESTION or acquired_plane(volume) == "axial"]


def change_modality(modality: str, session: ScanSession | None, request: gr.Request | None = None):
    """Read the session's scan as another modality (a NIfTI that does not say which it is, or says it wrongly):
    its windows, the model's reading of it and the conversation start again, as for a new scan."""
    scan = session.volume if session is not None else None  # read once: an idle release may come meanwhile
    if scan is None:
        return _unchanged(session, "Upload a scan, or pick an example.")
    try:
        volume = scan.as_modality(modality)
    except UserInputError as error:
        refused = list(_unchanged(session, f"⚠️ {error}"))
        refused[LOAD_OUTPUTS.index("modality")] = gr.update(value=scan.modality)  # what the scan is read as
        return tuple(refused)
    if volume is scan:
        return (session, *([gr.skip()] * (len(LOAD_OUTPUTS) - 1)))
    if session.report or session.messages:  # said, not only done: they go at once
        gr.Info(f"The scan is read as {MODALITY_NAMES[volume.modality]} now: the report and the conversation about "
                "it start again.")
    return _new_scan(volume, session.label, session, request, time.monotonic(), truth=session.truth)


def _first_view(volume: Volume) -> tuple[str, str, int]:
    """(plane, window, slice from 1) a new scan opens at: a PET's MIP seen from the front, in inverted grey, as nuclear
    medicine reads a PET first; any other scan's middle slice in the plane it was acquired in (a sagittal spine MR
    shows its own images, not a reformat of them) and the modality's default window."""
    plane = MIP if offers_mip(volume.modality) else acquired_plane(volume)
    return plane, opening_window(volume, plane), _slice_number(volume, plane, None)


def _unchanged(session: ScanSession | None, status: str):
    """The load outputs of a scan that was not loaded: only the status line changes, and says that the scan on
    the page (if any) is still the one the model answers about."""
    if session is not None and session.volume is not None:
        status = f"{status.rstrip('.')}. The scan shown ({session.label}) stays loaded."
    return (session, shown(status), *([gr.skip()] * (len(LOAD_OUTPUTS) - 2)))


def sentence(text: str) -> str:
    """A library's message as a sentence on the page: its first letter capitalised (the rest as written)."""
    return text[:1].upper() + text[1:]


def _delete_uploads(paths: list[str]) -> None:
    """Delete uploaded files (only those inside Gradio's upload folder) and their emptied folders."""
    uploads = Path(get_upload_folder()).resolve()
    for raw in paths:
        path = Path(raw).resolve()
        if uploads not in path.parents:
            continue
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == uploads or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()


def sweep_upload_leftovers(folder: Path, older_than: float) -> list[Path]:
    """Delete, from Gradio's upload folder, what Gradio leaves there and its own sweep never deletes, once older
    than `older_than` seconds (so nothing that is being uploaded or read): the partial file of an upload cut
    off half-way (it can hold a DICOM header, the patient's name in it), the empty file its File component
    makes beside every upload (both named tmp…), and the emptied folders of abandoned uploads. Returns them."""
    if folder.resolve() == Path(tempfile.gettempdir()).resolve():  # GRADIO_TEMP_DIR set to the system's: shared
        return []  # with other programs, whose temporary files are not ours to delete
    cutoff = time.time() - older_than
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # no such folder (yet): nothing uploaded
        return []
    for path in entries:
        try:
            if path.is_symlink() or path.lstat().st_mtime >= cutoff or str(path) in _SESSION_FILES:
                continue
            if path.is_file() and _TEMPORARY_FILE.fullmatch(path.name):
                path.unlink()
            elif path.is_dir() and _UPLOAD_FOLDER.fullmatch(path.name) and not any(path.iterdir()):
                path.rmdir()
            else:
                continue
        except OSError:  # gone meanwhile, or being written: the next sweep looks again
            continue
        removed.append(path)
    return removed


_TEMPORARY_FILE = re.compile(r"tmp[a-z0-9_]{8}")  # Python's tempfile names, which Gradio's uploads take
_UPLOAD_FOLDER = re.compile(r"[0-9a-f]{64}")  # Gradio's folder per uploaded file: its SHA-256


def _sweep_forever(every: float, older_than: float) -> None:
    """Every `every` seconds: what Gradio leaves in its upload folder, the folders of zips whose reading was cut
    off by a crash (both once older than `older_than` s), and the scans of sessions unused for SESSION_IDLE_S."""
    while True:
        time.sleep(every)
        try:
            sweep_upload_leftovers(Path(get_upload_folder()), older_than)
            remove_stale_zip_folders(older_than)
            release_idle_sessions(SESSION_IDLE_S)
        except Exception as error:  # a sweep that fails must not end the thread: the next one tries again
            print(f"MedVLM 3D: the sweep of uploads and idle scans failed ({type(error).__name__}); it runs again "
                  f"in {every:.0f} s", file=sys.stderr, flush=True)


# Slices -------------------------------------------------------------------------------------------

def slice_html(session: ScanSession | None, plane: str, window: str | None, slice_number: float | None,
               since: int | None = None) -> str | None:
    """The slice as an inline image (nothing written to disk), its orientation letters and the kept slices.

    slice_number counts from 1, as the slider shows it. `since`: the session's `view_changes` when the slice was
    asked for; None (and the session keeps its view) where the visitor has changed the plane or jumped since.
    """
    volume = session.volume if session else None
    if volume is None:
        return empty_view_html(session.closed if session is not None and session.closed
                                else "Upload a scan or pick an example to see its slices.")
    session.in_use()
    plane, slice_number = _known_plane(plane), _typed_number(slice_number)  # as an API client may send them
    index = _slice_number(volume, plane, slice_number) - 1
    if not known_window(window, volume.modality, volume.units):
        window = opening_window(volume, plane)
    view = slice_view_html(volume, plane, index, window, session.kept_slabs, session.spot, session.spot_found)
    if since is not None and session.view_changes != since:
        return None
    session.shown_slices[plane] = index + 1  # a plane opened again opens here
    session.shown = (plane, window)
    return view


def _slice_number(volume: Volume, plane: str, typed: float | None) -> int:
    """The slice (from 1) of `plane` a slider value asks for: the nearest of 1 … count; for none, the one the plane
    opens at (its middle one, the MIP's front view)."""
    if typed is None:
        return opening_slice(volume, plane) + 1
    return min(slice_count(volume, plane), max(1, round(typed)))


def slider_label(plane: str) -> str:
    """What the slider moves through: slices, or the MIP's frames."""
    return f"MIP frame ({MIP_STEP_DEGREES}° each)" if plane == MIP else "Slice"


def _known_plane(plane: object) -> str:
    """The plane an event names; axial for what an API client may send instead of one of VIEWS (nothing)."""
    return plane if plane in VIEWS else "axial"


def _typed_number(value: object) -> float | None:
    """A slider's value as its box or an API client sent it, unchecked (`preprocess=False`): the number, or None
    for anything that is not a finite one (text, a list, true/false, NaN, a number past float's range)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def show_slice(session: ScanSession | None, plane: str, window: str | None, slice_number: object):
    """The slice the slider asks for. A number typed into its box beyond the first or last slice shows that
    slice, an emptied box the middle one, and the box then says which: (slice view, slider). The values come
    unchecked (`preprocess=False`)."""
    plane = _known_plane(plane)
    slice_number = _typed_number(slice_number)
    view = slice_html(session, plane, window, slice_number, session.view_changes if session is not None else None)
    if view is None:  # the plane changed while this slice was drawn
        return gr.skip(), gr.skip()
    if session is None or session.volume is None:
        return view, gr.skip()
    number = _slice_number(session.volume, plane, slice_number)
    return view, gr.skip() if number == slice_number else number


def change_window(session: ScanSession | None, plane: str, window: object, slice_number: object):
    """The slice in the window chosen from the list or typed into its box (a width/level such as 350/50, a range such
    as 0-6). A typed window that shows the scan flat, or misses its values, is shown and said so, once (the box sends
    its value again when it loses the focus). Text that is no window of this scan keeps the window shown, puts it
    back in the box and says what to type, where the box would otherwise name a window the image is not in:
    (slice view, window box). The values come unchecked (`preprocess=False`)."""
    volume = session.volume if session is not None else None
    if volume is None or known_window(window, volume.modality, volume.units):
        said = volume is None or window == session.shown[1]
        if not said and (note := typed_window_note(volume, window)):  # 350/50 on a PET: a grey square
            gr.Info(shown(sentence(note)))
        return slice_html(session, plane, window, slice_number), gr.skip()
    advice = unknown_window(window, volume.modality, volume.units, window_limits(volume, AUTO_WINDOW))
    gr.Warning(shown(sentence(advice)))
    shown_window = session.shown[1] or default_window(volume.modality)
    return slice_html(session, plane, shown_window, slice_number), shown_window


def change_plane(session: ScanSession | None, plane: str, window: str | None):
    """A plane opens at the slice last shown in it, the first time at its middle slice (the MIP: seen from the
    front). The MIP of a scan in its modality's default window opens in inverted grey, as nuclear medicine reads a
    MIP (`opening_window`); the window box says so, and the planes stay in it. Returns (slider, slice view,
    window)."""
    plane = _known_plane(plane)
    if session is None or session.volume is None:
        return gr.skip(), slice_html(session, plane, window, None), gr.skip()
    volume = session.volume
    opening = opening_window(volume, plane)
    changed = plane == MIP and window == default_window(volume.modality) and opening != window
    window = opening if changed else window
    session.view_changes += 1
    count = slice_count(volume, plane)
    number = session.shown_slices.get(plane) or _slice_number(volume, plane, None)
    return (gr.update(minimum=1, maximum=count, value=number, label=slider_label(plane)),
            slice_html(session, plane, window, number), window if changed else gr.skip())


def jump_to_kept(session: ScanSession | None, kept: str | None, window: str | None):
    """Show one of the slices the model kept (axial slice number, from 1). Returns (plane, slider, slice view,
    kept-slice choice): the choice is cleared, so that the same number can be chosen again after scrolling
    away (a list sends no event for the option already chosen)."""
    if session is None or session.volume is None or not kept:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return (*jump_to_axial(session, kept, window), gr.update(value=None))


def find_mip_spot(session: ScanSession | None, spot: object, window: str | None):
    """Find a spot clicked on the MIP in the slices, as a PET viewer does: the voxel it points at (`view.mip_spot`: from
    the pixel clicked, up to a brighter one within reach, the brightest along its line of sight) is marked, the axial
    slice through it shown, and the coronal and sagittal planes open through it too. `spot` is "frame down across"
    (viewer.js): the MIP frame (from 1) and where on its image the click fell, as fractions of its height and width from
    the top left corner (what follows is not read: the page counts its clicks there). A spot on nothing but air, or
    beside the field of view, opens the axial slice at its height, unmarked. Returns (plane, slider, slice view). The
    value comes unchecked (`preprocess=False`); anything else changes nothing."""
    numbers = [_typed_number(part) for part in spot.split()[:3]] if isinstance(spot, str) else []
    if session is None or session.volume is None or len(numbers) != 3 or None in numbers:
        return gr.skip(), gr.skip(), gr.skip()
    frame, down, across = numbers
    volume = session.volume
    down, across = min(1.0, max(0.0, down)), min(1.0, max(0.0, across))
    session.spot = voxel = mip_spot(volume, _slice_number(volume, MIP, frame) - 1, down, across)
    session.spot_found = FROM_MIP
    if voxel is None:  # the axial slice at that height
        return jump_to_axial(session, mip_slice(volume, down) + 1, window)
    z, y, x = voxel
    session.shown_slices.update(coronal=y + 1, sagittal=x + 1)
    return jump_to_axial(session, z + 1, window)


def mark_point(session: ScanSession | None, point: object, window: str | None):
    """A point clicked on a slice, as a viewer's probe: its voxel is marked with a cross-hair, its value given in the
    caption (a CT's HU: fat, fluid, ground glass or calcium), and the other planes open through it. `point` is
    "plane slice down across" (viewer.js): the plane, its slice (from 1) and where on its image the click fell, as
    fractions of its height and width from the top left corner (what follows is not read: the page counts its
    clicks there). Returns the slice view. The value comes unchecked (`preprocess=False`); anything else, or a
    plane or slice the viewer no longer shows, changes nothing."""
    parts = point.split()[:4] if isinstance(point, str) else []
    numbers = [_typed_number(part) for part in parts[1:]]
    if session is None or session.volume is None or len(numbers) != 3 or None in numbers or parts[0] not in PLANES:
        return gr.skip()
    plane, (number, down, across) = parts[0], numbers
    volume = session.volume

    def moved_on() -> bool:  # the viewer shows another image than the one clicked (a key pressed meanwhile)
        return session.shown[0] != plane or session.shown_slices.get(plane) != number

    if moved_on() or number != _slice_number(volume, plane, number):
        return gr.skip()
    index = int(number) - 1
    session.in_use()
    session.spot = voxel = plane_point(volume, plane, index, min(1.0, max(0.0, down)), min(1.0, max(0.0, across)))
    session.spot_found = CLICKED
    # PLANES in the order of the voxel's axes (z, y, x): the other planes open through it
    session.shown_slices.update({other: voxel[PLANES.index(other)] + 1 for other in PLANES if other != plane})
    if not known_window(window, volume.modality, volume.units):
        window = session.shown[1] or opening_window(volume, plane)
    view = slice_view_html(volume, plane, index, window, session.kept_slabs, voxel, CLICKED)
    return gr.skip() if moved_on() else view  # drawn over a newer image, it would show the slice left


def jump_to_linked_slice(session: ScanSession | None, link: object, window: str | None):
    """Show the axial slice a link on the page names (an example's true findings: viewer.js writes "axial-coronal-
    sagittal count", the lesion's centre as slice numbers from 1 in the three planes, "56-40-71 3", with "-window"
    after them for a lesion read in another window, "56-40-71-lung 3"; the count makes the same link clicked again a
    change), the centre marked, the other planes opening through it, in that window. Returns (plane, slider, slice
    view, window box)."""
    parts = (link.split()[0] if isinstance(link, str) and link.split() else "").split("-")
    numbers = [_typed_number(part) for part in parts[:3]]
    seen_in = parts[3] if len(parts) > 3 else ""
    volume = session.volume if session is not None else None
    if volume is None or len(numbers) != 3 or None in numbers:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    centre = tuple(min(count, max(1, int(number))) - 1 for number, count in zip(numbers, volume.shape, strict=True))
    session.spot, session.spot_found = centre, LESION_CENTRE
    session.shown_slices.update(coronal=centre[1] + 1, sagittal=centre[2] + 1)
    usable = bool(seen_in) and known_window(seen_in, volume.modality, volume.units)
    shown = jump_to_axial(session, centre[0] + 1, seen_in if usable else window)
    return (*shown, seen_in if usable else gr.skip())


def jump_to_axial(session: ScanSession | None, number: object, window: str | None):
    """Show axial slice `number` (from 1; the nearest one for a number past the ends): a kept slice chosen from the
    list, or a spot found from the MIP. Returns (plane, slider, slice view). The value comes unchecked; one that
    is no number changes nothing."""
    number = _typed_number(number)
    if session is None or session.volume is None or number is None:
        return gr.skip(), gr.skip(), gr.skip()
    session.view_changes += 1
    number = _slice_number(session.volume, "axial", number)
    return ("axial", gr.update(minimum=1, maximum=slice_count(session.volume, "axial"), value=number,
                               label=slider_label("axial")),
            slice_html(session, "axial", window, number))


def encode_scan(session: ScanSession | None):
    """Encode the scan once (the model's slice selection); say it is ready and show which slices it kept, in the
    view the session shows now (the visitor may have scrolled, or changed plane, while the model read the scan;
    the page's own controls may not have caught up with a load when this chain starts, so it does not send them).

    A scan replaced while it was being encoded changes nothing on the page, nor does a scan already said to be
    ready or refused (the chain of an upload that failed since runs this again).
    """
    if session is not None and session.volume is None and session.closed:  # released before its turn came
        return f"⚠️ {session.closed}", gr.skip(), slice_html(session, "axial", None, None)
    if session is None or session.volume is None or session.ready or session.unreadable:
        return gr.skip(), gr.skip(), gr.skip()
    volume = session.volume
    try:
        encoding = session.encoding or encode_on_gpu(volume)  # a report asked for first may have encoded it
    except gr.Error as error:  # a scan the model cannot read (a blank one): the viewer still shows it
        if _scan_replaced(session, volume):
            return gr.skip(), gr.skip(), gr.skip()
        session.unreadable = error.message
        gr.Warning(sentence(error.message))
        return f"⚠️ {sentence(error.message)}.", gr.skip(), gr.skip()
    if _scan_replaced(session, volume):
        return gr.skip(), gr.skip(), gr.skip()
    session.encoding, session.ready = encoding, True
    notes = "".join(f" Note: {note}." for note in volume.meta.get("notes", []) or [])  # e.g. a series left out
    # Short: the time it took is the benchmark's business (python -m medvlm bench)
    plane, window = session.shown
    # The marks are on the axial view's track (a MIP's track shows its frames)
    marks = {"axial": " (green marks)", MIP: ""}.get(plane, " (green marks in the axial view)")
    status = (f"Ready: {kept_summary(volume, session.kept_slabs, encoding.total_slices)}{marks}. Generate a report "
              f"or ask a question.{notes}")
    choices = [str(k + 1) for k in session.kept_slices]  # a slab's middle slice: typed, its number picks it
    return (status, gr.update(choices=choices, value=None),
            slice_html(session, plane, window, session.shown_slices.get(plane)))


def asking_buttons(session: ScanSession | None):
    """Generate report and Ask once the model has read the scan, or refused it: disabled for a scan it cannot read
    (a blank one), which the status line says; else as the load left them. Returns (report button, ask button)."""
    if session is not None and session.volume is not None and session.unreadable:
        return gr.update(interactive=False), gr.update(interactive=False)
    return gr.skip(), gr.skip()


def show_3d(session: ScanSession | None, threshold: float | None):
    """The 3D surface at the threshold (None: the modality's default)."""
    if session is None or session.volume is None:
        return None
    session.threshold = threshold
    return figure_3d(session.volume, threshold)


def redraw_3d(session: ScanSession | None, threshold: object):
    """The surface at the threshold the slider asks for; a number typed into its box outside the slider's
    range draws the nearest end of it, and the box then says so: (plot, slider). The value comes unchecked
    (`preprocess=False`); an emptied box is set back to the threshold drawn."""
    threshold = _typed_number(threshold)
    if session is None or session.volume is None:
        return gr.skip(), gr.skip()
    if threshold is None:
        return gr.skip(), session.threshold if session.threshold is not None else gr.skip()
    session.in_use()
    low, high = session.threshold_range
    session.threshold = level = min(high, max(low, threshold))
    return figure_3d(session.volume, level), gr.skip() if level == threshold else level


# Assistant ----------------------------------------------------------------------------------------

def model_badge(pipeline: Pipeline) -> str:
    about = pipeline.describe()
    revision = f" at revision `{about['revision']}`" if about["revision"] else ""
    badge = f"**Model:** `{about['checkpoint']}`{revision} on **{about['device']}** ({about['dtype']})"
    if about["demo"]:
        badge += f' — <span class="demo-warning">{DEMO_WARNING}</span>'
    return badge


def suggested_question(sample: list[str] | None) -> str:
    """The question of a suggestion clicked (the table gives [question]); nothing for what else a client sends."""
    return sample[0] if isinstance(sample, list) and sample and isinstance(sample[0], str) else ""


def _no_scan(session: ScanSession | None) -> str:
    """What to do when a session asks about a scan it does not hold: why it was closed, if it was."""
    return session.closed if session is not None and session.closed else "Upload a scan first."


def asked_to_write(event: str, session: ScanSession | None) -> dict:
    """A report or an answer was asked for on the page by `event` (the Stop button's update): Stop is enabled until
    it, and any other asked for meanwhile, has been written (`stop_button_state`).

    The same button pressed again while its report or answer waits or is written asks for nothing (Gradio sends
    an event once until it ends): it is not counted, or Stop would wait for it for good."""
    if session is None or session.volume is None:  # no scan: nothing will be written
        return gr.skip()
    if event in session.waiting or session.writing[0] == event:
        return gr.skip()
    session.withdrawn.pop(event, None)  # a request Stop withdrew was cancelled after all: this press is a new one
    session.waiting.add(event)
    session.in_use()  # asking is using: a session whose request waits behind others' is not idle (`make_room`)
    return gr.update(interactive=True)


@contextlib.contextmanager
def _writing(session: ScanSession | None, event: str):
    """While the handler of a report or an answer asked for by `event` runs (from leaving the queue until it returns,
    as long as the page holds the event and sends it no more): it no longer waits, and `ScanSession.writing` names
    it. Stop and Clear let it go at once (`stop_generation`); a handler that ends later then leaves what another set."""
    run = (event, time.monotonic_ns())
    if session is not None:
        session.waiting.discard(event)
        session.writing = run
    try:
        yield
    finally:
        if session is not None and session.writing == run:
            session.writing = ("", 0)


def stop_button_state(session: ScanSession | None, ended: str = "") -> dict:
    """The Stop button after a report or an answer ended (asked for by the page's event `ended`), or after Stop or
    Clear: enabled while another is being written for the session or waits to be, else disabled (there is nothing
    to stop). The page holds `ended` no more: a press of its button it dropped meanwhile waits for nothing."""
    if session is not None and ended:
        session.waiting.discard(ended)
    return gr.update(interactive=session is not None and (session.generating or bool(session.waiting)))


def generate_report(session: ScanSession | None, max_new_tokens: float, temperature: float, top_p: float,
                    scan_token: str | None = None, asked_by: str = "report"):
    """Stream a report of the session's scan; at the end, offer it as a Markdown download.

    Yields (report markdown, download button update); once a new scan replaced this one, or Clear emptied the
    report, the empty report last (Gradio's final message repeats the last one sent, which would bring the old
    text back). `scan_token`: the scan the page held when the report was asked for (`ScanSession.token`);
    a request for a scan since replaced changes nothing. `asked_by`: the page's event that asked (`asked_to_write`).
    """
    with _writing(session, asked_by):
        if _withdrawn(session, asked_by) or _asked_about_another_scan(session, scan_token):
            yield gr.skip(), gr.skip()
            return
        if session is None or session.volume is None:  # said in the report box, where the visitor looks
            yield f"*{_no_scan(session)}*", gr.skip()
            return
        volume, cleared = session.volume, session.cleared
        session.report, session.report_finished, session.report_cut_off = "", False, 0
        session.report_out_of_context = False
        withdrawn = report_download(None)  # the previous report's download is withdrawn while this one streams
        stop = threading.Event()
        try:
            for chunk in _stream(session, volume, None, stop, max_new_tokens, temperature, top_p):
                if isinstance(chunk, CutOff):
                    session.report_cut_off, session.report_out_of_context = chunk.limit, bool(chunk.context)
                    continue
                session.report += chunk
                yield session.report, withdrawn
                withdrawn = gr.skip()
        except gr.Error as error:  # refused with a sentence (a blank scan, settings out of range): in the report
            yield f"*⚠️ {sentence(error.message)}.*", withdrawn  # box, where the visitor looks (as `_no_scan`)
            return
        if _scan_replaced(session, volume) or session.cleared != cleared:
            yield REPORT_PLACEHOLDER, report_download(None)
            return
        if stop.is_set() or session.report_cut_off:  # stopped or cut off: marked so, not offered as finished
            yield report_view(session)
            return
        session.report_finished = True
        download = report_download(_write_report(session, decoding(max_new_tokens, temperature, top_p)))
        yield session.report + sides_in_doubt(session.volume), download


def chat(question: str, session: ScanSession | None, max_new_tokens: float, temperature: float, top_p: float,
         scan_token: str | None = None, asked_by: str = "chat"):
    """One turn: the question joins the conversation about the scan, the answer streams in.

    Yields (chatbot messages, question box value); once a new scan replaced this one or the conversation was
    cleared, the conversation as the session now holds it, last. A question the model may not read
    (`Pipeline.chat`) gets a warning with the reason and stays in the box. `scan_token`, `asked_by`: as
    `generate_report`.
    """
    with _writing(session, asked_by):
        withdrawn, another_scan = _withdrawn(session, asked_by), _asked_about_another_scan(session, scan_token)
        if withdrawn or another_scan:
            if withdrawn == "stopped" and not another_scan and (question or "").strip():  # as if Stop came as it began
                session.messages += [{"role": "user", "content": question.strip()},
                                     {"role": "assistant", "content": "", "stopped": True}]
                yield chat_view(session), ""
            else:
                yield gr.skip(), gr.skip()
            return
        question = (question or "").strip()
        if session is None or session.volume is None:
            gr.Warning(_no_scan(session))
            yield [], question
            return
        if not question:
            gr.Warning("Type a question about the scan first.")
            yield chat_view(session), ""
            return
        volume, cleared = session.volume, session.chat_cleared
        asked, answer = {"role": "user", "content": question}, {"role": "assistant", "content": ""}
        session.messages.append(asked)
        history = [{"role": message["role"], "content": message["content"]} for message in session.messages]
        session.messages.append(answer)  # kept as it grows: what Stop shows, even before this handler sees the stop
        session.unbegun = answer
        refused, finished, stop = False, False, threading.Event()
        try:
            for chunk in _stream(session, volume, history, stop, max_new_tokens, temperature, top_p):
                session.answering = answer  # only now: starting, the stream stopped the generation before it
                session.unbegun = None
                if isinstance(chunk, CutOff):
                    answer["cut_off"], answer["out_of_context"] = chunk.limit, bool(chunk.context)
                answer["content"] += chunk
                yield chat_view(session), ""
            finished = not stop.is_set()
        except gr.Error as error:  # refused with a sentence (a control token, too long): it was never asked
            refused = True
            how = " with the chat's bin icon, or Clear all" if error.message.endswith(START_AGAIN) else ""
            gr.Warning(f"{sentence(error.message)}{how}.")
        finally:  # a stopped answer stays as far as it got, marked; a conversation cleared or about a replaced scan
            if session.answering is answer:  # ... is gone
                session.answering = None
            if session.unbegun is answer:
                session.unbegun = None
            if session.volume is volume and session.chat_cleared == cleared:
                if refused:
                    session.messages = [message for message in session.messages  # by identity: the same question
                                        if message is not asked and message is not answer]  # asked before stays
                elif not finished:  # stopped, or cancelled (Stop, Clear) at a chunk
                    answer["stopped"] = True
        if _scan_replaced(session, volume) or session.chat_cleared != cleared:
            yield chat_view(session), gr.skip()
            return
        yield chat_view(session), question if refused else ""  # a refused question stays in the box, to edit


def _stream(session: ScanSession, volume: Volume, messages: list[dict] | None, stop: threading.Event,
            max_new_tokens: float, temperature: float, top_p: float) -> Iterator[str]:
    """Text chunks of one generation about `volume`; `stop`, its own event, is set when Stop, Clear, a new
    generation or a new scan stop it (and stays unset when it ends by itself).

    The chunks stop as soon as the session's scan is no longer `volume`. Settings out of range (an API
    client can send any) end it with the pipeline's sentence.
    """
    if session.unreadable:  # refused once: not read again, only to be refused again
        raise gr.Error(session.unreadable)
    stop_generation(session, waiting_cancelled=False)  # the one before it ends; those waiting still wait
    session.in_use()
    key = f"{id(session)}-{time.monotonic_ns()}"
    _STOP_EVENTS[key] = stop
    session.stop_key = key
    session.stop_kind = "report" if messages is None else "chat"
    max_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    if int(max_new_tokens) > MAX_NEW_TOKENS:
        gr.Warning(f"At most {MAX_NEW_TOKENS} new tokens are generated per answer; asked for {int(max_new_tokens)}.")
    temperature = float(temperature)
    if 0 < temperature < MIN_TEMPERATURE:  # typed into the slider's box, which takes it
        gr.Info(f"Temperature {temperature:g} is read as 0, greedy decoding: sampling starts at {MIN_TEMPERATURE:g}.")
        temperature = 0.0
    chunks = None
    try:
        encoding = session.encoding
        if encoding is None:  # an API client that asks before /encode_scan
            try:
                encoding = encode_on_gpu(volume)
            except gr.Error as error:
                if session.volume is volume:
                    session.unreadable = error.message
                raise
            if session.volume is volume:
                session.encoding = encoding
        chunks = stream_on_gpu(encoding, messages, key, max_tokens, temperature, float(top_p))
        for chunk in chunks:
            if stop.is_set() or session.volume is not volume:
                break
            session.in_use()
            yield chunk
    finally:  # closing the pipeline's stream sets the pipeline's own stop event and joins its thread
        if chunks is not None:
            chunks.close()
        _STOP_EVENTS.pop(key, None)


def _scan_replaced(session: ScanSession, volume: Volume) -> bool:
    """Whether a new scan replaced `volume` (the one a handler started on) in this session.

    If so, `volume`'s visual tokens are forgotten once more: the handler's own work may have cached
    them after the session let them go.
    """
    if session.volume is volume:
        return False
    PIPELINE.forget(volume)
    return True


def stop_generation(session: ScanSession | None, waiting_cancelled: bool = True, withdraw: bool = True) -> None:
    """End the session's running generation: its thread stops at the next token, and an answer being written
    is marked stopped at once (what the page shows after Stop). `waiting_cancelled`: the reports and answers
    waiting in the queue were cancelled too (Stop and Clear cancel them), and will not start; `withdraw`: those
    the page sends after the cancel are withdrawn too (`_withdrawn`: by Stop and Clear, not by a session closed,
    whose requests say why)."""
    if session is not None and waiting_cancelled:  # ... and the page holds none of them any more
        if withdraw:
            session.withdrawn.update(dict.fromkeys(session.waiting, "stopped"))  # (or sends them after Stop)
        session.waiting.clear()
        session.writing = ("", 0)
        if session.unbegun is not None:  # an answer not begun yet says so at once (its handler may end later)
            session.unbegun["stopped"] = True
    # Gone at once, not when its handler ends (cancelled, that may be later): Stop is disabled after it
    event = _STOP_EVENTS.pop(session.stop_key, None) if session is not None else None  # (or it ended meanwhile)
    if event is not None:
        event.set()
        if session.answering is not None:
            session.answering["stopped"] = True


def _withdrawn(session: ScanSession | None, event: str) -> str:
    """Whether Stop ("stopped") or Clear ("cleared") came between the press that asked the page's `event` for a
    report or an answer and the page sending its request (a moment, too soon for their cancel to reach it): it is
    then not written. "" otherwise, and for an API client, which asks without `asked_to_write`."""
    if session is None:
        return ""
    withdrawn = session.withdrawn.pop(event, "")
    return withdrawn if session.volume is not None else ""  # closed meanwhile: the page is told why instead


def _asked_about_another_scan(session: ScanSession | None, scan_token: str | None) -> bool:
    """Whether a request was made for a scan the session no longer holds (it waited while a new one loaded).
    No token (an API client that does not send one) means the session's scan."""
    return bool(scan_token) and (session is None or session.token != scan_token)


def chat_view(session: ScanSession) -> list[dict]:
    """The conversation as the chat shows it: an answer cut short (Stop, Clear, its token limit) says so; one not
    begun yet is not shown."""
    return [{"role": message["role"], "content": message["content"] + _answer_end(message)}
            for message in session.messages if message["content"] or message.get("stopped")]


def _answer_end(message: dict) -> str:
    """What the chat adds to an answer that did not end where the model ended it."""
    if message.get("stopped"):
        return ANSWER_STOPPED if message["content"] else ANSWER_STOPPED_UNBEGUN
    if not message.get("cut_off"):
        return ""
    return ANSWER_OUT_OF_CONTEXT if message.get("out_of_context") else ANSWER_CUT_OFF.format(limit=message["cut_off"])


def report_view(session: ScanSession) -> tuple[str, dict]:
    """(report box, download button) for the session's report as it stands: a stopped one says so and is not
    offered for download; none yet, the placeholder."""
    if not session.report:
        return REPORT_PLACEHOLDER, report_download(None)
    if not session.report_finished:
        end = (REPORT_STOPPED if not session.report_cut_off else REPORT_OUT_OF_CONTEXT if session.report_out_of_context
               else REPORT_CUT_OFF.format(limit=session.report_cut_off))
        return session.report + end + sides_in_doubt(session.volume), report_download(None)
    return session.report + sides_in_doubt(session.volume), gr.skip()


def report_download(path: Path | None) -> dict:
    """The download button's update: offering the finished report's file, or greyed out with none (it stays in
    place, so that the chat below it does not move when a report is offered)."""
    return gr.update(value=None if path is None else str(path), interactive=path is not None)


def conversation_view(session: ScanSession | None):
    """(chatbot, report, download) as the session holds them, sent after Stop and Clear: a chunk a cancelled
    generation had already sent can reach the page after their own reply, and would otherwise stay on it."""
    if session is None:
        return [], REPORT_PLACEHOLDER, report_download(None)
    return chat_view(session), *report_view(session)


def clear_conversation(session: ScanSession | None):
    """Forget the report and the conversation; the scan stays. Returns (chatbot, report, download)."""
    if session is not None:
        stop_generation(session)
        session.withdrawn = dict.fromkeys(session.withdrawn, "cleared")
        session.messages, session.report, session.cleared = [], "", session.cleared + 1
        session.chat_cleared += 1
        session.delete_files()
    return [], REPORT_PLACEHOLDER, report_download(None)


def clear_chat(session: ScanSession | None) -> list:
    """The chat's own bin icon: forget the conversation (an answer streaming stops); the report stays.

    It stops an answer through its stop event rather than by cancelling the chat events: a cancel can reach
    the queue after the next question and end that one instead.
    """
    if session is not None:
        if session.stop_kind == "chat":
            stop_generation(session, waiting_cancelled=False)
        session.messages, session.chat_cleared = [], session.chat_cleared + 1
    return []


def decoding(max_new_tokens: float, temperature: float, top_p: float) -> str:
    """How a report was written, as its download says: greedy (temperature 0, or below sampling's least, which
    `_stream` reads as 0) or sampled, and its limit of new tokens."""
    limit = f"at most {max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))} new tokens"
    if float(temperature) < MIN_TEMPERATURE:
        return f"greedy decoding (temperature 0), {limit}"
    return f"sampled at temperature {float(temperature):g}, top-p {float(top_p):g}, {limit}"


def _write_report(session: ScanSession, how: str) -> Path:
    """The finished report as a Markdown file in the session's folder: a model's draft, said to be one at its top,
    with the scan it is about, when it was written, by which checkpoint and `how` (`decoding`), and the line that
    says how often that checkpoint was right; named for the example or "uploaded-scan" and the time, never for the
    uploaded file."""
    volume = session.volume
    z, y, x = volume.shape
    about = PIPELINE.describe()
    spacing = (f"spacing {volume.spacing[2]:.2f} × {volume.spacing[1]:.2f} × {volume.spacing[0]:.2f} mm"
               if volume.spacing_known else "spacing not stored")
    modality = MODALITY_NAMES.get(volume.modality, volume.modality)
    written = time.localtime()
    text = (f"# Draft report written by a model\n\n"
            f"**Not a radiologist's report.** {report_caveat(PIPELINE).strip('*')}"
            + (f" {SIDES_IN_DOUBT}" if volume.meta.get("orientation_unknown") else "") + "\n\n"
            f"- Scan: {session.label}; {modality}, {x} × {y} × {z} voxels, {spacing}\n"
            f"- Written: {time.strftime('%Y-%m-%d %H:%M %Z', written)} by MedVLM 3D (`{about['checkpoint']}`)"
            + (f", {DEMO_WARNING}" if about["demo"] else "; not a medical device, not for clinical use") + "\n"
            f"- Decoding: {how}\n\n"
            f"## The model's report\n\n{session.report.strip()}\n")
    scan = re.sub(r"[^a-z0-9]+", "-", session.label.removeprefix("example: ").lower()).strip("-")
    path = session.own_folder() / f"medvlm-report-{scan}-{time.strftime('%Y%m%d-%H%M', written)}.md"  # no file name
    path.write_text(text, encoding="utf-8")
    return session.keep_file(path)


# The page -----------------------------------------------------------------------------------------

PAGE_CSS = (ASSETS_DIR / "app" / "page.css").read_text(encoding="utf-8")
# The mouse and keys over the slice viewer, as in a radiology viewer: the wheel and the arrow keys step through the
# slices, a click on the track under the image goes to a slice.
VIEWER_SCRIPT = (ASSETS_DIR / "app" / "viewer.js").read_text(encoding="utf-8")
FOCUS_VIEWER = "() => { document.querySelector('#slice-view')?.focus(); }"  # its keys then step through the slices
# ... after a load, only where the focus was lost (the page does not scroll to the viewer: on a phone the report
# button comes first), and not after a file refused (the status line's ⚠️): the visitor picks another
LOAD_REFUSED = "document.querySelector('#status-line')?.innerText.includes('⚠️')"  # a JS test: the status line warns
SHOW_VIEWER = (f"() => {{ if (!{LOAD_REFUSED}) "
               "document.querySelector('#viewer-tabs')?.scrollIntoView({behavior: 'smooth', block: 'start'}); }")
FOCUS_VIEWER_IF_LOST = (f"() => {{ const focused = document.activeElement; if ({LOAD_REFUSED}) return; "
                        "if (!focused || focused === document.body || focused.closest('#scan-source')) "
                        "document.querySelector('#slice-view')?.focus({preventScroll: true}); }")


# How the page's events run: the viewer's four at a time, the model's one at a time (one GPU)
VIEWER_EVENT = {"show_progress": "hidden", "concurrency_limit": 4}
MODEL_EVENT = {"concurrency_limit": 1, "concurrency_id": "gpu"}


def build_demo() -> gr.Blocks:
    """The page: the scan on the left (upload, examples, slices, 3D), the assistant and the scan card on the right;
    then its events (`_wire_loads`, `_wire_viewer`, `_wire_assistant`)."""
    with gr.Blocks(title="MedVLM 3D", delete_cache=DELETE_CACHE) as demo:
        page = SimpleNamespace(session=gr.State(None, delete_callback=lambda old: old.release() if old else None))
        with gr.Row(equal_height=False):
            gr.Markdown("### MedVLM 3D — reports and answers about CT, MR and PET scans")
            gr.Markdown(model_badge(PIPELINE), elem_id="model-badge")
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=5, elem_id="scan-column"):
                _scan_column(page)
            with gr.Column(scale=4, elem_id="assistant-column"):
                _assistant_column(page)
        gr.Markdown(PRIVACY_NOTE, elem_id="privacy-note")
        page.scan_token = gr.Textbox("", visible=False)  # `ScanSession.token` of the scan the page shows
        _wire_loads(page)
        _wire_viewer(page)
        _wire_assistant(page)
        demo.unload(end_session)
    return demo


def _scan_column(page: SimpleNamespace) -> None:
    """The left column: where a scan comes from (folded once one is read), the status line, and the viewer's two
    tabs, the slices and the 3D surface."""
    examples = [example_label(path) for path in list_examples()]
    # Folded once a scan is read: on a laptop screen the viewer and its controls then fit above the fold.
    with gr.Accordion(SCAN_SOURCE_OPEN, open=True, elem_id="scan-source") as page.scan_source:
        page.upload = gr.File(label="Scan: NIfTI, .npy, DICOM or a .zip", file_count="multiple", height=110,
                              elem_id="scan-upload")
        # The examples on one line under the drop zone, not in a column beside it
        with gr.Row(equal_height=False, elem_id="scan-inputs"):
            page.example_picker = gr.Dataset(label="Examples", components=["textbox"],
                                             samples=[[n] for n in examples], visible=bool(examples),
                                             layout="gallery", samples_per_page=8, scale=3, min_width=240,
                                             elem_id="examples")
            if not examples:
                gr.Markdown("*No example scans in `assets/examples/`.*")
            page.folder_upload = gr.UploadButton("Upload a DICOM folder", file_count="directory", size="md",
                                                 scale=1, min_width=150, elem_id="folder-upload")
    page.status = gr.Markdown("Upload a scan, or pick an example.", elem_id="status-line")
    with gr.Tabs(elem_id="viewer-tabs"):
        with gr.Tab("Slices", id="slices"):
            # Plane and window above the image, as a viewer's toolbar: in view on a laptop's screen
            with gr.Row(equal_height=True, elem_id="view-controls"):
                # ... both disabled until there is a scan to view (as the slider)
                page.plane = gr.Radio(plane_choices("CT"), value="axial", label="Plane", show_label=False, scale=3,
                                      interactive=False, elem_id="plane")
                # A preset, or a window typed into the box (350/50, 0-6 inverted), in the scan's units
                page.window = gr.Dropdown(window_choices("CT"), value=default_window("CT"), scale=2,
                                          label=window_box_label("CT"), show_label=False, allow_custom_value=True,
                                          min_width=190, interactive=False, elem_id="window-select")
            page.slice = gr.HTML(slice_html(None, "axial", None, None), elem_id="slice-view")
            with gr.Row(equal_height=True):
                # buttons=[]: no ↺ reset, which moves the slider to 1 without redrawing the slice
                page.slider = gr.Slider(1, 2, value=1, step=1, label="Slice", interactive=False,
                                        elem_id="slice-slider", buttons=[], scale=4)
                # A list, one stop for the keyboard (a radio button per slice was 24 of them); the mouse can also
                # click the green marks under the image.
                page.kept = gr.Dropdown([], value=None, label="Kept slices (axial)", scale=1, min_width=190,
                                        elem_id="kept-slices", interactive=True)
            # Where viewer.js puts a spot clicked on the MIP (find_mip_spot) or a point on a slice (mark_point),
            # and a slice linked in the true
            # findings (jump_to_linked_slice): on the page, not shown.
            page.mip_spot = gr.Textbox(None, visible="hidden", elem_id="mip-spot")
            page.point_spot = gr.Textbox(None, visible="hidden", elem_id="point-spot")  # a point clicked on a slice
            page.linked_slice = gr.Textbox(None, visible="hidden", elem_id="linked-slice")
        with gr.Tab("3D", id="3d"):
            page.threshold = gr.Slider(-1000, 2000, value=300, label="Surface threshold", interactive=False,
                                       elem_id="threshold-slider", buttons=[])
            page.plot = gr.Plot(label="3D surface (drag to turn)", elem_id="plot-3d")


def _assistant_column(page: SimpleNamespace) -> None:
    """The right column: the report and its buttons, the conversation, the generation settings, and the scan's
    card with its modality (which can be changed)."""
    with gr.Row(elem_id="report-buttons"):
        page.report_button = gr.Button("Generate report", variant="primary", scale=2, elem_id="report-button",
                                       interactive=False)  # until a scan is loaded, as Ask
        # Enabled while a report or an answer is being written, or waits to be (`asked_to_write`)
        page.stop_button = gr.Button("Stop", variant="stop", scale=1, interactive=False, elem_id="stop-button")
        page.clear_button = gr.Button("Clear all", scale=1)  # the chat's bin icon is "Clear"
    page.report = gr.Markdown(REPORT_PLACEHOLDER, elem_id="report-box", label="Report")
    page.download = gr.DownloadButton("Download report (.md)", interactive=False, size="sm",
                                      elem_id="report-download")
    page.download.keep_in_cache = _SESSION_FILES
    gr.Markdown(report_caveat(PIPELINE), elem_id="report-caveat")
    with gr.Accordion("True findings of this example", open=False, visible=False,
                      elem_id="example-truth") as page.truth_box:
        page.truth = gr.Markdown("")
    # Copy buttons only: the default Share button posts the conversation to the Space's Discussions.
    page.chatbot = gr.Chatbot(label="Questions about this scan", height=300, elem_id="chatbot",
                              buttons=["copy", "copy_all"],
                              render_markdown=False,  # "3*4*5 mm" shows as typed, not with an italic 4
                              placeholder="Ask about the scan: organs, lesions, location, size.")
    with gr.Row(elem_id="question-row"):
        page.question = gr.Textbox(placeholder="Ask a question about this scan …", show_label=False, scale=5,
                                   label="Question about this scan",  # what a screen reader calls it
                                   elem_id="question", submit_btn=False, max_length=MAX_QUESTION_CHARS)
        page.ask_button = gr.Button("Ask", variant="primary", scale=1, min_width=80, interactive=False,
                                    elem_id="ask-button")
    page.suggestions = gr.Dataset(label="Suggested questions", components=[page.question], elem_id="suggestions",
                                  samples=[[q] for q in SUGGESTED_QUESTIONS["OT"]], layout="gallery")  # any scan's
    with gr.Accordion("Generation settings", open=False, elem_id="generation-settings"):
        page.settings = [gr.Slider(16, MAX_NEW_TOKENS, value=256, step=16, label="Max new tokens"),
                         gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
                         gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p (with temperature > 0)")]
    # The scan's facts under the assistant, beside the viewer: under the viewer they were a scroll away. Its
    # modality can be changed, for a file that does not say it (a NIfTI) or says it wrongly.
    page.modality = gr.Dropdown([(MODALITY_NAMES[name], name) for name in MODALITIES], value=None,
                                interactive=False, label="Modality", elem_id="modality",
                                info="as the file states it, or guessed from its values where it does not: "
                                "change it if it is wrong")
    page.card = gr.Markdown(scan_card(None), elem_id="scan-card")


def _wire_loads(page: SimpleNamespace) -> None:
    """A scan comes in (an upload, a DICOM folder, an example, another modality chosen): it is read, then encoded
    by the model and drawn in 3D."""
    session, status = page.session, page.status
    scan_outputs = [getattr(page, name) for name in LOAD_OUTPUTS]
    # Reading a big series takes seconds and, for a moment, twice its memory: two at a time, whatever the source.
    # Its progress shows on the status line alone (the empty chat with a timer looked as if it answered).
    loading = {"show_progress": "minimal", "show_progress_on": status, "concurrency_limit": 2,
               "concurrency_id": "load"}
    # First, at once, the status line says the scan is being read (it said "Ready" about the last one meanwhile).
    reading = {"fn": reading_the_scan, "inputs": None, "outputs": status, "queue": False,
               "show_progress": "hidden", "api_visibility": "private"}
    # preprocess=False on the events that take the window, the slice or an example's row: what an API client
    # sends that the page would not (another modality's window, an example's name) reaches the handler, which
    # reads it as the default or by name, instead of Gradio's check, a traceback in the log and a bare error.
    loads = {
        "scan": page.upload.upload(**reading).then(load_scan, [page.upload, session], scan_outputs,
                                                   api_name="load_scan", **loading),
        "folder": page.folder_upload.upload(**reading).then(load_scan, [page.folder_upload, session], scan_outputs,
                                                            api_name="load_folder", **loading),
        "example": page.example_picker.click(**reading).then(load_example, [page.example_picker, session],
                                                             scan_outputs, api_name="load_example",
                                                             preprocess=False, **loading),
    }
    # Another modality chosen: only if it is another (`reading_as`), hence .success
    choosing = page.modality.input(**{**reading, "fn": reading_as, "inputs": [page.modality, session]},
                                   preprocess=False)
    loads["modality"] = choosing.success(change_modality, [page.modality, session], scan_outputs,
                                         api_name="change_modality", preprocess=False, **loading)
    for loaded in loads.values():  # the button or box used is folded away: the keys go to the viewer
        loaded.then(None, js=FOCUS_VIEWER_IF_LOST)
    loads["modality"].then(None, js=SHOW_VIEWER)  # the box is a scroll below it: the scan as read now comes in view
    loads["scan"].then(empty_upload, None, page.upload, api_visibility="private", **VIEWER_EVENT)
    encodes = []
    for kind, loaded in loads.items():  # after any load: encode and draw; the upload's chain is the API's
        visibility = "public" if kind == "scan" else "private"
        encoded = loaded.then(encode_scan, [session], [status, page.kept, page.slice], api_name=f"encode_{kind}",
                              api_visibility=visibility, **MODEL_EVENT)
        encoded.then(asking_buttons, session, [page.report_button, page.ask_button], queue=False,
                     show_progress="hidden", api_visibility="private")
        encodes.append(encoded)
        loaded.then(show_3d, [session, page.threshold], page.plot, api_name=f"{kind}_3d", api_visibility=visibility,
                    **VIEWER_EVENT)
    # A load cancels the encoding that still works on the old scan (the load's own chain encodes whichever scan
    # the session holds after it). A report or answer is not cancelled: one about a scan that a new one replaces
    # stops itself, and one about a scan that stays (an upload refused) goes on.
    triggers = [page.upload.upload, page.folder_upload.upload, page.example_picker.click]
    gr.on(triggers, None, None, None, cancels=encodes, queue=False, api_visibility="private")
    choosing.success(None, None, None, cancels=encodes, queue=False, api_visibility="private")


def _wire_viewer(page: SimpleNamespace) -> None:
    """The viewer's controls: the plane, the window, the slider, the kept slices, a spot clicked on the MIP, and the
    3D surface's threshold."""
    session, plane, window, slider, view = page.session, page.plane, page.window, page.slider, page.slice
    plane.input(change_plane, [session, plane, window], [slider, view, window], api_name="change_plane",
                **VIEWER_EVENT)
    window.input(change_window, [session, plane, window, slider], [view, window], api_name="change_window",
                 preprocess=False, **VIEWER_EVENT)
    # preprocess=False: a number typed into a slider's box past its ends (or an emptied box) reaches the handler,
    # which shows the nearest end and sets the box to it; gr.Slider's own check would answer with a bare "Value … is
    # greater than maximum value …" and leave the number in the box.
    slider.input(show_slice, [session, plane, window, slider], [view, slider], api_name="show_slice",
                 trigger_mode="always_last", preprocess=False, **VIEWER_EVENT)
    # .change: a pick by the keyboard (the arrows or a number typed, then Enter) sends no .select, only the mouse's
    # does (the handler's clearing of the list sends one more, which changes nothing). Then the viewer has the
    # focus, for the arrow keys: the list let go of it.
    page.kept.change(jump_to_kept, [session, page.kept, window], [plane, slider, view, page.kept],
                     api_name="jump_to_kept", **VIEWER_EVENT).then(None, js=FOCUS_VIEWER)
    # .change: a hidden textbox sends no .input for viewer.js's event (its count makes each click a change)
    page.mip_spot.change(find_mip_spot, [session, page.mip_spot, window], [plane, slider, view],
                         api_name="find_mip_spot", preprocess=False, **VIEWER_EVENT)
    page.point_spot.change(mark_point, [session, page.point_spot, window], [view], api_name="mark_point",
                           preprocess=False, **VIEWER_EVENT)
    page.linked_slice.change(jump_to_linked_slice, [session, page.linked_slice, window], [plane, slider, view, window],
                             api_name="jump_to_linked_slice", api_visibility="private", preprocess=False,
                             **VIEWER_EVENT).then(None, js=FOCUS_VIEWER)
    # Dragging, the number box (Enter) and the arrow keys all redraw; while one redraw runs, only the last value
    # asked for waits.
    page.threshold.input(redraw_3d, [session, page.threshold], [page.plot, page.threshold], api_name="show_3d",
                         trigger_mode="always_last", preprocess=False, **VIEWER_EVENT)


def _wire_assistant(page: SimpleNamespace) -> None:
    """The report and the conversation: Generate report, Ask (or Enter, or a suggested question), Stop, Clear all
    and the chat's bin icon."""
    session, stop_button, question, chatbot = page.session, page.stop_button, page.question, page.chatbot
    asking = [session, *page.settings, page.scan_token]

    # Each asks first (one quick step, so that it counts before the request can start) for Stop to be enabled, and
    # Stop shows afterwards whether anything else is still being written or waits.
    def asks(event: str) -> dict:
        return {"fn": functools.partial(asked_to_write, event), "inputs": session, "outputs": stop_button,
                "queue": False, "api_visibility": "private"}

    report_event = page.report_button.click(**asks("report")).then(
        generate_report, asking, [page.report, page.download], api_name="report", **MODEL_EVENT)
    chat_events = [
        trigger(**asks(name)).then(functools.partial(chat, asked_by=name), [question, *asking], [chatbot, question],
                                   api_name=name, **MODEL_EVENT)
        for trigger, name in ((page.ask_button.click, "chat"), (question.submit, "chat_submit"))
    ]
    suggestion_event = page.suggestions.click(
        suggested_question, page.suggestions, question, api_name="suggest", api_visibility="private", queue=False,
    ).then(**asks("chat_suggested")).then(functools.partial(chat, asked_by="chat_suggested"), [question, *asking],
                                          [chatbot, question], api_name="chat_suggested", api_visibility="private",
                                          **MODEL_EVENT)
    running = [report_event, *chat_events, suggestion_event]
    for written, event in zip(running, ("report", "chat", "chat_submit", "chat_suggested"), strict=True):
        for after in (written.then, written.failure):  # ended, or failed (the page runs no .then after an error)
            after(functools.partial(stop_button_state, ended=event), session, stop_button, queue=False,
                  api_visibility="private")
    # Stop and Clear cancel what runs or waits, then show what the session holds: queued behind the cancelled
    # events' last chunks (one stream per page), so that no chunk sent before the cancel stays on the page.
    conversation = [chatbot, page.report, page.download]
    for ended in (
        stop_button.click(stop_generation, session, None, cancels=running, api_name="stop", queue=False),
        page.clear_button.click(clear_conversation, session, conversation, cancels=running, api_name="clear",
                                queue=False),
    ):
        ended.then(conversation_view, session, conversation, api_visibility="private", **VIEWER_EVENT).then(
            stop_button_state, session, stop_button, queue=False, api_visibility="private")
    # The chatbot's own bin icon forgets the conversation; else it would empty only the screen, and the next
    # question would bring the conversation back.
    chatbot.clear(clear_chat, session, chatbot, queue=False, api_visibility="private")


class CutOffUploadNotice(logging.Filter):
    """Drops the traceback uvicorn logs when an upload is cut off half-way (starlette's ClientDisconnect): the
    visitor went away or lost the connection, nothing failed, and the partial file is swept
    (`sweep_upload_leftovers`). Any other error is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ClientDisconnect))


class UnknownEndpointNotice(logging.Filter):
    """Logs in one line, without Gradio's 60-line traceback, a request that names no endpoint of the app (POST
    /gradio_api/run/predict: Gradio 3's route, which old clients and bots probe): anyone could otherwise fill a
    public Space's log with them and bury the errors that matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FnIndexInferError):
            asked = "".join(character if character.isprintable() else "?" for character in str(record.exc_info[1]))
            record.msg, record.args = f"a request named no endpoint of this app, refused ({asked[:200]})", ()
            record.exc_info = record.exc_text = None
        return True


@functools.cache
def _start_once_in_this_process() -> None:
    """Once, however often this process launches a page (the tests launch several): the sweeping thread, and the
    log's filters."""
    log = logging.getLogger("uvicorn.error")
    log.addFilter(CutOffUploadNotice())
    log.addFilter(UnknownEndpointNotice())
    threading.Thread(target=_sweep_forever, args=DELETE_CACHE, name="medvlm-sweep", daemon=True).start()


def launch(demo: gr.Blocks, **options):
    """Serve the page on this machine only, 127.0.0.1:7860, unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
    (or PORT, as Deta Space sets it, or `options`) say otherwise. In a Hugging Face Space (SPACE_ID set)
    it listens on 0.0.0.0, where the Space's proxy reaches it; the Spacefile sets it for Deta Space.

    One model event at a time (one GPU); viewer events run four at a time. A thread sweeps the upload
    folder for what Gradio leaves there (`sweep_upload_leftovers`).
    """
    _start_once_in_this_process()
    in_a_space = bool(os.environ.get("SPACE_ID"))  # Hugging Face sets it in every Space, Docker ones too
    settings = {"server_name": os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if in_a_space else "127.0.0.1"),
                "server_port": int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860),
                "max_file_size": MAX_UPLOAD_BYTES, "css": PAGE_CSS, "js": VIEWER_SCRIPT,
                "theme": gr.themes.Soft(),
                # Gradio would keep every run (questions, reports, slice images, upload names) in the browser's
                # storage, past the tab's closing: on a shared ward computer the next user would see them.
                "run_history": False, **options}
    # api_open=False: Gradio would otherwise open, outside Hugging Face Spaces, REST routes that skip the queue,
    # its size and every concurrency limit (gradio_client goes through the queue).
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE, api_open=False).launch(**settings)


demo = build_demo()

if __name__ == "__main__":
    launch(demo)
