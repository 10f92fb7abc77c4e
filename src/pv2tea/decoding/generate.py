"""Decoding: the values a PV2TEA extracts, by open generation or by ranking a row's candidate list.

Used by training (validation predictions, S3's pseudo-labels) and by inference (:class:`pv2tea.inference.predictor.
Predictor`). Candidates are ranked by the model's sequence likelihood (or class probability), optionally corrected
by the training label prior (``decoder.prior_correction``) and fused with a text extractor's probabilities
(:mod:`pv2tea.decoding.fusion`, :mod:`pv2tea.decoding.calibration`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pv2tea.data.dataset import Preprocessor, RecordDataset, candidate_lookup, make_collate
from pv2tea.data.schema import Record
from pv2tea.decoding import fusion
from pv2tea.decoding.calibration import Calibration, ScoredRow, calibrated_answer
from pv2tea.eval.normalize import drop_attribute_name, normalize_value
from pv2tea.models.pv2tea import PV2TEA, Batch

Prior = Mapping[str, float]  # an extractor's class probabilities of one row, keyed by normalized value
_log = logging.getLogger("pv2tea.predict")


def label_log_prior(pre: Preprocessor, attribute: str, candidates: Sequence[str]) -> np.ndarray:
    """log π(c) over a row's candidates: the share of the model's training rows labelled c, add-one smoothed and
    renormalized over the candidates (uniform for an attribute the model has no counts of)."""
    counts = pre.value_counts.get(attribute, {})
    smoothed = np.array([counts.get(normalize_value(c), 0) + 1.0 for c in candidates])  # (C,)
    return np.log(smoothed / smoothed.sum())


def prior_correction(model: PV2TEA, pre: Preprocessor) -> float:
    """τ of ``decoder.prior_correction``; 0 (with a warning) for a model saved without its training label counts."""
    tau = float(getattr(model.cfg.decoder, "prior_correction", 0.0))
    if tau and not pre.value_counts:
        if not getattr(pre, "_warned_no_counts", False):
            _log.warning(
                "decoder.prior_correction=%g, but this model was saved without its training label counts "
                "(trained by an older pv2tea): candidates are ranked by likelihood alone",
                tau,
            )
            pre._warned_no_counts = True  # type: ignore[attr-defined]
        return 0.0
    return tau


def _rank_candidates(
    model: PV2TEA,
    pre: Preprocessor,
    batch,
    records: Sequence[Record],
    candidates: Mapping,
    priors: Sequence[Prior | None] | None = None,
    prior_weight: float = 1.0,
) -> list[list[str] | None]:
    """Per row: the candidate with the highest sequence likelihood (None: no candidate list).

    With ``priors`` (one per record) each candidate's score is fused with the extractor's probability
    (:mod:`pv2tea.decoding.fusion`).
    """
    lists = [candidate_lookup(candidates, r) for r in records]
    priors = priors if priors is not None else [None] * len(records)
    if model.decoder is None:  # classification head: restrict the classes
        tau = prior_correction(model, pre)
        allowed = torch.zeros(len(records), len(pre.value_classes), dtype=torch.bool)
        bias = torch.zeros(len(records), len(pre.value_classes))
        for i, (r, cands) in enumerate(zip(records, lists)):
            known = [(c, pre.value_index.get((r.attribute, normalize_value(c)))) for c in cands or []]
            known = [(c, j) for c, j in known if j is not None]
            for _, j in known:
                allowed[i, j] = True
            prior = priors[i]
            if known and (prior is not None or tau):
                names = [c for c, _ in known]
                shift = np.zeros(len(known))
                if prior is not None:
                    shift += prior_weight * fusion.prior_log_probs(names, prior)
                if tau:
                    shift -= tau * label_log_prior(pre, r.attribute, names)
                bias[i, [j for _, j in known]] = torch.tensor(shift, dtype=bias.dtype)
        has_any = allowed.any(1)
        allowed[~has_any] = True
        device = batch.text_ids.device
        use_bias = any(p is not None for p in priors) or tau
        picks = model.classify(batch, allowed.to(device), bias.to(device) if use_bias else None)
        return [[pre.value_classes[j][1] for j in p] if lists[i] is not None else None for i, p in enumerate(picks)]
    tau = prior_correction(model, pre)
    out: list[list[str] | None] = []
    for r, cands, scores, prior in zip(records, lists, _decoder_candidate_scores(model, pre, batch, lists), priors):
        if scores is None or cands is None:
            out.append(None)
            continue
        if tau:
            scores = scores - tau * label_log_prior(pre, r.attribute, cands)
        if prior is not None:
            scores = fusion.fuse_scores(scores, fusion.prior_log_probs(cands, prior), prior_weight)
        out.append([cands[int(np.argmax(scores))]])
    return out


def _decoder_candidate_scores(
    model: PV2TEA, pre: Preprocessor, batch, lists: Sequence[list[str] | None]
) -> list[np.ndarray | None]:
    """Per row: the decoder's sequence log-likelihood of each of its candidates (None: no candidate list)."""
    rows = [i for i, c in enumerate(lists) for _ in (c or [])]
    texts = [c for cands in lists for c in (cands or [])]
    if not texts:
        return [None] * len(lists)
    enc = pre.tokenizer(
        texts, padding=True, truncation=True, max_length=pre.cfg.decoder.max_answer_tokens, return_tensors="pt"
    )
    device = batch.text_ids.device
    scores = (
        model.score_candidates(
            batch, torch.tensor(rows, device=device), enc["input_ids"].to(device), enc["attention_mask"].to(device)
        )
        .float()
        .cpu()
        .numpy()
    )
    out: list[np.ndarray | None] = []
    start = 0
    for cands in lists:
        if not cands:
            out.append(None)
            continue
        out.append(scores[start : start + len(cands)].astype(np.float64))  # (C,)
        start += len(cands)
    return out


