"""A smoke run of the real configuration where the Hub cannot be reached: one epoch of each M3D stage at
the real sizes (ViT-B/16 at 224, K = 32, 256 visual tokens, a Qwen2.5-1.5B-shaped LM + LoRA, bf16,
gradient checkpointing) from random weights, on phantoms written as M3D .npy (1×32×256×256).

    python tests/gpu_smoke.py --out /tmp/smoke                  # on a GPU machine: real sizes
    python tests/gpu_smoke.py --out /tmp/smoke --size tiny      # anywhere: the same steps at toy size

Prints, as its last line, one JSON object: the device, seconds per batch of each stage (from
metrics.csv: an epoch's wall time, validation included, over its batches), peak GPU memory, wall
time. The weights are random, so the losses mean nothing; the step time and memory are the real
configuration's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seconds_per_batch(metrics: Path) -> dict[str, float]:
    """Per stage, the last epoch's wall time over its batches (rows with a validation loss end an epoch)."""
    ends: dict[str, list[tuple[int, float]]] = {}
    with metrics.open() as handle:
        for row in csv.DictReader(handle):
            if row["val_loss"]:
                ends.setdefault(row["stage"], []).append((int(row["step"]), float(row["seconds"])))
    result = {}
    for stage, rows in ends.items():
        (step, seconds), previous = rows[-1], rows[-2] if len(rows) > 1 else (0, 0.0)
        result[stage] = round((seconds - previous[1]) / max(step - previous[0], 1), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (phantoms, Hub stand-ins, checkpoint)")
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--scans", type=int, default=24, help="phantoms to write (real: 1×32×256×256 each)")
    args = parser.parse_args()
    # Before huggingface_hub is imported: the presets' repo ids resolve in this cache, offline.
    os.environ |= {"HF_HUB_CACHE": str(args.out / "hub"), "HF_HUB_OFFLINE": "1"}
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch
    from hub_stand_ins import smoke_preset, write_stand_ins

    from medvlm.phantom import write_phantom_set
    from medvlm.train import read_samples, train

    started = time.perf_counter()
    data = args.out / "m3d"
    real = args.size == "real"
    if not (data / "M3D_Cap.json").exists():
        shape = (32, 256, 256) if real else (8, 32, 32)
        write_phantom_set(data, n=args.scans, seed=9, formats=("npy",), npy_shape=shape, matrix=160 if real else 64)
    texts = [turn["content"] for sample in read_samples(data, "train") for turn in sample.messages]
    write_stand_ins(args.out / "hub", texts, args.size)
    preset = smoke_preset(args.out / "smoke-preset.json", args.size)
    prepared = time.perf_counter()
    checkpoint = train(str(preset), data, args.out / "checkpoint", seed=0)
    cuda = torch.cuda.is_available()
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu", "size": args.size, "torch": torch.__version__,
        "seconds_per_batch": seconds_per_batch(checkpoint.with_name("checkpoint-training") / "metrics.csv"),
        "batch_size": {stage["name"]: stage["batch_size"] for stage in json.loads(preset.read_text())["stages"]},
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "prepare_s": round(prepared - started, 1), "train_s": round(time.perf_counter() - prepared, 1),
    }))


if __name__ == "__main__":
    main()
