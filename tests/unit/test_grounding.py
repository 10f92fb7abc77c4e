"""Label grounding: is the weak label in the text it was extracted from (schemes.ungrounded_weight), and the
text without it (schemes.mention_dropout)?"""

from __future__ import annotations

import numpy as np
import pytest

from pv2tea.data.schema import Record
from pv2tea.regularize.grounding import (
    grounding_weights,
    keep_labels,
    label_in_text,
    label_weights,
    mention_free_texts,
    remove_mentions,
)
from pv2tea.train.loop import mention_dropout_rows


@pytest.mark.parametrize(
    "values,text,expected",
    [
        (("brown",), "Homely Ceramic Mug - Color: Brown", True),  # case
        (("polka dot",), "Features a polka-dot design.", True),  # punctuation normalized
        (("red",), "A bored cat", False),  # whole words only
        (("yellow", "green"), "Available in yellow, green and pink.", True),
        (("yellow", "white"), "Available in yellow and pink.", False),  # every value must occur
        ((), "anything", False),
    ],
)
def test_label_in_text(values, text, expected):
    assert label_in_text(values, text) is expected


def test_grounding_weights_scale_only_ungrounded_rows():
    rows = [
        Record("a", "Color: Red", (), "mug", "color", ("red",)),
        Record("b", "A plain mug", (), "mug", "color", ("white",)),
        Record("c", "Blue and red stripes", (), "mug", "color", ("red", "blue")),
    ]
    np.testing.assert_allclose(grounding_weights(rows, 0.25), [1.0, 0.25, 1.0])
    np.testing.assert_allclose(grounding_weights(rows, 1.0), [1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "text,values,expected",
    [
        ("Homely Mug - Color: Brown", ["brown"], "Homely Mug - Color:"),  # case
        ("A bored red cat", ["red"], "A bored cat"),  # whole words only
        ("Navy-Blue mug, navy blue lid, blue cup", ["navy blue"], "mug, lid, blue cup"),  # any separator
        ("A navy blue mug in blue", ["blue", "navy blue"], "A mug in"),  # longest first
        (
            "Title\n- Color: Yellow, Green and Pink\n- Soft",
            ["yellow", "green", "pink"],
            "Title\n- Color: , and\n- Soft",
        ),  # lines kept
        ("Polka dot (polka-dot) print", ["Polka Dot"], "() print"),
        ("A mug", ["C++"], "A mug"),  # regex-safe
        ("A mug", ["!!"], "A mug"),  # empty value
    ],
)
def test_remove_mentions_words(text, values, expected):
    out = remove_mentions(text, values)
    assert out == expected
    assert not any(label_in_text([v], out) for v in values)


@pytest.mark.parametrize(
    "text,values,expected",
    [
        # a bullet that states the value goes whole: no "Color:" left behind
        (
            "Homely Ceramic Mug\n- Dishwasher safe\n- Color: Brown\n- Lead-free\nA gift for housewarmings.",
            ["brown"],
            "Homely Ceramic Mug\n- Dishwasher safe\n- Lead-free\nA gift for housewarmings.",
        ),
        # a description sentence that states it goes whole; the other sentences of the line stay
        (
            "Urbano Mug\n- Soft\nA gift. Available in purple, red and yellow. Wash cold.",
            ["purple", "red", "yellow"],
            "Urbano Mug\n- Soft\nA gift. Wash cold.",
        ),
        # in the title only the words (with their list glue) go
        (
            "Urbano Purple, Red and Yellow Mug - Gift Set\n- Soft",
            ["purple", "red", "yellow"],
            "Urbano Mug - Gift Set\n- Soft",
        ),
        ("Striped Rug. Features a striped design! Soft.", ["striped"], "Rug. Soft."),  # sentences of one line
        ("Red/white & blue or green mug. Soft", ["red", "white", "blue", "green"], "mug. Soft"),  # list glue
        ("Red", ["red"], ""),  # nothing else to keep
        ("A mug\n- Soft", ["!!"], "A mug\n- Soft"),
    ],
)
def test_remove_mentions_sentence(text, values, expected):
    out = remove_mentions(text, values, mode="sentence")
    assert out == expected
    assert not any(label_in_text([v], out) for v in values)


def test_remove_mentions_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="'sentence' or 'words'"):
        remove_mentions("Red mug", ["red"], mode="tokens")


def test_mention_free_texts_only_for_grounded_rows_with_an_image():
    rows = [
        Record("a", "A mug. Color: Red. Soft", ("a.png",), "mug", "color", ("red",)),
        Record("b", "Color: Red. A mug", (), "mug", "color", ("red",)),  # no image to answer from
        Record("c", "A plain mug", ("c.png",), "mug", "color", ("white",)),  # label not in the text
        Record("d", "Blue and red stripes", ("d.png",), "mug", "color", ("red", "blue")),
    ]
    assert mention_free_texts(rows) == ["A mug. Color: . Soft", None, None, "and stripes"]
    assert mention_free_texts(rows, mode="sentence") == ["A mug. Soft", None, None, "stripes"]


def test_mention_dropout_rows_are_a_pure_function_of_seed_and_epoch():
    free = [f"text {i}" if i % 3 else None for i in range(3000)]
    eligible = {i for i, t in enumerate(free) if t is not None}
    a = mention_dropout_rows(free, 0.5, seed=1, epoch=0)
    assert a == mention_dropout_rows(free, 0.5, seed=1, epoch=0)
    assert a != mention_dropout_rows(free, 0.5, seed=1, epoch=1) != mention_dropout_rows(free, 0.5, seed=2, epoch=0)
    assert set(a) <= eligible and all(a[i] == free[i] for i in a)
    assert abs(len(a) / len(eligible) - 0.5) < 0.05
    assert set(mention_dropout_rows(free, 1.0, seed=1, epoch=0)) == eligible
    assert mention_dropout_rows(free, 0.0, seed=1, epoch=0) == {}


def test_keep_labels_keeps_only_the_labels_the_text_states():
    rows = [
        Record("a", "Color: Red. A mug", ("a.png",), "mug", "color", ("red",)),
        Record("b", "A plain mug", ("b.png",), "mug", "color", ("white",)),  # the extractor guessed
        Record("c", "A plain mug", ("c.png",), "mug", "color", ()),  # no label at all
        Record("d", "Blue and red stripes", (), "mug", "color", ("red", "green")),
    ]  # green not stated
    preds = [["blue"], ["black"], ["grey"], ["red"]]
    assert keep_labels(rows, preds) == [["red"], ["black"], ["grey"], ["red"]]
    with pytest.raises(ValueError, match="3 predictions for 4 rows"):
        keep_labels(rows, preds[:3])


def test_label_weights_are_relative_within_each_attribute():
    def row(i, attribute, weight):
        return Record(f"r{i}", "t", (), "c", attribute, ("v",), label_weight=weight)

    rows = [
        row(0, "color", 0.2),
        row(1, "color", 0.6),
        row(2, "color", None),  # color's weighted mean: 0.4
        row(3, "shape", 0.9),
        row(4, "shape", 0.9),  # all alike: 1 each
        row(5, "size", 0.0),
        row(6, "size", 0.0),
    ]  # no trust at all stays none
    assert np.allclose(label_weights(rows), [0.5, 1.5, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert label_weights([row(0, "color", None)]) is None
