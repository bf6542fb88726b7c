() => {
  // The slice viewer's mouse, as in a radiology viewer. Each moves the slider as a drag would (an input event),
  // so the app draws the slice the same way whichever moved it.
  // A MIP's frames go round (past its last frame comes its first); slices stop at the ends.
  const slider = () => document.querySelector("#slice-slider input[type=range]");
  const showsMip = () => Boolean(document.querySelector("#slice-view .mip-turn"));
  const moveTo = (input, value) => {
    const low = Number(input.min), count = Number(input.max) - low + 1;
    value = showsMip() ? low + ((((value - low) % count) + count) % count) : Math.min(low + count - 1, Math.max(low, value));
    if (value === Number(input.value)) return;
    input.value = String(value);
    input.dispatchEvent(new Event("input", {bubbles: true}));
  };

  // The wheel over the slice image steps through the slices, down toward slice 1 (the patient's feet in the axial
  // plane), up away from it: one slice per notch of a mouse wheel, whatever its size (100 px on Windows, 120 on
  // Linux; what is left over never adds up to a skipped slice), and one per 100 px of a touchpad's small deltas.
  const NOTCH = 120, SMALLEST_NOTCH = 50;
  let pending = 0;
  document.addEventListener("wheel", (event) => {
    const image = event.target.closest && event.target.closest("#slice-view");
    const input = slider();
    if (!image || !input || input.disabled) return;
    event.preventDefault();
    const delta = event.deltaMode === 1 ? 40 * event.deltaY : event.deltaY;  // Firefox counts lines, 3 a notch
    let steps;
    if (Math.abs(delta) >= SMALLEST_NOTCH) {  // a notch, or several the browser sent as one event
      steps = Math.sign(delta) * Math.max(1, Math.round(Math.abs(delta) / NOTCH));
      pending = 0;
    } else {
      if (Math.sign(delta) !== Math.sign(pending)) pending = 0;  // a touchpad turned back starts afresh
      pending += delta;
      steps = Math.trunc(pending / 100);
      pending -= 100 * steps;
    }
    if (steps === 0) return;
    moveTo(input, Number(input.value) - steps);
  }, {passive: false});

  // A finger dragged up or down the image steps through the slices on a phone or a tablet, as the wheel does, up
  // away from slice 1 (page.css keeps the page from scrolling there; a swipe beside the image scrolls it): a drag
  // the image's height crosses the scan, one slice per 3 to 12 px. A drag is not a tap: it finds no spot on a MIP.
  // One finger: a second one down (a pinch, to zoom the page) ends the drag.
  const TOUCH_STEP = [3, 12];
  let touchDrag = null, dragged = false;
  document.addEventListener("pointerdown", (event) => {
    const image = event.target.closest && event.target.closest("#slice-view .slice-image");
    const input = slider();
    dragged = false;
    if (touchDrag && event.pointerType === "touch") {
      touchDrag = null;
      return;
    }
    if (event.pointerType !== "touch" || !image || !input || input.disabled
        || document.querySelector("#slice-view.measuring")) return;
    const count = Number(input.max) - Number(input.min) + 1;
    const step = Math.min(TOUCH_STEP[1], Math.max(TOUCH_STEP[0], image.getBoundingClientRect().height / count));
    touchDrag = {y: event.clientY, value: Number(input.value), step, finger: event.pointerId};
  });
  document.addEventListener("pointermove", (event) => {
    const input = slider();
    if (!touchDrag || event.pointerId !== touchDrag.finger || !input) return;
    const steps = Math.trunc((touchDrag.y - event.clientY) / touchDrag.step);
    if (steps === 0) return;
    dragged = true;
    moveTo(input, touchDrag.value + steps);
  });
  for (const kind of ["pointerup", "pointercancel"]) {
    document.addEventListener(kind, (event) => { if (touchDrag && event.pointerId === touchDrag.finger) touchDrag = null; });
  }
  document.addEventListener("click", (event) => {
    if (dragged && event.target.closest && event.target.closest("#slice-view .slice-image")) {
      event.stopImmediatePropagation();
      dragged = false;
    }
  }, true);

  // The keys, once the viewer has the focus (a click on the image, or Tab): the arrows step one slice (down toward
  // slice 1, as the wheel), Page Up / Page Down ten, Home and End go to the first and the last. The viewer's box
  // keeps the focus while the slice inside it is redrawn.
  const VIEWER_LABEL = "Slice viewer: the arrow keys step one slice, Page Up and Page Down ten, Home and End go "
    + "to the first and the last; Enter shows a pointer that the arrows move, and Enter again reads the value under "
    + "it and opens the other planes through it (on a MIP, finds the spot under it in the slices)";
  const focusable = () => {
    const viewer = document.querySelector("#slice-view"), status = document.querySelector("#status-line");
    if (!viewer || !status) return setTimeout(focusable, 200);
    viewer.tabIndex = 0;
    viewer.setAttribute("role", "group");  // a named group (a name on a plain element is not read by every reader)
    viewer.setAttribute("aria-label", VIEWER_LABEL);
    status.setAttribute("role", "status");  // a screen reader says "Reading the scan …", "Ready …" and warnings
  };
  focusable();
  document.addEventListener("mousedown", (event) => {
    const viewer = event.target.closest && event.target.closest("#slice-view");
    if (viewer && viewer.tabIndex === 0) viewer.focus({preventScroll: true});
  });
  const steps = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10};
  document.addEventListener("keydown", (event) => {
    const input = slider();
    if (!document.activeElement || document.activeElement.id !== "slice-view" || !input || input.disabled) return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    let value = null;
    if (event.key in steps) value = Number(input.value) + steps[event.key];
    else if (event.key === "Home") value = Number(input.min);
    else if (event.key === "End") value = Number(input.max);
    if (value === null) return;
    event.preventDefault();  // the page does not scroll
    moveTo(input, value);
  });

  // A phone's width, where page.css lays the page out in one column.
  const onPhone = () => matchMedia("(max-width: 640px)").matches;

  // A value for the app, through a hidden box on the page whose .change it answers (a MIP's spot, a linked slice):
  // a count after it makes the same value sent again a change too.
  let sent = 0;
  const tellApp = (boxId, value) => {
    const box = document.querySelector(`${boxId} textarea`);
    if (!box) return;
    sent += 1;
    box.value = `${value} ${sent}`;
    box.dispatchEvent(new Event("input", {bubbles: true}));
  };

  // Tab from a list box (Gradio's dropdown: the window, the kept slices, the modality) goes on to the next control, as
  // from any other: the kept slices' own list took the Tab and closed, and the focus fell to the page.
  const tabStops = () => [...document.querySelectorAll("button, input, textarea, select, a[href], [tabindex]")]
    .filter((element) => element.tabIndex >= 0 && !element.disabled && element.getClientRects().length
      && !element.closest(".option-list, [inert]")
      && (element.type !== "radio" || element.checked  // a radio group is one stop: its checked button
          || !document.querySelector(`input[type=radio][name="${element.name}"]:checked`)));
  document.addEventListener("keydown", (event) => {
    const box = event.target.closest && event.target.closest("input[role=combobox]");
    if (!box || event.key !== "Tab" || event.altKey || event.ctrlKey || event.metaKey) return;
    const stops = tabStops(), here = stops.indexOf(box);
    const next = here < 0 ? null : stops[here + (event.shiftKey ? -1 : 1)];
    if (!next) return;
    event.preventDefault();
    event.stopPropagation();  // Gradio's own handler would open the list again, the key read as typing
    box.blur();  // ... which closes it
    next.focus();
  }, true);

  // On a phone the report comes under the viewer (page.css): Generate report scrolls to it, to watch it written.
  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("#report-button");
    const report = document.querySelector("#report-box");
    if (!button || button.disabled || !report || !onPhone()) return;
    report.scrollIntoView({behavior: "smooth", block: "start"});
  });

  // The button in the image's corner enlarges the viewer to the whole window (a slice of 512 pixels shows at its
  // size, not at 280), and shrinks it back; so do Esc and a click on the dark space around it. The wheel, the keys
  // and the track work as before; Tab stays in the viewer (the controls under it are hidden), and the rest of the
  // page is inert meanwhile, so that a screen reader does not wander into what is hidden. A viewer with no image
  // (the scan released) is shown in its place (page.css), so a tablet is never left without a way back: the page
  // is then live again.
  let madeInert = [];
  const setPageInert = (viewer, on) => {
    for (const element of madeInert) element.inert = false;
    madeInert = [];
    if (!on) return;
    for (let inside = viewer; inside && inside !== document.body; inside = inside.parentElement) {
      for (const sibling of inside.parentElement.children) {
        if (sibling === inside || sibling.inert || ["SCRIPT", "STYLE", "LINK"].includes(sibling.tagName)
            || sibling.matches('[class*="toast"]')  // a warning shown over it can still be closed
            || sibling.id === "viewer-announcer") continue;  // the slices stepped through are still said
        sibling.inert = true;
        madeInert.push(sibling);
      }
    }
  };
  const enlarge = (viewer, on) => {
    viewer.classList.toggle("enlarged", on);
    setPageInert(viewer, on);
    viewer.setAttribute("aria-label", on ? `${VIEWER_LABEL}; enlarged to the window, Escape shrinks it` : VIEWER_LABEL);
    viewer.focus({preventScroll: true});
  };
  document.addEventListener("click", (event) => {
    const viewer = event.target.closest && event.target.closest("#slice-view");
    if (!viewer) return;
    if (event.target.closest(".slice-enlarge")) enlarge(viewer, !viewer.classList.contains("enlarged"));
    else if (viewer.classList.contains("enlarged") && !event.target.closest(".slice-frame, .slice-track, .slice-caption")) {
      enlarge(viewer, false);
    }
  });
  document.addEventListener("keydown", (event) => {
    const viewer = document.querySelector("#slice-view.enlarged");
    if (!viewer) return;
    if (event.key === "Escape") enlarge(viewer, false);
    if (event.key === "Tab") {  // round the viewer and its buttons (measure, turn, shrink), the page's are hidden
      event.preventDefault();
      const stops = [viewer, ...viewer.querySelectorAll("button")];
      const next = stops.indexOf(document.activeElement) + (event.shiftKey ? -1 : 1);
      stops[(next + stops.length) % stops.length].focus({preventScroll: true});
    }
  });

  // The MIP's button turns it round, a frame (10°) at a time, the next once the last has arrived (a frame drawn
  // the first time takes longer), from the last back to the first, until it is pressed again, a key is pressed,
  // or anything else on the page (a plane, the slider, the image) is pressed: a step sent after the plane changed
  // would show a slice under the MIP's slider. The button is drawn anew with every frame; the viewer's class
  // "turning" keeps its state. The viewer keeps the focus, so the arrow keys work once it stops.
  let turning = null;
  const stopTurning = () => {
    clearInterval(turning);
    turning = null;
    const viewer = document.querySelector("#slice-view");
    if (viewer) viewer.classList.remove("turning");
  };
  const shownFrame = () => {  // the slice (from 1) or MIP frame the image shows (its data-slice)
    const image = document.querySelector("#slice-view .slice-image");
    return image ? Number(image.dataset.slice) : null;
  };
  const turnStep = () => {
    const input = slider();
    const button = document.querySelector("#slice-view .mip-turn");
    if (!input || input.disabled || !button) return stopTurning();
    button.setAttribute("aria-pressed", "true");
    if (shownFrame() === Number(input.value)) moveTo(input, Number(input.value) + 1);
  };
  document.addEventListener("click", (event) => {
    const button = event.target.closest && event.target.closest("#slice-view .mip-turn");
    if (!button) return;
    const viewer = document.querySelector("#slice-view");
    viewer.focus({preventScroll: true});
    if (turning) return stopTurning();
    viewer.classList.add("turning");
    turning = setInterval(turnStep, 150);
    turnStep();
  });
  document.addEventListener("keydown", (event) => {
    const onButton = event.target.closest && event.target.closest(".mip-turn");
    if (onButton && (event.key === "Enter" || event.key === " ")) return;  // the button's own click
    if (turning && event.key !== "Tab") {
      stopTurning();
      event.stoppedTurning = true;  // only that: no pointer on the MIP either
    }
  }, true);
  let stoppedByPress = false;  // the press that stops the turning is not also a click on the MIP
  document.addEventListener("pointerdown", (event) => {
    stoppedByPress = Boolean(turning);
    if (turning && !(event.target.closest && event.target.closest("#slice-view .mip-turn, #slice-view .slice-enlarge"))) {
      stopTurning();
    }
  }, true);
  document.addEventListener("wheel", (event) => {
    if (turning && event.target.closest && event.target.closest("#slice-view")) stopTurning();
  }, true);

  // The ruler: its button (drawn with every image) turns measuring on; then a drag across the image draws a line
  // and says its length in mm, from the image's pixel size (data-mm-per-pixel), until the next drag or image.
  // The image keeps its proportions inside its box (object-fit: contain): a point is placed on the image drawn.
  let measuring = false, start = null;
  const onImage = (image, event) => {
    const box = image.getBoundingClientRect();
    const scale = Math.min(box.width / image.naturalWidth, box.height / image.naturalHeight);
    const left = box.left + (box.width - image.naturalWidth * scale) / 2;
    const top = box.top + (box.height - image.naturalHeight * scale) / 2;
    const x = Math.min(image.naturalWidth, Math.max(0, (event.clientX - left) / scale));
    const y = Math.min(image.naturalHeight, Math.max(0, (event.clientY - top) / scale));
    return {x, y, clientX: left + x * scale, clientY: top + y * scale};  // in image pixels, and on the screen
  };
  const drawRuler = (image, from, to) => {
    const frame = image.closest(".slice-frame");
    let overlay = frame.querySelector(".ruler-line");
    if (!overlay) {
      overlay = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      overlay.setAttribute("class", "ruler-line");
      overlay.innerHTML = '<line/><text/>';
      frame.appendChild(overlay);
    }
    const line = overlay.querySelector("line"), label = overlay.querySelector("text");
    const origin = frame.getBoundingClientRect();
    const at = (point) => [point.clientX - origin.left, point.clientY - origin.top];
    const [x1, y1] = at(from), [x2, y2] = at(to);
    for (const [name, value] of Object.entries({x1, y1, x2, y2})) line.setAttribute(name, value);
    const mm = Number(image.dataset.mmPerPixel);
    const length = Math.hypot(to.x - from.x, to.y - from.y);
    label.textContent = mm ? `${(length * mm).toFixed(1)} mm` : `${length.toFixed(0)} px (spacing unknown)`;
    const nearRight = x2 > origin.width - 90;  // the length on the line's inner side, not past the frame
    label.setAttribute("text-anchor", nearRight ? "end" : "start");
    label.setAttribute("x", nearRight ? x2 - 6 : x2 + 6);
    label.setAttribute("y", Math.max(14, y2 - 6));
    frame.dataset.measured = label.textContent;
  };
  const showMeasuring = () => {
    const viewer = document.querySelector("#slice-view");
    if (viewer) viewer.classList.toggle("measuring", measuring);
    const button = document.querySelector("#slice-view .slice-ruler");
    if (button) button.setAttribute("aria-pressed", String(measuring));
    const mip = document.querySelector(
      "#slice-view .slice-image[data-spot-click], #slice-view .slice-image[data-point-click]");
    if (mip) {  // while measuring, a click measures: the "click a spot" title (kept aside) is not shown
      mip.dataset.clickTitle ??= mip.title;
      mip.title = measuring ? "" : mip.dataset.clickTitle;
    }
  };
  document.addEventListener("click", (event) => {
    if (!(event.target.closest && event.target.closest("#slice-view .slice-ruler"))) return;
    measuring = !measuring;
    showMeasuring();
  });
  document.addEventListener("pointerdown", (event) => {
    const image = event.target.closest && event.target.closest("#slice-view .slice-image");
    if (!measuring || !image || event.button !== 0) return;
    event.preventDefault();  // no drag of the image, no text selected; the viewer takes the focus for its keys
    image.closest("#slice-view").focus({preventScroll: true});
    image.setPointerCapture(event.pointerId);
    start = {image, point: onImage(image, event)};
    drawRuler(image, start.point, start.point);
  });
  document.addEventListener("pointermove", (event) => {
    if (start && start.image.isConnected) drawRuler(start.image, start.point, onImage(start.image, event));
  });
  for (const kind of ["pointerup", "pointercancel"]) document.addEventListener(kind, () => { start = null; });
  // A new image (another slice) comes without the ruler's state: the viewer's class keeps it, the button shows it.
  new MutationObserver(() => {
    if (measuring) showMeasuring();
    const enlarged = document.querySelector("#slice-view.enlarged");  // the page is inert while an image covers it
    const covered = Boolean(enlarged && enlarged.querySelector(".slice-frame"));
    if (covered !== madeInert.length > 0) setPageInert(enlarged, covered);
  }).observe(document.body, {childList: true, subtree: true});

  // For a screen reader, a hidden announcer (the viewer's own HTML is replaced with each slice, so it cannot be a live
  // region): the slice shown, once the keys or the wheel stop on it (not each one passed, nor a slice drawn while
  // the focus is elsewhere), and a report written to its end (its download is offered then).
  const announcer = document.createElement("div");
  announcer.id = "viewer-announcer";
  announcer.setAttribute("aria-live", "polite");
  document.body.appendChild(announcer);
  let announceLater = null, captionSaid = "", downloadOffered = false;
  const announce = (text) => {
    clearTimeout(announceLater);
    announceLater = setTimeout(() => { announcer.textContent = text; }, 400);
  };
  // The planes as one radio group (Gradio names each of its buttons apart, and again as it redraws them): one Tab
  // stop, the arrow keys move between them, and a screen reader hears "2 of 3".
  const groupPlanes = () => {
    for (const radio of document.querySelectorAll("#plane input[type=radio]")) {
      if (radio.name !== "plane") radio.name = "plane";
    }
  };
  // The window box shows no label (the plane and window sit above the image as a toolbar): what it takes shows when
  // the mouse rests on it, from the label a screen reader hears, which the app sets per modality.
  const hintWindow = () => {
    const box = document.querySelector("#window-select input");
    const hint = box && box.getAttribute("aria-label");
    if (hint && box.title !== hint) box.title = hint;
  };
  // The status line is read out as it changes: not Gradio's timer in it ("processing | 0.4s"), every tenth of a second.
  const quietTimer = () => {
    const timer = document.querySelector("#status-line [data-testid=status-tracker]");
    if (timer && timer.getAttribute("aria-hidden") !== "true") timer.setAttribute("aria-hidden", "true");
  };
  new MutationObserver(() => {
    groupPlanes();
    hintWindow();
    quietTimer();
    if (pointer && !document.querySelector("#slice-view .mip-pointer")) drawPointer();  // the image was redrawn
    const caption = document.querySelector("#slice-view .slice-caption");
    const text = caption ? caption.textContent.trim() : "";
    if (text !== captionSaid && document.activeElement && document.activeElement.id === "slice-view") announce(text);
    captionSaid = text;
    const download = document.querySelector("#report-download");
    const offered = Boolean(download && !download.disabled);
    if (offered && !downloadOffered) announce("The report is written: it is in the report box.");
    downloadOffered = offered;
  }).observe(document.body, {childList: true, subtree: true, characterData: true, attributes: true,
                             attributeFilter: ["disabled", "name", "aria-label"]});

  // A spot clicked on the MIP is found in the slices (the app's find_mip_spot): the frame and where on it the click
  // fell (fractions of the image's height and width) go to a box on the page that the app answers when it changes;
  // a count of the clicks after them makes the same spot clicked again a change too.
  const findSpot = (image, down, across) => {  // down, across: fractions of the MIP's height and width
    tellApp("#mip-spot", `${image.dataset.slice} ${down} ${across}`);
  };
  document.addEventListener("click", (event) => {
    const image = event.target.closest && event.target.closest("#slice-view .slice-image[data-spot-click]");
    if (!image || measuring || stoppedByPress) return;
    const point = onImage(image, event);
    if (Math.hypot(point.clientX - event.clientX, point.clientY - event.clientY) > 1) return;  // beside the image
    findSpot(image, point.y / image.naturalHeight, point.x / image.naturalWidth);
  });

  // A point clicked on a slice is marked, its value given and the other planes opened through it (the app's
  // mark_point): the plane, the slice and where on it the click fell go to a box the app answers, as for the MIP.
  const markPoint = (image, down, across) => {  // down, across: fractions of the slice image's height and width
    tellApp("#point-spot", `${image.dataset.plane} ${image.dataset.slice} ${down} ${across}`);
  };
  document.addEventListener("click", (event) => {
    const image = event.target.closest && event.target.closest("#slice-view .slice-image[data-point-click]");
    if (!image || measuring) return;
    const point = onImage(image, event);
    if (Math.hypot(point.clientX - event.clientX, point.clientY - event.clientY) > 1) return;  // beside the image
    markPoint(image, point.y / image.naturalHeight, point.x / image.naturalWidth);
  });

  // A slice linked in an example's true findings ("axial slice 56", href #axial-56-40-71-lung: the lesion's centre
  // as axial, coronal and sagittal slice numbers, then the window it is read in, if another) is shown, as a pick
  // from the kept slices is: through a hidden box the app answers (its jump_to_linked_slice); on a phone the viewer,
  // above the findings, comes into view.
  document.addEventListener("click", (event) => {
    const link = event.target.closest && event.target.closest('#example-truth a[href^="#axial-"]');
    if (!link) return;
    event.preventDefault();
    tellApp("#linked-slice", link.getAttribute("href").slice("#axial-".length));
    const viewer = document.querySelector("#slice-view");
    if (viewer && onPhone()) viewer.scrollIntoView({behavior: "smooth", block: "center"});
  }, true);

  // The keyboard's way to a spot on the MIP, or a point on a slice: Enter shows a pointer (a ring) in the middle of
  // the image, or where it last was; the arrows move it (a fiftieth of the image a press, a tenth with Shift), Enter
  // finds the spot (marks the point) under it as a click there would, and Escape puts it away. Meanwhile the arrows
  // neither turn the MIP nor step the slices.
  // It is placed on the image as drawn: once the image is decoded (a new frame may not be yet), and again when its
  // frame changes size (the viewer enlarged or shrunk, the window resized).
  const POINTER_STEP = 0.02, POINTER_LEAP = 0.1;
  let pointer = null, lastPointer = {down: 0.5, across: 0.5};
  const resized = new ResizeObserver(() => drawPointer());
  let watched = null;  // the frame whose size `resized` watches
  const POINTED = "#slice-view .slice-image[data-spot-click], #slice-view .slice-image[data-point-click]";
  const drawPointer = () => {
    const image = document.querySelector(POINTED);
    const frame = image && image.closest(".slice-frame");
    const old = document.querySelector("#slice-view .mip-pointer");
    if (!pointer || !frame || !image.naturalWidth) {
      if (old) old.remove();
      if (pointer && image) image.addEventListener("load", drawPointer, {once: true});
      return;
    }
    if (watched !== frame) {
      resized.disconnect();
      resized.observe(frame);
      watched = frame;
    }
    const mark = old || document.createElement("span");
    mark.className = "mip-pointer";
    if (!old) frame.appendChild(mark);
    const box = image.getBoundingClientRect(), origin = frame.getBoundingClientRect();
    const scale = Math.min(box.width / image.naturalWidth, box.height / image.naturalHeight);
    const left = box.left - origin.left + (box.width - image.naturalWidth * scale) / 2;
    const top = box.top - origin.top + (box.height - image.naturalHeight * scale) / 2;
    mark.style.left = `${left + pointer.across * image.naturalWidth * scale}px`;
    mark.style.top = `${top + pointer.down * image.naturalHeight * scale}px`;
  };
  const POINTER_MOVES = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]};
  document.addEventListener("keydown", (event) => {
    const viewer = document.querySelector("#slice-view");
    const image = document.querySelector(POINTED);
    if (!image || document.activeElement !== viewer || event.stoppedTurning || measuring) return;
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "Enter" && !pointer) {
      pointer = {...lastPointer};
      announce(image.dataset.plane
        ? "Pointer on the slice: the arrow keys move it, Enter reads the value under it, Escape puts it away."
        : "Pointer on the MIP: the arrow keys move it, Enter finds the spot under it, Escape puts it away.");
    } else if (event.key === "Enter") {
      lastPointer = pointer;
      pointer = null;
      if (image.dataset.plane) markPoint(image, lastPointer.down, lastPointer.across);
      else findSpot(image, lastPointer.down, lastPointer.across);
    } else if (pointer && event.key === "Escape") {
      pointer = null;
    } else if (pointer && event.key in POINTER_MOVES) {
      const [down, across] = POINTER_MOVES[event.key], step = event.shiftKey ? POINTER_LEAP : POINTER_STEP;
      pointer = {down: Math.min(1, Math.max(0, pointer.down + down * step)),
                 across: Math.min(1, Math.max(0, pointer.across + across * step))};
    } else {
      return;
    }
    event.preventDefault();
    event.stopImmediatePropagation();  // not also a frame turned, nor the enlarged viewer shrunk
    drawPointer();
  }, true);

  // A click on the track under the image goes to the slice at that place, or to a green mark (a slice the model
  // kept) within 8 px of it: a 2 px mark is too thin to hit.
  document.addEventListener("click", (event) => {
    const track = event.target.closest && event.target.closest("#slice-view .slice-track");
    const input = slider();
    if (!track || !input || input.disabled) return;
    const box = track.getBoundingClientRect();
    let nearest = null;
    for (const mark of track.querySelectorAll(".kept-mark")) {
      const markBox = mark.getBoundingClientRect();
      const distance = Math.abs(markBox.left + markBox.width / 2 - event.clientX);
      if (distance <= 8 && (nearest === null || distance < nearest.distance)) nearest = {mark, distance};
    }
    const count = Number(track.dataset.count);
    const value = nearest ? Number(nearest.mark.dataset.slice)
      : Math.floor(((event.clientX - box.left) / box.width) * count) + 1;
    moveTo(input, value);
  });
}
