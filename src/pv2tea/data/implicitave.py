"""Import the ImplicitAVE dataset into pv2tea's row format.

ImplicitAVE (Zou et al., ACL Findings 2024) holds implicit attribute values: the gold value
is (almost) never written in the product text, so it has to be read from the image. Its
layout, which the importer discovers instead of hard-coding domains or attributes::

    ROOT/data/evaluation_data/texts/<Domain>_annotated_final.tsv   gold rows with an image
    ROOT/data/evaluation_data/images/<file>.jpg
    ROOT/data/evaluation_data/options_<Something>.json             {attribute: [values]}
    ROOT/data/training_data/texts/<Domain>/{train,val}.tsv          text-only labelled rows

Every TSV has the columns id, images, category, texts, attribute_names, attribute_values,
one attribute and one value per row (``test.tsv`` repeats the evaluation file and
``train_and_val.tsv`` is train + val, so both are ignored). The files use standard CSV
quoting (a text holding ``"`` is wrapped in quotes with the quote doubled), so they are read
with pandas' default quoting, which decodes it.

Per domain the importer writes ``train_text.jsonl`` / ``val_text.jsonl`` (text-only rows with
``label``), ``eval.jsonl`` (rows with their image, ``gold`` and ``source``; no label, that
comes from a weak-label step) and ``candidates.json`` (the domain's closed value lists), plus
one ``manifest.json`` with counts, skipped rows and the options file each domain uses.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pv2tea.data.readers import write_records
from pv2tea.data.schema import DataValidationError, RowError
from pv2tea.eval.normalize import normalize_value, occurs_in

__all__ = [
    "COLUMNS",
    "TRAINING_SPLITS",
    "DomainPaths",
    "clean_text",
    "discover_domains",
    "domain_paths",
    "import_implicitave",
    "match_options",
    "read_tsv",
    "value_source",
]

# Columns every ImplicitAVE TSV must have.
COLUMNS: tuple[str, ...] = ("id", "images", "category", "texts", "attribute_names", "attribute_values")
# Training files imported, and the output split each one becomes.
TRAINING_SPLITS: dict[str, str] = {"train.tsv": "train_text", "val.tsv": "val_text"}
# Section names that open a part of a product text, e.g. "[Title] ..."; stripped from texts.
# Bracketed words that are not section names ("[Set of 4]", "[Apparel]") belong to the text.
_SECTION_NAMES = (
    "title",
    "description",
    "product description",
    "bullet",
    "bullets",
    "bullet point",
    "bullet points",
    "feature",
    "features",
    "feature bullets",
    "about this item",
    "brand",
    "category",
    "details",
    "product details",
    "specification",
    "specifications",
    "overview",
)
_SECTION_MARKER = re.compile(
    r"\[\s*(?:" + "|".join(re.escape(name).replace(r"\ ", r"\s+") for name in _SECTION_NAMES) + r")\s*\]",
    re.IGNORECASE,
)
_EVAL_SUFFIXES = ("_annotated_final", "_annotated")


@dataclass(frozen=True)
class DomainPaths:
    """The files the importer writes for one domain."""

    dir: Path  # OUT/<Domain>
    train_text: Path  # text-only training rows with labels
    val_text: Path  # text-only validation rows with labels
    eval: Path  # multimodal evaluation rows with gold and source, no label
    candidates: Path  # {attribute: [values]} from the matched options file


def domain_paths(out: Path, domain: str) -> DomainPaths:
    """Output paths of ``domain`` under the import folder ``out``."""
    folder = Path(out) / domain
    return DomainPaths(
        dir=folder,
        train_text=folder / "train_text.jsonl",
        val_text=folder / "val_text.jsonl",
        eval=folder / "eval.jsonl",
        candidates=folder / "candidates.json",
    )


def _eval_dir(root: Path) -> Path:
    return Path(root) / "data" / "evaluation_data"


def _training_dir(root: Path) -> Path:
    return Path(root) / "data" / "training_data" / "texts"


def _eval_domain(file: Path) -> str:
    """Domain name of an evaluation TSV: its stem without ``_annotated_final``."""
    stem = file.stem
    for suffix in _EVAL_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _eval_files(root: Path) -> dict[str, Path]:
    folder = _eval_dir(root) / "texts"
    files = sorted(folder.glob("*.tsv")) if folder.is_dir() else []
    return {_eval_domain(file): file for file in files}


def _training_folders(root: Path) -> dict[str, Path]:
    folder = _training_dir(root)
    if not folder.is_dir():
        return {}
    return {
        sub.name: sub
        for sub in sorted(folder.iterdir())
        if sub.is_dir() and any((sub / name).is_file() for name in TRAINING_SPLITS)
    }


def discover_domains(root: Path) -> list[str]:
    """Domains with an evaluation file or a training folder (train.tsv / val.tsv), sorted.

    A training folder whose name equals an evaluation domain up to case joins that domain.

    Raises:
        FileNotFoundError: if ``root`` holds neither ``data/evaluation_data/texts`` nor
            ``data/training_data/texts`` with any domain.
    """
    domains = list(_eval_files(root))
    known = {name.casefold() for name in domains}
    domains += [name for name in _training_folders(root) if name.casefold() not in known]
    if not domains:
        raise FileNotFoundError(
            f"no ImplicitAVE domains under '{root}': expected data/evaluation_data/texts/<Domain>_annotated_final.tsv "
            "or data/training_data/texts/<Domain>/train.tsv"
        )
    return sorted(domains, key=str.casefold)


def clean_text(text: str) -> str:
    """Product text without section markers (``[Title]``, ``[Description]``, ...), whitespace collapsed."""
    return " ".join(_SECTION_MARKER.sub(" ", text).split())


def value_source(value: str, text: str) -> str:
    """``"text"`` if the normalized value occurs as whole words in the normalized text, else ``"image"``."""
    return "text" if occurs_in(value, text) else "image"


def read_tsv(path: Path) -> pd.DataFrame:
    """Read one ImplicitAVE TSV as strings (empty cells stay ``""``), checking its columns.

    Raises:
        ValueError: naming the file, if it cannot be parsed or lacks a required column.
    """
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable TSV file ({exc})") from exc
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    return frame


def _slug(value: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", value.casefold()).strip("-") or "attr"


class _Ids:
    """Unique row ids ``<asin>-<attribute slug>``; a repeat gets ``-2``, ``-3``, ... and is counted."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.duplicates = 0

    def make(self, product: str, attribute: str) -> str:
        base = f"{product}-{_slug(attribute)}"
        row_id, counter = base, 1
        while row_id in self.seen:
            counter += 1
            row_id = f"{base}-{counter}"
        self.duplicates += counter > 1
        self.seen.add(row_id)
        return row_id


