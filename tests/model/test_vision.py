"""Visual token layout: earlier backbone levels appended to the patch tokens (``vision.extra_levels``), the patch
grid pooled to at most g x g tokens (``vision.token_grid``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pv2tea.config import VisionConfig
from pv2tea.models.vision import VisualEncoder


def encoder(name: str, levels: list[int], token_grid: int | None = None) -> VisualEncoder:
    torch.manual_seed(0)
    return VisualEncoder(
        VisionConfig(name=name, weights="none", extra_levels=levels, token_grid=token_grid), 32, True
    ).eval()


def test_cnn_tokens_carry_pooled_earlier_levels():
    enc = encoder("test_efficientnet", [1, 3])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc.backbone_tokens(images)
        final, (level1, level3) = enc.backbone.forward_intermediates(images, indices=[1, 3])
    grid = final.shape[-2:]
    assert enc.num_features == 256 + 24 + 48
    assert tokens.shape == (2, grid[0] * grid[1], 256 + 24 + 48)
    # the first channels are the final map, unchanged
    torch.testing.assert_close(tokens[..., :256], enc.backbone.forward_features(images).flatten(2).transpose(1, 2))
    # token (0, 0) holds the mean of level 1 over the top-left cell of the final grid
    cell = level1.shape[-1] // grid[-1]
    torch.testing.assert_close(tokens[:, 0, 256:280], level1[:, :, :cell, :cell].mean((2, 3)))
    torch.testing.assert_close(tokens[..., 280:], F.adaptive_avg_pool2d(level3, grid).flatten(2).transpose(1, 2))
    out = enc.head(tokens)
    assert out.tokens.shape == (2, 1 + grid[0] * grid[1], 32)


def test_vit_prefix_token_gets_the_level_mean():
    enc = encoder("test_vit", [2])
    images = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        tokens = enc.backbone_tokens(images)
    assert tokens.shape[-1] == 2 * 64
    torch.testing.assert_close(tokens[:, 0, 64:], tokens[:, 1:, 64:].mean(1))
    torch.testing.assert_close(tokens[..., :64], enc.backbone.forward_features(images))


def test_without_levels_tokens_are_the_final_map():
    enc = encoder("test_efficientnet", [])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert enc.backbone_tokens(images).shape[-1] == enc.num_features == 256


def test_level_out_of_range_names_the_levels():
    with pytest.raises(ValueError, match=r"level 7 does not exist.*0\.\.4"):
        encoder("test_efficientnet", [7])


def test_token_grid_pools_a_cnn_map_and_its_levels():
    images = torch.randn(2, 3, 128, 128)
    full, pooled = encoder("test_efficientnet", [1]), encoder("test_efficientnet", [1], token_grid=2)
    with torch.no_grad():
        final = full.backbone.forward_features(images)  # (2, 256, 4, 4)
        tokens = pooled.backbone_tokens(images)
        level1 = full.backbone.forward_intermediates(images, indices=[1])[1][0]
    assert final.shape[-2:] == (4, 4) and tokens.shape == (2, 4, 256 + 24)
    # token 1 = top-right 2 x 2 cell of the final map; its level-1 channels the mean over the same quarter
    torch.testing.assert_close(tokens[:, 1, :256], final[:, :, :2, 2:].mean((2, 3)))
    half = level1.shape[-1] // 2
    torch.testing.assert_close(tokens[:, 1, 256:], level1[:, :, :half, half:].mean((2, 3)))
    assert pooled.head(tokens).grid == (2, 2)


def test_token_grid_keeps_a_smaller_grid_and_vit_prefix():
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        small = encoder("test_efficientnet", [], token_grid=8).backbone_tokens(images)
        plain = encoder("test_efficientnet", []).backbone_tokens(images)
    torch.testing.assert_close(small, plain)  # 2 x 2 map, under the bound: unchanged
    vit = encoder("test_vit", [], token_grid=2)
    images = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        feats = vit.backbone.forward_features(images)  # (1, prefix + h*w, 64)
        tokens = vit.backbone_tokens(images)
    prefix = vit.num_prefix_tokens
    assert vit.grid(feats.shape[1]) == (10, 10) and tokens.shape == (1, prefix + 4, 64)
    torch.testing.assert_close(tokens[:, :prefix], feats[:, :prefix])
    # patch tokens are row-major over the 10 x 10 grid; 2 x 2 cell (i, j) is the mean of rows 5i..5i+4, cols 5j..5j+4
    for cell, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = [prefix + 10 * r + c for r in range(5 * i, 5 * i + 5) for c in range(5 * j, 5 * j + 5)]
        torch.testing.assert_close(tokens[:, prefix + cell], feats[:, block].mean(1))


def _split(train_blocks: int, levels: list[int]) -> VisualEncoder:
    return VisualEncoder(
        VisionConfig(name="test_efficientnet", weights="none", extra_levels=levels, train_blocks=train_blocks), 32, True
    ).eval()


@pytest.mark.parametrize(("train_blocks", "levels"), [(1, [1, 3]), (2, [1]), (4, [0]), (5, [])])
def test_train_blocks_top_over_the_cached_lower_part_is_the_whole_backbone(train_blocks, levels):
    whole = encoder("test_efficientnet", levels)
    split = _split(train_blocks, levels)
    split.load_state_dict(whole.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = whole.backbone_tokens(images)
        lower = split.cached_tokens(images)
        torch.testing.assert_close(split.from_cache(lower), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(split.backbone_tokens(images), expected, atol=1e-5, rtol=1e-4)
    # the cache holds the map at the first trained block's input, finer than the final one
    assert lower.shape[1] > expected.shape[1] or train_blocks == 1
    assert whole.cached_tokens(images).shape == expected.shape and whole.from_cache(expected) is expected


def test_train_blocks_trains_the_top_blocks_and_final_convolution_only():
    split = _split(2, [1])
    trained = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
        for n, p in split.backbone.named_parameters()
        if p.requires_grad
    }
    assert trained == {"blocks.3", "blocks.4", "conv_head", "bn2"}
    images = torch.randn(2, 3, 64, 64)
    split.head(split.from_cache(split.cached_tokens(images))).pooled.sum().backward()
    assert all(p.grad is None for m in split.frozen_modules() for p in m.parameters())
    assert all(p.grad is not None for m in split.top_modules() for p in m.parameters())
    frozen = VisualEncoder(
        VisionConfig(name="test_efficientnet", weights="none", freeze=True, train_blocks=2), 32, True
    )
    assert frozen.cut is None and frozen.top_modules() == []  # vision.freeze wins


def test_train_blocks_refuses_levels_above_the_cut_too_many_blocks_and_other_families():
    with pytest.raises(ValueError, match=r"level 3 \(blocks.3\) is not below the 2 trained"):
        _split(2, [3])
    with pytest.raises(ValueError, match="train_blocks=6: the backbone has 5 blocks"):
        _split(6, [])
    with pytest.raises(ValueError, match="not of the EfficientNet / MobileNet family"):
        VisualEncoder(VisionConfig(name="test_vit", weights="none", train_blocks=1), 32, True)
