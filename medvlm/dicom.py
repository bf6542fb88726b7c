"""DICOM series to one canonical `Volume`: headers first (series, stacks, geometry, limits), pixels last.

One upload may hold several series (the scan is loaded, `_series_rank`, the rest listed), and one series
may hold several stacks at the same positions (echoes, diffusion b-values, time points: one is loaded and a
note names the rest). Slices are ordered by position along the slice normal, never by file name or
InstanceNumber; a tilted CT gantry's slices are shifted within their planes onto a rectangular grid.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VolumeError
from .limits import MAX_DICOM_IMAGES, MIN_SLICES
from .slice_grid import MAX_MISSING_IN_A_GAP, SliceGrid, largest_block, slice_grid
from .suv import CONVERTIBLE_UNITS, SUV_UNITS, suv_factor
from .volume import SCAN_FORMATS, Volume, canonical_volume, check_grid, error_reason

__all__ = ["load_dicom"]

POSITION_TOLERANCE_MM = 1e-3  # two images this close along the normal lie at one position
STACK_COVERAGE = 0.9  # share of a series' positions that one echo, b-value or time point covers
PERPENDICULAR_TOLERANCE = math.sin(math.radians(1.0))  # row and column directions within 1° of a right angle
WHOLE_MM_ROUNDING = 0.5  # mm each coordinate of a position lies from where it was taken, where an exporter rounds them
# (0018,5100) PatientPosition, in words: how the patient lay, which the images' orientation does not show (a prone
# patient's axial images are shown anterior up, as any other's, where a PACS shows them as acquired)
PATIENT_POSITIONS = {"HFS": "supine, head first", "FFS": "supine, feet first", "HFP": "prone, head first",
                     "FFP": "prone, feet first", "HFDR": "on the right side, head first",
                     "HFDL": "on the left side, head first", "FFDR": "on the right side, feet first",
                     "FFDL": "on the left side, feet first"}
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")  # a picture of one image

# What tells apart the images of one series that lie at one position, in the order tried:
# (what it is, its unit, the enhanced file's functional group and keyword, the single-frame file's keyword).
STACK_TAGS = (
    ("echo time", "ms", "MREchoSequence", "EffectiveEchoTime", "EchoTime"),  # (0018,9082), (0018,0081)
    ("b-value", "s/mm²", "MRDiffusionSequence", "DiffusionBValue", "DiffusionBValue"),  # (0018,9087)
    ("time point", "", "FrameContentSequence", "TemporalPositionIndex", "TemporalPositionIdentifier"),  # (0020,0100)
    ("trigger time", "ms", "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime",
     "TriggerTime"),  # (0018,1060)
    ("acquisition", "", "FrameContentSequence", "FrameAcquisitionNumber", "AcquisitionNumber"),  # (0020,0012)
)


@dataclass
class _DicomImage:
    """One 2D image of a series: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    position: np.ndarray  # (3,) LPS mm of the first transmitted pixel
    orientation: np.ndarray  # (6,) row then column direction cosines, LPS
    pixel_spacing: tuple[float, float]  # mm between rows, between columns
    slope: float
    intercept: float
    intercept_stated: bool  # whether the file gives (0028,1052) RescaleIntercept at all (CT requires it)
    padding: tuple[int, int] | None  # stored values, lowest and highest, that are padding (`_padding_range`)
    size: tuple[int, int]  # rows, columns
    identity: tuple  # the same image twice (a copied file) has the same identity
    labels: tuple[float | None, ...]  # its value of each of STACK_TAGS (None: not stated)
    instance: float  # InstanceNumber (then frame): the order among images at one position that say nothing else


def _first(value: Any, default: float | None = None) -> float | None:
    """A finite number from a DICOM value that may be multi-valued, empty or garbage (then `default`)."""
    numbers = _numbers(value)
    return numbers[0] if numbers else default


def _rescale(value: Any, keyword: str, name: str) -> float | None:
    """(0028,1053) RescaleSlope or (0028,1052) RescaleIntercept as a number, None when the file does not state it.

    A decimal comma ("-1024,0", which some exporters write) is read as a point. Any other value that is no
    number, or a slope of 0, raises VolumeError: reading it as the default would shift or flatten every value
    (a CT's by 1024 HU) without a word."""
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return None
    number = _first(value)
    if number is None and isinstance(value, str):
        number = _first(value.replace(",", "."))
    if number is None or (keyword == "RescaleSlope" and number == 0):
        raise VolumeError(f"{name}: its {keyword} is {str(value)[:20]!r}, which cannot turn its pixels into values; "
                          "re-export the series, or fix that attribute")
    return number


def _numbers(value: Any, count: int | None = None) -> list[float] | None:
    """The finite numbers of a DICOM value (single or multi-valued), or None when it is missing, garbage or does
    not hold exactly `count` of them."""
    if value is None:
        return None
    items = [value] if isinstance(value, str | bytes | int | float) else value
    try:
        numbers = [float(item) for item in items]
    except (TypeError, ValueError, OverflowError):
        return None
    if not numbers or (count is not None and len(numbers) != count) or not all(map(math.isfinite, numbers)):
        return None
    return numbers


def _count(value: Any) -> int:
    """A positive whole number from a DICOM value (Rows, NumberOfFrames), else 0."""
    number = _first(value, 0.0)
    return int(number) if number >= 1 and number == int(number) else 0


def _frame_count(header) -> int:
    return max(1, _count(header.get("NumberOfFrames")))  # (0028,0008)


