"""Load a checkpoint (folder or Hub repo id), encode scans once, stream reports and chat answers."""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.utils import logging as transformers_logging

from .configuration import MedVLMConfig
from .errors import CheckpointError, UserInputError
from .limits import MAX_NEW_TOKENS, MAX_QUESTION_CHARS, MIN_ANSWER_TOKENS
from .modeling import MedVLMForConditionalGeneration
from .preprocess import readable_encoder_input, slab_bounds, slab_middle
from .prompt import prompt_text
from .volume import Volume

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
ENCODING_CACHE_SIZE = 16  # scans whose visual tokens are kept for follow-up questions
LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how a file that git-lfs never fetched begins
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a checkpoint holds one or both
HELD_OUT_EVALUATION = "eval_heldout.json"  # `medvlm eval`'s JSON on held-out scans, if shipped beside the weights


@dataclass
class Encoding:
    """A scan as the LM sees it.

    visual_tokens: (1, N, H) on the model's device; kept_slabs: for each slab the model kept, the axial indices
    (into `volume.data`) of the first and last slice it averages (one slice, where the encoder input is the volume's
    own slices); kept_slices: the middle slice of each; total_slices: slices (slabs) the encoder input had; timings:
    seconds per step; kept_inputs: the kept slabs' indices into the encoder input (0 … total_slices − 1).
    """

    visual_tokens: torch.Tensor
    kept_slabs: list[tuple[int, int]]
    total_slices: int
    timings: dict[str, float] = field(default_factory=dict)
    kept_inputs: list[int] = field(default_factory=list)

    @property
    def kept_slices(self) -> list[int]:
        """The middle axial slice of each kept slab: where the viewer goes to show one."""
        return [slab_middle(first, last) for first, last in self.kept_slabs]

    def to(self, device: str | torch.device) -> Encoding:
        """The same encoding with its visual tokens on `device` (the CPU, to pass it to another process)."""
        return replace(self, visual_tokens=self.visual_tokens.to(device))


