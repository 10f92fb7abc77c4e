"""Training killed with SIGKILL and resumed with ``--resume`` ends where an uninterrupted run ends.

A real ``pv2tea train`` subprocess (tiny random model, checkpoints every 3 steps and at every epoch end) is killed
three times: at a random moment after the first epoch's checkpoint (a seeded random step and delay, so that every
resume starts past epoch 0), inside a checkpoint save while the new folder is complete under its temporary name, and
inside a save between moving the previous folder aside and moving the new one in. The last two are reached deterministically with the test-only pause of the checkpoint writer
(``PV2TEA_TEST_PAUSE_IN_SAVE``, off unless set). After each kill the run is resumed; the last resume runs to the end.
Its final weights, per-epoch metrics and validation report equal the uninterrupted run's, each resume started from
the last complete checkpoint (never from the folder the kill tore), and nothing temporary is left behind. A checkpoint
truncated on disk is refused with a message naming the file; a stray temporary folder beside a complete checkpoint
is ignored.

The seed of the random kill is ``PV2TEA_KILL_SEED`` (default below); every assertion message names it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from pv2tea.cli import main
from pv2tea.data.synth import make_catalog

SEED = int(os.environ.get("PV2TEA_KILL_SEED", "20261203"))
NOTE = f"PV2TEA_KILL_SEED={SEED}"
PAUSE_ENV = "PV2TEA_TEST_PAUSE_IN_SAVE"  # "<point>:<seconds>", read by the checkpoint writer
EPOCHS, STEPS_PER_EPOCH = 3, 4  # 16 training rows, 4 a step
TIMEOUT = 600.0  # seconds to wait for a training process to reach a point (the machine may be loaded)
STEP_LINE = re.compile(r" INFO epoch \d+ step (\d+) ")
RESUMED_LINE = re.compile(r"resumed from \S+ at epoch (\d+) step (\d+)")


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _overrides(text_ckpt: Path) -> list[str]:
    return [
        *tiny_overrides(text_ckpt),
        f"train.epochs={EPOCHS}",
        "train.save_every_steps=3",  # mid-epoch saves, and two saves at step 12 (mid-epoch, then epoch end)
        "train.threads=1",
    ]


def _args(catalog: dict[str, Path], out: Path, *extra: str) -> list[str]:
    train = ["--train", str(catalog["train"]), "--val", str(catalog["val"])]
    return ["train", *train, "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict[str, Path]:
    return make_catalog(tmp_path_factory.mktemp("kill_catalog"), n_products=12, seed=2, image_size=48)


def _start(args: list[str], log: Path, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop(PAUSE_ENV, None)
    if pause is not None:
        env[PAUSE_ENV] = pause
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pv2tea.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what}: training ended (exit {proc.returncode}) before the kill ({NOTE}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not reached in {TIMEOUT:.0f} s ({NOTE})")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen, what: str, log: Path) -> None:
    if proc.poll() is not None:
        pytest.fail(f"{what}: training ended (exit {proc.returncode}) before the kill ({NOTE}):\n{log.read_text()}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, NOTE


def _logged_step(run: Path) -> int:
    """The last optimizer step train.log reports (0 before the first)."""
    path = run / "train.log"
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(path.read_text())] if path.is_file() else []
    return steps[-1] if steps else 0


def _position(folder: Path) -> tuple[int, int] | None:
    """(epoch, step) of a checkpoint folder's training state; None when it has none."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    return state["epoch"], state["step"]


def _saved_epochs(run: Path) -> int:
    """Epochs finished in the run's checkpoint (0 before there is one, or while a save swaps it)."""
    try:
        position = _position(run / "checkpoint")
    except (OSError, ValueError):  # moved aside or being replaced while read
        return 0
    return 0 if position is None else position[0]


def _paused_in(run: Path, pid: int) -> Path | None:
    """The temporary folder process ``pid`` completed and has not moved in yet (its manifest is its last file)."""
    for folder in run.glob(f"*.tmp-{pid}"):
        try:
            json.loads((folder / "manifest.json").read_text())["files"]
        except (OSError, ValueError, KeyError):
            continue  # not written yet, or being written
        return folder
    return None


def _last_start(run: Path, log_from: int) -> tuple[int, int] | str:
    """Where the training process that started after byte ``log_from`` of train.log started: (epoch, step) it
    resumed from, or "beginning"."""
    text = (run / "train.log").read_text()[log_from:]
    found = RESUMED_LINE.search(text)
    if found:
        return int(found.group(1)), int(found.group(2))
    assert "from the beginning" in text, f"no resume line in train.log ({NOTE}):\n{text}"
    return "beginning"


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock seconds."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in lines]