def _functional(header, frame: int | None, sequence: str, keyword: str) -> Any:
    """An attribute of an image: in a multi-frame file its per-frame functional group, else the shared one;
    else (and in a single-frame file, frame None) the top-level attribute."""
    if frame is None:
        return header.get(keyword)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")  # (5200,9230)
    shared = header.get("SharedFunctionalGroupsSequence")  # (5200,9229)
    for group in (per_frame[frame] if per_frame and frame < len(per_frame) else None,
                  shared[0] if shared else None):
        items = group.get(sequence) if group is not None else None
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return header.get(keyword)


def _geometry(position: Any, orientation: Any, spacing: Any, name: str) -> tuple[np.ndarray, np.ndarray,
                                                                                 tuple[float, float]]:
    """(position (3,), orientation (6,), pixel spacing (2,)) from DICOM values, or VolumeError saying what is
    missing or wrong."""
    position, orientation, spacing = _numbers(position, 3), _numbers(orientation, 6), _numbers(spacing, 2)
    if position is None or orientation is None:
        raise VolumeError(f"{name} has images without ImagePositionPatient or ImageOrientationPatient, so they "
                          "cannot be stacked into a volume; export the series with its geometry or as NIfTI")
    if spacing is None:
        raise VolumeError(f"{name} has images without PixelSpacing; export the series with its geometry or "
                          "as NIfTI")
    if min(spacing) <= 0:
        raise VolumeError(f"{name} has a zero or negative PixelSpacing ({spacing[0]:g}, {spacing[1]:g}); fix the "
                          "header's spacing or re-export the scan")
    row_cosines, column_cosines = np.array(orientation[:3]), np.array(orientation[3:])
    lengths = np.linalg.norm(row_cosines), np.linalg.norm(column_cosines)
    if not all(lengths):
        raise VolumeError(f"{name} has an ImageOrientationPatient with a row or column direction of zero length; "
                          "re-export the scan")
    cosine = row_cosines @ column_cosines / (lengths[0] * lengths[1])
    if abs(cosine) > PERPENDICULAR_TOLERANCE:
        raise VolumeError(f"{name} has an ImageOrientationPatient whose row and column directions are "
                          f"{math.degrees(math.acos(np.clip(cosine, -1.0, 1.0))):.1f}° apart, not perpendicular "
                          "(within 1°); re-export the scan")
    row_cosines, column_cosines = row_cosines / lengths[0], column_cosines / lengths[1]
    column_cosines -= (column_cosines @ row_cosines) * row_cosines  # the values' rounding undone: exactly 90°
    unit = np.concatenate([row_cosines, column_cosines / np.linalg.norm(column_cosines)])
    return np.array(position), unit, (spacing[0], spacing[1])


# (0054,1001) Units of a PET or NM series' values (PS3.3 C.8.9.1.1.3), as a reader names them; others as stated.
PET_UNITS = {"BQML": "Bq/mL", "GML": SUV_UNITS, "CM2ML": "SUV lean body mass (cm²/mL)", "CNTS": "counts",
             "CPS": "counts per second", "PROPCNTS": "proportional counts", "PCNT": "%", "NONE": "no unit"}


