"""Stages 2–4 on their own: selection, spatial-frequency fusion, detail-preserving compressor."""

import pytest
import torch
from tiny_model import tiny_config, tiny_tokenizer

from medvlm.compressor import DetailPreservingCompressor
from medvlm.fusion import SpatialFrequencyFusion
from medvlm.selection import select_slices, uniform_slices


@pytest.fixture(scope="module")
def config():
    return tiny_config(tiny_tokenizer())


def test_repeated_slices_collapse_to_few():
    torch.manual_seed(0)
    distinct = torch.randn(3, 64)
    pooled = distinct.repeat_interleave(10, dim=0) + 1e-4 * torch.randn(30, 64)  # 3 runs of 10 copies
    kept = select_slices(pooled, threshold=0.95, budget=32)
    assert kept.tolist() == [0, 10, 20]


def test_distinct_slices_are_all_kept_in_order():
    pooled = torch.eye(12)  # pairwise orthogonal: nothing is redundant
    kept = select_slices(pooled, threshold=0.95, budget=32)
    assert kept.tolist() == list(range(12))


def test_budget_keeps_the_least_redundant_in_order():
    torch.manual_seed(0)
    base = torch.randn(40, 16)
    pooled = base.clone()
    pooled[21] = base[20] + 0.3 * torch.randn(16)  # similar to its neighbour, yet under τ
    kept = select_slices(pooled, threshold=0.999, budget=8)
    assert len(kept) == 8
    assert kept.tolist() == sorted(kept.tolist())
    assert not {20, 21} <= set(kept.tolist())


def test_uniform_sampling_spans_the_scan():
    assert uniform_slices(5, 8).tolist() == [0, 1, 2, 3, 4]
    picked = uniform_slices(100, 5).tolist()
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 5


def _grid(config, batch=2, kept=(6, 3)):
    height, width = config.encoder_grid
    grid = torch.randn(batch, config.slice_budget, height, width, config.fusion_dim)
    mask = torch.zeros(batch, config.slice_budget, dtype=torch.bool)
    for row, count in enumerate(kept):
        mask[row, :count] = True
    return grid, mask


def _assert_every_parameter_gets_gradient(module, loss):
    loss.backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_fusion_shapes_gate_and_gradients(config):
    torch.manual_seed(0)
    fusion = SpatialFrequencyFusion(config)
    with torch.no_grad():
        fusion.frequency_filter.normal_()
    grid, mask = _grid(config)
    fused, gate = fusion(grid, mask)
    assert fused.shape == grid.shape
    assert gate.shape == grid.shape and gate.min() >= 0 and gate.max() <= 1
    assert fused[1, 3:].abs().max() == 0  # padded slices stay empty
    _assert_every_parameter_gets_gradient(fusion, fused.pow(2).mean())


@pytest.mark.parametrize("mode", ["spatial", "frequency", "average"])
def test_fusion_ablations_drop_their_parts(config, mode):
    fusion = SpatialFrequencyFusion(tiny_config(tiny_tokenizer(), fusion_mode=mode))
    names = {name.split(".")[0] for name, _ in fusion.named_parameters()}
    assert ("spatial" in names) == (mode != "frequency")
    assert ("frequency_filter" in names) == (mode != "spatial")
    assert "gate" not in names
    grid, mask = _grid(config)
    fused, gate = fusion(grid, mask)
    assert fused.shape == grid.shape and gate is None


def test_compressor_shapes_and_gradients(config):
    torch.manual_seed(0)
    compressor = DetailPreservingCompressor(config)
    grid, mask = _grid(config)
    tokens = compressor(grid, mask)
    assert tokens.shape == (2, config.num_visual_tokens, config.fusion_dim)
    _assert_every_parameter_gets_gradient(compressor, tokens.pow(2).mean())


def test_padding_does_not_change_a_scan(config):
    """The same kept slices give the same tokens whatever else is in the batch."""
    torch.manual_seed(0)
    compressor = DetailPreservingCompressor(config).eval()
    fusion = SpatialFrequencyFusion(config).eval()
    grid, mask = _grid(config, batch=2, kept=(6, 3))
    with torch.no_grad():
        together = compressor(fusion(grid, mask)[0], mask)[1]
        alone = compressor(fusion(grid[1:], mask[1:])[0], mask[1:])[0]
    torch.testing.assert_close(together, alone)


def test_lesion_skip_keeps_a_one_patch_lesion_and_learns_from_patch_targets():
    """compressor_lesion_classes: a lesion score at one patch reaches its cell's visual token through the max, however
    many patches the cell averages; every part of the skip gets a gradient from the patch loss."""
    from medvlm.encoder_pretraining import balanced_bce

    config = tiny_config(tiny_tokenizer(), compressor_lesion_classes=3)
    torch.manual_seed(0)
    compressor = DetailPreservingCompressor(config)
    grid, mask = _grid(config)
    tokens, scores = compressor(grid, mask, return_scores=True)
    assert scores.shape == (*grid.shape[:4], 3)
    torch.testing.assert_close(tokens, compressor(grid, mask))
    targets = torch.zeros_like(scores)
    targets[0, 0, 0, 0, 1] = 1.0
    loss = balanced_bce(scores[mask], targets[mask]) + tokens.pow(2).mean()
    _assert_every_parameter_gets_gradient(compressor, loss)
    with torch.no_grad():  # one patch whose lesion score stands out moves the token of its cell
        compressor.lesion_head.weight.zero_()
        compressor.lesion_head.bias.zero_()
        bright = grid.clone()
        bright[0, 0, 0, 0] += 5.0
        compressor.lesion_head.weight[1] = torch.ones(config.fusion_dim) / config.fusion_dim
        base, lit = compressor.lesion_skip(grid, mask)[1], compressor.lesion_skip(bright, mask)[1]
    moved = (lit - base).abs().sum(-1)
    assert moved[0, 0] > 0 and moved[0, 1:].max() == 0 and moved[1].max() == 0


def test_average_pooling_ablation_has_no_attention(config):
    pooled_only = DetailPreservingCompressor(tiny_config(tiny_tokenizer(), compressor_mode="average"))
    full = DetailPreservingCompressor(config)
    assert not hasattr(pooled_only, "blocks")
    assert sum(p.numel() for p in pooled_only.parameters()) < sum(p.numel() for p in full.parameters())
