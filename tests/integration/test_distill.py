"""loss.distill_weight: the warm start as a frozen teacher of the run it starts (word-level distillation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from pv2tea.config import ConfigError, load_config
from pv2tea.data.dataset import RecordDataset, make_collate
from pv2tea.data.schema import Record
from pv2tea.losses.generation import per_sample_token_kl
from pv2tea.models.build import load_from_checkpoint
from pv2tea.train.distill import TeacherError, WarmStartTeacher
from pv2tea.train.loop import TrainingError, train


def test_token_kl_is_the_mean_kl_over_the_label_positions_only():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    # position t predicts label t + 1 (label 0 is the start token): row 0 predicts 2 tokens, row 1 one
    labels = torch.tensor([[1, 2, 3, -100], [1, 5, -100, -100]])
    got = per_sample_token_kl(logits, teacher, labels)
    p, q = F.log_softmax(logits, -1), F.log_softmax(teacher, -1)
    kl = (q.exp() * (q - p)).sum(-1)  # (B, T): KL(teacher ‖ model) at each position
    torch.testing.assert_close(got, torch.stack([kl[0, :2].mean(), kl[1, :1].mean()]))
    # what the model says where no label token is predicted does not count
    moved = logits.clone()
    moved[0, 2:], moved[1, 1:] = 50.0, -50.0
    torch.testing.assert_close(per_sample_token_kl(moved, teacher, labels), got)
    assert torch.allclose(per_sample_token_kl(teacher, teacher, labels), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        per_sample_token_kl(logits, teacher[:, :3], labels)


def test_a_distill_weight_outside_0_1_is_refused(tiny_text_ckpt):
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="loss.distill_weight"):
            load_config(None, [*tiny_overrides(tiny_text_ckpt), f"loss.distill_weight={bad}"])


def _products(folder) -> list[Record]:
    from PIL import Image

    out = []
    for i, c in enumerate(["green", "black"] * 4):  # other labels than the warm start answers
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), c).save(path)
        out.append(Record(f"p{i}", f"a {'red' if i % 2 else 'blue'} mug {i}", (str(path),), "mug", "color", (c,)))
    return out


def _kl_to_teacher(final, teacher_dir, rows) -> float:
    """Mean KL(warm start ‖ trained model) over the answer tokens of ``rows``."""
    model, pre = load_from_checkpoint(final)
    model.eval()
    batch = make_collate(pre, RecordDataset(rows), with_answers=True)(list(range(len(rows))))
    teacher = WarmStartTeacher(teacher_dir, model)
    labels = batch.answer_ids.masked_fill(batch.answer_mask == 0, -100)
    with torch.no_grad():
        return float(per_sample_token_kl(model.answer_logits(batch), teacher.logits(batch), labels).mean())


def test_distillation_keeps_the_run_nearer_the_warm_starts_answers(tea_final, tiny_text_ckpt, tmp_path):
    products = _products(tmp_path)
    base = [*tiny_overrides(tiny_text_ckpt), f"train.warm_start={tea_final}", "train.epochs=4", "optim.lr=1e-3"]
    kl = {}
    for weight in (0, 1):
        run = tmp_path / f"run{weight}"
        train(load_config(None, [*base, f"loss.distill_weight={weight}"]), products, run, progress=False)
        kl[weight] = _kl_to_teacher(run / "final", tea_final, products)
    log = (tmp_path / "run1" / "train.log").read_text()
    assert "distilling the warm start" in log and "loss_kd" in log
    # trained on the teacher alone, the model ends far closer to its distribution than trained on the labels alone
    assert kl[1] < 0.5 * kl[0], kl


def test_distillation_without_a_warm_start_or_with_another_vocabulary_is_refused(tea_final, tiny_text_ckpt, tmp_path):
    products = _products(tmp_path)
    cfg = load_config(None, [*tiny_overrides(tiny_text_ckpt), "loss.distill_weight=0.5", "train.epochs=1"])
    with pytest.raises(TrainingError, match="set train.warm_start"):
        train(cfg, products, tmp_path / "run", progress=False)
    model, _ = load_from_checkpoint(tea_final)
    model.decoder.resize_token_embeddings(model.decoder.config.vocab_size + 8)
    with pytest.raises(TeacherError, match="tokens"):
        WarmStartTeacher(tea_final, model)
    with pytest.raises(TeacherError, match="cannot load"):
        WarmStartTeacher(tmp_path / "nowhere", model)
