"""Soft labels (``Record.label_probs``, ``loss.soft_label_weight``): a classifying run trained on an extractor's class
probabilities next to the labels, and the extractor's out-of-fold probabilities that supply them."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from pv2tea.baselines import TextExtractor, TfidfExtractorConfig, TfidfTextExtractor, soft_labelled
from pv2tea.config import ConfigError, load_config
from pv2tea.data.dataset import value_counts
from pv2tea.data.schema import Record
from pv2tea.experiment import TEA
from pv2tea.inference.predictor import Predictor
from pv2tea.models.build import build_for_training
from pv2tea.train.loop import train

CLASSIFY = "decoder.head=classify"


def _row(i: int, label: str, probs: dict[str, float] | None = None, attribute: str = "color") -> Record:
    return Record(
        f"r{i}",
        f"a mug number {i}",
        (),
        "mug",
        attribute,
        (label,),
        label_probs=tuple(probs.items()) if probs else None,
    )


def test_soft_label_weight_needs_the_classification_head(tiny_text_ckpt):
    with pytest.raises(ConfigError, match="set decoder.head=classify"):
        load_config(None, [*tiny_overrides(tiny_text_ckpt), "loss.soft_label_weight=0.5"])
    with pytest.raises(ConfigError, match=r"soft_label_weight must be in \[0, 1\]"):
        load_config(None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY, "loss.soft_label_weight=1.5"])


def test_a_rows_target_mixes_its_label_with_its_soft_label(tiny_text_ckpt):
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), *TEA, CLASSIFY])
    _, pre = build_for_training(cfg, ["mug"], {"color": ["blue", "green", "red"], "size": ["xl"]})
    index = {c: i for i, c in enumerate(pre.value_classes)}
    # "Purple" is not a class of the run: its share is dropped and the rest renormalized; "xl" is another attribute's
    row = _row(0, "red", {"Blue": 0.4, "red": 0.2, "purple": 0.2, "xl": 0.2})
    mixed = pre.value_target(row, 0.25)
    expected = torch.zeros(len(pre.value_classes))
    expected[index[("color", "red")]] = 0.75 + 0.25 * 0.2 / 0.6
    expected[index[("color", "blue")]] = 0.25 * 0.4 / 0.6
    torch.testing.assert_close(mixed, expected)
    assert mixed.sum().item() == pytest.approx(1.0)
    hard = torch.zeros(len(pre.value_classes))
    hard[index[("color", "red")]] = 1.0
    torch.testing.assert_close(pre.value_target(row, 0.0), hard)  # β = 0: the label alone
    torch.testing.assert_close(pre.value_target(_row(1, "red"), 0.25), hard)  # no soft label: the label alone
    only_unknown = _row(2, "red", {"purple": 1.0})
    torch.testing.assert_close(pre.value_target(only_unknown, 0.25), hard)  # none of the run's classes: the label


def test_value_counts_follow_the_soft_targets():
    rows = [_row(0, "red", {"red": 0.5, "blue": 0.5}), _row(1, "blue"), _row(2, "red", {"Red": 3.0, "blue": 1.0})]
    assert value_counts(rows) == {"color": {"blue": 1, "red": 2}}
    counts = value_counts(rows, 0.5)
    assert counts["color"]["red"] == pytest.approx(0.5 + 0.25 + 0.5 + 0.375)
    assert counts["color"]["blue"] == pytest.approx(0.25 + 1.0 + 0.125)
    assert sum(counts["color"].values()) == pytest.approx(len(rows))
    # a soft label with none of the training values trains the label alone (value_target), and counts so
    fallback = [_row(0, "red", {"purple": 1.0}), _row(1, "blue", {"red": 0.0, "blue": 0.0})]
    assert value_counts(fallback, 0.5) == {"color": {"blue": 1, "red": 1}}
    # a multi-value row counts once per label value, its soft label spread over as many
    multi = [Record("m", "a mug", (), "mug", "color", ("red", "blue"), label_probs=(("red", 0.9), ("blue", 0.9)))]
    assert value_counts(multi, 0.5)["color"] == pytest.approx({"blue": 1.0, "red": 1.0})


def test_a_run_learns_the_soft_labels_where_they_disagree_with_the_labels(tmp_path, tiny_text_ckpt):
    """Every label says red; the soft labels say blue for the rows mentioning 'sky'. At β = 0.9 those rows are
    answered blue, at β = 0 red."""
    rows = []
    for i in range(16):
        sky = i % 2 == 0
        probs = {"blue": 1.0, "red": 0.0} if sky else {"red": 1.0, "blue": 0.0}
        rows.append(
            Record(
                f"r{i}",
                f"{'sky' if sky else 'fire'} mug {i}",
                (),
                "mug",
                "color",
                ("red",),
                label_probs=tuple(probs.items()),
            )
        )
    rows.append(Record("b", "a plain mug", (), "mug", "color", ("blue",)))  # blue is a class of the run
    answers = {}
    for beta in (0.0, 0.9):
        run = tmp_path / f"beta{beta}"
        cfg = load_config(
            None,
            [
                *tiny_overrides(tiny_text_ckpt),
                *TEA,
                CLASSIFY,
                "train.epochs=6",
                "optim.lr=3e-3",
                f"loss.soft_label_weight={beta}",
            ],
        )
        train(cfg, rows, run, progress=False)
        predictor = Predictor.from_checkpoint(run / "final")
        predictor.model.cfg.decoder.prior_correction = 0.0
        probe = [Record(f"q{i}", f"sky mug {i}", (), "mug", "color", ("red",)) for i in range(0, 16, 2)]
        answers[beta] = [values[0] if values else "" for values in predictor.predict(probe)]
        saved = predictor.pre.value_counts["color"]
        if beta:  # the prior it learned follows the soft targets: blue from the sky rows
            assert saved["blue"] == pytest.approx(1 + 0.9 * 8)
        else:
            assert saved == {"blue": 1, "red": 16}
    assert answers[0.0].count("red") >= 6
    assert answers[0.9].count("blue") >= 6


class _Memorizer(TextExtractor):
    """Answers each row with what it was trained on under that row's text, else 'unseen': shows which rows each
    fold's extractor trained on."""

    kind = "memorizer"

    def __init__(self) -> None:
        super().__init__(TfidfExtractorConfig())
        self.seen: set[str] = set()

    def _fit(self, records, space) -> None:
        self.seen = {r.text for r in records}

    def _probabilities(self, records, vocab):
        import numpy as np

        out = np.zeros((len(records), len(vocab.keys)))
        for i, r in enumerate(records):
            out[i, vocab.keys.index("seen" if r.text in self.seen else "unseen")] = 1.0
        return out

    def save(self, directory):  # pragma: no cover - not saved here
        raise NotImplementedError

    @classmethod
    def load(cls, directory):  # pragma: no cover
        raise NotImplementedError


