"""Scan loading: NIfTI, DICOM series (folder, files, zip) and M3D-style .npy, to one canonical `Volume`.

The canonical grid: `data[z, y, x]` float32 with x toward the patient's Right, y toward Anterior,
z toward Superior (RAS+), so `data[z]` is an axial slice; CT in Hounsfield units.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import VolumeError
from .limits import MAX_DICOM_FILES, MAX_SIDE, MAX_VOXEL_BYTES, MAX_ZIP_BYTES, MAX_ZIP_ENTRIES, MIN_SLICES

__all__ = ["Volume", "VolumeError", "load_volume"]


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
        """Content hash of the voxels and their spacing: equal scans share encoded features."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(self.data).view(np.uint8).reshape(-1))
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
    orientation = "".join(aff2axcodes(affine_ras))
    ornt = io_orientation(affine_ras)
    affine = affine_ras @ inv_ornt_aff(ornt, array_xyz.shape)  # voxel (x, y, z) → RAS of the reoriented grid
    data = np.ascontiguousarray(apply_orientation(array_xyz, ornt).transpose(2, 1, 0), dtype=np.float32)
    affine_zyx = affine[:, [2, 1, 0, 3]]  # the same map for (z, y, x, 1) indices
    spacing = tuple(float(s) for s in np.linalg.norm(affine_zyx[:3, :3], axis=0))
    meta = {"modality": modality, "slice_count": int(data.shape[0]),
            "spacing": [round(s, 4) for s in spacing], **meta}
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
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
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
    frames = math.prod(shape[3:])
    first_volume = (slice(None),) * 3 + (0,) * (len(shape) - 3)
    try:
        array = np.asarray(image.dataobj[first_volume], dtype=np.float32)  # lazily: only the first volume
    except Exception as error:
        raise VolumeError(f"{path.name} is damaged or truncated ({_reason(error)}); re-export or re-upload the "
                          "scan") from error
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
    finite = array[np.isfinite(array)]
    if finite.size and finite.min() <= CT_AIR_HU and finite.max() >= CT_BONE_HU:
        return "CT"
    return "OT"


# --- .npy ----------------------------------------------------------------------------------------------------

def _load_npy(path: Path) -> Volume:
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)  # header only; never unpickles
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path.name} is not a readable .npy array ({_reason(error)}); save it with numpy.save "
                          "as numbers, not objects") from error
    if not isinstance(stored, np.ndarray) or stored.dtype.kind not in "biuf":
        raise VolumeError(f"{path.name} does not hold a numeric array; save the volume with numpy.save as float32")
    if stored.ndim == 4 and stored.shape[0] == 1:
        stored = stored[0]
    if stored.ndim != 3:
        raise VolumeError(f"{path.name} has shape {stored.shape}, not (1, D, H, W) or (D, H, W); save one volume "
                          "per file")
    _check_grid(stored.shape, path.name)
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
    """A number from a DICOM value that may be multi-valued, empty or garbage (then `default`)."""
    if not isinstance(value, str | bytes | int | float):
        value = value[0] if value is not None and len(value) else None
    try:
        return float(value) if value not in (None, "", b"") else default
    except (TypeError, ValueError):
        return default


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


def _images_of(path: Path, header, name: str) -> list[_DicomImage]:
    """The 2D images of one DICOM file with their geometry; raises VolumeError when it has none."""
    frames = int(_first(header.get("NumberOfFrames"), 1) or 1)  # (0028,0008)
    images = []
    for frame in range(frames):
        if frames > 1 and "PerFrameFunctionalGroupsSequence" not in header:
            raise VolumeError(f"{name} has a multi-frame image without per-frame positions; export the series as "
                              "single-frame DICOM files or NIfTI")
        index = frame if frames > 1 else None

        def attribute(sequence: str, keyword: str, index: int | None = index) -> Any:
            return _functional(header, index, sequence, keyword)

        position = attribute("PlanePositionSequence", "ImagePositionPatient")  # (0020,0032)
        orientation = attribute("PlaneOrientationSequence", "ImageOrientationPatient")  # (0020,0037)
        spacing = attribute("PixelMeasuresSequence", "PixelSpacing")  # (0028,0030)
        if not position or not orientation or len(position) != 3 or len(orientation) != 6:
            raise VolumeError(f"{name} has images without ImagePositionPatient or ImageOrientationPatient, so they "
                              "cannot be stacked into a volume; export the series with its geometry or as NIfTI")
        if not spacing or len(spacing) != 2:
            raise VolumeError(f"{name} has images without PixelSpacing; export the series with its geometry or "
                              "as NIfTI")
        images.append(_DicomImage(
            path=path, frame=index,
            position=np.array([float(v) for v in position]),
            orientation=np.array([float(v) for v in orientation]),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            slope=_first(attribute("PixelValueTransformationSequence", "RescaleSlope"), 1.0),  # (0028,1053)
            intercept=_first(attribute("PixelValueTransformationSequence", "RescaleIntercept"), 0.0),  # (0028,1052)
        ))
    return images


