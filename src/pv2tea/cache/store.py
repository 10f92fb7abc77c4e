"""The feature cache on disk: safetensors shards, a manifest written last, and a lazy reader.

A cache folder holds

- ``images-NNNNNN.safetensors``: ``keys`` (n, 16) uint8 content digests and ``tokens`` (n, N, C) float32 backbone
  tokens of n distinct images;
- ``texts-NNNNNN.safetensors``: ``keys`` (n, 16), ``offsets`` (n + 1,) int64 and ``states`` (ΣT_i, H) float32, the
  frozen text layers' states of n distinct cropped texts packed one after the other (text i is rows
  ``offsets[i]:offsets[i + 1]``);
- ``manifest.json``: the identity of each section (:mod:`pv2tea.cache.identity`), the shards with their rows and
  bytes, and ``"complete": true``.

A shard is written under a temporary name, flushed to disk and renamed; the manifest is written (the same way) only
after every shard of a build is in place. A folder with shards but no manifest, or with shards the manifest does not
list, is the trace of an interrupted build (``building.json`` says what that build was encoding for); it is never
read as a cache. The reader takes rows by offset with ``os.preadv`` into the batch's own buffer, never loading a
shard: a memory map would work as well, but the pages it touches count as the process's resident memory, so a run
reading a cache larger than memory would look as if it held it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from pv2tea.cache.identity import DIGEST_BYTES, file_digest, identity_differences, text_digest
from pv2tea.data.schema import Record

FORMAT = 1
MANIFEST = "manifest.json"
BUILDING = "building.json"  # written when a build starts, removed with its manifest
KINDS = ("images", "texts")
SHARD_RE = re.compile(r"^(images|texts)-(\d{6})\.safetensors$")
TMP_SUFFIX = ".tmp"
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "I32": np.int32}


class FeatureCacheError(RuntimeError):
    """A feature cache that cannot be used: stale (another backbone), partial, or damaged. The message says why."""


def shard_name(kind: str, index: int) -> str:
    """The file name of shard ``index`` of a section (``images`` or ``texts``)."""
    return f"{kind}-{index:06d}.safetensors"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file that is flushed and renamed: it is either absent or complete."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_shard(directory: Path, kind: str, index: int, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """One shard, complete or absent (temporary name, fsync, rename); its manifest entry."""
    name = shard_name(kind, index)
    tmp = directory / f".{name}{TMP_SUFFIX}"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"kind": kind})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    _fsync_dir(directory)
    return {"file": name, "kind": kind, "rows": int(len(tensors["keys"])), "bytes": (directory / name).stat().st_size}


class ShardWriter:
    """Rows of one kind gathered into shards of about ``shard_bytes``, each written complete (temp + rename)."""

    def __init__(
        self, directory: Path, kind: str, first_index: int, shard_bytes: int, before_first: Callable[[], None]
    ):
        self.directory, self.kind, self.index, self.shard_bytes = directory, kind, first_index, shard_bytes
        self.before_first = before_first  # marks the folder as being built (building.json) before a shard lands
        self.keys: list[bytes] = []
        self.rows: list[np.ndarray] = []
        self.bytes = 0
        self.written: list[dict[str, Any]] = []

    def add(self, key: bytes, row: np.ndarray) -> None:
        """Add one row under its digest; a shard is written when the rows gathered reach ``shard_bytes``."""
        self.keys.append(key)
        self.rows.append(row)
        self.bytes += row.nbytes
        if self.bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the rows gathered so far as one shard (nothing when there are none)."""
        if not self.keys:
            return
        keys = np.frombuffer(b"".join(self.keys), dtype=np.uint8).reshape(len(self.keys), -1)  # (n, 16)
        if self.kind == "images":
            tensors = {"keys": keys, "tokens": np.stack(self.rows)}  # (n, N, C)
        else:
            lengths = np.array([len(r) for r in self.rows], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n + 1,)
            tensors = {"keys": keys, "offsets": offsets, "states": np.concatenate(self.rows)}  # (ΣT, H)
        if not self.written:
            self.before_first()
        self.written.append(write_shard(self.directory, self.kind, self.index, tensors))
        self.index += 1
        self.keys, self.rows, self.bytes = [], [], 0


