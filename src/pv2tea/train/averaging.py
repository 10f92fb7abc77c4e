"""Weight averaging over the last epochs (stochastic weight averaging, Izmailov et al., UAI 2018).

With weak labels the model keeps moving between epochs as it fits and unfits noisy rows; on the demo catalog
the validation F1 of the last epochs swings by several points from one epoch to the next. The equal average
of the trainable weights at the end of the last N epochs (``train.average_epochs``) is one model that sits
between them. Only parameters that train are averaged (frozen backbones are the same at every epoch), and
buffers (BatchNorm statistics, kept frozen by ``vision.freeze_bn``; S1's queues) keep their latest values.

The running average lives next to the optimizer state in a checkpoint (``average.<name>`` tensors), so a
resumed run averages exactly what an uninterrupted one does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import get_swa_multi_avg_fn

PREFIX = "average."


class WeightAverage:
    """Equal running average of a model's trainable parameters, updated once per epoch."""

    def __init__(self, model: nn.Module):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.tensors: dict[str, torch.Tensor] = {}
        self.count = 0
        self._update = get_swa_multi_avg_fn()

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        current = [p.detach() for p in self._params(model)]
        if self.count == 0:
            self.tensors = {name: p.clone() for name, p in zip(self.names, current)}
        else:
            averaged = [self.tensors[name] for name in self.names]
            self._update(averaged, current, self.count)
        self.count += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the average into the model's parameters (a no-op before the first update)."""
        if self.count == 0:
            return
        for name, p in zip(self.names, self._params(model)):
            p.copy_(self.tensors[name])

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """Tensors (``average.<name>``) and the number of averaged epochs, for a checkpoint."""
        return {PREFIX + name: t.contiguous() for name, t in self.tensors.items()}, self.count

    def load(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        """Restore what :meth:`state` returned (tensors may hold other keys too)."""
        missing = [name for name in self.names if PREFIX + name not in tensors] if count else []
        if missing:
            raise ValueError(
                f"the checkpoint's weight average lacks {len(missing)} trainable parameter(s) of the "
                f"model, e.g. {missing[0]}"
            )
        self.count = count
        self.tensors = {name: tensors[PREFIX + name].clone() for name in self.names} if count else {}
