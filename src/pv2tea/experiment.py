"""Experiments: train every requested variant over several seeds and tabulate them like the paper.

Variants are named config overrides (Tables 2, 4–7, 9–11) plus two references that need no
PV2TEA training: ``weak_labels`` (the labels the models were trained on, scored against gold) and
``text_extractor`` (an OpenTag_cls-style text classifier trained on the same weak labels). Every
run lives in ``OUT/<variant>/seed_<s>/``; a run with a test report is reused, a run that stopped
mid-training is resumed, so re-running the same command continues where it stopped.

When the test rows carry weak labels, each model variant also gets a ``<variant>+kept_labels`` row (kept labels):
the model deployed next to the extractor that made the labels, answering only the rows whose label the text does
not state (``pv2tea predict --keep-labels``). Each variant that reads images also gets a
``<variant>+no_images`` row: the same trained model with every test product's images withheld, so the
difference to its own row is what the image adds at test time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from pv2tea.config import Config, ConfigError, config_differences, from_dict, load_config, upgrade_saved
from pv2tea.data.attributes import multi_value_attributes
from pv2tea.data.dataset import value_counts
from pv2tea.data.products import product_key
from pv2tea.data.schema import Record
from pv2tea.eval.metrics import Example, departures, source_aware_report
from pv2tea.eval.normalize import normalize_value
from pv2tea.eval.report import format_report_table, write_report
from pv2tea.eval.retrieval import retrieval_metrics
from pv2tea.eval.summary import (
    METRICS,
    SOURCES,
    add_ttests,
    attribute_stats,
    fmt_p,
    fmt_stat,
    markdown_table,
    metric_stats,
    stat_over,
    value_at,
)
from pv2tea.eval.summary import mean_std as mean_std  # re-exported: first written here
from pv2tea.eval.summary import paired_ttest as paired_ttest
from pv2tea.inference.predictor import Predictor
from pv2tea.models.checkpoint import (
    MODEL_FILE,
    WARM_START_FILE,
    CheckpointError,
    checkpoint_exists,
    warm_start_fingerprint,
)
from pv2tea.regularize.grounding import keep_labels
from pv2tea.renamed import current_report, warn_renamed
from pv2tea.train.loop import train

TEA = [
    "vision.enabled=false",
    "schemes.contrastive=false",
    "schemes.category_loss=false",
    "schemes.attention_pruning=false",
    "schemes.visual_nr=false",
    "schemes.text_dropout=0",
    "schemes.mention_dropout=0",
]  # both act on image rows only: off, as they are

VARIANTS: dict[str, list[str]] = {
    "pv2tea": [],
    "tea": TEA,
    "pv2tea_cls": ["decoder.head=classify"],
    "wo_sc": ["schemes.contrastive=false"],
    "matching": ["schemes.alignment=matching"],  # binary image-text matching instead of S1 (Figure 4)
    "wo_smooth": ["schemes.alpha=0"],
    "wo_ct": ["schemes.category_loss=false"],
    "wo_pruning": ["schemes.attention_pruning=false"],
    "wo_ct_pruning": ["schemes.category_loss=false", "schemes.attention_pruning=false"],
    "wo_nr": ["schemes.visual_nr=false", "schemes.prediction_nr=false"],
    "wo_vis_nr": ["schemes.visual_nr=false"],
    "wo_pred_nr": ["schemes.prediction_nr=false"],
    **{f"alpha_{a}": [f"schemes.alpha={a}"] for a in ("0.2", "0.6", "0.8")},
    # not a paper ablation: the `cpu` preset's text and mention dropout (additions tuned on the demo) switched off
    "wo_dropout": ["schemes.text_dropout=0", "schemes.mention_dropout=0"],
    # not in the paper: the visual tokens through a cross-attention of their own behind a tanh gate that starts
    # closed (a text-only warm start is kept intact until the image earns its weight)
    "visual_gate": ["fusion.visual_gate=0"],
    # not in the paper: each row's label_weight (e.g. the extractor's confidence) multiplied into its sample weight
    "label_weight": ["schemes.label_weights=true"],
}
REFERENCES = ("weak_labels", "text_extractor")
KEEP_SUFFIX = "+kept_labels"  # a variant's row when test rows keep the weak labels their text states
KEPT_KEY = "kept_labels"  # test report key of the model's report with kept labels
FUSED_SUFFIX = "+extractor"  # a variant's row when its candidate ranking is fused with the text extractor
NO_IMAGES_SUFFIX = "+no_images"  # a visual variant's row when its test products' images are withheld
NO_IMAGES_KEY = "without_images"  # test report key of the model's report with the test images withheld


@dataclass
class Split:
    """The rows of an experiment: trained on (weak labels), scored each epoch, and scored at the end (gold)."""

    train: list[Record]
    val: list[Record]
    test: list[Record]


def known_variants() -> list[str]:
    """Every name ``--variants`` accepts: the model variants of ``VARIANTS`` and the reference rows."""
    return [*VARIANTS, *REFERENCES]


def _gold(record: Record) -> tuple[str, ...]:
    if record.gold is None:
        raise ValueError(f"record {record.id!r} (attribute {record.attribute!r}) has no gold values to score against")
    return tuple(record.gold)


def gold_examples(records: Sequence[Record], preds: Sequence[Sequence[str]], multi: dict[str, bool]) -> list[Example]:
    """Predictions paired with the gold values (and sources) of their records, for scoring."""
    return [
        Example(
            gold=_gold(r),
            pred=tuple(p),
            source=r.source,
            attribute=r.attribute,
            multi_value=multi.get(r.attribute, False),
        )
        for r, p in zip(records, preds)
    ]


def constrain_to_candidates(
    preds: Sequence[Sequence[str]], records: Sequence[Record], candidates: Mapping[str, Sequence[str]] | None
) -> list[list[str]]:
    """Keep the predicted values that are options of the row's attribute (a closed-set answer); an attribute without
    a list keeps every value."""
    allowed = {a: {normalize_value(v) for v in vals} for a, vals in (candidates or {}).items()}
    out = []
    for values, record in zip(preds, records):
        options = allowed.get(record.attribute)  # None: no closed list for this attribute
        out.append([v for v in values if options is None or normalize_value(v) in options])
    return out


@torch.no_grad()
def retrieval_on(predictor: Predictor, records: Sequence[Record], batch_size: int = 32) -> dict[str, float] | None:
    """Image↔text retrieval over the distinct products of ``records`` with the S1 projections."""
    model, pre = predictor.model, predictor.pre
    if not model.uses_contrast and model.itm_head is None:
        return None
    products = list({product_key(r): r for r in records if r.images}.values())
    if len(products) < 2:
        return None
    if model.itm_head is not None:  # binary matching: score every pair through the fusion
        batch = pre.collate(products, list(range(len(products))), list(range(len(products))), with_answers=False)
        return retrieval_metrics(model.match_scores(batch).numpy())
    image_feats, text_feats = [], []
    for start in range(0, len(products), batch_size):
        chunk = products[start : start + batch_size]
        batch = pre.collate(chunk, list(range(len(chunk))), list(range(len(chunk))), with_answers=False)
        pooled, _, _ = model.image_features(batch.images)
        text = model.text_encoder(input_ids=batch.text_ids, attention_mask=batch.text_mask).last_hidden_state
        image_feats.append(torch.nn.functional.normalize(model.vision_proj(pooled), dim=-1))
        text_feats.append(torch.nn.functional.normalize(model.text_proj(text[:, 0]), dim=-1))
    sim = torch.cat(image_feats) @ torch.cat(text_feats).t()  # (N_img, N_txt)
    return retrieval_metrics(sim.numpy())


RANKING_ONLY_SETTINGS = ("decoder.prior_correction",)  # change how a trained model ranks candidates, not training


def load_predictor(
    final: Path, prior_correction: float | None = None, trained_on: Sequence[Record] | None = None
) -> Predictor:
    """A trained model from its ``final/`` folder, ranking candidates with ``prior_correction`` (None: as saved); a
    model saved without its training label counts gets them from ``trained_on`` (the rows it trained on)."""
    predictor = Predictor.from_checkpoint(final)
    if prior_correction is not None:
        predictor.model.cfg.decoder.prior_correction = float(prior_correction)
    if not predictor.pre.value_counts and trained_on is not None:
        predictor.pre.value_counts = value_counts(trained_on)
    return predictor


def run_variant(
    name: str,
    seed: int,
    data: Split,
    out: Path,
    base_config: str | None,
    overrides: Sequence[str],
    progress: bool = False,
    candidates: Mapping | None = None,
    run_name: str | None = None,
    priors: Sequence[Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or reuse) one variant/seed and return its test report (+ retrieval).

    With ``candidates`` the report also holds ``constrained``: the report of candidate-ranked
    predictions, and with ``priors`` (the text extractor's class probabilities of each test row) ``fused``: the
    candidates ranked by model and extractor together (:mod:`pv2tea.decoding.fusion`). When the test rows carry
    weak labels it holds ``kept_labels`` (:func:`kept_labels_report`, with its own ``constrained``) and, in
    the report and each of its ``constrained`` and ``fused`` blocks, ``departures``: where the answers differ from
    the weak labels and who was right (:func:`pv2tea.eval.metrics.departures`).
    ``run_name`` names the run folder (default: the variant name). A report saved under older key names is read
    under today's (:func:`pv2tea.renamed.current_report`).
    """
    run_dir = out / (run_name or name) / f"seed_{seed}"
    report_path = run_dir / "test_report.json"
    multi = multi_value_attributes(data.train + data.val + data.test)
    tau = None
    if name in VARIANTS:
        cfg = load_config(base_config, [*overrides, *VARIANTS[name], f"train.seed={seed}"])
        check_same_config(run_dir, cfg)
        tau = cfg.decoder.prior_correction
    if report_path.is_file():
        report = current_report(json.loads(report_path.read_text()))
        if (
            candidates
            and tau is not None
            and (run_dir / "final").is_dir()
            and report.get("prior_correction", 0.0) != tau
        ):  # ranked with other settings: every report anew
            report = _model_reports(load_predictor(run_dir / "final", tau, data.train), data, multi, candidates, priors)
            write_report(report, report_path)
            return report
        labelled = _has_labels(data.test)
        want_keep = KEPT_KEY not in report and labelled
        want_fused = "fused" not in report and bool(candidates) and priors is not None
        can_fuse = bool(candidates) and priors is not None  # what the fused report needs
        want_departures = labelled and (
            "departures" not in report or (can_fuse and "fused" in report and "departures" not in report["fused"])
        )
        want_no_images = NO_IMAGES_KEY not in report
        if (want_keep or want_fused or want_departures or want_no_images) and (run_dir / "final").is_dir():
            # a run finished before these reports existed: add them from the final model
            predictor = load_predictor(run_dir / "final", tau, data.train)
            if want_keep or "departures" not in report:
                fresh, preds, ranked = score_predictor(predictor, data.test, multi, candidates)
                if want_keep:
                    report[KEPT_KEY] = kept_labels_report(data.test, preds, multi)
                    if ranked is not None:
                        report[KEPT_KEY]["constrained"] = kept_labels_report(data.test, ranked, multi)
                if labelled and "departures" not in report:
                    report["departures"] = fresh["departures"]
                    if ranked is not None and "constrained" in report:
                        report["constrained"]["departures"] = fresh["constrained"]["departures"]
            fuse = want_fused or (can_fuse and "departures" not in report.get("fused", {}))
            if fuse and candidates and priors is not None:
                report["fused"] = _fused_report(predictor, data.test, candidates, priors, multi)
            if want_no_images:
                report[NO_IMAGES_KEY] = no_images_report(predictor, data.test, multi, candidates)
            write_report(report, report_path)
        return report
    run_dir.mkdir(parents=True, exist_ok=True)
    if name == "weak_labels":
        report = source_aware_report(gold_examples(data.test, [r.label for r in data.test], multi))
    elif name == "text_extractor":
        from pv2tea.baselines import TransformerExtractorConfig, TransformerTextExtractor

        text_path = load_config(base_config, overrides).text.path  # the same text checkpoint as PV2TEA
        extractor = TransformerTextExtractor(
            TransformerExtractorConfig(text_path=text_path, seed=seed, progress=progress)
        ).fit(data.train)
        report = source_aware_report(gold_examples(data.test, extractor.predict(data.test), multi))
    else:
        resume = checkpoint_exists(run_dir / "checkpoint")
        try:
            result = train(cfg, data.train, run_dir, data.val, resume=resume, progress=progress)
        except CheckpointError:  # a half-written first checkpoint: start over
            result = train(cfg, data.train, run_dir, data.val, resume=False, progress=progress)
        report = _model_reports(load_predictor(result.final_dir, tau, data.train), data, multi, candidates, priors)
    write_report(report, report_path)
    if (run_dir / "final").is_dir():
        # a finished run needs only its final model (reports, figures, predict); the resumable checkpoint
        # (model + optimizer state) would double the disk use of a many-variant, many-seed experiment
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return report