@dataclass
class _Split:
    """The converted rows of one input file, plus what was wrong with the rest."""

    source: Path  # the TSV read
    rows: list[dict[str, Any]] = field(default_factory=list)  # rows ready for write_records
    errors: list[RowError] = field(default_factory=list)  # first problem of each bad row
    n_input: int = 0  # data rows in the TSV
    duplicates: int = 0  # rows whose <asin>-<attribute> id was taken and got a counter
    spanning: int = 0  # rows with a tab or newline inside a cell: a sign of unbalanced quotes


def _convert(path: Path, ids: _Ids, image_dir: Path | None, image_exists: dict[Path, bool]) -> _Split:
    """Convert one TSV; with ``image_dir`` rows are evaluation rows (image, gold, source)."""
    frame = read_tsv(path)
    split = _Split(source=path, n_input=len(frame))
    taken = ids.duplicates
    required = ["id", "category", "texts", "attribute_names", "attribute_values"]
    if image_dir is not None:
        required.insert(1, "images")
    for row, cells in enumerate(frame.to_dict("records"), start=1):
        values = {name: str(cells[name]).strip() for name in COLUMNS}
        split.spanning += any("\t" in v or "\n" in v for v in values.values())
        values["texts"] = clean_text(values["texts"])
        empty = next((name for name in required if not values[name]), None)
        if empty is not None:
            split.errors.append(RowError(str(path), row, empty, f"'{empty}' is empty"))
            continue
        value = values["attribute_values"]
        record: dict[str, Any] = {
            "text": values["texts"],
            "images": [],
            "category": values["category"],
            "attribute": values["attribute_names"],
        }
        if image_dir is None:
            record["label"] = [value]
        else:
            image = (image_dir / values["images"]).resolve()
            if image not in image_exists:
                image_exists[image] = image.is_file()
            if not image_exists[image]:
                split.errors.append(RowError(str(path), row, "images", f"image file not found: '{image}'"))
                continue
            record.update(images=[str(image)], gold=[value], source=value_source(value, record["text"]))
        record["id"] = ids.make(values["id"], values["attribute_names"])
        split.rows.append(record)
    split.duplicates = ids.duplicates - taken
    return split


