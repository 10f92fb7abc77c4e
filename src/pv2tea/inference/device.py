"""The torch device a model predicts on (``--device auto|cpu|cuda|cuda:N|mps`` of ``pv2tea predict`` and ``serve``)
and the number format it computes in (``--precision fp32|bf16|fp16``).

``auto`` takes a CUDA GPU when torch sees one (under a launcher, the GPU of the process's ``LOCAL_RANK``) and the
CPU otherwise. A device that is not there is refused with a message saying what torch sees, rather than failing
at the first batch.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

__all__ = ["DEVICE_CHOICES", "PRECISIONS", "DeviceError", "autocast_for", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
# fp32: weights and arithmetic in float32. bf16 / fp16: the forward pass under torch.autocast (matrix products and
# convolutions in the 16-bit format, reductions and the weights in float32); bf16 runs on CPUs (fast where the CPU
# has AMX or AVX-512 BF16) and GPUs, fp16 on GPUs only.
PRECISIONS = ("fp32", "bf16", "fp16")


class DeviceError(ValueError):
    """A ``--device`` or ``--precision`` that is unknown or that this machine cannot run, said with what it can."""


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


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the context a forward pass at ``precision`` on ``device`` runs in (fp32: none).

    Raises:
        DeviceError: an unknown precision, or fp16 on a device other than a CUDA GPU.
    """
    text = precision.strip().lower()
    if text not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}; got '{precision}'")
    if text == "fp32":
        return contextlib.nullcontext
    if text == "fp16" and device.type != "cuda":
        raise DeviceError(f"--precision fp16 needs a CUDA GPU (the model is on {device}); on a CPU use bf16 or fp32")
    dtype = torch.bfloat16 if text == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