def write_manifest(
    directory: Path, identity: Mapping[str, Any], shards: Sequence[Mapping[str, Any]], created: str | None = None
) -> None:
    """The manifest of a complete cache (written last, atomically): its sections' identity and its shards."""
    from pv2tea._version import __version__

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "format": FORMAT,
        "complete": True,
        "identity": dict(identity),
        "shards": list(shards),
        "rows": {k: sum(s["rows"] for s in shards if s["kind"] == k) for k in KINDS},
        "created": created or now,
        "updated": now,
        "pv2tea": __version__,
        "torch": torch.__version__,
    }
    write_atomic(Path(directory) / MANIFEST, json.dumps(manifest, indent=2).encode())


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor of a safetensors file is: its dtype, shape and first byte."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file


def read_header(path: Path) -> dict[str, TensorSpan]:
    """The tensors of a safetensors file and where their bytes are (the format: a little-endian u64 header length,
    the JSON header, the data)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FeatureCacheError(f"feature cache shard {path} is truncated (no header)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FeatureCacheError(f"feature cache shard {path} has a damaged header: {exc}") from exc
    base = 8 + length
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        out[name] = TensorSpan(np.dtype(_DTYPES[spec["dtype"]]), tuple(spec["shape"]), base + spec["data_offsets"][0])
    return out


def _read_array(path: Path, span: TensorSpan) -> np.ndarray:
    """A whole (small) tensor of a shard, read into memory: keys and offsets."""
    count = int(np.prod(span.shape)) if span.shape else 1
    with open(path, "rb") as f:
        f.seek(span.start)
        data = np.fromfile(f, dtype=span.dtype, count=count)
    if data.size != count:
        raise FeatureCacheError(f"feature cache shard {path} is truncated")
    return data.reshape(span.shape)


# --------------------------------------------------------------------------------------------- state of a folder
@dataclass
class CacheStatus:
    """What a cache folder holds, read without opening the shards."""

    directory: Path
    manifest: dict[str, Any] | None  # None: no manifest (absent or interrupted before its first manifest)
    building: dict[str, Any] | None  # the identity an interrupted (or running) build was encoding for
    unlisted: list[str] = field(default_factory=list)  # finished shards the manifest does not list
    temporary: list[str] = field(default_factory=list)  # shards (or a manifest) cut off while being written
    damaged: list[str] = field(default_factory=list)  # listed shards that are missing or of the wrong size

    @property
    def state(self) -> str:
        """ "absent" (nothing there), "complete" (a manifest whose shards are all in place), "partial" (the trace
        of an interrupted build) or "damaged" (the manifest lists shards that are gone or cut)."""
        if self.damaged:
            return "damaged"
        if self.manifest is None:
            return "partial" if self.unlisted or self.temporary or self.building else "absent"
        return "partial" if self.unlisted or self.temporary or self.building else "complete"

    def describe(self) -> str:
        """What is wrong with the folder, in one line (empty when nothing is)."""
        bits = []
        if self.manifest is None and self.state == "partial":
            bits.append("no manifest: a build was interrupted before it finished")
        elif self.building is not None:
            bits.append("a later build was interrupted (the manifest still describes the earlier, complete cache)")
        if self.unlisted:
            bits.append(f"{len(self.unlisted)} finished shard(s) not in the manifest")
        if self.temporary:
            bits.append(f"{len(self.temporary)} shard(s) cut off while being written")
        if self.damaged:
            bits.append(f"listed shard(s) missing or of the wrong size: {', '.join(self.damaged[:3])}")
        return "; ".join(bits)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a cache folder; None when it has none.

    Raises:
        FeatureCacheError: The manifest cannot be read or is not a pv2tea feature cache's.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatureCacheError(
            f"{path} is not valid JSON ({exc}); delete the folder and build the cache again"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FeatureCacheError(
            f"{path}: not a pv2tea feature cache of format {FORMAT}; delete the folder and build the cache again"
        )
    return manifest


def inspect_folder(directory: str | Path) -> CacheStatus:
    """What a cache folder holds (``pv2tea cache status``), read from its manifest and file names alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return CacheStatus(directory, None, None)
    manifest = read_manifest(directory)
    building = None
    if (directory / BUILDING).is_file():
        try:
            building = json.loads((directory / BUILDING).read_text())
        except (OSError, json.JSONDecodeError):
            building = {}
    listed = {s["file"]: s for s in (manifest or {}).get("shards", [])}
    names = sorted(os.listdir(directory))
    status = CacheStatus(directory, manifest, building)
    status.unlisted = [n for n in names if SHARD_RE.match(n) and n not in listed]
    status.temporary = [n for n in names if n.startswith(".") and n.endswith(TMP_SUFFIX)]
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            status.damaged.append(name)
    return status


