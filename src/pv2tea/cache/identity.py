"""What a cached feature depends on: the backbone's identity and the row's content.

A cached image feature is the frozen visual backbone's output for one image file; it changes with the file's bytes,
the backbone's weights, the image transform (size, normalization, interpolation) and the config fields that reshape
the tokens (``vision.extra_levels``, ``vision.token_grid``). A cached text feature is the output of the text
encoder's frozen part for one cropped text; it changes with the text, those layers' weights, the tokenizer and
``text.max_tokens`` / ``text.max_words``. Rows are keyed by a 16-byte BLAKE2b digest of their content (image file
bytes, cropped text), and each section of a cache by the identity of what encoded it: a weights fingerprint (a
digest of the frozen modules' tensors, whatever file they were loaded from) plus those settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

DIGEST_BYTES = 16  # BLAKE2b-128: collisions are out of reach for any catalog
_READ_CHUNK = 1 << 20


def content_digest(data: bytes) -> bytes:
    """The cache key of some content (image file bytes)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def text_digest(text: str) -> bytes:
    """The cache key of a cropped text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES, person=b"pv2tea-text").digest()


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """The cache key of an image file: the digest of its bytes (read in chunks).

    Raises:
        FileNotFoundError: naming the path, when the file is missing.
    """
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"image '{path}' does not exist (while hashing it for the feature cache)") from exc
    return h.digest()


def file_digests(paths: Iterable[str], threads: int | None = None) -> dict[str, bytes]:
    """path → :func:`file_digest` for distinct paths, read by a few threads (hashing releases the GIL)."""
    unique = list(dict.fromkeys(paths))
    if not unique:
        return {}
    workers = threads or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(file_digest, unique, chunksize=256)))


def weights_fingerprint(modules: Sequence[nn.Module]) -> str:
    """A digest of the modules' state (parameters and buffers: names, dtypes, shapes, values), in order."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def image_identity(model, pre) -> dict[str, Any] | None:
    """The identity of the cached image features of ``model`` (None when its visual backbone is not frozen)."""
    cfg = model.cfg
    if not model.visual_cached:
        return None
    return {
        "backbone": cfg.vision.name,
        "weights_sha256": weights_fingerprint(model.visual.frozen_modules()),
        # the trained top blocks (vision.train_blocks) run over the cached lower part; None (absent in older
        # folders) for a frozen backbone
        "train_blocks": cfg.vision.train_blocks if model.visual.cut is not None else None,
        "data_config": {k: _jsonable(v) for k, v in sorted(pre.data_config.items())},
        "extra_levels": list(cfg.vision.extra_levels),
        "token_grid": cfg.vision.token_grid,
    }


def text_identity(model, pre) -> dict[str, Any] | None:
    """The identity of the cached text states of ``model`` (None when no part of its text encoder is frozen)."""
    cfg = model.cfg
    if not model.text_cached:
        return None
    vocab = sorted(pre.tokenizer.get_vocab().items())
    return {
        "frozen_layers": model.text_frozen_layers,
        "weights_sha256": weights_fingerprint(model._frozen_text_parts(model.text_encoder)),
        "tokenizer": type(pre.tokenizer).__name__,
        "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
        "lowercase": bool(getattr(pre.tokenizer, "do_lower_case", False)),
        "max_tokens": cfg.text.max_tokens,
        "max_words": cfg.text.max_words,
    }


def identity_differences(saved: dict[str, Any] | None, wanted: dict[str, Any] | None) -> list[str]:
    """The fields in which two section identities differ, for a message ("weights_sha256", ...)."""
    saved, wanted = saved or {}, wanted or {}
    return sorted(k for k in {*saved, *wanted} if saved.get(k) != wanted.get(k))
