"""Visual token layout: earlier backbone levels appended to the patch tokens (``vision.extra_levels``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pv2tea.config import VisionConfig
from pv2tea.models.vision import VisualEncoder


def encoder(name: str, levels: list[int]) -> VisualEncoder:
    torch.manual_seed(0)
    return VisualEncoder(VisionConfig(name=name, weights="none", extra_levels=levels), 32, True).eval()


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
