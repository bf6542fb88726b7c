"""The launched app under load and with identifiable data: 8 sessions at once, cancelled generations, no PHI leaks.

Sessions talk to the app through gradio_client, as a browser tab would (each client is one session with its own
heartbeat; closing the client ends the session).
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medvlm.phantom import make_phantom
from medvlm.volume import load_volume
from medvlm.writers import save_dicom_series, save_nifti
from tests.test_app import MADE_UP_PATIENT, app_module, tiny_answers_count_as_finished  # noqa: F401  (fixtures)
from tests.test_app_live import free_port, text_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Write a radiology report for this scan."  # the demo model opens with the technique: "CT of ..."
ANSWER_TOKENS = 24
MODALITY_WORDS = {"CT": ("computed tomography", " ct"), "MR": ("magnetic resonance", " mr", "mri"),
                  "PT": ("pet", "positron")}


@pytest.fixture(scope="module")
def server(app_module):  # noqa: F811
    """The app served on a free local port (with the demo checkpoint when assets/demo-model exists)."""
    from medvlm.pipeline import DEMO_CHECKPOINT, Pipeline

    tiny = app_module.PIPELINE
    if DEMO_CHECKPOINT.is_dir():
        app_module.PIPELINE = Pipeline.from_pretrained(None)
    demo = app_module.build_demo()
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                  quiet=True)
    yield url
    demo.close()
    app_module.PIPELINE = tiny


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "medvlm-generate"]


def wait_until(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def phantom_scans(folder: Path) -> list[tuple[Path, str]]:
    """Eight phantoms of different modality and size (so each scan card is its own): (file, modality)."""
    scans = []
    for number, (modality, matrix) in enumerate([("ct", 64), ("mr", 72), ("pt", 80), ("ct", 88), ("mr", 96),
                                                  ("pt", 56), ("ct", 48), ("mr", 40)]):
        phantom = make_phantom([number], modality, matrix=matrix)
        path = save_nifti(folder / f"scan-{number}.nii.gz", phantom.data, phantom.spacing, modality=phantom.modality)
        scans.append((path, phantom.modality))
    return scans


def test_eight_sessions_at_once_each_get_answers_about_their_own_scan(server, app_module, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    scans = phantom_scans(tmp_path)
    pipeline = app_module.PIPELINE
    expected = []
    for path, _ in scans:  # each scan alone first: its fingerprint and its greedy answer
        volume = load_volume(path)
        answer = "".join(pipeline.chat(volume, [{"role": "user", "content": QUESTION}], max_new_tokens=ANSWER_TOKENS))
        expected.append((volume, answer))
        pipeline.forget(volume)

    def session(index: int) -> dict:
        path, _ = scans[index]
        client = Client(server, verbose=False)
        loaded = client.predict([handle_file(str(path))], api_name="/load_scan")
        status = client.predict(api_name="/encode_scan")[0]
        history = client.predict(QUESTION, ANSWER_TOKENS, 0.0, 1.0, api_name="/chat")[0]
        scan = app_module._OPEN_SESSIONS[client.session_hash]
        return {"card": loaded[1], "status": status, "answer": text_of(history[-1]),
                "fingerprint": scan.volume.fingerprint, "client": client}

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(session, range(8)))

    assert len(results) == 8  # no request lost
    for (path, modality), (volume, answer), result in zip(scans, expected, results, strict=True):
        z, y, x = volume.shape
        assert f"{x} × {y} voxels × {z} axial slices" in result["card"], path.name
        assert f" of {z} axial slices" in result["status"]
        assert result["fingerprint"] == volume.fingerprint  # the session holds its own scan
        assert result["answer"] == answer  # the answer is the one its own scan gets alone
        if app_module.PIPELINE.describe()["demo"] and "tiny" not in app_module.PIPELINE.name:
            said = f" {result['answer'].lower()}"
            named = {name for name, words in MODALITY_WORDS.items() if any(word in said for word in words)}
            assert named == {modality}, result["answer"]
    assert len({volume.fingerprint for volume, _ in expected}) == 8
    for result in results:
        result["client"].close()

    late = Client(server, verbose=False)  # the app keeps serving
    late.predict([handle_file(str(scans[0][0]))], api_name="/load_scan")
    assert text_of(late.predict(QUESTION, 16, 0.0, 1.0, api_name="/chat")[0][-1])
    late.close()


def test_stop_and_cancel_end_the_generation_thread(server, tmp_path):
    from gradio_client import Client, handle_file

    scan = save_nifti(tmp_path / "scan.nii.gz", make_phantom([3], "ct", matrix=48).data, (5.0, 4.0, 4.0),
                      modality="CT")
    client = Client(server, verbose=False)
    client.predict([handle_file(str(scan))], api_name="/load_scan")
    for how in ("stop", "cancel"):
        job = client.submit(1000, 0.0, 1.0, api_name="/report")
        assert wait_until(lambda j=job: len(j.outputs()) >= 2), "the report did not start streaming"
        assert generation_threads()
        if how == "stop":
            client.predict(api_name="/stop")
        else:
            job.cancel()
        assert wait_until(lambda: not generation_threads(), 10), f"{how} left the generation running"
    client.close()


_GONE_CLIENT = """
import sys
from gradio_client import Client, handle_file
client = Client(sys.argv[1], verbose=False)
client.predict([handle_file(sys.argv[2])], api_name="/load_scan")
for _ in client.submit(1000, 0.0, 1.0, api_name="/report"):
    print("chunk", flush=True)