def _padding_range(header) -> tuple[int, int] | None:
    """The stored pixel values, lowest and highest (both included), that (0028,0120) PixelPaddingValue and
    (0028,0121) PixelPaddingRangeLimit mark as padding: pixels outside the reconstruction circle or the body,
    which are no patient data (PS3.3 C.7.5.1.1.2); None when the file states none.

    Both are stored values, compared before the rescale. Their VR (US or SS) follows (0028,0103)
    PixelRepresentation, and some files write it the other way (a signed CT's -2000 as US 63536): the value's
    bits, as many as (0028,0100) BitsAllocated, are read again as the pixels are, as Weasis does
    (DicomMediaUtils.getIntPixelValue)."""
    value = _first(header.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _first(header.get("PixelPaddingRangeLimit"), value)
    bits = min(int(_first(header.get("BitsAllocated"), 16)), 16)  # the value is US or SS: 16 bits at most
    signed = header.get("PixelRepresentation") == 1
    value, limit = ((int(number) + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1) if signed else int(number) % 2**bits
                    for number in (value, limit))
    return min(value, limit), max(value, limit)


def _stack_labels(header, frame: int | None) -> tuple[float | None, ...]:
    """The image's value of each of STACK_TAGS: per frame in an enhanced file, else from the file's header."""
    labels = []
    for _, _, sequence, enhanced, single in STACK_TAGS:
        value = _functional(header, frame, sequence, enhanced) if frame is not None else None
        labels.append(_first(header.get(single) if value is None else value))
    return tuple(labels)


def _identity(path: Path, header, frame: int | None) -> tuple:
    uid = str(header.get("SOPInstanceUID", ""))  # (0008,0018); kept in memory only, never in meta
    return (uid, frame) if uid else (str(path), frame)


def _images_of(path: Path, header, name: str) -> list[_DicomImage]:
    """The 2D images of one DICOM file with their geometry; raises VolumeError when it has none."""
    frames = _frame_count(header)
    if frames > 1 and "PerFrameFunctionalGroupsSequence" not in header:
        return _legacy_frames(path, header, frames, name)
    size = (_count(header.get("Rows")), _count(header.get("Columns")))
    instance = _first(header.get("InstanceNumber"), 0.0)  # (0020,0013)
    # An enhanced file, even with one frame, keeps the geometry in its functional groups.
    enhanced = "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header
    padding, images = _padding_range(header), []
    for frame in range(frames):
        index = frame if frames > 1 else None  # which frame's pixels (None: the file's only image)
        group = frame if enhanced else None

        def attribute(sequence: str, keyword: str, group: int | None = group) -> Any:
            return _functional(header, group, sequence, keyword)

        position, orientation, spacing = _geometry(
            attribute("PlanePositionSequence", "ImagePositionPatient"),  # (0020,0032)
            attribute("PlaneOrientationSequence", "ImageOrientationPatient"),  # (0020,0037)
            attribute("PixelMeasuresSequence", "PixelSpacing"), name)  # (0028,0030)
        slope = _rescale(attribute("PixelValueTransformationSequence", "RescaleSlope"), "RescaleSlope", name)
        intercept = _rescale(attribute("PixelValueTransformationSequence", "RescaleIntercept"), "RescaleIntercept",
                             name)
        images.append(_DicomImage(
            path=path, frame=index, position=position, orientation=orientation, pixel_spacing=spacing,
            slope=1.0 if slope is None else slope, intercept=intercept or 0.0, intercept_stated=intercept is not None,
            padding=padding, size=size, identity=_identity(path, header, index), labels=_stack_labels(header, group),
            instance=instance + frame / frames,
        ))
    return images


def _legacy_frames(path: Path, header, frames: int, name: str) -> list[_DicomImage]:
    """The frames of a multi-frame file without per-frame positions (RT dose, legacy MR/NM): one position and
    orientation for the file, frames stepped along the slice normal by GridFrameOffsetVector or the spacing."""
    position, orientation, spacing = _geometry(header.get("ImagePositionPatient"),
                                               header.get("ImageOrientationPatient"), header.get("PixelSpacing"),
                                               name)
    offsets = _numbers(header.get("GridFrameOffsetVector"), frames)  # (3004,000C): mm along the normal
    if offsets is None:
        step = _first(header.get("SpacingBetweenSlices")) or _first(header.get("SliceThickness"))  # (0018,0088/0050)
        if not step or step <= 0:
            raise VolumeError(f"{name} has a multi-frame image without per-frame positions or a slice spacing; "
                              "export the series as single-frame DICOM files or NIfTI")
        offsets = [frame * step for frame in range(frames)]
    normal = np.cross(orientation[:3], orientation[3:])
    slope = _rescale(header.get("RescaleSlope"), "RescaleSlope", name)
    intercept = _rescale(header.get("RescaleIntercept"), "RescaleIntercept", name)
    stated, slope, intercept = intercept is not None, 1.0 if slope is None else slope, intercept or 0.0
    scale = _first(header.get("DoseGridScaling"))  # (3004,000E): RT dose in Gy
    slope = slope * scale if scale else slope
    size, labels = (_count(header.get("Rows")), _count(header.get("Columns"))), _stack_labels(header, None)
    instance, padding = _first(header.get("InstanceNumber"), 0.0), _padding_range(header)
    return [_DicomImage(path=path, frame=frame, position=position + (offset - offsets[0]) * normal,
                        orientation=orientation, pixel_spacing=spacing, slope=slope, intercept=intercept,
                        intercept_stated=stated, padding=padding, size=size,
                        identity=_identity(path, header, frame), labels=labels,
                        instance=instance + frame / frames)
            for frame, offset in enumerate(offsets)]


@functools.cache
def _pydicom():
    """pydicom, set once not to check values as it reads them (for this process: pydicom has one setting): a value
    that fails its check (a UID that embeds a patient's ID and birth date, as some sites' do) is only warned about,
    quoted, on stderr and in the server's log. The loader checks the values it uses itself."""
    import pydicom
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def _read_header(path: Path):
    """The file's header without pixels, or None when it is not a DICOM image. A file without the 128-byte
    preamble and file meta (old exports, ACR-NEMA style) is read too when it states an image's geometry."""
    from pydicom.errors import InvalidDicomError

    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        stated = "ImagePositionPatient" in header or "PerFrameFunctionalGroupsSequence" in header
        return header if stated else None  # forced reads of other bytes rarely hold a position: skipped


def _read_headers(files: list[Path]) -> list[tuple[Path, Any]]:
    """(path, header) of the files that are DICOM images; anything else (not DICOM, SR, RT, DICOMDIR) is skipped."""
    headers = []
    for path in files:
        # pydicom raises many error types on arbitrary bytes; every one means "not a DICOM image": skip it.
        try:
            header = _read_header(path)
            if header is None:
                continue
            for _ in header.iterall():  # convert every (lazily read) element now, so a broken one skips the file
                pass
        except Exception:
            continue
        if _count(header.get("Rows")) and _count(header.get("Columns")):  # (0028,0010), (0028,0011): an image
            headers.append((path, header))
    return headers


def _decode(path: Path) -> np.ndarray:
    """A file's pixels as stored; a file without file meta is uncompressed in the encoding it was read in."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    dataset = _pydicom().dcmread(path, force=True)
    if "TransferSyntaxUID" not in dataset.file_meta:
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                               ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return dataset.pixel_array


def _is_compressed(path: Path) -> bool:
    """Whether the file's pixel data is stored compressed (its transfer syntax); False when that cannot be read."""
    try:
        syntax = _pydicom().dcmread(path, stop_before_pixels=True, force=True).file_meta.get("TransferSyntaxUID")
    except Exception:  # the file was read once already; whatever fails now, it is not known to be compressed
        return False
    try:
        return bool(syntax is not None and syntax.is_compressed)
    except ValueError:  # a private or unknown transfer syntax (GE's 1.2.840.113619.5.2): none pydicom decodes
        return True


def _series_summary(headers: list) -> dict[str, Any]:
    """Series number, modality and image count of one series: PHI-free, no UIDs, no free text."""
    header = headers[0][1]
    return {"series_number": _series_number(header), "modality": _dicom_modality(header),
            "slices": sum(_frame_count(h) for _, h in headers)}


def _series_rank(headers: list) -> tuple[bool, bool, int]:
    """Which series of an upload is the scan: one with enough images of one orientation and size to stack
    first (not a scout, whose views lie in different planes), then a CT, MR or PET one (an RT dose grid often
    has more frames than the CT it was computed on), then most images. From the headers alone."""
    summary = _series_summary(headers)
    planes: dict[tuple, int] = {}
    for _, header in headers:  # an enhanced file states its orientation per frame: its frames count as one plane
        orientation = tuple(np.round(_numbers(header.get("ImageOrientationPatient"), 6) or [0.0] * 6, 2) + 0.0)
        key = (orientation, _count(header.get("Rows")), _count(header.get("Columns")))
        planes[key] = planes.get(key, 0) + _frame_count(header)
    return max(planes.values()) >= MIN_SLICES, summary["modality"] != "OT", summary["slices"]


def _series_number(header) -> int | None:
    """The series' number on the scanner (0020,0011), None where absent or not a number.

    The number is what tells series apart on the page, not the Series Description (0008,103E): that is free
    text, and DICOM's Basic Application Level Confidentiality Profile (PS3.15 Table E.1-1) removes it because
    it can carry a patient's name; an export de-identified less carefully may still hold one.
    """
    try:
        return int(header.get("SeriesNumber"))
    except (TypeError, ValueError):
        return None


def _dicom_modality(header) -> str:
    modality = str(header.get("Modality", "")).upper()  # (0008,0060)
    return modality if modality in ("CT", "MR", "PT") else "OT"


def _largest_group(images: list[_DicomImage]) -> tuple[list[_DicomImage], int]:
    """The images that share the series' most common slice orientation and size (a localizer's other planes
    and matrix are dropped): (those images, how many were dropped)."""
    groups: dict[tuple, list[_DicomImage]] = {}
    for image in images:
        key = (tuple(np.round(image.orientation, 2) + 0.0), image.size)  # + 0.0: no -0.0 key
        groups.setdefault(key, []).append(image)
    largest = max(groups.values(), key=len)
    return largest, len(images) - len(largest)


def _without_copies(images: list[_DicomImage]) -> tuple[list[_DicomImage], int]:
    """The images with each one kept once (a file copied twice into the upload): (images, copies dropped)."""
    seen: dict[tuple, _DicomImage] = {}
    for image in images:  # the position too: a careless de-identifier can give every image one SOPInstanceUID
        seen.setdefault((image.identity, *np.round(image.position / POSITION_TOLERANCE_MM)), image)
    return list(seen.values()), len(images) - len(seen)


def _normal(image: _DicomImage) -> np.ndarray:
    return np.cross(image.orientation[:3], image.orientation[3:])


def _along_normal(images: list[_DicomImage]) -> np.ndarray:
    """Each image's position (mm) along the slice normal of the first (the images share an orientation)."""
    normal = _normal(images[0])
    return np.array([image.position @ normal for image in images])


def _position_count(images: list[_DicomImage]) -> int:
    """How many distinct positions along the slice normal the images lie at."""
    return 1 + int(np.count_nonzero(np.diff(np.sort(_along_normal(images))) >= POSITION_TOLERANCE_MM))


def _repeats_a_position(images: list[_DicomImage]) -> bool:
    return _position_count(images) < len(images)


def _one_stack(images: list[_DicomImage]) -> tuple[list[_DicomImage], str | None]:
    """One stack of a series whose images share positions (echoes, b-values, time points): (its images, a note
    naming what was left out, or None when every image has a position of its own).

    The first of STACK_TAGS whose values split the images into stacks that each cover the scan (at least
    STACK_COVERAGE of its positions, each once) decides; of those stacks, the one with most images, then the
    lowest value (the first echo, the first time point), but the highest b-value (diffusion is read there: an acute
    infarct may not show at b = 0; where the highest is one image per direction, no stack of it is clean, and b = 0
    is shown). A value that only differs between parts of one
    scan (two acquisitions that meet at one table position, a trigger time per slice) does not split it. Images
    that no such tag tells apart: at each position, the lowest InstanceNumber.
    """
    if not _repeats_a_position(images):
        return images, None
    positions = _position_count(images)
    for tag, (label, unit, *_) in enumerate(STACK_TAGS):
        stacks: dict[float | None, list[_DicomImage]] = {}
        for image in images:
            stacks.setdefault(image.labels[tag], []).append(image)
        clean = [value for value, stack in stacks.items()
                 if len(stack) >= STACK_COVERAGE * positions and not _repeats_a_position(stack)]
        if len(stacks) < 2 or not clean:
            continue
        order = -1.0 if label == "b-value" else 1.0
        chosen = min(clean, key=lambda value: (-len(stacks[value]), value is None, order * (value or 0.0)))
        values = sorted(value for value in stacks if value is not None)
        listed = ", ".join(f"{value:g}" for value in values[:6]) + (", …" if len(values) > 6 else "")
        unit = f" {unit}" if unit else ""
        shown = f"{label} {chosen:g}{unit}" if chosen is not None else f"the images without a {label}"
        return stacks[chosen], (f"the series holds {len(stacks)} images at each position ({label}s {listed}"
                                f"{unit}); {shown} is shown")
    ordered, positions = _sorted_along_normal(images)
    starts = [0, *np.flatnonzero(np.diff(positions) >= POSITION_TOLERANCE_MM) + 1, len(ordered)]  # of each position
    stack = [min(ordered[start:end], key=lambda image: (image.instance, str(image.path)))
             for start, end in pairwise(starts)]
    return stack, (f"{len(images) - len(stack)} image(s) share a position with another, and no echo time, b-value or "
                   "time point splits the series into stacks; at each position the lowest instance number is shown")


def _sorted_along_normal(images: list[_DicomImage]) -> tuple[list[_DicomImage], np.ndarray]:
    """Images sorted by position along the slice normal: (images, their positions along it)."""
    positions = _along_normal(images)
    order = np.argsort(positions, kind="stable")
    return [images[index] for index in order], positions[order]


@dataclass(frozen=True)
class _Shear:
    """How far each slot of a stack lies along its slices' plane from the one below (a tilted CT gantry: the table
    steps along the body, the slices are tilted to it), in pixels down the columns and along the rows."""

    rows: float
    columns: float
    tilt: float  # degrees between the table's step and the slice normal

    def _moves(self, count: int) -> tuple[list[tuple[float, float]], int, int]:
        """How far (rows, columns) each of `count` slots moves into the grown frame, and the frame's first row and
        column in slot 0's pixels (0 or below)."""
        top = math.floor(min(0.0, (count - 1) * self.rows))
        left = math.floor(min(0.0, (count - 1) * self.columns))
        moves = [(round(slot * self.rows - top, 6), round(slot * self.columns - left, 6)) for slot in range(count)]
        return moves, top, left

    def frame(self, count: int, rows: int, columns: int) -> tuple[int, int]:
        """(rows, columns) of the frame that holds every pixel of `count` slots of rows × columns, unsheared: known
        before any pixel is read, for the size limits."""
        moves, _, _ = self._moves(count)
        return (max(math.floor(down) + rows + (down % 1 > 0) for down, _ in moves),  # a fraction: a pixel longer
                max(math.floor(right) + columns + (right % 1 > 0) for _, right in moves))

    def draw_unsheared(self, pixels: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(slots, rows, columns) on the sheared grid → the same slices on a rectangular one: each moved back
        along its plane by its slot's shift (linearly interpolated between pixels, as dcm2niix corrects a tilt),
        within a frame grown to hold every pixel of every slice (NaN where a slice does not reach: padding).
        Returns (the slices, the frame's first row and column in slot 0's pixels: 0 or below)."""
        count = len(pixels)
        moves, top, left = self._moves(count)
        drawn = np.full((count, *self.frame(*pixels.shape)), np.nan, dtype=pixels.dtype)
        for slot, (down, right) in enumerate(moves):
            moved = _moved_by(_moved_by(pixels[slot], down % 1, axis=0), right % 1, axis=1)
            row, column = math.floor(down), math.floor(right)
            drawn[slot, row:row + moved.shape[0], column:column + moved.shape[1]] = moved
        return drawn, top, left


def _moved_by(image: np.ndarray, fraction: float, axis: int) -> np.ndarray:
    """An image moved `fraction` (0 ≤ fraction < 1) of a pixel further along `axis`, linearly interpolated: one
    pixel longer along it, whose first and last pixels (half outside the image) are NaN. A whole pixel's move
    returns the image itself, so no padding (NaN) spreads to its neighbours."""
    if fraction == 0.0:
        return image
    image = np.moveaxis(image, axis, 0)
    moved = np.full((image.shape[0] + 1, *image.shape[1:]), np.nan, dtype=image.dtype)
    moved[1:-1] = (1 - fraction) * image[1:] + np.float32(fraction) * image[:-1]
    return np.moveaxis(moved, 0, axis)


def _shear(images: list[_DicomImage], places: np.ndarray, step: float) -> _Shear | None:
    """The shear of a stack whose slots lie `step` mm apart along the slice normal, from the least-squares fit of
    the positions to their slots (which positions rounded to whole mm do not tilt); None when the table stepped
    along the normal, or so nearly that the whole stack is sheared by less than half a pixel (a tilt of a
    fraction of a degree shifts a long stack by pixels: it is undone too)."""
    normal = _normal(images[0])
    positions = np.array([image.position for image in images])
    vector = np.polyfit(places, positions, 1)[0]  # mm a slot
    along = abs(vector @ normal)
    tilt = math.degrees(math.acos(min(1.0, along / max(np.linalg.norm(vector), 1e-12))))
    vector = vector * (step / along)  # `step` along the normal, as the stack's slots are
    within_plane = vector - (vector @ normal) * normal
    row_spacing, column_spacing = images[0].pixel_spacing
    shear = _Shear(within_plane @ images[0].orientation[3:] / row_spacing,
                   within_plane @ images[0].orientation[:3] / column_spacing, tilt)
    sheared_by = (places[-1] - places[0]) * math.hypot(shear.rows, shear.columns)
    return None if sheared_by < 0.5 else shear


def _rounding(images: list[_DicomImage]) -> float:
    """How far (mm) along the slice normal the images' stated positions may lie from where they were taken: 0, or,
    where every ImagePositionPatient is rounded to whole mm (some exporters do), up to WHOLE_MM_ROUNDING in each
    coordinate, so up to that times the sum of the normal's components (0.5 mm axial, 0.71 mm at 45°)."""
    if not all(np.allclose(image.position, np.rint(image.position), rtol=0.0, atol=1e-3) for image in images):
        return 0.0
    return WHOLE_MM_ROUNDING * float(np.abs(_normal(images[0])).sum())


def _series_padding(images: list[_DicomImage]) -> tuple[int, int] | None:
    """The padding the series' images state (the most common, should they differ), for an image whose file
    states none: (0028,0120) PixelPaddingValue belongs to the General Equipment Module, which describes the
    equipment that made the whole series, and some exporters leave it out of some files."""
    stated = Counter(image.padding for image in images if image.padding is not None)
    return stated.most_common(1)[0][0] if stated else None


def _read_pixels(images: list[_DicomImage], rows: int, columns: int, name: str) -> tuple[np.ndarray, int]:
    """The images' pixels with rescale applied, float32 (slices, rows, columns), padding (`_padding_range`,
    compared with the stored values) set to NaN for `_fill_padding`; and how many pixels were padding. Each file
    is decoded once, one at a time, whatever order its frames take in the stack."""
    pixels = np.empty((len(images), rows, columns), dtype=np.float32)
    series_padding, padded = _series_padding(images), 0
    slots: dict[Path, list[tuple[int, _DicomImage]]] = {}
    for slot, image in enumerate(images):
        slots.setdefault(image.path, []).append((slot, image))
    for path, placed in slots.items():
        try:
            decoded = _decode(path)
        except Exception as error:  # decoders raise many types for corrupt or unsupported pixel data
            remedy = ("the file is damaged or its compression is not supported here; export the series again, "
                      "uncompressed" if _is_compressed(path) else
                      "the file is cut short or damaged; copy or export the series again")
            slot, image = placed[0]  # which image, as a PACS lists it: a file name may not be shown
            raise VolumeError(f"{name}: the pixel data of {path.name} (image {slot + 1} of {len(images)} from the "
                              f"first along the series, instance number {image.instance:g}) cannot be decoded "
                              f"({error_reason(error)}); {remedy}") from error
        for slot, image in placed:
            frame = decoded if image.frame is None else decoded[image.frame] if image.frame < len(decoded) else None
            if frame is None or frame.shape != (rows, columns):
                shape = "too few frames" if frame is None else f"pixels of shape {frame.shape}"
                raise VolumeError(f"{name}: {path.name} holds {shape}, not {rows}×{columns} per image; export the "
                                  "series again")
            pixels[slot] = frame * np.float32(image.slope) + np.float32(image.intercept)
            padding = image.padding or series_padding
            if padding is not None:
                outside = (frame >= padding[0]) & (frame <= padding[1])
                pixels[slot][outside] = np.nan
                padded += int(np.count_nonzero(outside))
    return pixels, padded


def _fill_padding(pixels: np.ndarray) -> int:
    """Set the padding voxels (NaN: `_read_pixels`, and slices drawn from them), in place, to the lowest value
    the scan's other voxels hold; returns how many there were.

    As Weasis renders padding (RescaleUtils.applyPixelPaddingToModalityLUT: the modality LUT's value at the
    image's lowest real pixel), and as PS3.3 C.7.5.1.1.2 advises padding itself (black, or air where the values
    mean something): black in every window, outside the body to the model, never a new extreme for an auto
    window or the 3D threshold. One value for the whole scan, taken after a MONOCHROME1 inversion, so that it
    stays black; a slice drawn between two others keeps their padding rather than a blend with it."""
    outside = np.isnan(pixels)
    pixels[outside] = np.fmin.reduce(pixels, axis=None)  # fmin skips NaN
    return int(np.count_nonzero(outside))


def _too_few_images(name: str, series: dict[str, list], single_file: bool) -> str:
    """Why an upload whose every series holds one image (of one frame) is no volume, and what to upload instead."""
    if len(series) >= MIN_SLICES:  # what some de-identifiers do: a new SeriesInstanceUID for every file
        return (f"{name} holds {len(series)} DICOM images, each in a series of its own (every file has its own "
                "SeriesInstanceUID), so none stacks into a volume; export the series again keeping its "
                "SeriesInstanceUID, or as NIfTI")
    whole = "its folder, or a .zip of its files" if single_file else "all of its files"
    return f"{name} holds one DICOM image, which is no volume; upload the whole series: {whole}"


@dataclass
class _Stack:
    """The images of a series that make its volume, sorted along their normal, how they lie, and what was left out
    of the series to make it."""

    images: list[_DicomImage]
    positions: np.ndarray  # (images,) mm along the normal, ascending
    grid: SliceGrid
    shear: _Shear | None  # a tilted gantry's, undone when drawn
    rows: int
    columns: int
    far: str | None  # images far from the rest, left out, in words
    copies: int  # images that were in the upload twice
    other_planes: int  # images in another orientation or of another size (a localizer)
    other_stacks: str | None  # the echoes, b-values or time points not shown, in words


def _series_of(files: list[Path], name: str, single_file: bool) -> dict[str, list[tuple[Path, Any]]]:
    """The upload's DICOM images (path, header) by SeriesInstanceUID; VolumeError saying what the upload holds
    instead when none is one."""
    headers = _read_headers(files)
    if not headers:
        if single_file and Path(name).suffix.lower() in PICTURE_SUFFIXES:  # a screenshot, a photo of a screen
            raise VolumeError(f"{name} is a picture, not a scan: one image holds no volume; {SCAN_FORMATS}")
        if single_file:  # a document, a DICOM report: nothing to say about its contents
            raise VolumeError(f"{name} is not a scan file MedVLM 3D reads; {SCAN_FORMATS}")
        if not files:
            raise VolumeError(f"{name} holds no files; {SCAN_FORMATS}")
        which = "its one file is not one" if len(files) == 1 else f"none of its {len(files)} files is one"
        raise VolumeError(f"{name} holds no DICOM images ({which}); {SCAN_FORMATS}")
    series: dict[str, list] = {}
    for path, header in headers:
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))  # (0020,000E)
    return series


