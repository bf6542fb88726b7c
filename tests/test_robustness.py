"""Hostile and odd inputs: every one loads correctly or raises VolumeError with one readable sentence.

Never another exception, never a hang (pytest-timeout ends a test that hangs), never unbounded memory (bombs are
measured in a subprocess: peak RSS growth ≤ 3 GB, and the bytes inflated before the refusal). Cases already in
test_volume.py (interleaved series, missing and duplicated slices, colour images, a single image, object .npy,
truncated data) are not repeated here.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import nibabel.tests
import numpy as np
import pydicom
import pydicom.data
import pytest

from medvlm import dicom as dicom_module
from medvlm import limits
from medvlm import volume as volume_module
from medvlm.errors import VolumeError
from medvlm.preprocess import encoder_input, window_names
from medvlm.view import render_slice
from medvlm.view3d import default_threshold, figure_3d, threshold_range
from medvlm.volume import Volume, load_volume
from medvlm.writers import save_dicom_enhanced, save_dicom_series, save_nifti

ROOT = Path(__file__).resolve().parent.parent
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
NIBABEL_FILES = Path(nibabel.tests.__file__).parent / "data"
BOMB_PEAK_BYTES = 3_000_000_000
BOMB_INFLATED_BYTES = 2**20  # a bomb is refused, or its excess left packed, having inflated no more than this
# A hang is a failure, not a slow case: generous for a shared 2-core machine (the largest volume the voxel budget
# allows, 1 GB of float32, takes 7-11 s to inflate there); speed is `python -m medvlm bench`'s business.
pytestmark = pytest.mark.timeout(300)


def loads_or_refuses(source) -> Volume | VolumeError:
    """load_volume's outcome, checked: a sane Volume, or a one-sentence VolumeError."""
    try:
        scan = load_volume(source)
    except VolumeError as error:
        outcome: Volume | VolumeError = error
        message = str(error)
        assert message and "\n" not in message and "Traceback" not in message and len(message) < 400, message
    else:
        outcome = scan
        assert scan.data.dtype == np.float32 and scan.data.ndim == 3 and min(scan.shape) >= limits.MIN_SLICES
        assert np.isfinite(scan.data).all(), "non-finite voxels reached the volume"
        assert all(s > 0 and np.isfinite(s) for s in scan.spacing) and np.isfinite(scan.affine).all()
        assert scan.modality in ("CT", "MR", "PT", "OT")
        json.dumps(scan.meta)  # plain, printable facts
    return outcome


# --- the libraries' own test data ------------------------------------------------------------------------------

def _shipped(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if "__pycache__" not in p.parts and not p.name.endswith(".py"))


@pytest.mark.parametrize("path", _shipped(PYDICOM_FILES), ids=lambda p: str(p.relative_to(PYDICOM_FILES)))
def test_every_pydicom_test_file_and_dicomdir_tree(path):
    loads_or_refuses(path)


def test_the_whole_pydicom_test_folder_at_once():
    outcome = loads_or_refuses(PYDICOM_FILES)
    assert isinstance(outcome, VolumeError)


def test_pydicom_rt_dose_is_a_legacy_multi_frame_volume():
    dose = loads_or_refuses(PYDICOM_FILES / "rtdose.dcm")
    header = pydicom.dcmread(PYDICOM_FILES / "rtdose.dcm")
    assert isinstance(dose, Volume) and dose.shape[0] == int(header.NumberOfFrames)
    offsets = np.asarray(header.GridFrameOffsetVector, dtype=float)
    assert dose.spacing[0] == pytest.approx(abs(offsets[1] - offsets[0]))


@pytest.mark.parametrize("path", _shipped(NIBABEL_FILES), ids=lambda p: p.name)
def test_every_nibabel_test_file(path):
    loads_or_refuses(path)


# --- generated bad inputs ------------------------------------------------------------------------------------

def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _nifti_header_only(path: Path, header) -> Path:
    """A .nii (or .nii.gz) holding a header and a few bytes, whatever shape the header claims."""
    block = header.binaryblock + b"\x00" * (int(header["vox_offset"]) - len(header.binaryblock) + 8)
    return _write(path, gzip.compress(block) if path.name.endswith(".gz") else block)


