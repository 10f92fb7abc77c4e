"""``pv2tea train``, ``pv2tea weak-label`` (the text extractor whose answers are the weak labels) and
``pv2tea experiment`` (every variant over seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pv2tea.cli.common import (
    console,
    expected_errors,
    fail,
    load_data,
    log,
    out_console,
    quiet_libraries,
    require_gold,
    scan_data,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pv2tea.data.schema import Record

WEAK_LABEL_CHUNK = 4096  # rows weak-label reads, labels and writes at a time


def train(
    train_file: Annotated[Path, typer.Option("--train", help="Training data (JSONL/CSV/Parquet) with weak labels.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (config, metrics, logs, checkpoints).")],
    val_file: Annotated[Path | None, typer.Option("--val", help="Validation data, scored each epoch.")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Preset name (cpu, paper; warm-start and from-warm-start: the recipe for real products) or YAML file.",
        ),
    ] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. optim.lr=1e-4.")] = None,
    warm_start: Annotated[
        Path | None,
        typer.Option(
            "--warm-start",
            help="A model folder (a run's final/) that starts this run and, with loss.distill_weight > 0, teaches it: "
            "the same as --set train.warm_start=PATH (needed by the preset from-warm-start).",
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant",
            help="A variant of `pv2tea experiment` (e.g. tea: text only, the warm start of a later run), "
            "applied before --set.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Skip bad rows and count them in the run report.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train PV2TEA on weakly labelled products (on several processes under torchrun or accelerate launch)."""
    quiet_libraries()
    from pv2tea.config import load_config, upgrade_saved
    from pv2tea.demo import data_report
    from pv2tea.experiment import VARIANTS
    from pv2tea.launcher import launched_rank
    from pv2tea.train.loop import train as run_training

    if variant is not None and variant not in VARIANTS:
        fail(f"--variant {variant!r} is not a variant; known: {', '.join(VARIANTS)}")
    try:
        if resume:
            saved = out / "config.yaml"
            if not saved.is_file():
                fail(f"cannot resume: {saved} not found (was --out the run directory?)")
            import yaml

            cfg = load_config(None, overrides, base=upgrade_saved(yaml.safe_load(saved.read_text())))
        else:
            if (out / "checkpoint").exists():
                fail(f"{out} already holds a run; pass --resume to continue it or choose another --out")
            cfg = load_config(config, [*(VARIANTS[variant] if variant else []), *(overrides or [])])
        if warm_start is not None:
            cfg.train.warm_start = str(warm_start)
        if cfg.loss.distill_weight > 0 and not cfg.train.warm_start:
            fail(
                "loss.distill_weight > 0 (as in the preset from-warm-start) learns from a warm start: give its model "
                "folder with pv2tea train --warm-start RUN/final"
            )
        train_data = load_data(train_file, skip_invalid)
        val_data = load_data(val_file, skip_invalid) if val_file else None
        results = [train_data] + ([val_data] if val_data else [])
        result = run_training(
            cfg,
            train_data.records,
            out,
            val_data.records if val_data else [],
            resume=resume,
            progress=progress,
            data_report=data_report(*results),
        )
    except expected_errors() as exc:
        fail(str(exc))
    if launched_rank() != 0:  # under torchrun / accelerate launch: rank 0 reports
        return
    console.print(f"trained in {result.seconds:.0f} s; model: {result.final_dir}")
    if result.val_report:
        from pv2tea.eval.report import format_report_table

        out_console.print(format_report_table(result.val_report, title="validation"), highlight=False)


def _print_confidence(labelled: Sequence[Record], multi: dict[str, bool]) -> None:
    """How well the extractor's confidence (the rows' label_weight) tells its right labels from its wrong ones."""
    from pv2tea.eval.metrics import Example, confidence_reliability, is_correct

    rows = [(r, r.gold, r.label_weight) for r in labelled if r.gold is not None and r.label_weight is not None]
    right = [is_correct(Example(gold, r.label, r.source, r.attribute, multi[r.attribute])) for r, gold, _ in rows]
    result = confidence_reliability([weight for _, _, weight in rows], right)
    auc = "undefined (all right or all wrong)" if result["auc"] is None else f"{result['auc']:.3f}"
    out_console.print(
        f"extractor confidence (label_weight) vs its labels being right, {len(rows)} gold row(s): ROC AUC {auc}",
        highlight=False,
    )
    for b in result["bins"]:
        accuracy = "–" if b["accuracy"] is None else f"{b['accuracy']:.1f}"
        out_console.print(
            f"  confidence {b['low']:.2f}–{b['high']:.2f}: {b['n']:5d} row(s), accuracy {accuracy}", highlight=False
        )


