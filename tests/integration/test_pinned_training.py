"""The training loop pinned by observables a stub cannot fake (issue 24): what a resumed run loads and runs, S3's
weights in the loss, gradient clipping, periodic checkpoints, the non-finite-loss stop and the S1 queue after
training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pv2tea.train.loop as loop
from conftest import tiny_overrides
from pv2tea.cli import main
from pv2tea.config import load_config
from pv2tea.data.schema import Record
from pv2tea.data.synth import make_catalog
from pv2tea.data.validate import load_dataset
from pv2tea.models import checkpoint as ckpt
from pv2tea.models.build import build_for_training
from pv2tea.models.pv2tea import PV2TEA


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict[str, Path]:
    return make_catalog(tmp_path_factory.mktemp("pinned_catalog"), n_products=12, seed=2, image_size=48)


@pytest.fixture(scope="module")
def rows(catalog):
    return load_dataset(catalog["train"]).records


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def no_preset(tmp_path_factory) -> str:
    """A config file that keeps every default (the CLI's own default is the slower cpu preset)."""
    path = tmp_path_factory.mktemp("config") / "defaults.yaml"
    path.write_text("train: {seed: 0}\n")
    return str(path)


def _train_cli(catalog, out: Path, overrides: list[str], *flags: str) -> int:
    return main(
        ["train", "--train", str(catalog["train"]), "--out", str(out), "--no-progress", *_sets(overrides), *flags]
    )


class _ForwardSpy:
    """Wraps PV2TEA.forward: every training forward's batch rows, the weights it was given and its output."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[list[int], torch.Tensor | None, object]] = []
        original = PV2TEA.forward

        def forward(model, batch, sample_weights=None):
            out = original(model, batch, sample_weights)
            self.calls.append((batch.index.tolist(), sample_weights, out))
            return out

        monkeypatch.setattr(PV2TEA, "forward", forward)


def test_resume_continues_where_the_run_stopped(catalog, rows, tiny_text_ckpt, no_preset, tmp_path, monkeypatch):
    """A resumed run loads the step, the optimizer's and the scheduler's state, runs only the remaining steps from
    the stopped batch on, keeps the checkpointed S3 weights, and appends to metrics.jsonl."""
    overrides = tiny_overrides(tiny_text_ckpt) + ["train.epochs=2"]
    run = tmp_path / "run"
    assert _train_cli(catalog, run, overrides + ["train.max_steps=2"], "--config", no_preset) == 0
    steps_per_epoch = math.ceil(len(rows) / 4)
    assert steps_per_epoch > 2
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"], m["finished"]) for m in first] == [(1, 2, False)]
    saved_weights = load_file(str(run / "checkpoint" / ckpt.OPTIM_FILE))["sample_weights"].numpy()

    spy = _ForwardSpy(monkeypatch)
    built = {}
    build_optimizer = loop.build_optimizer

    def capture(model, cfg, total_steps):
        built["optimizer"], built["scheduler"] = build_optimizer(model, cfg, total_steps)
        return built["optimizer"], built["scheduler"]

    at_first_step = {}
    step = torch.optim.AdamW.step

    def record_step(optimizer, *args, **kwargs):
        if not at_first_step:  # the state the resumed run's first update starts from
            steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
            at_first_step.update(adam_steps=steps, scheduler=built["scheduler"].last_epoch)
        return step(optimizer, *args, **kwargs)

    weights_computed = []
    sample_weights = loop.sample_weights

    def count_weights(model, pre, records, epoch, cfg, *args, **kwargs):
        weights_computed.append(epoch)
        return sample_weights(model, pre, records, epoch, cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "build_optimizer", capture)
    monkeypatch.setattr(torch.optim.AdamW, "step", record_step)
    monkeypatch.setattr(loop, "sample_weights", count_weights)
    assert _train_cli(catalog, run, ["train.max_steps=null"], "--resume") == 0

    assert len(spy.calls) == 2 * steps_per_epoch - 2  # only the remaining steps
    seed = load_config(None, overrides).train.seed
    order = loop.epoch_batches(len(rows), 4, seed, 0)
    assert [c[0] for c in spy.calls[: steps_per_epoch - 2]] == order[2:]  # epoch 1 from its third batch on
    assert at_first_step == {"adam_steps": {2.0}, "scheduler": 2}  # optimizer and schedule loaded, not fresh
    assert weights_computed == [1]  # epoch 1's S3 weights come from the checkpoint, epoch 2's are computed
    first_call_rows, first_weights, _ = spy.calls[0]
    assert torch.allclose(first_weights, torch.as_tensor(saved_weights[first_call_rows], dtype=torch.float32))
    log = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoint'} at epoch 0 step 2" in log
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0] == first[0]  # appended, not rewritten
    assert [(m["epoch"], m["step"], m["finished"]) for m in metrics] == [
        (1, 2, False),
        (1, steps_per_epoch, True),
        (2, 2 * steps_per_epoch, True),
    ]
    assert (run / "final" / ckpt.MODEL_FILE).is_file()


def _coloured_images(folder: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = folder / f"s3_{i}.png"
        Image.new("RGB", (32, 32), (20 * i, 100, 200 - 20 * i)).save(path)
        paths.append(str(path))
    return paths


# hand-made S3 case: (category, label, feature); None: no image
S3_ROWS = {
    "color": [
        ("mug", ("red",), (1.0, 0.0, 0.0)),
        ("mug", ("red",), (0.9, 0.2, 0.0)),
        ("mug", ("red",), (0.9, 0.0, 0.3)),
        ("mug", ("blue",), (0.8, 0.5, 0.0)),  # a blue label among red-looking mugs
        ("shirt", ("blue",), (0.0, 1.0, 0.1)),
        ("shirt", ("blue", "white"), (0.1, 0.9, 0.0)),
        ("shirt", ("red",), (0.0, 0.3, 1.0)),
        ("mug", ("red",), None),
    ],
    "pattern": [
        ("mug", ("solid",), (0.3, 0.3, 1.0)),
        ("mug", ("solid",), (0.2, 0.4, 1.0)),
        ("shirt", ("striped",), (1.0, 0.2, 0.1)),
        ("shirt", ("solid",), (0.9, 0.1, 0.3)),
    ],
}


def _independent_s3(k: int) -> np.ndarray:
    """Eq. 12 with Jaccard label overlap, κ against the same-category chance level mapped to (1 + κ)/2, rescaled
    to mean 1 over the rows with an image (rows without one: 1)."""
    weights = []
    for spec in S3_ROWS.values():
        judged = [(c, set(lbl), np.array(f) / np.linalg.norm(f)) for c, lbl, f in spec if f is not None]
        jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
        for i, (cat, lbl, f) in enumerate(judged):
            sims = sorted(((float(f @ g), j) for j, (_, _, g) in enumerate(judged) if j != i), reverse=True)
            assert sims[k - 1][0] > sims[k][0] + 1e-6  # no tie at the K-th neighbour
            s_v = sum(jac(lbl, judged[j][1]) for _, j in sims[:k]) / k
            same = [jac(lbl, other) for j, (c, other, _) in enumerate(judged) if j != i and c == cat]
            e = sum(same) / len(same)
            kappa = (s_v - e) / (1 - e) if 1 - e > 1e-9 else 1.0
            weights.append((1 + min(max(kappa, -1.0), 1.0)) / 2)
        weights += [None] * sum(f is None for _, _, f in spec)
    judged_mean = np.mean([w for w in weights if w is not None])
    return np.array([1.0 if w is None else w / judged_mean for w in weights])


def test_s3_default_knn_path_equals_an_independent_computation(tiny_text_ckpt, tmp_path):
    """sample_weights with the default S3 settings (backbone features → per-attribute KNN with label overlap →
    same-category chance correction → mean 1) on hand-made features, against a from-scratch computation."""
    cfg = load_config(None, tiny_overrides(tiny_text_ckpt) + ["schemes.knn_k=2"])
    assert (
        cfg.schemes.nr_features,
        cfg.schemes.nr_visual,
        cfg.schemes.nr_label_match,
        cfg.schemes.nr_chance,
        cfg.schemes.normalize_within,
    ) == ("backbone", "knn", "overlap", "soft", "all")
    n_images = sum(f is not None for spec in S3_ROWS.values() for _, _, f in spec)
    paths = iter(_coloured_images(tmp_path, n_images))
    records, features = [], []
    for attribute, spec in S3_ROWS.items():
        for i, (category, label, feature) in enumerate(spec):
            records.append(
                Record(f"{attribute}{i}", "a product", (next(paths),) if feature else (), category, attribute, label)
            )
            if feature is not None:
                features.append(feature)
    torch.manual_seed(0)
    model, pre = build_for_training(cfg, ["mug", "shirt"])
    served = []

    def hand_made(images=None, feats=None):  # the features of the image rows, in the order they are asked for
        start = len(served)
        served.extend(range(start, start + len(images)))
        return torch.tensor(features[start : start + len(images)])

    model.backbone_features = hand_made
    weights, stats = loop.sample_weights(model, pre, records, epoch=0, cfg=cfg)
    assert len(served) == n_images
    expected = _independent_s3(k=2)
    assert weights.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert weights[3] < weights[0]  # the blue label among red-looking mugs is trusted less
    assert weights[7] == 1.0  # no image: no evidence


def test_non_finite_loss_stops_training_with_a_clear_error(
    catalog, tiny_text_ckpt, no_preset, tmp_path, monkeypatch, capsys
):
    import pv2tea.models.pv2tea as pv2tea_model

    calls = []
    ce = pv2tea_model.per_sample_token_ce

    def nan_on_second(logits, labels, label_smoothing=0.0):
        calls.append(1)
        out = ce(logits, labels, label_smoothing)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(pv2tea_model, "per_sample_token_ce", nan_on_second)
    run = tmp_path / "run"
    assert _train_cli(catalog, run, tiny_overrides(tiny_text_ckpt) + ["train.epochs=1"], "--config", no_preset) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "non-finite loss at epoch 1 step 1" in err and "'loss_gen': nan" in err
    assert not (run / "final").exists()


CLIP = 0.05


EPOCHS = 2  # S3's weights are recomputed every epoch: the later epochs must use their own


def _epoch_weights(n: int, epoch: int) -> np.ndarray:
    """Known S3 weights, different in every epoch (a stand-in for sample_weights)."""
    return np.roll(np.linspace(0.2, 1.8, n), 3 * epoch)


@pytest.fixture(scope="module")
def observed_run(rows, tiny_text_ckpt, tmp_path_factory) -> dict:
    """Two epochs with known S3 weights (other ones in each epoch), optim.grad_clip and train.save_every_steps=2,
    observed from outside: every training forward (rows, weights, output), the gradient norm of every optimizer
    step, every checkpoint save, the epochs S3 was asked for."""
    seen: dict = {"forward": [], "norms": [], "saved": [], "s3_epochs": []}

    def weights_of_epoch(model, pre, records, epoch, *args, **kwargs):
        seen["s3_epochs"].append(epoch)
        return _epoch_weights(len(records), epoch), {}

    original_forward, original_step, original_save = PV2TEA.forward, torch.optim.AdamW.step, ckpt.save_checkpoint

    def forward(model, batch, sample_weights=None):
        out = original_forward(model, batch, sample_weights)
        seen["forward"].append((batch.index.tolist(), sample_weights, out))
        return out

    def step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen["norms"].append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original_step(optimizer, *args, **kwargs)

    def save(directory, model, cfg, bert_config, preprocess, tokenizer, training=None, training_tensors=None):
        seen["saved"].append((Path(directory).name, None if training is None else training["step"]))
        return original_save(directory, model, cfg, bert_config, preprocess, tokenizer, training, training_tensors)

    cfg = load_config(
        None,
        tiny_overrides(tiny_text_ckpt)
        + [f"train.epochs={EPOCHS}", f"optim.grad_clip={CLIP}", "train.save_every_steps=2"],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "sample_weights", weights_of_epoch)
        mp.setattr(PV2TEA, "forward", forward)
        mp.setattr(torch.optim.AdamW, "step", step)
        mp.setattr(ckpt, "save_checkpoint", save)
        seen["result"] = loop.train(cfg, rows, tmp_path_factory.mktemp("observed") / "run", progress=False)
    seen["cfg"] = cfg
    return seen


def test_s3_weights_of_the_batch_rows_reach_the_generation_loss(observed_run, rows):
    """Each training step's loss_gen is (1/B) Σ s(X_n) g_n with the S3 weights of exactly the batch's rows, those
    computed for the step's own epoch (in the second epoch too, not the first epoch's nor none)."""
    steps = math.ceil(len(rows) / 4)
    assert observed_run["s3_epochs"] == list(range(EPOCHS))
    assert len(observed_run["forward"]) == EPOCHS * steps
    for call, (indices, weights, out) in enumerate(observed_run["forward"]):
        known = _epoch_weights(len(rows), call // steps)
        assert weights is not None, f"step {call + 1} trained without S3 weights"
        assert weights.tolist() == pytest.approx(known[indices].tolist()), f"step {call + 1}"
        expected = (torch.as_tensor(known[indices], dtype=torch.float32) * out.per_sample_gen).mean()
        assert out.terms["loss_gen"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert out.terms["loss_gen"].item() != pytest.approx(out.per_sample_gen.mean().item(), rel=1e-3)


def test_grad_clip_bounds_every_update(observed_run):
    """optim.grad_clip: the gradient norm the optimizer steps on is the bound (the raw norms of these tiny random
    models are far above it)."""
    norms = observed_run["norms"]
    assert len(norms) == len(observed_run["forward"])
    assert norms == pytest.approx([CLIP] * len(norms), rel=1e-4)


def test_save_every_steps_writes_the_checkpoint_mid_epoch(observed_run, rows):
    steps = math.ceil(len(rows) / 4)
    expected = []
    for epoch in range(EPOCHS):  # every second step, then the epoch's end
        expected += [("checkpoint", s) for s in range(epoch * steps + 1, (epoch + 1) * steps + 1) if s % 2 == 0]
        expected.append(("checkpoint", (epoch + 1) * steps))
    assert observed_run["saved"] == [*expected, ("final", None)]


def test_queue_holds_the_last_image_rows_after_training(observed_run, rows):
    """After a run the S1 queue (a model buffer) holds the momentum features of the last M image rows trained on, in
    ring order: their pair ids, unit norm, write pointer at (rows enqueued) mod M."""
    from pv2tea.data.dataset import RecordDataset

    cfg = observed_run["cfg"]
    state = load_file(str(observed_run["result"].final_dir / ckpt.MODEL_FILE))
    size = state["queue.ids"].shape[0]
    n_products = len({(r.images, r.text) for r in rows if r.images})
    assert size == min(cfg.schemes.queue_size, n_products)
    pair_ids = RecordDataset(rows).pair_ids
    trained = [indices for indices, _, _ in observed_run["forward"]]
    assert trained == [b for epoch in range(EPOCHS) for b in loop.epoch_batches(len(rows), 4, cfg.train.seed, epoch)]
    enqueued = [pair_ids[i] for batch in trained for i in batch if rows[i].images]
    assert len(enqueued) > size  # the ring wrapped
    ptr = len(enqueued) % size
    assert int(state["queue.ptr"]) == ptr and int(state["queue.count"]) == size
    ring = enqueued[-size:]  # oldest first, written from slot ptr on
    assert state["queue.ids"].tolist() == [ring[(slot - ptr) % size] for slot in range(size)]
    assert torch.allclose(state["queue.image"].norm(dim=1), torch.ones(size), atol=1e-5)
    assert torch.allclose(state["queue.text"].norm(dim=1), torch.ones(size), atol=1e-5)
    # the newest entry is the momentum image feature of the last image row of the last batch
    last_out = observed_run["forward"][-1][2]
    newest = (ptr - 1) % size
    assert torch.allclose(state["queue.image"][newest], last_out.momentum["image"][-1], atol=1e-6)