def _read_options(path: Path) -> dict[str, list[str]]:
    """An options file ``{attribute: [values]}``; ValueError naming the file when malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON options file ({exc})") from exc
    valid = isinstance(data, dict) and all(
        isinstance(values, list) and all(isinstance(v, str) for v in values) for values in data.values()
    )
    if not valid:
        raise ValueError(f"{path}: expected a JSON object mapping each attribute to a list of value strings")
    return data


def match_options(
    domain: str, attributes: Iterable[str], options: Mapping[str, Mapping[str, list[str]]]
) -> tuple[str | None, str]:
    """The options file (name) of ``domain`` and how it was chosen.

    ``options`` maps file names (``options_Food.json``) to their content. Tried in order:
    the exact name ``options_<domain>.json``; a stem starting with ``options_<domain>_``
    (case-insensitive; ``Clothing`` -> ``options_Clothing_Shoes_and_Jewelry.json``); the
    file whose keys cover most of the domain's attributes (ties: fewer extra keys, then
    name). Returns ``(None, "none")`` when no file shares an attribute with the domain.
    """
    wanted = f"options_{domain}".casefold()
    stems = {name: Path(name).stem.casefold() for name in sorted(options)}
    exact = [name for name, stem in stems.items() if stem == wanted]
    if exact:
        return exact[0], "exact name"
    prefixed = [name for name, stem in stems.items() if stem.startswith(wanted + "_")]
    if prefixed:
        return min(prefixed, key=len), "name prefix"
    keys = {attribute.casefold() for attribute in attributes}
    best: tuple[int, int, str] | None = None
    for name in sorted(options):
        have = {key.casefold() for key in options[name]}
        covered = len(keys & have)
        if covered and (best is None or (-covered, len(have - keys), name) < best):
            best = (-covered, len(have - keys), name)
    if best is None:
        return None, "none"
    return best[2], f"attribute coverage {-best[0]}/{len(keys)}"


def _restrict(options: Mapping[str, list[str]], attributes: Iterable[str]) -> dict[str, list[str]]:
    """Option lists of the domain's attributes (keys matched case-insensitively), as given."""
    by_key = {key.casefold(): values for key, values in options.items()}
    return {a: list(by_key[a.casefold()]) for a in sorted(attributes) if a.casefold() in by_key}


def _outside_options(rows: list[dict[str, Any]], key: str, allowed: Mapping[str, set[str]]) -> list[str]:
    """``"attribute: value"`` of each row whose ``key`` value is not among its attribute's options."""
    return [
        f"{r['attribute']}: {r[key][0]}"
        for r in rows
        if normalize_value(r[key][0]) not in allowed.get(r["attribute"], set())
    ]


def _skip_entry(error: RowError) -> dict[str, Any]:
    return {"file": error.file, "row": error.row, "field": error.field, "reason": error.message}


def _import_domain(
    root: Path, eval_file: Path | None, train_dir: Path | None, image_exists: dict[Path, bool]
) -> tuple[dict[str, _Split], list[str]]:
    """Convert every input file of one domain; returns the splits and notes for the manifest."""
    splits: dict[str, _Split] = {}
    notes: list[str] = []
    train_ids = _Ids()  # shared by train and val, so their ids never collide
    if train_dir is None:
        notes.append("no training folder: only the evaluation rows are imported")
    else:
        for name, split in TRAINING_SPLITS.items():
            if (train_dir / name).is_file():
                splits[split] = _convert(train_dir / name, train_ids, None, image_exists)
            else:
                notes.append(f"no {name} in {train_dir}: {split} not written")
    if eval_file is None:
        notes.append("no evaluation file: only the text-only training rows are imported")
    else:
        image_dir = _eval_dir(root) / "images"
        splits["eval"] = _convert(eval_file, _Ids(), image_dir, image_exists)
    return splits, notes