def weak_label_cmd(
    train_file: Annotated[Path, typer.Option("--train", help="Text-only labelled data to train the extractor on.")],
    data: Annotated[Path, typer.Option("--data", help="Multimodal products to label.")],
    out: Annotated[Path, typer.Option("--out", help="Output dataset (JSONL/CSV/Parquet) with weak labels.")],
    kind: Annotated[str, typer.Option(help="transformer (OpenTag_cls-style) or tfidf.")] = "transformer",
    text_path: Annotated[str | None, typer.Option(help="Local BERT-style checkpoint for the transformer.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    load: Annotated[Path | None, typer.Option("--load", help="Use a saved extractor instead of training.")] = None,
    save: Annotated[Path | None, typer.Option("--save", help="Save the trained extractor here.")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    soft_train: Annotated[
        Path | None,
        typer.Option(
            "--soft-train",
            help="Also write the --train rows here with the extractor's out-of-fold class probabilities as soft "
            "labels (label_probs), for a warm start trained with --set loss.soft_label_weight.",
        ),
    ] = None,
    soft_folds: Annotated[int, typer.Option(min=2, help="Folds of --soft-train's cross-fitting.")] = 5,
) -> None:
    """Train (or load) a text-established extractor and write its predictions as weak labels.

    --data is read as a stream (checked first, then labelled and written a chunk at a time); its rows with gold
    values are kept in memory for the report. --soft-train fits --soft-folds more extractors, each scoring the
    --train rows the others trained on (an extractor scoring its own training rows gives almost their labels back).
    """
    quiet_libraries()
    import dataclasses
    from itertools import islice

    from pv2tea.baselines import (
        TfidfExtractorConfig,
        TfidfTextExtractor,
        TransformerExtractorConfig,
        TransformerTextExtractor,
        evaluate_extractor,
        load_extractor,
        soft_labelled,
        weak_label,
    )
    from pv2tea.data.attributes import multi_value_attributes
    from pv2tea.data.readers import RecordWriter
    from pv2tea.data.validate import iter_records
    from pv2tea.eval.report import format_report_table

    if load and soft_train:
        fail("--soft-train fits extractors on --train: it cannot be used with --load")

    def make_extractor():
        if kind == "tfidf":
            return TfidfTextExtractor(TfidfExtractorConfig())
        if kind == "transformer":
            cfg = TransformerExtractorConfig(progress=True)
            changes: dict[str, Any] = {
                k: v for k, v in {"text_path": text_path, "epochs": epochs}.items() if v is not None
            }
            return TransformerTextExtractor(dataclasses.replace(cfg, **changes))
        fail(f"--kind must be transformer or tfidf, got {kind}")

    try:
        scan = scan_data(data, skip_invalid, require_label=False)
        if load:
            extractor = load_extractor(load)
        else:
            source = load_data(train_file, skip_invalid)
            extractor = make_extractor().fit(source.records)
            if save:
                extractor.save(save)
            if soft_train:
                from pv2tea.data.folds import product_folds
                from pv2tea.data.readers import write_records

                folds = product_folds(source.records, soft_folds)
                write_records(soft_labelled(make_extractor, source.records, folds), soft_train)
                console.print(
                    f"{len(source.records)} --train row(s) written to {soft_train} with out-of-fold soft labels "
                    f"({soft_folds} folds; train a warm start on them with --set loss.soft_label_weight=0.5)"
                )
        gold: list[Record] = []
        gold_labelled: list[Record] = []
        rows = (record for _, record in iter_records(data, skip_rows=scan.bad_rows, require_label=False))
        with RecordWriter(out) as writer:
            while chunk := list(islice(rows, WEAK_LABEL_CHUNK)):
                labelled = weak_label(extractor, chunk)
                writer.write(labelled)
                gold.extend(r for r in chunk if r.gold)
                gold_labelled.extend(r for r in labelled if r.gold)
        console.print(
            f"{writer.written} weakly labelled row(s) written to {out} (label_weight: the extractor's "
            "confidence; training weighs the rows by it with --set schemes.label_weights=true)"
        )
        if gold:
            multi = multi_value_attributes(gold)
            report = evaluate_extractor(extractor, gold, multi)
            out_console.print(format_report_table(report, title="text extractor vs gold"), highlight=False)
            _print_confidence(gold_labelled, multi)
    except expected_errors() as exc:
        fail(str(exc))


def experiment(
    train_file: Annotated[Path, typer.Option("--train", help="Training data with weak labels.")],
    val_file: Annotated[Path, typer.Option("--val", help="Validation data.")],
    test_file: Annotated[Path, typer.Option("--test", help="Test data with gold values (and sources).")],
    out: Annotated[Path, typer.Option("--out", help="Experiment folder (re-run to resume).")],
    variants: Annotated[
        str, typer.Option(help="Comma-separated variants, or 'all'.")
    ] = "weak_labels,text_extractor,tea,pv2tea",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per variant (0..N-1).")] = 3,
    config: Annotated[str | None, typer.Option("--config", "-c")] = "cpu",
    overrides: Annotated[list[str] | None, typer.Option("--set")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
) -> None:
    """Train every variant over seeds; write Table 2/3/7-style tables, t-tests and retrieval."""
    quiet_libraries()
    from pv2tea.experiment import Split, known_variants, run_experiment

    names = known_variants() if variants == "all" else [v.strip() for v in variants.split(",") if v.strip()]
    try:
        split = Split(*(load_data(f, False).records for f in (train_file, val_file, test_file)))
        require_gold(test_file, split.test, "the experiment scores every variant against gold")
        run_experiment(split, out, names, list(range(seeds)), config, overrides or [], progress, log=log)
    except expected_errors() as exc:
        fail(str(exc))
    out_console.print((out / "tables.md").read_text(), highlight=False)