def _stack(chosen: list[tuple[Path, Any]], series: dict[str, list], name: str, single_file: bool) -> _Stack:
    """The chosen series' images as one stack on its slice grid, every size limit checked before a pixel is read;
    VolumeError when they make no volume."""
    first = chosen[0][1]
    if _count(first.get("SamplesPerPixel")) > 1:  # (0028,0002)
        raise VolumeError(f"{name} holds colour images, and colour images are not supported; give a greyscale "
                          "CT, MR or PET series")
    # Before any frame loop: the image size, and how many images (a dynamic or multi-echo series holds several
    # stacks; the slices of the one shown are checked once it is chosen).
    count = _series_summary(chosen)["slices"]
    if count > MAX_DICOM_IMAGES:
        raise VolumeError(f"{name} holds {count:,} images in one series, more than the {MAX_DICOM_IMAGES:,} allowed; "
                          "upload one time point, echo or b-value at a time")
    check_grid((MIN_SLICES, _count(first.Rows), _count(first.Columns)), name)
    images = [image for path, header in chosen for image in _images_of(path, header, name)]
    if len(images) < MIN_SLICES:
        raise VolumeError(_too_few_images(name, series, single_file))
    images, copies = _without_copies(images)
    images, other_planes = _largest_group(images)
    stacked, other_stacks = _one_stack(images)
    if len(stacked) < MIN_SLICES <= len(images):
        raise VolumeError(f"{name}: its {len(images)} images all lie at one position, so they cannot be stacked "
                          "into a volume; export the series with its geometry or as NIfTI")
    images, positions = _sorted_along_normal(stacked)
    rows, columns = images[0].size
    check_grid((len(images), rows, columns), name)
    rounding = _rounding(images)
    grid = slice_grid(positions, rounding)
    far = None
    if grid.kind == "stacked":  # an image or a block far from the rest: the largest block alone, drawn as it lies
        block = largest_block(positions)
        if MIN_SLICES <= block.stop - block.start < len(images):
            far = (f"{len(images) - (block.stop - block.start)} image(s) of the series lie far from the other "
                   f"{block.stop - block.start} (up to "
                   f"{np.abs(positions - positions[block][[0, -1]].mean()).max():.0f} mm away) and are left out")
            images, positions = images[block], positions[block]
            grid = slice_grid(positions, rounding)
    check_grid((grid.size, rows, columns), name)  # the missing slices drawn too
    shear = _shear(images, grid.places, grid.step)
    if shear is not None:  # its frame grows to hold every slice
        check_grid((grid.size, *shear.frame(grid.size, rows, columns)), f"{name} (its tilted slices made "
                   "rectangular)")
    return _Stack(images, positions, grid, shear, rows, columns, far, copies, other_planes, other_stacks)


