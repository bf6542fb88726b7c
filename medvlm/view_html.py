"""The scan as the demo page shows it: the slice viewer's HTML (image, orientation letters, the track of kept
slices, caption) and the scan card's Markdown. Plain text out; the page (app.py, assets/app/page.css and
viewer.js) gives it its look and its keys. Never a patient identifier: the card shows facts of the grid.
"""

from __future__ import annotations

import base64
import html
import io
import math

from PIL import Image

from .preprocess import (
    AUTO_WINDOW,
    CT_WINDOWS,
    INVERTED_WINDOW,
    SUV_WINDOWS,
    slab_middle,
    typed_window,
    typed_window_example,
    window_names,
)
from .projection import mip_edges
from .view import (
    MIP,
    PLANES,
    SLICE_ONE,
    acquired_plane,
    render_slice,
    slice_count,
    slice_location,
    slice_width_mm,
    spot_position,
    window_limits,
)
from .volume import Volume

# Letters at the image edges (left, right, top, bottom), radiological convention as `render_slice` draws.
PLANE_EDGES = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}
SOURCE_NAMES = {"nifti": "NIfTI", "dicom": "DICOM", "npy": "NumPy .npy"}
MODALITY_NAMES = {"CT": "CT (computed tomography)", "MR": "MR (magnetic resonance)", "PT": "PET", "OT": "Other"}


def shown(sentence: str) -> str:
    """A sentence as text on the page (toasts render HTML, the status line Markdown): a file name or a question
    quoted in it, such as '<image>', shows as written."""
    return html.escape(sentence, quote=False)


def window_label(name: str) -> str:
    """A window preset as radiologists name it: a CT window with its width and level (lung · W 1500 / L −600)."""
    if name in CT_WINDOWS:
        level, width = CT_WINDOWS[name]
        return f"{name} · W {width:g} / L {level:g}".replace("-", "−")
    if (typed := typed_window(name)) is not None:
        shows = (f"{min(typed.black, typed.white):g} to {max(typed.black, typed.white):g}" if typed.as_range
                 else f"W {typed.width:g} / L {typed.level:g}")
        return f"typed · {shows}{' inverted' if typed.black > typed.white else ''}".replace("-", "−")
    if name == INVERTED_WINDOW:
        return "inverted · uptake dark"  # short: the box beside a PET's four planes is narrow on a laptop
    if name in SUV_WINDOWS:
        return name.replace("-", "–")  # its scale is its name, typed with a hyphen ("SUV 0-5"), shown as a range
    return f"{name} · robust range"  # short: the dropdown's box is narrow; the caption gives its values


def window_box_label(modality: str, values: tuple[float, float] | None = None) -> str:
    """The window box's label, with what to type for a window of one's own in a scan of this modality: width/level
    for a CT (in HU), the range of values for a PET (inverted, as its MIP opens) or an MR, the scan's own where its
    `values` (its "auto" range) are given (`typed_window_example`)."""
    return f"Window (or type {typed_window_example(modality, short=True, values=values)})"


def offers_mip(modality: str) -> bool:
    """Whether the viewer offers a scan of this modality as a rotating MIP: a PET, the view nuclear medicine reads it
    in first (a CT's or an MR's whole-volume MIP shows the bones or the scalp)."""
    return modality == "PT"


def plane_choices(modality: str) -> list[tuple[str, str]]:
    """The planes the viewer offers for a modality as (label, value) pairs: the MIP too where it `offers_mip`."""
    return [(plane, plane) for plane in PLANES] + ([("MIP", MIP)] if offers_mip(modality) else [])


def window_choices(modality: str, units: str | None = None) -> list[tuple[str, str]]:
    """The window presets of a modality (and units: a PET in SUV has its fixed SUV scales) as the dropdown's
    (label, name) pairs."""
    return [(window_label(name), name) for name in window_names(modality, units)]


