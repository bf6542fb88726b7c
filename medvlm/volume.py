"""Scan loading: NIfTI, DICOM series (folder, files, zip) and M3D-style .npy, to one canonical `Volume`.

The canonical grid: `data[z, y, x]` float32 with x toward the patient's Right, y toward Anterior,
z toward Superior (RAS+), so `data[z]` is an axial slice; CT in Hounsfield units.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import struct
import tempfile
import tokenize
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import VolumeError
from .limits import (
    COMPRESSION_CHECK_BYTES,
    MAX_COMPRESSION_RATIO,
    MAX_DICOM_FILES,
    MAX_SIDE,
    MAX_VOXEL_BYTES,
    MAX_ZIP_BYTES,
    MAX_ZIP_DIRECTORY_BYTES,
    MAX_ZIP_ENTRIES,
    MIN_SLICES,
)

__all__ = ["Volume", "VolumeError", "load_volume"]

FINGERPRINT_CHUNK = 16 * 2**20  # bytes of voxels per hashing thread's task


@dataclass
class Volume:
    """One 3D scan on the canonical RAS+ grid.

    data: float32 (Z, Y, X); spacing: (z, y, x) in mm; affine: 4×4 mapping (z, y, x, 1) voxel
    indices to RAS millimetres; modality: "CT", "MR", "PT" or "OT"; source: "nifti", "dicom"
    or "npy"; orientation: axis codes of the file as stored (e.g. "LPS"); meta: PHI-free facts.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    source: str
    orientation: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the voxels and their spacing: equal scans share encoded features.

        SHA-256 (hardware-accelerated on current x86 and ARM CPUs) of each FINGERPRINT_CHUNK bytes of voxels,
        in threads (hashlib lets go of the GIL), then BLAKE2b of those digests: a 300×512×512 CT hashes on
        every core at once.
        """
        voxels = np.ascontiguousarray(self.data).view(np.uint8).reshape(-1)
        chunks = [voxels[start:start + FINGERPRINT_CHUNK] for start in range(0, voxels.size, FINGERPRINT_CHUNK)]
        with ThreadPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1) or 1) as pool:
            chunk_digests = list(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), chunks))
        digest = hashlib.blake2b(b"".join(chunk_digests), digest_size=16)
        digest.update(np.asarray(self.spacing, dtype=np.float64).tobytes())
        digest.update(str(self.data.shape).encode())
        return digest.hexdigest()


def load_volume(src: str | Path | list[str | Path]) -> Volume:
    """Read a NIfTI file, a DICOM series (folder, list of files, .zip) or a .npy array.

    NIfTI (.nii, .nii.gz): any stored orientation is brought to RAS+; a 4D (or higher) file gives its first
    volume and meta["frames"] / meta["note"] say so. Modality: the one `writers.save_nifti` stored in the
    header description, else "CT" when the values span air and bone in HU (min ≤ -500 and max ≥ 300),
    else "OT".
    DICOM: the series with most images (meta["other_series"] lists the rest), slices sorted by position
    along the slice normal, spacing from those positions, rescale slope/intercept applied (CT in HU).
    .npy (M3D style, (1, D, H, W) or (D, H, W), values in [0, 1]): `arr[d]` is an axial slice in display
    order (row 0 anterior, column 0 the patient's right), d increasing toward superior; spacing 1 mm,
    modality "OT", stored orientation "LPS".
    A folder, list or zip holding exactly one NIfTI or .npy file loads that file.

    Raises VolumeError, with a message that says what was wrong, for anything it cannot read. Size
    limits (medvlm.limits) are checked from headers before any pixel data is read.
    """
    if isinstance(src, list | tuple):
        if len(src) == 1:
            return load_volume(src[0])
        paths = [Path(p) for p in src]
        for path in paths:
            _require_exists(path)
        return _load_files([file for path in paths for file in _listed_files(path)], "the given files")
    path = Path(src)
    _require_exists(path)
    if path.is_dir():
        return _load_files(_listed_files(path), f"folder {path.name}")
    kind = _scan_kind(path)
    if kind == "zip":
        with tempfile.TemporaryDirectory(prefix="medvlm-zip-") as folder:
            return _load_files(_extract_zip(path, Path(folder)), path.name)
    if kind == "nifti":
        return _load_nifti(path)
    if kind == "npy":
        return _load_npy(path)
    return _load_dicom([path], path.name)


# --- shared: limits, orientation, dispatch -------------------------------------------------------------------

_SCAN_FORMATS = "give a NIfTI (.nii, .nii.gz), an M3D .npy, or a DICOM series (a folder, its files or a .zip)"


def _reason(error: BaseException) -> str:
    """The first line of a library's error, short enough to sit inside our one-sentence message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:160]


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise VolumeError(f"{path} does not exist; check the path and try again")


def _scan_kind(path: Path) -> str:
    """"nifti", "npy", "zip" or "dicom" (anything else: DICOM files often have no extension)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".zip"):
        return "zip"
    return "dicom"


def _check_grid(shape: tuple[int, ...], name: str) -> None:
    """Refuse, before pixel data is read, a grid that is 2D, has a side over MAX_SIDE or too many voxels."""
    if len(shape) < 3 or min(shape) < MIN_SLICES:
        raise VolumeError(f"{name} is a 2D image of shape {tuple(shape)}, not a volume; give a 3D scan with at "
                          f"least {MIN_SLICES} slices")
    if max(shape) > MAX_SIDE:
        raise VolumeError(f"{name} has {max(shape)} voxels along one side, more than the {MAX_SIDE} allowed; "
                          "downsample or crop the scan first")
    if math.prod(shape) * 4 > MAX_VOXEL_BYTES:
        raise VolumeError(f"{name} has {math.prod(shape):,} voxels, more than the {MAX_VOXEL_BYTES // 4:,} "
                          "allowed; downsample or crop the scan first")


def _check_compression(unpacked_bytes: int, stored_bytes: int, name: str) -> None:
    """Refuse a gzip or zip bomb: data that unpacks to far more than real scans compress from."""
    if unpacked_bytes > COMPRESSION_CHECK_BYTES and unpacked_bytes > MAX_COMPRESSION_RATIO * max(stored_bytes, 1):
        raise VolumeError(f"{name} unpacks to {unpacked_bytes:,} bytes from only {stored_bytes:,}, more than the "
                          f"{MAX_COMPRESSION_RATIO}-fold no real scan compresses to; re-export the scan")


def _replace_non_finite(data: np.ndarray, name: str) -> dict[str, Any]:
    """Set NaN and ±Inf voxels, in place, to the lowest finite value (0 when there is none); meta saying so."""
    finite = np.isfinite(data)
    count = int(finite.size - np.count_nonzero(finite))
    if count == 0:
        return {}
    data[~finite] = np.nan
    fill = float(np.fmin.reduce(data, axis=None)) if count < data.size else 0.0  # fmin skips NaN: no copy
    data[~finite] = fill
    return {"non_finite_voxels": count,
            "notes": [f"{count:,} voxels of {name} were not numbers (NaN or infinite) and are shown as {fill:g}"]}


def _volume(array_xyz: np.ndarray, affine_ras: np.ndarray, modality: str, source: str, name: str,
            meta: dict[str, Any]) -> Volume:
    """The one orientation code path of every format: a stored voxel array with its voxel→RAS affine
    (both in the stored axis order) becomes the canonical RAS+ (Z, Y, X) Volume.

    Oblique affines go to the closest canonical axes; `affine` keeps the true (oblique) geometry.
    """
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

    zooms = np.linalg.norm(affine_ras[:3, :3], axis=0)
    if not (np.all(np.isfinite(affine_ras)) and np.all(zooms > 0)):
        raise VolumeError(f"{name} has a zero, negative or missing voxel spacing; fix the header's spacing or "
                          "re-export the scan")
    codes = aff2axcodes(affine_ras)
    if None in codes or abs(np.linalg.det(affine_ras[:3, :3])) < 1e-3 * math.prod(zooms):
        raise VolumeError(f"{name} has voxel axes that do not span 3D space (a degenerate orientation); fix the "
                          "header's orientation or re-export the scan")
    orientation = "".join(codes)
    ornt = io_orientation(affine_ras)
    affine = affine_ras @ inv_ornt_aff(ornt, array_xyz.shape)  # voxel (x, y, z) → RAS of the reoriented grid
    data = np.ascontiguousarray(apply_orientation(array_xyz, ornt).transpose(2, 1, 0), dtype=np.float32)
    affine_zyx = affine[:, [2, 1, 0, 3]]  # the same map for (z, y, x, 1) indices
    spacing = tuple(float(s) for s in np.linalg.norm(affine_zyx[:3, :3], axis=0))
    repaired = _replace_non_finite(data, name)
    meta = {"modality": modality, "slice_count": int(data.shape[0]),
            "spacing": [round(s, 4) for s in spacing], **meta, **repaired,
            "notes": [*meta.get("notes", []), *repaired.get("notes", [])]}
    if not meta["notes"]:
        del meta["notes"]
    return Volume(data=data, spacing=spacing, affine=affine_zyx, modality=modality, source=source,
                  orientation=orientation, meta=meta)


def _listed_files(path: Path) -> list[Path]:
    """A file itself, or every file under a folder (recursively), at most MAX_DICOM_FILES of them."""
    if not path.is_dir():
        return [path]
    files = []
    for file in path.rglob("*"):
        if file.is_file():
            files.append(file)
            if len(files) > MAX_DICOM_FILES:
                raise VolumeError(f"folder {path.name} holds more than {MAX_DICOM_FILES} files; upload one "
                                  "series at a time")
    return sorted(files)


def _load_files(files: list[Path], name: str) -> Volume:
    """Files of one upload: its single NIfTI or .npy file if it holds one, else a DICOM series."""
    if len(files) > MAX_DICOM_FILES:
        raise VolumeError(f"{name} holds {len(files)} files, more than the {MAX_DICOM_FILES} allowed; upload one "
                          "series at a time")
    scans = [file for file in files if _scan_kind(file) in ("nifti", "npy")]
    if len(scans) > 1:
        raise VolumeError(f"{name} holds {len(scans)} NIfTI or .npy files; upload one scan at a time")
    if scans:
        return _load_nifti(scans[0]) if _scan_kind(scans[0]) == "nifti" else _load_npy(scans[0])
    return _load_dicom(files, name)


def _extract_zip(path: Path, folder: Path) -> list[Path]:
    """Extract a zip's members into `folder` (a temporary directory) under numbered names, after checking
    the entry count and total size from the zip's directory; names with ".." or absolute paths are skipped.
    """
    _check_zip_directory(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise VolumeError(f"{path.name} is not a readable zip file ({_reason(error)}); zip the scan again and "
                          "re-upload it") from error
    with archive:
        members = [member for member in archive.infolist() if not member.is_dir()]
        if len(members) > MAX_ZIP_ENTRIES:
            raise VolumeError(f"{path.name} holds {len(members)} files, more than the {MAX_ZIP_ENTRIES} allowed; "
                              "upload one series at a time")
        total = sum(member.file_size for member in members)
        if total > MAX_ZIP_BYTES:
            raise VolumeError(f"{path.name} unpacks to {total:,} bytes, more than the {MAX_ZIP_BYTES:,} allowed; "
                              "upload a smaller scan")
        for member in members:
            _check_compression(member.file_size, member.compress_size, f"{path.name} ({member.filename[:60]})")
        files = []
        for number, member in enumerate(members):
            name = PurePosixPath(member.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in name.parts[0]:
                continue
            suffix = ".nii.gz" if name.name.lower().endswith(".nii.gz") else name.suffix.lower()[:8]
            target = folder / f"{number:05d}{suffix}"  # our own name: nothing can land outside `folder`
            try:
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as error:
                raise VolumeError(f"{path.name} has a damaged or encrypted member ({_reason(error)}); zip the scan "
                                  "again without a password and re-upload it") from error
            files.append(target)
    return files


def _check_zip_directory(path: Path) -> None:
    """Refuse, from the zip's end record alone, a central directory too large to list (millions of entries)."""
    try:
        with open(path, "rb") as handle:
            end_record = zipfile._EndRecData(handle)  # the stdlib's own reader of the end record (zip64 too)
    except (OSError, ValueError, EOFError, struct.error):
        return  # unreadable: zipfile.ZipFile says so next
    if end_record is None:
        return
    entries, directory_bytes = end_record[zipfile._ECD_ENTRIES_TOTAL], end_record[zipfile._ECD_SIZE]
    if entries > MAX_ZIP_ENTRIES:
        raise VolumeError(f"{path.name} holds {entries:,} files, more than the {MAX_ZIP_ENTRIES} allowed; upload one "
                          "series at a time")
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise VolumeError(f"{path.name} has a {directory_bytes:,}-byte list of contents, more than the "
                          f"{MAX_ZIP_DIRECTORY_BYTES:,} allowed; upload one series at a time")


# --- NIfTI ---------------------------------------------------------------------------------------------------

CT_AIR_HU, CT_BONE_HU = -500.0, 300.0  # NIfTI CT guess: values reach below air's and above bone's HU


def _load_nifti(path: Path) -> Volume:
    import nibabel as nib

    # nibabel raises many error types for broken or hostile files; each means "not a readable NIfTI".
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)  # from the header: no voxel read yet
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:
        raise VolumeError(f"{path.name} is not a readable NIfTI file ({_reason(error)}); check that the upload "
                          "finished, or re-export the scan") from error
    _check_grid(shape[:3] if len(shape) >= 3 else shape, path.name)
    if path.name.lower().endswith(".gz"):
        voxel_bytes = math.prod(shape[:3]) * image.header.get_data_dtype().itemsize
        _check_compression(voxel_bytes, path.stat().st_size, path.name)
    frames = math.prod(shape[3:])
    first_volume = (slice(None),) * 3 + (0,) * (len(shape) - 3)
    try:
        array = np.asarray(image.dataobj[first_volume])  # lazily: only the first volume
    except Exception as error:
        raise VolumeError(f"{path.name} is damaged or truncated ({_reason(error)}); re-export or re-upload the "
                          "scan") from error
    if array.dtype.kind not in "iu":  # integers stay as stored until `_volume` reorients them into float32
        array = array.astype(np.float32, copy=False)
    meta: dict[str, Any] = {}
    if frames > 1:
        meta["frames"] = frames
        meta["note"] = f"4D input: the first of {frames} volumes is shown"
    return _volume(array, affine, _nifti_modality(image.header, array), "nifti", path.name, meta)