def summary(directory: str | Path) -> dict[str, Any]:
    """``pv2tea cache info``: state, rows, shards and bytes per section, the backbone identity."""
    status = inspect_folder(directory)
    out: dict[str, Any] = {"directory": str(directory), "state": status.state, "complete": status.state == "complete"}
    if status.state != "complete":
        out["problem"] = status.describe() or "no feature cache here"
    manifest = status.manifest or {}
    shards = manifest.get("shards", [])
    for kind in KINDS:
        mine = [s for s in shards if s["kind"] == kind]
        out[kind] = {
            "rows": sum(s["rows"] for s in mine),
            "shards": len(mine),
            "bytes": sum(s["bytes"] for s in mine),
            "identity": manifest.get("identity", {}).get(kind),
        }
    out["bytes"] = sum(s["bytes"] for s in shards)
    for key in ("created", "pv2tea", "torch"):
        if key in manifest:
            out[key] = manifest[key]
    if status.unlisted or status.temporary:
        folder = Path(directory)
        out["unfinished_bytes"] = sum((folder / n).stat().st_size for n in status.unlisted + status.temporary)
    return out


def check_identity(saved: Mapping[str, Any] | None, wanted: Mapping[str, Any | None], where: Path) -> None:
    """Refuse a cache whose sections were encoded by another backbone than the one ``wanted`` describes."""
    saved = saved or {}
    for kind in KINDS:
        if wanted.get(kind) is None or saved.get(kind) is None:
            continue
        diff = identity_differences(saved[kind], wanted[kind])
        if diff:
            raise FeatureCacheError(
                f"feature cache {where} is stale: its {kind} were encoded by another backbone than this run's "
                f"(differs in {', '.join(diff)}). Point train.feature_cache_dir (or --out) to another folder, or "
                f"rebuild this one with pv2tea cache build --rebuild"
            )


# ------------------------------------------------------------------------------------------------------- reader
@dataclass
class _Section:
    """One kind's rows over all shards: a sorted key index and, per shard, where the data starts."""

    keys: np.ndarray  # (R,) |S16, sorted
    shard: np.ndarray  # (R,) int32: the shard of each sorted key
    row: np.ndarray  # (R,) int64: its row in that shard
    files: list[Path]
    fds: list[int]
    data: list[TensorSpan]  # per shard: ``tokens`` or ``states``
    offsets: list[np.ndarray]  # per shard (texts): (n + 1,) int64

    def find(self, digests: Sequence[bytes]) -> np.ndarray:
        """Sorted-index positions of the digests; -1 where absent."""
        if not len(self.keys) or not digests:
            return np.full(len(digests), -1, dtype=np.int64)
        query = np.array(digests, dtype=f"S{DIGEST_BYTES}")
        pos = np.searchsorted(self.keys, query)
        pos = np.minimum(pos, len(self.keys) - 1)
        return np.where(self.keys[pos] == query, pos, -1)


