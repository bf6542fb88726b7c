"""The launched demo, driven through its API with gradio_client: upload, streamed report, two chat turns."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from medvlm.writers import save_nifti
from tests.test_app import app_module, tiny_answers_count_as_finished, torso_ct  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def live_demo(app_module):  # noqa: F811
    """The app served on a free local port; yields (its Blocks, its URL)."""
    demo = app_module.build_demo()
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                  quiet=True)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def server(live_demo):
    """The served app's URL."""
    return live_demo[1]


@pytest.fixture
def client(server):
    """An API client of the served app, closed after the test (as a visitor's tab is), so that its session ends
    and its scan does not count against the memory budget of the tests that follow."""
    from gradio_client import Client

    opened = Client(server, verbose=False)
    yield opened
    opened.close()


def text_of(message: dict) -> str:
    """A chatbot message's text: Gradio sends the content as a list of {"type": "text", "text"} blocks."""
    return "".join(block["text"] for block in message["content"] if block.get("type") == "text")


def test_upload_report_and_two_chat_turns(client, app_module, tmp_path, monkeypatch):  # noqa: F811
    from gradio_client import handle_file

    scan = save_nifti(tmp_path / "torso.nii.gz", torso_ct(seed=11), (5.0, 1.0, 1.0), dtype=np.int16, modality="CT")
    model = app_module.PIPELINE.model
    encodings = []
    choose = model.choose_slices
    monkeypatch.setattr(model, "choose_slices", lambda *a, **k: encodings.append(1) or choose(*a, **k))

    loaded = client.predict([handle_file(str(scan))], api_name="/load_scan")
    status, card = loaded[0], loaded[1]
    assert "reading the scan" in status and "CT (computed tomography)" in card
    status, _, _ = client.predict(api_name="/encode_scan")
    assert status.startswith("Ready") and len(encodings) == 1

    job = client.submit(24, 0.0, 1.0, api_name="/report")
    partial = [output[0] for output in job]
    assert len(partial) >= 2 and partial[0] != partial[-1]
    final = job.result()[0]
    assert final.strip() and final == partial[-1]

    first = client.predict("Which organ is abnormal?", 16, 0.0, 1.0, api_name="/chat")
    job = client.submit("Where is the lesion?", 16, 0.0, 1.0, api_name="/chat")
    updates = list(job)
    history = job.result()[0]
    assert len(updates) >= 2
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[:2] == first[0] and text_of(history[2]) == "Where is the lesion?" and text_of(history[3])
    assert len(encodings) == 1  # one encoding for the report and both turns: the scan's tokens were reused


def test_the_api_loads_an_example_by_name_and_encodes_it(client):
    """As the README shows an API client: /load_example takes the example's name; /encode_scan answers with the
    ready line and the slice the viewer shows (the scan's middle axial one)."""
    loaded = client.predict("mr brain", api_name="/load_example")
    assert "reading the scan" in loaded[0] and "MR (magnetic resonance)" in loaded[1]
    status, _, view = client.predict(api_name="/encode_scan")
    assert status.startswith("Ready") and "Axial" in view and "window auto" in view
    assert client.predict("no such scan", api_name="/load_example")[0].startswith("⚠️ There is no example")


def test_a_wrong_upload_answers_with_a_sentence(client, tmp_path):
    from gradio_client import handle_file

    junk = tmp_path / "notes.nii.gz"
    junk.write_bytes(b"this is not a scan")
    status = client.predict([handle_file(str(junk))], api_name="/load_scan")[0]
    assert status.startswith("⚠️") and "\n" not in status


def test_a_report_stays_downloadable_while_its_session_lasts(live_demo, client, app_module, tmp_path):  # noqa: F811
    """Gradio's cache sweep deletes the files the app handed out once they are an hour old (DELETE_CACHE);
    a clinician who downloads the report later than that still gets it, until the tab closes."""
    import urllib.error
    import urllib.request

    from gradio.route_utils import delete_files_created_by_app
    from gradio_client import handle_file

    demo, url = live_demo
    scan = save_nifti(tmp_path / "torso.nii.gz", torso_ct(seed=12), (5.0, 1.0, 1.0), dtype=np.int16, modality="CT")
    client.predict([handle_file(str(scan))], api_name="/load_scan")
    client.predict(api_name="/encode_scan")
    text = client.predict(16, 0.0, 1.0, api_name="/report")[0]
    session = app_module._OPEN_SESSIONS[client.session_hash]
    report = str(next(session.folder.glob("medvlm-report-*.md")))
    assert report in set().union(*demo.temp_file_sets)  # handed out: the sweep knows the file

    delete_files_created_by_app(demo, age=0)  # the sweep, with every file past its age
    with urllib.request.urlopen(f"{url}gradio_api/file={report}") as response:
        assert text.strip() in response.read().decode()

    session.release()  # the tab closed: the report goes
    assert not Path(report).exists() and report not in app_module._SESSION_FILES
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{url}gradio_api/file={report}")
