"""A product's rows encoded once per batch (models/sharing.py) and product-grouped batches (train.product_batches):
the same losses, gradients and answers as encoding every row, with fewer encoder rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_model import build, image_paths, make_batch, records, single_thread  # noqa: F401  (fixtures)

from pv2tea.models.sharing import distinct_rows, shared
from pv2tea.train.loop import epoch_batches


def test_distinct_rows_numbers_keys_by_first_appearance():
    keys = torch.tensor([[3, 1], [2, 2], [3, 1], [0, 0], [2, 2]])
    first, inverse = distinct_rows(keys)
    assert first.tolist() == [0, 1, 3]
    assert inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(keys[first][inverse], keys)
    assert distinct_rows(torch.tensor([[1], [2]])) is None  # all distinct: nothing to share
    assert distinct_rows(torch.tensor([[1]])) is None
    # several keys are compared together; floats exactly
    a = torch.tensor([1, 1, 1])
    b = torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.5, 0.2500001]])
    assert distinct_rows(a, b)[1].tolist() == [0, 0, 1]


def test_shared_computes_distinct_rows_once_and_expands():
    keys = torch.tensor([[1], [2], [1], [1]])
    seen: list[int] = []

    def fn(rows: torch.Tensor) -> torch.Tensor:
        seen.append(len(rows))
        return keys[rows].float() * 10

    out = shared(fn, (keys,))
    assert seen == [2] and out.squeeze(1).tolist() == [10, 20, 10, 10]
    shared(fn, (keys,), enabled=False)
    assert seen == [2, 4]


def product_rows(paths: list[str]):
    """Two attributes of each image-bearing product (rows of a product adjacent), as a catalogue has them."""
    out = []
    for r in records(paths):
        out += [r, replace(r, id=r.id + "-material", attribute="material", label=("cotton",), gold=None)]
    return out


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
        if hasattr(m, "config") and hasattr(m.config, "attention_probs_dropout_prob"):
            m.config.attention_probs_dropout_prob = 0.0


@pytest.mark.parametrize("cached", [False, True])
def test_shared_encoding_gives_the_same_loss_and_gradients(tiny_text_ckpt, image_paths, cached):  # noqa: F811
    from pv2tea.data.dataset import RecordDataset, make_collate
    from pv2tea.train.feature_cache import build_feature_cache

    extra = ["vision.freeze=true", "schemes.attention_pruning=false"] if cached else []
    plain, pre = build(tiny_text_ckpt, "train.product_batches=false", *extra)
    sharing, _ = build(tiny_text_ckpt, "train.product_batches=true", *extra)
    sharing.load_state_dict(plain.state_dict())
    rows = product_rows(image_paths)
    dataset = RecordDataset(rows)
    if cached:
        pre.cache = build_feature_cache(plain, pre, rows, batch_size=4)
    batch = make_collate(pre, dataset, with_answers=True)(list(range(len(rows))))
    assert len(set(batch.pair_id.tolist())) == len(rows) // 2

    calls: list[int] = []
    top = sharing.text_encoder.encoder.layer[-1]
    hook = top.register_forward_pre_hook(lambda m, args, kw: calls.append(args[0].shape[0]), with_kwargs=True)
    losses = {}
    for name, model in (("plain", plain), ("sharing", sharing)):
        model.train()
        _no_dropout(model)
        torch.manual_seed(0)
        out = model(batch)
        out.loss.backward()
        losses[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    hook.remove()
    # the online text encoder ran on the 4 distinct texts, not the 8 rows (the momentum copy is another module)
    assert calls and calls[0] == len(rows) // 2
    (a, ga), (b, gb) = losses["plain"], losses["sharing"]
    for key in a.terms:
        torch.testing.assert_close(a.terms[key], b.terms[key], atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-3, msg=name)


def test_inference_shares_inputs_whatever_the_training_setting(tiny_text_ckpt, image_paths):  # noqa: F811
    model, pre = build(tiny_text_ckpt, "train.product_batches=false")
    rows = product_rows(image_paths)
    batch = make_batch(pre, rows)
    model.eval()
    assert model.shares_inputs
    with torch.no_grad():
        together = model.value_logits(batch) if model.decoder is None else model.encode(batch).memory
        alone = torch.cat(
            [
                model.value_logits(make_batch(pre, [r]))
                if model.decoder is None
                else model.encode(make_batch(pre, [r])).memory
                for r in rows
            ]
        )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    model.train()
    assert not model.shares_inputs


def test_product_batches_keep_each_product_together_in_a_fresh_order():
    groups = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5]
    batches = epoch_batches(len(groups), 4, seed=0, epoch=0, groups=groups)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(len(groups)))
    assert all(len(b) == 4 for b in batches)
    runs = [groups[i] for i in order]
    # each product's rows are consecutive, in their own order
    assert len([g for j, g in enumerate(runs) if j == 0 or runs[j - 1] != g]) == len(set(groups))
    for g in set(groups):
        mine = [i for i in order if groups[i] == g]
        assert mine == sorted(mine)
    assert epoch_batches(len(groups), 4, 0, 0, groups) == batches  # a pure function of (seed, epoch): resume replays
    assert any(epoch_batches(len(groups), 4, 0, e, groups) != batches for e in range(1, 4))
    # one row per product: exactly the ungrouped shuffle (a catalogue of single-attribute products trains as before)
    assert epoch_batches(7, 3, 1, 2, groups=[10, 11, 12, 13, 14, 15, 16]) == epoch_batches(7, 3, 1, 2)