def on_model_device(batch: Batch, model: PV2TEA) -> Batch:
    """``batch`` on the device of the model's parameters (collation builds it on the CPU)."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type == "cpu":
        return batch
    return batch.to(parameter.device)


UNKNOWN_CLASS_LOGIT = -1e4  # a candidate the classification head has no class for (never preferred to a known one)


@torch.no_grad()
def candidate_log_probs(
    model: PV2TEA, pre: Preprocessor, batch, records: Sequence[Record], candidates: Mapping
) -> list[tuple[list[str], np.ndarray] | None]:
    """Per row: its candidate list and the model's log-probabilities over it, renormalized over the list (None: the
    row has no candidate list). The generative decoder scores each candidate's sequence likelihood; the
    classification head its class probability (a candidate it has no class for gets a negligible one)."""
    lists = [candidate_lookup(candidates, r) for r in records]
    if model.decoder is not None:
        raw = _decoder_candidate_scores(model, pre, batch, lists)
    else:
        log_probs = torch.log_softmax(model._value_logits(model.encode(batch), batch), dim=-1).cpu()  # (B, V)
        raw = []
        for i, (r, cands) in enumerate(zip(records, lists)):
            if not cands:
                raw.append(None)
                continue
            index = [pre.value_index.get((r.attribute, normalize_value(c))) for c in cands]
            raw.append(np.array([float(log_probs[i, j]) if j is not None else UNKNOWN_CLASS_LOGIT for j in index]))
    tau = prior_correction(model, pre)
    if tau:
        raw = [
            None if s is None or c is None else s - tau * label_log_prior(pre, r.attribute, c)
            for r, c, s in zip(records, lists, raw)
        ]
    return [None if s is None or c is None else (list(c), fusion.log_normalize(s)) for c, s in zip(lists, raw)]


def _rank_calibrated(
    model: PV2TEA,
    pre: Preprocessor,
    batch,
    records: Sequence[Record],
    candidates: Mapping,
    priors: Sequence[Prior | None],
    calibration: Calibration,
) -> list[list[str] | None]:
    """Per row: the candidate with the highest λ · log p_model + (1 − λ) · log q_extractor, λ the calibrated model
    share of the row's attribute (:mod:`pv2tea.decoding.calibration`), the model reading the photo only for the
    attributes the calibration trusts it on; None: no candidate list."""
    blind = torch.tensor([not calibration.uses_image(r.attribute) for r in records], device=batch.has_image.device)
    if bool((blind & batch.has_image).any()):
        batch = batch.without_images(blind)
    out: list[list[str] | None] = []
    for r, scored, prior in zip(records, candidate_log_probs(model, pre, batch, records, candidates), priors):
        if scored is None:
            out.append(None)
            continue
        cands, model_lp = scored  # with the photo withheld where the calibration says so (above)
        extractor_lp = fusion.prior_log_probs(cands, prior) if prior is not None else np.zeros(len(cands))
        out.append(
            [calibrated_answer(ScoredRow(r.attribute, tuple(cands), model_lp, extractor_lp, frozenset()), calibration)]
        )
    return out


def _open_answers(
    model: PV2TEA, pre: Preprocessor, batch, records: Sequence[Record], num_beams: int | None
) -> list[list[str]]:
    """Per row of the batch (``records`` its rows): the generated values, or the classification head's."""
    if model.decoder is None:
        return [[pre.value_classes[j][1] for j in picks] for picks in model.classify(batch)]
    tok = pre.tokenizer
    ids = model.generate(
        batch, bos_id=tok.cls_token_id, eos_id=tok.sep_token_id, pad_id=tok.pad_token_id, num_beams=num_beams
    )
    return [drop_attribute_name(v, r.attribute) for v, r in zip(pre.decode_answers(ids), records)]


