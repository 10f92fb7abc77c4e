"""A warm start with a classification head (``decoder.head = classify``): its head carried into the run class by
class, and class-level distillation of it (``loss.distill_weight``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from pv2tea.config import load_config
from pv2tea.data.dataset import (
    RecordDataset,
    distilled_value_counts,
    make_collate,
    value_counts,
    value_vocabulary,
)
from pv2tea.data.schema import Record
from pv2tea.experiment import TEA
from pv2tea.losses.generation import distill_class_targets, per_sample_class_kl, soft_target_ce
from pv2tea.models.build import build_for_training, load_from_checkpoint
from pv2tea.models.checkpoint import class_map, load_warm_start_head, warm_start_has_head
from pv2tea.train.distill import TeacherError, WarmStartTeacher
from pv2tea.train.loop import build_optimizer, train

CLASSIFY = "decoder.head=classify"


@pytest.fixture(scope="module")
def tea_cls(tmp_path_factory, tiny_text_ckpt):
    """A tiny classifying TEA on text-only rows (colors red/blue, materials wood/steel): its final/ folder."""
    rows = [
        Record(f"t{i}", f"a {c} mug number {i}", (), "mug", "color", (c,)) for i, c in enumerate(["red", "blue"] * 6)
    ] + [Record(f"m{i}", f"a {m} mug {i}", (), "mug", "material", (m,)) for i, m in enumerate(["wood", "steel"] * 3)]
    run = tmp_path_factory.mktemp("tea_cls")
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), *TEA, CLASSIFY, "train.epochs=3", "optim.lr=3e-3"])
    train(cfg, rows, run, progress=False)
    return run / "final"


def _products(folder) -> list[Record]:
    """Image rows whose labels (green/black and red) are a vocabulary other than the warm start's (red/blue)."""
    from PIL import Image

    out = []
    for i, c in enumerate(["green", "black", "red"] * 3):
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), c).save(path)
        out.append(Record(f"p{i}", f"a {'red' if i % 2 else 'blue'} mug {i}", (str(path),), "mug", "color", (c,)))
    return out


# ----- pure functions


def test_class_map_matches_attribute_value_pairs_and_marks_the_missing():
    ours = [("color", "black"), ("color", "red"), ("size", "red")]
    theirs = [("color", "blue"), ("color", "red"), ("size", "xl")]
    assert class_map(ours, theirs).tolist() == [-1, 1, -1]  # the same value under another attribute is not a match


def test_distill_class_targets_mix_label_and_teacher_and_keep_uncovered_rows():
    label = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 0.0]]).log()  # row 1: the teacher knows none of its classes
    mixed, covered = distill_class_targets(label, teacher, 0.25)
    torch.testing.assert_close(mixed[0], torch.tensor([0.75 + 0.05, 0.2, 0.0]))
    torch.testing.assert_close(mixed[1], label[1])
    assert covered.tolist() == [True, False]
    assert torch.allclose(mixed.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="do not match"):
        distill_class_targets(label, teacher[:, :2], 0.5)


def test_class_kl_and_soft_target_ce_decompose_as_distillation():
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    logits[:, 4] = torch.finfo(logits.dtype).min  # a class of another attribute, masked
    log_probs = F.log_softmax(logits, -1)
    teacher = F.log_softmax(torch.randn(3, 5), -1)
    teacher[:, 4] = float("-inf")
    teacher = teacher.log_softmax(-1)
    label = F.one_hot(torch.tensor([0, 2, 3]), 5).float()
    w = 0.4
    mixed, _ = distill_class_targets(label, teacher, w)
    # CE(mixture) = (1 - w) CE(label) + w (KL(teacher || model) + H(teacher))
    entropy = -(teacher.exp() * teacher.clamp_min(-1e4)).sum(1)
    expected = (1 - w) * soft_target_ce(log_probs, label) + w * (per_sample_class_kl(log_probs, teacher) + entropy)
    torch.testing.assert_close(soft_target_ce(log_probs, mixed), expected)
    assert torch.isfinite(soft_target_ce(log_probs, mixed)).all()
    assert torch.allclose(per_sample_class_kl(teacher, teacher), torch.zeros(3), atol=1e-6)
    nowhere = torch.full((1, 5), float("-inf"))
    assert per_sample_class_kl(log_probs[:1], nowhere).item() == 0.0


