"""The results page, generated from the result files, so a table cannot drift from its data.

``docs/results/*.json`` holds one measured run per file: its title, the command(s) that produce it, the date, the
pv2tea version and commit, the environment, its tables (columns and rows of numbers or strings) and short notes.
Each table answers one question of the page (how accurate on real data, what the image adds, what it costs, how
fast, the demo catalog); a run that answers several appears under each. A run may also name the two rows of one of
its tables that differ only by the test images (``"image"``): the page then shows what the image adds, computed
from those rows.

``python docs/hooks/results.py`` (``make results``) writes ``docs/results.md``; ``--check`` exits with 1 when the
committed page differs from the generated one. ``tests/unit/test_results_page.py`` runs the same check. Only the
standard library is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"

# (key, heading, anchor, introduction) in page order; a table's "question" is one of the keys
QUESTIONS = [
    (
        "accuracy",
        "How accurate on real data",
        "accuracy",
        "Real products with gold values, the models trained on the weak labels of a text extractor only.",
    ),
    (
        "image",
        "What the image adds",
        "what-the-image-adds",
        "The same trained models scored with and without their test images (the photo withheld at test time), per "
        "domain, and what the offline image backbones could add at best.",
    ),
    (
        "cost",
        "What it costs",
        "what-it-costs",
        "Time and memory of a run on 2 CPU cores. The [cost guide](guides/cost.md) explains what sets them.",
    ),
    (
        "speed",
        "How fast",
        "speed-and-resources",
        "Training, batch extraction, serving and S3's neighbour search, each by its `pv2tea bench` command.",
    ),
    (
        "demo",
        "Demo catalog",
        "demo-catalog",
        "The 500-product synthetic catalog of `pv2tea demo` (5 categories, a multi-value `color` and a single-value "
        "`pattern`; texts that state the value, omit it or mislead), weak labels from the text rule, the `cpu` "
        "preset, 15 epochs, scored on the gold values of the 150 test rows.",
    ),
]
QUESTION_KEYS = [q[0] for q in QUESTIONS]

# key -> the type its value must have, for a result file, its environment, its tables and its image rows
RESULT_KEYS: dict[str, type | tuple[type, ...]] = {
    "title": str,
    "question": str,
    "date": str,
    "version": str,
    "commit": (str, type(None)),
    "environment": dict,
    "command": list,
    "tables": list,
    "notes": list,
}
OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "anchor": str,
    "order": (int, float),
    "summary": list,
    "image": dict,
}
ENVIRONMENT_KEYS: dict[str, type | tuple[type, ...]] = {"cpu": str, "cores": int, "memory": str, "load": str}
TABLE_KEYS: dict[str, type | tuple[type, ...]] = {"title": str, "columns": list, "rows": list}
IMAGE_KEYS: dict[str, type | tuple[type, ...]] = {"table": str, "with": str, "without": str}
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
NUMBER = re.compile(r"^[*\s]*([+\-−]?\d[\d,]*(?:\.(\d+))?)")
MINUS = "−"


class ResultsError(ValueError):
    """A result file that cannot be rendered; the message names the file and the key."""


# ------------------------------------------------------------------------------------------------ reading


def _check_keys(where: str, data: Any, keys: dict[str, type | tuple[type, ...]], required: bool = True) -> None:
    if not isinstance(data, dict):
        raise ResultsError(f"{where}: expected an object, got {type(data).__name__}")
    for key, kind in keys.items():
        if key not in data:
            if required:
                raise ResultsError(f"{where}: missing key '{key}'")
            continue
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ResultsError(f"{where}: key '{key}' must be {names}, got {type(data[key]).__name__}")


def validate(result: dict[str, Any], name: str) -> None:
    """Raise :class:`ResultsError` naming ``name`` and the key when ``result`` is not a renderable result."""
    _check_keys(name, result, RESULT_KEYS)
    _check_keys(name, result, OPTIONAL_KEYS, required=False)
    if not DATE.match(result["date"]):
        raise ResultsError(f"{name}: key 'date' must be YYYY-MM-DD, got {result['date']!r}")
    if result["question"] not in QUESTION_KEYS:
        raise ResultsError(f"{name}: key 'question' must be one of {QUESTION_KEYS}, got {result['question']!r}")
    if not result["command"] or not all(isinstance(line, str) for line in result["command"]):
        raise ResultsError(f"{name}: key 'command' must be a non-empty list of strings")
    _check_keys(f"{name}: environment", result["environment"], ENVIRONMENT_KEYS)
    if not result["tables"]:
        raise ResultsError(f"{name}: key 'tables' must hold at least one table")
    titles = set()
    for i, table in enumerate(result["tables"]):
        where = f"{name}: tables[{i}]"
        _check_keys(where, table, TABLE_KEYS)
        titles.add(table["title"])
        if table.get("question", result["question"]) not in QUESTION_KEYS:
            raise ResultsError(f"{where}: key 'question' must be one of {QUESTION_KEYS}")
        for j, row in enumerate(table["rows"]):
            if not isinstance(row, list) or len(row) != len(table["columns"]):
                raise ResultsError(
                    f"{where} ({table['title']}): key 'rows': row {j} must be a list of {len(table['columns'])} cells"
                )
    if "image" in result:
        _check_keys(f"{name}: image", result["image"], IMAGE_KEYS)
        if result["image"]["table"] not in titles:
            raise ResultsError(f"{name}: image: key 'table' names no table: {result['image']['table']!r}")
        image_table(result, name)  # both rows must exist


# names that changed since a result file was written (old -> new): the page shows the current one, and the committed
# files stay as they were measured. Row names of the benchmark tables, then command-line flags.
RENAMED = {
    "text_pretrain": "warm_start",
    "keep_grounded": "kept_labels",
    "--text-pretrain": "--warm-start-epochs",
    "--keep-grounded": "--keep-labels",
}
_RENAMED_PATTERN = re.compile("|".join(rf"(?<![\w-]){re.escape(old)}(?![\w-])" for old in RENAMED))


def current_names(value: Any) -> Any:
    """``value`` (a result file's JSON) with every old name of :data:`RENAMED` in its strings replaced by the new."""
    if isinstance(value, str):
        return _RENAMED_PATTERN.sub(lambda m: RENAMED[m.group(0)], value)
    if isinstance(value, list):
        return [current_names(v) for v in value]
    if isinstance(value, dict):
        return {current_names(k): current_names(v) for k, v in value.items()}
    return value


def load_results(directory: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every ``*.json`` of ``directory``, validated, in page order (key ``order``, then the file name), with today's
    names for what was renamed since (:func:`current_names`)."""
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ResultsError(f"{path.name}: not valid JSON: {err}") from err
        validate(result, path.name)
        result = current_names(result)
        result["_file"] = path.name
        results.append(result)
    if not results:
        raise ResultsError(f"{directory}: no result files (*.json)")
    return sorted(results, key=lambda r: (r.get("order", 100), r["_file"]))


# ------------------------------------------------------------------------------------------------ rendering


def cell(value: Any, decimals: int = 1) -> str:
    """A table cell: strings as written, integers with thousands separators, floats with ``decimals`` digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(table: dict[str, Any]) -> list[str]:
    decimals = table.get("decimals", 1)
    lines = [f"**{table['title']}**", ""] if table["title"] else []
    lines.append("| " + " | ".join(cell(c) for c in table["columns"]) + " |")
    lines.append("| " + " | ".join("---" for _ in table["columns"]) + " |")
    lines += ["| " + " | ".join(cell(v, decimals) for v in row) + " |" for row in table["rows"]]
    lines.append("")
    if table.get("notes"):
        lines += [" ".join(table["notes"]), ""]
    return lines


def _number(value: Any, decimals: int) -> tuple[float, int] | None:
    """The leading number of a cell and its decimals ("60.4 ± 5.8" -> (60.4, 1)), or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), 0 if isinstance(value, int) else decimals
    match = NUMBER.match(str(value))
    if not match:
        return None
    return float(match.group(1).replace(",", "").replace(MINUS, "-")), len(match.group(2) or "")


def _signed(x: float, decimals: int) -> str:
    text = f"{abs(x):.{decimals}f}"
    if float(text) == 0:
        return text
    return ("+" if x > 0 else MINUS) + text


def image_table(result: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The rows of the run with and without the test images, and their difference per numeric column."""
    spec = result["image"]
    where = f"{name or result.get('_file', result['title'])}: image"
    source = next(t for t in result["tables"] if t["title"] == spec["table"])
    rows = {str(row[0]): row for row in source["rows"]}
    for key in ("with", "without"):
        if spec[key] not in rows:
            raise ResultsError(f"{where}: key '{key}' names no row of {spec['table']!r}: {spec[key]!r}")
    skip = set(spec.get("skip_columns", ["p"]))
    columns = [i for i, c in enumerate(source["columns"]) if i > 0 and c not in skip]
    decimals = source.get("decimals", 1)
    with_row, without_row = rows[spec["with"]], rows[spec["without"]]
    added = []
    for i in columns:
        a, b = _number(with_row[i], decimals), _number(without_row[i], decimals)
        added.append(_signed(a[0] - b[0], max(a[1], b[1])) if a and b else "")
    return {
        "title": spec.get("title", "With and without the test images"),
        "columns": [source["columns"][0], *(source["columns"][i] for i in columns)],
        "rows": [
            [with_row[0], *(cell(with_row[i], decimals) for i in columns)],
            [without_row[0], *(cell(without_row[i], decimals) for i in columns)],
            ["**what the image adds**", *(f"**{a}**" if a else "" for a in added)],
        ],
        "notes": spec.get("notes", []),
    }


def render_run(result: dict[str, Any]) -> list[str]:
    """Date, version, commit, environment, data file and command of a run."""
    env = result["environment"]
    commit = f"commit {result['commit']}" if result["commit"] else "commit not recorded"
    machine = f"{env['cpu']}, {env['cores']} cores, {env['memory']} RAM; {env['load']}"
    lines = [
        f"- **Run**: {result['date']}, pv2tea {result['version']}, {commit}",
        f"- **Environment**: {machine}",
    ]
    if env.get("packages"):
        lines.append(f"- **Packages**: {env['packages']}")
    lines += [f"- **Data**: [`{result['_file']}`](results/{result['_file']})", ""]
    lines += ["```bash", *result["command"], "```", ""]
    return lines


def render_section(result: dict[str, Any], question: str) -> list[str]:
    """One run's part of one question: its heading, run block, tables and (where it is the run's own) notes."""
    own = result["question"] == question
    tables = [t for t in result["tables"] if t.get("question", result["question"]) == question]
    if question == "image" and "image" in result:
        tables.insert(0, image_table(result))
    if not tables:
        return []
    # a run's own section keeps its anchor; its parts under other questions get "<anchor>-<question>"
    anchor = f" {{#{result['anchor']}{'' if own else '-' + question}}}" if result.get("anchor") else ""
    lines = [f"### {result['title']}{anchor}", ""]
    if own:
        lines += [*result.get("summary", []), ""] if result.get("summary") else []
    lines += render_run(result)
    for table in tables:
        lines += render_table(table)
    if own and result["notes"]:
        lines += [f"- {note}" for note in result["notes"]] + [""]
    return lines


def render_page(results: list[dict[str, Any]]) -> str:
    lines = [
        "<!-- Generated by docs/hooks/results.py from docs/results/*.json: edit those files, then `make results`. -->",
        "",
        "# Results",
        "",
        "The current figure for each question, with the command that produces it, the date, the pv2tea version, the "
        "commit where it was recorded and the environment. Each run's data (its tables as columns and rows) is a "
        "file in `docs/results/` of the repository (linked below each run); this page is generated from those files "
        "by `make results`. How the figures got here (what was tried, what it gave, what was decided, and the "
        "figures this page no longer shows) is in the [history](history.md).",
        "",
        "Every number comes from a 2-core x86_64 machine with 24 GiB of RAM, no GPU, offline. Trained numbers are "
        "deterministic for one environment but move with the CPU and the package releases, so each run names its "
        "own; every run writes what it ran with to `environment.json`. F1 is macro-F1 over gold values (the "
        'paper\'s metric); "p" is a paired two-sided t-test (over seeds on the demo, over folds on ImplicitAVE). '
        "Runs that shared the two cores with other jobs say so; their seconds are upper bounds.",
        "",
    ]
    lines += [f"- [{heading}](#{anchor})" for _, heading, anchor, _ in QUESTIONS]
    lines.append("")
    for key, heading, anchor, intro in QUESTIONS:
        lines += [f"## {heading} {{#{anchor}}}", "", intro, ""]
        for result in results:
            lines += render_section(result, key)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def generate(directory: Path = RESULTS_DIR) -> str:
    """The results page for the result files of ``directory``."""
    return render_page(load_results(directory))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=RESULTS_DIR, help="the folder of result files")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write or check")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the generated one")
    args = parser.parse_args(argv)
    try:
        page = generate(args.dir)
    except ResultsError as err:
        print(f"results: {err}", file=sys.stderr)
        return 2
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != page:
            print(f"results: {args.out} is not the page generated from {args.dir}: run `make results`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(page, encoding="utf-8")
    print(f"results: wrote {args.out} from {len(list(args.dir.glob('*.json')))} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