def _model_reports(
    predictor: Predictor,
    data: Split,
    multi: dict[str, bool],
    candidates: Mapping | None,
    priors: Sequence[Mapping[str, float]] | None,
) -> dict[str, Any]:
    """A trained model's test report with every part: open and ranked answers, retrieval, kept labels, fused with
    the extractor, the images withheld; ``prior_correction`` records how it ranked."""
    report, preds, ranked = score_predictor(predictor, data.test, multi, candidates)
    report["retrieval"] = retrieval_on(predictor, data.test)
    if _has_labels(data.test):
        report[KEPT_KEY] = kept_labels_report(data.test, preds, multi)
        if ranked is not None:
            report[KEPT_KEY]["constrained"] = kept_labels_report(data.test, ranked, multi)
    if candidates and priors is not None:
        report["fused"] = _fused_report(predictor, data.test, candidates, priors, multi)
    report[NO_IMAGES_KEY] = no_images_report(predictor, data.test, multi, candidates)
    report["prior_correction"] = predictor.model.cfg.decoder.prior_correction
    return report


def score_predictor(
    predictor: Predictor, records: Sequence[Record], multi: dict[str, bool], candidates: Mapping | None = None
) -> tuple[dict[str, Any], list[list[str]], list[list[str]] | None]:
    """A model's test report against gold: its open answers, with ``candidates`` also its answers ranked among them
    (``constrained``), and where the records carry weak labels, where the answers depart from them (``departures``).
    Returns (report, open answers, ranked answers or None)."""
    batch_size = predictor.model.cfg.train.eval_batch_size
    preds = predictor.predict(records, batch_size)
    report = source_aware_report(gold_examples(records, preds, multi))
    ranked = None
    if candidates:
        ranked = predictor.predict(records, batch_size, candidates=candidates)
        report["constrained"] = source_aware_report(gold_examples(records, ranked, multi))
    if _has_labels(records):
        _add_departures(report, records, preds, ranked, multi, candidates)
    return report, preds, ranked