def _read_headers(files: list[Path]) -> list[tuple[Path, Any]]:
    """(path, header) of the files that are DICOM images; anything else (not DICOM, SR, RT, DICOMDIR) is skipped."""
    import pydicom

    headers = []
    for path in files:
        # pydicom raises many error types on arbitrary bytes; every one means "not a DICOM image": skip it.
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        rows, columns = _first(header.get("Rows"), 0), _first(header.get("Columns"), 0)  # (0028,0010), (0028,0011)
        if rows and columns and rows > 0 and columns > 0:  # an image
            headers.append((path, header))
    return headers


def _series_summary(headers: list) -> dict[str, Any]:
    """Description, modality and image count of one series: PHI-free, no UIDs."""
    header = headers[0][1]
    return {"description": str(header.get("SeriesDescription", "")), "modality": _dicom_modality(header),
            "slices": sum(int(_first(h.get("NumberOfFrames"), 1) or 1) for _, h in headers)}


def _dicom_modality(header) -> str:
    modality = str(header.get("Modality", "")).upper()  # (0008,0060)
    return modality if modality in ("CT", "MR", "PT") else "OT"


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


def _load_dicom(files: list[Path], name: str) -> Volume:
    import pydicom

    headers = _read_headers(files)
    if not headers:
        raise VolumeError(f"{name} holds no DICOM images ({len(files)} file(s) skipped); {_SCAN_FORMATS}")
    series: dict[str, list] = {}
    for path, header in headers:
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))  # (0020,000E)
    ranked = sorted(series.values(), key=lambda group: _series_summary(group)["slices"], reverse=True)
    chosen, others = ranked[0], ranked[1:]
    first = chosen[0][1]
    if int(first.get("SamplesPerPixel", 1) or 1) > 1:  # (0028,0002)
        raise VolumeError(f"{name} holds colour images, and colour images are not supported; give a greyscale "
                          "CT, MR or PET series")
    rows, columns = int(first.Rows), int(first.Columns)
    if any((int(h.Rows), int(h.Columns)) != (rows, columns) for _, h in chosen):
        raise VolumeError(f"{name} mixes images of different sizes in one series; export the series again")
    _check_grid((max(MIN_SLICES, _series_summary(chosen)["slices"]), rows, columns), name)  # before any frame loop
    images = [image for path, header in chosen for image in _images_of(path, header, name)]
    if any(not np.allclose(image.orientation, images[0].orientation, atol=1e-3) for image in images):
        raise VolumeError(f"{name} mixes slice orientations in one series; export each orientation as its own "
                          "series")
    images, positions, duplicates = _sorted_along_normal(images)
    _check_grid((len(images), rows, columns), name)

    pixels = np.empty((len(images), rows, columns), dtype=np.float32)  # (slices, rows, columns)
    decoded: dict[Path, np.ndarray] = {}
    for slot, image in enumerate(images):
        if image.path not in decoded:
            decoded.clear()  # one file's pixels at a time: frames of one file are contiguous after sorting, mostly
            try:
                decoded[image.path] = pydicom.dcmread(image.path).pixel_array
            except Exception as error:  # decoders raise many types for corrupt or unsupported pixel data
                raise VolumeError(f"{name}: the pixel data of {image.path.name} cannot be decoded "
                                  f"({_reason(error)}); export the series uncompressed") from error
        frame = decoded[image.path] if image.frame is None else decoded[image.path][image.frame]
        if frame.shape != (rows, columns):
            raise VolumeError(f"{name}: {image.path.name} holds pixels of shape {frame.shape}, not {rows}×{columns}; "
                              "export the series again")
        pixels[slot] = frame * np.float32(image.slope) + np.float32(image.intercept)

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
