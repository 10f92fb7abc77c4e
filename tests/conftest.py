"""Shared fixtures: a tiny random BERT checkpoint folder and tiny configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronization

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_report_header(config) -> str:
    """Where the tests on real data copies look (they are skipped, naming the folder, when it is not there)."""
    shared = Path(os.environ.get("PV2TEA_SHARED") or SHARED)
    found = [d.name for d in sorted((shared / "datasets").glob("*")) if d.is_dir()]
    return f"real-data tests: {shared} (PV2TEA_SHARED): " + (
        f"datasets {', '.join(found)}" if found else "no datasets there, those tests are skipped"
    )


def make_tiny_text_checkpoint(path: Path) -> Path:
    """A 2-layer, 32-wide BERT with the MiniLM WordPiece tokenizer, saved like a HF checkpoint."""
    from pv2tea.models.text import save_random_text_model

    return save_random_text_model(path, hidden_size=32)


@pytest.fixture(scope="session")
def tiny_text_ckpt(tmp_path_factory) -> Path:
    return make_tiny_text_checkpoint(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tea_final(tmp_path_factory, tiny_text_ckpt) -> Path:
    """A tiny TEA trained on text-only rows, the warm start of the tests that start from one: its final/ folder."""
    from pv2tea.config import load_config
    from pv2tea.data.schema import Record
    from pv2tea.experiment import TEA
    from pv2tea.train.loop import train

    rows = [
        Record(f"t{i}", f"a {c} mug number {i}", (), "mug", "color", (c,)) for i, c in enumerate(["red", "blue"] * 6)
    ]
    run = tmp_path_factory.mktemp("tea_run")
    train(load_config(None, [*tiny_overrides(tiny_text_ckpt), *TEA, "train.epochs=2"]), rows, run, progress=False)
    return run / "final"


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, tiny_text_ckpt) -> tuple[Path, dict[str, Path]]:
    """A tiny model trained for one epoch on a 16-product synthetic catalog: (its final/ folder, the catalog)."""
    from pv2tea.cli import main
    from pv2tea.data.synth import make_catalog

    root = tmp_path_factory.mktemp("tiny_trained")
    catalog = make_catalog(root / "catalog", n_products=16, seed=4, image_size=48)
    overrides = [*tiny_overrides(tiny_text_ckpt), "train.epochs=1"]
    assert (
        main(
            [
                "train",
                "--train",
                str(catalog["train"]),
                "--out",
                str(root / "run"),
                "--no-progress",
                *[a for o in overrides for a in ("--set", o)],
            ]
        )
        == 0
    )
    return root / "run" / "final", catalog


def tiny_overrides(text_path: Path) -> list[str]:
    """Dotted overrides that make every part tiny and random (fast on CPU)."""
    return [
        "vision.name=test_efficientnet",
        "vision.weights=none",
        "vision.image_size=32",
        f"text.path={text_path}",
        "text.max_tokens=32",
        "fusion.num_layers=1",
        "decoder.num_layers=1",
        "decoder.max_answer_tokens=8",
        "schemes.embed_dim=16",
        "schemes.queue_size=16",
        "schemes.knn_k=3",
        "train.batch_size=4",
        "train.eval_batch_size=8",
        "train.epochs=2",
        "optim.lr=1e-3",
        "train.log_every_steps=1",
    ]


@pytest.fixture
def tiny_config(tiny_text_ckpt):
    from pv2tea.config import load_config

    return load_config(None, tiny_overrides(tiny_text_ckpt))
