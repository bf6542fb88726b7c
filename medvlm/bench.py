"""The benchmark of `python -m medvlm bench`: speed, size and memory from upload to first token.

Every figure is the median of several runs, and every baseline is measured in the same run, so a
comparison survives a noisy machine. The inputs are generated in a temporary folder: a CT phantom
fitted to exactly 300 slices of 512×512 (HU kept) written as an int16 .nii.gz and as a 300-file
DICOM series, and an MR brain phantom.

What each figure measures:
- load_nifti_s / load_dicom_s: `load_volume` of the CT from the .nii.gz / the DICOM folder.
- peak_rss_mb: peak resident memory of a fresh process that loads the model, then serves two
  sessions (the CT from the .nii.gz: slice, 3D view, report; the CT from DICOM: slice, encoding).
- slice_render_ms: one axial scroller image as the app sends it: `render_slice` (soft-tissue
  window) and its PNG encoding (compress_level=1, as app.slice_html); slices taken across the scan.
- view3d_s / view3d_bytes: `figure_3d` and its JSON as gr.Plot sends it (`Figure.to_json()`).
- view3d_naive_bytes: the baseline, plotly go.Volume of the CT resampled to 64³, as JSON.
- encode_s: `Pipeline.encode` as shipped (preview-size similarity selection, then full-size
  encoding of the kept slices only), encoding cache cold. encode_all_slices_s: the same weights
  with `selection_preview_size=None`, so every input slice goes through the encoder at full size.
  Both include the fingerprint and `encoder_input` they share; encode_parts splits each into its
  preprocessing and model (stages 1–5) seconds.
- ttft_s: from `load_volume` of the .nii.gz to the first streamed chunk of the report (encoding
  cache cold, model loaded); tokens_per_s: report tokens after the first over the time they took;
  followup_ttft_s: a second question about the same scan, to its first streamed chunk.
- app_ready_s: `python app.py` on a free port, from process start to HTTP 200 on "/".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent
FOLLOWUP_QUESTION = "Which organ is abnormal?"
NAIVE_GRID = 64  # the naive 3D view's volume side, in voxels
RENDERS_PER_RUN = 10  # scroller images drawn per run, at slices spread through the scan
APP_READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class BenchSize:
    """Inputs of one benchmark size: the CT grid (Z, Y, X) and the phantoms' `matrix` (None: realistic)."""

    ct_shape: tuple[int, int, int]
    ct_matrix: int | None
    mr_matrix: int | None


SIZES = {
    "full": BenchSize(ct_shape=(300, 512, 512), ct_matrix=None, mr_matrix=None),
    "tiny": BenchSize(ct_shape=(40, 96, 96), ct_matrix=96, mr_matrix=64),  # tests: structure, not timings
}


@dataclass
class BenchInputs:
    """The generated scans: CT as .nii.gz and DICOM folder, MR as .nii.gz, and what they hold."""

    ct_nifti: Path
    ct_dicom: Path
    mr_nifti: Path
    facts: dict[str, Any]


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, torch version and threads (and the GPU when CUDA is present)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
             "platform": platform.platform(),
             "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def _median_s(run: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- inputs ------------------------------------------------------------------------------------------------