def scan_card(volume: Volume | None, label: str = "") -> str:
    """Markdown facts about the scan: modality, size, spacing, orientation, series, and `label` (what the page
    calls the scan: an example's name, or "uploaded scan") as its source. Never identifiers."""
    if volume is None:
        return "*No scan loaded.*"
    z, y, x = volume.shape
    sz, sy, sx = volume.spacing
    meta = volume.meta
    plane = acquired_plane(volume)  # the card describes the images as acquired: a sagittal series' own slices
    (width, width_mm), (height, height_mm), (count, step_mm) = {
        "axial": ((x, sx), (y, sy), (z, sz)), "coronal": ((x, sx), (z, sz), (y, sy)),
        "sagittal": ((y, sy), (z, sz), (x, sx))}[plane]
    rows = [
        ("Modality", MODALITY_NAMES.get(volume.modality, volume.modality)
         + (", as chosen on this page" if meta.get("modality_chosen") else "")),
        ("Size", f"{width} × {height} voxels × {count} {plane} slices"),
        ("Spacing", f"{width_mm:.2f} × {height_mm:.2f} mm in-plane, {step_mm:.2f} mm between slices"
         f"{_thickness(meta.get('slice_thickness_mm'), step_mm)}" if volume.spacing_known
         else "not stored in an M3D .npy; shown as 1 mm"),
        ("Field of view", f"{width * width_mm:.0f} × {height * height_mm:.0f} × {count * step_mm:.0f} mm"
         if volume.spacing_known else "unknown"),
        ("Orientation", _orientation_words(volume)),
        ("Source", f"{SOURCE_NAMES.get(volume.source, volume.source)}, {label}"),
    ]
    if meta.get("suv_converted_from"):  # a Bq/mL series read as SUV (suv.py)
        rows.append(("Values", f"{meta['units']}, body weight, from {meta['suv_converted_from']}"))
    elif meta.get("units"):
        rows.append(("Values", str(meta["units"])))
    elif volume.modality == "PT":  # a NIfTI has no field for it: SUV or Bq/mL cannot be told from the values
        rows.append(("Values", "unit not stated in the file"))
    if meta.get("patient_position"):
        rows.append(("Patient", f"{meta['patient_position']} (shown as any scan is, anterior up)"
                     if meta["patient_position"].startswith("prone") else meta["patient_position"]))
    if meta.get("series_number") is not None:
        rows.append(("Series", f"number {meta['series_number']}"))
    if meta.get("manufacturer"):
        rows.append(("Manufacturer", str(meta["manufacturer"])))
    if len(rows) % 2:
        rows.append(("", ""))
    half = len(rows) // 2  # two facts per table row keeps the card short on a laptop screen
    table = "\n".join(f"| {_name(a)} | {_cell(x)} | {_name(b)} | {_cell(y)} |"
                      for (a, x), (b, y) in zip(rows[:half], rows[half:], strict=True))
    notes = "".join(f"\n\nNote: {note}" for note in meta.get("notes", []) or [])
    return f"| | | | |\n|---|---|---|---|\n{table}{notes}"


def _thickness(thickness_mm: float | None, step_mm: float) -> str:
    """", each 5.00 mm thick" where the slices' stated thickness is not their spacing (an overlapping reconstruction,
    5 mm slices every 2.5 mm, reads as 2.5 mm slices otherwise; thin slices with gaps between them), else ""."""
    if thickness_mm is None or abs(thickness_mm - step_mm) <= 0.1 * step_mm:
        return ""
    return f", each {thickness_mm:.2f} mm thick"


def _orientation_words(volume: Volume) -> str:
    """The card's orientation: as stored, or, where the file states none, what it is read as (its side letters then
    carry a "?")."""
    if volume.source == "npy":  # an M3D array holds voxels alone
        return "not stored in an .npy: read as axial slices, the patient's right on the viewer's left (sides in doubt)"
    if volume.meta.get("orientation_unknown"):
        return f"not stated (read as {volume.orientation}), shown radiologically; sides in doubt"
    return f"{volume.orientation} as stored, shown radiologically"


def _name(text: str) -> str:
    """A fact's name in bold; the empty cell that pads an odd number of facts stays empty."""
    return f"**{text}**" if text else ""


