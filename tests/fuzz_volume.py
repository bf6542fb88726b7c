"""Fuzz `load_volume` with hypothesis: mutated NIfTI, DICOM, .npy and zip files must load or raise VolumeError.

    python tests/fuzz_volume.py --minutes 3          # findings are saved under --findings (default /tmp)

Seeds are small valid scans of every format the loader reads (NIfTI .nii and .nii.gz, a DICOM series as a folder
and as a zip, enhanced DICOM, M3D .npy, a zip holding a NIfTI). Each example takes one seed and mutates its bytes
(flips, overwrites with boundary numbers, random runs, truncation, insertion); compressed seeds are mutated
inside the compression too, so header fields are reached. A finding is any exception other than VolumeError, a
load slower than 10 s, or (on the command line) memory beyond a 3 GB address-space allowance.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medvlm.errors import VolumeError
from medvlm.volume import load_volume
from medvlm.writers import save_dicom_enhanced, save_dicom_series, save_nifti, save_npy

HANG_SECONDS = 10.0
MEMORY_ALLOWANCE = 3 * 2**30  # address space allowed beyond what the fuzzer holds at start
BOUNDARY_NUMBERS = [struct.pack(fmt, value) for fmt, value in [
    ("<h", 0), ("<h", -1), ("<h", 32767), ("<h", -32768), ("<H", 65535), ("<i", 2**31 - 1), ("<i", -(2**31)),
    ("<f", float("nan")), ("<f", float("inf")), ("<f", -1e30), ("<f", 0.0), ("<q", 2**62), ("<d", float("nan")),
]]


class Hang(Exception):
    """load_volume ran longer than HANG_SECONDS."""


@dataclass
class Seed:
    """A valid scan as bytes: one file (`name`) or, for a series, several files of which `target` is mutated."""

    name: str
    files: dict[str, bytes]
    target: str
    container: str | None = None  # "gzip" or "zip": mutations may also go inside it


def _phantom() -> np.ndarray:
    """A small CT-like (Z, Y, X) = (4, 12, 10) volume in HU."""
    data = np.random.default_rng(0).normal(40, 10, (4, 12, 10)).astype(np.float32)
    data[:, :2] = -1000.0
    data[:, 5:7, 6:8] = 900.0
    return data


def build_seeds() -> list[Seed]:
    """Every format the loader reads, written by medvlm.writers into memory."""
    data, spacing = _phantom(), (2.5, 0.8, 0.7)
    seeds = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name in ("scan.nii", "scan.nii.gz"):
            path = save_nifti(root / name, data, spacing, "LPS", dtype=np.int16, modality="CT")
            seeds.append(Seed(name, {name: path.read_bytes()}, name, "gzip" if name.endswith(".gz") else None))
        series = save_dicom_series(root / "series", data, spacing, intercept=-1024.0)
        files = {path.name: path.read_bytes() for path in series}
        seeds.append(Seed("series", files, series[1].name))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
            for name, content in files.items():
                zipped.writestr(f"study/{name}", content)
        seeds.append(Seed("series.zip", {"series.zip": buffer.getvalue()}, "series.zip", "zip"))
        enhanced = save_dicom_enhanced(root / "enhanced.dcm", data, spacing, intercept=-1024.0)
        seeds.append(Seed("enhanced.dcm", {"enhanced.dcm": enhanced.read_bytes()}, "enhanced.dcm"))
        unit = (data - data.min()) / (data.max() - data.min())
        npy = save_npy(root / "scan.npy", unit)
        seeds.append(Seed("scan.npy", {"scan.npy": npy.read_bytes()}, "scan.npy"))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zipped:
            zipped.writestr("scan.nii", (root / "scan.nii").read_bytes())
        seeds.append(Seed("nifti.zip", {"nifti.zip": buffer.getvalue()}, "nifti.zip", "zip"))
    return seeds


SEEDS = build_seeds()


@st.composite
def mutations(draw, size: int) -> list[tuple]:
    """A few byte edits for content of `size` bytes, biased toward the first 512 (the headers)."""
    def position() -> int:
        head = draw(st.booleans())
        return draw(st.integers(0, max(0, min(size, 512 if head else size) - 1)))

    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "number", "random", "truncate", "insert", "zero"]))
        if kind == "flip":
            edits.append(("flip", position(), draw(st.integers(0, 7))))
        elif kind == "number":
            edits.append(("write", position(), draw(st.sampled_from(BOUNDARY_NUMBERS))))
        elif kind == "random":
            edits.append(("write", position(), draw(st.binary(min_size=1, max_size=16))))
        elif kind == "truncate":
            edits.append(("truncate", draw(st.integers(0, size))))
        elif kind == "insert":
            edits.append(("insert", position(), draw(st.binary(min_size=1, max_size=64))))
        else:
            edits.append(("write", position(), b"\x00" * draw(st.integers(1, 32))))
    return edits


def mutate(content: bytes, edits: list[tuple]) -> bytes:
    """Apply byte edits in order (positions past the end are clipped)."""
    data = bytearray(content)
    for edit in edits:
        if edit[0] == "truncate":
            del data[edit[1]:]
            continue
        where = min(edit[1], max(0, len(data) - 1))
        if edit[0] == "flip" and data:
            data[where] ^= 1 << edit[2]
        elif edit[0] == "write":
            data[where:where + len(edit[2])] = edit[2]
        elif edit[0] == "insert":
            data[where:where] = edit[2]
    return bytes(data)


def mutate_inside(seed: Seed, edits: list[tuple]) -> bytes:
    """The seed's target with the edits applied to what its gzip or zip holds, then packed again."""
    content = seed.files[seed.target]
    if seed.container == "gzip":
        return gzip.compress(mutate(gzip.decompress(content), edits), compresslevel=1)
    with zipfile.ZipFile(io.BytesIO(content)) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as packed:
        for number, (name, member) in enumerate(members):
            packed.writestr(name, mutate(member, edits) if number == len(members) // 2 else member)
    return buffer.getvalue()


@st.composite
def fuzz_cases(draw) -> tuple[Seed, bytes]:
    """(seed, mutated content of its target file)."""
    seed = draw(st.sampled_from(SEEDS))
    content = seed.files[seed.target]
    inside = seed.container is not None and draw(st.booleans())
    size = len(gzip.decompress(content)) if inside and seed.container == "gzip" else len(content)
    edits = draw(mutations(size if not inside or seed.container == "gzip" else 2048))
    return seed, mutate_inside(seed, edits) if inside else mutate(content, edits)


def _on_alarm(signum, frame):
    raise Hang(f"load_volume ran longer than {HANG_SECONDS:g} s")


def check_load(seed: Seed, content: bytes, findings: Path | None = None,
               hang_seconds: float | None = HANG_SECONDS) -> None:
    """Write the case to a temporary folder and load it: VolumeError or a Volume, within `hang_seconds` (None:
    no clock here, as under pytest, whose timeout ends a hang)."""
    with tempfile.TemporaryDirectory(prefix="medvlm-fuzz-") as folder:
        root = Path(folder)
        for name, original in seed.files.items():
            (root / name).write_bytes(content if name == seed.target else original)
        source = root if len(seed.files) > 1 else root / seed.target
        if hang_seconds is not None:
            previous = signal.signal(signal.SIGALRM, _on_alarm)
            outer_timer, _ = signal.setitimer(signal.ITIMER_REAL, hang_seconds)  # e.g. pytest-timeout's, restored
            start = time.perf_counter()
        try:
            scan = load_volume(source)
            assert np.isfinite(scan.data).all() and min(scan.spacing) > 0, "a volume with non-finite data or spacing"
        except VolumeError as error:
            assert "\n" not in str(error), "a multi-line VolumeError"
        except BaseException:
            if findings is not None:
                findings.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha1(content).hexdigest()[:12]
                (findings / f"{seed.name}-{digest}-{seed.target}").write_bytes(content)
            raise
        finally:
            if hang_seconds is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if outer_timer:
                    signal.setitimer(signal.ITIMER_REAL, max(0.001, outer_timer - (time.perf_counter() - start)))
        if hang_seconds is not None:
            assert time.perf_counter() - start < hang_seconds, f"load_volume ran longer than {hang_seconds:g} s"


def fuzz(examples: int, seed: int, findings: Path | None = None, derandomize: bool = False,
         hang_seconds: float | None = HANG_SECONDS) -> None:
    """Run `examples` hypothesis examples from `seed`; raises (shrunk) on the first finding (a load longer than
    `hang_seconds` among them, unless None)."""
    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(fuzz_cases())
    def run(case):
        check_load(*case, findings=findings, hang_seconds=hang_seconds)

    run()


def _limit_memory() -> None:
    """Cap the address space, so that a load that would take unbounded memory fails here as a finding."""
    with open("/proc/self/statm") as handle:
        current = int(handle.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (current + MEMORY_ALLOWANCE, resource.RLIM_INFINITY))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0, help="first hypothesis seed; each round adds one")
    parser.add_argument("--round", type=int, default=300, help="examples per hypothesis run")
    parser.add_argument("--findings", type=Path, default=Path(tempfile.gettempdir()) / "medvlm-fuzz-findings")
    args = parser.parse_args()
    _limit_memory()
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # header-fix chatter on every mutated NIfTI
    deadline, round_seed, found, examples = time.monotonic() + 60 * args.minutes, args.seed, 0, 0
    while time.monotonic() < deadline:
        try:
            fuzz(args.round, round_seed, args.findings)
        except Exception as error:  # a finding: hypothesis printed the shrunk example; keep fuzzing
            found += 1
            print(f"FINDING {found} (seed {round_seed}): {type(error).__name__}: {error}", flush=True)
            for failure in getattr(error, "exceptions", [error]):
                print("".join(traceback.format_exception(failure, limit=-4)), flush=True)
        examples += args.round
        round_seed += 1
        print(f"{examples} examples, {found} finding(s), {max(0, deadline - time.monotonic()):.0f} s left", flush=True)
    print(f"done: {examples} examples, {found} finding(s); inputs saved under {args.findings}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