@torch.no_grad()
def generate_values(
    model: PV2TEA,
    pre: Preprocessor,
    records: Sequence[Record],
    batch_size: int,
    num_beams: int | None = None,
    progress: bool = False,
    desc: str = "predict",
    candidates: Mapping | None = None,
    priors: Sequence[Prior | None] | None = None,
    prior_weight: float = 1.0,
    calibration: Calibration | None = None,
) -> list[list[str]]:
    """Extracted values for each record, in order (model left in its previous train/eval mode).

    Open generation by default; with ``candidates`` ({category: {attribute: [values]}} or
    {attribute: [values]}) rows that have a candidate list get the most likely candidate instead, and with
    ``priors`` (an extractor's class probabilities per record, :meth:`TextExtractor.value_probabilities`) the
    candidate that is most likely under both, the extractor weighted by ``prior_weight``. With ``calibration``
    (:func:`pv2tea.decoding.calibration.fit_calibration`, ``pv2tea calibrate``) each attribute's candidates are
    ranked by λ · log p_model + (1 − λ) · log q_extractor with its calibrated λ instead (``prior_weight`` unused).
    """
    if calibration is not None and (priors is None or not candidates):
        raise ValueError(
            "a calibration weighs the model against a text extractor over candidate lists: it needs "
            "--extractor and --candidates"
        )
    if priors is not None:
        if len(priors) != len(records):
            raise ValueError(f"{len(priors)} priors for {len(records)} records")
        prior_weight = fusion.check_weight(prior_weight)
    was_training = model.training
    model.eval()
    dataset = RecordDataset(records)
    collate = make_collate(pre, dataset, with_answers=False)
    out: list[list[str]] = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch = on_model_device(collate(indices), model)
        ranked: list[list[str] | None] = [None] * len(indices)
        if candidates:  # rows with a candidate list are ranked; only the others are generated
            chunk = [dataset.records[i] for i in indices]
            chunk_priors = None if priors is None else [priors[i] for i in indices]
            ranked = (
                _rank_calibrated(model, pre, batch, chunk, candidates, chunk_priors, calibration)
                if calibration is not None and chunk_priors is not None
                else _rank_candidates(model, pre, batch, chunk, candidates, chunk_priors, prior_weight)
            )
        open_rows = [j for j, r in enumerate(ranked) if r is None]  # positions in the batch
        generated: list[list[str]] = []
        if open_rows:
            if len(open_rows) < len(indices):
                batch = batch.select(torch.tensor(open_rows, device=batch.text_ids.device))
            generated = _open_answers(model, pre, batch, [dataset.records[indices[j]] for j in open_rows], num_beams)
        answers = iter(generated)
        out.extend(r if r is not None else next(answers) for r in ranked)
    model.train(was_training)
    return out