def _open_section(directory: Path, names: Sequence[str], kind: str) -> _Section:
    keys, shard_of, row_of, files, fds, data, offsets = [], [], [], [], [], [], []
    for i, name in enumerate(names):
        path = directory / name
        spans = read_header(path)
        need = ("keys", "tokens") if kind == "images" else ("keys", "offsets", "states")
        if any(n not in spans for n in need):
            raise FeatureCacheError(f"feature cache shard {path} lacks {', '.join(n for n in need if n not in spans)}")
        k = _read_array(path, spans["keys"])  # (n, 16) uint8
        keys.append(np.ascontiguousarray(k).view(f"S{DIGEST_BYTES}").reshape(-1))
        shard_of.append(np.full(len(k), i, dtype=np.int32))
        row_of.append(np.arange(len(k), dtype=np.int64))
        files.append(path)
        fds.append(os.open(path, os.O_RDONLY))
        data.append(spans["tokens" if kind == "images" else "states"])
        offsets.append(_read_array(path, spans["offsets"]) if kind == "texts" else np.empty(0, np.int64))
    if keys:
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        return _Section(
            all_keys[order], np.concatenate(shard_of)[order], np.concatenate(row_of)[order], files, fds, data, offsets
        )
    empty = np.empty(0, dtype=f"S{DIGEST_BYTES}")
    return _Section(empty, np.empty(0, np.int32), np.empty(0, np.int64), files, fds, data, offsets)


