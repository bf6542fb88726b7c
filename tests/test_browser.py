"""The demo in a real browser (Debian's Chromium driven by Playwright): what a clinician does, end to end."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from medvlm.projection import mip_point
from medvlm.volume import load_volume
from medvlm.writers import save_nifti
from tests.test_app import ROOT, app_module, tiny_answers_count_as_finished, torso_ct  # noqa: F401  (fixtures)
from tests.test_app_live import live_demo, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1366, "height": 657}  # a 1366x768 screen, less the browser's bars
DESKTOP = {"width": 1920, "height": 970}  # a 1920x1080 screen, less the browser's bars


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("MEDVLM_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def example_scan(tmp_path: Path) -> Path:
    """A NIfTI example from assets/examples when there is one, else a CT torso written for the test."""
    shipped = sorted((ROOT / "assets" / "examples").glob("*.nii.gz"))
    if shipped:
        return shipped[0]
    return save_nifti(tmp_path / "torso.nii.gz", torso_ct(), (5.0, 1.0, 1.0), dtype=np.int16, modality="CT")


def steady_caption(page, still_ms: int = 600, tries: int = 10) -> str:
    """The slice caption once it has stayed the same for `still_ms` (on a busy machine a frame asked for earlier
    can arrive late); a viewer that keeps changing it fails the test."""
    caption = page.locator("#slice-view .slice-caption").inner_text()
    for _ in range(tries):
        page.wait_for_timeout(still_ms)
        now = page.locator("#slice-view .slice-caption").inner_text()
        if now == caption:
            return caption
        caption = now
    raise AssertionError(f"the slice caption kept changing (last: {caption!r})")


def test_a_clinician_session(browser, server, app_module, tmp_path, monkeypatch):  # noqa: F811
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#model-badge").wait_for()
    colour = "button => getComputedStyle(button).backgroundColor"
    page.wait_for_function("() => document.querySelector('#report-button')?.disabled")  # no scan yet
    disabled = page.locator("#report-button").evaluate(colour)

    others = set(app_module._OPEN_SESSIONS)
    page.locator("#scan-upload input[type=file]").set_input_files(str(example_scan(tmp_path)))
    page.locator("#status-line", has_text="Ready").wait_for()
    [own] = set(app_module._OPEN_SESSIONS) - others  # this page's session (its hash)
    # The upload folds away once the scan is read.
    assert page.locator("#scan-upload").is_hidden()
    # The plane, the window, the image and its caption fit a laptop's window; on a desktop's the image grows.
    for part in ("#plane", "#window-select", "#slice-view .slice-caption"):
        box = page.locator(part).bounding_box()
        assert box["y"] + box["height"] <= LAPTOP["height"], (part, box)
    laptop_height = page.locator("#slice-view img").bounding_box()["height"]
    page.set_viewport_size(DESKTOP)
    assert page.locator("#slice-view img").bounding_box()["height"] >= 2 * laptop_height
    caption = page.locator("#slice-view .slice-caption").bounding_box()
    assert caption["y"] + caption["height"] <= DESKTOP["height"], caption
    page.set_viewport_size(LAPTOP)
    image = page.locator("#slice-view img")
    before = image.get_attribute("src")
    page.locator("#slice-slider input[type=range]").fill("5")
    page.wait_for_function("before => document.querySelector('#slice-view img').src !== before", arg=before)
    assert "Axial 5 /" in page.locator("#slice-view").inner_text()
    page.locator("#slice-view img").hover()
    page.mouse.wheel(0, 120)  # one notch down: one slice toward the feet, as in a radiology viewer
    page.locator("#slice-view", has_text="Axial 4 /").wait_for()
    page.mouse.wheel(0, -120)
    page.locator("#slice-view", has_text="Axial 5 /").wait_for()
    for notch in range(1, 6):  # notch by notch, every slice shows: none is skipped, whatever a notch's size
        page.mouse.wheel(0, -120)
        page.locator("#slice-view", has_text=f"Axial {5 + notch} /").wait_for()
    for _ in range(12):  # a touchpad's small deltas: 120 px in all, one slice
        page.mouse.wheel(0, 10)
    page.locator("#slice-view", has_text="Axial 9 /").wait_for()
    page.wait_for_timeout(300)
    assert "Axial 9 /" in page.locator("#slice-view").inner_text()
    box = page.locator("#slice-slider input[type=number]")
    box.fill("999")  # past the last slice: that slice, and the box says which
    box.press("Enter")
    count = page.locator("#slice-slider input[type=range]").get_attribute("max")
    page.locator("#slice-view", has_text=f"Axial {count} / {count}").wait_for()
    page.wait_for_function(f"() => document.querySelector('#slice-slider input[type=number]').value === '{count}'")

    # A click on the track under the image: near a green mark, that kept slice (a 2 px mark is too thin to hit);
    # elsewhere, the slice at that place.
    mark = page.locator("#slice-view .kept-mark").nth(1)
    kept_number = mark.get_attribute("data-slice")
    mark_box = mark.bounding_box()
    page.mouse.click(mark_box["x"] + mark_box["width"] / 2 + 5, mark_box["y"] + mark_box["height"] / 2)
    page.locator("#slice-view", has_text=f"Axial {kept_number} /").wait_for()
    assert "kept by the model" in page.locator("#slice-view .slice-caption").inner_text()
    track = page.locator("#slice-view .slice-track").bounding_box()
    page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)
    page.locator("#slice-view", has_text=f"Axial {count} / {count}").wait_for()
    # The list of kept slices: one stop for the keyboard, and a choice shows that slice.
    last_kept = page.locator("#slice-view .kept-mark").last.get_attribute("data-slice")
    page.locator("#kept-slices input").click()
    page.get_by_role("option", name=last_kept, exact=True).click()
    page.locator("#slice-view", has_text=f"Axial {last_kept} /").wait_for()
    # the pick hands the viewer the keys once it is drawn: the list is focused again only after that, or the hand-over
    # (late on a loaded machine) takes the keys the list is about to be typed into
    page.wait_for_function("() => document.activeElement === document.querySelector('#slice-view')")
    # ... and by the keyboard: a kept slice's number typed, then Enter; the viewer then has the keys
    typed_kept = page.locator("#slice-view .kept-mark").nth(1).get_attribute("data-slice")
    page.locator("#kept-slices input").focus()
    page.keyboard.type(typed_kept)
    page.keyboard.press("Enter")
    page.locator("#slice-view", has_text=f"Axial {typed_kept} /").wait_for()
    page.wait_for_function("() => document.activeElement === document.querySelector('#slice-view')")
    assert page.locator("#kept-slices input").input_value() == ""  # cleared, for the next pick
    # A window of one's own: width/level typed into the window box.
    page.locator("#window-select input").fill("1500/-600")
    page.locator("#window-select input").press("Enter")
    page.locator("#slice-view", has_text="window typed · W 1500 / L −600").wait_for()
    # The keys, once the image is clicked: the arrows step a slice (down toward slice 1, as the wheel), Page Down
    # ten, End to the last; the viewer keeps the focus while each slice is drawn.
    page.locator("#slice-view img").click()
    page.keyboard.press("ArrowDown")
    page.locator("#slice-view", has_text=f"Axial {int(typed_kept) - 1} /").wait_for()
    # A screen reader hears the slice the keys stopped on, and the status line when it changes.
    page.locator("#viewer-announcer", has_text=f"Axial {int(typed_kept) - 1} /").wait_for(state="attached")
    assert page.locator("#status-line").get_attribute("role") == "status"
    # ... which reads out its text, not Gradio's timer in it
    assert page.locator("#status-line [data-testid=status-tracker]").get_attribute("aria-hidden") == "true"
    page.keyboard.press("End")
    page.locator("#slice-view", has_text=f"Axial {count} / {count}").wait_for()
    page.keyboard.press("PageDown")
    page.locator("#slice-view", has_text=f"Axial {int(count) - 10} /").wait_for()
    # Enlarged to the whole window, the image is about twice as tall; the wheel still steps; Esc brings it back.
    small = page.locator("#slice-view img").bounding_box()["height"]
    page.locator("#slice-view .slice-enlarge").click()
    page.locator("#slice-view.enlarged").wait_for()
    assert page.locator("#slice-view img").bounding_box()["height"] >= 1.8 * small
    assert "enlarged to the window, Escape shrinks it" in page.locator("#slice-view").get_attribute("aria-label")
    inert = "() => Boolean(document.querySelector('#report-button').closest('[inert]'))"
    assert page.evaluate(inert)  # the page under it is out of a screen reader's way
    page.locator("#slice-view img").hover()
    page.mouse.wheel(0, 120)
    page.locator("#slice-view", has_text=f"Axial {int(count) - 11} /").wait_for()
    assert page.locator("#slice-view.enlarged").count() == 1  # drawing the next slice keeps it enlarged
    # ... and a screen reader still hears the slice it stopped on
    page.locator("#viewer-announcer", has_text=f"Axial {int(count) - 11} /").wait_for(state="attached")
    assert not page.evaluate("() => Boolean(document.querySelector('#viewer-announcer').closest('[inert]'))")
    page.keyboard.press("Escape")
    page.locator("#slice-view.enlarged").wait_for(state="detached")
    assert not page.evaluate(inert)
    page.locator("#slice-view .slice-enlarge").click()  # a click on the dark space around it closes it too
    page.locator("#slice-view.enlarged").wait_for()
    page.mouse.click(4, 4)
    page.locator("#slice-view.enlarged").wait_for(state="detached")
    # Tab from a list box goes on to the next control, its list closed (the kept slices' list dropped the focus)
    page.locator("#kept-slices input").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "report-button"
    page.locator(".option-list").wait_for(state="hidden", timeout=2000)
    page.locator("#window-select input").focus()
    page.keyboard.press("Shift+Tab")  # back to the planes, one stop: the plane shown
    assert page.evaluate("() => document.activeElement.matches('#plane input[value=axial]:checked')")
    # The planes are one radio group for the keyboard: the arrows move between them
    assert set(page.evaluate("() => [...document.querySelectorAll('#plane input')].map(r => r.name)")) == {"plane"}
    page.locator("#plane input[value=axial]").focus()
    page.keyboard.press("ArrowRight")
    page.locator("#slice-view", has_text="Coronal").wait_for()
    page.keyboard.press("ArrowLeft")
    page.locator("#slice-view", has_text="Axial").wait_for()

    page.get_by_role("tab", name="3D").click()
    page.locator("#plot-3d .js-plotly-plot").wait_for()
    page.locator("#plot-3d .js-plotly-plot canvas").first.wait_for()
    page.screenshot(path=str(tmp_path / "app-3d.png"))
    page.get_by_role("tab", name="Slices").click()

    stop_enabled = "() => !document.querySelector('#stop-button').disabled"
    assert not page.evaluate(stop_enabled)  # nothing is being written: nothing to stop
    page.evaluate("""() => {
        window.reportLengths = [];
        const box = document.querySelector('#report-box');
        new MutationObserver(() => window.reportLengths.push(box.innerText.trim().length))
            .observe(box, {childList: true, subtree: true, characterData: true});
        window.stopEnabledWhileWriting = false;
        const stop = document.querySelector('#stop-button');
        new MutationObserver(() => { window.stopEnabledWhileWriting ||= !stop.disabled; })
            .observe(stop, {attributes: true});
    }""")
    streams, stream = [], app_module.stream_on_gpu

    def slow_stream(*args, **kwargs):  # a report that takes a while to write, each one counted
        streams.append(args)
        for chunk in stream(*args, **kwargs):
            time.sleep(0.05)
            yield chunk

    monkeypatch.setattr(app_module, "stream_on_gpu", slow_stream)
    page.locator("#report-button").click()
    page.wait_for_function("() => document.querySelector('#report-box').innerText.trim().length > 0")
    page.locator("#report-button").click()  # pressed again while the report is written: it asks for nothing more
    page.wait_for_function("() => !document.querySelector('#report-download').disabled")  # offered when finished
    # Under the pointer, the enabled button does not take the colour it has disabled
    assert page.locator("#report-button").evaluate("e => e.matches(':hover')")
    assert page.locator("#report-button").evaluate(colour) != disabled
    monkeypatch.setattr(app_module, "stream_on_gpu", stream)
    assert len(streams) == 1
    lengths = [n for n in page.evaluate("window.reportLengths") if n]
    assert len(set(lengths)) >= 2 and lengths[-1] == max(lengths), f"the report did not grow: {lengths}"
    assert page.evaluate("window.stopEnabledWhileWriting")
    page.locator("#viewer-announcer", has_text="The report is written").wait_for(state="attached")
    page.wait_for_function(f"() => !({stop_enabled})()")  # written: Stop is disabled again

    page.locator("#question textarea").fill("Where is the lesion?")
    page.get_by_role("button", name="Ask", exact=True).click()
    answer = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    answer.wait_for()
    page.wait_for_function("() => !document.querySelector('#chatbot .generating, #chatbot .pending')")
    assert "Where is the lesion?" in page.locator("#chatbot").inner_text()

    chatbot = page.locator("#chatbot")
    # The chatbot's own bin icon, at a person's pace: the answer's last message can reach the page a moment
    # after it stops showing progress, and one clicked within that moment puts the old conversation back on
    # screen (Gradio's, not the app's); and the bin's event is not queued, so a question sent within
    # milliseconds of it could reach the server first. The answer's end disables Stop.
    page.wait_for_function("() => document.querySelector('#stop-button').disabled")
    page.wait_for_timeout(500)
    with page.expect_response(lambda response: "/run/predict" in response.url):
        chatbot.get_by_role("button", name="Clear").click()
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('Where is the lesion?')")
    page.locator("#question textarea").fill("Which organ is abnormal?")
    page.get_by_role("button", name="Ask", exact=True).click()
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('Which organ is abnormal?')")
    page.wait_for_function("() => !document.querySelector('#chatbot .generating, #chatbot .pending')")
    assert "Where is the lesion?" not in chatbot.inner_text()  # the cleared conversation does not come back
    stored = page.evaluate("Object.keys(localStorage).filter(key => key.includes('run-history'))")
    assert stored == []  # no run (question, report, slice images) is kept in the browser for the next user

    page.get_by_text("Load another scan").click()  # the folded upload opens again for the next scan
    page.locator("#scan-upload").wait_for(state="visible")
    page.evaluate("""() => {
        window.statusLines = [];
        const status = document.querySelector('#status-line');
        new MutationObserver(() => window.statusLines.push(status.innerText))
            .observe(status, {childList: true, subtree: true, characterData: true});
    }""")
    page.locator("#scan-upload input[type=file]").set_input_files(str(example_scan(tmp_path)))
    page.locator("#scan-upload").wait_for(state="hidden")  # and folds again once that scan is read
    page.locator("#status-line", has_text="Ready").wait_for()
    # While it was read, the status line said so (and not "Ready", about the scan before it) until it was ready
    lines = page.evaluate("window.statusLines")
    reading = next(i for i, line in enumerate(lines) if "Reading the scan" in line)
    ready = [i for i, line in enumerate(lines) if "Ready" in line and i > reading]
    assert ready and ready == list(range(ready[0], len(lines))), lines
    page.wait_for_function("() => document.activeElement === document.querySelector('#slice-view')")  # the keys
    page.locator("#chatbot", has_text="Which organ is abnormal?").wait_for(state="detached")

    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    (ROOT / "test-output").mkdir(exist_ok=True)
    for name in ("app.png", "app-3d.png"):
        shutil.copy(tmp_path / name, ROOT / "test-output" / name)

    scan = app_module._OPEN_SESSIONS[own]
    page.close()  # the tab closes: its session, and the scan it held, are released
    for _ in range(100):
        if own not in app_module._OPEN_SESSIONS:
            break
        time.sleep(0.1)
    assert own not in app_module._OPEN_SESSIONS and scan.volume is None


def test_on_a_phone_the_report_button_follows_the_status_line(browser, server, tmp_path):  # noqa: F811
    """One column on a phone, in the order of the work: after the scan comes in and the status line says it is
    ready, Generate report comes next, then the viewer, its image on the first screen, and the report under it (the
    button scrolls to it), then the scan card. A finger dragged up the image steps through the slices, and the page
    does not scroll."""
    page = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#scan-upload input[type=file]").set_input_files(str(example_scan(tmp_path)))
    page.locator("#status-line", has_text="Ready").wait_for()
    top = {name: page.locator(selector).bounding_box()["y"] for name, selector in (
        ("status", "#status-line"), ("report", "#report-buttons"), ("viewer", "#viewer-tabs"),
        ("modality", "#modality"), ("card", "#scan-card"), ("chat", "#chatbot"))}
    assert top["status"] < top["report"] < top["viewer"] < top["modality"] < top["card"] < top["chat"], top
    assert page.locator("#slice-view img").bounding_box()["y"] < 844 - 100  # the image in view as the scan is read
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    page.locator("#slice-view img").scroll_into_view_if_needed()
    before = int(page.locator("#slice-slider input[type=number]").input_value())
    scrolled = page.evaluate("window.scrollY")
    box = page.locator("#slice-view img").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.8
    touch = page.context.new_cdp_session(page)
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for step in range(1, 11):  # 60 px up, in 6 px moves
        touch.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y - 6 * step}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    count = int(page.locator("#slice-slider input[type=range]").get_attribute("max"))
    per_slice = min(12, max(3, box["height"] / count))  # a drag the image's height crosses the scan
    page.locator("#slice-view", has_text=f"Axial {before + int(60 / per_slice)} /").wait_for()
    assert page.evaluate("window.scrollY") == scrolled
    # Two fingers spread apart (a pinch, to zoom the page) step no slice
    shown = page.locator("#slice-slider input[type=number]").input_value()
    fingers = [{"x": x, "y": y - 40, "id": 1}, {"x": x, "y": y, "id": 2}]
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": fingers[:1]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": fingers})
    for step in range(1, 11):
        touch.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [
            {**fingers[0], "y": fingers[0]["y"] - 6 * step}, {**fingers[1], "y": fingers[1]["y"] + 3 * step}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.wait_for_timeout(800)
    assert page.locator("#slice-slider input[type=number]").input_value() == shown
    page.locator("#report-button").tap()  # the report, under the viewer, comes into view as it is written
    page.wait_for_function("() => { const box = document.querySelector('#report-box').getBoundingClientRect(); "
                           "return box.top >= 0 && box.top < 200; }")
    page.close()


def test_a_file_that_is_no_scan_is_refused_in_a_sentence(browser, server, tmp_path):  # noqa: F811
    """A text file uploaded instead of a scan: the status line says in one sentence what was wrong and what to do,
    the upload box stays open with the focus where it was (not in an empty viewer), and a scan uploaded next loads."""
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    page.locator("#scan-upload input[type=file]").set_input_files(str(notes))
    page.locator("#status-line", has_text="⚠️").wait_for()
    said = page.locator("#status-line").inner_text()
    assert "Traceback" not in said and "notes.txt" not in said, said  # nor the file's name (a patient's, maybe)
    page.wait_for_timeout(500)  # the load's last step (the focus) has run
    assert page.locator("#scan-upload").is_visible()
    assert page.evaluate("() => document.activeElement?.id") != "slice-view"
    page.locator("#scan-upload input[type=file]").set_input_files(str(example_scan(tmp_path)))
    page.locator("#status-line", has_text="Ready").wait_for()
    page.close()


def test_the_modality_box_entered_and_left_does_not_read_the_scan_again(browser, server, app_module, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """The Modality box sends its value each time it loses the focus: tabbing through it while the model reads the
    scan neither cancels that reading nor starts another (two at once on a GPU), and the status line says Ready."""
    reads, encode = [], app_module.encode_on_gpu

    def slow_encode(volume):
        reads.append(volume)
        time.sleep(2)
        return encode(volume)

    monkeypatch.setattr(app_module, "encode_on_gpu", slow_encode)
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#scan-upload input[type=file]").set_input_files(str(example_scan(tmp_path)))
    page.locator("#status-line", has_text="The model is reading the scan").wait_for()
    page.locator("#modality input").focus()
    page.keyboard.press("Tab")  # on through the page
    page.locator("#status-line", has_text="Ready").wait_for()
    page.locator("#modality input").focus()  # and again once it is read
    page.keyboard.press("Tab")
    page.wait_for_timeout(1500)
    assert len(reads) == 1 and "Ready" in page.locator("#status-line").inner_text()
    page.locator("#modality input").click()  # another modality chosen: the scan is read as a PET
    page.get_by_role("option", name="PET", exact=False).click()
    page.locator("#status-line", has_text="axial slices. Generate").wait_for()  # a PET's: it opens on its MIP
    assert len(reads) == 2 and page.get_by_label("MIP", exact=True).is_checked()
    # ... and the page scrolls up from the box to the viewer, which shows the scan as read now
    page.wait_for_function("() => { const top = document.querySelector('#viewer-tabs').getBoundingClientRect().top; "
                           "return top >= -1 && top < 100; }")
    page.close()


def test_a_scan_the_model_cannot_read_offers_no_report_and_a_report_that_fails_leaves_nothing_to_stop(
        browser, server, app_module, tmp_path, monkeypatch):  # noqa: F811
    """A blank scan (one value everywhere): the status line says the model cannot read it, and Generate report and
    Ask are disabled. A report that fails on the way (the GPU out of memory) leaves Stop disabled after it."""
    blank = save_nifti(tmp_path / "blank.nii.gz", np.zeros((20, 32, 32), np.float32), (2.0, 1.0, 1.0))
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#scan-upload input[type=file]").set_input_files(str(blank))
    page.locator("#status-line", has_text="holds nothing for the model to read").wait_for()
    page.wait_for_function("() => ['#report-button', '#ask-button'].every(id => document.querySelector(id).disabled)")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")
        yield  # a generator, as the real one

    monkeypatch.setattr(app_module, "stream_on_gpu", out_of_memory)
    page.get_by_text("Load another scan").click()
    page.locator("#scan-upload input[type=file]").set_input_files(str(example_scan(tmp_path)))
    page.locator("#status-line", has_text="Ready").wait_for()
    page.locator("#report-button").click()
    page.get_by_text("Error").first.wait_for()
    page.wait_for_function("() => document.querySelector('#stop-button').disabled")  # the failed report ended
    page.close()


def test_a_slice_named_in_an_examples_true_findings_opens_with_a_click(browser, server):  # noqa: F811
    """Checking the report against the truth: "axial slice N" in an example's true findings is a link that shows that
    slice in the viewer, whatever plane it showed."""
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#examples").get_by_text("ct chest abdomen").click()
    page.locator("#status-line", has_text="Ready").wait_for()
    page.get_by_label("coronal", exact=True).check()
    page.locator("#slice-view", has_text="Coronal").wait_for()
    page.get_by_text("True findings of this example").click()
    link = page.locator('#example-truth a[href^="#axial-"]').first
    number, _, _, seen_in = link.get_attribute("href").removeprefix("#axial-").split("-")  # its lung nodule
    link.click()
    page.locator("#slice-view", has_text=f"Axial {number} /").wait_for()
    assert seen_in == "lung" and "window lung" in page.locator("#slice-view .slice-caption").inner_text()
    assert page.locator("#slice-view .spot-mark").is_visible()  # its centre marked
    assert page.get_by_label("axial", exact=True).is_checked() and page.url.endswith("/")  # no navigation
    page.close()


def test_a_point_clicked_on_a_slice_is_read_and_shown_in_the_other_planes(browser, server):  # noqa: F811
    """A viewer's probe, as a radiologist reads a finding's density: a click on the CT example's axial slice marks
    the point, gives its HU in the caption, and the coronal plane opens through it, marked."""
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#examples").get_by_text("ct chest abdomen").click()
    page.locator("#status-line", has_text="Ready").wait_for()
    page.locator("#slice-view .slice-image").click()  # its middle: inside the body
    caption = page.locator("#slice-view .slice-caption", has_text="cross-hair: the point clicked")
    caption.wait_for()
    assert re.search(r"cross-hair: the point clicked, −?\d+(\.\d+)? HU", caption.inner_text())
    assert page.locator("#slice-view .spot-mark").is_visible()
    # The keyboard's way: Enter shows a pointer, the arrows move it (not the slices), Enter marks the point under it
    marked = float(page.locator("#slice-view .spot-mark line").first.get_attribute("x1"))  # in image pixels
    slice_shown = page.locator("#slice-view .slice-caption").inner_text().split(" · ")[0]
    page.locator("#slice-view").focus()
    page.keyboard.press("Enter")
    page.locator("#slice-view .mip-pointer").wait_for()
    for _ in range(2):
        page.keyboard.press("Shift+ArrowRight")  # a tenth of the image a press
    page.keyboard.press("Enter")
    page.locator("#slice-view .mip-pointer").wait_for(state="detached")
    page.wait_for_function("() => Number(document.querySelector('#slice-view .spot-mark line')?.getAttribute('x1')) "
                           f"> {marked + 20}")  # the mark moved right (two tenths of the image), on the same slice
    assert page.locator("#slice-view .slice-caption").inner_text().split(" · ")[0] == slice_shown
    page.get_by_label("coronal", exact=True).check()
    page.locator("#slice-view", has_text="Coronal").wait_for()
    assert page.locator("#slice-view .spot-mark").is_visible()
    page.close()


def test_a_pets_mip_turns_round_until_a_key_stops_it(browser, server, tmp_path):  # noqa: F811
    """The rotating MIP as nuclear medicine watches it: its button turns it frame after frame, a key hands the
    viewer back to the reader where it stands (the arrows then step, and go round past the first frame), and
    pressing a plane while it turns stops it without a stray frame landing in that plane. A hot spot clicked on
    it is found in the slices: the axial slice through it opens, marked, and the coronal plane opens through it."""
    uptake = np.where(torso_ct() < -500, 0.05, 1.0)  # air, and the body's background uptake
    uptake[30:34, 40:44, 10:14] = 6.0  # a hot spot on the patient's left: a turning MIP shows it move
    uptake[31, 41, 11] = 9.0  # its hottest voxel
    pet = save_nifti(tmp_path / "pet.nii.gz", uptake, (4.0, 4.0, 4.0), modality="PT")
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#scan-upload input[type=file]").set_input_files(str(pet))
    page.locator("#status-line", has_text="Ready").wait_for()
    assert page.get_by_label("MIP", exact=True).is_checked()  # a PET opens in its MIP, as nuclear medicine reads it
    page.locator("#slice-view", has_text="MIP 1 / 36 · 0°, seen from the front · window inverted").wait_for()
    assert page.locator("#window-select input").input_value().startswith("inverted ")  # as a MIP is read
    page.locator("#slice-view").focus()
    page.keyboard.press("ArrowDown")  # below the first frame comes the last: the MIP goes round
    page.locator("#slice-view", has_text="MIP 36 / 36 · 350°").wait_for()
    page.locator("#slice-view .mip-turn").click()
    page.locator("#slice-view", has_text="MIP 4 / 36").wait_for()  # it turns by itself, round past the last
    page.locator("#slice-view.turning").wait_for()
    page.keyboard.press("Shift")
    page.locator("#slice-view.turning").wait_for(state="detached")
    caption = steady_caption(page)  # stopped where it stood (a frame asked for before the key may still arrive)
    frame = int(caption.split()[1])
    page.keyboard.press("ArrowUp")  # the viewer kept the focus: the keys step on from there
    page.locator("#slice-view", has_text=f"MIP {frame + 1} / 36").wait_for()
    page.locator("#slice-view .mip-turn").click()
    page.locator("#slice-view", has_text=f"MIP {frame + 3} / 36").wait_for()
    page.locator("#slice-view .slice-image").click()  # a click on the turning MIP stops it, and only that
    page.locator("#slice-view.turning").wait_for(state="detached")
    page.wait_for_timeout(600)
    assert page.locator("#slice-view .slice-caption").inner_text().startswith("MIP ")
    page.locator("#slice-view .mip-turn").click()
    page.locator("#slice-view.turning").wait_for()
    page.get_by_label("axial", exact=True).check()  # a plane pressed while it turns
    page.locator("#slice-view", has_text="Axial").wait_for()
    assert page.locator("#slice-view .mip-turn").count() == 0  # a plane has no turn button
    page.wait_for_timeout(600)
    shown = page.locator("#slice-view .slice-caption").inner_text().split()[1]
    assert shown == page.locator("#slice-slider input[type=number]").input_value() == "21", shown  # the middle one
    # A click on the hot spot in the MIP, in whichever frame it reopens, finds its hottest voxel (z 31, y 41): the
    # axial slice through it (the 32nd of 40) opens, marked, and the coronal plane opens through it (the 42nd).
    page.get_by_label("MIP", exact=True).check()
    page.locator("#slice-view", has_text="MIP").wait_for()
    frame = int(page.locator("#slice-view .slice-image").get_attribute("data-slice")) - 1
    down, across = mip_point(load_volume(pet), frame, (31, 41, 11))
    spot = page.evaluate("""([down, across]) => {  // on the image as drawn in its box (object-fit: contain)
        const image = document.querySelector('#slice-view .slice-image'), box = image.getBoundingClientRect();
        const scale = Math.min(box.width / image.naturalWidth, box.height / image.naturalHeight);
        const top = (box.height - image.naturalHeight * scale) / 2, left = (box.width - image.naturalWidth * scale) / 2;
        return {x: left + across * image.naturalWidth * scale, y: top + down * image.naturalHeight * scale};
    }""", [down, across])
    # Relative to the image, which Playwright scrolls into view: checking a plane may have scrolled the page.
    page.locator("#slice-view .slice-image").click(position=spot)
    page.locator("#slice-view", has_text="Axial 32 / 40").wait_for()
    assert page.locator("#slice-slider input[type=number]").input_value() == "32"
    assert page.get_by_label("axial", exact=True).is_checked()
    assert page.locator("#slice-view .spot-mark").is_visible()
    page.get_by_label("coronal", exact=True).check()
    page.locator("#slice-view", has_text="Coronal 42 / 64").wait_for()
    assert page.locator("#slice-view .spot-mark").is_visible()
    # The keyboard's way: on the MIP, Enter shows a pointer in the middle, the arrows move it onto the spot (a fiftieth
    # of the image a press, not turning the MIP meanwhile), and Enter finds it, as the click did.
    page.get_by_label("MIP", exact=True).check()
    page.locator("#slice-view", has_text=f"MIP {frame + 1} / 36").wait_for()
    page.locator("#slice-view").focus()
    page.keyboard.press("Enter")
    page.locator("#slice-view .mip-pointer").wait_for()
    moves = {"ArrowDown": round((down - 0.5) / 0.02), "ArrowRight": round((across - 0.5) / 0.02)}
    for key, presses in moves.items():
        for _ in range(abs(presses)):
            page.keyboard.press(key if presses > 0 else {"ArrowDown": "ArrowUp", "ArrowRight": "ArrowLeft"}[key])
    assert page.locator("#slice-view .slice-caption").inner_text().startswith(f"MIP {frame + 1} / 36")
    # The pointer stays on its place in the image when the viewer is enlarged to the window, and shrunk back.
    pointed = [0.5 + 0.02 * moves["ArrowDown"], 0.5 + 0.02 * moves["ArrowRight"]]
    off_its_place = """([down, across]) => {  // px between the pointer's centre and its place on the image as drawn
        const image = document.querySelector('#slice-view .slice-image'), box = image.getBoundingClientRect();
        const scale = Math.min(box.width / image.naturalWidth, box.height / image.naturalHeight);
        const x = box.left + (box.width - image.naturalWidth * scale) / 2 + across * image.naturalWidth * scale;
        const y = box.top + (box.height - image.naturalHeight * scale) / 2 + down * image.naturalHeight * scale;
        const mark = document.querySelector('#slice-view .mip-pointer').getBoundingClientRect();
        return Math.hypot(mark.left + mark.width / 2 - x, mark.top + mark.height / 2 - y);
    }"""
    assert page.evaluate(off_its_place, pointed) < 2
    for enlarged in ("attached", "detached"):
        page.locator("#slice-view .slice-enlarge").click()
        page.locator("#slice-view.enlarged").wait_for(state=enlarged)
        page.wait_for_function(f"(pointed) => ({off_its_place})(pointed) < 2", arg=pointed)
    page.get_by_label("axial", exact=True).focus()  # away and back: the pointer waits where it was
    page.locator("#slice-view").focus()
    page.keyboard.press("Enter")
    page.locator("#slice-view", has_text="Axial 32 / 40").wait_for()
    assert page.locator("#slice-view .spot-mark").is_visible() and page.locator("#slice-view .mip-pointer").count() == 0
    page.close()


def test_the_image_box_keeps_the_images_proportions(browser, server):  # noqa: F811
    """The box the slice is drawn in is no taller than its proportions need: on a desktop, the CT example's wide
    coronal slice has no black bands above and below it; on a phone, the PET example's MIP, a body taller than wide,
    fills the screen's width and is drawn taller than wide."""
    examples = ROOT / "assets" / "examples"
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    page.locator("#scan-upload input[type=file]").set_input_files(str(examples / "ct_chest_abdomen.nii.gz"))
    page.locator("#slice-view", has_text="Axial").wait_for()
    page.get_by_label("coronal", exact=True).check()
    page.locator("#slice-view", has_text="Coronal").wait_for()
    box = page.locator("#slice-view img").bounding_box()
    shape = page.evaluate("() => { const image = document.querySelector('#slice-view img');"
                          " return [image.naturalHeight, image.naturalWidth]; }")
    assert box["height"] <= box["width"] * shape[0] / shape[1] + 2, (box, shape)
    page.close()
    page = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True)
    page.goto(server)
    page.locator("#scan-upload input[type=file]").set_input_files(str(examples / "pet_body.nii.gz"))
    page.locator("#slice-view", has_text="MIP 1 / 36").wait_for()
    box = page.locator("#slice-view img").bounding_box()
    assert box["height"] >= 1.3 * box["width"], box
    page.close()


