"""Momentum (EMA) update and the S1 feature queue (paper §3.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pv2tea.models.momentum import FeatureQueue, ema_update


def scalar_module(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_ema_literal_two_steps():
    online, momentum = scalar_module(1.0), scalar_module(0.0)
    ema_update(online, momentum, 0.9)
    assert momentum.weight.item() == pytest.approx(0.1, abs=1e-7)
    ema_update(online, momentum, 0.9)
    assert momentum.weight.item() == pytest.approx(0.19, abs=1e-7)
    assert online.weight.item() == 1.0  # the online model is never touched


def test_ema_every_parameter_and_no_grad():
    online = nn.Linear(2, 1)
    momentum = nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[2.0, -4.0]]))
        online.bias.fill_(10.0)
        momentum.weight.copy_(torch.tensor([[0.0, 4.0]]))
        momentum.bias.fill_(0.0)
    ema_update(online, momentum, 0.75)
    # 0.75·θ' + 0.25·θ
    assert momentum.weight[0].tolist() == pytest.approx([0.5, 2.0])
    assert momentum.bias.item() == pytest.approx(2.5)
    assert momentum.weight.grad is None and online.weight.grad is None


def test_ema_momentum_zero_copies_and_one_keeps():
    online, momentum = scalar_module(3.0), scalar_module(-1.0)
    ema_update(online, momentum, 1.0)
    assert momentum.weight.item() == -1.0
    ema_update(online, momentum, 0.0)
    assert momentum.weight.item() == 3.0


def test_ema_mismatched_modules_raise():
    # a momentum copy with a different number of parameters (no bias) raises instead of being silently skipped
    with pytest.raises(ValueError):
        ema_update(nn.Linear(1, 1), scalar_module(0.0), 0.9)


def batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features that encode their id: image = (id, -id), text = (10·id, 1)."""
    image = torch.tensor([[float(i), -float(i)] for i in ids]).reshape(len(ids), 2)
    text = torch.tensor([[10.0 * i, 1.0] for i in ids]).reshape(len(ids), 2)
    return image, text, torch.tensor(ids, dtype=torch.long)


def assert_slots(q: FeatureQueue, ids: list[int]) -> None:
    assert q.ids.tolist() == ids
    for slot, i in enumerate(ids):
        if i >= 0:
            assert q.image[slot].tolist() == [float(i), -float(i)]
            assert q.text[slot].tolist() == [10.0 * i, 1.0]
        else:
            assert q.image[slot].tolist() == [0.0, 0.0] and q.text[slot].tolist() == [0.0, 0.0]


def test_fresh_queue_is_empty():
    q = FeatureQueue(2, 5)
    assert q.ptr.item() == 0 and q.count.item() == 0
    assert q.valid().tolist() == [False] * 5
    assert_slots(q, [-1] * 5)


def test_wrap_around_size5_batches_of_3():
    q = FeatureQueue(2, 5)
    q.enqueue(*batch([0, 1, 2]))
    assert_slots(q, [0, 1, 2, -1, -1])
    assert (q.ptr.item(), q.count.item()) == (3, 3)
    assert q.valid().tolist() == [True, True, True, False, False]

    q.enqueue(*batch([3, 4, 5]))
    assert_slots(q, [5, 1, 2, 3, 4])
    assert (q.ptr.item(), q.count.item()) == (1, 5)
    assert q.valid().tolist() == [True] * 5

    q.enqueue(*batch([6, 7, 8]))
    assert_slots(q, [5, 6, 7, 8, 4])
    assert (q.ptr.item(), q.count.item()) == (4, 5)

    q.enqueue(*batch([9, 10, 11]))
    assert_slots(q, [10, 11, 7, 8, 9])
    assert (q.ptr.item(), q.count.item()) == (2, 5)


def test_uneven_batches():
    q = FeatureQueue(2, 5)
    q.enqueue(*batch([0]))
    assert_slots(q, [0, -1, -1, -1, -1])
    assert (q.ptr.item(), q.count.item()) == (1, 1)
    q.enqueue(*batch([1, 2, 3, 4]))
    assert_slots(q, [0, 1, 2, 3, 4])
    assert (q.ptr.item(), q.count.item()) == (0, 5)


def test_batch_larger_than_queue_keeps_last_size():
    q = FeatureQueue(2, 5)
    q.enqueue(*batch([0, 1, 2, 3, 4, 5, 6]))
    assert_slots(q, [2, 3, 4, 5, 6])
    assert (q.ptr.item(), q.count.item()) == (0, 5)


def test_batch_larger_than_queue_from_offset():
    q = FeatureQueue(2, 5)
    q.enqueue(*batch([100, 101]))
    q.enqueue(*batch([0, 1, 2, 3, 4, 5, 6]))
    # last five (2..6) written from slot 2 on, wrapping
    assert_slots(q, [5, 6, 2, 3, 4])
    assert (q.ptr.item(), q.count.item()) == (2, 5)


def test_empty_batch_is_noop():
    q = FeatureQueue(2, 5)
    q.enqueue(*batch([7, 8]))
    q.enqueue(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert_slots(q, [7, 8, -1, -1, -1])
    assert (q.ptr.item(), q.count.item()) == (2, 2)
    assert q.valid().tolist() == [True, True, False, False, False]


def test_valid_selects_filled_slots():
    q = FeatureQueue(2, 4)
    q.enqueue(*batch([3, 9]))
    valid = q.valid()
    assert valid.dtype == torch.bool
    assert q.ids[valid].tolist() == [3, 9]
    assert q.image[valid].shape == (2, 2)


def test_buffers_in_state_dict_and_restored():
    q = FeatureQueue(2, 5)
    q.enqueue(*batch([0, 1, 2]))
    q.enqueue(*batch([3, 4, 5]))
    state = q.state_dict()
    assert set(state) == {"image", "text", "ids", "ptr", "count"}
    assert list(q.parameters()) == []  # buffers, never trained
    fresh = FeatureQueue(2, 5)
    fresh.load_state_dict(state)
    assert_slots(fresh, [5, 1, 2, 3, 4])
    assert (fresh.ptr.item(), fresh.count.item()) == (1, 5)
    fresh.enqueue(*batch([6]))  # continues where the saved queue stopped
    assert_slots(fresh, [5, 6, 2, 3, 4])


def test_queue_nested_in_module_is_checkpointed():
    holder = nn.Module()
    holder.queue = FeatureQueue(3, 4)
    keys = set(holder.state_dict())
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr", "queue.count"} <= keys
