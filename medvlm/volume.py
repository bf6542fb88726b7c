"""Scan loading: NIfTI, DICOM series (folder, files, zip) and M3D-style .npy, to one canonical `Volume`.

The canonical grid: `data[z, y, x]` float32 with x toward the patient's Right, y toward Anterior,
z toward Superior (RAS+), so `data[z]` is an axial slice; CT in Hounsfield units (`Volume.units` says where not).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import struct
import tempfile
import time
import tokenize
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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

__all__ = ["MODALITIES", "Volume", "VolumeError", "load_volume"]

MODALITIES = ("CT", "MR", "PT", "OT")  # what a Volume can be read as: CT in HU, MR, PET, other
PET_UNIT_KEYS = ("units", "suv_converted_from")  # meta that says what a PET's values measure (dicom.py, suv.py)
FINGERPRINT_CHUNK = 16 * 2**20  # bytes of voxels per hashing thread's task
OBLIQUE_NOTE_DEGREES = 3.0  # a scan whose axes lie further than this from the body's is said to be oblique
ZIP_FOLDER_PREFIX = "medvlm-zip-"  # a zip's files while its series is read, in the system's temporary folder


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

    @property
    def units(self) -> str | None:
        """What the values measure: "HU" for a CT (None where its header makes that unlikely, with a note saying
        so: `meta["hu_unlikely"]`), a PET's "Bq/mL" or "SUV (g/mL)" where the file states it; None where unstated."""
        if self.modality == "CT":
            return None if self.meta.get("hu_unlikely") else "HU"
        return self.meta.get("units")

    @property
    def spacing_known(self) -> bool:
        """Whether the file stored its voxel spacing; an M3D .npy does not, and its `spacing` is 1 mm by convention."""
        return bool(self.meta.get("spacing_known", True))

    def as_modality(self, modality: str) -> Volume:
        """The same scan read as another modality, its voxels shared: for a file that does not say which it is (a
        NIfTI: `meta["modality_guessed"]`) or says it wrongly. The windows, the model's input and the fingerprint
        follow the modality; `meta["modality_chosen"]` says it was chosen (the app's scan card says so), and the
        guess's note goes. Chosen as CT, values with none below 0 (no air: a CT stored with an offset) are said to
        be likely not HU (`meta["hu_unlikely"]`), as a DICOM CT's are. Raises VolumeError for a modality not in
        MODALITIES."""
        if modality not in MODALITIES:
            raise VolumeError(f"{str(modality)[:20]!r} is not a modality MedVLM 3D reads; use CT, MR, PT (PET) or OT "
                              "(other)")
        if modality == self.modality:
            return self
        meta = {key: value for key, value in self.meta.items() if key != "modality_guessed"}
        meta["notes"] = [note for note in self.meta.get("notes", [])
                         if note not in (*GUESSED_MODALITY.values(), NOT_HU_CHOSEN)]
        meta["modality_chosen"] = True
        if NOT_HU_CHOSEN in self.meta.get("notes", []):  # said when it was chosen as CT: not a fact of the file
            meta.pop("hu_unlikely", None)
        if modality == "CT" and not meta.get("hu_unlikely") and float(np.nanmin(self.data)) >= 0:  # no air in HU
            meta["hu_unlikely"] = True
            meta["notes"].append(NOT_HU_CHOSEN)
        if "modality" in meta:
            meta["modality"] = modality
        # A PET's Bq/mL or SUV is not what another modality's values measure: kept aside, and back when the scan is
        # read as PET again.
        if modality != "PT":
            parked = {key: meta.pop(key) for key in PET_UNIT_KEYS if key in meta}
            if parked:
                meta["pet_units"] = parked
        else:
            meta.update(meta.pop("pet_units", {}))
        return replace(self, modality=modality, meta=meta)

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the voxels, their spacing and modality: equal scans share encoded features.

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
        # What else the model's input depends on: the same voxels as CT (windows) or MR (percentiles), or as an
        # M3D .npy (its slices kept) and a 1 mm NIfTI (4 mm slabs), are other scans to it.
        digest.update(f"{self.data.shape} {self.modality} {self.spacing_known}".encode())
        return digest.hexdigest()