def _nifti_modality(header, array: np.ndarray) -> str:
    """The modality `save_nifti` wrote in the description, else "CT" when values span air to bone, else "OT"."""
    from .writers import MODALITY_TAG

    description = bytes(np.asarray(header.get("descrip", b""))).decode("latin-1").strip("\x00 ")
    stored = description.removeprefix(MODALITY_TAG)
    if description.startswith(MODALITY_TAG) and stored in ("CT", "MR", "PT", "OT"):
        return stored
    lowest, highest = np.fmin.reduce(array, axis=None), np.fmax.reduce(array, axis=None)  # skip NaN, copy nothing
    if not (np.isfinite(lowest) and np.isfinite(highest)):  # ±Inf voxels: the rare case worth a masked copy
        finite = array[np.isfinite(array)]
        lowest, highest = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    return "CT" if lowest <= CT_AIR_HU and highest >= CT_BONE_HU else "OT"


# --- .npy ----------------------------------------------------------------------------------------------------

def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header alone; VolumeError when it is not one."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle, max_header_size=10_000)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError, tokenize.TokenError) as error:
        raise VolumeError(f"{path.name} is not a readable .npy array ({_reason(error)}); save it with numpy.save "
                          "as numbers, not objects") from error
    return tuple(shape), dtype