def _huge_nifti1(path: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((32767, 32767, 32767))  # the largest NIfTI-1 can say: its dims are int16
    return _nifti_header_only(path, header)


def _huge_nifti2(path: Path) -> Path:
    header = nib.Nifti2Header()
    header.set_data_shape((65535, 65535, 65535))
    return _nifti_header_only(path, header)


def _negative_dims_nifti(path: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    block = bytearray(header.binaryblock)
    block[42:48] = np.array([-4, 4, 4], dtype="<i2").tobytes()  # dim[1..3]
    return _write(path, bytes(block) + b"\x00" * 300)


def _cut_gzip_stream(path: Path) -> Path:
    scan = save_nifti(path, np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8), (1.0, 1.0, 1.0))
    return _write(path, scan.read_bytes()[: scan.stat().st_size // 2])  # the compressed stream itself ends early


def _huge_npy(path: Path) -> Path:
    header = {"descr": "<f4", "fortran_order": False, "shape": (2048, 2048, 2048)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\x00" * 64)
    return path


class _Exploit:
    """Unpickling this would create a marker file: a .npy must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_npy(path: Path) -> Path:
    array = np.empty(2, dtype=object)
    array[:] = [_Exploit(path.with_name("unpickled")), 1]
    np.save(path, array, allow_pickle=True)
    return path


def _npy_of(dtype: str):
    def build(path: Path) -> Path:
        np.save(path, np.zeros((3, 4, 5), dtype=dtype))
        return path
    return build


def _nested_zip(path: Path) -> Path:
    inner = path.with_name("inner.zip")
    with zipfile.ZipFile(inner, "w") as zipped:
        zipped.writestr("a.dcm", b"x")
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.write(inner, "inner.zip")
    inner.unlink()
    return path


def _encrypted_looking_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("a.dcm", b"x" * 100)
    content = bytearray(path.read_bytes())
    content[6] |= 1  # the general-purpose "encrypted" flag of the local header
    central = content.rfind(b"PK\x01\x02")
    content[central + 8] |= 1  # and of the central directory entry
    return _write(path, bytes(content))


RNG_BYTES = np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes()
BAD_FILES = {
    "empty.nii.gz": lambda p: _write(p, b""),
    "empty.nii": lambda p: _write(p, b""),
    "empty.dcm": lambda p: _write(p, b""),
    "empty.zip": lambda p: _write(p, b""),
    "empty.npy": lambda p: _write(p, b""),
    "random.nii.gz": lambda p: _write(p, RNG_BYTES),
    "random.nii": lambda p: _write(p, RNG_BYTES),
    "random.dcm": lambda p: _write(p, RNG_BYTES),
    "random.zip": lambda p: _write(p, RNG_BYTES),
    "random.npy": lambda p: _write(p, RNG_BYTES),
    "random-in-gzip.nii.gz": lambda p: _write(p, gzip.compress(RNG_BYTES)),
    "dicom-preamble-only.dcm": lambda p: _write(p, b"\x00" * 128 + b"DICM"),
    "cut-gzip-stream.nii.gz": _cut_gzip_stream,
    "nifti1-32767-cubed.nii": _huge_nifti1,
    "nifti1-32767-cubed.nii.gz": _huge_nifti1,
    "nifti2-65535-cubed.nii": _huge_nifti2,
    "nifti2-65535-cubed.nii.gz": _huge_nifti2,
    "negative-dims.nii": _negative_dims_nifti,
    "npy-header-claims-2048-cubed.npy": _huge_npy,
    "pickle.npy": _pickle_npy,
    "complex.npy": _npy_of("complex64"),
    "strings.npy": _npy_of("U3"),
    "bool.npy": _npy_of("bool"),
    "nested.zip": _nested_zip,
    "encrypted.zip": _encrypted_looking_zip,
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_refused_with_one_sentence(tmp_path, name):
    outcome = loads_or_refuses(BAD_FILES[name](tmp_path / name))
    if name != "bool.npy":  # booleans are numbers enough: a mask loads
        assert isinstance(outcome, VolumeError)
    assert not (tmp_path / "unpickled").exists(), "a .npy was unpickled"


def test_an_npy_header_stating_gigabytes_is_refused_before_it_is_read(tmp_path):
    """numpy would read a v2 header's stated length (up to 4 GB) before checking it (found by the fuzzer)."""
    path = tmp_path / "scan.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (4, 8, 8)})
        handle.write(b"\x00" * 1024)
    content = bytearray(path.read_bytes())
    content[8:12] = (4_000_000_000).to_bytes(4, "little")  # after the magic and version: the header's length
    path.write_bytes(bytes(content))
    with pytest.raises(VolumeError, match="its header states 4,000,000,000 bytes"):
        load_volume(path)


def test_huge_headers_are_refused_before_any_voxel_is_read(tmp_path):
    for name in ("nifti1-32767-cubed.nii.gz", "nifti2-65535-cubed.nii", "npy-header-claims-2048-cubed.npy"):
        with pytest.raises(VolumeError, match="allowed"):
            load_volume(BAD_FILES[name](tmp_path / name))


# --- archives: traversal, many entries ------------------------------------------------------------------------

def _listing(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()


def test_zip_paths_never_escape_a_temporary_folder(tmp_path, marked_ct):
    files = save_dicom_series(tmp_path / "series", marked_ct, (2.5, 0.8, 0.7))
    upload = tmp_path / "upload"
    upload.mkdir()
    archive = upload / "scan.zip"
    escapes = ["../escaped-1.dcm", "../../escaped-2.dcm", "/tmp/escaped-3.dcm", "\\..\\escaped-4.dcm",
               "C:/escaped-5.dcm", "ok/../../escaped-6.dcm"]
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in files:
            zipped.write(path, f"series/{path.name}")
        for name in escapes:
            zipped.writestr(name, files[0].read_bytes())
        link = zipfile.ZipInfo("series/link-to-passwd")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symlink entry: extracted as a plain file, if at all
        zipped.writestr(link, "/etc/passwd")
    before = {folder: _listing(folder) for folder in (tmp_path, upload, Path.cwd())}
    scan = loads_or_refuses(archive)
    assert isinstance(scan, Volume) and scan.shape == marked_ct.shape
    for folder, listing in before.items():
        assert _listing(folder) == listing, f"the zip wrote into {folder}"
    for shared in {Path(tempfile.gettempdir()), Path("/tmp")}:  # other processes write here: look for ours only
        assert not [name for name in _listing(shared) if name.startswith(("escaped-", "medvlm-zip-"))]
    assert not list(tmp_path.parent.rglob("escaped-*"))


def test_a_zip_entry_without_a_name_is_skipped(tmp_path, marked_ct):
    """A damaged zip directory can list an entry whose name is empty (found by tests/fuzz_volume.py)."""
    files = save_dicom_series(tmp_path / "series", marked_ct, (2.5, 0.8, 0.7))
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(zipfile.ZipInfo(""), files[0].read_bytes())
        for path in files:
            zipped.write(path, f"series/{path.name}")
    scan = loads_or_refuses(archive)
    assert isinstance(scan, Volume) and scan.shape == marked_ct.shape


def test_a_zip_of_10000_tiny_files_is_refused_from_its_end_record(tmp_path):
    """Refused from the count in the zip's end record ("10,000"), before its directory is listed or a file
    extracted (the check after listing says "10000")."""
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for number in range(10_000):
            zipped.writestr(f"{number}.dcm", b"x")
    with pytest.raises(VolumeError, match=f"10,000 files, more than the {limits.MAX_ZIP_ENTRIES} allowed"):
        load_volume(archive)


def test_a_python_without_the_private_zip_end_record_reader_still_refuses_with_one_line(tmp_path, monkeypatch):
    """The early check reads the zip's end record with the stdlib's private `zipfile._EndRecData`; should a
    later Python rename it, uploads still load or are refused in one sentence, never with a traceback."""
    archive = tmp_path / "many.zip"
    too_many = limits.MAX_ZIP_ENTRIES + 1
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for number in range(too_many):
            zipped.writestr(f"{number}.dcm", b"x")
    without_it = type(zipfile)("zipfile")  # the module as medvlm.volume sees it, less the private reader
    without_it.__dict__.update({name: value for name, value in vars(zipfile).items() if name != "_EndRecData"})
    monkeypatch.setattr(volume_module, "zipfile", without_it)
    with pytest.raises(VolumeError, match=f"{too_many} files, more than the {limits.MAX_ZIP_ENTRIES} allowed"):
        load_volume(archive)


# --- bombs: refused from sizes, peak memory measured in a subprocess --------------------------------------------

def _gzip_bomb_nifti(path: Path, shape=(2048, 2048, 59), tail_bytes: int = 0, affine=None) -> Path:
    """A .nii.gz of zeros: gzip members of 8 MB of zeros repeated (≈ 8 kB each) until the stream is
    `shape` uint8 voxels plus `tail_bytes` more than the header declares."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4) if affine is None else affine, code=1)
    chunk = 8 * 2**20
    member = gzip.compress(b"\x00" * chunk, compresslevel=9)
    total = int(np.prod(shape)) + tail_bytes
    with open(path, "wb") as handle:
        handle.write(gzip.compress(header.binaryblock + b"\x00" * 4))
        handle.write(member * (total // chunk))
        handle.write(gzip.compress(b"\x00" * (total % chunk)))
    return path


def _zip_bomb(path: Path, member_bytes: int = 200_000_000) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped, zipped.open("scan.dcm", "w") as member:
        block = b"\x00" * 2**22
        for _ in range(member_bytes // len(block)):
            member.write(block)
    return path


def _lying_zip(path: Path) -> Path:
    """A zip whose directory claims a 3.5 GB member (more than MAX_ZIP_BYTES)."""
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("scan.dcm", b"x" * 10)
    content = bytearray(path.read_bytes())
    central = content.rfind(b"PK\x01\x02")
    content[central + 24:central + 28] = (3_500_000_000).to_bytes(4, "little")  # uncompressed size
    return _write(path, bytes(content))


BOMBS = {
    "gzip-bomb-claimed-in-header.nii.gz": (_gzip_bomb_nifti, "fold"),
    # the largest volume the voxel budget allows, stored LPS (flipped on loading), with the ratio check off:
    "largest-allowed-volume.nii.gz": (lambda p: _gzip_bomb_nifti(p, affine=np.diag([-1.0, -1.0, 1.0, 1.0])), None),
    "gzip-bomb-beyond-header.nii.gz": (lambda p: _gzip_bomb_nifti(p, (64, 64, 8), tail_bytes=600_000_000), None),
    "zip-bomb.zip": (_zip_bomb, "fold"),
    "zip-claims-3.5-GB.zip": (_lying_zip, "unpacks to"),
}

# Counts the bytes handed out by gzip (isal's igzip is a gzip.GzipFile; readinto goes through read) and by zip
# members: what the loader inflated.
_MEASURE = """
import gzip, json, resource, sys, zipfile
from medvlm import volume
from medvlm.volume import VolumeError, load_volume
if sys.argv[2] == "no-ratio-check":
    volume.MAX_COMPRESSION_RATIO = 10**9
inflated = [0]
def counted(read):
    def counting(self, *args, **kwargs):
        data = read(self, *args, **kwargs)
        inflated[0] += len(data)
        return data
    return counting
for stream in (gzip.GzipFile, zipfile.ZipExtFile):
    stream.read, stream.read1 = counted(stream.read), counted(stream.read1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    load_volume(sys.argv[1]); outcome = "loaded"
except VolumeError as error:
    outcome = str(error)
print(json.dumps({"outcome": outcome, "inflated": inflated[0],
                  "peak_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before}))
"""


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_before_inflating_and_within_memory(tmp_path, name):
    build, refusal = BOMBS[name]
    path = build(tmp_path / name)
    assert path.stat().st_size < 10_000_000
    check = "no-ratio-check" if name.startswith("largest") else "ratio-check"
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path), check], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout)
    assert measured["peak_growth"] < BOMB_PEAK_BYTES, measured
    if check == "no-ratio-check":  # the voxel budget's largest volume is inflated in full, as declared
        assert measured["inflated"] >= 2048 * 2048 * 59, measured
    else:
        assert measured["inflated"] < BOMB_INFLATED_BYTES, measured
    if refusal is None:
        assert measured["outcome"] == "loaded"  # only the voxels the header declares are inflated
    else:
        assert measured["outcome"] != "loaded" and any(word in measured["outcome"] for word in refusal.split("|"))


# --- DICOM oddities ---------------------------------------------------------------------------------------------

def _edit_series(files: list[Path], **attributes) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def test_mixed_series_of_different_sizes_load_the_largest(tmp_path, marked_ct):
    save_dicom_series(tmp_path / "a", marked_ct, (2.5, 0.8, 0.7), series_description="axial")
    save_dicom_series(tmp_path / "b", np.zeros((4, 32, 32), dtype=np.float32), (5.0, 1.0, 1.0), "MR",
                      series_description="other")
    scan = loads_or_refuses(tmp_path)
    assert scan.shape == marked_ct.shape and scan.meta["other_series"][0]["modality"] == "MR"


def test_non_square_pixels_keep_their_spacing(tmp_path, marked_ct):
    save_dicom_series(tmp_path, marked_ct, (2.5, 0.5, 1.5))
    scan = loads_or_refuses(tmp_path)
    assert scan.spacing == pytest.approx((2.5, 0.5, 1.5))
    np.testing.assert_array_equal(scan.data, marked_ct)
    image = render_slice(scan, "axial", 4)
    assert image.shape[1] / image.shape[0] == pytest.approx(24 * 1.5 / (20 * 0.5), rel=0.05)


@pytest.mark.parametrize(("spacing", "message"), [([0.0, 0.8], "zero or negative PixelSpacing"),
                                                  ([-0.8, 0.7], "zero or negative PixelSpacing"),
                                                  ("abc\\0.7", "without PixelSpacing")])
def test_zero_negative_or_garbage_pixel_spacing_is_refused(tmp_path, marked_ct, spacing, message):
    files = save_dicom_series(tmp_path, marked_ct, (2.5, 0.8, 0.7))
    for path in files:
        ds = pydicom.dcmread(path)
        if isinstance(spacing, str):  # garbage: stored as text that is not numbers
            ds["PixelSpacing"] = pydicom.DataElement(0x00280030, "LO", spacing)  # (0028,0030)
        else:
            ds["PixelSpacing"].value = spacing
        ds.save_as(path)
    with pytest.raises(VolumeError, match=message):
        load_volume(tmp_path)


def test_slices_all_at_one_position_are_refused(tmp_path, marked_ct):
    _edit_series(save_dicom_series(tmp_path, marked_ct, (2.5, 0.8, 0.7)), ImagePositionPatient=[0.0, 0.0, 0.0])
    with pytest.raises(VolumeError, match="all lie at one position"):
        load_volume(tmp_path)


def test_a_localizer_in_the_series_is_left_out(tmp_path, marked_ct):
    save_dicom_series(tmp_path / "series", marked_ct, (2.5, 0.8, 0.7), series_uid="1.2.3.4")
    localizer = save_dicom_series(tmp_path / "localizer", marked_ct[:2], (2.5, 0.8, 0.7), series_uid="1.2.3.4")
    _edit_series(localizer[:1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])  # a sagittal image, same series
    localizer[1].unlink()
    scan = loads_or_refuses([tmp_path / "series", localizer[0]])
    assert isinstance(scan, Volume) and scan.shape == marked_ct.shape
    np.testing.assert_array_equal(scan.data, marked_ct)
    assert "another slice orientation" in scan.meta["notes"][0]


def test_legacy_multi_frame_is_stacked_by_its_spacing(tmp_path, marked_ct):
    path = save_dicom_enhanced(tmp_path / "legacy.dcm", marked_ct, (2.5, 0.8, 0.7), "MR")
    ds = pydicom.dcmread(path)
    groups = ds.PerFrameFunctionalGroupsSequence
    ds.ImagePositionPatient = groups[0].PlanePositionSequence[0].ImagePositionPatient
    shared = ds.SharedFunctionalGroupsSequence[0]
    ds.ImageOrientationPatient = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    ds.PixelSpacing = shared.PixelMeasuresSequence[0].PixelSpacing
    if "PixelValueTransformationSequence" in shared:
        transform = shared.PixelValueTransformationSequence[0]
        ds.RescaleSlope, ds.RescaleIntercept = transform.RescaleSlope, transform.RescaleIntercept
    del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence
    ds.SpacingBetweenSlices = 2.5
    ds.save_as(path)
    scan = loads_or_refuses(path)
    assert isinstance(scan, Volume) and scan.spacing == pytest.approx((2.5, 0.8, 0.7))
    np.testing.assert_array_equal(scan.data, marked_ct)
    del ds.SpacingBetweenSlices
    ds.save_as(path)
    with pytest.raises(VolumeError, match="without per-frame positions or a slice spacing"):
        load_volume(path)


def test_enhanced_frames_in_shuffled_order_decode_once(tmp_path, marked_ct, monkeypatch):
    path = save_dicom_enhanced(tmp_path / "shuffled.dcm", marked_ct, (2.5, 0.8, 0.7))
    ds = pydicom.dcmread(path)
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    frames = ds.pixel_array
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([groups[i] for i in order])
    ds.PixelData = np.ascontiguousarray(frames[order]).tobytes()
    ds.save_as(path)
    reads = []
    original = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(k) or original(*a, **k))
    scan = loads_or_refuses(path)
    np.testing.assert_array_equal(scan.data, marked_ct)
    assert sum(1 for k in reads if not k.get("stop_before_pixels")) == 1  # the pixel data decoded once


# --- non-finite and constant volumes ---------------------------------------------------------------------------

def test_nan_and_inf_voxels_load_as_the_lowest_finite_value(tmp_path, marked_ct):
    data = marked_ct.copy()
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    np.save(tmp_path / "scan.npy", np.where(np.isfinite(data), 0.5, data))
    for path in (save_nifti(tmp_path / "scan.nii.gz", data, (2.5, 0.8, 0.7), modality="CT"), tmp_path / "scan.npy"):
        scan = loads_or_refuses(path)
        assert scan.meta["non_finite_voxels"] == 3 and "not numbers" in scan.meta["notes"][0]
        finite = scan.data[0, 0, 3:]
        assert (scan.data[0, 0, :3] == scan.data.min()).all() and scan.data.min() <= finite.min()


def test_an_all_nan_volume_loads_as_zeros(tmp_path):
    scan = loads_or_refuses(save_nifti(tmp_path / "nan.nii", np.full((3, 4, 5), np.nan), (1.0, 1.0, 1.0)))
    assert (scan.data == 0).all() and scan.meta["non_finite_voxels"] == 60


def test_huge_values_and_float64_overflow_stay_finite(tmp_path):
    data = np.full((3, 4, 5), 1e300)
    data[0] = -1e300
    path = tmp_path / "overflow.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)  # float64 beyond float32's range
    scan = loads_or_refuses(path)
    assert np.isfinite(scan.data).all() and "non_finite_voxels" not in scan.meta
    assert (scan.data > 0).sum() == 40 and (scan.data < 0).sum() == 20  # +1e300 at the top of the range, not the bottom
    assert "60 voxels hold values beyond what 32-bit numbers can" in scan.meta["notes"][0]
    data = np.linspace(0.0, 1000.0, 60).reshape(3, 4, 5)
    data[0, 0, :2] = np.inf  # a real ±Inf in a float64 file is no number, as in a float32 one: not a huge value
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    scan = loads_or_refuses(path)
    assert scan.meta["non_finite_voxels"] == 2 and scan.modality == "OT" and scan.data.max() < 1001


@pytest.mark.parametrize("modality", ["CT", "MR", "PT", "OT"])
@pytest.mark.parametrize("value", [0.0, -1024.0, 1e6])
def test_constant_volumes_reach_the_model_and_the_viewers(tmp_path, modality, value):
    from tests.tiny_model import tiny_config, tiny_tokenizer

    scan = loads_or_refuses(save_nifti(tmp_path / "flat.nii.gz", np.full((6, 10, 12), value), (2.0, 1.0, 1.0),
                                       modality=modality))
    assert scan.modality == modality and (scan.data == value).all()
    pixels, heights = encoder_input(scan, tiny_config(tiny_tokenizer()))
    assert pixels.isfinite().all() and heights.isfinite().all()
    for window in window_names(modality):
        for plane in ("axial", "coronal", "sagittal"):
            assert render_slice(scan, plane, None, window).dtype == np.uint8
    low, high, step = threshold_range(scan)
    assert low < high and step > 0 and np.isfinite(default_threshold(scan))
    figure_3d(scan)  # no surface in a flat volume: an empty figure that says so, not an error


# --- limits: each refused with a message naming it --------------------------------------------------------------

def test_voxel_budget_and_side_limit(tmp_path, monkeypatch, marked_ct):
    path = save_nifti(tmp_path / "scan.nii.gz", marked_ct, (2.5, 0.8, 0.7))
    monkeypatch.setattr(volume_module, "MAX_VOXEL_BYTES", 4 * 1000)
    with pytest.raises(VolumeError, match=r"3,840 voxels, more than the 1,000 allowed; downsample or crop"):
        load_volume(path)
    monkeypatch.setattr(volume_module, "MAX_VOXEL_BYTES", limits.MAX_VOXEL_BYTES)
    monkeypatch.setattr(volume_module, "MAX_SIDE", 16)
    save_dicom_series(tmp_path / "series", marked_ct, (2.5, 0.8, 0.7))
    with pytest.raises(VolumeError, match="24 voxels along one side, more than the 16 allowed"):
        load_volume(tmp_path / "series")


def test_zip_size_and_dicom_file_count_limits(tmp_path, monkeypatch, marked_ct):
    files = save_dicom_series(tmp_path / "series", marked_ct, (2.5, 0.8, 0.7))
    with zipfile.ZipFile(tmp_path / "scan.zip", "w") as zipped:
        for path in files:
            zipped.write(path, path.name)
    monkeypatch.setattr(volume_module, "MAX_ZIP_BYTES", 1000)
    with pytest.raises(VolumeError, match=r"unpacks to [\d,]+ bytes, more than the 1,000 allowed"):
        load_volume(tmp_path / "scan.zip")
    monkeypatch.setattr(volume_module, "MAX_DICOM_FILES", 5)
    with pytest.raises(VolumeError, match="more than 5 files; upload one series at a time"):
        load_volume(tmp_path / "series")
    with pytest.raises(VolumeError, match="holds 8 files, more than the 5 allowed"):
        load_volume([str(path) for path in files])
    monkeypatch.setattr(volume_module, "MAX_DICOM_FILES", limits.MAX_DICOM_FILES)
    monkeypatch.setattr(dicom_module, "MAX_DICOM_IMAGES", 5)
    with pytest.raises(VolumeError, match="holds 8 images in one series, more than the 5 allowed; upload one time "):
        load_volume(tmp_path / "series")


def test_compression_ratio_limit_names_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_module, "COMPRESSION_CHECK_BYTES", 1000)
    plain = save_nifti(tmp_path / "flat.nii", np.zeros((40, 128, 128)), (1.0, 1.0, 1.0))
    path = _write(tmp_path / "flat.nii.gz", gzip.compress(plain.read_bytes(), compresslevel=9))
    with pytest.raises(VolumeError, match=f"more than the {limits.MAX_COMPRESSION_RATIO}-fold"):
        load_volume(path)


def test_limits_live_in_one_module():
    source = (ROOT / "medvlm" / "volume.py").read_text() + (ROOT / "medvlm" / "pipeline.py").read_text()
    for name in ("MAX_VOXEL_BYTES", "MAX_SIDE", "MAX_ZIP_ENTRIES", "MAX_ZIP_BYTES", "MAX_NEW_TOKENS"):
        assert f"{name} = " not in source, f"{name} is defined outside medvlm/limits.py"


def test_fuzz_short():
    """Forty fixed examples of the fuzz harness (tests/fuzz_volume.py runs it for minutes)."""
    from tests.fuzz_volume import fuzz

    fuzz(examples=40, seed=0, derandomize=True, hang_seconds=None)  # a hang: this module's pytest timeout
