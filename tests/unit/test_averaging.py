"""WeightAverage: the equal mean of the trainable parameters, frozen ones untouched, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pv2tea.train.averaging import WeightAverage


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    return model


def test_average_of_three_epochs_and_frozen_parts_untouched():
    model = _model()
    average = WeightAverage(model)
    assert average.names == ["1.weight", "1.bias"]
    seen = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model[1].weight.fill_(value)
        seen.append(model[1].weight.clone())
        average.update(model)
    frozen = model[0].weight.clone()
    average.copy_to(model)
    assert torch.allclose(model[1].weight, torch.full((1, 2), 3.0))
    assert torch.equal(model[0].weight, frozen)

    tensors, count = average.state()
    assert count == 3 and set(tensors) == {"average.1.weight", "average.1.bias"}
    again = WeightAverage(_model())
    again.load({**tensors, "optim.0.exp_avg": torch.zeros(1)}, count)
    assert again.count == 3 and torch.equal(again.tensors["1.weight"], average.tensors["1.weight"])


def test_copy_before_any_update_is_a_noop_and_missing_tensors_are_named():
    model = _model()
    before = model[1].weight.clone()
    WeightAverage(model).copy_to(model)
    assert torch.equal(model[1].weight, before)
    with pytest.raises(ValueError, match="1.weight"):
        WeightAverage(model).load({"average.1.bias": torch.zeros(1)}, 2)
    empty = WeightAverage(model)
    empty.load({}, 0)  # a checkpoint written before the first averaged epoch
    assert empty.count == 0