def test_a_distilled_runs_prior_mixes_its_labels_with_the_teachers():
    own = {"color": {"red": 6, "black": 2}, "size": {"xl": 3}}
    teacher = {"color": {"red": 1, "blue": 3}, "material": {"wood": 5}}
    got = distilled_value_counts(own, teacher, 0.5)
    # the shares (red 6/8, black 2/8) and (red 1/4, blue 3/4) mixed half and half, over (8 + 4) / 2 = 6 rows
    assert got["color"] == pytest.approx({"black": 0.75, "blue": 2.25, "red": 3.0})
    assert got["size"] == {"xl": 3.0}  # the teacher knows nothing of sizes: the run's own
    assert "material" not in got  # only the run's attributes
    assert distilled_value_counts(own, teacher, 0.0)["color"] == {"black": 2.0, "blue": 0.0, "red": 6.0}
    assert distilled_value_counts(own, teacher, 1.0)["color"] == {"black": 0.0, "blue": 3.0, "red": 1.0}


# ----- the head carried into the run


def test_the_warm_starts_head_rows_are_copied_by_attribute_and_value(tea_cls, tiny_text_ckpt, tmp_path):
    assert warm_start_has_head(tea_cls)
    rows = _products(tmp_path)
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY])
    model, pre = build_for_training(cfg, ["mug"], value_vocabulary(rows), None, value_counts(rows))
    teacher, teacher_pre = load_from_checkpoint(tea_cls)
    assert model.value_head is not None and teacher.value_head is not None
    fresh = model.value_head.weight.detach().clone()
    assert load_warm_start_head(model, pre.value_classes, tea_cls) == 1  # of black/green/red only red is known
    red, theirs = pre.value_index[("color", "red")], teacher_pre.value_index[("color", "red")]
    torch.testing.assert_close(model.value_head.weight[red], teacher.value_head.weight[theirs])
    torch.testing.assert_close(model.value_head.bias[red], teacher.value_head.bias[theirs])
    for other in (pre.value_index[("color", "black")], pre.value_index[("color", "green")]):
        torch.testing.assert_close(model.value_head.weight[other], fresh[other])


def test_a_generating_warm_start_leaves_a_classifying_head_alone(tea_final, tiny_text_ckpt, tmp_path):
    assert not warm_start_has_head(tea_final)
    rows = _products(tmp_path)
    model, pre = build_for_training(
        load_config(None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY]), ["mug"], value_vocabulary(rows)
    )
    assert load_warm_start_head(model, pre.value_classes, tea_final) == 0


def test_a_warm_started_head_trains_at_the_warm_started_rate(tea_cls, tiny_text_ckpt, tmp_path):
    rows = _products(tmp_path)
    cfg = load_config(
        None,
        [*tiny_overrides(tiny_text_ckpt), CLASSIFY, f"train.warm_start={tea_cls}", "optim.head_lr=1e-2"],
    )
    model, _ = build_for_training(cfg, ["mug"], value_vocabulary(rows))
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    head = {id(p) for p in (model.value_head.weight, model.value_head.bias)}
    rates = {g["lr"] for g in optimizer.param_groups if any(id(p) in head for p in g["params"])}
    assert rates == {cfg.optim.lr}
    # without a warm start the fresh head is a new part, at head_lr
    cold = load_config(None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY, "optim.head_lr=1e-2"])
    model, _ = build_for_training(cold, ["mug"], value_vocabulary(rows))
    optimizer, _ = build_optimizer(model, cold, total_steps=10)
    head = {id(p) for p in (model.value_head.weight, model.value_head.bias)}
    assert {g["lr"] for g in optimizer.param_groups if any(id(p) in head for p in g["params"])} == {1e-2}


