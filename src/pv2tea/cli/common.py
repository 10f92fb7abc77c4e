"""What the command modules share: the two consoles, error reporting, the options several commands declare alike,
and reading the files those options name.

Expected failures (bad data, bad config, missing files) print one clear line and exit with a non-zero code
(:func:`fail`); :func:`expected_errors` lists the errors a command reports that way rather than as a traceback.
Heavy libraries are imported inside the helpers, so importing this module (and ``pv2tea --help``) stays light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:  # annotations only: the data modules load with the commands that use them
    from collections.abc import Callable, Sequence

    from pv2tea.data.schema import LoadResult, Record
    from pv2tea.data.validate import DatasetScan
    from pv2tea.decoding.calibration import Calibration

console = Console(stderr=True, soft_wrap=True)  # progress, warnings and errors
out_console = Console(soft_wrap=True)  # the results a command prints (tables, reports)

# --device and --precision of predict and serve
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda, cuda:N or mps.")
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="fp32, bf16 (autocast; fast on CPUs with AMX or AVX-512 BF16 and on GPUs) or fp16 (GPUs only).",
    ),
]
# --candidates of evaluate, predict and serve
CandidatesOption = Annotated[
    Path | None,
    typer.Option(
        "--candidates",
        help="JSON {category: {attribute: [values]}} or {attribute: [values]}: rank these instead of free generation.",
    ),
]
# --calibration of predict and serve
CalibrationOption = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        help="Per-attribute model shares from pv2tea calibrate (needs --extractor and --candidates; replaces --extractor-weight).",
    ),
]


def quiet_libraries() -> None:
    """Keep Hugging Face offline and quiet (no progress bars, errors only) for the commands that load models."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr (``message`` is plain text, not markup)."""
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def log(message: str) -> None:
    """Print a progress line of a long command to stderr."""
    console.print(message, highlight=False)


def percent_of(total: int) -> Callable[[int], str]:
    """``k`` as a percentage of ``total`` with one decimal ("–" when there is no total)."""
    return (lambda k: f"{100.0 * k / total:.1f}") if total else (lambda k: "–")


def csv_items(text: str) -> list[str]:
    """The comma-separated items of an option, stripped, empty ones left out."""
    return [item.strip() for item in text.split(",") if item.strip()]


def need_extra(feature: str, extra: str, *modules: str) -> None:
    """Exit with the install command when a package of the optional ``extra`` that ``feature`` needs is missing."""
    from pv2tea.extras import MissingExtraError, require_extra

    try:
        require_extra(feature, extra, *modules)
    except MissingExtraError as exc:
        fail(escape(str(exc)))  # "[serve]" is not markup


def expected_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The errors a command reports as one line (its message) rather than a traceback, and ``more``."""
    from pv2tea.config import ConfigError
    from pv2tea.data.images import ImageLoadError
    from pv2tea.data.schema import DataValidationError
    from pv2tea.eval.normalize import SynonymFileError
    from pv2tea.models.checkpoint import CheckpointError
    from pv2tea.models.weights import WeightLoadError
    from pv2tea.train.loop import TrainingError

    return (
        *more,
        ConfigError,
        DataValidationError,
        WeightLoadError,
        CheckpointError,
        TrainingError,
        ImageLoadError,
        SynonymFileError,
        FileNotFoundError,
        ValueError,
    )


def load_data(path: Path, skip_invalid: bool, require_label: bool = True) -> LoadResult:
    """Load and check a dataset file, printing its warnings and how many invalid rows were skipped."""
    from pv2tea.data.validate import load_dataset

    result = load_dataset(path, skip_invalid=skip_invalid, require_label=require_label)
    for warning in result.warnings:
        warn(warning)
    if result.n_skipped:
        console.print(
            f"[yellow]skipped {result.n_skipped} invalid row(s) of {escape(str(path))}[/] (see data_report.json)"
        )
    return result


def scan_data(path: Path, skip_invalid: bool, require_label: bool = True) -> DatasetScan:
    """Check a dataset file in one streaming pass (for commands that then stream its records with
    ``iter_records(path, skip_rows=scan.bad_rows)``); says what :func:`load_data` says about it."""
    from pv2tea.data.schema import DataValidationError
    from pv2tea.data.validate import scan_dataset

    result = scan_dataset(path, require_label=require_label)
    if result.errors and not skip_invalid:
        raise DataValidationError(result.errors)
    for warning in result.warnings:
        warn(warning)
    if result.bad_rows:
        console.print(f"[yellow]skipped {len(result.bad_rows)} invalid row(s) of {escape(str(path))}[/]")
    return result


def require_gold(path: Path, records: Sequence[Record], why: str) -> None:
    """Stop with a message naming the file and its first row without a gold value, if any."""
    missing = [r.id for r in records if not r.gold]
    if missing:
        fail(f"{path}: {len(missing)} row(s) have no 'gold' value (first: {missing[0]}); {why}")


def read_candidates(path: Path | None) -> dict | None:
    """Candidate value lists from JSON; a clear error naming the file when malformed."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"candidates file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"candidates file {path}: expected a JSON object")
    return data


def load_extractor(path: Path | None) -> Any:
    """A saved text extractor for --extractor fusion (its libraries are imported only then)."""
    if path is None:
        return None
    from pv2tea.baselines import load_extractor as load_saved

    return load_saved(path)


def load_calibration(path: Path | None, model: Path, extractor: Path | None) -> Calibration | None:
    """A calibration file for predict/serve; it needs the extractor, and a warning when it was made for another
    model."""
    if path is None:
        return None
    if extractor is None:
        raise ValueError(
            "--calibration weighs the model against a text extractor: it needs --extractor (and --candidates)"
        )
    from pv2tea.decoding.calibration import load_calibration as read_calibration
    from pv2tea.models.checkpoint import warm_start_fingerprint

    calibration = read_calibration(path)
    made_for = calibration.meta.get("model_sha256")
    if made_for and made_for != warm_start_fingerprint(model):
        console.print(
            f"[yellow]warning:[/] {escape(str(path))} was calibrated for another model "
            f"({escape(str(calibration.meta.get('model')))}); run pv2tea calibrate for {escape(str(model))}",
            highlight=False,
        )
    return calibration
