"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint folder is self-contained for inference (weights, PV2TEA config, text-model config,
tokenizer, preprocessing) and, when it carries ``trainer_state.json`` and
``optimizer.safetensors``, for resuming training exactly (optimizer, scheduler, RNG, sample weights;
the S1 queues are model buffers). Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from pv2tea.config import Config, TrainConfig, from_dict, renamed_keys

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pv2tea.models.pv2tea import PV2TEA

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "pv2tea_config.json"
TEXT_CONFIG_FILE = "text_config.json"
PREPROCESS_FILE = "preprocess.json"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"  # SHA-256 and size of every other file of the folder, checked on loading
# The format of a model folder, an integer in its pv2tea_config.json under FORMAT_KEY. A folder without it is
# version 1 (every folder written before versions were). Loading upgrades an older folder's documents in memory
# through one migration per version step (MIGRATIONS) and refuses a newer one.
FORMAT_VERSION = 2
FORMAT_KEY = "format_version"


class CheckpointError(RuntimeError):
    """A model folder or checkpoint that is incomplete, damaged or of another model, with what to do about it."""


# What to do about a damaged file of a model folder
DAMAGED_FIX = "copy the model folder again from where it was trained (or retrain)"
# The first bytes of what torch.save writes: a zip archive (its default) or a bare pickle (protocol 2 to 5)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _read_json_file(path: Path) -> Any:
    """The JSON document in ``path``; a file that is not one raises a :class:`CheckpointError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not valid JSON ({exc}): {DAMAGED_FIX}") from None


def unreadable_weights(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a weights file that safetensors cannot read: a renamed PyTorch pickle, or a torn file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head.startswith(_PICKLE_MAGIC):
        return CheckpointError(
            f"{path} is a PyTorch pickle (torch.save), not a safetensors file; pv2tea never unpickles a file (it can "
            f"run code): {DAMAGED_FIX}, or convert it where it was made with safetensors.torch.save_model"
        )
    return CheckpointError(
        f"{path} is not a readable safetensors file (truncated or corrupt: {type(exc).__name__}: {exc}): {DAMAGED_FIX}"
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False))


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state of torch's, Python's and numpy's global generators: (tensors, JSON-ready values)."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):
        raise CheckpointError("numpy's global generator is not MT19937: its state cannot be saved")
    py_state = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state()}
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore the generators' state saved by :func:`rng_state`."""
    torch.set_rng_state(tensors["rng.torch"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as flat tensors (for safetensors) and JSON-ready values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The optimizer state dict :func:`flatten_optimizer` flattened."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    cfg: Config,
    bert_config: dict,
    preprocess: dict,
    tokenizer,
    training: dict[str, Any] | None = None,
    training_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (a crash leaves the previous one intact: under its own name, or as
    ``<name>.old`` when the crash fell between the two renames, which every reader here moves back)."""
    directory = recover_interrupted_save(Path(directory))
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    for stale in directory.parent.glob(glob.escape(directory.name) + ".tmp-*"):  # this one's, or a killed save's
        shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    _write_json(tmp / CONFIG_FILE, {FORMAT_KEY: FORMAT_VERSION, **cfg.to_dict()})
    _write_json(tmp / TEXT_CONFIG_FILE, bert_config)
    _write_json(tmp / PREPROCESS_FILE, preprocess)
    tokenizer.save_pretrained(str(tmp))
    if training is not None:
        save_file(training_tensors or {}, str(tmp / OPTIM_FILE))
        _write_json(tmp / STATE_FILE, training)
    write_manifest(tmp)
    _pause_for_tests("written")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        _pause_for_tests("swapped")
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


PAUSE_ENV = "PV2TEA_TEST_PAUSE_IN_SAVE"


def _pause_for_tests(point: str) -> None:
    """A test-only hook, off unless ``PV2TEA_TEST_PAUSE_IN_SAVE=<point>:<seconds>`` is set: a save sleeps that long
    at ``point`` ("written": the new folder complete under its temporary name; "swapped": the previous folder moved
    aside and the new one not moved in) so that a test can SIGKILL it there (tests/integration/test_kill_resume.py)."""
    setting = os.environ.get(PAUSE_ENV)
    if setting:
        where, _, seconds = setting.partition(":")
        if where == point:
            time.sleep(float(seconds or 0))


def recover_interrupted_save(directory: Path) -> Path:
    """Move ``<name>.old`` back to ``<name>`` when a save died after moving the previous folder aside and before
    moving the new one in; returns ``directory``."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.is_dir():
        os.replace(old, directory)
    return directory


def checkpoint_exists(directory: Path) -> bool:
    """A checkpoint folder is there (after :func:`recover_interrupted_save`)."""
    return recover_interrupted_save(directory).is_dir()


class CheckpointWarning(UserWarning):
    """A checkpoint folder that loads, but unchecked (written before manifests existed)."""


def _manifest_entry(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"sha256": _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns), "size": stat.st_size}


_UNCHECKED_WARNED: set[str] = set()  # folders without a manifest already warned about (once each)


@contextlib.contextmanager
def checkpoint_warnings_to(report: Callable[[str], None]) -> Iterator[None]:
    """Hand the :class:`CheckpointWarning` messages raised inside the block to ``report`` (for a command line: one
    ``warning:`` line, without the source line that Python's warning display adds). Other warnings are shown as
    usual when the block ends."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as recorded:
            caught = recorded
            yield
    finally:  # outside the recording block: the other warnings go where they would have gone
        for item in caught:
            if issubclass(item.category, CheckpointWarning):
                report(str(item.message))
            else:
                warnings.showwarning(item.message, item.category, item.filename, item.lineno, line=item.line)


def write_manifest(directory: Path) -> Path:
    """Record the SHA-256 and size of every file under ``directory`` in its ``manifest.json``."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {"format": 1, "files": {p.relative_to(directory).as_posix(): _manifest_entry(p) for p in files}}
    _write_json(directory / MANIFEST_FILE, manifest)
    return directory / MANIFEST_FILE


def verify_manifest(directory: Path) -> bool:
    """Check every file listed in ``directory``'s manifest (size, then SHA-256); False when it has no manifest.

    Raises:
        CheckpointError: a listed file is missing, truncated or altered; the message names it and the fix.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        if str(directory.resolve()) in _UNCHECKED_WARNED:
            return False
        _UNCHECKED_WARNED.add(str(directory.resolve()))
        warnings.warn(
            f"{directory} has no {MANIFEST_FILE} (written by an older pv2tea): its files load unchecked; "
            f"saving the model again (train --resume, or a new run) writes one",
            CheckpointWarning,
            stacklevel=3,
        )
        return False
    try:
        files = json.loads(path.read_text())["files"]
        listed = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}); copy the folder again from where it was trained"
        ) from None
    fix = (
        "copy the folder again from where it was trained (or retrain); if you changed the file on purpose, "
        f"delete {MANIFEST_FILE} to load the folder unchecked"
    )
    for name, (size, sha256) in listed.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing but listed in {path}: {fix}")
        actual = _manifest_entry(file)
        if actual["size"] != size:
            raise CheckpointError(
                f"{file} is {actual['size']:,} bytes but was written with {size:,} (truncated or altered): {fix}"
            )
        if actual["sha256"] != sha256:
            raise CheckpointError(
                f"{file} does not match the SHA-256 recorded when it was written (altered or corrupt): {fix}"
            )
    return True


@dataclass
class FolderDocs:
    """A model folder's JSON documents, as a migration reads and returns them."""

    config: dict[str, Any]  # pv2tea_config.json without its format version
    preprocess: dict[str, Any] | None  # preprocess.json (None: not in the folder)
    state: dict[str, Any] | None  # trainer_state.json (None: not in the folder, a model without training state)
    # suffixes of weights the folder holds and the model no longer has, ignored when loading
    obsolete_weights: tuple[str, ...] = ()


def _v1_to_v2(docs: FolderDocs) -> FolderDocs:
    """Version 1 (no version written) to 2: the fields added to a folder over time, filled as those folders meant.

    * config: ``train.init_from`` is ``train.warm_start``;
    * preprocess: no ``values`` / ``multi_value`` / ``value_counts`` (written before classification heads, closed
      value lists and candidate ranking's label prior): empty;
    * training state (written before several processes and weight averaging): one process
      (``world_size`` 1), a global batch of ``train.batch_size``, ``step_in_epoch`` such batches done in the epoch,
      no averaged epoch, no running sums and no recorded length of ``metrics.jsonl`` (not cut on resuming);
    * weights: the copy decoder's key bias (``copy_key.bias``) is ignored: constant over the positions a row's
      softmax normalizes over, it never affected an answer.
    """
    config = renamed_keys(docs.config, warn=False)
    preprocess = None
    if docs.preprocess is not None:
        preprocess = {"values": {}, "multi_value": {}, "value_counts": {}, **docs.preprocess}
    state = None
    if docs.state is not None:
        batch = (config.get("train") or {}).get("batch_size", TrainConfig().batch_size)
        state = {"world_size": 1, "global_batch": batch, "averaged_epochs": 0, "metrics_bytes": None, **docs.state}
        state.setdefault("rows_done", state["step_in_epoch"] * state["global_batch"])
        state.setdefault("epoch_sums", {})
        state.setdefault("epoch_stats", {})
    return FolderDocs(config, preprocess, state, (*docs.obsolete_weights, "copy_key.bias"))


# version -> the function that upgrades a folder of that version to the next one
MIGRATIONS: dict[int, Callable[[FolderDocs], FolderDocs]] = {1: _v1_to_v2}


def folder_version(directory: Path, config: Any) -> int:
    """The format version of the model folder ``directory`` whose pv2tea_config.json holds ``config``.

    Raises:
        CheckpointError: A version newer than this pv2tea knows, or one that is not a positive integer.
    """
    version = config.get(FORMAT_KEY, 1) if isinstance(config, dict) else 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: {FORMAT_KEY} must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} is a model folder of format version {version}, written by a newer pv2tea; this one "
            f"reads up to version {FORMAT_VERSION}: upgrade pv2tea (pip install -U pv2tea) to load it"
        )
    return version