def load_volume(src: str | Path | list[str | Path]) -> Volume:
    """Read a NIfTI file, a DICOM series (folder, list of files, .zip) or a .npy array.

    NIfTI (.nii, .nii.gz): any stored orientation is brought to RAS+; a 4D (or higher) file gives its first
    volume and meta["frames"] / meta["notes"] say so. Modality: the one `writers.save_nifti` stored in the
    header description, else "CT" when the values span air and bone in HU (min ≤ -500 and max ≥ 300),
    else "OT".
    DICOM (`medvlm.dicom`): the scan's series (one that stacks, CT, MR or PET before others such as an RT dose
    grid, then most images; meta["other_series"] lists the rest), one stack of it (one echo, b-value or time
    point), slices sorted by position along the slice normal, each kept at its true position on an even grid
    (one or two missing slices drawn from their neighbours, a wider gap shown empty, a spacing that changes
    drawn at the finest one; a tilted gantry's sheared stack made rectangular, each slice shifted within its
    plane), rescale slope/intercept applied (CT in HU), pixels marked as
    padding (PixelPaddingValue) set to the scan's lowest value (air on a CT).
    .npy (M3D style, (1, D, H, W) or (D, H, W), values in [0, 1]): `arr[d]` is an axial slice in display
    order (row 0 anterior, column 0 the patient's right), d increasing toward superior; modality "OT", stored
    orientation "LPS"; no spacing is stored (M3D resampled every scan to one shape), so `spacing` is 1 mm and
    `spacing_known` False.
    A folder, list or zip holding exactly one NIfTI or .npy file loads that file. Files that operating
    systems leave beside a scan (macOS `__MACOSX/` and `._*`, `.DS_Store`, `Thumbs.db`) are ignored.
    meta["notes"] holds one sentence for each thing a reader of the scan should know (what was left out,
    uneven gaps, tilt); they never name the file or the patient.

    Raises VolumeError, with a message that says what was wrong, for anything it cannot read. Size
    limits (medvlm.limits) are checked from headers before any pixel data is read.
    """
    if isinstance(src, list | tuple):
        if len(src) == 1:
            return load_volume(src[0])
        paths = [Path(p) for p in src]
        for path in paths:
            _require_exists(path)
        files = [file for path in paths for file in listed_files(path) if not _is_system_file(Path(file.name))]
        return _load_files(files, "the upload", zip_alone=True)
    path = Path(src)
    _require_exists(path)
    if path.is_dir():
        return _load_files(listed_files(path), f"folder {path.name}", zip_alone=True)
    kind = _scan_kind(path)
    if kind == "zip":
        with tempfile.TemporaryDirectory(prefix=ZIP_FOLDER_PREFIX) as folder:
            return _load_files(_extract_zip(path, Path(folder)), path.name)
    if kind == "nifti":
        return _load_nifti(path)
    if kind == "npy":
        return _load_npy(path)
    from .dicom import load_dicom

    return load_dicom([path], path.name, single_file=True)


# --- shared: limits, orientation, dispatch -------------------------------------------------------------------

def remove_stale_zip_folders(older_than: float) -> list[Path]:
    """Delete the folders a zip was extracted into by a process killed while reading it (they hold the series'
    files, patient names in their headers), once untouched for `older_than` seconds. Returns them."""
    cutoff = time.time() - older_than
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{ZIP_FOLDER_PREFIX}*"):
        try:
            if folder.is_dir() and not folder.is_symlink() and folder.lstat().st_mtime < cutoff:
                shutil.rmtree(folder)
                removed.append(folder)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


SCAN_FORMATS = "give a NIfTI (.nii, .nii.gz), an M3D .npy, or a DICOM series (a folder, its files or a .zip)"