def _fused_report(
    predictor: Predictor,
    records: Sequence[Record],
    candidates: Mapping,
    priors: Sequence[Mapping[str, float]],
    multi: dict[str, bool],
) -> dict[str, Any]:
    """The report of candidates ranked by the model and the text extractor together (late fusion)."""
    ranked = predictor.predict(records, predictor.model.cfg.train.eval_batch_size, candidates=candidates, priors=priors)
    examples = gold_examples(records, ranked, multi)
    report = source_aware_report(examples)
    if _has_labels(records):
        report["departures"] = departures(
            examples, constrain_to_candidates([r.label for r in records], records, candidates)
        )
    return report


def _add_departures(
    report: dict[str, Any],
    records: Sequence[Record],
    preds: Sequence[Sequence[str]],
    ranked: Sequence[Sequence[str]] | None,
    multi: dict[str, bool],
    candidates: Mapping | None,
) -> None:
    """Where the answers depart from the test rows' weak labels, in place: how many the model fixed and broke
    (:func:`pv2tea.eval.metrics.departures`). The open answers are compared with the labels, the answers ranked
    among the candidates with the labels kept to the candidates (the extractor's closed-set answers)."""
    labels = [r.label for r in records]
    report["departures"] = departures(gold_examples(records, preds, multi), labels)
    if ranked is not None and "constrained" in report:
        report["constrained"]["departures"] = departures(
            gold_examples(records, ranked, multi), constrain_to_candidates(labels, records, candidates)
        )


