"""environment.json: what a run was computed with, and a resume under another environment is reported."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from pv2tea.train import environment
from pv2tea.train.environment import environment_differences, environment_info, record_environment, source_revision


def test_environment_info_names_this_process():
    info = environment_info()
    assert torch.__version__.startswith(info["packages"]["torch"])  # "2.14.1" of "2.14.1+cpu"
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["python"].count(".") == 2
    json.dumps(info)  # serializable


def test_differences_on_literal_records():
    a = {"python": "3.11.7", "cpu": "AMD EPYC", "packages": {"torch": "2.14.1", "pillow": "12.0.0"}}
    b = {"python": "3.11.7", "cpu": "Intel Xeon", "packages": {"torch": "2.14.1", "pillow": "13.0.0", "timm": "1.0"}}
    assert environment_differences(a, a) == []
    assert environment_differences(a, b) == [
        "cpu: AMD EPYC -> Intel Xeon",
        "pillow 12.0.0 -> 13.0.0",
        "timm None -> 1.0",
    ]


def test_resume_keeps_the_first_record_and_warns_on_a_change(tmp_path, monkeypatch, caplog):
    record_environment(tmp_path, resume=False)
    first = json.loads((tmp_path / "environment.json").read_text())
    assert first["resumed"] == [] and first["first"]["packages"]["torch"]

    record_environment(tmp_path, resume=True)  # same environment: no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    changed = environment_info()
    changed["packages"]["pillow"] = "0.0.1"
    monkeypatch.setattr(environment, "environment_info", lambda: changed)
    with caplog.at_level(logging.WARNING, logger="pv2tea.train"):
        record_environment(tmp_path, resume=True)
    assert any("pillow" in r.getMessage() and "0.0.1" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "environment.json").read_text())
    assert saved["first"] == first["first"] and len(saved["resumed"]) == 2
    assert saved["resumed"][-1]["packages"]["pillow"] == "0.0.1"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "unreadable"),
        ("[]", "does not hold"),
        ('{"first": 3, "resumed": []}', "does not hold"),
        ('{"first": null, "resumed": "abc"}', "does not hold"),
        (None, "unknown"),
    ],
)
def test_a_resume_without_a_usable_record_says_so(tmp_path, caplog, content, message):
    if content is not None:
        (tmp_path / "environment.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="pv2tea.train"):
        record_environment(tmp_path, resume=True)
    assert any(message in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "environment.json").read_text())
    assert saved["first"] is None and len(saved["resumed"]) == 1  # not passed off as the start's environment


def test_source_revision_names_the_checkout():
    repo = Path(environment.__file__).resolve().parents[3]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    source = source_revision()
    if (repo / ".git").exists() and head.returncode == 0:
        assert source is not None and source["commit"] == head.stdout.strip()
        assert isinstance(source["modified"], bool)
    else:  # installed from a wheel or an exported tree
        assert source is None
