"""Building the on-disk feature cache: one encoding pass over the distinct images and texts a run needs.

Images are read, hashed and decoded in ``torch.utils.data.DataLoader`` worker processes and encoded by the frozen
visual backbone in batches; texts are cropped, sorted by length (less padding) and run through the text encoder's
frozen layers in batches. Only what the cache lacks is encoded: a folder that already holds the same backbone's
features gains a shard or two for new or changed images and texts (a changed file has another digest: its old
features are never read again). A build interrupted part-way leaves finished shards and ``building.json``; the next
build for the same backbone keeps those shards and encodes the rest, one for another backbone starts over.
Concurrent builds of one folder wait for each other (``fcntl.flock``).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pv2tea.cache.identity import content_digest, file_digests, image_identity, text_digest, text_identity
from pv2tea.cache.store import (
    BUILDING,
    KINDS,
    MANIFEST,
    FeatureCacheError,
    FeatureStore,
    ShardWriter,
    check_identity,
    inspect_folder,
    read_header,
    write_atomic,
    write_manifest,
)
from pv2tea.data.images import ImageLoadError, load_rgb
from pv2tea.data.schema import Record
from pv2tea.regularize.grounding import mention_free_texts

log = logging.getLogger("pv2tea.cache")
SHARD_BYTES = 256 * 2**20  # features per shard file


def wanted_identity(model, pre) -> dict[str, Any | None]:
    """What the cache of ``model`` holds, per section (None: that side is not cached)."""
    return {"images": image_identity(model, pre), "texts": text_identity(model, pre)}


def cached_images(cfg, records: Sequence[Record]) -> list[str]:
    """The distinct image paths whose features a run over ``records`` reads (the first ``vision.max_images``)."""
    return list(dict.fromkeys(p for r in records for p in r.images[: cfg.vision.max_images]))


def cached_texts(model, pre, records: Sequence[Record]) -> list[str]:
    """The distinct cropped texts whose states a run over ``records`` reads: each row's text, and the mention-free
    text a row trains on or is predicted from when ``schemes.mention_dropout`` or ``prediction_nr_text`` asks."""
    cfg = model.cfg
    texts = [pre.crop(r.text) for r in records]
    mention_free = cfg.schemes.mention_dropout > 0 or (
        cfg.schemes.prediction_nr_text == "mention_free" and cfg.schemes.prediction_nr
    )
    if mention_free and model.visual is not None:
        texts += [pre.crop(t) for t in mention_free_texts(records, cfg.schemes.mention_removal) if t is not None]
    return list(dict.fromkeys(texts))


class _ImageFiles(Dataset):
    """Decoded, transformed images with the digest of the bytes decoded (run in DataLoader workers)."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bytes]:
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ImageLoadError(f"image '{path}': {exc.strerror or exc}") from exc
        try:
            image = load_rgb(io.BytesIO(data))
        except ImageLoadError as exc:
            raise ImageLoadError(f"cannot load image '{path}': {exc.__cause__ or exc}") from exc
        return self.transform(image), content_digest(data)


def _collate_images(items: list[tuple[torch.Tensor, bytes]]) -> tuple[torch.Tensor, list[bytes]]:
    return torch.stack([t for t, _ in items]), [d for _, d in items]  # (b, 3, H, W)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the folder's build lock (another build of it waits)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        (directory / name).unlink(missing_ok=True)


def _next_index(names: Sequence[str], kind: str) -> int:
    numbers = [int(n[len(kind) + 1 : len(kind) + 7]) for n in names if n.startswith(kind + "-")]
    return max(numbers, default=-1) + 1