def _cell(text: str) -> str:
    """A value as a Markdown table cell shows it as written (a manufacturer's name is text from the file)."""
    return shown(text).replace("|", "\\|")


# The slice viewer --------------------------------------------------------------------------------------------

def kept_summary(volume: Volume, kept_slabs: list[tuple[int, int]], input_slices: int) -> str:
    """What the model read of the scan, in words: the axial slices it kept or, where its input was `input_slices`
    thicker slabs (each the mean of a few slices, `preprocess.slab_bounds`), the slabs it kept and how many of the
    scan's slices they cover."""
    total = volume.shape[0]
    if input_slices == total:
        return f"the model kept {len(kept_slabs)} of {total} axial slices"
    covered = len({index for first, last in kept_slabs for index in range(first, last + 1)})
    thickness = f" of about {total * volume.spacing[0] / input_slices:.2g} mm" if volume.spacing_known else ""
    return (f"the model kept {len(kept_slabs)} of its {input_slices} slabs{thickness}, covering {covered} of "
            f"{total} axial slices")


FROM_MIP = "the spot found from the MIP"  # what a cross-hair marks, as the caption says (`slice_view_html`)
CLICKED = "the point clicked"
LESION_CENTRE = "the lesion's centre, from the true findings"


def slice_view_html(volume: Volume, plane: str, index: int, window: str, kept_slabs: list[tuple[int, int]],
                    spot: tuple[int, int, int] | None = None, spot_found: str = FROM_MIP) -> str:
    """The slice `index` (from 0) of `plane` in `window` as an inline PNG (nothing written to disk), with its
    orientation letters, its pixel size for the ruler, buttons (viewer.js) that enlarge it to the window, measure
    on it and, for the MIP, turn it, a track marking `kept_slabs` (the first and last axial index of each slab the
    model kept: every slice it read, each mark leading to the slab's middle slice) and the cursor, and a caption:
    where the slice lies, the window, whether the model read it. `spot`: a voxel (z, y, x) found from a click on
    the MIP, clicked on a slice or named by an example's true findings (`spot_found` says which), marked where this
    image shows it (`_spot_mark`), its value in the caption."""
    count = slice_count(volume, plane)
    pixels = render_slice(volume, plane, index, window)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    source = base64.b64encode(buffer.getvalue()).decode()
    left, right, top, bottom = (f"{letters}{'?' if volume.meta.get('orientation_unknown') else ''}"  # sides in doubt
                                for letters in (mip_edges(index) if plane == MIP else PLANE_EDGES[plane]))
    marks, kept_note = "", ""
    if plane == "axial" and kept_slabs:
        marks = "".join(f'<span class="kept-mark" data-slice="{slab_middle(first, last) + 1}" style="left:'
                        f'{100 * first / count:.2f}%;width:{100 * (last + 1 - first) / count:.2f}%"></span>'
                        for first, last in kept_slabs)
        slab = next(((first, last) for first, last in kept_slabs if first <= index <= last), None)
        if slab is not None:
            kept_note = (" · kept by the model" if slab[0] == slab[1] else
                         f" · kept by the model (slab {slab[0] + 1}–{slab[1] + 1})")
    cursor = f'<span class="cursor-mark" style="left:{100 * (index + 0.5) / count:.2f}%"></span>'
    black, white = window_limits(volume, window)
    frame = "slice-frame inverted" if black > white else "slice-frame"  # white around a white image
    location = slice_location(volume, plane, index)
    at = spot_position(volume, plane, index, spot) if spot is not None else None
    spot_note = f"cross-hair: {spot_found}, {_spot_value(volume, spot)}" if at else ""
    alt = f"{_name_of(plane, index, count)}{f', {spot_note}' if at else ''}"  # the units are text from the file
    return (f'<div class="slice-view"><div class="{frame}"{_aspect(pixels)}>'
            f'<img class="slice-image" src="data:image/png;base64,{source}" alt="{html.escape(alt, quote=True)}" '
            f'draggable="false" data-slice="{index + 1}"'
            f'{_pixel_size(volume, plane, index, pixels)}{_spot_click(plane)}>{_spot_mark(pixels, at)}'
            f'<span class="edge edge-left">{left}</span><span class="edge edge-right">{right}</span>'
            f'<span class="edge edge-top">{top}</span><span class="edge edge-bottom">{bottom}</span>'
            '<button type="button" class="slice-enlarge" title="Enlarge the image (Esc to close)" '
            f'aria-label="Enlarge the slice image">⤢</button>{_turn_button(plane)}{RULER_BUTTON}</div>'
            f'<div class="slice-track" data-count="{count}" title="Click to go to a {_step_name(plane)}'
            f'{"; green: the slices the model kept" if marks else ""}">'
            f'{marks}{cursor}</div>'
            f'<div class="slice-caption">{_position(plane, index, count, not volume.meta.get("orientation_unknown"))}'
            f'{f" · {location}" if location else ""} · window '
            f'{window_label(window)}{shown_range(volume, window)}'
            f'{_drawn_note(volume, plane, index)}{kept_note}{f" · {shown(spot_note)}" if at else ""}</div></div>')