def fit_grid(data: np.ndarray, spacing: tuple[float, float, float], shape: tuple[int, int, int],
             fill: float) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A (Z, Y, X) volume brought to exactly `shape`: z linearly resampled over the same coverage (its
    spacing scaled to match), y and x centre-cropped or padded with `fill`. Values keep their units (HU)."""
    slices = data.shape[0]
    if slices != shape[0]:
        positions = np.linspace(0.0, slices - 1, shape[0])
        below = np.floor(positions).astype(int)
        above = np.minimum(below + 1, slices - 1)
        weight = (positions - below).astype(np.float32)[:, None, None]
        data = data[below] * (1 - weight) + data[above] * weight
        spacing = (spacing[0] * (slices - 1) / max(shape[0] - 1, 1), spacing[1], spacing[2])
    fitted = np.full(shape, fill, dtype=np.float32)
    source, target = [slice(None)], [slice(None)]
    for have, want in zip(data.shape[1:], shape[1:], strict=True):
        offset = abs(have - want) // 2
        source.append(slice(offset, offset + want) if have > want else slice(None))
        target.append(slice(None) if have > want else slice(offset, offset + have))
    fitted[tuple(target)] = data[tuple(source)]
    return fitted, spacing


def make_inputs(folder: Path, size: BenchSize) -> BenchInputs:
    """Write the CT phantom (exactly `size.ct_shape`, HU) as int16 .nii.gz and as a DICOM series (one file per
    slice, intercept −1024 as scanners store CT), and the MR brain phantom as .nii.gz, into `folder`."""
    from .phantom import make_phantom
    from .writers import save_dicom_series, save_nifti

    ct = make_phantom(0, "ct", matrix=size.ct_matrix)
    ct_data, ct_spacing = fit_grid(ct.data, ct.spacing, size.ct_shape, fill=-1000.0)
    ct_nifti = save_nifti(folder / "ct.nii.gz", ct_data, ct_spacing, ct.orientation, dtype=np.int16, modality="CT")
    ct_dicom = folder / "ct-dicom"
    save_dicom_series(ct_dicom, ct_data, ct_spacing, "CT", intercept=-1024.0)
    mr = make_phantom(0, "mr", matrix=size.mr_matrix)
    mr_nifti = save_nifti(folder / "mr.nii.gz", mr.data, mr.spacing, mr.orientation, modality="MR")
    facts = {"ct_shape": list(ct_data.shape), "ct_spacing_mm": [round(s, 4) for s in ct_spacing],
             "ct_orientation": ct.orientation, "ct_nifti_mb": round(ct_nifti.stat().st_size / 2**20, 1),
             "ct_dicom_files": sum(1 for _ in ct_dicom.iterdir()),
             "ct_dicom_mb": round(sum(p.stat().st_size for p in ct_dicom.iterdir()) / 2**20, 1),
             "mr_shape": list(mr.data.shape), "mr_spacing_mm": [round(s, 4) for s in mr.spacing]}
    return BenchInputs(ct_nifti, ct_dicom, mr_nifti, facts)


# --- viewer ------------------------------------------------------------------------------------------------

def scroller_png(volume, index: int, window: str | None = None) -> bytes:
    """One axial scroller image as the app sends it: rendered, then PNG-encoded (compress_level=1)."""
    from PIL import Image

    from .view import render_slice

    buffer = io.BytesIO()
    Image.fromarray(render_slice(volume, "axial", index, window)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def naive_view3d_json(volume) -> str:
    """The baseline 3D view: plotly go.Volume of the scan resampled to NAIVE_GRID³, as JSON."""
    import plotly.graph_objects as go
    from scipy import ndimage

    zoom = [NAIVE_GRID / n for n in volume.shape]
    grid = ndimage.zoom(volume.data, zoom, order=1).astype(np.float32)  # (64, 64, 64)
    z, y, x = (axis.astype(np.float32) for axis in np.mgrid[:NAIVE_GRID, :NAIVE_GRID, :NAIVE_GRID])
    low, high = np.percentile(grid, [50, 99.5])
    figure = go.Figure(go.Volume(x=x.ravel(), y=y.ravel(), z=z.ravel(), value=grid.ravel(), isomin=float(low),
                                 isomax=float(high), opacity=0.1, surface_count=12))
    return figure.to_json()


def bench_viewer(volume, repeats: int, window: str | None = None) -> dict[str, Any]:
    """slice_render_ms, view3d_s, view3d_bytes of one loaded volume."""
    from .view3d import figure_3d

    count = volume.shape[0]
    indices = [int(count * (i + 0.5) / RENDERS_PER_RUN) for i in range(RENDERS_PER_RUN)]
    scroller_png(volume, indices[0], window)  # the window's ranges, computed once per volume
    render_times = []
    for _ in range(repeats):
        for index in indices:
            start = time.perf_counter()
            scroller_png(volume, index, window)
            render_times.append(time.perf_counter() - start)
    view3d_s = _median_s(lambda: figure_3d(volume).to_json(), repeats)
    return {"slice_render_ms": 1000 * statistics.median(render_times), "view3d_s": view3d_s,
            "view3d_bytes": len(figure_3d(volume).to_json())}


# --- model -------------------------------------------------------------------------------------------------

def all_slices_pipeline(pipeline):
    """The same weights and tokenizer with `selection_preview_size=None`: every input slice is encoded at full
    size and selection works on those encodings (a config copy; the shipped model is left as it is)."""
    from .pipeline import Pipeline

    config = copy.deepcopy(pipeline.model.config)
    config.selection_preview_size = None
    model = copy.copy(pipeline.model)  # shares every module and weight, holds its own config
    model.config = config
    return Pipeline(model, pipeline.tokenizer, f"{pipeline.name} (all slices at full size)")


def _encode_cold(pipeline, volume):
    """`pipeline.encode` with nothing cached: a fresh Volume (no fingerprint yet) and no stored encoding."""
    fresh = dataclasses.replace(volume)
    pipeline.forget(fresh)
    return pipeline.encode(fresh)


def bench_encode(pipeline, volume, repeats: int) -> dict[str, Any]:
    """encode_s (as shipped) and encode_all_slices_s (baseline), interleaved run by run; kept/total slices; and
    `encode_parts`: the medians of each one's preprocessing (`encoder_input`) and model (stages 1–5) seconds."""
    baseline = all_slices_pipeline(pipeline)
    _encode_cold(pipeline, volume)  # first-call costs (thread pools, kernels) outside the timings
    runs: dict[str, list] = {"shipped": [], "all_slices": []}
    pairs = (("shipped", pipeline), ("all_slices", baseline))
    for run in range(repeats):
        for name, timed in pairs if run % 2 == 0 else pairs[::-1]:  # alternate which goes first
            start = time.perf_counter()
            encoding = _encode_cold(timed, volume)
            runs[name].append((time.perf_counter() - start, encoding))
    pipeline.forget(volume)
    kept = runs["shipped"][-1][1]
    parts = {f"{name}_{part}_s": statistics.median(encoding.timings[timing] for _, encoding in done)
             for name, done in runs.items() for part, timing in (("preprocess", "preprocess_s"), ("model", "encode_s"))}
    return {"encode_s": statistics.median(seconds for seconds, _ in runs["shipped"]),
            "encode_all_slices_s": statistics.median(seconds for seconds, _ in runs["all_slices"]),
            "kept_slices": len(kept.kept_slices), "total_slices": kept.total_slices, "encode_parts": parts}