def resolve_checkpoint(checkpoint: str | Path | None, revision: str | None = None) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a Hub repo's snapshot.

    None means the demo checkpoint shipped in assets/. Hub downloads go through
    huggingface_hub (so HF_HUB_OFFLINE=1 and its cache apply). Raises CheckpointError.
    """
    if revision and (checkpoint is None or Path(checkpoint).expanduser().is_dir()):
        where = "the demo checkpoint" if checkpoint is None else f"{str(checkpoint)!r}, a local folder"
        raise CheckpointError(f"a revision ({revision!r}) names a version of a Hub repo, and the checkpoint is "
                              f"{where}; give a Hub repo id with it, or no revision")
    if checkpoint is None:
        if not DEMO_CHECKPOINT.is_dir():
            raise CheckpointError(f"the demo checkpoint is missing from {DEMO_CHECKPOINT}; restore assets/ "
                                  "from the repository or pass --checkpoint")
        return DEMO_CHECKPOINT
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    name = str(checkpoint)
    if path.exists():
        raise CheckpointError(f"{name!r} is a file, not a checkpoint folder; give the folder that holds its "
                              "config.json and weights")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CheckpointError(f"no checkpoint folder at {name!r}, and it is not a Hub repo id "
                              "(like 'org/model'); check the path") from None
    try:
        return Path(snapshot_download(repo_id=name, revision=revision))
    except Exception as error:  # huggingface_hub raises many types: not found, offline, gated, network
        from huggingface_hub import constants

        where = checkpoint_named(name, revision)
        # A folder's name mistyped is a valid repo id too (a revision asked for means a repo)
        no_folder = "" if revision else f" (and there is no folder {name!r} here)"
        if constants.HF_HUB_OFFLINE:  # its own text is three sentences, and this is what they come to
            raise CheckpointError(f"checkpoint {where} is not in the local Hugging Face cache{no_folder}, and "
                                  "HF_HUB_OFFLINE=1 keeps it from being downloaded; download it once with the "
                                  "network, or check the repo id and revision") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"could not fetch checkpoint {where} from the Hugging Face Hub ({reason}){no_folder}; "
                              "check the repo id, your network or HF_TOKEN") from None


def checkpoint_named(checkpoint: str | Path, revision: str | None = None) -> str:
    """A checkpoint as messages name it: quoted, with the Hub revision asked for."""
    return repr(str(checkpoint)) + (f" at revision {revision!r}" if revision else "")


def _check_checkpoint_folder(folder: Path, name: str) -> dict:
    """A MedVLM config.json (returned, as read), a tokenizer, and real files rather than the pointers a clone
    without git-lfs leaves."""
    pointers = [path.name for path in sorted(folder.iterdir())
                if path.is_file() and path.stat().st_size < 1024 and path.read_bytes().startswith(LFS_POINTER)]
    if pointers:
        raise CheckpointError(f"{name} holds Git LFS pointers in place of {', '.join(pointers)} (it was cloned "
                              f"without git-lfs); install git-lfs and run `git lfs pull` in {folder}")
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{name} has no readable config.json; it is not a MedVLM checkpoint") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "medvlm":
        raise CheckpointError(f"{name} is a {model_type!r} model, not a MedVLM checkpoint")
    if not isinstance(config.get("text_config"), dict):  # transformers would build a default 7B-parameter Llama
        raise CheckpointError(f"the config.json of {name} describes no language model (text_config); save the "
                              "checkpoint again with save_pretrained")
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):  # checked before minutes of weight loading
        raise CheckpointError(f"{name} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer "
                              "beside the weights with tokenizer.save_pretrained")
    return config


def load_tokenizer(folder: Path, name: str):
    """The tokenizer of a checkpoint folder (as `resolve_checkpoint` gives it), checked against its config.json
    as every report needs it: a chat template, and the scan placeholder (config.image_token) read as the one
    token config.image_token_id. Raises CheckpointError naming what is missing or does not fit; `name` is the
    checkpoint as messages call it (`checkpoint_named`)."""
    config = _check_checkpoint_folder(folder, name)
    # Without tokenizer.json transformers builds the vocabulary from whatever else is there, or fails.
    no_vocabulary = (f"{name} has no tokenizer.json (the tokenizer's vocabulary); save the tokenizer beside the "
                     "weights with tokenizer.save_pretrained")
    has_vocabulary = (folder / "tokenizer.json").is_file()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        if not has_vocabulary:
            raise CheckpointError(no_vocabulary) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"could not load the tokenizer of checkpoint {name} ({reason}); download or copy "
                              "the checkpoint again") from None
    if not tokenizer.chat_template:
        raise CheckpointError(f"{name} has no chat template (chat_template.jinja), so no prompt can be written; "
                              "save the tokenizer with its chat template beside the weights, or of a Hub checkpoint "
                              "take a revision that has one")
    image_token = config.get("image_token", MedVLMConfig.image_token)
    image_token_id = config.get("image_token_id", MedVLMConfig.image_token_id)
    if tokenizer(image_token, add_special_tokens=False).input_ids != [image_token_id]:
        if not has_vocabulary:
            raise CheckpointError(no_vocabulary)
        raise CheckpointError(f"the tokenizer of checkpoint {name} does not read the scan placeholder "
                              f"{image_token!r} as token {image_token_id}, as its config.json says; they do not "
                              "belong together: download or copy the checkpoint again")
    vocabulary = config["text_config"].get("vocab_size")
    if isinstance(vocabulary, int) and len(tokenizer) > vocabulary:  # its last tokens would index past the model's
        raise CheckpointError(f"the tokenizer of checkpoint {name} has {len(tokenizer):,} tokens, and its language "
                              f"model reads {vocabulary:,}; they do not belong together: download or copy the "
                              "checkpoint again")
    return tokenizer


def load_model(folder: Path, name: str, **kwargs) -> MedVLMForConditionalGeneration:
    """The model in a checkpoint folder (as `resolve_checkpoint` gives it); `name` is what messages call it
    (`checkpoint_named`).

    In float32 unless `dtype=` says otherwise: checkpoints are stored in float16 to stay small, and
    transformers would load them so, which on a CPU turns the visual tokens to NaN. A folder that holds
    no MedVLM checkpoint, Git LFS pointers in place of its files, or weights that cannot be read (a
    damaged or truncated safetensors file) raise CheckpointError.
    """
    kwargs.setdefault("dtype", torch.float32)
    _check_checkpoint_folder(folder, name)
    if not weight_files(folder):
        raise CheckpointError(f"{name} has no weights (model.safetensors); copy the whole checkpoint folder, or "
                              "download it again")
    bar_shown, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()  # a "Loading weights" bar is noise in the CLI's and app's output
    transformers_logging.set_verbosity_error()  # so is its load report: what it finds wrong is refused below
    mismatch = (f"the weights of checkpoint {name} do not fit the model its config.json describes ({{}}); its "
                "weights and config.json do not belong together: download or copy the checkpoint again")
    try:
        model, info = MedVLMForConditionalGeneration.from_pretrained(folder, output_loading_info=True, **kwargs)
    except SafetensorError as error:
        raise CheckpointError(f"the weights of checkpoint {name} are damaged ({error}); download or copy the "
                              "checkpoint again") from None
    except RuntimeError as error:  # transformers refuses weights of another shape (ignore_mismatched_sizes)
        if "mismatched_sizes" not in str(error):
            raise
        raise CheckpointError(mismatch.format("weights of other shapes")) from None
    except CheckpointError:  # said already (an optional backend, timm, is missing)
        raise
    except (OSError, ValueError) as error:
        raise CheckpointError(f"could not load the checkpoint {name}: {error}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar_shown:
            transformers_logging.enable_progress_bar()
    missing, unused = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])  # transformers would go on
    if missing:  # ... drawing these at random
        raise CheckpointError(mismatch.format(f"{len(missing)} weights missing, e.g. {missing[0]}"))
    if unused:  # ... without these (another variant's parts, LoRA weights never merged)
        raise CheckpointError(mismatch.format(f"{len(unused)} weights the model has no place for, e.g. {unused[0]}"))
    return model


def resolve_device(device: str | None) -> str:
    """"cpu", "cuda" or "cuda:N" as given, checked against this machine; None: "cuda" when there is one."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserInputError(f"unknown device {device!r}; use cpu, cuda or cuda:N (N counts the GPUs from 0)")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"device {device!r} needs a CUDA GPU and a CUDA build of torch, and this machine "
                                 "has none; use cpu")
        if ":" in device and int(device.split(":")[1]) >= count:
            raise UserInputError(f"there is no {device}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                 f"cuda:{count - 1}")
    return device


def default_dtype(device: str, parameters: int = 0) -> torch.dtype:
    """float32 on a CPU; bfloat16 on a GPU that computes in it natively (compute capability 8.0 on: A10G, L4,
    A100, H100). An older GPU (a T4, 7.5) only emulates bfloat16, slowly, and float16 can overflow in LLMs
    trained in bfloat16: float32 there for a model of `parameters` that fits in float32 with room to spare
    (60 % of the GPU's memory), else bfloat16 after all, slow rather than out of memory."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    fits = 4 * parameters <= 0.6 * torch.cuda.get_device_properties(device).total_memory
    return torch.float32 if fits else torch.bfloat16


def checkpoint_parameters(folder: Path) -> int:
    """How many numbers a checkpoint's weights hold, from its safetensors headers (no tensor is read); 0 for
    weights that cannot be read, which `load_model` then names."""
    total = 0
    try:
        for path in Path(folder).glob("*.safetensors"):
            with safe_open(path, framework="pt") as weights:
                names = weights.keys()  # safe_open cannot be iterated itself
                total += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    except (SafetensorError, OSError):
        return 0
    return total


# Sampling temperatures: below the floor, logits divided by it overflow (and sampling is greedy in all but name);
# above the ceiling, every token is about as likely as every other.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
START_AGAIN = "start a new conversation"  # what a conversation too long for the model's context is told to do


def check_generation(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Generation settings a user gives: 1 ≤ max_new_tokens ≤ MAX_NEW_TOKENS, temperature 0 (greedy decoding)
    or MIN_TEMPERATURE … MAX_TEMPERATURE, 0 < top_p ≤ 1; else UserInputError."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserInputError(f"max new tokens {max_new_tokens} is out of range; use 1 to {MAX_NEW_TOKENS} (256 is "
                             "M3D's and the default)")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise UserInputError(f"temperature {temperature:g} is out of range; use 0 for greedy decoding or "
                             f"{MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g} to sample")
    if not 0 < top_p <= 1:
        raise UserInputError(f"top-p {top_p} is out of range; use a value above 0 and at most 1 (1 keeps every "
                             "token)")


class CutOff(str):
    """The last chunk of an answer that ended at its `max_new_tokens` rather than where the model ended it: empty
    text (a joined answer is unchanged) that says the answer is cut off; `limit` is the number of new tokens, and
    `context` the model's context when that, not the limit asked for, ended it (the scan and the conversation
    filled the rest; 0 otherwise: a larger max_new_tokens would not help). A str, so that it crosses a process
    boundary (ZeroGPU) as the other chunks do."""

    limit: int = 0
    context: int = 0

    def __new__(cls, limit: int, context: int = 0) -> CutOff:
        chunk = super().__new__(cls, "")
        chunk.limit, chunk.context = limit, context
        return chunk

    def __reduce__(self):
        return CutOff, (self.limit, self.context)


class _CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also counts the new tokens and keeps the last one."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.new_tokens, self.last_token = 0, None

    def put(self, value) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.new_tokens += value.numel()
            self.last_token = int(value.reshape(-1)[-1])
        super().put(value)


class _StopOnEvent(StoppingCriteria):
    """Ends generation when any of the events is set: the user pressed stop, or the client went away."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stopped = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's weights: its safetensors files, or the pytorch_model*.bin files transformers also
    loads."""
    return [*Path(folder).glob("*.safetensors"), *Path(folder).glob("pytorch_model*.bin")]


def weights_digest(folder: Path) -> str:
    """sha256 of what a checkpoint's scores depend on: its safetensors files, config.json and tokenizer files
    (by name and content). Which model an evaluation scored, so that a model card never shows figures of
    another: the same weights with another slice selection, budget or τ, or another chat template, score
    differently."""
    digest = hashlib.sha256()
    scored = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    for path in sorted([*weight_files(folder), *(Path(folder) / name for name in scored)]):
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()


class Pipeline:
    """A loaded MedVLM checkpoint ready to describe scans.

    `encode` runs the five stages once per scan content (cached); `report` and `chat` stream text.
    Safe to share between threads (one model, many sessions).
    """

    def __init__(self, model: MedVLMForConditionalGeneration, tokenizer, name: str, folder: Path | None = None,
                 revision: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.folder = folder  # the checkpoint folder it was loaded from (a Hub repo's snapshot), if any
        self.revision = revision  # the Hub revision asked for (branch, tag or commit), if any
        self._encodings: OrderedDict[str, Encoding] = OrderedDict()  # by fingerprint, least recently used first
        # By fingerprint, the volumes (one per session, by id) that use its encoding: the encoding is dropped
        # when the last one is forgotten. Weak, so a volume dropped without `forget` stops counting.
        self._holders: dict[str, weakref.WeakValueDictionary[int, Volume]] = {}
        self._lock = threading.Lock()
        self._weights_sha256: str | None = None  # `weights_digest` of `folder`, once asked for

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, revision: str | None = None,
                        device: str | None = None, dtype: torch.dtype | str | None = None) -> Pipeline:
        """Load from a folder, a Hub repo id (at `revision`), or None for the demo checkpoint.

        device: "cpu", "cuda" or "cuda:N" (`resolve_device`), "cuda" when available unless given;
        dtype: `default_dtype(device)`. Raises CheckpointError or, for a device this machine
        lacks, UserInputError.
        """
        device = resolve_device(device)
        folder = resolve_checkpoint(checkpoint, revision)
        name = "demo checkpoint" if checkpoint is None else str(checkpoint)
        named = checkpoint_named(name, revision)
        tokenizer = load_tokenizer(folder, named)  # before the weights, which take minutes for a large LM
        if dtype is None:
            on_gpu = torch.device(device).type == "cuda"  # only a GPU's choice depends on the model's size
            dtype = default_dtype(device, checkpoint_parameters(folder) if on_gpu else 0)
        model = load_model(folder, named, dtype=dtype).to(device)
        return cls(model, tokenizer, name, folder, revision)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def describe(self) -> dict:
        """What runs: checkpoint name (and the Hub revision asked for), device, dtype, whether it is the
        phantom-trained demo."""
        config = self.model.config
        return {"checkpoint": self.name, "revision": self.revision, "device": str(self.device),
                "dtype": str(self.model.dtype).split(".")[-1],
                "demo": bool(config.demo), "visual_tokens": config.num_visual_tokens,
                "slice_budget": config.slice_budget}

    def held_out_scores(self) -> dict | None:
        """The checkpoint's own scores on held-out scans (`medvlm eval`'s JSON object, as the demo checkpoint ships
        it in HELD_OUT_EVALUATION), or None when it ships none, it cannot be read, or it scored other weights than
        the folder holds (its `weights_sha256`): a checkpoint trained again into the same folder leaves the old
        file there, and the app would quote the old model's figures for the new one."""
        if self.folder is None:
            return None
        try:
            scores = json.loads((self.folder / HELD_OUT_EVALUATION).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if self._weights_sha256 is None:  # once: every report quotes the scores, and a large checkpoint takes seconds
            self._weights_sha256 = weights_digest(self.folder)
        if not isinstance(scores, dict) or scores.get("weights_sha256") != self._weights_sha256:
            return None
        return scores

    # Encoding ---------------------------------------------------------------------------------

    def encode(self, volume: Volume) -> Encoding:
        """Stages 1–5 for one scan, once: a second call with the same content returns the cache.

        The volume holds the cached encoding until `forget(volume)`; a volume forgotten while it was
        being encoded gets its encoding back, but it is not cached.
        """
        key = volume.fingerprint
        with self._lock:
            self._holders.setdefault(key, weakref.WeakValueDictionary())[id(volume)] = volume
            if key in self._encodings:
                self._encodings.move_to_end(key)
                return self._encodings[key]
        start = time.perf_counter()
        pixel_values, heights = readable_encoder_input(volume, self.model.config, device=self.device)
        prepared = time.perf_counter()
        with torch.inference_mode():
            scan = self.model.choose_slices(pixel_values, heights)
            visual = self.model.visual_tokens_from_slices([scan])
        done = time.perf_counter()
        slabs = slab_bounds(volume.shape[0], scan.total)
        kept = [(slabs[index][0], slabs[index][1] - 1) for index in scan.kept.tolist()]
        encoding = Encoding(visual.visual_tokens, kept, scan.total,
                            {"preprocess_s": prepared - start, "encode_s": done - prepared}, scan.kept.tolist())
        with self._lock:
            if id(volume) not in self._holders.get(key, {}):  # forgotten meanwhile: its session has ended
                return encoding
            self._encodings[key] = encoding
            while len(self._encodings) > ENCODING_CACHE_SIZE:
                evicted, _ = self._encodings.popitem(last=False)
                self._holders.pop(evicted, None)
        return encoding

    def forget(self, volume: Volume) -> None:
        """This volume's session is done with the scan: its cached visual tokens are dropped once no
        other volume with the same content (another session on the same example) holds them."""
        key = volume.fingerprint
        with self._lock:
            holders = self._holders.get(key)
            if holders is not None:
                holders.pop(id(volume), None)
            if not holders:
                self._holders.pop(key, None)
                self._encodings.pop(key, None)

    # Text -------------------------------------------------------------------------------------

    def report(self, scan: Volume | Encoding, **settings) -> Iterator[str]:
        """Stream a radiology-style report of the scan, chunk by chunk."""
        messages = [{"role": "user", "content": self.model.config.report_prompt}]
        return self.chat(scan, messages, **settings)

    def chat(self, scan: Volume | Encoding, messages: list[dict], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, stop: threading.Event | None = None) -> Iterator[str]:
        """Stream the assistant's next answer in a conversation about the scan: a volume (encoded once, then
        from the cache), or its encoding from `encode`, kept by the caller.

        messages: [{"role": "user" | "assistant", "content": str}, ...] ending with the user's
        question. temperature 0 is greedy decoding, above 0 samples within top_p (0 < top_p ≤ 1); other
        values, max_new_tokens outside 1 … MAX_NEW_TOKENS, a question over MAX_QUESTION_CHARS and text holding
        the model's control tokens (`prompt_text`) raise UserInputError. Setting `stop` (or closing the
        generator) ends the generation thread.
        """
        if isinstance(messages, str) or not all(
                isinstance(message, dict) and message.get("role") in ("user", "assistant")
                and isinstance(message.get("content"), str) for message in messages or [None]):
            raise UserInputError("messages is the conversation, a list of {'role': 'user' or 'assistant', 'content': "
                                 "text}; for one question give [{'role': 'user', 'content': question}]")
        if messages[-1].get("role") != "user":
            raise UserInputError("the conversation must end with the user's question (a message of role 'user')")
        question = messages[-1]["content"]
        if not question.strip():
            raise UserInputError("the question is empty; ask something about the scan")
        if len(question) > MAX_QUESTION_CHARS:
            raise UserInputError(f"the question is {len(question):,} characters long, more than the "
                                 f"{MAX_QUESTION_CHARS:,} allowed; ask a shorter one")
        check_generation(max_new_tokens, temperature, top_p)
        config = self.model.config
        text = prompt_text(self.tokenizer, messages, config.image_token, config.num_visual_tokens,
                           add_generation_prompt=True)
        encoding = scan if isinstance(scan, Encoding) else self.encode(scan)
        input_ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(self.device)
        # The LM reads at most its context, the scan's visual tokens included: past it the answer is noise.
        context, length = config.text_config.max_position_embeddings, input_ids.shape[1]
        if context - length < min(int(max_new_tokens), MIN_ANSWER_TOKENS):
            raise UserInputError(f"the conversation has grown to {length:,} tokens with the scan, and the model reads "
                                 f"{context:,} in all, too few to answer in; {START_AGAIN}")
        return self._stream(input_ids, encoding.visual_tokens.to(self.device), stop,
                            max_new_tokens=min(int(max_new_tokens), context - length), temperature=float(temperature),
                            top_p=float(top_p), context=context if context - length <= int(max_new_tokens) else 0)

    def _stream(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor, stop: threading.Event | None,
                max_new_tokens: int, temperature: float, top_p: float, context: int = 0) -> Iterator[str]:
        """The generation's text chunks; it ends at `stop` (the caller's, never set here: it may serve again) or
        when the consumer closes the stream (`ended`). An answer that reached `max_new_tokens` before its end
        token ends with a `CutOff` chunk (`context`: the model's, when that set `max_new_tokens`)."""
        ended = threading.Event()
        streamer = _CountingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                self.model.generate(
                    input_ids, visual_tokens, max_new_tokens=max_new_tokens, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(ended, *([stop] if stop else []))]),
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    **sampling)
            except BaseException as error:  # surfaced in the consumer's thread below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, name="medvlm-generate", daemon=True)
        thread.start()
        try:
            for chunk in streamer:
                if chunk:
                    yield chunk
            if (not failure and streamer.new_tokens >= max_new_tokens and not (stop and stop.is_set())
                    and streamer.last_token != self.tokenizer.eos_token_id):
                yield CutOff(max_new_tokens, context)
        finally:
            ended.set()
            thread.join()
        if failure:
            raise failure[0]
