"""``pv2tea predict`` (a file of products to a file of answers, resumable, on one or several processes) and
``pv2tea calibrate`` (how far to trust the model against its text extractor, per attribute)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from pv2tea.cli.common import (
    CalibrationOption,
    CandidatesOption,
    DeviceOption,
    PrecisionOption,
    console,
    expected_errors,
    fail,
    load_calibration,
    load_data,
    load_extractor,
    out_console,
    quiet_libraries,
    read_candidates,
    require_gold,
    warn,
)
from pv2tea.renamed import warn_renamed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pv2tea.data.schema import Record
    from pv2tea.inference.sharded import FileResult, Shard


def _keep_labels(new: bool, old: bool) -> bool:
    """--keep-labels, or its old name --keep-grounded (which warns once) when that is given."""
    if not old:
        return new
    warn_renamed("--keep-grounded", "--keep-labels")
    return True


# predict's longer options, declared once so that its signature reads one line per option
KeepLabelsOption = Annotated[
    bool,
    typer.Option(
        "--keep-labels",
        help="Kept labels: keep a row's label (e.g. from a text extractor) when its text states it; the model answers the other rows.",
    ),
]
KeepGroundedOption = Annotated[
    bool, typer.Option("--keep-grounded", hidden=True, help="The old name of --keep-labels.")
]
ChunkSizeOption = Annotated[int, typer.Option(min=1, help="Rows predicted and flushed to OUT.partial at a time.")]
ResumeOption = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run from OUT.partial (under torchrun: from the OUT.part-R-of-N files, on as many processes).",
    ),
]
ExtractorOption = Annotated[
    Path | None,
    typer.Option(
        "--extractor",
        help="A saved text extractor (pv2tea weak-label ... --save DIR): rank each row's candidates by the model's likelihood times the extractor's probability (needs --candidates).",
    ),
]
ExtractorWeightOption = Annotated[
    float,
    typer.Option(min=0.0, help="Weight of the extractor's log-probability in --extractor fusion (0: the model alone)."),
]
FeatureCacheOption = Annotated[
    Path | None,
    typer.Option(
        "--feature-cache",
        help="A feature cache folder of this model's frozen backbone(s) (pv2tea cache build): rows found in it are not encoded again; one of another backbone is refused.",
    ),
]
ProgressOption = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show a progress bar of the rows predicted.")
]


def predict(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="Products (label/gold not needed).")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: one line per row with the predicted values.")],
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    num_beams: Annotated[int | None, typer.Option(min=1)] = None,
    candidates: CandidatesOption = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    keep_labels: KeepLabelsOption = False,
    keep_grounded: KeepGroundedOption = False,
    chunk_size: ChunkSizeOption = 4096,
    resume: ResumeOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    extractor: ExtractorOption = None,
    extractor_weight: ExtractorWeightOption = 1.0,
    calibration: CalibrationOption = None,
    feature_cache: FeatureCacheOption = None,
    progress: ProgressOption = True,
) -> None:
    """Extract attribute values for every row and write them as JSON Lines (chunk by chunk; resumable).

    The file is read as a stream: every row is checked first, then the rows are predicted a chunk at a time. Under
    torchrun (torchrun --nproc_per_node N --no-python pv2tea predict ...) each process predicts every N-th row into
    its own part and the first merges the parts into OUT in input order.
    """
    keep_labels = _keep_labels(keep_labels, keep_grounded)
    quiet_libraries()
    from pv2tea.cache.store import FeatureCacheError
    from pv2tea.data.readers import check_table
    from pv2tea.data.schema import DataValidationError
    from pv2tea.decoding.fusion import check_fusion
    from pv2tea.inference.device import autocast_for, resolve_device
    from pv2tea.inference.predictor import Predictor
    from pv2tea.inference.sharded import JobError, check_leftovers, launched_shard, predict_file, process_group
    from pv2tea.models.checkpoint import checkpoint_warnings_to

    def note(message: str) -> None:  # a warning about the model folder, said once (by rank 0 under torchrun)
        if shard is None or shard.rank == 0:
            warn(message)

    def check_input(scan) -> None:
        if keep_labels and not scan.n_labelled:
            raise ValueError(
                f"{data}: --keep-labels needs the rows' existing values in a 'label' field; no row has one"
            )

    shard = None
    try:
        check_table(data)  # a missing, unknown or empty file is refused before the model loads
        shard = launched_shard()
        check_leftovers(out, shard, resume)  # before the model loads
        check_fusion(candidates, extractor)
        where = resolve_device(device)
        autocast_for(precision, where)  # refuse a bad --precision before the model loads
        calib = load_calibration(calibration, model, extractor)
        text_extractor = load_extractor(extractor)
        with checkpoint_warnings_to(note):
            predictor = Predictor.from_checkpoint(model, device=where, precision=precision)
        if feature_cache is not None:
            from pv2tea.cache.build import open_for_model

            predictor.pre.cache = open_for_model(feature_cache, predictor.model, predictor.pre)
        with process_group(shard):
            result = predict_file(
                predictor,
                data,
                out,
                shard=shard,
                skip_invalid=skip_invalid,
                resume=resume,
                check_input=check_input,
                batch_size=batch_size,
                num_beams=num_beams,
                candidates=read_candidates(candidates),
                keep_labels=keep_labels,
                chunk_size=chunk_size,
                extractor=text_extractor,
                extractor_weight=extractor_weight,
                calibration=calib,
                progress=progress,
            )
    except expected_errors(FeatureCacheError) as exc:
        if shard is not None and shard.rank > 0:
            if isinstance(exc, (DataValidationError, JobError)):  # every rank has it: rank 0 says it
                raise typer.Exit(2) from None
            fail(f"rank {shard.rank}: {exc}")
        fail(str(exc))
    if shard.rank == 0:
        _report_written(result, shard, data, out, keep_labels)


def _report_written(result: FileResult, shard: Shard, data: Path, out: Path, keep_labels: bool) -> None:
    """The scan's warnings, then one line: the predictions written, by how many processes, resumed, kept, skipped."""
    for warning in result.scan.warnings:
        warn(warning)
    skipped = len(result.scan.bad_rows)
    console.print(
        f"{result.written + result.resumed} prediction(s) written to {out}"
        + (f" by {shard.world_size} processes" if shard.world_size > 1 else "")
        + (f" ({result.resumed} from the interrupted run)" if result.resumed else "")
        + (f"; {result.kept} label(s) kept" if keep_labels else "")
        + (f"; {skipped} invalid row(s) of {escape(str(data))} skipped" if skipped else "")
    )