def _first_chunk(chunks) -> tuple[str, float]:
    """(first chunk, perf_counter when it arrived)."""
    first = next(chunks)
    return first, time.perf_counter()


def bench_generation(pipeline, scan: Path, repeats: int) -> dict[str, Any]:
    """ttft_s, tokens_per_s and followup_ttft_s: load the scan, stream the report, then ask a second question."""
    from .volume import load_volume

    ttfts, rates, followups = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        volume = load_volume(scan)
        pipeline.forget(volume)
        chunks = pipeline.report(volume)
        first, first_at = _first_chunk(chunks)
        report = first + "".join(chunks)
        done = time.perf_counter()
        ttfts.append(first_at - start)
        tokens = len(pipeline.tokenizer(report, add_special_tokens=False).input_ids)
        if tokens > 1 and done > first_at:
            rates.append((tokens - 1) / (done - first_at))
        messages = [{"role": "user", "content": pipeline.model.config.report_prompt},
                    {"role": "assistant", "content": report}, {"role": "user", "content": FOLLOWUP_QUESTION}]
        start = time.perf_counter()
        chunks = pipeline.chat(volume, messages)
        followups.append(_first_chunk(chunks)[1] - start)
        chunks.close()
        pipeline.forget(volume)
    return {"ttft_s": statistics.median(ttfts), "tokens_per_s": statistics.median(rates) if rates else 0.0,
            "followup_ttft_s": statistics.median(followups)}


# --- separate processes: memory and app start --------------------------------------------------------------

_SESSION_SCRIPT = """
import json, resource, sys
from medvlm.bench import scroller_png
from medvlm.pipeline import Pipeline
from medvlm.view3d import figure_3d
from medvlm.volume import load_volume
checkpoint, nifti, dicom = sys.argv[1] or None, sys.argv[2], sys.argv[3]
pipeline = Pipeline.from_pretrained(checkpoint, device="cpu")
volume = load_volume(nifti)
scroller_png(volume, volume.shape[0] // 2)
figure_3d(volume).to_json()
report = "".join(pipeline.report(volume))
volume = load_volume(dicom)
scroller_png(volume, volume.shape[0] // 2)
pipeline.encode(volume)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def bench_peak_rss(inputs: BenchInputs, checkpoint: str | None, repeats: int) -> float:
    """Median over fresh processes of the peak resident memory (MB) of a model serving two CT sessions."""
    peaks = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", _SESSION_SCRIPT, checkpoint or "", str(inputs.ct_nifti),
                                 str(inputs.ct_dicom)], cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"the memory benchmark's process failed: {result.stderr.strip()[-2000:]}")
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    return statistics.median(peaks)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def app_ready_once(checkpoint: str | None) -> float:
    """Seconds from starting `python app.py` (on a free port) to HTTP 200 on "/"; the process is ended after."""
    port = _free_port()
    env = _child_env(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                     **({"MEDVLM_CHECKPOINT": checkpoint} if checkpoint else {}))
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty app never blocks on a full pipe
        start = time.perf_counter()
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            while not _answers(f"http://127.0.0.1:{port}/"):
                if app.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"app.py exited with status {app.returncode} before answering: "
                                       f"{log.read().decode(errors='replace').strip()[-2000:]}")
                if time.perf_counter() - start > APP_READY_TIMEOUT_S:
                    raise RuntimeError(f"app.py did not answer HTTP within {APP_READY_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
            return time.perf_counter() - start
        finally:
            _end_process_group(app)


def _end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group we started (the app and anything it spawned), SIGKILL after 15 s."""
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# --- real size (CUDA) --------------------------------------------------------------------------------------