def test_a_classify_run_logs_the_head_it_took_over(tea_cls, tiny_text_ckpt, tmp_path):
    rows = _products(tmp_path)
    cfg = load_config(
        None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY, f"train.warm_start={tea_cls}", "train.epochs=1"]
    )
    train(cfg, rows, tmp_path / "run", progress=False)
    assert "classification head's rows of 1 of 3 value classes" in (tmp_path / "run" / "train.log").read_text()


# ----- class-level distillation


def _kl_to_teacher(final, teacher_dir, rows) -> float:
    model, pre = load_from_checkpoint(final)
    model.eval()
    batch = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    teacher = WarmStartTeacher(teacher_dir, model, pre=pre)
    with torch.no_grad():
        mine = model.value_logits(batch).float().log_softmax(-1)
        return float(per_sample_class_kl(mine, teacher.logits(batch)).mean())


def test_the_teacher_scores_the_students_classes_by_name(tea_cls, tiny_text_ckpt, tmp_path):
    rows = _products(tmp_path)
    model, pre = build_for_training(
        load_config(None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY]), ["mug"], value_vocabulary(rows)
    )
    batch = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    got = WarmStartTeacher(tea_cls, model, pre=pre).logits(batch)  # (B, 3): black, green, red
    assert got.shape == (len(rows), len(pre.value_classes))
    red = pre.value_index[("color", "red")]
    # the teacher knows only red among the student's colors: all its mass, renormalized, goes there
    assert torch.allclose(got[:, red], torch.zeros(len(rows)), atol=1e-5)
    assert torch.isinf(got[:, [i for i in range(3) if i != red]]).all()


def test_classify_distillation_keeps_the_run_nearer_the_warm_start(tea_cls, tiny_text_ckpt, tmp_path):
    rows = _products(tmp_path)
    base = [*tiny_overrides(tiny_text_ckpt), CLASSIFY, f"train.warm_start={tea_cls}", "train.epochs=4"]
    kl = {}
    for weight in (0, 1):
        run = tmp_path / f"run{weight}"
        train(load_config(None, [*base, f"loss.distill_weight={weight}"]), rows, run, progress=False)
        kl[weight] = _kl_to_teacher(run / "final", tea_cls, rows)
    log = (tmp_path / "run1" / "train.log").read_text()
    assert "distilling the warm start" in log and "loss_kd" in log
    assert kl[1] < 0.5 * kl[0], kl
    # the label prior saved for ranking is the one the run learned: at weight 1 its teacher's (red 6, blue 6)
    _, own = load_from_checkpoint(tmp_path / "run0" / "final")
    _, distilled = load_from_checkpoint(tmp_path / "run1" / "final")
    assert own.value_counts["color"] == {"black": 3, "green": 3, "red": 3}
    assert distilled.value_counts["color"] == {"black": 0.0, "blue": 6.0, "green": 0.0, "red": 6.0}


def test_a_teacher_with_the_other_head_is_refused(tea_cls, tea_final, tiny_text_ckpt, tmp_path):
    rows = _products(tmp_path)
    model, pre = build_for_training(
        load_config(None, [*tiny_overrides(tiny_text_ckpt), CLASSIFY]), ["mug"], value_vocabulary(rows)
    )
    with pytest.raises(TeacherError, match="decoder.head"):
        WarmStartTeacher(tea_final, model, pre=pre)
    generating, _ = load_from_checkpoint(tea_final)
    with pytest.raises(TeacherError, match="decoder.head"):
        WarmStartTeacher(tea_cls, generating)
    with pytest.raises(TeacherError, match="preprocessor"):
        WarmStartTeacher(tea_cls, model)
