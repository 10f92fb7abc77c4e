"""Training on 2 CPU processes (gloo) launched by torchrun, against one process (train/distributed.py).

One torchrun of 2 ranks runs this file as its worker (``python test_distributed.py worker ...``): a run stopped after
one optimizer step, the same run resumed to the end, the same run uninterrupted, and a run of one process resumed. Rank-local observables (each
rank's S1 queue after the first step, each rank's S3 weights) are written by spies to files. One process trains
one step with the global batch of the 2 ranks first, to compare with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
PER_RANK = 4  # train.batch_size on each of the 2 ranks; one process takes 2 x PER_RANK rows per step


def _overrides(text_ckpt: Path) -> list[str]:
    sys.path.insert(0, str(HERE.parents[1]))
    from conftest import tiny_overrides

    # no text dropout: it draws from each process's own random stream, so 2 x B rows would not be 1 x 2B rows
    return [
        *tiny_overrides(text_ckpt),
        "train.epochs=2",
        "schemes.text_dropout=0.0",
        "train.log_every_steps=1",
        "optim.warmup_steps=0",
    ]  # the first step updates the weights


def _config(text_ckpt: Path, *extra: str):
    from pv2tea.config import load_config

    return load_config("cpu", [*_overrides(text_ckpt), *extra])


def _spy(root: Path, tag: str, setattr=setattr) -> None:
    """Write this process's S1 queue after its first enqueue, and the first S3 weights it trains with."""
    from pv2tea.models.pv2tea import PV2TEA
    from pv2tea.train import distributed

    rank = int(os.environ.get("RANK", "0"))
    enqueue, broadcast = PV2TEA.enqueue, distributed.broadcast

    def spy_enqueue(model, out):
        enqueue(model, out)
        path = root / f"queue_{tag}_rank{rank}.pt"
        if not path.exists():
            q = model.queue
            torch.save({"ids": q.ids.clone(), "image": q.image.clone(), "count": int(q.count)}, path)

    def spy_broadcast(value, accelerator):
        value = broadcast(value, accelerator)
        path = root / f"s3_{tag}_rank{rank}.npy"
        if not path.exists() and isinstance(value, tuple) and value[0] is not None:
            np.save(path, value[0])
        return value

    setattr(PV2TEA, "enqueue", spy_enqueue)
    setattr(distributed, "broadcast", spy_broadcast)


RUNS = ("two", "resumed", "full", "one_to_two", "to_one")  # the run folders the torchrun trains or copies
_PATH_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "shutil.rmtree", "shutil.copytree")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(root: Path) -> list[str]:
    """Every change this process makes in the run folders under ``root``, as "event path" (an audit hook: files
    opened for writing, folders made, renamed, copied or deleted); the list grows until the process ends."""
    folders = tuple(os.path.join(str(root), name) for name in RUNS)
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            paths = [path] if writing else []
        elif event in _PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.abspath(os.fsdecode(path))
                if full.startswith(folders):
                    seen.append(f"{event} {os.path.relpath(full, root)}")

    sys.addaudithook(hook)
    return seen


def _worker(train_file: Path, root: Path, text_ckpt: Path) -> None:
    """Each rank of the torchrun: stopped after one step, resumed, and uninterrupted."""
    import torch.distributed as dist

    from pv2tea.data.validate import load_dataset
    from pv2tea.train.loop import train

    torch.set_num_threads(1)
    rows = load_dataset(train_file).records
    _spy(root, "two")
    writes = _record_writes(root)
    train(_config(text_ckpt, "train.max_steps=1"), rows, root / "two", progress=False)
    if dist.get_rank() == 0:
        for copy in ("resumed", "to_one"):
            shutil.copytree(root / "two", root / copy)
    dist.barrier()
    train(_config(text_ckpt), rows, root / "resumed", resume=True, progress=False)
    train(_config(text_ckpt), rows, root / "full", progress=False)
    train(
        _config(text_ckpt, f"train.batch_size={2 * PER_RANK}"), rows, root / "one_to_two", resume=True, progress=False
    )
    (root / f"writes_rank{dist.get_rank()}.json").write_text(json.dumps(list(writes)))


