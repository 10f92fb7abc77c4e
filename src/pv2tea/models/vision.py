"""Visual encoding (paper §3 (1)) with category-supervised attention pruning (S2, §3.2).

A timm backbone gives patch tokens: the final feature map of a CNN (each spatial position is a
patch) or the patch tokens of a ViT. They are projected to the fusion width. S2 learns a mask
``M`` over patches; ``v_pt = v ⊙ σ(M)`` is what enters fusion, and the image [CLS] is the
mask-weighted mean of the patch tokens (the backbone's own CLS for a ViT without pruning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pv2tea.config import VisionConfig
from pv2tea.models.weights import (
    PACKAGE_PREFIX,
    generic_filter,
    load_strict,
    package_vision_weights,
    read_state_dict,
)


@dataclass
class VisualOutput:
    """What the visual encoder gives the fusion: tokens, the pooled image vector and S2's mask logits."""

    tokens: torch.Tensor  # (B, 1 + P, D): [CLS-I] then (pruned) patch tokens
    pooled: torch.Tensor  # (B, D): the image representation v_cls
    mask_logits: torch.Tensor | None  # (B, P): M before the sigmoid; None without pruning
    grid: tuple[int, int]  # patch grid (h, w), for visualizing the mask


class TimmBackbone(Protocol):
    """What the visual encoder uses of a timm model beyond ``nn.Module`` (timm types its models as plain modules)."""

    num_features: int
    pretrained_cfg: dict[str, Any]
    feature_info: list[dict[str, Any]]  # per level: its module ("blocks.2"), channels, reduction

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map (B, C, h, w) of a CNN or the tokens (B, N, C) of a ViT."""
        ...

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final features and the feature maps of the levels ``indices`` (``vision.extra_levels``)."""
        ...


def timm_api(backbone: nn.Module) -> TimmBackbone:
    """``backbone`` (a timm model) typed as the timm API it carries."""
    return cast(TimmBackbone, backbone)


def create_backbone(cfg: VisionConfig) -> nn.Module:
    """The timm backbone with no classifier and no pooling (random init)."""
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=0, global_pool="")
    except RuntimeError as exc:
        raise ValueError(f"unknown timm model '{cfg.name}': {exc}") from exc


def load_backbone_weights(backbone: nn.Module, spec: str, name: str | None = None) -> None:
    """Initialize from an offline package or a local file; ``none`` keeps the random init. ``name``: the timm
    architecture the backbone was created as, checked against a package's."""
    if spec.lower() in ("none", ""):
        return
    if spec.startswith(PACKAGE_PREFIX):
        path = package_vision_weights(spec[len(PACKAGE_PREFIX) :], name)
    else:
        path = Path(spec)
        if path.is_dir():
            candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
            path = found[0]
    state_dict = generic_filter(read_state_dict(path), backbone)
    classifier = timm_api(backbone).pretrained_cfg.get("classifier", "classifier")
    heads = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    load_strict(backbone, state_dict, str(path), drop_prefixes=tuple(f"{h}." for h in heads))


def data_config(backbone: nn.Module, cfg: VisionConfig) -> dict:
    """Mean/std/interpolation from the backbone's own pretrained config; size from cfg if set."""
    resolved = timm.data.resolve_data_config({}, model=backbone)
    if cfg.image_size:
        resolved["input_size"] = (3, cfg.image_size, cfg.image_size)
    return resolved


