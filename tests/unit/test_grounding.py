"""Label grounding (schemes.ungrounded_weight): is the weak label in the text it was extracted from?"""

from __future__ import annotations

import numpy as np
import pytest

from pv2tea.data.schema import Record
from pv2tea.regularize.grounding import grounding_weights, label_in_text


@pytest.mark.parametrize("values,text,expected", [
    (("brown",), "Homely Ceramic Mug - Color: Brown", True),            # case
    (("polka dot",), "Features a polka-dot design.", True),             # punctuation normalized
    (("red",), "A bored cat", False),                                   # whole words only
    (("yellow", "green"), "Available in yellow, green and pink.", True),
    (("yellow", "white"), "Available in yellow and pink.", False),      # every value must occur
    ((), "anything", False),
])
def test_label_in_text(values, text, expected):
    assert label_in_text(values, text) is expected


def test_grounding_weights_scale_only_ungrounded_rows():
    rows = [Record("a", "Color: Red", (), "mug", "color", ("red",)),
            Record("b", "A plain mug", (), "mug", "color", ("white",)),
            Record("c", "Blue and red stripes", (), "mug", "color", ("red", "blue"))]
    np.testing.assert_allclose(grounding_weights(rows, 0.25), [1.0, 0.25, 1.0])
    np.testing.assert_allclose(grounding_weights(rows, 1.0), [1.0, 1.0, 1.0])
