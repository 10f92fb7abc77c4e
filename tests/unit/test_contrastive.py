"""S1 label-smoothed contrastive loss (paper §3.1, Eq. 2–6), checked against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pv2tea.losses.contrastive import label_smoothed_contrastive, pair_targets

# Small 2-D unit vectors (3-4-5 triangles keep every dot product a short decimal).
IMAGE = [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8)]
TEXT = [(0.8, 0.6), (0.6, 0.8), (1.0, 0.0)]
IMAGE_M = [(1.0, 0.0), (0.0, 1.0), (0.8, 0.6)]
TEXT_M = [(0.6, 0.8), (0.0, 1.0), (1.0, 0.0)]

# Dot products worked out by hand from the vectors above.
# i2t logits: online image · momentum text
S_I2T = [[0.6, 0.0, 1.0], [0.8, 1.0, 0.0], [1.0, 0.8, 0.6]]
# i2t pseudo-targets: momentum image · momentum text
Q_I2T = [[0.6, 0.0, 1.0], [0.8, 1.0, 0.0], [0.96, 0.6, 0.8]]
# t2i logits: online text · momentum image
S_T2I = [[0.8, 0.6, 1.0], [0.6, 0.8, 0.96], [1.0, 0.0, 0.8]]
# t2i pseudo-targets: momentum text · momentum image
Q_T2I = [[0.6, 0.8, 0.96], [0.0, 1.0, 0.6], [1.0, 0.0, 0.8]]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def softmax(row: list[float], tau: float) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def soft_ce(logit_rows, momentum_rows, hard_rows, alpha: float, tau: float) -> float:
    """-(1/N) Σ_n Σ_m [(1-α) p_nm + α q_nm] log d_nm, written out with plain floats."""
    total = 0.0
    for s_row, q_row, p_row in zip(logit_rows, momentum_rows, hard_rows):
        d = softmax(s_row, tau)
        q = softmax(q_row, tau)
        for d_m, q_m, p_m in zip(d, q, p_row):
            total -= ((1 - alpha) * p_m + alpha * q_m) * math.log(d_m)
    return total / len(logit_rows)


EYE3 = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_features_are_unit_vectors():
    for vec in IMAGE + TEXT + IMAGE_M + TEXT_M:
        assert math.isclose(vec[0] ** 2 + vec[1] ** 2, 1.0)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_hand_computed_3x3(tau):
    ids = torch.tensor([10, 11, 12])
    out = label_smoothed_contrastive(t(IMAGE), t(TEXT), t(IMAGE_M), t(TEXT_M), ids, alpha=0.4, temperature=tau)
    exp_i2t = soft_ce(S_I2T, Q_I2T, EYE3, 0.4, tau)
    exp_t2i = soft_ce(S_T2I, Q_T2I, EYE3, 0.4, tau)
    assert out["loss_i2t"].item() == pytest.approx(exp_i2t, rel=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(exp_t2i, rel=1e-6)
    assert out["loss_sc"].item() == pytest.approx((exp_i2t + exp_t2i) / 2, rel=1e-6)


def test_hand_computed_single_row_literal():
    # Row 0 of i2t at τ=1, α=0.4, every term written out: targets (0.6 + 0.4 q0, 0.4 q1, 0.4 q2)
    z = math.exp(0.6) + math.exp(0.0) + math.exp(1.0)
    d = [math.exp(0.6) / z, 1 / z, math.exp(1.0) / z]
    q = d  # row 0 of S_I2T and Q_I2T coincide (image 0 equals its momentum copy)
    row0 = -((0.6 + 0.4 * q[0]) * math.log(d[0]) + 0.4 * q[1] * math.log(d[1]) + 0.4 * q[2] * math.log(d[2]))
    # single-sample batch made of row 0 against the full 3-entry bank via a queue of the other two
    out = label_smoothed_contrastive(
        t(IMAGE[:1]),
        t(TEXT[:1]),
        t(IMAGE_M[:1]),
        t(TEXT_M[:1]),
        torch.tensor([10]),
        image_queue=t(IMAGE_M[1:]),
        text_queue=t(TEXT_M[1:]),
        queue_ids=torch.tensor([11, 12]),
        alpha=0.4,
        temperature=1.0,
    )
    assert out["loss_i2t"].item() == pytest.approx(row0, rel=1e-6)
    # and the number itself, worked out on paper: d = (0.32888, 0.18049, 0.49063)
    assert out["loss_i2t"].item() == pytest.approx(1.07688, abs=1e-5)


def test_alpha_zero_is_plain_infonce():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    img_m, txt_m = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    out = label_smoothed_contrastive(img, txt, img_m, txt_m, torch.arange(4), alpha=0.0, temperature=0.07)
    target = torch.arange(4)
    i2t = F.cross_entropy(img @ txt_m.t() / 0.07, target)
    t2i = F.cross_entropy(txt @ img_m.t() / 0.07, target)
    assert out["loss_i2t"].item() == pytest.approx(i2t.item(), rel=1e-5)
    assert out["loss_t2i"].item() == pytest.approx(t2i.item(), rel=1e-5)
    assert out["loss_sc"].item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-5)


def test_alpha_zero_hand_computed():
    # α = 0: targets are one-hot, loss is -mean log d_nn
    out = label_smoothed_contrastive(
        t(IMAGE), t(TEXT), t(IMAGE_M), t(TEXT_M), torch.arange(3), alpha=0.0, temperature=1.0
    )
    i2t = (
        -(math.log(softmax(S_I2T[0], 1)[0]) + math.log(softmax(S_I2T[1], 1)[1]) + math.log(softmax(S_I2T[2], 1)[2])) / 3
    )
    assert out["loss_i2t"].item() == pytest.approx(i2t, rel=1e-6)


def test_alpha_changes_loss():
    base = dict(
        image_feat=t(IMAGE),
        text_feat=t(TEXT),
        image_feat_m=t(IMAGE_M),
        text_feat_m=t(TEXT_M),
        ids=torch.arange(3),
        temperature=1.0,
    )
    a0 = label_smoothed_contrastive(**base, alpha=0.0)["loss_sc"].item()
    a4 = label_smoothed_contrastive(**base, alpha=0.4)["loss_sc"].item()
    a1 = label_smoothed_contrastive(**base, alpha=1.0)["loss_sc"].item()
    assert a0 != pytest.approx(a4) and a4 != pytest.approx(a1)
    # the loss is linear in α: L(0.4) = 0.6 L(0) + 0.4 L(1)
    assert a4 == pytest.approx(0.6 * a0 + 0.4 * a1, rel=1e-6)


QUEUE_IMG = [(0.0, -1.0), (-1.0, 0.0), (0.6, -0.8), (-0.8, 0.6)]
QUEUE_TXT = [(-0.6, 0.8), (0.8, -0.6), (0.0, -1.0), (-1.0, 0.0)]


def test_queue_extends_bank_hand_computed():
    tau = 1.0
    ids = torch.tensor([10, 11, 12])
    qids = torch.tensor([20, 21, 22, 23])
    out = label_smoothed_contrastive(
        t(IMAGE),
        t(TEXT),
        t(IMAGE_M),
        t(TEXT_M),
        ids,
        image_queue=t(QUEUE_IMG),
        text_queue=t(QUEUE_TXT),
        queue_ids=qids,
        alpha=0.4,
        temperature=tau,
    )
    # extra columns: image rows · queue text, worked out by hand
    # queue text: (-0.6,0.8) (0.8,-0.6) (0,-1) (-1,0)
    s_i2t = [
        S_I2T[0] + [-0.6, 0.8, 0.0, -1.0],  # image (1,0)
        S_I2T[1] + [0.8, -0.6, -1.0, 0.0],  # image (0,1)
        S_I2T[2] + [0.28, 0.0, -0.8, -0.6],
    ]  # image (0.6,0.8)
    q_i2t = [
        Q_I2T[0] + [-0.6, 0.8, 0.0, -1.0],  # image_m (1,0)
        Q_I2T[1] + [0.8, -0.6, -1.0, 0.0],  # image_m (0,1)
        Q_I2T[2] + [0.0, 0.28, -0.6, -0.8],
    ]  # image_m (0.8,0.6)
    # queue images: (0,-1) (-1,0) (0.6,-0.8) (-0.8,0.6)
    s_t2i = [
        S_T2I[0] + [-0.6, -0.8, 0.0, -0.28],  # text (0.8,0.6)
        S_T2I[1] + [-0.8, -0.6, -0.28, 0.0],  # text (0.6,0.8)
        S_T2I[2] + [0.0, -1.0, 0.6, -0.8],
    ]  # text (1,0)
    q_t2i = [
        Q_T2I[0] + [-0.8, -0.6, -0.28, 0.0],  # text_m (0.6,0.8)
        Q_T2I[1] + [-1.0, 0.0, -0.8, 0.6],  # text_m (0,1)
        Q_T2I[2] + [0.0, -1.0, 0.6, -0.8],
    ]  # text_m (1,0)
    hard = [row + [0, 0, 0, 0] for row in EYE3]
    exp_i2t = soft_ce(s_i2t, q_i2t, hard, 0.4, tau)
    exp_t2i = soft_ce(s_t2i, q_t2i, hard, 0.4, tau)
    assert out["loss_i2t"].item() == pytest.approx(exp_i2t, rel=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(exp_t2i, rel=1e-6)
    no_queue = label_smoothed_contrastive(t(IMAGE), t(TEXT), t(IMAGE_M), t(TEXT_M), ids, alpha=0.4, temperature=tau)
    assert out["loss_sc"].item() != pytest.approx(no_queue["loss_sc"].item(), rel=1e-6)


def test_queue_entry_with_batch_pair_id_is_positive():
    # a queue entry of the same product (pair id 10) is a positive for row 0 at α = 0
    ids = torch.tensor([10, 11, 12])
    qids = torch.tensor([10, 21, 22, 23])
    out = label_smoothed_contrastive(
        t(IMAGE),
        t(TEXT),
        t(IMAGE_M),
        t(TEXT_M),
        ids,
        image_queue=t(QUEUE_IMG),
        text_queue=t(QUEUE_TXT),
        queue_ids=qids,
        alpha=0.0,
        temperature=1.0,
    )
    s_i2t = [S_I2T[0] + [-0.6, 0.8, 0.0, -1.0], S_I2T[1] + [0.8, -0.6, -1.0, 0.0], S_I2T[2] + [0.28, 0.0, -0.8, -0.6]]
    d = [softmax(r, 1.0) for r in s_i2t]
    expected = -(0.5 * math.log(d[0][0]) + 0.5 * math.log(d[0][3]) + math.log(d[1][1]) + math.log(d[2][2])) / 3
    assert out["loss_i2t"].item() == pytest.approx(expected, rel=1e-6)


def test_pair_targets_duplicates_split_mass():
    p = pair_targets(torch.tensor([7, 7, 3]), torch.tensor([7, 7, 3]))
    assert torch.equal(p, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    p = pair_targets(torch.tensor([1, 2]), torch.tensor([1, 2, 1, 5, 1]))
    third = 1 / 3
    assert torch.allclose(p, torch.tensor([[third, 0, third, 0, third], [0, 1.0, 0, 0, 0]]))


def test_duplicate_ids_in_batch_both_positive():
    # rows 0 and 1 are the same product: at α = 0 each has targets 0.5 / 0.5 on columns 0 and 1
    ids = torch.tensor([5, 5, 9])
    out = label_smoothed_contrastive(t(IMAGE), t(TEXT), t(IMAGE_M), t(TEXT_M), ids, alpha=0.0, temperature=1.0)
    d = [softmax(r, 1.0) for r in S_I2T]
    expected = (
        -(
            0.5 * math.log(d[0][0])
            + 0.5 * math.log(d[0][1])
            + 0.5 * math.log(d[1][0])
            + 0.5 * math.log(d[1][1])
            + math.log(d[2][2])
        )
        / 3
    )
    assert out["loss_i2t"].item() == pytest.approx(expected, rel=1e-6)
    distinct = label_smoothed_contrastive(
        t(IMAGE), t(TEXT), t(IMAGE_M), t(TEXT_M), torch.arange(3), alpha=0.0, temperature=1.0
    )
    assert distinct["loss_i2t"].item() != pytest.approx(expected, rel=1e-6)


def test_gradient_matches_hand_formula_and_reaches_online_features():
    # dL_i2t/dS_nm = (d_nm - p~_nm)/N; dS_nm/dimage_n = text_m[m]/τ; L_sc halves it
    image = t(IMAGE).requires_grad_(True)
    text = t(TEXT).requires_grad_(True)
    out = label_smoothed_contrastive(image, text, t(IMAGE_M), t(TEXT_M), torch.arange(3), alpha=0.4, temperature=1.0)
    out["loss_sc"].backward()
    for n in range(3):
        d = softmax(S_I2T[n], 1.0)
        q = softmax(Q_I2T[n], 1.0)
        coef = [(d[m] - (0.6 * EYE3[n][m] + 0.4 * q[m])) / 3 / 2 for m in range(3)]
        gx = sum(coef[m] * TEXT_M[m][0] for m in range(3))
        gy = sum(coef[m] * TEXT_M[m][1] for m in range(3))
        assert image.grad[n].tolist() == pytest.approx([gx, gy], rel=1e-6, abs=1e-12)
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_gradient_reaches_online_features_only():
    # momentum features as the model makes them (under no_grad): only online features get gradients
    image = t(IMAGE).requires_grad_(True)
    text = t(TEXT).requires_grad_(True)
    image_m, text_m = t(IMAGE_M), t(TEXT_M)
    out = label_smoothed_contrastive(image, text, image_m, text_m, torch.arange(3))
    out["loss_sc"].backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert image_m.grad is None and text_m.grad is None


def test_momentum_inputs_never_receive_gradient():
    image = t(IMAGE).requires_grad_(True)
    text = t(TEXT).requires_grad_(True)
    image_m = t(IMAGE_M).requires_grad_(True)
    text_m = t(TEXT_M).requires_grad_(True)
    out = label_smoothed_contrastive(image, text, image_m, text_m, torch.arange(3))
    out["loss_sc"].backward()
    assert image_m.grad is None and text_m.grad is None


def test_batch_of_one_without_queue_is_zero():
    # a bank of one entry: softmax is 1, target is 1 -> loss exactly 0
    out = label_smoothed_contrastive(t(IMAGE[:1]), t(TEXT[:1]), t(IMAGE_M[:1]), t(TEXT_M[:1]), torch.tensor([0]))
    assert out["loss_sc"].item() == 0.0


def test_batch_of_one_with_queue():
    ids = torch.tensor([10])
    out = label_smoothed_contrastive(
        t(IMAGE[:1]),
        t(TEXT[:1]),
        t(IMAGE_M[:1]),
        t(TEXT_M[:1]),
        ids,
        image_queue=t(QUEUE_IMG),
        text_queue=t(QUEUE_TXT),
        queue_ids=torch.tensor([20, 21, 22, 23]),
        alpha=0.0,
        temperature=1.0,
    )
    # image (1,0) against momentum texts (0.6,0.8) + queue: logits [0.6, -0.6, 0.8, 0, -1]
    d = softmax([0.6, -0.6, 0.8, 0.0, -1.0], 1.0)
    assert out["loss_i2t"].item() == pytest.approx(-math.log(d[0]), rel=1e-6)


def test_batch_of_five():
    torch.manual_seed(1)
    feats = [F.normalize(torch.randn(5, 6), dim=1) for _ in range(4)]
    out = label_smoothed_contrastive(*feats, torch.arange(5), alpha=0.4, temperature=0.07)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    assert out["loss_sc"].item() > 0
    with_queue = label_smoothed_contrastive(
        *feats,
        torch.arange(5),
        image_queue=feats[2][:3],
        text_queue=feats[3][:3],
        queue_ids=torch.tensor([100, 101, 102]),
    )
    assert torch.isfinite(with_queue["loss_sc"])