def _as_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict as it reads back from ``config.yaml`` (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))


def check_same_config(run_dir: Path, cfg: Config) -> None:
    """Refuse to reuse or resume a run folder whose saved ``config.yaml`` differs from ``cfg``.

    Without this, re-running an experiment with other settings into the same ``--out`` would silently report
    the old runs. ``schemes.queue_size`` is saved capped at the training set's size, so a saved value at or
    under the requested one matches.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    requested = _as_saved(cfg.to_dict())
    try:  # a setting added since the run was made has its default there
        saved = _as_saved(from_dict(upgrade_saved(yaml.safe_load(saved_path.read_text()) or {})).to_dict())
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{saved_path} cannot be compared with the requested settings: {exc}. Choose another --out."
        ) from exc
    diffs = [
        (key, a, b)
        for key, a, b in config_differences(saved, requested)
        if not (key == "schemes.queue_size" and isinstance(a, int) and isinstance(b, int) and a <= b)
        and key != "train.warm_start"
        and key not in RANKING_ONLY_SETTINGS
    ]
    warm, retrained = _warm_start_difference(
        run_dir, saved["train"].get("warm_start"), requested["train"].get("warm_start")
    )
    diffs += warm
    if diffs:
        shown = "; ".join(f"{key}: {a!r} there, {b!r} now" for key, a, b in diffs[:5])
        more = f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""
        if retrained:
            advice = (
                "Its warm start's weights have changed since: delete that run folder to train it again from "
                "them, or choose another --out."
            )
        else:
            advice = "Re-run with the same settings to reuse it, or choose another --out."
        raise ConfigError(f"{saved_path} was made with other settings ({shown}{more}). {advice}")


def _warm_start_difference(
    run_dir: Path, saved: str | None, requested: str | None
) -> tuple[list[tuple[str, Any, Any]], bool]:
    """``train.warm_start`` compared by the weights' content when the run recorded it: a moved warm-start folder
    matches, and a warm start retrained at the same path does not. Returns (the difference, if any; whether it is
    that the warm start's weights changed)."""
    record = run_dir / WARM_START_FILE
    if saved and requested and record.is_file() and (Path(requested) / MODEL_FILE).is_file():
        try:
            there = json.loads(record.read_text())["sha256"]
            if not isinstance(there, str):
                raise TypeError(f"sha256 is {there!r}, not a string")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{record} is unreadable ({exc}); delete that run folder or choose another --out."
            ) from exc
        now = warm_start_fingerprint(Path(requested))
        if there == now:
            return [], False
        return [("train.warm_start", f"{saved} (sha256 {there[:12]})", f"{requested} (sha256 {now[:12]})")], True
    return ([] if saved == requested else [("train.warm_start", saved, requested)]), False