class VisualEncoder(nn.Module):
    """The image encoder (paper §3 (1)): a timm backbone's tokens projected to the text width, with S2's learned patch
    mask when ``attention_pruning`` (category-supervised attention pruning)."""

    def __init__(self, cfg: VisionConfig, hidden_size: int, attention_pruning: bool):
        super().__init__()
        self.backbone = create_backbone(cfg)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.extra_levels = list(cfg.extra_levels)
        self.token_grid = cfg.token_grid
        self.num_features = timm_api(self.backbone).num_features + sum(
            self._level_channels(i) for i in self.extra_levels
        )
        self.proj = nn.Sequential(nn.Linear(self.num_features, hidden_size), nn.LayerNorm(hidden_size))
        self.mask_head = nn.Linear(hidden_size, 1) if attention_pruning else None
        # vision.train_blocks: the backbone splits into a frozen lower part (stem, blocks[:cut]) and the top that
        # trains (blocks[cut:], conv_head); None when the backbone trains whole or not at all
        self.cut = None if cfg.freeze or cfg.train_blocks is None else self._cut(cfg.train_blocks)
        self.cut_channels = 0
        # the lower blocks whose maps the extra levels are (e.g. "blocks.2"), found once
        self.level_modules = (
            [str(timm_api(self.backbone).feature_info[i]["module"]) for i in self.extra_levels]
            if self.cut is not None
            else []
        )
        if self.cut is not None:
            first = cast(Any, self.backbone).blocks[self.cut]
            self.cut_channels = next(m for m in first.modules() if isinstance(m, nn.Conv2d)).in_channels
            self.backbone.requires_grad_(False)
            for module in self.top_modules():
                module.requires_grad_(True)

    def _cut(self, train_blocks: int) -> int:
        """The index of the first trained block of ``blocks``, checked against the backbone and the extra levels."""
        blocks = getattr(self.backbone, "blocks", None)
        if not all(hasattr(self.backbone, a) for a in ("conv_stem", "bn1", "conv_head", "bn2")) or not isinstance(
            blocks, nn.Sequential
        ):
            raise ValueError(
                f"vision.train_blocks: timm model {type(self.backbone).__name__} is not of the EfficientNet / "
                "MobileNet family (conv_stem, blocks, conv_head); train it whole (vision.freeze=false, "
                "vision.train_blocks=null) or keep it frozen"
            )
        if train_blocks > len(blocks):
            raise ValueError(f"vision.train_blocks={train_blocks}: the backbone has {len(blocks)} blocks")
        cut = len(blocks) - train_blocks
        for index in self.extra_levels:
            module = str(timm_api(self.backbone).feature_info[index]["module"])  # e.g. "blocks.2"
            if not module.startswith("blocks.") or int(module.split(".")[1]) >= cut:
                raise ValueError(
                    f"vision.extra_levels: level {index} ({module}) is not below the {train_blocks} trained "
                    f"block(s) (blocks.{cut} and up); choose a level below them or fewer vision.train_blocks"
                )
        return cut

    def top_modules(self) -> list[nn.Module]:
        """The backbone modules that train with ``vision.train_blocks`` (none without it)."""
        if self.cut is None:
            return []
        backbone = cast(Any, self.backbone)
        return [*backbone.blocks[self.cut :], backbone.conv_head, backbone.bn2]

    def frozen_modules(self) -> list[nn.Module]:
        """The backbone modules whose output a feature cache stores: all of it, or the part below the trained top."""
        if self.cut is None:
            return [self.backbone]
        backbone = cast(Any, self.backbone)
        return [backbone.conv_stem, backbone.bn1, *backbone.blocks[: self.cut]]

    def _level_channels(self, index: int) -> int:
        info = getattr(self.backbone, "feature_info", None)
        if not hasattr(self.backbone, "forward_intermediates") or not info:
            raise ValueError(
                f"vision.extra_levels: timm model {type(self.backbone).__name__} has no forward_intermediates"
            )
        if index >= len(info):
            raise ValueError(
                f"vision.extra_levels: level {index} does not exist; the backbone has levels "
                f"0..{len(info) - 1} ({', '.join(str(f['num_chs']) for f in info)} channels)"
            )
        return int(info[index]["num_chs"])

    def backbone_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone output as tokens (B, N, C): a CNN's h*w positions or a ViT's prefix + patch tokens.

        With ``vision.token_grid=g`` a grid larger than g x g is average-pooled to g x g first. With
        ``vision.extra_levels`` each token also carries the earlier levels' maps, average-pooled to the
        final grid (C = final channels + the levels' channels; a ViT's prefix tokens get their mean). This is
        what a feature cache stores when the backbone is frozen (``vision.freeze``).
        """
        if self.cut is not None:
            return self.top_tokens(self.lower_tokens(images))
        if not self.extra_levels:
            feats = timm_api(self.backbone).forward_features(images)
            levels: list[torch.Tensor] = []
        else:
            feats, levels = timm_api(self.backbone).forward_intermediates(images, indices=self.extra_levels)
        return self._tokens(feats, levels)

    def lower_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C_cut + ΣC_i) with ``vision.train_blocks``: the frozen lower part's map at the first trained block's
        input (h x w), each position also carrying the extra levels' maps average-pooled to that grid. What a feature
        cache stores then."""
        backbone = cast(Any, self.backbone)
        x = backbone.bn1(backbone.conv_stem(images))  # (B, C0, H/2, W/2)
        modules = self.level_modules
        found: dict[str, torch.Tensor] = {}
        for k, block in enumerate(backbone.blocks[: self.cut]):
            x = block(x)
            if f"blocks.{k}" in modules:
                found[f"blocks.{k}"] = x
        grid = (x.shape[-2], x.shape[-1])
        maps = [x, *(F.adaptive_avg_pool2d(found[m], grid) for m in modules)]  # each (B, C_i, h, w)
        return torch.cat(maps, 1).flatten(2).transpose(1, 2)  # (B, h*w, C_cut + ΣC_i)

    def top_tokens(self, lower: torch.Tensor) -> torch.Tensor:
        """Backbone tokens (as :meth:`backbone_tokens`) from :meth:`lower_tokens`: the trained top blocks and the final
        convolution over the lower map; the extra levels' channels pass to the final grid by average pooling (the
        same as pooling each level there directly when the grids divide, as a CNN's strides make them)."""
        backbone = cast(Any, self.backbone)
        b, n, _ = lower.shape
        h, w = self.grid(n)  # a CNN map has no prefix tokens
        channels = self.cut_channels  # the map's own channels; the extra levels' follow
        x = lower[..., :channels].transpose(1, 2).reshape(b, channels, h, w)  # (B, C_cut, h, w)
        for block in backbone.blocks[self.cut :]:
            x = block(x)
        feats = backbone.bn2(backbone.conv_head(x))  # (B, C, h', w')
        levels = []
        if lower.shape[-1] > channels:
            rest = lower[..., channels:].transpose(1, 2).reshape(b, -1, h, w)  # (B, ΣC_i, h, w)
            levels = [rest]
        return self._tokens(feats, levels)

    def cached_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What a feature cache stores of images (B, 3, H, W): the frozen lower part's tokens with
        ``vision.train_blocks``, else the backbone tokens (B, N, C)."""
        return self.lower_tokens(images) if self.cut is not None else self.backbone_tokens(images)

    def from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        """Backbone tokens (B, N, C) from what :meth:`cached_tokens` gave (the trained top blocks run on it)."""
        return self.top_tokens(cached) if self.cut is not None else cached

    def _tokens(self, feats: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """Backbone tokens (B, N, C + ΣC_i) from the final features and the extra levels' maps."""
        if feats.ndim == 4:  # CNN feature map (B, C, h, w)
            if self.token_grid is not None:
                feats = self._pool_grid(feats)  # (B, C, h', w')
            grid = (feats.shape[-2], feats.shape[-1])
            tokens = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
        elif self.token_grid is not None:  # ViT tokens (B, prefix + P, C): pool the patches, keep the prefix
            h, w = self.grid(feats.shape[1])
            patches = feats[:, self.num_prefix_tokens :].transpose(1, 2)  # (B, C, h*w)
            patches = patches.reshape(feats.shape[0], -1, h, w)  # (B, C, h, w)
            patches = self._pool_grid(patches)  # (B, C, h', w')
            grid = (patches.shape[-2], patches.shape[-1])
            tokens = torch.cat([feats[:, : self.num_prefix_tokens], patches.flatten(2).transpose(1, 2)], 1)
        else:  # ViT tokens (B, prefix + P, C)
            grid = self.grid(feats.shape[1])
            tokens = feats
        if not levels:
            return tokens
        pooled = [F.adaptive_avg_pool2d(level, grid).flatten(2).transpose(1, 2) for level in levels]  # (B, h*w, C_i)
        extra = torch.cat(pooled, -1)  # (B, h*w, ΣC_i)
        if self.num_prefix_tokens:
            prefix = extra.mean(1, keepdim=True).expand(-1, self.num_prefix_tokens, -1)  # (B, prefix, ΣC_i)
            extra = torch.cat([prefix, extra], 1)  # (B, prefix + P, ΣC_i)
        return torch.cat([tokens, extra], -1)  # (B, N, C + ΣC_i)

    def _pool_grid(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, min(h, g), min(w, g)) by adaptive average pooling (``vision.token_grid`` = g)."""
        assert self.token_grid is not None
        size = (min(self.token_grid, feats.shape[-2]), min(self.token_grid, feats.shape[-1]))
        return F.adaptive_avg_pool2d(feats, size)

    def grid(self, n_tokens: int) -> tuple[int, int]:
        """Patch grid (h, w) of a token sequence (square grids; CNN maps of square images)."""
        patches = n_tokens - self.num_prefix_tokens
        side = int(round(patches**0.5))
        return side, patches // max(side, 1)

    def head(self, tokens: torch.Tensor) -> VisualOutput:
        """Projection and S2 pruning over backbone tokens (B, N, C)."""
        patches = tokens[:, self.num_prefix_tokens :]  # (B, P, C)
        cls = tokens[:, 0] if self.num_prefix_tokens else None
        grid = self.grid(tokens.shape[1])
        patches = self.proj(patches)  # (B, P, D)
        if self.mask_head is not None:
            mask_logits = self.mask_head(patches).squeeze(-1)  # (B, P)
            gate = torch.sigmoid(mask_logits).unsqueeze(-1)  # (B, P, 1)
            patches = patches * gate
            pooled = patches.sum(1) / gate.sum(1).clamp_min(1e-6)  # (B, D)
        else:
            mask_logits = None
            pooled = self.proj(cls) if cls is not None else patches.mean(1)
        tokens = torch.cat([pooled.unsqueeze(1), patches], dim=1)  # (B, 1 + P, D)
        return VisualOutput(tokens=tokens, pooled=pooled, mask_logits=mask_logits, grid=grid)

    def forward(self, images: torch.Tensor) -> VisualOutput:
        """Encode images (B, 3, H, W): the backbone, then :meth:`head`."""
        return self.head(self.backbone_tokens(images))