def _drawn_note(volume: Volume, plane: str, index: int) -> str:
    """" · not acquired: …" for a slice the loader drew between two acquired ones (a DICOM series' missing file, or
    a slot of the finer grid of a spacing that changes: `meta["drawn_slices"]`), so that no one measures a density
    or a small lesion on it as if it had been imaged."""
    if plane != acquired_plane(volume) or index not in volume.meta.get("drawn_slices", ()):
        return ""
    return " · not acquired: drawn from the slices on either side"


def _aspect(pixels) -> str:
    """The frame's style: the image's height over its width, which page.css sizes its box by (no taller than the
    frame's width draws the image, so that a wide image has no black bands above and below it)."""
    rows, columns = pixels.shape
    return f' style="--aspect:{rows / columns:.3f}"'


def _spot_value(volume: Volume, voxel: tuple[int, int, int]) -> str:
    """A voxel's value with the scan's units where known, as the caption's range gives them: "16.2 SUV, g/mL"
    (text, not yet escaped for the page)."""
    units = f" {unbracketed(volume.units)}" if volume.units else ""
    return f"{plain_number(float(volume.data[voxel])).replace('-', '−')}{units}"


def _spot_mark(pixels, at: tuple[float, float] | None) -> str:
    """A cross-hair with a gap in the middle, so that what it marks stays in view, at `at` ((down, across)
    fractions of the image): an SVG over the image, drawn in its pixels and fitted as the image is
    (object-fit: contain), so it stays on its voxel however large the viewer draws the image."""
    if at is None:
        return ""
    height, width = pixels.shape[:2]
    y, x, gap, arm = at[0] * height, at[1] * width, 0.025 * max(height, width), 0.06 * max(height, width)
    arms = "".join(f'<line x1="{x + dx * gap:.1f}" y1="{y + dy * gap:.1f}" x2="{x + dx * (gap + arm):.1f}" '
                   f'y2="{y + dy * (gap + arm):.1f}"/>' for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    # Each arm twice: a wider halo under it keeps it in view on grey, black or white.
    return (f'<svg class="spot-mark" viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" '
            f'aria-hidden="true"><g class="halo">{arms}</g><g>{arms}</g></svg>')


# The ruler (viewer.js): pressed, a drag across the image measures the distance in mm; on again, off.
RULER_BUTTON = ('<button type="button" class="slice-ruler" title="Measure: drag across the image (mm)" '
                'aria-label="Measure a distance on the image" aria-pressed="false">mm</button>')


def _pixel_size(volume: Volume, plane: str, index: int, pixels) -> str:
    """The image's pixel size in mm as an attribute, for the ruler; none where the scan's spacing is unknown (an M3D
    .npy), which the ruler then says."""
    if not volume.spacing_known:
        return ""
    return f' data-mm-per-pixel="{slice_width_mm(volume, plane, index) / pixels.shape[1]:.6g}"'


def _spot_click(plane: str) -> str:
    """For the MIP: a spot clicked on it is found in the slices (viewer.js, the app's `find_mip_spot`); for a slice: a
    point clicked on it is marked, its value given, and the other planes open through it (`mark_point`)."""
    if plane == MIP:
        return ' data-spot-click title="Click a spot to find it in the slices"'
    return (f' data-point-click data-plane="{plane}" title="Click a point to read its value and to see it in the other '
            'planes"')


def _turn_button(plane: str) -> str:
    """For the MIP: the button that turns it round and round (viewer.js), as nuclear medicine watches it."""
    if plane != MIP:
        return ""
    return ('<button type="button" class="mip-turn" title="Turn the MIP round (any key or the wheel stops it)" '
            'aria-label="Turn the MIP round" aria-pressed="false"><span class="turn-start"></span>'
            '<span class="turn-stop"></span></button>')


def _step_name(plane: str) -> str:
    """What the slider steps through."""
    return "frame" if plane == MIP else "slice"


def _position(plane: str, index: int, count: int, sides_known: bool = True) -> str:
    """What the caption says first: the slice and, where the file states its orientation, where slice 1 lies; or
    the MIP frame."""
    if plane == MIP:
        return f"MIP {index + 1} / {count}"
    return f"{plane.title()} {index + 1} / {count}" + (f" from {SLICE_ONE[plane]}" if sides_known else "")


def _name_of(plane: str, index: int, count: int) -> str:
    """The image's text alternative."""
    if plane == MIP:
        return f"maximum intensity projection, frame {index + 1} of {count}"
    return f"{plane} slice {index + 1} of {count}"


def empty_view_html(said: str) -> str:
    """The viewer's place with no scan in it: `said` says why (none loaded yet, or released)."""
    return f'<div class="slice-empty">{shown(said)}</div>'


def shown_range(volume: Volume, window: str) -> str:
    """The values a window that is no CT preset spans (PET, MR: from the scan's own range), lowest first."""
    if window in CT_WINDOWS or window in SUV_WINDOWS or typed_window(window) is not None:
        return ""  # its level and width, or its scale, say it
    low, high = sorted(window_limits(volume, window))
    units = f" {shown(unbracketed(volume.units))}" if volume.units else ""  # HU, Bq/mL, SUV
    return f" ({plain_number(low)} to {plain_number(high)}{units})".replace("-", "−")


FEW_GREYS = 0.05  # a typed window whose width the scan's values fill less than this share of shows them flat


def typed_window_note(volume: Volume, window: str) -> str:
    """A sentence for a typed window that shows little of this scan: one that misses the scan's values (its "auto"
    range), or that is so much wider than they are that they come out in a few greys (350/50 on a PET of SUV 0 to
    6), with a window that shows them; "" for any other window."""
    typed = typed_window(window)
    if typed is None:
        return ""
    low, high = window_limits(volume, AUTO_WINDOW)
    darkest, brightest = sorted((typed.black, typed.white))
    if high <= darkest or low >= brightest:
        shows = "all in one grey, black or white"
    elif (min(high, brightest) - max(low, darkest)) / (brightest - darkest) < FEW_GREYS:
        shows = "in a few greys"
    else:
        return ""
    units = f" {unbracketed(volume.units)}" if volume.units else ""
    values = f"{plain_number(low)} to {plain_number(high)}{units}".replace("-", "−")
    return (f"the scan's values run from {values}, and the window {window.strip()!r} shows them {shows}; try the "
            f"range {plain_number(low)}-{plain_number(high)}, or auto")


def unbracketed(units: str) -> str:
    """Units as brackets hold them (the caption's range, the 3D threshold's label): "SUV (g/mL)" as "SUV, g/mL",
    not "…(g/mL))"."""
    return units.replace(" (", ", ").removesuffix(")") if units.endswith(")") else units


def plain_number(value: float) -> str:
    """A value as a reader takes it in: four significant digits, no exponent (25430, 5.698, 0.0123)."""
    digits = max(0, 3 - math.floor(math.log10(abs(value)))) if value else 0
    text = f"{round(value, digits):.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
