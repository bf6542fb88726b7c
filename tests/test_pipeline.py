"""What the pipeline promises the app and the CLI on a tiny random model: a generation that fails reaches the caller,
the encoding cache stays bounded, equal scans (and only they) share an encoding, and an answer fits the model's
context or is refused."""

import threading
import time

import numpy as np
import pytest
import torch
from tiny_model import build_tiny_model

import medvlm.pipeline as pipeline_module
from medvlm.errors import UserInputError
from medvlm.limits import MIN_ANSWER_TOKENS
from medvlm.pipeline import CutOff, Pipeline
from medvlm.volume import Volume


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_tiny_model()


@pytest.fixture
def pipeline(tiny_model):
    """A pipeline of its own (an empty encoding cache) around the module's tiny model."""
    model, tokenizer = tiny_model
    return Pipeline(model, tokenizer, "tiny")


def ct_scan(seed: int = 0, spacing: tuple[float, float, float] = (2.0, 1.0, 1.0), modality: str = "CT") -> Volume:
    """A small (8, 32, 32) CT of noise in HU, its content set by `seed`."""
    data = np.random.default_rng(seed).normal(0.0, 300.0, size=(8, 32, 32)).astype(np.float32)
    return Volume(data, spacing, np.eye(4), modality, "nifti", "RAS")


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "medvlm-generate"]


def count_encodings(pipeline: Pipeline, monkeypatch) -> list[int]:
    """A list that grows by one each time the pipeline runs the encoder (a scan not taken from the cache)."""
    runs = []
    choose_slices = pipeline.model.choose_slices

    def counted(*args, **kwargs):
        runs.append(1)
        return choose_slices(*args, **kwargs)

    monkeypatch.setattr(pipeline.model, "choose_slices", counted)
    return runs


def answer_of_full_length(pipeline: Pipeline, asked: list[tuple[int, int]]):
    """A stand-in for the model's `generate` that streams as transformers does (the prompt, then each new token) an
    answer of one word repeated to its `max_new_tokens`, never the end token; `asked` gets (prompt tokens,
    max_new_tokens) of each call."""
    word = pipeline.tokenizer("liver", add_special_tokens=False).input_ids[0]

    def generate(input_ids, visual_tokens, *, max_new_tokens, streamer, **settings):
        asked.append((input_ids.shape[1], max_new_tokens))
        streamer.put(input_ids.cpu())
        for _ in range(max_new_tokens):
            streamer.put(torch.tensor([word]))
        streamer.end()

    return generate


# A generation that fails ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed_first", ["", "The liver is"], ids=["before-any-text", "midway"])
def test_a_generation_that_fails_reaches_the_caller_after_its_text_and_leaves_no_thread(pipeline, monkeypatch,
                                                                                     streamed_first):
    """A CUDA out-of-memory error in the generation thread is the caller's to show: the text streamed before it
    arrives first, then the error itself, not a silent end nor a "cut off" marking (the answer did not reach its
    limit: it failed); and the thread is gone once the error arrives, so that the next report does not share the
    GPU with it."""
    tokens = pipeline.tokenizer(streamed_first, add_special_tokens=False).input_ids

    def out_of_memory(input_ids, visual_tokens, *, streamer, **settings):
        streamer.put(input_ids.cpu())  # the prompt, as transformers' generate streams it first
        for token in tokens:
            streamer.put(torch.tensor([token]))
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline.model, "generate", out_of_memory)
    # The thread goes on a moment after it has said its end (a failed CUDA step frees its memory as it unwinds):
    # the caller must still find it gone.
    end = pipeline_module._CountingStreamer.end

    def end_then_unwind(streamer) -> None:
        end(streamer)
        time.sleep(0.2)

    monkeypatch.setattr(pipeline_module._CountingStreamer, "end", end_then_unwind)
    chunks = []
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        for chunk in pipeline.report(ct_scan(), max_new_tokens=max(1, len(tokens))):  # the text fills the limit
            chunks.append(chunk)
    assert "".join(chunks) == pipeline.tokenizer.decode(tokens)
    assert not any(isinstance(chunk, CutOff) for chunk in chunks)
    assert not generation_threads()


# The encoding cache ---------------------------------------------------------------------------------------------