class FeatureStore:
    """A complete cache folder opened for reading: a :class:`pv2tea.data.dataset.FeatureCache` (``has_images``,
    ``image_tokens``, ``has_texts``, ``text_states``) over rows read from disk on demand.

    Images are looked up by the digest of their file (``image_digests``: path → digest computed beforehand for the
    paths of a run, others hashed when first asked for), texts by the digest of the cropped text. In memory: the
    sorted keys (16 bytes per row), their locations and the texts' offsets; never the features.
    """

    def __init__(
        self,
        directory: str | Path,
        wanted: Mapping[str, Any | None] | None = None,
        image_digests: Mapping[str, bytes] | None = None,
        extra_shards: Sequence[str] = (),
        building: bool = False,
    ):
        """``extra_shards``/``building``: for a build, finished shards not yet in the manifest, and no manifest
        needed."""
        self.directory = Path(directory)
        status = inspect_folder(self.directory)
        if status.manifest is None and not building:
            raise FeatureCacheError(
                f"{self.directory} is not a complete feature cache ({status.describe() or 'no manifest.json'}); "
                f"build it with pv2tea cache build"
            )
        if status.damaged:
            raise FeatureCacheError(f"feature cache {self.directory} is damaged: {status.describe()}; rebuild it")
        self.manifest = status.manifest or {"identity": {}, "shards": []}
        if wanted is not None:
            check_identity(self.manifest.get("identity"), wanted, self.directory)
        listed = [s["file"] for s in self.manifest["shards"]] + list(extra_shards)
        self.identity = dict(self.manifest.get("identity", {}))
        self.sections = {
            kind: _open_section(self.directory, [n for n in listed if n.startswith(kind + "-")], kind) for kind in KINDS
        }
        self.digests: dict[str, bytes] = dict(image_digests or {})

    def close(self) -> None:
        """Close the shard files."""
        for section in self.sections.values():
            for fd in section.fds:
                os.close(fd)
            section.fds.clear()

    def __del__(self) -> None:  # the descriptors of a store dropped without close()
        try:
            self.close()
        except Exception:
            pass

    @property
    def n_images(self) -> int:
        """The number of images cached."""
        return len(self.sections["images"].keys)

    @property
    def n_texts(self) -> int:
        """The number of texts cached."""
        return len(self.sections["texts"].keys)

    # ------------------------------------------------------------------ lookups
    def image_digest(self, path: str) -> bytes:
        """The digest an image file is cached under (hashed on first use, then remembered)."""
        digest = self.digests.get(path)
        if digest is None:
            digest = self.digests[path] = file_digest(path)
        return digest

    def has_image_digests(self, digests: Sequence[bytes]) -> np.ndarray:
        """(n,) bool: which image digests the cache holds."""
        return self.sections["images"].find(digests) >= 0

    def has_text_digests(self, digests: Sequence[bytes]) -> np.ndarray:
        """(n,) bool: which text digests the cache holds."""
        return self.sections["texts"].find(digests) >= 0

    def has_images(self, records: Sequence[Record], positions: int) -> bool:
        """Whether the cache holds the first ``positions`` images of every record (without any image: any at all)."""
        paths = [p for r in records for p in r.images[:positions]]
        if not paths:
            return self.n_images > 0
        return bool(self.has_image_digests([self.image_digest(p) for p in paths]).all())

    def has_texts(self, texts: Sequence[str]) -> bool:
        """Whether the cache holds the states of every (cropped) text."""
        return bool(texts) and bool(self.has_text_digests([text_digest(t) for t in texts]).all())

    # ------------------------------------------------------------------ reads
    def image_tokens(self, paths: Sequence[str | None]) -> torch.Tensor:
        """(B, N, C) cached tokens; zeros where the path is None (no image at that position)."""
        section = self.sections["images"]
        if not section.data:
            raise FeatureCacheError(f"feature cache {self.directory} holds no image features")
        span = section.data[0]
        out = np.zeros((len(paths), *span.shape[1:]), dtype=np.float32)
        present = [i for i, p in enumerate(paths) if p is not None]
        pos = section.find([self.image_digest(p) for p in paths if p is not None])  # the rows of ``present``
        if (pos < 0).any():
            missing = paths[present[int(np.argmax(pos < 0))]]
            raise KeyError(f"image '{missing}' (its current bytes) is not in the feature cache {self.directory}")
        for i, p in zip(present, pos.tolist()):
            shard, row = int(section.shard[p]), int(section.row[p])
            s = section.data[shard]
            row_bytes = out[i].nbytes
            self._pread(section.fds[shard], out[i], s.start + row * row_bytes, section.files[shard])
        return torch.from_numpy(out)

    def text_states(self, texts: Sequence[str], mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) cached states aligned with the batch's padded token mask (B, T)."""
        section = self.sections["texts"]
        if not section.data:
            raise FeatureCacheError(f"feature cache {self.directory} holds no text features")
        hidden = section.data[0].shape[-1]
        out = np.zeros((len(texts), mask.shape[1], hidden), dtype=np.float32)
        pos = section.find([text_digest(t) for t in texts])
        if (pos < 0).any():
            raise KeyError(f"a text is not in the feature cache {self.directory}: {texts[int(np.argmax(pos < 0))]!r}")
        lengths = mask.sum(1).tolist()
        for i, p in enumerate(pos.tolist()):
            shard, row = int(section.shard[p]), int(section.row[p])
            begin, end = section.offsets[shard][row], section.offsets[shard][row + 1]
            if end - begin != lengths[i]:
                raise RuntimeError(
                    f"cached text states ({end - begin} tokens) do not match the batch ({int(lengths[i])} tokens); "
                    f"was the tokenizer or text config changed?"
                )
            row_bytes = hidden * 4
            target = out[i, : end - begin]
            self._pread(
                section.fds[shard], target, section.data[shard].start + int(begin) * row_bytes, section.files[shard]
            )
        return torch.from_numpy(out)

    @staticmethod
    def _pread(fd: int, target: np.ndarray, offset: int, path: Path) -> None:
        """Fill the contiguous array ``target`` with the bytes of the file at ``offset``."""
        view = target.data.cast("B")  # the array's own buffer
        got = os.preadv(fd, [view], offset)
        if got != view.nbytes:
            raise FeatureCacheError(f"feature cache shard {path} is truncated (read {got} of {view.nbytes} bytes)")