def _stack_notes(stack: _Stack, slices: int, interpolated: int, empty: int, meta: dict[str, Any]) -> list[str]:
    """What making the stack into a volume of `slices` slices did, in words (`interpolated` slices drawn between
    two images, `empty` shown empty, what was left out), each figure also under its key in `meta`."""
    notes = [stack.far] if stack.far else []
    gaps, step, grid = np.diff(stack.positions), stack.grid.step, stack.grid
    # Slices missing here and there (a file or two lost), or a spacing that changes (2.5 mm, then 5 mm)
    wider = np.count_nonzero(np.diff(grid.places) > 1.5)  # gaps of more than one slot (rounded positions: one)
    spread = f"slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm"
    if grid.kind == "stacked":
        meta["uneven_gaps"] = (f"{spread}; the volume is drawn with an even {step:.3g} mm spacing, so distances along "
                               "it are approximate")
    elif grid.kind == "even" and interpolated and wider <= max(MAX_MISSING_IN_A_GAP, len(gaps) // 10):
        meta["missing_slices"] = interpolated
        notes.append(f"{interpolated} slice(s) are missing from the series (gaps of up to {gaps.max():.3g} mm between "
                     f"slices {step:.3g} mm apart); each is drawn from its two neighbours, so that every slice "
                     "lies at its true position, and its caption says it was not acquired")
    elif interpolated or grid.kind == "resampled":
        placed = ("every slice at its true position" if grid.kind == "even" else
                  f"each slice within {step / 4:.2g} mm of where it was taken")
        meta["uneven_gaps"] = (f"{spread}; the series is drawn on an even {step:.3g} mm grid, {placed}, "
                               f"{interpolated} of its {slices} slices drawn between their two neighbours (each "
                               "caption says which)")
    if "uneven_gaps" in meta:
        notes.append(meta["uneven_gaps"])
    if empty:
        meta["empty_slices"] = empty
        wide = gaps[sorted(grid.empty_gaps)]
        across = f"a gap of {wide[0]:.3g} mm" if len(wide) == 1 else f"{len(wide)} gaps of up to {wide.max():.3g} mm"
        notes.append(f"the series has no slices across {across}; the {empty} slice(s) there are shown empty, at "
                     "their true place, not made up from the slices on either side")
    if stack.shear is not None:
        meta["gantry_tilt_degrees"] = round(stack.shear.tilt, 2)
        notes.append(f"the slices were acquired with a {stack.shear.tilt:.1f}° gantry tilt; each is shifted within "
                     "its plane by its table position (as dcm2niix corrects a tilt), so that coronal and sagittal "
                     "views and distances are true, along the tilted slices' own axes")
    if stack.copies:
        meta["duplicate_slices"] = stack.copies
        notes.append(f"{stack.copies} image(s) were in the upload twice; each is used once")
    if stack.other_planes:
        notes.append(f"{stack.other_planes} image(s) in another slice orientation or of another size (a localizer?) "
                     "were left out")
    if stack.other_stacks:
        notes.append(stack.other_stacks)
    return notes


def _series_meta(first) -> dict[str, Any]:
    """What the series' first header says that the viewer uses: manufacturer, series number, a PET's units, the
    window the scanner suggests, the slices' thickness, how the patient lay; never a patient identifier."""
    meta: dict[str, Any] = {
        "manufacturer": str(first.get("Manufacturer", "")),  # (0008,0070)
        "series_number": _series_number(first),
    }
    units = str(first.get("Units", "")).strip().upper()  # (0054,1001): what a PET's values measure
    if units and str(first.get("Modality", "")).upper() in ("PT", "NM"):  # (0008,0060)
        meta["units"] = PET_UNITS.get(units, units)
    for key, keyword in (("window_center", "WindowCenter"), ("window_width", "WindowWidth")):  # (0028,1050/1051)
        value = _first(first.get(keyword)) if keyword in first else None
        if value is not None:
            meta[key] = value
    thickness = _first(first.get("SliceThickness"))  # (0018,0050): overlapping reconstructions are thicker than apart
    if thickness is not None and thickness > 0:
        meta["slice_thickness_mm"] = thickness
    position = PATIENT_POSITIONS.get(str(first.get("PatientPosition", "")).strip().upper())  # (0018,5100)
    if position:
        meta["patient_position"] = position
    return meta


def _affine_ras(image: _DicomImage, step: float, top: int, left: int) -> np.ndarray:
    """The (column, row, slot) → RAS mm affine of a stack whose first image is `image`, its slots `step` mm apart
    along the normal (a tilt's shear undone), its frame grown by `top` rows above and `left` columns before it."""
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = image.orientation[:3] * image.pixel_spacing[1]  # along a row: column index grows
    affine_lps[:3, 1] = image.orientation[3:] * image.pixel_spacing[0]  # down a column: row index grows
    affine_lps[:3, 2] = _normal(image) * step
    affine_lps[:3, 3] = image.position + top * affine_lps[:3, 1] + left * affine_lps[:3, 0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def load_dicom(files: list[Path], name: str, single_file: bool = False) -> Volume:
    """The upload's scan (its series ranked first by `_series_rank`) as a Volume; VolumeError when there is
    none to stack.

    single_file: `files` is one file given as the scan itself (not found in a folder or a zip)."""
    series = _series_of(files, name, single_file)
    chosen, *others = sorted(series.values(), key=_series_rank, reverse=True)
    first = chosen[0][1]
    stack = _stack(chosen, series, name, single_file)
    rows, columns = stack.rows, stack.columns
    pixels, padded = _read_pixels(stack.images, rows, columns, name)
    if padded == pixels.size:
        raise VolumeError(f"{name}: every pixel of the series is marked as padding by its PixelPaddingValue, so it "
                          "holds no image; re-export the series, or fix that attribute")
    meta = _series_meta(first)
    pixels, drawn, empty = stack.grid.draw(pixels)
    own_padding = None  # the scan's own padding voxels, where a tilt's frame adds some of its own
    top = left = 0
    if stack.shear is not None:
        own_padding = int(np.count_nonzero(np.isnan(pixels))) - empty * rows * columns if padded else 0
        pixels, top, left = stack.shear.draw_unsheared(pixels)
    notes = _stack_notes(stack, len(pixels), len(drawn), empty, meta)
    modality = _dicom_modality(first)
    if str(first.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1" and modality in ("MR", "OT"):
        # White at the lowest value (0028,0004). CT's HU and PET's activity keep their meaning (their windows
        # decide what shows white); other images are inverted, so that they look as the scanner meant.
        np.subtract(np.nanmax(pixels) + np.nanmin(pixels), pixels, out=pixels)
        notes.append("the series is stored with white at its lowest value (MONOCHROME1); its values are inverted "
                     "so that it shows as meant")
    if padded or empty or stack.shear is not None:  # the empty slices, and a tilt's frame, are no padding of its own
        filled = _fill_padding(pixels) - empty * rows * columns
        own = filled if own_padding is None else own_padding
        if own:
            meta["padding_voxels"] = own
    units = str(first.get("Units", "")).strip().upper()
    if modality == "PT" and units in CONVERTIBLE_UNITS:  # read as PET is read: SUV, where the header allows
        factor, why_not = suv_factor(first)
        if factor is None:
            notes.append(f"the values stay in {meta['units']}, not SUV: {why_not}")
        else:
            pixels *= np.float32(factor)
            meta["suv_converted_from"], meta["units"] = meta["units"], SUV_UNITS
    if (modality == "CT" and not any(image.intercept_stated for image in stack.images)
            and float(np.nanmin(pixels)) >= 0):
        meta["hu_unlikely"] = True
        notes.append("the CT states no rescale intercept and holds no value below 0, so its values are likely not "
                     "Hounsfield units (air lies near −1000): windows and the model may read it wrongly; re-export "
                     "the series with its rescale")
    if others:
        meta["other_series"] = [_series_summary(group) for group in others]
        listed = "; ".join(("" if summary["series_number"] is None else f"series {summary['series_number']}: ")
                           + f"{summary['modality']}, {summary['slices']} image(s)" for summary in meta["other_series"])
        notes.append(f"the upload holds {len(others)} other series, not shown ({listed}); upload one series at a "
                     "time to see another")
    if notes:
        meta["notes"] = notes
    affine_ras = _affine_ras(stack.images[0], stack.grid.step, top, left)
    if drawn:  # by their index in the volume as shown, along the plane the slices were acquired in
        from nibabel.orientations import io_orientation  # as canonical_volume turns the stack

        reversed_ = io_orientation(affine_ras)[2][1] < 0
        meta["drawn_slices"] = sorted(len(pixels) - 1 - slot if reversed_ else slot for slot in drawn)
    return canonical_volume(pixels.transpose(2, 1, 0), affine_ras, modality, "dicom", name, meta)
