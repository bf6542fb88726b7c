"""The BiomedCLIP slice encoder (`encoder_backend="open_clip"`), offline and without timm or open_clip installed.

A stand-in timm builds a toy ViT with timm's interface, and a local Hub cache (HF_HUB_OFFLINE=1) holds an
open_clip checkpoint laid out as BiomedCLIP's repo holds it: a new model must encode with that checkpoint's
weights, a saved model must bring them back without the Hub, and a checkpoint of another model is one sentence.
"""

import shutil
import sys
import types

import pytest
import torch
from hub_stand_ins import hub_snapshot
from tiny_model import build_tiny_model
from torch import nn

from medvlm.errors import CheckpointError
from medvlm.features import encoder_fingerprint
from medvlm.modeling import MedVLMForConditionalGeneration
from medvlm.pretrained import OPEN_CLIP_WEIGHTS, load_pretrained_encoder
from medvlm.train import load_preset

PRESET = load_preset("m3d-biomedclip-qwen")
BIOMEDCLIP = {"encoder_backend": "open_clip", "open_clip_name": PRESET["model"]["open_clip_name"]}
SIDE = 32  # tiny_model's encoder input: 32 px slices, 8 px patches (a 4×4 grid), width 32


class StandInBlock(nn.Module):
    """A pre-norm residual MLP block, named as timm's ViT blocks are (norm1, mlp.fc1, mlp.fc2)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(width, 2 * width)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(2 * width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.mlp(self.norm1(tokens))


class StandInViT(nn.Module):
    """timm's VisionTransformer as the encoder uses it, at toy size: `patch_embed.patch_size`, `num_features`,
    and `forward_features` (N, 3, S, S) → tokens (N, 1 + (S/p)², C), the class token first."""

    def __init__(self, width: int = 32, patch: int = 8):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.patch_embed.patch_size = (patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (SIDE // patch) ** 2, width))
        self.blocks = nn.Sequential(StandInBlock(width))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.num_features = width

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)  # (N, h·w, C)
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))


def stand_in_create_model(name: str, pretrained: bool = False, num_classes: int | None = None,
                          global_pool: str | None = None, dynamic_img_size: bool = False) -> StandInViT:
    """timm.create_model, offline: pretrained weights would need the network, which a test does not have."""
    if pretrained:
        raise RuntimeError(f"the stand-in timm cannot download {name}'s pretrained weights")
    return StandInViT()


@pytest.fixture
def stand_in_timm(monkeypatch) -> None:
    timm = types.ModuleType("timm")
    timm.create_model = stand_in_create_model
    monkeypatch.setitem(sys.modules, "timm", timm)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty local Hub cache, offline."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache


def pretrained_trunk(width: int = 32) -> dict[str, torch.Tensor]:
    """A "pretrained" trunk's weights: drawn far from what the model's own initialisation would give."""
    torch.manual_seed(3)
    trunk = StandInViT(width)
    with torch.no_grad():
        for parameter in trunk.parameters():
            parameter.normal_(mean=0.5, std=1.0)
    return trunk.state_dict()


def write_open_clip_checkpoint(cache, trunk: dict[str, torch.Tensor], prefix: str = "visual.trunk.") -> None:
    """The open_clip checkpoint of the preset's repo, as BiomedCLIP's holds it: the vision trunk under
    `visual.trunk.`, beside open_clip's own projection head, the text tower and the logit scale."""
    weights = {prefix + key: value for key, value in trunk.items()}
    weights |= {"visual.head.proj.weight": torch.randn(16, 32), "text.proj.0.weight": torch.randn(16, 32),
                "logit_scale": torch.tensor(4.6)}
    folder = hub_snapshot(cache, BIOMEDCLIP["open_clip_name"].removeprefix("hf-hub:"))
    folder.mkdir(parents=True)
    torch.save(weights, folder / OPEN_CLIP_WEIGHTS)


def new_model(seed: int) -> MedVLMForConditionalGeneration:
    """A fresh model from the BiomedCLIP preset's encoder settings, its pretrained encoder loaded as training does."""
    torch.manual_seed(seed)
    model, _ = build_tiny_model(**BIOMEDCLIP)
    load_pretrained_encoder(model, PRESET)
    return model


def test_a_new_model_encodes_with_the_open_clip_checkpoints_weights(stand_in_timm, hub):
    pretrained = pretrained_trunk()
    write_open_clip_checkpoint(hub, pretrained)
    # `features` and `train` build their models apart, under different random states: both get the same encoder.
    first, second = new_model(seed=0), new_model(seed=1)
    for model in (first, second):
        model.init_weights()  # what transformers initialises again is only what it considers missing
        trunk = model.slice_encoder.vision_tower.trunk.state_dict()
        assert trunk.keys() == pretrained.keys()
        for key, value in pretrained.items():
            assert torch.equal(trunk[key], value), key
    assert encoder_fingerprint(first) == encoder_fingerprint(second)  # a feature cache fits either

    slices = torch.rand(3, 3, SIDE, SIDE)
    reference = StandInViT()
    reference.load_state_dict(pretrained)
    expected = reference.forward_features(slices)[:, 1:].unflatten(1, (4, 4))  # (Z, h, w, C), class token dropped
    torch.testing.assert_close(first.slice_encoder(slices).patches, expected)


def test_a_saved_checkpoint_brings_its_encoder_back_without_the_hub(stand_in_timm, hub, tmp_path):
    pretrained = pretrained_trunk()
    write_open_clip_checkpoint(hub, pretrained)
    model = new_model(seed=0)
    model.save_pretrained(tmp_path / "checkpoint")
    shutil.rmtree(hub)  # offline and the open_clip checkpoint gone: the encoder can only come from the checkpoint

    loaded = MedVLMForConditionalGeneration.from_pretrained(tmp_path / "checkpoint")
    trunk = loaded.slice_encoder.vision_tower.trunk.state_dict()
    for key, value in pretrained.items():
        assert torch.equal(trunk[key], value), key
    saved = model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())
    assert loaded.slice_encoder.frozen


@pytest.mark.parametrize("kind", ["bare timm weights", "another width"])
def test_a_checkpoint_of_another_trunk_is_one_sentence(stand_in_timm, hub, kind):
    if kind == "bare timm weights":  # a timm state dict, not open_clip's: no visual.trunk. prefix
        write_open_clip_checkpoint(hub, pretrained_trunk(), prefix="")
    else:
        write_open_clip_checkpoint(hub, pretrained_trunk(width=48))
    with pytest.raises(CheckpointError, match=r"does not hold the vision trunk this model builds") as raised:
        new_model(seed=0)
    assert "\n" not in str(raised.value) and str(raised.value).count("; ") == 1


def test_an_open_clip_checkpoint_not_in_the_offline_cache_is_one_sentence(stand_in_timm, hub):
    with pytest.raises(CheckpointError, match=r"could not load 'microsoft/BiomedCLIP.*' from the Hugging Face Hub"
                       ) as raised:
        new_model(seed=0)
    assert "\n" not in str(raised.value)


def test_without_timm_the_open_clip_backend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(CheckpointError, match=r"timm is not installed; install it \(pip install timm\)"):
        build_tiny_model(**BIOMEDCLIP)  # a UserInputError: one sentence on the command line, exit status 2