@torch.no_grad()
def ensure_cache(
    directory: str | Path,
    model,
    pre,
    images: Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    workers: int = 0,
    rebuild: bool = False,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = False,
    image_digests: dict[str, bytes] | None = None,
    notify: Callable[[str], None] | None = None,
) -> tuple[FeatureStore, dict[str, int]]:
    """Make ``directory`` a complete cache of ``model``'s frozen features for the given image paths and cropped
    texts, encoding only what it lacks, and open it. Returns the store and counts of what was encoded.

    ``rebuild``: discard whatever the folder holds first. ``notify``: called with a sentence whenever the folder
    was found partial or lacking rows (the caller shows it; it is also logged).

    Raises:
        FeatureCacheError: the folder holds another backbone's features (and ``rebuild`` is false).
    """
    directory = Path(directory)
    say = notify or (lambda message: None)
    wanted = wanted_identity(model, pre)
    if wanted["images"] is None and wanted["texts"] is None:
        raise FeatureCacheError(
            "nothing to cache: none of vision.freeze / vision.train_blocks / text.freeze / text.train_layers is set, so "
            "no backbone output stays the same during training"
        )
    with _locked(directory):
        status = inspect_folder(directory)
        if rebuild:
            _remove(directory, [MANIFEST, BUILDING, *status.unlisted, *status.temporary])
            _remove(directory, [s["file"] for s in (status.manifest or {}).get("shards", [])])
            status = inspect_folder(directory)
        if status.damaged:
            raise FeatureCacheError(
                f"feature cache {directory} is damaged ({status.describe()}); rebuild it with pv2tea cache build "
                f"--rebuild"
            )
        manifest = status.manifest or {"identity": {}, "shards": []}
        check_identity(manifest.get("identity"), wanted, directory)
        identity = {k: manifest["identity"].get(k) or wanted[k] for k in KINDS}
        adopted: list[str] = []
        if status.state == "partial":
            if (status.building or {}).get("identity") == identity:
                adopted = list(status.unlisted)
                message = (
                    f"feature cache {directory}: an interrupted build left {len(adopted)} finished shard(s); "
                    f"keeping them and encoding the rest"
                )
            else:
                message = (
                    f"feature cache {directory}: the shards of an interrupted build for another backbone (or of "
                    f"unknown origin) are discarded"
                )
                _remove(directory, [*status.unlisted, BUILDING])
            _remove(directory, status.temporary)
            log.warning(message)
            say(message)

        def mark_building() -> None:
            if not (directory / BUILDING).is_file():
                write_atomic(directory / BUILDING, json.dumps({"identity": identity}).encode())

        store = FeatureStore(directory, wanted, image_digests, extra_shards=adopted, building=True)
        try:
            counts = _encode_missing(
                store,
                model,
                pre,
                images,
                texts,
                batch_size,
                workers,
                shard_bytes,
                progress,
                adopted,
                say,
                mark_building,
            )
        finally:
            store.close()
        added = [*counts.pop("_adopted"), *counts.pop("_written")]
        digests = store.digests
        if not added and status.state == "complete" and identity == manifest["identity"]:
            return FeatureStore(directory, wanted, digests), counts  # nothing new: the folder is left as it was
        write_manifest(directory, identity, [*manifest["shards"], *added], created=manifest.get("created"))
        (directory / BUILDING).unlink(missing_ok=True)
    return FeatureStore(directory, wanted, digests), counts


