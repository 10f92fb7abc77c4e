"""`pv2tea predict --device` and `serve --device` on this CPU machine: cpu and auto give the one-process output, a
device the machine lacks or a name that is none is refused before the model loads."""

from __future__ import annotations

import json

import pytest
import torch

from pv2tea.cli import main
from pv2tea.inference.predictor import Predictor


@pytest.fixture(scope="module")
def trained(tiny_trained):
    model, catalog = tiny_trained
    return model, catalog["test"]


def test_cpu_and_auto_predict_the_same_file(trained, tmp_path):
    model, data = trained
    base = ["predict", "--model", str(model), "--data", str(data), "--batch-size", "8"]
    assert main([*base, "--out", str(tmp_path / "default.jsonl")]) == 0
    assert main([*base, "--out", str(tmp_path / "cpu.jsonl"), "--device", "cpu"]) == 0
    assert main([*base, "--out", str(tmp_path / "auto.jsonl"), "--device", "auto"]) == 0
    expected = (tmp_path / "default.jsonl").read_text()
    assert expected and (tmp_path / "cpu.jsonl").read_text() == expected == (tmp_path / "auto.jsonl").read_text()
    predictor = Predictor.from_checkpoint(model, device="auto")
    assert predictor.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "--device must be one of auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
        ("cuda:7", "--device cuda:7:"),
    ],
)
@pytest.mark.parametrize("command", ["predict", "serve"])
def test_a_device_that_is_not_there_is_refused_before_loading(
    trained, tmp_path, capsys, monkeypatch, command, device, message
):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    model, data = trained
    loads = []
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: loads.append(a)))
    args = [command, "--model", str(model), "--device", device]
    if command == "predict":
        args += ["--data", str(data), "--out", str(tmp_path / "p.jsonl")]
    capsys.readouterr()
    assert main(args) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert loads == [] and not (tmp_path / "p.jsonl").exists()


def test_bf16_predicts_every_row_and_fp16_is_refused_on_a_cpu_before_loading(trained, tmp_path, capsys, monkeypatch):
    model, data = trained
    base = ["predict", "--model", str(model), "--data", str(data), "--batch-size", "8"]
    assert main([*base, "--out", str(tmp_path / "fp32.jsonl")]) == 0
    assert main([*base, "--out", str(tmp_path / "bf16.jsonl"), "--precision", "bf16"]) == 0
    fp32 = [json.loads(line) for line in (tmp_path / "fp32.jsonl").read_text().splitlines()]
    bf16 = [json.loads(line) for line in (tmp_path / "bf16.jsonl").read_text().splitlines()]
    assert [r["id"] for r in bf16] == [r["id"] for r in fp32] and all(isinstance(r["values"], list) for r in bf16)
    predictor = Predictor.from_checkpoint(model, precision="bf16")
    assert predictor.precision == "bf16"
    if predictor.model.visual is not None:  # the image encoder's convolution weights are kept channels-last
        convs = [m.weight for m in predictor.model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    if torch.cuda.is_available():
        return
    loads = []
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: loads.append(a)))
    for command in ("predict", "serve"):
        args = [command, "--model", str(model), "--precision", "fp16"]
        if command == "predict":
            args += ["--data", str(data), "--out", str(tmp_path / "fp16.jsonl")]
        capsys.readouterr()
        assert main(args) == 2
        assert "--precision fp16 needs a CUDA GPU" in " ".join(capsys.readouterr().err.split())
    assert loads == [] and not (tmp_path / "fp16.jsonl").exists()
