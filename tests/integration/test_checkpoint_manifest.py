"""Model folder integrity: a manifest of SHA-256 and sizes written with the folder and checked when it loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import pytest

from pv2tea.cli import main
from pv2tea.inference.predictor import Predictor
from pv2tea.models import checkpoint as ckpt


@pytest.fixture
def final_copy(tiny_trained, tmp_path):
    model, _ = tiny_trained
    return shutil.copytree(model, tmp_path / "final")


def test_manifest_lists_every_file_with_its_hash(final_copy):
    manifest = json.loads((final_copy / ckpt.MANIFEST_FILE).read_text())["files"]
    files = {p.relative_to(final_copy).as_posix() for p in final_copy.rglob("*") if p.is_file()}
    assert set(manifest) == files - {ckpt.MANIFEST_FILE} and ckpt.MODEL_FILE in manifest
    data = (final_copy / ckpt.MODEL_FILE).read_bytes()
    assert manifest[ckpt.MODEL_FILE] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checked folder loads without a warning
        Predictor.from_checkpoint(final_copy)


def test_a_truncated_or_altered_file_is_refused_by_name(final_copy, capsys):
    weights = final_copy / ckpt.MODEL_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors is .* bytes but was written with .*truncated"):
        Predictor.from_checkpoint(final_copy)
    assert main(["serve", "--model", str(final_copy)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "copy the folder again" in err
    weights.write_bytes(data)
    preprocess = final_copy / ckpt.PREPROCESS_FILE
    text = preprocess.read_text()
    preprocess.write_text(text.replace('"', "'", 1) if '"' in text else text + " ")  # same size, other content
    with pytest.raises(ckpt.CheckpointError, match=r"preprocess\.json does not match the SHA-256"):
        Predictor.from_checkpoint(final_copy)
    preprocess.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"preprocess\.json is missing"):
        Predictor.from_checkpoint(final_copy)


def test_a_file_rewritten_with_the_same_size_is_hashed_again(final_copy):
    """Hashes are cached per file version within a process (path, size, mtime): a file rewritten with the same size
    after it was hashed is hashed again, by the manifest check and by the warm start's fingerprint."""
    assert ckpt.verify_manifest(final_copy)  # every file hashed, and cached
    preprocess = final_copy / ckpt.PREPROCESS_FILE
    before = preprocess.stat()
    text = preprocess.read_text()
    preprocess.write_text(text.replace('"', "'", 1))  # same size, other content
    os.utime(preprocess, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # later, whatever the clock's step
    assert preprocess.stat().st_size == before.st_size
    with pytest.raises(ckpt.CheckpointError, match=r"preprocess\.json does not match the SHA-256"):
        ckpt.verify_manifest(final_copy)
    weights = final_copy / ckpt.MODEL_FILE
    first = ckpt.warm_start_fingerprint(final_copy)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a bit of the last tensor
    stamp = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert ckpt.warm_start_fingerprint(final_copy) == hashlib.sha256(data).hexdigest() != first


def test_a_folder_without_manifest_loads_with_a_warning(final_copy):
    (final_copy / ckpt.MANIFEST_FILE).unlink()
    with pytest.warns(ckpt.CheckpointWarning, match="no manifest.json"):
        Predictor.from_checkpoint(final_copy)


def test_damaged_files_of_a_folder_without_manifest_are_named_with_the_fix(final_copy, tmp_path, capsys):
    (final_copy / ckpt.MANIFEST_FILE).unlink()
    weights = final_copy / ckpt.MODEL_FILE
    data = weights.read_bytes()
    pickled = tmp_path / "pickled.pt"
    import torch

    torch.save({"w": torch.zeros(2)}, pickled)
    damaged = {
        "truncated": data[: len(data) // 2],
        "corrupt header": b"\xff" * 8 + data[8:],
        "a renamed pickle": pickled.read_bytes(),
    }
    for name, content in damaged.items():
        weights.write_bytes(content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            with pytest.raises(ckpt.CheckpointError) as caught:
                Predictor.from_checkpoint(final_copy)
        message = str(caught.value)
        assert str(weights) in message and "copy the model folder again" in message, (name, message)
        assert ("PyTorch pickle" in message) is (name == "a renamed pickle"), (name, message)
    assert main(["serve", "--model", str(final_copy)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err
    weights.write_bytes(data)
    config = final_copy / ckpt.CONFIG_FILE
    config.write_text(config.read_text()[:-10])
    with pytest.raises(ckpt.CheckpointError, match=r"pv2tea_config\.json is not valid JSON .*copy the model folder"):
        Predictor.from_checkpoint(final_copy)


def test_predict_says_a_missing_manifest_in_one_line_and_hides_its_progress_on_request(
    final_copy, tiny_trained, tmp_path, capsys
):
    """Issue 38, item 13: the warning is one ``warning:`` line of the command (no file:line and source line of
    Python's warning display, nothing left to the warnings machinery), and ``--no-progress`` removes the bar."""
    _, catalog = tiny_trained
    (final_copy / ckpt.MANIFEST_FILE).unlink()
    base = ["predict", "--model", str(final_copy), "--data", str(catalog["test"])]
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        assert main([*base, "--out", str(tmp_path / "quiet.jsonl"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "no manifest.json" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and str(final_copy) in said[0], err
    assert "CheckpointWarning" not in err and "from_checkpoint(" not in err and ".py:" not in err, err
    assert not [w for w in escaped if issubclass(w.category, ckpt.CheckpointWarning)]
    assert "row/s" not in err and "predict:" not in err, err  # no progress bar
    assert main([*base, "--out", str(tmp_path / "shown.jsonl")]) == 0
    assert "row/s" in capsys.readouterr().err  # the bar by default
    assert (tmp_path / "quiet.jsonl").read_text() == (tmp_path / "shown.jsonl").read_text()


def test_checkpoint_warnings_to_leaves_other_warnings_alone():
    said: list[str] = []
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with ckpt.checkpoint_warnings_to(said.append):
            warnings.warn("old folder", ckpt.CheckpointWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert said == ["old folder"]
    assert [(w.category, str(w.message)) for w in shown] == [(UserWarning, "something else")]