@pytest.fixture(scope="module")
def dropout_free_text_ckpt(tmp_path_factory) -> Path:
    """The tiny text model of conftest without dropout, whose masks would differ between the processes."""
    from pv2tea.models.text import save_random_text_model

    return save_random_text_model(tmp_path_factory.mktemp("tiny_bert_no_dropout"), hidden_size=32, dropout=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dropout_free_text_ckpt):
    """The 2-rank runs (one torchrun) and one process trained on the same rows with batch 2 x PER_RANK."""
    import pv2tea.train.loop as loop
    from pv2tea.data.synth import make_catalog
    from pv2tea.data.validate import load_dataset
    from pv2tea.train.loop import train

    root = tmp_path_factory.mktemp("distributed")
    catalog = make_catalog(root / "catalog", n_products=10, seed=3, image_size=32)
    rows = load_dataset(catalog["train"]).records
    mp = pytest.MonkeyPatch()
    _spy(root, "one", mp.setattr)
    build_optimizer = loop.build_optimizer

    def keep_initial(model, *args):  # the weights before the first step
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, root / "initial.pt")
        return build_optimizer(model, *args)

    mp.setattr(loop, "build_optimizer", keep_initial)
    try:
        train(
            _config(dropout_free_text_ckpt, "train.max_steps=1", f"train.batch_size={2 * PER_RANK}"),
            rows,
            root / "one",
            progress=False,
        )
    finally:
        mp.undo()
    shutil.copytree(root / "one", root / "one_to_two")  # stopped in one process, resumed by the 2 ranks
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            sys.executable,
            str(HERE),
            "worker",
            str(catalog["train"]),
            str(root),
            str(dropout_free_text_ckpt),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return root, rows


def _largest_lr(text_ckpt: Path) -> float:
    optim = _config(text_ckpt).optim
    return max(optim.lr, optim.head_lr or 0.0)