def import_implicitave(root: Path, out: Path, skip_invalid: bool = False) -> dict:
    """Import every ImplicitAVE domain under ``root`` into ``out``; returns the manifest.

    Writes ``out/<Domain>/{train_text,val_text,eval}.jsonl`` and ``candidates.json`` (see
    :func:`domain_paths`) and ``out/manifest.json``. Nothing is written if a row is invalid
    (an empty id, images, category, text, attribute or value, or a missing image) and
    ``skip_invalid`` is False; with ``skip_invalid`` such rows are skipped and listed in the
    manifest with file, row (1-based, header excluded) and field.

    Raises:
        DataValidationError: listing every invalid row of every file, unless ``skip_invalid``.
        ValueError: naming the file, for an unreadable TSV / options file or a missing column.
        FileNotFoundError: if ``root`` holds no domain.
    """
    root, out = Path(root), Path(out)
    eval_files = _eval_files(root)
    train_folders = {name.casefold(): folder for name, folder in _training_folders(root).items()}
    options_files = {p.name: _read_options(p) for p in sorted(_eval_dir(root).glob("options_*.json"))}
    image_exists: dict[Path, bool] = {}

    converted: dict[str, tuple[dict[str, _Split], list[str]]] = {}
    for domain in discover_domains(root):
        converted[domain] = _import_domain(
            root, eval_files.get(domain), train_folders.get(domain.casefold()), image_exists
        )
    errors = [e for splits, _ in converted.values() for split in splits.values() for e in split.errors]
    if errors and not skip_invalid:
        raise DataValidationError(errors)

    manifest: dict[str, Any] = {
        "root": str(root.resolve()),
        "out": str(out.resolve()),
        "skip_invalid": skip_invalid,
        "options_files": sorted(options_files),
        "domains": {},
    }
    for domain, (splits, notes) in converted.items():
        manifest["domains"][domain] = _write_domain(out, domain, splits, notes, options_files)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _write_domain(
    out: Path, domain: str, splits: dict[str, _Split], notes: list[str], options_files: Mapping[str, dict]
) -> dict[str, Any]:
    """Write one domain's files; returns its manifest entry."""
    paths = domain_paths(out, domain)
    entry: dict[str, Any] = {"files": {}, "input_files": {}, "rows": {}, "input_rows": {}, "attributes": {}}
    for split, converted in splits.items():
        path = getattr(paths, split)
        write_records(converted.rows, path)
        entry["files"][split] = path.relative_to(out).as_posix()
        entry["input_files"][split] = str(converted.source)
        entry["rows"][split] = len(converted.rows)
        entry["input_rows"][split] = converted.n_input
        entry["attributes"][split] = dict(sorted(Counter(r["attribute"] for r in converted.rows).items()))
    eval_rows = splits["eval"].rows if "eval" in splits else []
    entry["sources"] = {s: sum(r["source"] == s for r in eval_rows) for s in ("text", "image")}
    entry["duplicate_ids"] = {split: c.duplicates for split, c in splits.items() if c.duplicates}
    notes += [
        f"{c.spanning} row(s) of {c.source} hold a tab or newline inside a cell (unbalanced quotes?)"
        for c in splits.values()
        if c.spanning
    ]
    skipped = [_skip_entry(e) for c in splits.values() for e in c.errors]
    entry["n_skipped"] = len(skipped)
    entry["skipped"] = skipped

    attributes = {r["attribute"] for c in splits.values() for r in c.rows}
    name, how = match_options(domain, attributes, options_files)
    options: dict[str, Any] = {"file": name, "match": how}
    if name is None:
        notes.append("no options file shares an attribute with this domain: no candidates.json written")
    else:
        candidates = _restrict(options_files[name], attributes)
        paths.candidates.parent.mkdir(parents=True, exist_ok=True)
        paths.candidates.write_text(json.dumps(candidates, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        entry["files"]["candidates"] = paths.candidates.relative_to(out).as_posix()
        allowed = {a: {normalize_value(v) for v in values} for a, values in candidates.items()}
        train_rows = [r for split in TRAINING_SPLITS.values() if split in splits for r in splits[split].rows]
        eval_outside = _outside_options(eval_rows, "gold", allowed)
        train_outside = _outside_options(train_rows, "label", allowed)
        options.update(
            attributes_without_options=sorted(attributes - set(candidates)),
            eval_gold_not_in_options=len(eval_outside),
            eval_gold_not_in_options_examples=sorted(set(eval_outside))[:10],
            training_labels_not_in_options=len(train_outside),
            training_labels_not_in_options_examples=sorted(set(train_outside))[:10],
        )
    entry["options"] = options
    entry["notes"] = notes
    for split in ("train_text", "val_text", "eval", "candidates"):
        if split not in entry["files"]:  # a file left by an earlier import would be stale
            getattr(paths, split).unlink(missing_ok=True)
    return entry