def test_the_ruler_measures_a_distance_on_the_slice_in_mm(browser, server, tmp_path):  # noqa: F811
    """A reader checks a size the model reports: with the ruler on, a drag across the whole image measures the
    scan's width (64 voxels of 1 mm), and one down a coronal slice its height (40 slices 5 mm apart); the ruler
    stays on while scrolling, and its button turns it off."""
    page = browser.new_page(viewport=LAPTOP)
    page.set_default_timeout(60_000)
    page.goto(server)
    scan = save_nifti(tmp_path / "torso.nii.gz", torso_ct(), (5.0, 1.0, 1.0), dtype=np.int16, modality="CT")
    page.locator("#scan-upload input[type=file]").set_input_files(str(scan))
    page.locator("#status-line", has_text="Ready").wait_for()
    page.locator("#slice-view .slice-ruler").click()
    drawn = page.evaluate("""() => {  // the image as drawn inside its box (object-fit: contain)
        const image = document.querySelector('#slice-view .slice-image'), box = image.getBoundingClientRect();
        const scale = Math.min(box.width / image.naturalWidth, box.height / image.naturalHeight);
        return {left: box.left + (box.width - image.naturalWidth * scale) / 2, width: image.naturalWidth * scale,
                middle: box.top + box.height / 2};
    }""")
    page.mouse.move(drawn["left"] - 5, drawn["middle"])  # from past the left edge: the ruler starts at the edge
    page.mouse.down()
    page.mouse.move(drawn["left"] + drawn["width"] / 2, drawn["middle"] + 20, steps=4)
    page.mouse.move(drawn["left"] + drawn["width"] + 5, drawn["middle"], steps=4)
    page.mouse.up()
    measured = page.locator("#slice-view .ruler-line text").text_content()
    assert measured.endswith(" mm") and float(measured.split()[0]) == pytest.approx(64.0, abs=0.5), measured
    page.get_by_label("coronal", exact=True).check()  # down a coronal slice: 40 slices 5 mm apart, 1 mm pixels across
    page.locator("#slice-view", has_text="Coronal").wait_for()
    page.locator("#slice-view .slice-image").scroll_into_view_if_needed()  # the plane's buttons lie below it
    drawn = page.evaluate("""() => {
        const image = document.querySelector('#slice-view .slice-image'), box = image.getBoundingClientRect();
        const scale = Math.min(box.width / image.naturalWidth, box.height / image.naturalHeight);
        return {top: box.top + (box.height - image.naturalHeight * scale) / 2, height: image.naturalHeight * scale,
                middle: box.left + box.width / 2};
    }""")
    page.mouse.move(drawn["middle"], drawn["top"] + 0.5)  # the image fills its box's height: start on its edge
    page.mouse.down()
    page.mouse.move(drawn["middle"], drawn["top"] + drawn["height"] + 5, steps=4)
    page.mouse.up()
    measured = page.locator("#slice-view .ruler-line text").text_content()
    assert float(measured.split()[0]) == pytest.approx(200.0, abs=1.5), measured
    page.locator("#slice-view").focus()
    page.keyboard.press("ArrowUp")  # the next slice: the line goes with the old image, measuring stays on
    page.locator("#slice-view .ruler-line").wait_for(state="detached")
    assert page.locator("#slice-view .slice-ruler").get_attribute("aria-pressed") == "true"
    page.locator("#slice-view .slice-ruler").click()
    page.locator("#slice-view.measuring").wait_for(state="detached")
    page.close()
