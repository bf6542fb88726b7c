"""The frozen-encoder feature cache: stages 1–2 run once per scan, training epochs read the result.

Because the 2D encoder is frozen, what it makes of a scan never changes during training; the
kept slices' patch grids are stored in safetensors shards (memory-mapped when read), keyed by
the scan's path, with a fingerprint of everything that determines them.

    python -m medvlm features --checkpoint-or-preset m3d-biomedclip-qwen --data M3D --out FEATURES
    accelerate launch -m medvlm features ...    # each process encodes its share; the shards merge

Several processes (accelerate) each encode their share of the scans and save their own shards
(`features-r<round>-part003-00000.safetensors`, index `features-r<round>-part003.json`); the main process
then merges the indexes into `features.json`. A cache that lacks some scans, or holds some rewritten since
(another file size or time, and other content than its digest), encodes only those, and shards that hold nothing
the index points to any more are deleted; a scan copied without its file times (cp -r) is not encoded again. On
several nodes the folder must be on a shared disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import load_scan, scan_digest, scan_stamps
from .errors import UserInputError
from .modeling import MedVLMForConditionalGeneration, ScanSlices
from .preprocess import PREPROCESSING_VERSION, readable_encoder_input
from .volume import Volume

INDEX_FILE = "features.json"
INDEX_ENTRIES = ("shards", "counts", "stamps", "digests")  # an index's keys that hold one entry per scan
PART_INDEX = re.compile(r"features-((?:r\d+-)?part\d+)\.json")
FEATURE_FIELDS = ("image_size", "ct_windows", "image_mean", "image_std", "slice_spacing_mm", "max_input_slices",
                  "slice_selection", "similarity_threshold", "slice_budget", "selection_preview_size")


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` started (one, when run plainly).

    CPU processes (ACCELERATE_USE_CPU=1, as `accelerate launch --cpu` sets) join over gloo.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def encoder_fingerprint(model: MedVLMForConditionalGeneration) -> str:
    """Hash of the encoder weights and the preprocessing/selection settings: equal → equal features.

    The 3D baseline caches its input (the resampled volume): no frozen weights, its volume shape instead.
    """
    digest = hashlib.blake2b(digest_size=12)
    settings = {name: getattr(model.config, name) for name in FEATURE_FIELDS}
    settings["preprocessing"] = PREPROCESSING_VERSION
    frozen = model.slice_encoder.state_dict() if model.config.visual_path == "slices" else {}
    if model.config.visual_path == "vit3d":
        settings["volume_shape"] = list(model.config.volume_shape)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(frozen.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def scan_slices(model: MedVLMForConditionalGeneration, volume: Volume, image: str) -> ScanSlices:
    """Stages 1–2 for one scan on the model's device, its preprocessing too (on a GPU the resizing runs there,
    as `Pipeline.encode`'s does): the kept slices and their patch grids. A blank scan is refused, as there,
    naming `image` (its path in the data folder): training on it would teach reports of nothing."""
    try:
        pixel_values, heights = readable_encoder_input(volume, model.config, device=model.device)
    except UserInputError as refusal:
        raise UserInputError(f"{image}: {refusal}") from None
    return model.choose_slices(pixel_values, heights)


class FeatureCache:
    """Kept-slice features per scan (`ScanSlices` on the CPU), keyed by the scan's path; `stamps`: each scan
    file's size and modification time when it was encoded (`data.scan_stamps`), to tell a rewritten scan;
    `digests`: its content's digest (`data.scan_digest`), to tell a scan rewritten from one copied or touched."""

    def __init__(self, entries: dict[str, ScanSlices], fingerprint: str, stamps: dict[str, list[int]] | None = None,
                 digests: dict[str, str] | None = None):
        self.entries = entries
        self.fingerprint = fingerprint
        self.stamps = stamps or {}
        self.digests = digests or {}

    def __getitem__(self, image: str) -> ScanSlices:
        return self.entries[image]

    def __contains__(self, image: str) -> bool:
        return image in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def changed(self, stamps: dict[str, list[int]]) -> list[str]:
        """The scans of `stamps` this cache holds that were rewritten since it encoded them. For scans encoded
        before stamps were kept (`unstamped`) it cannot tell: not among them."""
        return [image for image, stamp in stamps.items()
                if image in self.entries and image in self.stamps and self.stamps[image] != stamp]

    def unstamped(self, images: Iterable[str]) -> str:
        """A sentence when the cache holds some of `images` without a file stamp (encoded before December 2026,
        when stamps were first kept), else ""."""
        count = sum(image in self.entries and image not in self.stamps for image in images)
        return ("" if not count else
                f"the feature cache holds {count} scan(s) encoded before file stamps were kept, so whether they "
                "were rewritten since cannot be told; run `python -m medvlm features` again if they were")

    def content_digest(self, images: Iterable[str]) -> str | None:
        """One digest of the content of the scans `images` (their paths and `digests`): what a run's stages are
        trained on. None where the cache holds some without a digest (encoded before December 2026, when digests
        were first kept)."""
        images = sorted(set(images))
        if not all(image in self.digests for image in images):
            return None
        return hashlib.sha256(json.dumps([[image, self.digests[image]] for image in images]).encode()).hexdigest()

    @classmethod
    def build(cls, model: MedVLMForConditionalGeneration, images: Iterable[str],
              load: Callable[[str], Volume], progress: bool = True) -> FeatureCache:
        """Encode every scan once; `load(image)` reads the scan behind a key."""
        images = sorted(set(images))
        entries = {}
        for image in tqdm(images, desc="encoding slices", disable=not progress, unit="scan"):
            scan = scan_slices(model, load(image), image)
            entries[image] = ScanSlices(scan.patches.to("cpu", torch.float16), scan.kept.cpu(), scan.heights.cpu(),
                                        scan.total, scan.encoded, scan.previewed)
        return cls(entries, encoder_fingerprint(model))

    def save(self, folder: str | Path, shard_size: int = 512, part: str | None = None) -> Path:
        """Write shards `features-00000.safetensors` … and an index with the fingerprint.

        With `part` (one process's share), shards `features-PART-00000.safetensors` … and the index
        `features-PART.json`, to be merged by `merge_parts`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"features-{part}" if part else "features"
        images = sorted(self.entries)
        shards, counts = {}, {}
        for number, start in enumerate(range(0, len(images), shard_size)):
            name = f"{prefix}-{number:05d}.safetensors"
            tensors = {}
            for offset, image in enumerate(images[start:start + shard_size]):
                scan = self.entries[image]
                key = str(start + offset)
                tensors |= {f"{key}.patches": scan.patches.contiguous(), f"{key}.kept": scan.kept,
                            f"{key}.heights": scan.heights}
                shards[image] = [name, key]
                counts[image] = [scan.total, scan.encoded, scan.previewed]
            save_file(tensors, folder / name)
        index = {"fingerprint": self.fingerprint, "shards": shards, "counts": counts, "stamps": self.stamps,
                 "digests": self.digests}
        _write_index(folder / (f"{prefix}.json" if part else INDEX_FILE), index)
        return folder

    @staticmethod
    def merge_parts(folder: str | Path, kept: dict | None = None) -> Path:
        """Merge the part indexes of `folder` (one per process) into its `features.json`, over the entries of
        `kept` (an index of scans not encoded again); delete the shards nothing points to. Returns the index."""
        folder = Path(folder)
        parts = sorted(path for path in folder.glob("features-*.json") if PART_INDEX.fullmatch(path.name))
        indexes = [json.loads(path.read_text()) for path in parts]
        fingerprints = {index["fingerprint"] for index in indexes}
        if len(fingerprints) != 1:
            raise ValueError(f"the feature shards in {folder} come from {len(fingerprints)} different encoders or "
                             "settings; delete the folder and encode again")
        merged = {"fingerprint": fingerprints.pop(), **{key: {} for key in INDEX_ENTRIES}}
        if kept is not None:
            if kept["fingerprint"] != merged["fingerprint"]:
                raise ValueError(f"the feature shards in {folder} come from 2 different encoders or settings; "
                                 "delete the folder and encode again")
            merged |= {key: dict(kept.get(key, {})) for key in INDEX_ENTRIES}
        for index in indexes:
            for key in INDEX_ENTRIES:
                merged[key] |= index.get(key, {})
        _write_index(folder / INDEX_FILE, merged)
        for path in parts:
            path.unlink()
        _delete_unused_shards(folder, merged)
        return folder / INDEX_FILE

    @classmethod
    def load(cls, folder: str | Path, fingerprint: str | None = None, index: dict | None = None) -> FeatureCache:
        """Read a saved cache (tensors memory-mapped), or the one `index` (its features.json, already read)
        describes; refuse one made by another encoder or settings."""
        folder = Path(folder)
        index = json.loads((folder / INDEX_FILE).read_text()) if index is None else index
        if fingerprint is not None and index["fingerprint"] != fingerprint:
            raise UserInputError(f"the feature cache in {folder} was made with another encoder or other "
                                 "preprocessing settings; delete it or run `python -m medvlm features` again")
        entries, handles = {}, {}
        for image, (shard, key) in index["shards"].items():
            if shard not in handles:
                handles[shard] = safe_open(folder / shard, framework="pt")
            handle = handles[shard]
            total, encoded, previewed = index["counts"][image]
            entries[image] = ScanSlices(handle.get_tensor(f"{key}.patches"), handle.get_tensor(f"{key}.kept"),
                                        handle.get_tensor(f"{key}.heights"), total, encoded, previewed)
        return cls(entries, index["fingerprint"], index.get("stamps", {}), index.get("digests", {}))


def _write_index(path: Path, index: dict) -> None:
    """Write an index whole or not at all (written beside it, then renamed): one cut off would cost the cache."""
    written = path.with_name(f"{path.name}.partial")
    written.write_text(json.dumps(index))
    os.replace(written, path)


def _delete_unused_shards(folder: Path, index: dict | None) -> None:
    """Delete the shards of `folder` that `index` does not point to (all, for None), and part indexes left
    unmerged by a run that stopped."""
    used = set() if index is None else {shard for shard, _ in index["shards"].values()}
    for path in [*folder.glob("features-*.safetensors"), *folder.glob("features-*.json")]:
        if path.name not in used:
            path.unlink()
    if index is None:
        (folder / INDEX_FILE).unlink(missing_ok=True)


def same_content(root: str | Path, digests: dict[str, str]) -> set[str]:
    """The scans of `digests` (path relative to `root` → the content digest a cache keeps) whose files hold that
    content still: copied without their file times (cp -r, a node's local disk) or touched, not rewritten. Each
    process (accelerate) hashes its share, and every process returns the whole set, so all must call it with the
    same `digests`. A scan that cannot be read is not among them: loading it will say why."""
    state = process_state()
    with state.split_between_processes(sorted(digests)) as share:
        same = []
        for image in share:
            with contextlib.suppress(OSError, UserInputError):
                if scan_digest(root, image) == digests[image]:
                    same.append(image)
    return set(gather_object(same)) if state.num_processes > 1 else set(same)


def build_feature_cache(model: MedVLMForConditionalGeneration, root: str | Path, images: Iterable[str],
                        folder: str | Path, shard_size: int = 512) -> FeatureCache:
    """The cache in `folder` of the scans `images` (paths relative to `root`), each process (accelerate) encoding
    its share. A cache made by this encoder and settings is kept: only the scans it lacks, or holds rewritten since
    (other file size or time, and content other than the digest it keeps, where it keeps one), are encoded and
    merged into it, and a scan only copied or touched gets its new stamp; one made otherwise is replaced. Every
    process returns the whole cache, memory-mapped."""
    root, folder, images = Path(root), Path(folder), sorted(set(images))
    state = process_state()
    fingerprint = encoder_fingerprint(model)
    # The main process plans for all, with its own stamps: processes on other machines may see other file times,
    # and one that went on alone would wait for the others for ever. `changed`: the scans with other stamps, each
    # with the digest the cache keeps of it (None: encoded before digests were kept, so encoded again).
    plan = [{"lacking": images, "changed": {}, "kept": None, "stamps": scan_stamps(root, images),
             "round": time.time_ns()}]
    if state.is_main_process and (folder / INDEX_FILE).exists():
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            if index.get("fingerprint") != fingerprint:
                raise ValueError(f"the feature cache in {folder} was made by another encoder or with other "
                                 "preprocessing settings")
            cache = FeatureCache.load(folder, fingerprint, index)
            lacking = [image for image in images if image not in cache]
            if lacking:
                print(f"the feature cache in {folder} lacks {len(lacking)} of the scans: encoding them")
            if cache.unstamped(images):
                print(f"note: {cache.unstamped(images)}")
            plan[0] |= {"lacking": lacking, "kept": _index_without(index, lacking),
                        "changed": {image: cache.digests.get(image) for image in cache.changed(plan[0]["stamps"])}}
            del cache  # its memory maps: the shards it no longer needs are deleted below
        except ValueError as stale:
            print(f"{stale}: encoding every scan again")
    if state.num_processes > 1:
        broadcast_object_list(plan)
    plan = plan[0]
    copied = same_content(root, {image: digest for image, digest in plan["changed"].items() if digest})
    rewritten = sorted(set(plan["changed"]) - copied)
    if rewritten:
        state.print(f"the feature cache in {folder} holds {len(rewritten)} scan(s) rewritten since it was made (e.g. "
                    f"{rewritten[0]}): encoding them again")
    kept = None if plan["kept"] is None else _index_without(plan["kept"], rewritten)
    if copied:  # the same content under new file times: only the stamps change
        kept["stamps"] |= {image: plan["stamps"][image] for image in copied}
    encode = sorted({*plan["lacking"], *rewritten})
    if not encode:
        if copied and state.is_main_process:
            _write_index(folder / INDEX_FILE, kept)
        return FeatureCache.load(folder, fingerprint)
    state.wait_for_everyone()
    if state.is_main_process:  # a stale cache goes whole; a kept one loses only what it no longer points to
        folder.mkdir(parents=True, exist_ok=True)
        if kept is not None:  # first the index, so that a run stopped now leaves a cache that loads
            _write_index(folder / INDEX_FILE, kept)
        _delete_unused_shards(folder, kept)
    state.wait_for_everyone()
    with state.split_between_processes(encode) as share:
        part = FeatureCache.build(model, share, functools.partial(load_scan, root),
                                  progress=state.is_local_main_process)
    part.stamps = {image: plan["stamps"][image] for image in part.entries}
    part.digests = {image: scan_digest(root, image) for image in part.entries}
    part.save(folder, shard_size, part=f"r{plan['round']}-part{state.process_index:03d}")
    state.wait_for_everyone()
    if state.is_main_process:
        FeatureCache.merge_parts(folder, kept)
    state.wait_for_everyone()
    return FeatureCache.load(folder, fingerprint)


def _index_without(index: dict, images: Iterable[str]) -> dict:
    """A cache's index without the entries of `images` (to be encoded again)."""
    images = set(images)
    return {"fingerprint": index["fingerprint"],
            **{key: {image: value for image, value in index.get(key, {}).items() if image not in images}
               for key in INDEX_ENTRIES}}


class VolumeFeatures:
    """The same lookup as `FeatureCache`, computed on request: training straight from the volumes.

    Each request loads the scan and runs stages 1–2 on the model's device, so the frozen encoder
    runs every epoch; what a cache saves.
    """

    def __init__(self, model: MedVLMForConditionalGeneration, load: Callable[[str], Volume]):
        self.model, self.load = model, load

    def __getitem__(self, image: str) -> ScanSlices:
        return scan_slices(self.model, self.load(image), image)

    def __contains__(self, image: str) -> bool:
        return True


def encoding_model(checkpoint_or_preset: str, revision: str | None = None) -> MedVLMForConditionalGeneration:
    """The model whose stages 1–2 fill a cache: a preset's (as `train` builds it) or a checkpoint's.

    To train from the cache, give the same preset as `train`: a saved checkpoint's encoder weights are
    rounded to its save dtype, so its fingerprint differs.
    """
    from .pipeline import checkpoint_named, load_model, resolve_checkpoint
    from .train import PRESETS, build_encoding_model, load_preset

    name = str(checkpoint_or_preset)
    if name.endswith(".json") or (PRESETS / f"{name}.json").exists():
        if revision is not None:
            raise UserInputError(f"--revision picks a version of a Hub checkpoint, and {name} is a preset; leave "
                                 "it out, or name the checkpoint")
        return build_encoding_model(load_preset(name))  # a file that is not a preset: UserInputError, naming it
    return load_model(resolve_checkpoint(name, revision), checkpoint_named(name, revision))


def encode_data_folder(checkpoint_or_preset: str, data: str | Path, out: str | Path,
                       splits: tuple[str, ...] = ("train", "validation"), revision: str | None = None,
                       shard_size: int = 512) -> Path:
    """`python -m medvlm features`: cache every scan of `splits` of an M3D-format folder; returns the index file.

    Under accelerate each process encodes its share on its own device.
    """
    from .train import read_samples

    root = Path(data)
    try:
        images = sorted({sample.image for split in splits for sample in read_samples(root, split)})
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if not images:
        raise UserInputError(f"{root} holds no scans in the splits {', '.join(splits)}")
    model = encoding_model(checkpoint_or_preset, revision).to(process_state().device)
    build_feature_cache(model, root, images, out, shard_size)
    return Path(out) / INDEX_FILE