def test_soft_labels_are_out_of_fold():
    rows = [Record(f"r{i}", f"text {i}", (), "mug", "state", ("seen" if i % 2 else "unseen",)) for i in range(12)]
    folds = [list(range(0, 12, 3)), list(range(1, 12, 3)), list(range(2, 12, 3))]
    out = soft_labelled(_Memorizer, rows, folds)
    assert [dict(r.label_probs)["unseen"] for r in out] == [1.0] * 12  # no row scored by a model that trained on it
    assert [r.label for r in out] == [r.label for r in rows]  # labels kept
    with pytest.raises(ValueError, match="exactly once"):
        soft_labelled(_Memorizer, rows, folds[:2])
    with pytest.raises(ValueError, match="leaving none to fit on"):
        soft_labelled(_Memorizer, rows, [list(range(12)), []])


def test_tfidf_soft_labels_are_distributions_over_the_extractors_values():
    colors = ["red", "blue", "green"]
    rows = [Record(f"r{i}", f"a {colors[i % 3]} mug {i}", (), "mug", "color", (colors[i % 3],)) for i in range(30)]
    folds = [list(range(k, 30, 5)) for k in range(5)]
    out = soft_labelled(lambda: TfidfTextExtractor(TfidfExtractorConfig()), rows, folds)
    for r in out:
        probs = dict(r.label_probs)
        assert set(probs) == set(colors)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert max(probs, key=probs.get) == r.label[0]  # the color word is in the text