# A file path inside a library's message, whose folders are the server's business (an upload's temporary
# folder means nothing to the person who sent it) or the patient's (a zip's folder named for the patient, as PACS
# exports name them): POSIX or Windows (a message may double its backslashes), quoted (then it may hold spaces;
# relative, as a zip's member, or absolute) or bare and absolute, at least two parts deep; never a URL's path.
_QUOTED_PATH = re.compile(r"""(['"])(?![A-Za-z][\w+.-]*://)((?:[A-Za-z]:)?[/\\]{0,2}[^'"/\\]+(?:[/\\]{1,2}[^'"/\\]+)+)\1""")
_BARE_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:)?(?:[/\\]{1,2}[^\s'\"/\\:]+){2,}")
# "File scan.nii.gz is not a gzip file": our sentence around the reason has named the file already
_FILE_AS_SUBJECT = re.compile(r"^File (?:'[^']+'|.+?) (?=(?:is|was|has|does|cannot|could)\b)")


def _file_name(path: str) -> str:
    return re.split(r"[/\\]+", path)[-1]


def error_reason(error: BaseException) -> str:
    """The first line of a library's error (and the next, where the first ends in a colon), short enough to sit
    inside our one-sentence message; a file path in it is cut to the file's name, and a reason that starts by
    naming the file ("File scan.nii.gz is not …") calls it "the file", as the message names it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if text.endswith(":") and len(lines) > 1:  # "... raised by all available plugins:" and the reason below it
        text = f"{text} {lines[1]}"
    text = _QUOTED_PATH.sub(lambda match: match[1] + _file_name(match[2]) + match[1], text)
    text = _BARE_PATH.sub(lambda match: _file_name(match[0]), text)
    text = _FILE_AS_SUBJECT.sub("the file ", text)
    return text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0].rstrip(",;:-") + " …"  # whole words


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


def check_grid(shape: tuple[int, ...], name: str) -> None:
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


def _replace_non_finite(data: np.ndarray) -> dict[str, Any]:
    """Set NaN and ±Inf voxels, in place, to the lowest finite value (0 when there is none); meta saying so."""
    finite = np.isfinite(data)
    count = int(finite.size - np.count_nonzero(finite))
    if count == 0:
        return {}
    data[~finite] = np.nan
    fill = float(np.fmin.reduce(data, axis=None)) if count < data.size else 0.0  # fmin skips NaN: no copy
    data[~finite] = fill
    return {"non_finite_voxels": count,  # the note does not name the file: file names can hold patient names
            "notes": [f"{count:,} voxels of the scan were not numbers (NaN or infinite) and are shown as {fill:g}"]}


def _obliquity_degrees(affine: np.ndarray) -> float:
    """The largest angle (degrees) between a voxel axis of this affine and the body axis nearest to it."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.degrees(np.arccos(np.clip(np.abs(axes).max(axis=0), 0.0, 1.0))).max())


def canonical_volume(array_xyz: np.ndarray, affine_ras: np.ndarray, modality: str, source: str, name: str,
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
    oblique = _obliquity_degrees(affine_ras)
    if oblique > OBLIQUE_NOTE_DEGREES and "gantry_tilt_degrees" not in meta:  # a tilt has its own note
        meta = {**meta, "obliquity_degrees": round(oblique, 1),
                "notes": [*meta.get("notes", []), f"the scan was acquired at an angle to the body's axes (up to "
                          f"{oblique:.0f}°); its views follow the scan's own axes, so the planes and side labels are "
                          "the nearest ones, not exact"]}
    ornt = io_orientation(affine_ras)
    affine = affine_ras @ inv_ornt_aff(ornt, array_xyz.shape)  # voxel (x, y, z) → RAS of the reoriented grid
    data = np.ascontiguousarray(apply_orientation(array_xyz, ornt).transpose(2, 1, 0), dtype=np.float32)
    affine_zyx = affine[:, [2, 1, 0, 3]]  # the same map for (z, y, x, 1) indices
    spacing = tuple(float(s) for s in np.linalg.norm(affine_zyx[:3, :3], axis=0))
    repaired = {} if array_xyz.dtype.kind in "biu" else _replace_non_finite(data)  # integers are always finite
    meta = {"modality": modality, "slice_count": int(data.shape[0]),
            "spacing": [round(s, 4) for s in spacing], **meta, **repaired,
            "notes": [*meta.get("notes", []), *repaired.get("notes", [])]}
    if not meta["notes"]:
        del meta["notes"]
    return Volume(data=data, spacing=spacing, affine=affine_zyx, modality=modality, source=source,
                  orientation=orientation, meta=meta)


# What operating systems put beside files (macOS resource forks and folder settings, Windows thumbnails): never a scan.
_SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini"}


def _is_system_file(path: PurePosixPath | Path) -> bool:
    return (path.name.lower() in _SYSTEM_FILES or path.name.startswith("._")
            or any(part == "__MACOSX" for part in path.parts))


def listed_files(path: Path) -> list[Path]:
    """A file itself, or every file under a folder (recursively, operating-system clutter skipped), at most
    MAX_DICOM_FILES of them."""
    if not path.is_dir():
        return [path]
    files = []
    for file in path.rglob("*"):
        if file.is_file() and not _is_system_file(file.relative_to(path)):
            files.append(file)
            if len(files) > MAX_DICOM_FILES:
                raise VolumeError(f"folder {path.name} holds more than {MAX_DICOM_FILES} files; upload one "
                                  "series at a time")
    return sorted(files)


def _load_files(files: list[Path], name: str, zip_alone: bool = False) -> Volume:
    """Files of one upload: its single NIfTI or .npy file if it holds one, else a DICOM series; with
    `zip_alone` (a folder or list, never a zip's own members: no zip in a zip), a lone .zip is the scan."""
    if zip_alone and len(files) == 1 and _scan_kind(files[0]) == "zip":
        return load_volume(files[0])
    if len(files) > MAX_DICOM_FILES:
        raise VolumeError(f"{name} holds {len(files)} files, more than the {MAX_DICOM_FILES} allowed; upload one "
                          "series at a time")
    scans = [file for file in files if _scan_kind(file) in ("nifti", "npy")]
    if len(scans) > 1:
        raise VolumeError(f"{name} holds {len(scans)} NIfTI or .npy files; upload one scan at a time")
    if scans:
        volume = _load_nifti(scans[0]) if _scan_kind(scans[0]) == "nifti" else _load_npy(scans[0])
        if len(files) > 1:  # counted, never named: a file's name can be a patient's
            volume.meta.setdefault("notes", []).append(f"{len(files) - 1} other file(s) in the upload are not "
                                                       "part of the scan and were left out")
        return volume
    from .dicom import load_dicom

    return load_dicom(files, name)


_SAFE_NAME = re.compile(r"[^\w.\- ]")  # what a file name inside a zip keeps when extracted


def zip_member_name(filename: str) -> str:
    """The name a zip member's file is extracted under, and messages about it give: its own file name, its
    characters made safe for any file system (100 bytes at most)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    return _SAFE_NAME.sub("_", name).encode()[-100:].decode(errors="ignore").lstrip(".") or "member"


def _extract_zip(path: Path, folder: Path) -> list[Path]:
    """Extract a zip's members into `folder` (a temporary directory), each in a numbered folder, after checking
    the entry count and total size from the zip's directory; names with ".." or absolute paths, and entries
    without a name, are skipped.
    """
    _check_zip_directory(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise VolumeError(f"{path.name} is not a readable zip file ({error_reason(error)}); zip the scan again and "
                          "re-upload it") from error
    with archive:
        members = [member for member in archive.infolist()  # a nameless entry holds nothing one could mean
                   if member.filename and not member.is_dir()
                   and not _is_system_file(PurePosixPath(member.filename.replace("\\", "/")))]
        if len(members) > MAX_ZIP_ENTRIES:
            raise VolumeError(f"{path.name} holds {len(members)} files, more than the {MAX_ZIP_ENTRIES} allowed; "
                              "upload one series at a time")
        total = sum(member.file_size for member in members)
        if total > MAX_ZIP_BYTES:
            raise VolumeError(f"{path.name} unpacks to {total:,} bytes, more than the {MAX_ZIP_BYTES:,} allowed; "
                              "upload a smaller scan")
        for member in members:
            _check_compression(member.file_size, member.compress_size,
                               f"{path.name} ({zip_member_name(member.filename)})")
        files = []
        for number, member in enumerate(members):
            name = PurePosixPath(member.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in name.parts[0]:
                continue
            # A folder of our own per member, so nothing can land outside `folder`; the member's own file name
            # (its characters made safe) so that a message about it names what the user zipped.
            target = folder / f"{number:05d}" / zip_member_name(member.filename)
            target.parent.mkdir()
            try:
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error) as error:
                raise VolumeError(f"{path.name} has a damaged or encrypted member ({error_reason(error)}); zip the "
                                  "scan again without a password and re-upload it") from error
            files.append(target)
    return files


def zip_member_names(path: Path) -> list[str]:
    """The names that messages about a zip's files give them (`zip_member_name`); none for a file that is no zip,
    or a zip whose list of contents cannot be read or is too large to (read from its end record first)."""
    if not path.name.lower().endswith(".zip"):
        return []
    try:
        _check_zip_directory(path)
        with zipfile.ZipFile(path) as archive:
            return [zip_member_name(member.filename) for member in archive.infolist()[:MAX_ZIP_ENTRIES]]
    except (VolumeError, zipfile.BadZipFile, OSError, ValueError, EOFError):
        return []


def _check_zip_directory(path: Path) -> None:
    """Refuse, from the zip's end record alone, a central directory too large to list (millions of entries).

    The stdlib's reader of the end record (zip64 too) is private; on a Python without it this check is
    skipped, and the entry count is still checked once `zipfile` has listed the directory."""
    read_end_record = getattr(zipfile, "_EndRecData", None)
    if read_end_record is None:
        return
    try:
        with open(path, "rb") as handle:
            end_record = read_end_record(handle)
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
        affine[:3] *= NIFTI_MM_PER_UNIT.get(image.header.get_xyzt_units()[0], 1.0)  # spacing and origin in mm
    except Exception as error:
        if not path.name.lower().endswith(".gz") and _gzip_compressed(path):
            raise VolumeError(f"{path.name} is a gzip-compressed NIfTI file named as an uncompressed one; rename it "
                              "to end in .nii.gz") from error
        # nibabel's "Cannot work out file type of <path>": no NIfTI header at the start (a document, a picture)
        reason = ("it does not begin with a NIfTI header" if isinstance(error, nib.filebasedimages.ImageFileError)
                  and str(error).startswith("Cannot work out file type") else error_reason(error))
        raise VolumeError(f"{path.name} is not a readable NIfTI file ({reason}); check that the upload finished, or "
                          "re-export the scan") from error
    check_grid(shape[:3] if len(shape) >= 3 else shape, path.name)
    if path.name.lower().endswith(".gz"):
        voxel_bytes = math.prod(shape[:3]) * image.header.get_data_dtype().itemsize
        _check_compression(voxel_bytes, path.stat().st_size, path.name)
    if image.header.get_data_dtype().kind not in "biuf":  # RGB (a structured dtype) or complex voxels
        raise VolumeError(f"{path.name} holds colour (RGB) or complex-valued voxels, which are not supported; give "
                          "a greyscale CT, MR or PET scan")
    frames = math.prod(shape[3:])
    first_volume = (slice(None),) * 3 + (0,) * (len(shape) - 3)
    from isal.igzip_lib import IsalError  # outside the try: a package missing here is not a damaged file

    try:
        array = _read_voxels(path, image.dataobj, first_volume)  # lazily: only the first volume
    except (OSError, EOFError, ValueError, zlib.error, IsalError) as error:  # cut short, bad CRC or deflate data
        raise VolumeError(f"{path.name} is damaged or truncated ({error_reason(error)}); re-export or re-upload the "
                          "scan") from error
    meta: dict[str, Any] = {"notes": []}
    if array.dtype.kind not in "iu":  # integers stay as stored until `canonical_volume` reorients them
        wide, array = array, array.astype(np.float32, copy=False)
        if wide.dtype.itemsize > 4 and np.isinf(array).any():  # float64 values past float32's range became ±Inf
            beyond = np.isinf(array) & np.isfinite(wide)  # (a real ±Inf stays one, for canonical_volume)
            if beyond.any():
                largest = np.finfo(np.float32).max
                array[beyond] = np.where(wide[beyond] > 0, largest, -largest)
                meta["notes"].append(f"{int(beyond.sum()):,} voxels hold values beyond what 32-bit numbers can "
                                     f"(±{largest:.1e}) and are shown at that limit")
    if frames > 1:
        meta["frames"] = frames
        meta["notes"].append(f"the file holds {frames} volumes (4D); the first is shown")
    _note_nifti_orientation(image.header, meta)
    modality, guessed = _nifti_modality(image.header, array)
    if guessed:
        meta["modality_guessed"] = True
        meta["notes"].append(GUESSED_MODALITY[modality])
    return canonical_volume(array, affine, modality, "nifti", path.name, meta)


def _gzip_compressed(path: Path) -> bool:
    """Whether the file starts as gzip's do (1f 8b)."""
    try:
        with path.open("rb") as handle:
            return handle.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _note_nifti_orientation(header, meta: dict[str, Any]) -> None:
    """Add to `meta["notes"]` what the header's two orientations leave in doubt: none stated (qform_code and
    sform_code 0: nibabel falls back on the Analyze convention, and `meta["orientation_unknown"]` is set), or two
    that disagree on the axes' directions (nibabel, as most tools, takes the sform's)."""
    from nibabel.orientations import aff2axcodes

    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if not qform_code and not sform_code:
        meta["orientation_unknown"] = True
        meta["notes"].append("the file states no orientation (its qform and sform codes are 0), so it is read in the "
                             "old Analyze convention (LAS), and its sides may be swapped (left and right, front and "
                             "back, head and feet); re-export it with its orientation")
    elif qform_code and sform_code:
        try:
            qform, sform = ("".join(map(str, aff2axcodes(affine))) for affine in (header.get_qform(),
                                                                                 header.get_sform()))
        except ValueError:  # a quaternion nibabel cannot read: the sform, which it reads, is what is shown
            meta["notes"].append("the file's qform cannot be read (an invalid quaternion); it is shown by its sform, "
                                 "so check its sides against the scanner's")
            return
        if qform != sform:
            meta["notes"].append(f"the file's two orientations disagree (qform {qform}, sform {sform}); it is shown "
                                 "by its sform, as most tools do, so check its sides against the scanner's")


# Millimetres per NIfTI spatial unit (xyzt_units) other than mm; "unknown" is read as mm, as every viewer does.
NIFTI_MM_PER_UNIT = {"meter": 1000.0, "micron": 0.001}


def _read_voxels(path: Path, proxy, index: tuple) -> np.ndarray:
    """`proxy[index]` (a nibabel ArrayProxy: shape, dtype, offset and scaling from the header), a .gz file
    inflated by ISA-L (`isal`), about twice as fast as the standard library's zlib that nibabel uses."""
    if not path.name.lower().endswith(".gz"):
        return np.asarray(proxy[index])
    from isal import igzip
    from nibabel.arrayproxy import ArrayProxy

    with igzip.open(path, "rb") as handle:
        spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        return np.asarray(ArrayProxy(handle, spec, mmap=False, order=proxy.order)[index])


# What the scan card says when a NIfTI file does not state its modality (NIfTI has no field for it).
GUESSED_MODALITY = {
    "CT": "the file does not say which modality it is; it is read as CT because its values run from air to bone "
          "in Hounsfield units",
    "OT": "the file does not say which modality it is, and its values do not run from air to bone as a whole CT's "
          "Hounsfield units do; it is read as 'other' and shown over its whole range of values: if it is a CT, an "
          "MR or a PET, say so (the app's Modality list, or --modality on the command line)",
}


NOT_HU_CHOSEN = ("its values hold none below 0, so they are likely not Hounsfield units (air lies near −1000; a CT "
                 "stored with an offset such as +1024 needs it taken off): windows and the model may read it wrongly")


def _nifti_modality(header, array: np.ndarray) -> tuple[str, bool]:
    """(modality, guessed): the one `save_nifti` wrote in the description; else guessed, "CT" when the values
    span air to bone, else "OT"."""
    from .writers import MODALITY_TAG

    description = bytes(np.asarray(header.get("descrip", b""))).decode("latin-1").strip("\x00 ")
    stored = description.removeprefix(MODALITY_TAG)
    if description.startswith(MODALITY_TAG) and stored in ("CT", "MR", "PT", "OT"):
        return stored, False
    lowest, highest = np.fmin.reduce(array, axis=None), np.fmax.reduce(array, axis=None)  # skip NaN, copy nothing
    if not (np.isfinite(lowest) and np.isfinite(highest)):  # ±Inf voxels: the rare case worth a masked copy
        finite = array[np.isfinite(array)]
        lowest, highest = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    return ("CT" if lowest <= CT_AIR_HU and highest >= CT_BONE_HU else "OT"), True


# --- .npy ----------------------------------------------------------------------------------------------------

NPY_MAX_HEADER_BYTES = 10_000  # a real volume's .npy header is about a hundred bytes


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header alone; VolumeError when it is not one."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            # numpy reads the header's stated length before it checks max_header_size: check it first (a
            # damaged file can state 4 GB)
            length_format = "<H" if version == (1, 0) else "<I"
            stated = struct.unpack(length_format, handle.read(struct.calcsize(length_format)))[0]
            if stated > NPY_MAX_HEADER_BYTES:
                raise ValueError(f"its header states {stated:,} bytes")
            handle.seek(-struct.calcsize(length_format), os.SEEK_CUR)
            shape, _, dtype = read(handle, max_header_size=NPY_MAX_HEADER_BYTES)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError, tokenize.TokenError, struct.error) as error:
        raise VolumeError(f"{path.name} is not a readable .npy array ({error_reason(error)}); save it with numpy.save "
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
    check_grid(shape, path.name)  # from the header: before any voxel is read
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickles
    except (ValueError, OSError, EOFError) as error:
        raise VolumeError(f"{path.name} is not a readable .npy array ({error_reason(error)}); it may be "
                          "truncated, save it again with numpy.save") from error
    stored = stored.reshape(shape)
    display = np.array(stored, dtype=np.float32)  # (D, H, W): row 0 anterior, column 0 the patient's right
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0])  # stored (column, row, slice) run toward L, P, S
    return canonical_volume(display.transpose(2, 1, 0), affine_ras, "OT", "npy", path.name,
                            {"spacing_known": False, "orientation_unknown": True})  # an array holds voxels alone