def real_size_config(tokenizer):
    """The real-size configuration: ViT-B/16 at 224 (12 layers, width 768), K = 32 slices, 4×8×8 = 256 visual
    tokens, and a Llama-style LM of about 1.5 B parameters (hidden 1536, 32 layers, 12 query / 2 key-value
    heads, MLP 8960: Qwen2.5-1.5B's widths) over `tokenizer`'s vocabulary."""
    from .configuration import MedVLMConfig
    from .tokenizer import IMAGE_TOKEN

    return MedVLMConfig(
        vision_config={"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "image_size": 224, "patch_size": 16},
        text_config={"model_type": "llama", "hidden_size": 1536, "num_hidden_layers": 32, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": len(tokenizer),
                     "max_position_embeddings": 4096, "tie_word_embeddings": True},
        image_size=224, slice_budget=32, compressor_grid=[4, 8, 8], selection_preview_size=112,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def real_size_tokenizer():
    """A BPE tokenizer with the chat template and image token, trained on phantom reports (fast, offline)."""
    from .phantom_text import write_report
    from .tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    return train_tokenizer([write_report("CT", "arterial", [], rng) for _ in range(200)], vocab_size=2048)


def real_size_pipeline(device: str = "cuda"):
    """`real_size_config` from random weights (seed 0), built on `device` and cast to bfloat16."""
    import torch

    from .modeling import MedVLMForConditionalGeneration
    from .pipeline import Pipeline

    tokenizer = real_size_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = MedVLMForConditionalGeneration(real_size_config(tokenizer))
    return Pipeline(model.to(torch.bfloat16), tokenizer, "real-size configuration (random weights)")


def bench_real_size(inputs: BenchInputs, repeats: int) -> dict[str, Any]:
    """encode_s, encode_all_slices_s, kept/total slices, ttft_s, tokens_per_s, followup_ttft_s of the real-size
    configuration on CUDA, on the 300-slice CT."""
    import torch

    from .volume import load_volume

    pipeline = real_size_pipeline("cuda")
    parameters = sum(p.numel() for p in pipeline.model.parameters())
    figures: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "parameters": parameters, "dtype": "bfloat16"}
    figures.update(bench_encode(pipeline, load_volume(inputs.ct_nifti), repeats))
    figures.update(bench_generation(pipeline, inputs.ct_nifti, repeats))
    return figures


# --- all of it ---------------------------------------------------------------------------------------------

def run_benchmark(size: str = "full", device: str = "cpu", repeats: int = 5, checkpoint: str | None = None,
                  app_repeats: int = 3) -> dict[str, Any]:
    """Every figure of the benchmark as one JSON-ready dict (see the module docstring for what each measures).

    size: "full" (300×512×512 CT) or "tiny" (a small CT, for tests); checkpoint: folder of the model to time
    (None: the demo checkpoint); device "cuda" adds `real_size`, and raises UserInputError without CUDA.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    from .pipeline import Pipeline
    from .volume import load_volume

    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; choose one of {', '.join(SIZES)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda needs a CUDA GPU and a CUDA build of torch, and this machine has none; "
                           "run the benchmark with --device cpu")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    transformers_logging.disable_progress_bar()
    figures: dict[str, Any] = {"machine": machine(), "size": size, "device": device, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="medvlm-bench-") as folder:
        inputs = make_inputs(Path(folder), SIZES[size])
        figures["inputs"] = inputs.facts
        figures["load_nifti_s"] = _median_s(lambda: load_volume(inputs.ct_nifti), repeats)
        figures["load_dicom_s"] = _median_s(lambda: load_volume(inputs.ct_dicom), repeats)
        ct = load_volume(inputs.ct_nifti)
        figures.update(bench_viewer(ct, repeats))
        figures["view3d_naive_bytes"] = len(naive_view3d_json(ct))
        pipeline = Pipeline.from_pretrained(checkpoint, device=device)
        figures["checkpoint"] = pipeline.describe()
        figures.update(bench_encode(pipeline, ct, repeats))
        del ct
        figures.update(bench_generation(pipeline, inputs.ct_nifti, repeats))
        mr = load_volume(inputs.mr_nifti)
        figures["mr_brain"] = {"shape": list(mr.shape),
                               "load_nifti_s": _median_s(lambda: load_volume(inputs.mr_nifti), repeats),
                               **bench_viewer(mr, repeats),
                               **{key: value for key, value in bench_encode(pipeline, mr, repeats).items()
                                  if key in ("encode_s", "kept_slices", "total_slices")}}
        del mr, pipeline
        figures["peak_rss_mb"] = bench_peak_rss(inputs, checkpoint, min(repeats, 3))
        figures["app_ready_s"] = statistics.median(app_ready_once(checkpoint) for _ in range(max(1, app_repeats)))
        if device == "cuda":
            figures["real_size"] = bench_real_size(inputs, repeats)
    return figures


@dataclass(frozen=True)
class Target:
    """A figure's target: at most `limit`, and at most `share` × the figure `baseline` of the same run."""

    limit: float | None = None  # the figure's most, in its own unit
    baseline: str | None = None  # the figure of the same run it is held against
    share: float | None = None  # the most it may be, as a share of `baseline`

    def met(self, value: float, figures: dict[str, Any]) -> bool:
        within_limit = self.limit is None or value <= self.limit
        return within_limit and (self.baseline is None or value <= self.share * figures[self.baseline])

    def __str__(self) -> str:
        parts = [] if self.limit is None else [f"≤ {_figure_text(self.limit)}"]
        if self.baseline is not None:
            parts.append(f"≤ {self.share:.2g} × {self.baseline}")
        return " and ".join(parts)


# The targets (README, Performance): the demo checkpoint on a 2-core CPU, and with --device cuda the real-size
# configuration in bf16 on a GPU.
TARGETS = {"load_nifti_s": Target(2), "load_dicom_s": Target(5), "slice_render_ms": Target(25),
           "view3d_s": Target(1.5), "view3d_bytes": Target(1.5e6, "view3d_naive_bytes", 1 / 3),
           "encode_s": Target(baseline="encode_all_slices_s", share=0.6), "ttft_s": Target(4),
           "followup_ttft_s": Target(baseline="ttft_s", share=0.15), "peak_rss_mb": Target(3000),
           "app_ready_s": Target(20)}
REAL_SIZE_TARGETS = {"encode_s": Target(0.5), "ttft_s": Target(1)}


def _figure_text(value: float) -> str:
    """A figure as a reader takes it in: 154,815 and 2,318, not 1.548e+05; 0.231 and 4.4 to four digits."""
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def summary_table(figures: dict[str, Any]) -> str:
    """The figures as aligned text lines, for `bench` without --json: each figure with its value and, where it
    has one, its target and whether this run met it; the MR brain's and the real-size configuration's figures
    under their own prefix. The targets are judged only for the run they describe: the demo checkpoint's at full
    size on the CPU, and the real-size configuration's on a GPU."""
    about = figures["machine"]
    demo_run = (figures.get("size") == "full" and figures.get("device") == "cpu"
                and bool(figures.get("checkpoint", {}).get("demo")))
    lines = [f"machine: {about['cpu']}, {about['cores']} cores, torch {about['torch']}; "
             f"median of {figures['repeats']} runs",
             f"{'figure':<28}  {'value':>12}  {'target':<46}  met"]
    if not demo_run:
        lines.insert(1, "(the targets are for the demo checkpoint at full size on the CPU: not judged for this run)")

    def add(prefix: str, measured: dict[str, Any], targets: dict[str, Target], judged: bool) -> None:
        for key, value in measured.items():
            if key == "repeats" or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            target = targets.get(key)
            verdict = "" if target is None else ("yes" if target.met(value, measured) else "no") if judged else "—"
            lines.append(f"{prefix + key:<28}  {_figure_text(value):>12}  {target or ''!s:<46}  {verdict}".rstrip())

    add("", figures, TARGETS, demo_run)
    add("mr_brain.", figures.get("mr_brain", {}), {}, False)
    add("real_size.", figures.get("real_size", {}), REAL_SIZE_TARGETS, figures.get("device") == "cuda")
    return "\n".join(lines)


__all__ = ["REAL_SIZE_TARGETS", "SIZES", "TARGETS", "BenchSize", "Target", "all_slices_pipeline", "app_ready_once",
           "fit_grid", "machine", "make_inputs", "naive_view3d_json", "real_size_config", "real_size_pipeline",
           "real_size_tokenizer", "run_benchmark", "scroller_png", "summary_table"]
