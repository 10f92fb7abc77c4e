"""--device of predict and serve (inference/device.py): what each name resolves to, and a clear refusal of a device
the machine does not have."""

from __future__ import annotations

import pytest
import torch

from pv2tea.decoding.generate import on_model_device
from pv2tea.inference import device as dev
from pv2tea.inference.device import DeviceError, resolve_device


def test_cpu_and_auto_on_a_machine_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(dev, "_cuda_count", lambda: 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" AUTO ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="--device cuda: torch sees no CUDA GPU here.*use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="--device cuda:1: torch sees no CUDA GPU"):
        resolve_device("cuda:1")


def test_this_machine_resolves_auto_to_what_torch_sees() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_auto_takes_the_launchers_gpu(monkeypatch) -> None:
    monkeypatch.setattr(dev, "_cuda_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # 4 processes on a 2-GPU node share them
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="has 2 CUDA GPU\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "tpu", ""])
def test_an_unknown_device_name_is_refused(spec: str, monkeypatch) -> None:
    monkeypatch.setattr(dev, "_cuda_count", lambda: 1)
    if spec == "":
        assert resolve_device(spec) == torch.device("cuda", 0)  # empty: auto
        return
    with pytest.raises(DeviceError, match=f"--device must be one of auto, cpu, cuda, cuda:N or mps; got '{spec}'"):
        resolve_device(spec)


def test_mps_is_refused_where_it_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


class _Batch:
    def __init__(self) -> None:
        self.moved_to: list[torch.device] = []

    def to(self, device):
        self.moved_to.append(device)
        return self


def test_batches_follow_the_model_to_its_device() -> None:
    batch = _Batch()
    assert on_model_device(batch, torch.nn.Linear(2, 2)) is batch and batch.moved_to == []  # the CPU: untouched
    on_model_device(batch, torch.nn.Linear(2, 2, device="meta"))
    assert batch.moved_to == [torch.device("meta")]


def test_precision_names_and_where_each_runs() -> None:
    cpu = torch.device("cpu")
    with dev.autocast_for("fp32", cpu)():
        assert not torch.is_autocast_enabled("cpu")
    with dev.autocast_for(" BF16 ", cpu)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(DeviceError, match="--precision fp16 needs a CUDA GPU .*on a CPU use bf16 or fp32"):
        dev.autocast_for("fp16", cpu)
    with pytest.raises(DeviceError, match="--precision must be one of fp32, bf16, fp16; got 'half'"):
        dev.autocast_for("half", cpu)
