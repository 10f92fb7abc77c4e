"""Which rows an epoch trains on when only part of a large image-less (text-only) set is drawn per epoch."""

from __future__ import annotations

from pv2tea.data.schema import Record
from pv2tea.train.loop import epoch_rows


def _records(n_image: int, n_text: int) -> list[Record]:
    with_image = [Record(f"i{k}", "t", (f"{k}.png",), "c", "color", ("red",)) for k in range(n_image)]
    text_only = [Record(f"t{k}", "t", (), "c", "color", ("red",)) for k in range(n_text)]
    return [x for pair in zip(with_image, text_only[:n_image]) for x in pair] + text_only[n_image:]  # interleaved


def test_every_image_row_and_a_fresh_sample_of_the_others_each_epoch():
    records = _records(5, 40)
    image_rows = {i for i, r in enumerate(records) if r.images}
    epochs = [epoch_rows(records, 10, seed=3, epoch=e) for e in range(4)]
    for rows in epochs:
        assert rows == sorted(set(rows)) and image_rows <= set(rows)
        assert len(rows) == 5 + 10
    drawn = [set(rows) - image_rows for rows in epochs]
    assert len({frozenset(d) for d in drawn}) == 4  # another sample each epoch
    assert len(set().union(*drawn)) > 20  # so the epochs together cover more than one epoch's share
    assert epoch_rows(records, 10, seed=3, epoch=2) == epochs[2]  # a pure function: resume replays it
    assert epoch_rows(records, 10, seed=4, epoch=2) != epochs[2]


def test_all_rows_when_unbounded_or_the_bound_covers_them():
    records = _records(3, 6)
    assert epoch_rows(records, None, seed=0, epoch=0) == list(range(9))
    assert epoch_rows(records, 6, seed=0, epoch=5) == list(range(9))
    assert [records[i].id for i in epoch_rows(records, 0, seed=0, epoch=0)] == ["i0", "i1", "i2"]
