"""Loss terms and S2's pruning pinned by value (issue 24): hand-computed numbers and independent loops, not shapes."""

from __future__ import annotations

import math

import pytest
import torch

from pv2tea.config import VisionConfig
from pv2tea.losses.generation import category_loss, per_sample_token_ce, weighted_generation_loss
from pv2tea.models.vision import VisualEncoder


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_z for x in row]


def _reference_token_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> list[float]:
    """Per sequence: the mean over the non-ignored next tokens of −log p(token | prefix), in plain Python.

    Position t's logits predict label t + 1 (the shift); label −100 is padding; smoothing mixes the one-hot target
    with the uniform distribution over the vocabulary."""
    out = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist()):
        terms = []
        for t in range(len(row_labels) - 1):
            target = row_labels[t + 1]
            if target == -100:
                continue
            lp = _log_softmax(row_logits[t])
            terms.append((1 - smoothing) * -lp[target] + smoothing * -sum(lp) / len(lp))
        out.append(sum(terms) / max(len(terms), 1))
    return out


def _ce_case() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 6, generator=g) * 2  # (B, T, V)
    labels = torch.tensor(
        [
            [1, 4, 2, 5, 3],  # full length: 4 targets
            [1, 3, 0, -100, -100],  # 2 targets then padding
            [1, 2, -100, -100, -100],
        ]
    )  # 1 target
    return logits, labels


def test_per_sample_token_ce_equals_an_independent_loop():
    logits, labels = _ce_case()
    got = per_sample_token_ce(logits, labels)
    assert got.tolist() == pytest.approx(_reference_token_ce(logits, labels), rel=1e-5)
    # one hand-checked entry: row 2 has a single target, label 2 predicted from position 0
    assert got[2].item() == pytest.approx(-_log_softmax(logits[2, 0].tolist())[2], rel=1e-6)


def test_per_sample_token_ce_ignores_what_follows_the_padding():
    logits, labels = _ce_case()
    changed = logits.clone()
    changed[1, 3:] = 100.0  # logits at and after the last real target's successor: never scored
    changed[2, 2:] += torch.randn(3, 6)
    assert torch.allclose(per_sample_token_ce(changed, labels)[1:], per_sample_token_ce(logits, labels)[1:])
    # the first position's label is never a target (it is the [CLS] the decoder starts from)
    relabelled = labels.clone()
    relabelled[:, 0] = 5
    assert torch.equal(per_sample_token_ce(logits, relabelled), per_sample_token_ce(logits, labels))


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_equals_an_independent_loop(smoothing):
    logits, labels = _ce_case()
    got = per_sample_token_ce(logits, labels, label_smoothing=smoothing)
    assert got.tolist() == pytest.approx(_reference_token_ce(logits, labels, smoothing), rel=1e-5)
    assert not torch.allclose(got, per_sample_token_ce(logits, labels))


def test_weighted_generation_loss_by_value():
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert weighted_generation_loss(per_sample, None).item() == pytest.approx(3.75)
    # (1/N) Σ s_n g_n = (0.5·1 + 0·2 + 2·4 + 1·8) / 4
    assert weighted_generation_loss(per_sample, torch.tensor([0.5, 0.0, 2.0, 1.0])).item() == pytest.approx(4.125)


def test_category_loss_by_value():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    row0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    row1 = -math.log(1 / (math.e + 2))
    assert category_loss(logits, targets).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    empty = category_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


class _Channel0(torch.nn.Module):
    """A mask head whose logit M is the token's channel 0 (a known mask for a hand-made grid)."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return patches[..., :1]  # (B, P, 1)


def test_s2_gating_and_masked_pooling_by_value():
    """v_pt = v ⊙ σ(M) and the image [CLS] = Σ v_p σ(M_p) / Σ σ(M_p) on a 2x2 grid with σ(M) = .5, .75, .25, .9."""
    encoder = VisualEncoder(
        VisionConfig(name="test_efficientnet", weights="none"), hidden_size=8, attention_pruning=True
    )
    encoder.proj = torch.nn.Identity()  # tokens enter S2 as written below
    encoder.mask_head = _Channel0()
    logits = [0.0, math.log(3), -math.log(3), math.log(9)]  # σ: 1/2, 3/4, 1/4, 9/10
    tokens = torch.tensor(
        [[[logits[0], 2.0, 1.0], [logits[1], 4.0, 0.0], [logits[2], 8.0, 0.0], [logits[3], 10.0, -1.0]]]
    )  # (1, 4 patches, 3 channels)
    out = encoder.head(tokens)
    gates = [0.5, 0.75, 0.25, 0.9]
    assert out.grid == (2, 2)
    assert out.mask_logits[0].tolist() == pytest.approx(logits)
    assert out.tokens.shape == (1, 5, 3)
    expected_patches = [[v * g for v in tok] for tok, g in zip(tokens[0].tolist(), gates)]
    assert out.tokens[0, 1:].flatten().tolist() == pytest.approx(sum(expected_patches, []), rel=1e-6)
    # channel 1: (2·.5 + 4·.75 + 8·.25 + 10·.9) / (.5 + .75 + .25 + .9) = 15 / 2.4
    assert out.pooled[0, 1].item() == pytest.approx(6.25, rel=1e-6)
    assert out.pooled[0, 2].item() == pytest.approx((0.5 - 0.9) / 2.4, rel=1e-6)
    assert out.pooled[0, 0].item() == pytest.approx(sum(m * g for m, g in zip(logits, gates)) / 2.4, rel=1e-6)
    assert torch.equal(out.tokens[:, 0], out.pooled)  # [CLS-I] leads the tokens


def test_s2_pruning_applies_to_the_projected_tokens():
    """With the real projection and mask head: gate and pooling computed independently from proj and mask_head."""
    torch.manual_seed(0)
    encoder = VisualEncoder(
        VisionConfig(name="test_efficientnet", weights="none"), hidden_size=8, attention_pruning=True
    )
    raw = torch.randn(2, 9, encoder.num_features)  # (B, 3x3 grid, C)
    with torch.no_grad():
        out = encoder.head(raw)
        v = encoder.proj(raw)  # (B, P, D)
        gate = torch.sigmoid(v @ encoder.mask_head.weight[0] + encoder.mask_head.bias[0])  # (B, P)
    assert torch.allclose(out.mask_logits, torch.logit(gate), atol=1e-4)
    assert torch.allclose(out.tokens[:, 1:], v * gate[..., None], atol=1e-6)
    assert torch.allclose(out.pooled, (v * gate[..., None]).sum(1) / gate.sum(1, keepdim=True), atol=1e-6)
    assert not torch.allclose(out.pooled, v.mean(1), atol=1e-3)  # not the unmasked mean
