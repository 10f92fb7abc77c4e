"""`pv2tea predict --device` and `serve --device` on this CPU machine: cpu and auto give the one-process output, a
device the machine lacks or a name that is none is refused before the model loads."""

from __future__ import annotations

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
