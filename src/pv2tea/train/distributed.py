"""Training on several processes (DDP) through Hugging Face Accelerate.

``torchrun --nproc_per_node N --no-python pv2tea train ...`` (or ``accelerate launch``) starts N copies of the same
command; :func:`make_accelerator` joins them (gloo on CPU, NCCL on GPUs). Each optimizer step takes a global batch
of ``batch_size × N × grad_accumulation_steps`` rows of the epoch's order, cut into N equal contiguous parts, one
per rank (:func:`step_rows`, :func:`rank_part`): the same rows, in the same order, as one process with that batch
size, and a pure function of (seed, epoch, position) so a resumed run replays it. Gradients are averaged by DDP
and every rank's part has the same number of rows, so the generation loss of N ranks equals the one of one
process over the whole global batch; S1 contrasts with and enqueues the momentum features of every rank
(``models/momentum.py``). S3's weights are computed by rank 0 over the whole training set and broadcast, and only
rank 0 writes the run folder. One process without a launcher runs exactly the single-process code path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from pv2tea.config import Config


class DistributedError(RuntimeError):
    """A launch or setting this process group cannot train with, said in one message."""


def make_accelerator(cfg: Config):
    """The Accelerator of this process: DDP over the launcher's processes (CPU without a GPU), the mixed
    precision of ``train.mixed_precision``. Gradient accumulation is done by the loop (it also sizes the last,
    shorter group of an epoch), so Accelerate's own is left at 1."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and cpu:
        raise DistributedError("train.mixed_precision=fp16 needs a GPU; on a CPU use bf16 (or no)")
    # unused parameters: a rank whose rows have no image does not reach the image heads at that step; buffers (the
    # S1 queues) are kept equal by the ranks themselves (each enqueues every rank's features), not broadcast
    # Accelerate keeps its settings per process: a second run in the same process (tests, experiments) may ask for
    # another precision. The process group (PartialState) is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    return Accelerator(
        cpu=cpu, mixed_precision=cfg.train.mixed_precision, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False
    )


def prepare_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model wrapped in DDP over the ranks (the model itself in one process)."""
    with warnings.catch_warnings():  # torch renames broadcast_buffers; Accelerate still passes the old name
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return accelerator.prepare_model(model)


def rows_per_rank_step(cfg: Config) -> int:
    """The rows one rank takes per optimizer step (its micro-batches together)."""
    return cfg.train.batch_size * cfg.train.grad_accumulation_steps


def steps_per_epoch(n_rows: int, cfg: Config, world_size: int) -> int:
    """Optimizer steps of an epoch of ``n_rows`` rows on ``world_size`` ranks (the rows padded to a multiple of it)."""
    return math.ceil(math.ceil(n_rows / world_size) / rows_per_rank_step(cfg))


def step_rows(order: Sequence[int], start: int, rows_per_rank: int, world_size: int) -> list[list[int]]:
    """The global batches of the rest of an epoch: ``order`` is the epoch's rows in training order, of which earlier
    steps took the first ``start``. The rest is padded to a multiple of ``world_size`` by wrapping around to the
    start of ``order`` (so no rank ever has an empty step; at most world_size − 1 rows are seen twice an epoch),
    then cut into steps of ``rows_per_rank × world_size`` rows."""
    rest = list(order[start:])
    rest += [order[i % len(order)] for i in range(-len(rest) % world_size)]
    size = rows_per_rank * world_size
    return [rest[i : i + size] for i in range(0, len(rest), size)]


def rank_part(rows: Sequence[int], world_size: int, rank: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch (whose length is a multiple of ``world_size``)."""
    per = len(rows) // world_size
    return list(rows[rank * per : (rank + 1) * per])


def micro_batches(rows: Sequence[int], batch_size: int) -> list[list[int]]:
    """A rank's rows of one optimizer step as the micro-batches of gradient accumulation."""
    return [list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def broadcast(value: Any, accelerator) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object); the value itself in one process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather(value: Any, accelerator) -> list[Any]:
    """Every rank's ``value`` (any picklable object) in rank order, on every rank; ``[value]`` in one process."""
    if accelerator.num_processes == 1:
        return [value]
    out: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, value)
    return out


def mean_over_ranks(values: dict[str, float], accelerator) -> dict[str, float]:
    """Each logged loss term averaged over the ranks that computed it (a rank without image rows has no image
    terms at a step); ``values`` itself in one process."""
    if accelerator.num_processes == 1:
        return values
    seen: dict[str, list[float]] = {}
    for rank_values in gather(values, accelerator):
        for key, value in rank_values.items():
            seen.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in seen.items()}


def world_size_change(
    saved: int,
    now: int,
    step: int,
    rows_done: int,
    saved_steps_per_epoch: int,
    new_steps_per_epoch: int,
    epoch: int,
    global_batch_before: int,
    global_batch_now: int,
) -> tuple[int, str]:
    """The optimizer step a run saved at world size ``saved`` continues from at world size ``now`` (steps count
    global batches, which change size with it), and the message that says so."""
    # the rows done as whole steps of the new size (a part of one left over is not counted: the run then ends at
    # most one step short of the schedule's total rather than past it)
    new_step = epoch * new_steps_per_epoch + rows_done // global_batch_now
    message = (
        f"resuming at world size {now} a run saved at world size {saved}: a step now takes {global_batch_now} "
        f"rows instead of {global_batch_before}, so an epoch takes {new_steps_per_epoch} steps instead of "
        f"{saved_steps_per_epoch}; the run continues from row {rows_done} of epoch {epoch + 1}, and step "
        f"{step} becomes step {new_step}. The learning-rate schedule follows the rows seen, as before; "
        f"train.max_steps and train.save_every_steps count the new steps. The weights continue exactly, but "
        f"the rest of the run is not the one an unchanged world size would have given (other batches)"
    )
    return new_step, message