@pytest.fixture(scope="module")
def runs(catalog, tiny_text_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run (in this process) and the killed and resumed one (subprocesses)."""
    root = tmp_path_factory.mktemp("kill_resume")
    overrides = _overrides(tiny_text_ckpt)
    reference, run = root / "reference", root / "killed"
    assert main(_args(catalog, reference, *_sets(overrides))) == 0
    rng = random.Random(SEED)
    total = EPOCHS * STEPS_PER_EPOCH

    # 1. a random moment past the first epoch's checkpoint, so that every resume below starts after epoch 0 (a kill
    # before it resumed from the beginning or inside epoch 0, where resetting the epoch on resume went unnoticed):
    # once a random step of epoch 2 or later has been logged and the end of epoch 1 is saved, a random delay (at
    # least 2 steps, an evaluation and the final save are still to come)
    target, delay = rng.randrange(STEPS_PER_EPOCH, total - 2), rng.uniform(0.0, 0.3)
    log = root / "out1.txt"
    proc = _start(_args(catalog, run, *_sets(overrides)), log)
    _wait_for(proc, lambda: _logged_step(run) >= target and _saved_epochs(run) >= 1, "random kill", log)
    time.sleep(delay)
    _kill(proc, f"random kill after step {target} + {delay:.3f} s", log)

    # 2. inside a save: the new folder complete under its temporary name, not moved in
    log, log_from = root / "out2.txt", (run / "train.log").stat().st_size
    # the complete checkpoint; the previous one when the kill fell between a save's renames (it is moved back)
    complete = _position(run / "checkpoint") or _position(run / "checkpoint.old")
    assert complete is not None and complete[0] >= 1, f"the random kill left {complete}, before epoch 1's end ({NOTE})"
    proc = _start(_args(catalog, run, "--resume"), log, pause="written:120")
    _wait_for(proc, lambda: _paused_in(run, proc.pid) is not None, "kill with the new folder unrenamed", log)
    torn = _position(_paused_in(run, proc.pid))
    _kill(proc, "kill with the new folder unrenamed", log)
    started = _last_start(run, log_from)
    assert started == (complete or "beginning"), (
        f"resumed from {started}, the complete checkpoint is {complete} ({NOTE})"
    )
    assert torn is None or torn != complete, NOTE  # the folder the kill left is a newer state, which was not loaded

    # 3. inside a save, between the renames: the previous folder moved aside, the new one not moved in
    log, log_from = root / "out3.txt", (run / "train.log").stat().st_size
    complete = _position(run / "checkpoint")
    proc = _start(_args(catalog, run, "--resume"), log, pause="swapped:120")
    _wait_for(proc, lambda: (run / "checkpoint.old").is_dir(), "kill between the renames", log)
    assert not (run / "checkpoint").exists(), NOTE
    aside = _position(run / "checkpoint.old")
    _kill(proc, "kill between the renames", log)
    started = _last_start(run, log_from)
    assert started == (complete or "beginning"), (
        f"resumed from {started}, the complete checkpoint is {complete} ({NOTE})"
    )

    # 4. to the end
    log, log_from = root / "out4.txt", (run / "train.log").stat().st_size
    proc = _start(_args(catalog, run, "--resume"), log)
    assert proc.wait(timeout=TIMEOUT) == 0, f"{NOTE}:\n{log.read_text()}"
    assert _last_start(run, log_from) == aside, f"the folder moved aside holds {aside} ({NOTE})"
    return {"reference": reference, "killed": run}


def test_killed_and_resumed_run_ends_like_the_uninterrupted_one(runs):
    reference, killed = runs["reference"], runs["killed"]
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys(), NOTE
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[:5]} ({NOTE})"
    expected = _metrics(reference)
    assert [(m["epoch"], m["step"], m["finished"]) for m in expected] == [
        (e + 1, (e + 1) * STEPS_PER_EPOCH, True) for e in range(EPOCHS)
    ]
    assert _metrics(killed) == expected, NOTE
    assert json.loads((killed / "val_report.json").read_text()) == json.loads(
        (reference / "val_report.json").read_text()
    ), NOTE
    leftovers = sorted(p.name for p in killed.iterdir() if ".tmp-" in p.name or p.name.endswith(".old"))
    assert not leftovers, f"{leftovers} ({NOTE})"


def test_a_torn_checkpoint_is_refused_and_a_stray_temporary_folder_ignored(runs, catalog, tmp_path, capsys):
    source = runs["killed"]
    for name in ("optimizer.safetensors", "model.safetensors", "trainer_state.json"):
        run = tmp_path / name
        shutil.copytree(source, run)
        path = run / "checkpoint" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn mid-write
        capsys.readouterr()
        assert main(_args(catalog, run, "--resume")) == 2, name
        err = capsys.readouterr().err
        assert str(path) in err and "truncated" in err, err

    run = tmp_path / "stray"
    shutil.copytree(source, run)
    stray = run / "checkpoint.tmp-999999"
    shutil.copytree(run / "checkpoint", stray)
    (stray / "model.safetensors").write_bytes(b"torn")
    final = load_file(str(run / "final" / "model.safetensors"))
    assert main(_args(catalog, run, "--resume")) == 0
    assert "resumed from" in (run / "train.log").read_text()
    again = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