def _encode_missing(
    store: FeatureStore,
    model,
    pre,
    images: Sequence[str],
    texts: Sequence[str],
    batch_size: int,
    workers: int,
    shard_bytes: int,
    progress: bool,
    adopted: Sequence[str],
    say: Callable[[str], None],
    mark_building: Callable[[], None],
) -> dict[str, Any]:
    directory = store.directory
    names = [s["file"] for s in store.manifest["shards"]] + list(adopted)
    adopted_entries = [
        {
            "file": n,
            "kind": n.split("-")[0],
            "rows": int(read_header(directory / n)["keys"].shape[0]),
            "bytes": (directory / n).stat().st_size,
        }
        for n in adopted
    ]
    written: list[dict[str, Any]] = []
    counts: dict[str, Any] = {"images_encoded": 0, "texts_encoded": 0}
    was_training = model.training
    model.eval()
    try:
        if model.visual_cached and images:
            store.digests.update(file_digests([p for p in images if p not in store.digests]))
            unique = list(dict.fromkeys(images))
            have = store.has_image_digests([store.digests[p] for p in unique])
            missing = [p for p, h in zip(unique, have) if not h]
            if missing:
                known = len(unique) - len(missing)
                if store.n_images:
                    say(f"feature cache {directory}: {len(missing)} image(s) new or changed; encoding them")
                writer = ShardWriter(directory, "images", _next_index(names, "images"), shard_bytes, mark_building)
                loader = DataLoader(
                    _ImageFiles(missing, pre.transform),
                    batch_size=batch_size,
                    num_workers=workers,
                    collate_fn=_collate_images,
                    generator=torch.Generator(),  # its own seed draw: the run's random stream stays as without it
                )
                seen: set[bytes] = set()
                bar = tqdm(total=len(missing), desc="cache images", disable=not progress, leave=False)
                start = 0
                for pixels, digests in loader:
                    tokens = model.visual.cached_tokens(pixels).float().numpy()  # (b, N, C)
                    for j, digest in enumerate(digests):
                        store.digests[missing[start + j]] = digest  # the bytes decoded, should the file have changed
                        if digest not in seen:
                            seen.add(digest)
                            writer.add(digest, tokens[j].copy())
                    start += len(digests)
                    bar.update(len(digests))
                bar.close()
                writer.flush()
                written += writer.written
                counts["images_encoded"] = len(seen)
                log.info("feature cache: %d image(s) encoded, %d already cached", len(seen), known)
        if model.text_cached and texts:
            unique = list(dict.fromkeys(texts))
            digests = [text_digest(t) for t in unique]
            have = store.has_text_digests(digests)
            missing_texts = [(t, d) for t, d, h in zip(unique, digests, have) if not h]
            if missing_texts:
                if store.n_texts:
                    say(f"feature cache {directory}: {len(missing_texts)} text(s) new or changed; encoding them")
                writer = ShardWriter(directory, "texts", _next_index(names, "texts"), shard_bytes, mark_building)
                order = np.argsort([len(t) for t, _ in missing_texts], kind="stable")  # similar lengths: less padding
                bar = tqdm(total=len(missing_texts), desc="cache texts", disable=not progress, leave=False)
                for start in range(0, len(order), batch_size):
                    chunk = [missing_texts[i] for i in order[start : start + batch_size]]
                    enc = pre.tokenize_texts([t for t, _ in chunk])
                    states = model.frozen_text_states(enc["input_ids"], enc["attention_mask"]).float()  # (b, T, H)
                    for (_, digest), n, row in zip(chunk, enc["attention_mask"].sum(1).tolist(), states.numpy()):
                        writer.add(digest, row[:n].copy())
                    bar.update(len(chunk))
                bar.close()
                writer.flush()
                written += writer.written
                counts["texts_encoded"] = len(missing_texts)
                log.info("feature cache: %d text(s) encoded", len(missing_texts))
    finally:
        model.train(was_training)
    counts["_adopted"] = adopted_entries
    counts["_written"] = written
    return counts


def run_cache_rows(model, pre, records: Sequence[Record]) -> tuple[list[str], list[str]]:
    """The image paths and cropped texts a run over ``records`` reads from the cache (its frozen sides only)."""
    cfg = model.cfg
    images = cached_images(cfg, records) if model.visual_cached else []
    texts = cached_texts(model, pre, records) if model.text_cached else []
    return images, texts


def training_cache(
    directory: str | Path,
    model,
    pre,
    records: Sequence[Record],
    *,
    main: bool,
    wait: Callable[[], None],
    batch_size: int,
    workers: int,
    progress: bool,
    notify: Callable[[str], None] | None = None,
) -> FeatureStore:
    """The feature store a training process reads: the main process completes ``directory`` with the images and
    texts of ``records`` (rows as trained on, mention-free texts included) it lacks, the others wait for it (``wait``:
    a barrier over the processes) and open it."""
    cfg = model.cfg
    images = cached_images(cfg, records) if model.visual_cached else []
    texts = list(dict.fromkeys(pre.crop(r.text) for r in records)) if model.text_cached else []
    store = None
    if main:
        store, _ = ensure_cache(
            directory,
            model,
            pre,
            images,
            texts,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            notify=notify,
        )
    wait()
    if store is None:
        store = FeatureStore(directory, wanted_identity(model, pre), file_digests(images))
    return store


def model_for_cache(cfg, records: Sequence[Record]):
    """The model and preprocessor a training run on ``records`` builds, seeded as it seeds them (a randomly
    initialized backbone then gets the run's weights) and warm-started as it is (``train.warm_start``): the frozen
    parts whose outputs it caches."""
    import random

    from pv2tea.data.dataset import value_counts, value_vocabulary
    from pv2tea.models import checkpoint as ckpt
    from pv2tea.models.build import build_for_training

    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    categories = sorted({r.category for r in records})
    model, pre = build_for_training(cfg, categories, value_vocabulary(records), None, value_counts(records))
    if cfg.train.warm_start:
        ckpt.load_warm_start(model, Path(cfg.train.warm_start))
    return model, pre


def open_for_model(directory: str | Path, model, pre) -> FeatureStore:
    """A complete cache folder opened for ``model`` (prediction: read only, never built); refused when another
    backbone encoded it. Rows whose images or texts it lacks are encoded as without a cache."""
    return FeatureStore(directory, wanted_identity(model, pre))