def no_images_report(
    predictor: Predictor, records: Sequence[Record], multi: dict[str, bool], candidates: Mapping | None = None
) -> dict[str, Any] | None:
    """The model's test report (open, ranked among ``candidates``, departures) with every product's images withheld:
    compared with its report on the products as they are, what the image adds at test time. None for a model that
    reads no image (TEA)."""
    if not predictor.model.cfg.vision.enabled:
        return None
    report, _, _ = score_predictor(predictor, [replace(r, images=()) for r in records], multi, candidates)
    return report


def _has_labels(records: Sequence[Record]) -> bool:
    return any(r.label for r in records)


def kept_labels_report(
    records: Sequence[Record], preds: Sequence[Sequence[str]], multi: dict[str, bool]
) -> dict[str, Any]:
    """The report of the model deployed next to the labels' extractor (kept labels): a test row keeps its weak label
    when its text states it, the model answers the others (``pv2tea predict --keep-labels``)."""
    return source_aware_report(gold_examples(records, keep_labels(records, preds), multi))


def summarize(reports: dict[str, list[dict]], reference: str = "pv2tea") -> dict[str, Any]:
    """Mean ± std per variant (overall, by source, gap, per attribute F1, retrieval) and paired t-tests over seeds of
    every variant's F1 against ``reference``'s."""
    summary: dict[str, Any] = {}
    for name, runs in reports.items():
        entry: dict[str, Any] = {"seeds": len(runs)}
        entry["overall"] = metric_stats(runs, "overall")
        entry["by_source"] = {s: metric_stats(runs, "by_source", s) for s in SOURCES}
        entry["gap"] = metric_stats(runs, "gap")
        entry["by_attribute"] = {a: stat["f1"] for a, stat in attribute_stats(runs).items()}
        if any(r.get("retrieval") for r in runs):
            keys = sorted({k for r in runs for k in (r.get("retrieval") or {})})
            entry["retrieval"] = {k: stat_over(runs, "retrieval", k) for k in keys}
        summary[name] = entry
    f1 = {name: [value_at(r, "overall", "f1") for r in runs] for name, runs in reports.items()}
    add_ttests(summary, f1, [reference], against_itself=True)
    return summary


RETRIEVAL_COLUMNS = {"T@1": "txt_r1", "I@1": "img_r1", "T@M": "txt_r_mean", "I@M": "img_r_mean", "R@Mean": "r_mean"}