def test_the_encoding_cache_drops_the_scan_used_longest_ago_and_keeps_one_asked_about_recently(pipeline, monkeypatch):
    """A server that reads scan after scan keeps the visual tokens of ENCODING_CACHE_SIZE of them: a scan asked
    about again stays however early it came, the one used longest ago goes (its holders too) and is encoded again
    when it is asked about once more."""
    monkeypatch.setattr(pipeline_module, "ENCODING_CACHE_SIZE", 2)
    encoder_runs = count_encodings(pipeline, monkeypatch)
    first, second, third = (ct_scan(seed) for seed in range(3))
    pipeline.encode(first)
    pipeline.encode(second)
    pipeline.encode(first)  # a follow-up question about the first scan
    pipeline.encode(third)
    assert len(encoder_runs) == 3 and len(pipeline._encodings) == 2
    assert second.fingerprint not in pipeline._encodings and second.fingerprint not in pipeline._holders
    pipeline.encode(first)
    pipeline.encode(third)
    assert len(encoder_runs) == 3  # both still cached
    pipeline.encode(second)
    assert len(encoder_runs) == 4 and first.fingerprint not in pipeline._encodings


# Fingerprints ---------------------------------------------------------------------------------------------------


def test_the_same_voxels_at_another_spacing_or_modality_never_share_a_cached_encoding(pipeline, monkeypatch):
    """The encoder's input depends on the spacing (slabs, pixel aspect) and the modality (windows): the same voxels
    otherwise read are another scan to the cache; the same voxels, spacing and modality (another session on the
    same file) are the same scan, encoded once."""
    encoder_runs = count_encodings(pipeline, monkeypatch)
    scan, again = ct_scan(seed=6), ct_scan(seed=6)
    others = [ct_scan(seed=6, spacing=(1.0, 1.0, 1.0)), ct_scan(seed=6, spacing=(2.0, 0.5, 0.5)),
              ct_scan(seed=6, modality="MR")]
    assert scan.fingerprint == again.fingerprint
    assert len({scan.fingerprint, *(other.fingerprint for other in others)}) == 1 + len(others)
    for volume in (scan, again, *others):
        pipeline.encode(volume)
    assert len(encoder_runs) == 1 + len(others)


# The model's context --------------------------------------------------------------------------------------------


def report_prompt_length(pipeline: Pipeline, scan: Volume, monkeypatch) -> int:
    """How many tokens the LM is given (the scan's visual tokens included) for a report on the scan."""
    asked = []
    monkeypatch.setattr(pipeline.model, "generate", answer_of_full_length(pipeline, asked))
    "".join(pipeline.report(scan, max_new_tokens=1))
    return asked[0][0]


def test_a_report_that_leaves_the_answer_too_little_context_is_refused_in_one_sentence(pipeline, monkeypatch):
    scan = ct_scan()
    length = report_prompt_length(pipeline, scan, monkeypatch)
    monkeypatch.setattr(pipeline.model.config.text_config, "max_position_embeddings", length + MIN_ANSWER_TOKENS - 1)
    asked = []
    monkeypatch.setattr(pipeline.model, "generate", answer_of_full_length(pipeline, asked))
    with pytest.raises(UserInputError, match=rf"grown to {length:,} tokens .*start a new conversation") as refused:
        "".join(pipeline.report(scan, max_new_tokens=256))
    assert "\n" not in str(refused.value) and asked == []


@pytest.mark.parametrize(("room", "max_new_tokens", "answer_tokens", "ended_by_context"), [
    (MIN_ANSWER_TOKENS, 256, MIN_ANSWER_TOKENS, True),  # the context, not the limit asked for, ends it
    (MIN_ANSWER_TOKENS, MIN_ANSWER_TOKENS, MIN_ANSWER_TOKENS, True),  # both at once: the limit would not help
    (MIN_ANSWER_TOKENS - 1, 8, 8, False),  # a short answer asked for still fits where a long one would not
], ids=["clipped", "exactly-the-room", "short-answer"])
def test_an_answer_ends_within_the_context_and_says_what_ended_it(pipeline, monkeypatch, room, max_new_tokens,
                                                                 answer_tokens, ended_by_context):
    """The LM reads its context and no further: the answer is given the room that is left at most, and its cut-off
    marking names the context when that, not Max new tokens, ended it (raising Max new tokens would not help)."""
    scan = ct_scan()
    length = report_prompt_length(pipeline, scan, monkeypatch)
    context = length + room
    monkeypatch.setattr(pipeline.model.config.text_config, "max_position_embeddings", context)
    asked = []
    monkeypatch.setattr(pipeline.model, "generate", answer_of_full_length(pipeline, asked))
    chunks = list(pipeline.report(scan, max_new_tokens=max_new_tokens))
    assert asked == [(length, answer_tokens)]
    cut_off = chunks[-1]
    assert isinstance(cut_off, CutOff) and cut_off.limit == answer_tokens
    assert cut_off.context == (context if ended_by_context else 0)