def _load_npy(path: Path) -> Volume:
    shape, dtype = _npy_header(path)
    if dtype.kind not in "biuf":
        raise VolumeError(f"{path.name} does not hold a numeric array; save the volume with numpy.save as float32")
    shape = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if len(shape) != 3:
        raise VolumeError(f"{path.name} has shape {shape}, not (1, D, H, W) or (D, H, W); save one volume "
                          "per file")
    _check_grid(shape, path.name)  # from the header: before any voxel is read
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickles
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path.name} is not a readable .npy array ({_reason(error)}); it may be truncated, save "
                          "it again with numpy.save") from error
    stored = stored.reshape(shape)
    display = np.array(stored, dtype=np.float32)  # (D, H, W): row 0 anterior, column 0 the patient's right
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0])  # stored (column, row, slice) run toward L, P, S
    return _volume(display.transpose(2, 1, 0), affine_ras, "OT", "npy", path.name, {})


# --- DICOM ---------------------------------------------------------------------------------------------------

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


def _first(value: Any, default: float | None = None) -> float | None:
    """A finite number from a DICOM value that may be multi-valued, empty or garbage (then `default`)."""
    numbers = _numbers(value)
    return numbers[0] if numbers else default


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
    if np.linalg.norm(np.cross(row_cosines, column_cosines)) < 0.5 * np.linalg.norm(row_cosines) * np.linalg.norm(
            column_cosines) or not np.linalg.norm(row_cosines) or not np.linalg.norm(column_cosines):
        raise VolumeError(f"{name} has an ImageOrientationPatient whose row and column directions are not "
                          "perpendicular unit vectors; re-export the scan")
    unit = np.concatenate([row_cosines / np.linalg.norm(row_cosines), column_cosines / np.linalg.norm(column_cosines)])
    return np.array(position), unit, (spacing[0], spacing[1])