"""


def test_a_client_that_goes_away_ends_its_generation(server, tmp_path):
    scan = save_nifti(tmp_path / "scan.nii.gz", make_phantom([4], "mr", matrix=48).data, (4.0, 4.0, 4.0),
                      modality="MR")
    process = subprocess.Popen([sys.executable, "-c", _GONE_CLIENT, server, str(scan)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "chunk"
        assert generation_threads()
    finally:
        process.kill()  # no goodbye: the connection simply drops
        process.wait()
    assert wait_until(lambda: not generation_threads(), 30), "the generation outlived its client"


def _identifiers() -> list[str]:
    parts = [value for value in MADE_UP_PATIENT.values() if value]
    return parts + [part for value in parts for part in value.split("^") if len(part) > 3]


def _files_holding(folder: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                content = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {needle!r}" for needle in needles if needle in content]
    return hits


def test_patient_identifiers_never_leave_the_upload(server, app_module, tmp_path, capfd):  # noqa: F811
    from gradio.processing_utils import get_upload_folder
    from gradio_client import Client, handle_file

    phantom = make_phantom([5], "ct", matrix=48)
    files = save_dicom_series(tmp_path / "series", phantom.data, phantom.spacing, series_description="CHEST",
                              patient=MADE_UP_PATIENT, intercept=-1024.0)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in files:
            zipped.write(path, f"study/{path.name}")
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level, root.level = root.level, logging.DEBUG
    root.addHandler(handler)
    try:
        client = Client(server, verbose=False)
        responses = [client.predict([handle_file(str(archive))], api_name="/load_scan"),
                     client.predict(api_name="/encode_scan"),
                     client.predict(16, 0.0, 1.0, api_name="/report"),
                     client.predict("Who is the patient and where was this scanned?", 16, 0.0, 1.0, api_name="/chat"),
                     client.predict("axial", "soft tissue", 5, api_name="/show_slice"),
                     client.predict("coronal", "bone", api_name="/change_plane")]
        scan = app_module._OPEN_SESSIONS[client.session_hash]
        session_folder = scan.folder
        client.close()  # the tab closes: its heartbeat ends, and with it the session
        assert wait_until(lambda: scan.volume is None, 20), "the session was not released"
    finally:
        root.removeHandler(handler)
        root.level = level
    out, err = capfd.readouterr()
    shown = repr(responses) + out + err + records.getvalue()
    for identifier in _identifiers():
        assert identifier not in shown, f"{identifier!r} appeared in a response or log"
    assert session_folder is not None and not session_folder.exists()
    uploads = Path(get_upload_folder())
    needles = [identifier.encode() for identifier in _identifiers()]
    assert not _files_holding(uploads, needles), "an uploaded or derived file with identifiers was left behind"
    assert not [p for p in Path(tempfile.gettempdir()).glob("medvlm-*") if _files_holding(p, needles)]
    assert not list(uploads.rglob("study.zip")) and not list(uploads.rglob("*.dcm"))


def test_one_report_at_a_time_and_the_viewer_answers_while_one_is_written(server, app_module, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """One model event at a time (one GPU): while a visitor's report is being written, a second visitor's report
    waits in the queue, told so, and that visitor meanwhile loads a scan and scrolls it; then both reports come."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    started, go_on = [], threading.Event()
    stream = app_module._stream

    def held(*args):  # the generation starts once the test says so; counted as soon as its event runs
        started.append(args[0])
        go_on.wait(60)
        yield from stream(*args)

    monkeypatch.setattr(app_module, "_stream", held)
    scan = save_nifti(tmp_path / "scan.nii.gz", make_phantom([6], "ct", matrix=48).data, (5.0, 4.0, 4.0),
                      modality="CT")
    first, second = Client(server, verbose=False), Client(server, verbose=False)
    try:
        first.predict([handle_file(str(scan))], api_name="/load_scan")
        writing = first.submit(16, 0.0, 1.0, api_name="/report")
        assert wait_until(lambda: len(started) == 1), "the first report did not start"
        second.submit([handle_file(str(scan))], api_name="/load_scan").result(timeout=30)
        waiting = second.submit(16, 0.0, 1.0, api_name="/report")
        view = second.submit("axial", "soft tissue", 3, api_name="/show_slice").result(timeout=30)[0]
        assert "Axial 3 /" in view  # queued after the second report, answered before it
        assert wait_until(lambda: waiting.status().code == Status.IN_QUEUE, 10)
        assert len(started) == 1 and not writing.done()
    finally:
        go_on.set()
    assert writing.result(timeout=60)[0].strip() and waiting.result(timeout=60)[0].strip()
    assert len(started) == 2
    first.close()
    second.close()


def test_routes_that_skip_the_queue_are_closed(server):
    """Gradio's REST routes run an event outside the queue, its bound and every concurrency limit: closed
    (api_open=False), so that the model is reached only through the queue, as gradio_client does."""
    import httpx

    answer = httpx.post(f"{server}gradio_api/run/report", json={"data": [16, 0.0, 1.0]}, timeout=30)
    assert answer.status_code == 404 and "join the queue" in answer.text
