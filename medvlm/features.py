"""The frozen-encoder feature cache: stages 1–2 run once per scan, training epochs read the result.

Because the 2D encoder is frozen, what it makes of a scan never changes during training; the
kept slices' patch grids are stored in safetensors shards (memory-mapped when read), keyed by
the scan's path, with a fingerprint of everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .modeling import MedVLMForConditionalGeneration, ScanSlices
from .preprocess import encoder_input
from .volume import Volume

INDEX_FILE = "features.json"
FEATURE_FIELDS = ("image_size", "ct_windows", "image_mean", "image_std", "slice_spacing_mm", "max_input_slices",
                  "slice_selection", "similarity_threshold", "slice_budget", "selection_preview_size")


def encoder_fingerprint(model: MedVLMForConditionalGeneration) -> str:
    """Hash of the encoder weights and the preprocessing/selection settings: equal → equal features.

    The 3D baseline caches its input (the resampled volume): no frozen weights, its volume shape instead.
    """
    digest = hashlib.blake2b(digest_size=12)
    settings = {name: getattr(model.config, name) for name in FEATURE_FIELDS}
    frozen = model.slice_encoder.state_dict() if model.config.visual_path == "slices" else {}
    if model.config.visual_path == "vit3d":
        settings["volume_shape"] = list(model.config.volume_shape)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(frozen.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def scan_slices(model: MedVLMForConditionalGeneration, volume: Volume) -> ScanSlices:
    """Stages 1–2 for one scan on the model's device: the kept slices and their patch grids."""
    pixel_values, heights = encoder_input(volume, model.config)
    return model.choose_slices(pixel_values.to(model.device), heights.to(model.device))


class FeatureCache:
    """Kept-slice features per scan (`ScanSlices` on the CPU), keyed by the scan's path."""

    def __init__(self, entries: dict[str, ScanSlices], fingerprint: str):
        self.entries = entries
        self.fingerprint = fingerprint

    def __getitem__(self, image: str) -> ScanSlices:
        return self.entries[image]

    def __contains__(self, image: str) -> bool:
        return image in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def build(cls, model: MedVLMForConditionalGeneration, images: Iterable[str],
              load: Callable[[str], Volume], progress: bool = True) -> FeatureCache:
        """Encode every scan once; `load(image)` reads the scan behind a key."""
        images = sorted(set(images))
        entries = {}
        for image in tqdm(images, desc="encoding slices", disable=not progress, unit="scan"):
            scan = scan_slices(model, load(image))
            entries[image] = ScanSlices(scan.patches.to("cpu", torch.float16), scan.kept.cpu(), scan.heights.cpu(),
                                        scan.total, scan.encoded, scan.previewed)
        return cls(entries, encoder_fingerprint(model))

    def save(self, folder: str | Path, shard_size: int = 512) -> Path:
        """Write shards `features-00000.safetensors` … and an index with the fingerprint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        images = sorted(self.entries)
        shards, counts = {}, {}
        for number, start in enumerate(range(0, len(images), shard_size)):
            name = f"features-{number:05d}.safetensors"
            tensors = {}
            for offset, image in enumerate(images[start:start + shard_size]):
                scan = self.entries[image]
                key = str(start + offset)
                tensors |= {f"{key}.patches": scan.patches.contiguous(), f"{key}.kept": scan.kept,
                            f"{key}.heights": scan.heights}
                shards[image] = [name, key]
                counts[image] = [scan.total, scan.encoded, scan.previewed]
            save_file(tensors, folder / name)
        index = {"fingerprint": self.fingerprint, "shards": shards, "counts": counts}
        (folder / INDEX_FILE).write_text(json.dumps(index))
        return folder

    @classmethod
    def load(cls, folder: str | Path, fingerprint: str | None = None) -> FeatureCache:
        """Read a saved cache (tensors memory-mapped); refuse one made by another encoder or settings."""
        folder = Path(folder)
        index = json.loads((folder / INDEX_FILE).read_text())
        if fingerprint is not None and index["fingerprint"] != fingerprint:
            raise ValueError(f"the feature cache in {folder} was made with another encoder or other preprocessing "
                             "settings; delete it or run `python -m medvlm features` again")
        entries, handles = {}, {}
        for image, (shard, key) in index["shards"].items():
            if shard not in handles:
                handles[shard] = safe_open(folder / shard, framework="pt")
            handle = handles[shard]
            total, encoded, previewed = index["counts"][image]
            entries[image] = ScanSlices(handle.get_tensor(f"{key}.patches"), handle.get_tensor(f"{key}.kept"),
                                        handle.get_tensor(f"{key}.heights"), total, encoded, previewed)
        return cls(entries, index["fingerprint"])
