"""Real-data benchmark: `pv2tea bench implicitave` on ../shared/datasets/implicitave (skips when absent).

    python benchmarks/implicitave.py [--quick] [extra `pv2tea bench implicitave` options...]

The dataset is research-only and never copied into the repository; results go to
benchmarks/out/implicitave (git-ignored) and are summarized by hand in docs/results.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "implicitave"
OUT = Path(__file__).resolve().parent / "out" / "implicitave"


def main(argv: list[str]) -> int:
    if not (ROOT / "data").is_dir():
        print(f"skipped: ImplicitAVE not found at {ROOT}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pv2tea.cli import main as cli

    return cli(["bench", "implicitave", str(ROOT), "--out", str(OUT), *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