def _assert_same_weights(a: dict, b: dict, lr: float) -> None:
    """Equal within float noise. Adam's first update is lr·g/(|g| + eps): an element whose gradient is within
    rounding noise of zero (the two runs sum the same terms in another order) steps by up to lr in either
    direction, so a few such elements may differ by up to 2·lr; every other element must agree closely."""
    for name in a:
        x, y = a[name].double(), b[name].double()
        off = (x - y).abs() > 5e-5 + 1e-5 * y.abs()  # what torch.allclose(rtol=1e-5, atol=5e-5) would flag
        assert int(off.sum()) <= max(1, off.numel() // 100), (name, int(off.sum()), off.numel())
        assert float((x - y).abs().max()) <= 2 * lr, name


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_step_of_two_ranks_equals_one_process_with_both_batches(runs, dropout_free_text_ckpt):
    """Loss and every updated weight (and buffer: queues, momentum copies) after one optimizer step of 2 ranks x B
    rows equal those of one process x 2B rows."""
    root, _ = runs
    two, one = _metrics(root / "two"), _metrics(root / "one")
    assert [(m["epoch"], m["step"]) for m in two] == [(1, 1)] == [(m["epoch"], m["step"]) for m in one]
    for key in ("loss", "loss_gen", "loss_sc", "loss_ct"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-6), key
    a = load_file(str(root / "two" / "checkpoint" / "model.safetensors"))
    b = load_file(str(root / "one" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    _assert_same_weights(a, b, lr=_largest_lr(dropout_free_text_ckpt))
    initial = torch.load(root / "initial.pt")
    moved = [n for n in a if not torch.allclose(a[n], initial[n], atol=1e-4)]
    assert len(moved) > len(a) // 4  # the step changed the weights (unchanged ones would pass any comparison)
    env = json.loads((root / "two" / "environment.json").read_text())
    assert env["first"]["world_size"] == 2
    assert json.loads((root / "one" / "environment.json").read_text())["first"]["world_size"] == 1


def test_only_rank_0_writes_the_run_folders(runs):
    """Every file, folder, rename and deletion in the run folders of the torchrun is rank 0's (an audit hook in each
    rank lists them): rank 1 writes nothing there, not even a file the race would leave intact."""
    root, _ = runs
    writes = {rank: json.loads((root / f"writes_rank{rank}.json").read_text()) for rank in (0, 1)}
    assert writes[1] == [], writes[1][:10]
    for run in ("two", "resumed", "full", "one_to_two"):  # the hook sees rank 0's writes: it would see rank 1's
        done = {w.split(" ", 1)[1] for w in writes[0] if w.split(" ", 1)[1].startswith(f"{run}/")}
        assert {f"{run}/metrics.jsonl", f"{run}/config.yaml", f"{run}/train.log"} <= done, sorted(done)[:20]
        assert f"{run}/checkpoint" in done, sorted(done)[:20]  # the checkpoint folder moved in
    assert any(w.startswith("os.replace ") or w.startswith("os.rename ") for w in writes[0])
    assert any(w.endswith("/final") for w in writes[0])


def test_queues_of_both_ranks_hold_both_ranks_features(runs, dropout_free_text_ckpt):
    """After the first step each rank's S1 queue holds the momentum features of the rows of both ranks, in the
    order one process with both batches enqueues them."""
    root, rows = runs
    from pv2tea.train.loop import epoch_batches, epoch_rows

    q0, q1 = (torch.load(root / f"queue_two_rank{r}.pt") for r in (0, 1))
    single = torch.load(root / "queue_one_rank0.pt")
    cfg = _config(dropout_free_text_ckpt)
    epoch = epoch_rows(rows, cfg.train.image_less_per_epoch, cfg.train.seed, 0)
    order = [epoch[j] for b in epoch_batches(len(epoch), PER_RANK, cfg.train.seed, 0) for j in b]
    first = [rows[i] for i in order[: 2 * PER_RANK] if rows[i].images]
    rank0 = [r for r in (rows[i] for i in order[:PER_RANK]) if r.images]
    assert 0 < len(rank0) < len(first)  # both ranks had image rows
    n = int(single["count"])
    assert n == min(len(first), len({(r.images, r.text) for r in rows if r.images}))  # M is capped at the products
    assert n > len(rank0)  # more than one rank's rows
    assert int(q0["count"]) == int(q1["count"]) == n
    assert torch.equal(q0["ids"], q1["ids"]) and torch.equal(q0["ids"], single["ids"])
    assert torch.equal(q0["image"], q1["image"])
    assert torch.allclose(q0["image"], single["image"], atol=1e-6)
    assert len(set(q0["ids"][:n].tolist())) > 1


def test_s3_weights_are_the_same_on_every_rank_and_in_one_process(runs):
    root, rows = runs
    w0, w1, single = (np.load(root / name) for name in ("s3_two_rank0.npy", "s3_two_rank1.npy", "s3_one_rank0.npy"))
    assert w0.shape == w1.shape == single.shape == (len(rows),)  # over the whole training set, not a shard
    assert np.array_equal(w0, w1)
    np.testing.assert_allclose(w0, single, rtol=1e-6)
    assert np.ptp(w0) > 0.01  # S3 re-weights the rows (equal weights would pass any comparison)


def test_two_rank_run_resumes_after_being_stopped(runs):
    """Stopped after one step and resumed on 2 ranks, a run ends with the weights of the uninterrupted run."""
    root, _ = runs
    resumed, full = (load_file(str(root / run / "final" / "model.safetensors")) for run in ("resumed", "full"))
    for name in full:
        assert torch.allclose(resumed[name], full[name], rtol=1e-5, atol=1e-6), name
    metrics = _metrics(root / "resumed")
    assert metrics[0]["step"] == 1 and not metrics[0]["finished"]
    assert [m["step"] for m in metrics[1:]] == [m["step"] for m in _metrics(root / "full")]
    assert "resumed from" in (root / "resumed" / "train.log").read_text()


def test_a_one_process_run_resumes_on_two_ranks(runs):
    root, rows = runs
    run = root / "one_to_two"
    assert (
        "resuming at world size 2 a run saved at world size 1: a step now takes 16 rows instead of 8"
        in (run / "train.log").read_text()
    )
    assert "step 1 becomes step 0" in (run / "train.log").read_text()  # 8 rows: half a step of 16
    metrics = _metrics(run)
    steps_per_epoch = -(-len(rows) // (4 * PER_RANK))
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 2 * steps_per_epoch
    env = json.loads((run / "environment.json").read_text())
    assert env["first"]["world_size"] == 1 and env["resumed"][-1]["world_size"] == 2
    assert (run / "final" / "model.safetensors").is_file()


def test_a_two_rank_run_resumes_on_one_process_and_says_what_the_steps_become(runs, dropout_free_text_ckpt, capsys):
    from pv2tea.train.loop import train

    root, rows = runs
    run = root / "to_one"
    train(_config(dropout_free_text_ckpt), rows, run, resume=True, progress=False)
    message = (
        "resuming at world size 1 a run saved at world size 2: a step now takes 4 rows instead of 8, so an epoch takes"
    )
    assert message in (run / "train.log").read_text()
    assert message in capsys.readouterr().err
    metrics = _metrics(run)
    steps_per_epoch = -(-len(rows) // PER_RANK)
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 2 * steps_per_epoch  # step 1 of 8 rows became step 2
    env = json.loads((run / "environment.json").read_text())
    assert env["first"]["world_size"] == 2 and env["resumed"][-1]["world_size"] == 1
    assert (run / "final" / "model.safetensors").is_file()


def test_gradient_accumulation_of_two_micro_batches_equals_one_batch_of_both(runs, dropout_free_text_ckpt, tmp_path):
    """train.grad_accumulation_steps=2 of B rows: one optimizer step with the loss and weights of one batch of 2B
    rows (S1 off: its in-batch contrast sees one micro-batch at a time)."""
    from pv2tea.train.loop import train

    _, rows = runs
    no_s1 = ["schemes.contrastive=false", "train.max_steps=1", "schemes.visual_nr=false"]
    train(
        _config(dropout_free_text_ckpt, *no_s1, f"train.batch_size={2 * PER_RANK}"),
        rows,
        tmp_path / "batch",
        progress=False,
    )
    train(
        _config(dropout_free_text_ckpt, *no_s1, f"train.batch_size={PER_RANK}", "train.grad_accumulation_steps=2"),
        rows,
        tmp_path / "accumulated",
        progress=False,
    )
    (batch,), (accumulated,) = _metrics(tmp_path / "batch"), _metrics(tmp_path / "accumulated")
    assert accumulated["step"] == batch["step"] == 1
    for key in ("loss", "loss_gen", "loss_ct"):
        assert accumulated[key] == pytest.approx(batch[key], rel=1e-5), key
    a, b = (load_file(str(tmp_path / run / "checkpoint" / "model.safetensors")) for run in ("accumulated", "batch"))
    _assert_same_weights(a, b, lr=_largest_lr(dropout_free_text_ckpt))
    state = json.loads((tmp_path / "accumulated" / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_batch"] == 2 * PER_RANK and state["total_steps"] == 2 * -(-len(rows) // (2 * PER_RANK))


def test_bf16_mixed_precision_trains_and_fp16_needs_a_gpu(runs, dropout_free_text_ckpt, tmp_path):
    from pv2tea.train.loop import TrainingError, train

    root, rows = runs
    train(
        _config(
            dropout_free_text_ckpt,
            "train.max_steps=1",
            f"train.batch_size={2 * PER_RANK}",
            "train.mixed_precision=bf16",
        ),
        rows,
        tmp_path / "bf16",
        progress=False,
    )
    (bf16,), (fp32,) = _metrics(tmp_path / "bf16"), _metrics(root / "one")
    for key in ("loss", "loss_gen", "loss_sc", "loss_ct"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.05), key
    assert bf16["loss"] != fp32["loss"]  # computed in bfloat16, not float32
    assert (tmp_path / "bf16" / "checkpoint" / "model.safetensors").is_file()
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="fp16 needs a GPU"):
            train(
                _config(dropout_free_text_ckpt, "train.mixed_precision=fp16"), rows, tmp_path / "fp16", progress=False
            )


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