def _parse_grid(grid: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in grid.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--grid must be comma-separated numbers in [0, 1], got {grid!r}") from None


def calibrate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint folder (a run's final/).")],
    extractor: Annotated[
        Path,
        typer.Option(
            "--extractor",
            help="The saved text extractor the model is deployed next to (pv2tea weak-label ... --save DIR).",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="A gold sample: products with 'gold' values the model did not train on (a few hundred rows)."
        ),
    ],
    candidates: Annotated[
        Path,
        typer.Option(
            "--candidates",
            help="JSON {category: {attribute: [values]}} or {attribute: [values]}: the closed value lists ranked.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the calibration (JSON); pass it to predict --calibration.")
    ] = Path("calibration.json"),
    z: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Guard: keep the model's share on an attribute only when (fixed - broke) >= z * sqrt(fixed + broke) on the "
            "sample (rows weighed by the objective).",
        ),
    ] = 1.0,
    objective: Annotated[
        str,
        typer.Option(
            help="What a share is chosen by: 'balanced' (each gold value weighs alike, as macro-F1 over values does) "
            "or 'accuracy' (each row alike)."
        ),
    ] = "accuracy",
    min_rows: Annotated[
        int, typer.Option(min=1, help="Attributes with fewer sample rows take the share chosen on the whole sample.")
    ] = 20,
    grid: Annotated[
        str, typer.Option(help="Model shares tried (0: the extractor alone, 1: the model alone).")
    ] = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
) -> None:
    """Per attribute, how far to trust the model against the extractor, from a small gold sample.

    Where the model does not beat the extractor beyond noise, the extractor's answer is kept.
    """
    quiet_libraries()
    from rich.table import Table

    from pv2tea.decoding.calibration import CalibrationConfig
    from pv2tea.inference.calibrate import calibrate_model

    def left_out(rows: Sequence[Record]) -> None:
        attrs = sorted({r.attribute for r in rows})
        warn(
            f"{len(rows)} row(s) of {data} have no candidate list in {candidates} and are not used (attributes: "
            f"{', '.join(attrs[:5])}{' …' if len(attrs) > 5 else ''}); they keep the model's free answer at prediction"
        )

    try:
        config = CalibrationConfig(grid=_parse_grid(grid), z=z, min_rows=min_rows, objective=objective)  # type: ignore[arg-type]
        dataset = load_data(data, skip_invalid, require_label=False)
        require_gold(data, dataset.records, "calibration compares the answers with gold values")
        cands = read_candidates(candidates)
        if cands is None:
            raise ValueError("calibration ranks candidate lists: it needs --candidates")
        calibration = calibrate_model(
            model,
            extractor,
            dataset.records,
            cands,
            config,
            batch_size=batch_size,
            sample=str(data),
            skipped_rows=dataset.n_skipped,
            on_left_out=left_out,
        )
        calibration.save(out)
    except expected_errors() as exc:
        fail(str(exc))
    rows = calibration.meta["sample_rows"]
    table = Table(title=f"calibration on {rows} gold row(s) of {data}", show_edge=False)
    score = "bal. acc" if calibration.config.objective == "balanced" else "acc"
    columns = ("attribute", "rows", f"extractor {score}", "best λ", f"deployed {score}", "fixed", "broke", "λ deployed")
    for col in (*columns, "photo"):
        table.add_column(col, justify="left" if col == "attribute" else "right")
    for name, c in [*sorted(calibration.attributes.items()), ("(whole sample)", calibration.pooled)]:
        deployed = f"{c.model_weight:g}" + (" (pooled)" if c.source == "pooled" and name != "(whole sample)" else "")
        if c.best_weight > 0 and not c.accepted:
            deployed += " (guard)"
        table.add_row(
            name,
            str(c.rows),
            f"{c.extractor_score:.1f}" if c.extractor_score is not None else "–",
            f"{c.best_weight:g}",
            f"{c.fused_score:.1f}" if c.fused_score is not None else "–",
            str(c.fixed),
            str(c.broke),
            deployed,
            # whether the model reads the photo, with the sample's rows right only with it / only without it
            ("yes" if c.image else "no")
            + (f" ({c.image_fixed}/{c.image_broke})" if c.image_fixed or c.image_broke else ""),
        )
    out_console.print(table)
    console.print(
        f"calibration written to {out}: λ is the model's share (0: the extractor's answer is kept); use it "
        f"with pv2tea predict --extractor {extractor} --candidates {candidates} --calibration {out}"
    )
