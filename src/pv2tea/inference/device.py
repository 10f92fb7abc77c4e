"""The torch device a model predicts on: ``--device auto|cpu|cuda|cuda:N|mps`` of ``pv2tea predict`` and ``serve``.

``auto`` takes a CUDA GPU when torch sees one (under a launcher, the GPU of the process's ``LOCAL_RANK``) and the
CPU otherwise. A device that is not there is refused with a message saying what torch sees, rather than failing
at the first batch.
"""

from __future__ import annotations

import os
import re

import torch

__all__ = ["DEVICE_CHOICES", "DeviceError", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(ValueError):
    pass


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device ``spec`` names (None: ``auto``).

    Raises:
        DeviceError: ``spec`` is not one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, or names a device
            this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    count = _cuda_count()
    if text == "auto":
        if count:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not count:
            raise DeviceError(
                f"--device {spec}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu or auto"
            )
        index = int(match.group(1)) if match.group(1) is not None else int(os.environ.get("LOCAL_RANK", "0")) % count
        if index >= count:
            raise DeviceError(f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise DeviceError(f"--device {spec}: Apple's Metal (MPS) backend is not available here; use cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"--device must be one of {DEVICE_CHOICES}; got '{spec}'")