def format_tables(summary: dict[str, Any]) -> str:
    """Markdown tables in the layout of the paper's Tables 2, 3/8, 7 and the retrieval study."""
    lines = ["### Overall (Table 2 style; mean ± std over seeds; p: paired t-test vs pv2tea on F1)", ""]
    lines += markdown_table(
        ["variant", "P", "R", "F1", "Acc", "p"],
        [
            [name, *(fmt_stat(e["overall"][m]) for m in METRICS), fmt_p(e.get("ttest_vs_pv2tea"))]
            for name, e in summary.items()
        ],
    )
    lines += ["", "### Source-aware (Table 3 style: F1 by gold-value source and the GAP)", ""]
    lines += markdown_table(
        ["variant", "F1 text", "F1 image", "GAP F1", "GAP P", "GAP R"],
        [
            [
                name,
                fmt_stat(e["by_source"]["text"]["f1"]),
                fmt_stat(e["by_source"]["image"]["f1"]),
                *(fmt_stat(e["gap"][m]) for m in ("f1", "precision", "recall")),
            ]
            for name, e in summary.items()
        ],
    )
    if "pv2tea" in summary and "pv2tea_cls" in summary:
        lines += ["", "### Classification vs generation (Table 7 style)", ""]
        lines += markdown_table(
            ["head", "P", "R", "F1"],
            [
                [label, *(fmt_stat(summary[name]["overall"][m]) for m in ("precision", "recall", "f1"))]
                for name, label in (("pv2tea_cls", "classification"), ("pv2tea", "generation"))
            ],
        )
    with_retrieval = {n: e["retrieval"] for n, e in summary.items() if "retrieval" in e}
    if with_retrieval:
        lines += ["", "### Cross-modal retrieval on test products (Figure 4 style)", ""]
        lines += markdown_table(
            ["variant", *RETRIEVAL_COLUMNS],
            [[name, *(fmt_stat(r[k]) for k in RETRIEVAL_COLUMNS.values())] for name, r in with_retrieval.items()],
        )
    return "\n".join(lines) + "\n"


def run_experiment(
    data: Split,
    out: Path,
    variants: Sequence[str],
    seeds: Sequence[int],
    base_config: str | None = "cpu",
    overrides: Sequence[str] = (),
    progress: bool = False,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Train and score every variant over every seed (``pv2tea experiment``) and write the tables.

    Args:
        data: The training, validation and test rows.
        out: The experiment folder: one run folder per variant and seed, ``experiment.json``, ``tables.md``.
        variants: Names from :func:`known_variants`.
        seeds: The seeds of each model variant (the weak labels, which have none, are scored once).
        base_config: The preset or YAML file every run starts from.
        overrides: ``--set`` overrides applied to every run before the variant's own.
        progress: Show progress bars.
        log: Called with one line per finished run.

    Returns:
        The summary (:func:`summarize`): per variant, the mean and standard deviation of each score over the seeds,
        and paired t-tests against PV2TEA.

    Raises:
        ValueError: An unknown variant.
    """
    unknown = [v for v in variants if v not in known_variants()]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(known_variants())}")
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict]] = {}
    for name in variants:
        for seed in [seeds[0]] if name == "weak_labels" else seeds:
            report = run_variant(name, seed, data, out, base_config, overrides, progress)
            reports.setdefault(name, []).append(report)
            log(f"{name} seed {seed}: F1 {report['overall']['f1']}")
    for name in list(reports):  # each model variant deployed with --keep-labels, as a row of its own
        if all(KEPT_KEY in r for r in reports[name]):
            reports[f"{name}{KEEP_SUFFIX}"] = [r[KEPT_KEY] for r in reports[name]]
        if all(r.get(NO_IMAGES_KEY) for r in reports[name]):  # and with its test images withheld
            reports[f"{name}{NO_IMAGES_SUFFIX}"] = [r[NO_IMAGES_KEY] for r in reports[name]]
    summary = summarize(reports)
    (out / "experiment.json").write_text(
        json.dumps(
            {
                "variants": list(variants),
                "seeds": list(seeds),
                "config": base_config,
                "overrides": list(overrides),
                "summary": summary,
            },
            indent=2,
            allow_nan=False,
        )
    )
    tables = format_tables(summary)
    (out / "tables.md").write_text(tables)
    if "pv2tea" in reports:
        (out / "pv2tea_seed0_table.txt").write_text(format_report_table(reports["pv2tea"][0], "pv2tea"))
    return summary


def __getattr__(name: str) -> Any:
    """Old names of this module's functions, which still import (and warn once): ``keep_grounded_report``."""
    if name == "keep_grounded_report":
        warn_renamed("pv2tea.experiment.keep_grounded_report", "kept_labels_report")
        return kept_labels_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
