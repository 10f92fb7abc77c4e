"""ImplicitAVE import: discovery, options matching, sources, bad rows, CLI (tiny fixture in tmp_path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED
from pv2tea.cli import main
from pv2tea.data.dataset import candidate_lookup
from pv2tea.data.implicitave import (
    clean_text,
    discover_domains,
    domain_paths,
    import_implicitave,
    match_options,
    value_source,
)
from pv2tea.data.schema import DataValidationError
from pv2tea.data.validate import load_dataset

HEADER = ["id", "images", "category", "texts", "attribute_names", "attribute_values"]
# The shared folder next to the repository (conftest.SHARED); PV2TEA_SHARED points the test at another copy.
REAL_ROOT = Path(os.environ.get("PV2TEA_SHARED") or SHARED) / "datasets" / "implicitave"

# (asin, category, text, attribute, value); the first Food row states its value ("Mints").
FOOD_EVAL = [
    ("F001", "Candy", "[Title] Buttermints by Hospitality, 300 mints, 7-Ounce Bags", "Candy Variety", "Mints"),
    ("F002", "Jerky", "[Title] SnackMasters Beef Jerky, Teriyaki", "Form", "Sliced"),
    ("F003", "Candy", "[Title] Fini Wonder Mix (12pk x 3.5oz)", "Container", "Bag"),
]
FOOD_TRAIN = [
    ("F101", "Tea", "[Title] Lipton Iced Tea  48 Family Size", "Form", "Bags/Packets"),
    ("F102", "Candy", "[Title] Brach's Candy Corn [Set of 2]", "Container", "Bag"),
    ("F102", "Candy", "[Title] Brach's Candy Corn [Set of 2]", "Container", "Bag"),  # repeated row
]
FOOD_VAL = [("F201", "Candy", "[Title] Lily's Sweets Chocolate Bar", "Container", "Box")]
TOYS_EVAL = [
    ("T001", "Puzzles", '[Title] Ravensburger 12" Puzzle [Description] 500 pieces', "Theme", "Animals"),
    ("T002", "Dolls", "[Title] Barbie Dreamhouse", "Age Range", "3-5 Years"),
]
TOYS_TRAIN = [("T101", "Dolls", "[Title] Baby Alive", "Age Range", "3-5 Years")]


def _tsv(path: Path, rows: list[tuple[str, ...]], header: list[str] = HEADER, images: bool = True) -> None:
    """Write an ImplicitAVE-style TSV (pandas-style quoting of cells holding a quote)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def cell(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if '"' in value else value

    lines = ["\t".join(header)]
    for asin, category, text, attribute, value in rows:
        cells = {
            "id": asin,
            "images": f"{asin}.jpg" if images else "",
            "category": category,
            "texts": text,
            "attribute_names": attribute,
            "attribute_values": value,
        }
        lines.append("\t".join(cell(cells[name]) for name in header))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Two domains in the ImplicitAVE layout; Toys has no val.tsv, options named after the full category."""
    base = tmp_path / "implicitave"
    evaluation, training = base / "data" / "evaluation_data", base / "data" / "training_data" / "texts"
    _tsv(evaluation / "texts" / "Food_annotated_final.tsv", FOOD_EVAL)
    _tsv(evaluation / "texts" / "Toys_annotated_final.tsv", TOYS_EVAL)
    (evaluation / "images").mkdir(parents=True)
    for asin, *_ in FOOD_EVAL + TOYS_EVAL:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(evaluation / "images" / f"{asin}.jpg")
    (evaluation / "options_Food.json").write_text(
        json.dumps(
            {
                "Form": ["Sliced", "Powder"],
                "Candy Variety": ["Mints", "Taffy"],
                "Container": ["Box", "Tin"],
                "Flavor": ["Mint"],
            }
        )
    )
    (evaluation / "options_Toys_and_Games.json").write_text(
        json.dumps({"Theme": ["Animals", "Space"], "Age Range": ["3-5 Years", "6-8 Years"]})
    )
    _tsv(training / "Food" / "train.tsv", FOOD_TRAIN, images=False)
    _tsv(training / "Food" / "val.tsv", FOOD_VAL, images=False)
    _tsv(training / "Food" / "test.tsv", FOOD_EVAL)  # the evaluation file again: ignored
    _tsv(training / "Toys" / "train.tsv", TOYS_TRAIN, images=False)
    return base


def test_discovers_domains_and_writes_loadable_files(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert discover_domains(root) == ["Food", "Toys"]
    manifest = import_implicitave(root, out)

    food, toys = manifest["domains"]["Food"], manifest["domains"]["Toys"]
    assert food["rows"] == {"train_text": 3, "val_text": 1, "eval": 3}
    assert toys["rows"] == {"train_text": 1, "eval": 2}
    assert food["duplicate_ids"] == {"train_text": 1}
    assert food["sources"] == {"text": 1, "image": 2} and toys["sources"] == {"text": 0, "image": 2}
    assert food["options"]["file"] == "options_Food.json" and food["options"]["match"] == "exact name"
    assert toys["options"]["file"] == "options_Toys_and_Games.json" and toys["options"]["match"] == "name prefix"
    assert food["options"]["eval_gold_not_in_options"] == 1  # Container: Bag
    assert any("val.tsv" in note for note in toys["notes"])
    assert json.loads((out / "manifest.json").read_text()) == manifest

    paths = domain_paths(out, "Food")
    train = load_dataset(paths.train_text).records
    val = load_dataset(paths.val_text).records
    evaluation = load_dataset(paths.eval, require_label=False).records
    ids = [r.id for r in train + val]
    assert len(set(ids)) == len(ids) and ids[1:3] == ["F102-container", "F102-container-2"]
    assert all(r.images == () and len(r.label) == 1 for r in train + val)
    assert train[0].text == "Lipton Iced Tea 48 Family Size" and train[0].label == ("Bags/Packets",)
    assert train[1].text == "Brach's Candy Corn [Set of 2]"  # only section markers are stripped
    assert [r.id for r in evaluation] == ["F001-candy-variety", "F002-form", "F003-container"]
    assert [r.source for r in evaluation] == ["text", "image", "image"]
    assert all(r.label == () and len(r.gold) == 1 and Path(r.images[0]).is_file() for r in evaluation)

    toys_eval = load_dataset(domain_paths(out, "Toys").eval, require_label=False).records
    assert toys_eval[0].text == 'Ravensburger 12" Puzzle 500 pieces'  # quoting decoded, markers gone
    assert not domain_paths(out, "Toys").val_text.exists()

    candidates = json.loads(paths.candidates.read_text())
    assert candidates == {
        "Candy Variety": ["Mints", "Taffy"],
        "Container": ["Box", "Tin"],
        "Form": ["Sliced", "Powder"],
    }
    assert candidate_lookup(candidates, evaluation[1]) == ["Sliced", "Powder"]


def test_helpers() -> None:
    assert clean_text("[Title]  Red  Mug [ Description ] ceramic\n[Set of 4]") == "Red Mug ceramic [Set of 4]"
    assert value_source("Bags/Packets", "Tea, 48 bags packets") == "text"
    assert value_source("Mint", "Buttermints, 300 mints") == "image"  # whole words only
    options = {
        "options_Clothing_Shoes_and_Jewelry.json": {"Neckline": [], "Pattern": [], "Material": []},
        "options_Home.json": {"Material": [], "Season": []},
    }
    assert match_options("Clothing", ["Neckline"], options)[0] == "options_Clothing_Shoes_and_Jewelry.json"
    assert match_options("Jewelry&GA", ["Pattern", "Material"], options) == (
        "options_Clothing_Shoes_and_Jewelry.json",
        "attribute coverage 2/2",
    )
    assert match_options("Garden", ["Height"], options) == (None, "none")


def test_domain_without_options_is_noted_not_fatal(root: Path, tmp_path: Path) -> None:
    (root / "data" / "evaluation_data" / "options_Toys_and_Games.json").unlink()
    manifest = import_implicitave(root, tmp_path / "out")
    toys = manifest["domains"]["Toys"]
    assert toys["options"] == {"file": None, "match": "none"}
    assert any("no options file" in note for note in toys["notes"])
    assert not domain_paths(tmp_path / "out", "Toys").candidates.exists()


def test_missing_image_errors_then_skips_with_flag(root: Path, tmp_path: Path) -> None:
    (root / "data" / "evaluation_data" / "images" / "F002.jpg").unlink()
    with pytest.raises(DataValidationError) as info:
        import_implicitave(root, tmp_path / "a")
    message = str(info.value)
    assert "Food_annotated_final.tsv row 2, field 'images'" in message and "F002.jpg" in message
    assert not (tmp_path / "a").exists()  # nothing written

    manifest = import_implicitave(root, tmp_path / "b", skip_invalid=True)
    food = manifest["domains"]["Food"]
    assert food["rows"]["eval"] == 2 and food["n_skipped"] == 1
    skip = food["skipped"][0]
    assert skip["file"].endswith("Food_annotated_final.tsv") and (skip["row"], skip["field"]) == (2, "images")


def test_empty_value_names_file_row_field(root: Path, tmp_path: Path) -> None:
    rows = [*FOOD_TRAIN[:1], ("F103", "Tea", "[Title]  ", "Form", "Powder"), ("F104", "Tea", "Tea", "Form", "")]
    _tsv(root / "data" / "training_data" / "texts" / "Food" / "train.tsv", rows, images=False)
    with pytest.raises(DataValidationError) as info:
        import_implicitave(root, tmp_path / "a")
    assert "train.tsv row 2, field 'texts'" in str(info.value)
    assert "train.tsv row 3, field 'attribute_values'" in str(info.value)
    manifest = import_implicitave(root, tmp_path / "b", skip_invalid=True)
    assert manifest["domains"]["Food"]["rows"]["train_text"] == 1
    assert [s["field"] for s in manifest["domains"]["Food"]["skipped"]] == ["texts", "attribute_values"]


def test_missing_column_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    _tsv(
        root / "data" / "training_data" / "texts" / "Toys" / "train.tsv",
        TOYS_TRAIN,
        header=[name for name in HEADER if name != "attribute_values"],
        images=False,
    )
    for skip_invalid in (False, True):
        with pytest.raises(ValueError, match=r"Toys/train\.tsv: missing required column\(s\) 'attribute_values'"):
            import_implicitave(root, tmp_path / "out", skip_invalid=skip_invalid)


def test_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["data", "import", "implicitave", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "Food: train_text 3, val_text 1, eval 3; eval source text 1 / image 2" in printed.out
    assert (out / "manifest.json").is_file() and domain_paths(out, "Toys").eval.is_file()

    (root / "data" / "evaluation_data" / "images" / "T002.jpg").unlink()
    assert main(["data", "import", "implicitave", str(root), "--out", str(tmp_path / "bad")]) == 2
    assert "Toys_annotated_final.tsv row 2, field 'images'" in capsys.readouterr().err
    assert main(["data", "import", "implicitave", str(root), "--out", str(tmp_path / "skip"), "--skip-invalid"]) == 0
    assert "1 row(s) skipped" in capsys.readouterr().out


@pytest.mark.skipif(
    not REAL_ROOT.is_dir(), reason=f"no ImplicitAVE copy at {REAL_ROOT} (set PV2TEA_SHARED to the folder holding it)"
)
def test_real_implicitave_counts(tmp_path: Path) -> None:
    manifest = import_implicitave(REAL_ROOT, tmp_path / "out")
    domains = manifest["domains"]
    assert {"Clothing", "Food", "Home"} <= set(domains)
    expected = {"Clothing": (226, 15_132), "Food": (390, 2_893), "Home": (457, 9_292)}
    for name, (n_eval, n_train) in expected.items():
        entry = domains[name]
        assert (entry["rows"]["eval"], entry["rows"]["train_text"]) == (n_eval, n_train)
        assert entry["n_skipped"] == 0 and entry["options"]["file"] is not None
        assert sum(entry["sources"].values()) == n_eval
        records = load_dataset(
            domain_paths(tmp_path / "out", name).eval, require_label=False, check_images=False
        ).records
        assert len(records) == n_eval and all(Path(r.images[0]).is_file() for r in records)
    assert domains["Clothing"]["options"]["file"] == "options_Clothing_Shoes_and_Jewelry.json"