def upgrade_folder(docs: FolderDocs, version: int) -> FolderDocs:
    """``docs`` of a folder of format ``version`` as the current format has them, one migration per step."""
    for step in range(version, FORMAT_VERSION):
        docs = MIGRATIONS[step](docs)
    return docs


def read_folder(directory: Path) -> FolderDocs:
    """A model folder's JSON documents, its files checked against the manifest and upgraded to the current format.

    Raises:
        CheckpointError: No config, a file that does not match the manifest, or a folder of a newer format.
    """
    directory = recover_interrupted_save(Path(directory))
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pv2tea checkpoint (no {CONFIG_FILE})")
    verify_manifest(directory)
    config = _read_json_file(path)
    version = folder_version(directory, config)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object: {DAMAGED_FIX}")
    config = {k: v for k, v in config.items() if k != FORMAT_KEY}
    optional = [directory / PREPROCESS_FILE, directory / STATE_FILE]
    preprocess, state = (_read_json_file(p) if p.is_file() else None for p in optional)
    return upgrade_folder(FolderDocs(config, preprocess, state), version)


def read_config(directory: Path) -> Config:
    """The config a model folder was trained with, its files checked against the manifest first.

    Raises:
        CheckpointError: No config, or a file that does not match the manifest.
    """
    return from_dict(read_folder(directory).config)