def _images_of(path: Path, header, name: str) -> list[_DicomImage]:
    """The 2D images of one DICOM file with their geometry; raises VolumeError when it has none."""
    frames = _frame_count(header)
    if frames > 1 and "PerFrameFunctionalGroupsSequence" not in header:
        return _legacy_frames(path, header, frames, name)
    images = []
    for frame in range(frames):
        index = frame if frames > 1 else None

        def attribute(sequence: str, keyword: str, index: int | None = index) -> Any:
            return _functional(header, index, sequence, keyword)

        position, orientation, spacing = _geometry(
            attribute("PlanePositionSequence", "ImagePositionPatient"),  # (0020,0032)
            attribute("PlaneOrientationSequence", "ImageOrientationPatient"),  # (0020,0037)
            attribute("PixelMeasuresSequence", "PixelSpacing"), name)  # (0028,0030)
        images.append(_DicomImage(
            path=path, frame=index, position=position, orientation=orientation, pixel_spacing=spacing,
            slope=_first(attribute("PixelValueTransformationSequence", "RescaleSlope"), 1.0),  # (0028,1053)
            intercept=_first(attribute("PixelValueTransformationSequence", "RescaleIntercept"), 0.0),  # (0028,1052)
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
    slope, intercept = _first(header.get("RescaleSlope"), 1.0), _first(header.get("RescaleIntercept"), 0.0)
    scale = _first(header.get("DoseGridScaling"))  # (3004,000E): RT dose in Gy
    slope = slope * scale if scale else slope
    return [_DicomImage(path=path, frame=frame, position=position + (offset - offsets[0]) * normal,
                        orientation=orientation, pixel_spacing=spacing, slope=slope, intercept=intercept)
            for frame, offset in enumerate(offsets)]


def _read_headers(files: list[Path]) -> list[tuple[Path, Any]]:
    """(path, header) of the files that are DICOM images; anything else (not DICOM, SR, RT, DICOMDIR) is skipped."""
    import pydicom

    headers = []
    for path in files:
        # pydicom raises many error types on arbitrary bytes; every one means "not a DICOM image": skip it.
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            for _ in header.iterall():  # convert every (lazily read) element now, so a broken one skips the file
                pass
        except Exception:
            continue
        if _count(header.get("Rows")) and _count(header.get("Columns")):  # (0028,0010), (0028,0011): an image
            headers.append((path, header))
    return headers


def _series_summary(headers: list) -> dict[str, Any]:
    """Description, modality and image count of one series: PHI-free, no UIDs."""
    header = headers[0][1]
    return {"description": str(header.get("SeriesDescription", "")), "modality": _dicom_modality(header),
            "slices": sum(_frame_count(h) for _, h in headers)}


def _dicom_modality(header) -> str:
    modality = str(header.get("Modality", "")).upper()  # (0008,0060)
    return modality if modality in ("CT", "MR", "PT") else "OT"


def _most_common_orientation(images: list[_DicomImage]) -> tuple[list[_DicomImage], int]:
    """The images that share the series' most common slice orientation (a localizer's other planes are
    dropped): (those images, how many were dropped)."""
    groups: dict[tuple, list[_DicomImage]] = {}
    for image in images:
        groups.setdefault(tuple(np.round(image.orientation, 2) + 0.0), []).append(image)  # + 0.0: no -0.0 key
    largest = max(groups.values(), key=len)
    return largest, len(images) - len(largest)


def _sorted_along_normal(images: list[_DicomImage]) -> tuple[list[_DicomImage], np.ndarray, int]:
    """Images sorted by position along the slice normal, duplicates dropped: (images, positions, duplicates)."""
    row_cosines, column_cosines = images[0].orientation[:3], images[0].orientation[3:]
    normal = np.cross(row_cosines, column_cosines)
    positions = np.array([image.position @ normal for image in images])
    order = np.argsort(positions, kind="stable")
    kept, kept_positions = [], []
    for index in order:
        if kept_positions and abs(positions[index] - kept_positions[-1]) < 1e-3:
            continue
        kept.append(images[index])
        kept_positions.append(positions[index])
    return kept, np.array(kept_positions), len(images) - len(kept)


def _read_pixels(images: list[_DicomImage], rows: int, columns: int, name: str) -> np.ndarray:
    """The images' pixels with rescale applied, float32 (slices, rows, columns); each file decoded once, one at
    a time, whatever order its frames take in the stack."""
    import pydicom

    pixels = np.empty((len(images), rows, columns), dtype=np.float32)
    slots: dict[Path, list[tuple[int, _DicomImage]]] = {}
    for slot, image in enumerate(images):
        slots.setdefault(image.path, []).append((slot, image))
    for path, placed in slots.items():
        try:
            decoded = pydicom.dcmread(path).pixel_array
        except Exception as error:  # decoders raise many types for corrupt or unsupported pixel data
            raise VolumeError(f"{name}: the pixel data of {path.name} cannot be decoded ({_reason(error)}); export "
                              "the series uncompressed") from error
        for slot, image in placed:
            frame = decoded if image.frame is None else decoded[image.frame] if image.frame < len(decoded) else None
            if frame is None or frame.shape != (rows, columns):
                shape = "too few frames" if frame is None else f"pixels of shape {frame.shape}"
                raise VolumeError(f"{name}: {path.name} holds {shape}, not {rows}×{columns} per image; export the "
                                  "series again")
            pixels[slot] = frame * np.float32(image.slope) + np.float32(image.intercept)
    return pixels


def _load_dicom(files: list[Path], name: str) -> Volume:
    headers = _read_headers(files)
    if not headers:
        raise VolumeError(f"{name} holds no DICOM images ({len(files)} file(s) skipped); {_SCAN_FORMATS}")
    series: dict[str, list] = {}
    for path, header in headers:
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))  # (0020,000E)
    ranked = sorted(series.values(), key=lambda group: _series_summary(group)["slices"], reverse=True)
    chosen, others = ranked[0], ranked[1:]
    first = chosen[0][1]
    if _count(first.get("SamplesPerPixel")) > 1:  # (0028,0002)
        raise VolumeError(f"{name} holds colour images, and colour images are not supported; give a greyscale "
                          "CT, MR or PET series")
    rows, columns = _count(first.Rows), _count(first.Columns)
    if any((_count(h.Rows), _count(h.Columns)) != (rows, columns) for _, h in chosen):
        raise VolumeError(f"{name} mixes images of different sizes in one series; export the series again")
    _check_grid((max(MIN_SLICES, _series_summary(chosen)["slices"]), rows, columns), name)  # before any frame loop
    images = [image for path, header in chosen for image in _images_of(path, header, name)]
    images, other_orientations = _most_common_orientation(images)
    images, positions, duplicates = _sorted_along_normal(images)
    if len(images) < MIN_SLICES <= len(images) + duplicates:
        raise VolumeError(f"{name}: its {len(images) + duplicates} images all lie at one position, so they cannot "
                          "be stacked into a volume; export the series with its geometry or as NIfTI")
    _check_grid((len(images), rows, columns), name)
    pixels = _read_pixels(images, rows, columns, name)

    meta: dict[str, Any] = {
        "manufacturer": str(first.get("Manufacturer", "")),  # (0008,0070)
        "series_description": str(first.get("SeriesDescription", "")),  # (0008,103E)
    }
    for key, keyword in (("window_center", "WindowCenter"), ("window_width", "WindowWidth")):  # (0028,1050/1051)
        value = _first(first.get(keyword)) if keyword in first else None
        if value is not None:
            meta[key] = value
    step = float(np.median(np.diff(positions)))
    gaps = np.diff(positions)
    if np.any(np.abs(gaps - step) > 0.1 * step):
        meta["uneven_gaps"] = (f"slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm (a missing slice?); "
                               f"the volume is drawn with an even {step:.3g} mm spacing")
    if duplicates:
        meta["duplicate_slices"] = duplicates
    if other_orientations:
        meta["notes"] = [f"{other_orientations} image(s) in another slice orientation (a localizer?) were left out"]
    if others:
        meta["other_series"] = [_series_summary(group) for group in others]

    row_cosines, column_cosines = images[0].orientation[:3], images[0].orientation[3:]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosines * images[0].pixel_spacing[1]  # along a row: column index grows
    affine_lps[:3, 1] = column_cosines * images[0].pixel_spacing[0]  # down a column: row index grows
    affine_lps[:3, 2] = np.cross(row_cosines, column_cosines) * step
    affine_lps[:3, 3] = images[0].position
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    return _volume(pixels.transpose(2, 1, 0), affine_ras, _dicom_modality(first), "dicom", name, meta)