def read_json(directory: Path, name: str) -> Any:
    """The JSON file ``name`` of a model folder (``preprocess.json`` upgraded to the current format).

    Raises:
        CheckpointError: The file is missing or is not JSON.
    """
    path = recover_interrupted_save(Path(directory)) / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} lacks {name}")
    if name == PREPROCESS_FILE:
        return read_folder(directory).preprocess
    return _read_json_file(path)


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a model folder's weights into ``model``; a key missing from the file or unknown to the model is an error.

    Raises:
        CheckpointError: No weights file, a damaged one, or weights of another model (the keys listed).
    """
    path = recover_interrupted_save(Path(directory)) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} lacks {MODEL_FILE}")
    obsolete = read_folder(directory).obsolete_weights  # the manifest hashed once per file version (cached)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError) as exc:  # a folder without a manifest (older pv2tea) is not checked above
        raise unreadable_weights(path, exc) from None
    unexpected = [k for k in unexpected if not k.endswith(obsolete)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the model: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


WARM_START_FILE = "warm_start.json"  # in a run folder: which checkpoint the run started from, by path and content


def warm_start_fingerprint(directory: Path) -> str:
    """SHA-256 of a checkpoint's weights file: names a warm start by content, wherever its folder has moved."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"train.warm_start: {directory} is not a pv2tea checkpoint (no {MODEL_FILE})")
    stat = path.stat()  # the reuse checks of every fold and variant ask again: read the file once per version of it
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_warm_start(model: PV2TEA, directory: Path) -> int:
    """Copy the text encoder, fusion and decoder weights of checkpoint ``directory`` into ``model``.

    Every one of those weights must be in the checkpoint with the same shape (same text model, layer counts and
    decoder kind); the rest of ``model`` (visual encoder, heads, projections, momentum copies, a gated visual path of
    the fusion) is left as it is.
    Returns the number of tensors copied.
    """
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"train.warm_start: {directory} is not a pv2tea checkpoint (no {MODEL_FILE})")
    source = load_file(str(path))
    keys = model.warm_start_keys()
    target = {k: v for k, v in model.state_dict().items() if k in keys}
    # tied weights (the decoder's output layer is its word embeddings) are saved once: copying the saved name fills
    # the storage the other names share
    filled = {v.data_ptr() for k, v in target.items() if k in source}
    missing = sorted(k for k, v in target.items() if k not in source and v.data_ptr() not in filled)
    wrong = [
        (k, tuple(source[k].shape), tuple(v.shape))
        for k, v in target.items()
        if k in source and source[k].shape != v.shape
    ]
    if missing or wrong:
        detail = "; ".join(
            [
                *([f"missing {missing[:4]}"] if missing else []),
                *([f"shape (saved, here) differs for {wrong[:3]}"] if wrong else []),
            ]
        )
        raise CheckpointError(
            f"train.warm_start: {path} does not fit this model's text encoder, fusion and decoder "
            f"(is it a run with the same text model, layer counts and decoder?): {detail}"
        )
    with torch.no_grad():
        for k, tensor in target.items():
            if k in source:
                tensor.copy_(source[k])
    return len(target)


HEAD_KEYS = ("value_head.weight", "value_head.bias")


def class_map(ours: list[tuple[str, str]], theirs: list[tuple[str, str]]) -> torch.Tensor:
    """(V_ours,) the index of each of our (attribute, value) classes among ``theirs``; -1 where they lack it."""
    index = {c: i for i, c in enumerate(theirs)}
    return torch.tensor([index.get(c, -1) for c in ours], dtype=torch.long)


def warm_start_has_head(directory: Path) -> bool:
    """Whether the checkpoint in ``directory`` has a classification head (``decoder.head = classify``)."""
    return read_config(Path(directory)).decoder.head == "classify"


def load_warm_start_head(model: PV2TEA, value_classes: list[tuple[str, str]], directory: Path) -> int:
    """Copy the classification head of checkpoint ``directory`` into ``model``'s, class by class.

    The two runs' value vocabularies differ (each is built from its own training labels), so the rows are matched by
    (attribute, value): a class the warm start was trained on starts with its weights, one it never saw keeps its
    fresh initialization. Nothing happens when either model has no classification head. Returns the classes copied.
    """
    if model.value_head is None or not warm_start_has_head(directory):
        return 0
    with safe_open(str(Path(directory) / MODEL_FILE), framework="pt") as f:  # the two head tensors only
        names = set(f.keys())
        weight, bias = (f.get_tensor(k) if k in names else None for k in HEAD_KEYS)
    if weight is None or bias is None or weight.shape[1] != model.value_head.in_features:
        raise CheckpointError(
            f"train.warm_start: {directory}'s classification head does not fit this model's "
            f"({None if weight is None else tuple(weight.shape)} against width {model.value_head.in_features})"
        )
    from pv2tea.data.dataset import value_classes_of

    theirs = value_classes_of(read_json(Path(directory), PREPROCESS_FILE)["values"])
    if len(theirs) != weight.shape[0]:
        raise CheckpointError(
            f"train.warm_start: {directory} has {weight.shape[0]} head rows for {len(theirs)} classes"
        )
    where = class_map(value_classes, theirs)  # (V,)
    hit = where >= 0
    with torch.no_grad():
        model.value_head.weight[hit] = weight[where[hit]].to(model.value_head.weight.dtype)
        model.value_head.bias[hit] = bias[where[hit]].to(model.value_head.bias.dtype)
    return int(hit.sum())


def load_training_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The training state of a checkpoint (``--resume``): its JSON part and its tensors (``optimizer.safetensors``).

    Raises:
        CheckpointError: No training state, or a file that does not match the manifest.
    """
    directory = recover_interrupted_save(Path(directory))
    state_path, tensor_path = directory / STATE_FILE, directory / OPTIM_FILE
    if not state_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"{directory} holds no training state to resume from")
    state = read_folder(directory).state  # a torn or altered file is refused by name before anything is read
    if state is None:  # read_folder saw the file, so it was removed in between
        raise CheckpointError(f"{directory} holds no training state to resume from")
    return state, load_file(str(tensor_path))
