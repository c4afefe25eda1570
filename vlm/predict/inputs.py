"""What `vlm predict` reads: a source listed into chunks, and the stream of batches each reader makes of its chunks.

Sources (``input_format`` "auto" tells them apart):

- ``folder``: every image file under a directory, recursively, by suffix (`vlm.data.records.IMAGE_SUFFIXES`), in
  sorted order of the path relative to the folder (the key);
- ``glob``: the files a pattern such as ``"photos/**/*.jpg"`` matches (recursive ``**``), sorted;
- ``list``: a text file of image paths, one a line (relative to the file's folder unless absolute; blank lines
  and lines starting with # are skipped);
- ``jsonl``: one JSON object a line with ``"image"`` (relative to the file's folder unless absolute), an optional
  ``"key"``, an optional ``"phrases"`` (a list of strings to find in the caption, `vlm.predict.summary`) and any
  other fields, which are carried to the output under ``"input"``;
- ``webdataset``: tar shards (local paths, ``{000..099}`` brace patterns, globs of local shards, URLs) streamed
  without unpacking, img2dataset layout (``KEY.jpg``/``.png``/``.webp`` with ``KEY.txt`` and ``KEY.json``); a
  missing local shard is refused before the run, and a shard that breaks off (truncated, corrupt, a failed
  download) keeps the samples read before, its chunk's errors saying where it broke.

The work is split into chunks: fixed-size runs of a listing (``chunk_size`` images), or one chunk per shard. A
chunk is the unit of output (one file), of resumption (done or not) and of work: process p of P takes pending
chunks p, p + P, ..., and cuts each into batches (never across chunks); worker w of W takes the process's batches
w, w + W, ... of a listing, or, of shards (streamed once each), reader r of R (processes times workers) takes the
shards r, r + R, .... So every image is read by exactly one reader whatever the number of processes, with no
padding, and an image's batch, and with it every number computed for it, is the same on any number of processes.
"""

from __future__ import annotations

import gc
import glob as globbing
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from vlm.data.datasets import IMAGE_KEYS, broken_shard, shard_urls
from vlm.data.images import load_image
from vlm.data.records import IMAGE_SUFFIXES
from vlm.errors import VLMError

INPUT_FORMATS = ("auto", "folder", "glob", "list", "jsonl", "webdataset")
_GLOB = re.compile(r"[*?[]")


@dataclass(slots=True)
class Entry:
    """One image of a listing (slots: a listing of millions holds one per image)."""

    image: str
    """Its path."""
    key: str
    """How the output names it: the path relative to the folder, the path as listed, or JSONL "key" (else
    "image")."""
    fields: dict | None = None
    """JSONL fields carried to the output (None: none)."""
    phrases: list[str] | None = None
    """JSONL "phrases": what to find in the caption (else the caption's runs of content words)."""


@dataclass
class Chunk:
    """A unit of work and of output: a run of a listing, or one shard."""

    index: int
    entries: list[Entry] | None = None
    """The listing's images (None for a shard)."""
    first: int = 0
    """The listing index of the first entry."""
    shard: str | None = None
    """The shard's path or URL."""

    @property
    def id(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def size(self) -> int | None:
        return len(self.entries) if self.entries is not None else None

    def describe(self) -> dict:
        if self.shard is not None:
            return {"shard": self.shard}
        return {"first": self.first, "count": len(self.entries)}


def listing_digest(chunks: list[Chunk]) -> str:
    """A digest of what the chunks list: each image's key, path, fields and phrases, or each shard. A resumed job
    must list the same (an image added, removed or renamed since would shift the chunks under their finished
    outputs)."""
    h = hashlib.sha256()
    text = json.encoder.encode_basestring  # a string as json.dumps(ensure_ascii=False) writes it
    for chunk in chunks:
        for entry in chunk.entries if chunk.entries is not None else [Entry(chunk.shard or "", "")]:
            if entry.fields or entry.phrases is not None:
                line = json.dumps([entry.key, entry.image, entry.fields or {}, entry.phrases], sort_keys=True,
                                  ensure_ascii=False)
            else:  # the same text, without json.dumps's own work per call (a listing may hold millions)
                line = f"[{text(entry.key)}, {text(entry.image)}, {{}}, null]"
            h.update(line.encode())
            h.update(b"\n")
    return "sha256:" + h.hexdigest()[:16]


def detect_input_format(path: str) -> str:
    """folder, webdataset, glob, jsonl or list, from the path alone."""
    if os.path.isdir(path):
        return "folder"
    if "://" in path or path.endswith(".tar") or re.search(r"\{[^}]*\.\.[^}]*\}", path):
        return "webdataset"
    if _GLOB.search(path) and not os.path.exists(path):
        return "glob"
    if path.endswith(".jsonl"):
        return "jsonl"
    if os.path.isfile(path):
        return "list"
    raise VLMError(f"--input {path}: no such folder, file, shard or pattern")


def list_chunks(path: str, input_format: str = "auto", chunk_size: int = 1000) -> tuple[str, list[Chunk]]:
    """The source's format and its chunks, in order (the same on every process)."""
    if chunk_size < 1:
        raise VLMError(f"--chunk_size: expected a positive number of images, got {chunk_size}")
    if input_format not in INPUT_FORMATS:
        raise VLMError(f"--input_format {input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    fmt = detect_input_format(path) if input_format == "auto" else input_format
    if fmt == "webdataset":
        shards = shard_urls(path, f"--input {path}")
        return fmt, [Chunk(i, shard=s) for i, s in enumerate(shards)]
    with _no_collections():
        entries = {"folder": _folder, "glob": _glob, "list": _list_file, "jsonl": _jsonl}[fmt](path)
    if not entries:
        raise VLMError(f"--input {path}: no images found ({fmt})")
    chunks = [Chunk(i, entries[start:start + chunk_size], start)
              for i, start in enumerate(range(0, len(entries), chunk_size))]
    return fmt, chunks


@contextmanager
def _no_collections() -> Iterator[None]:
    """Python's cyclic garbage collector paused: a listing makes an object or more per image and no cycles, and the
    collections their number set off scanned them all again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _joined(base: str, name: str) -> str:
    """``str(Path(base) / name)`` for a ``base`` that pathlib wrote (``str(Path(...))``), without building a path
    for a plain name (a relative or absolute path without empty, "." or trailing parts): pathlib's join took most of
    the time of listing a file of millions of images."""
    if not name or name == "." or name.startswith("./") or name.endswith(("/", "/.")) or "//" in name or "/./" in name:
        return str(Path(base) / name)
    if name.startswith("/") or base == ".":
        return name
    return base + name if base.endswith("/") else f"{base}/{name}"


def _folder(path: str) -> list[Entry]:
    """The folder's image files at any depth (``Path.rglob("*")``'s walk: not into linked folders, nor folders it may
    not read), sorted by their path relative to it, walked with `os.scandir` (whose entries know whether they are
    files or folders without asking the system again) rather than pathlib, which took most of the listing's time."""
    root = str(Path(path))
    files: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            with os.scandir(folder) as found:
                entries = list(found)
        except PermissionError:
            return
        for entry in entries:
            name = entry.name
            dot = name.rfind(".")  # pathlib's suffix: none for ".jpg" or "x."
            if 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_SUFFIXES and entry.is_file():
                files.append(prefix + name)
            elif entry.is_dir(follow_symlinks=False):
                walk(entry.path, f"{prefix}{name}/")

    walk(root, "")
    files.sort()
    return [Entry(_joined(root, f), f) for f in files]


def _glob(pattern: str) -> list[Entry]:
    return [Entry(p, p) for p in sorted(globbing.glob(pattern, recursive=True)) if os.path.isfile(p)]


def _list_file(path: str) -> list[Entry]:
    base = str(Path(path).parent)
    try:
        with open(path, encoding="utf-8") as f:
            names = [name for name in map(str.strip, f) if name and not name.startswith("#")]
    except (UnicodeDecodeError, OSError) as e:
        raise VLMError(f"{path}: cannot read the list of images ({e.__class__.__name__})") from None
    return [Entry(_joined(base, name), name) for name in names]


def _jsonl(path: str) -> list[Entry]:
    """The JSONL file's images, read a line at a time (a file of millions is not held whole besides its entries)."""
    base = str(Path(path).parent)
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    entries.append(_jsonl_entry(line, base, f"{path}:{n}"))
    except (UnicodeDecodeError, OSError) as e:
        raise VLMError(f"{path}: cannot read ({e.__class__.__name__})") from None
    return entries


def _jsonl_entry(line: str, base: str, where: str) -> Entry:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise VLMError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise VLMError(f"{where}: each line must be an object with an \"image\" path")
    phrases = obj.pop("phrases", None)
    if phrases is not None and not (isinstance(phrases, list) and all(isinstance(p, str) and p.strip()
                                                                      for p in phrases)):
        raise VLMError(f"{where}: \"phrases\" must be a list of non-empty strings")
    key = obj.pop("key", None)
    image = obj.pop("image")
    return Entry(_joined(base, image), image if key is None else str(key), obj or None, phrases)


# ------------------------------------------------------------------------------------------- the item stream


@dataclass
class Item:
    """One image read for prediction (or why it could not be)."""

    chunk: int
    position: int
    """Its place in the chunk."""
    meta: dict
    """What the output says of its input: key, image (or shard and member), index, input fields."""
    seed: int
    """Its sampling seed offset: the listing index, or chunk * 10^6 + position in a shard."""
    pixels: Tensor | None = None
    size: tuple[int, int] | None = None
    """(W, H) of the image as loaded."""
    error: str | None = None
    raw: dict | None = None
    """For --format webdataset: the image bytes and suffix, and a shard sample's .txt and .json fields."""
    phrases: list[str] | None = None
    """The input's phrases to find in the caption (JSONL "phrases")."""
    empty: bool = False
    """A placeholder for a shard with no samples (so that its chunk still ends)."""


@dataclass
class Batch:
    """A reader's batch: images of one chunk; ``last`` when the chunk ends with it."""

    chunk: int
    items: list[Item]
    last: bool
    seconds: dict[str, float] = field(default_factory=dict)
    """Time its reader spent on it: reading and decoding the images, transforming them."""

    def __len__(self) -> int:
        return sum(not i.empty for i in self.items)


def _reader() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ChunkStream(IterableDataset):
    """Batches of the pending chunks that fall to this reader (rank x data-loader worker).

    ``rank`` and ``world`` are set by the data module once the processes know them. Shards fall to the readers by
    turns (``reader, reader + readers, ...``: a shard is streamed once, by one worker); a listing's chunks fall to
    the processes by turns and their batches to the process's workers by turns (`_listed`). Each worker decodes and
    transforms its images itself.
    """

    def __init__(self, chunks: list[Chunk], transform: Callable[[Image.Image], Tensor], batch_size: int,
                 max_pixels: int | None = None, keep_raw: bool = False):
        self.chunks, self.transform, self.batch_size = chunks, transform, batch_size
        self.max_pixels, self.keep_raw = max_pixels, keep_raw
        self.rank, self.world = 0, 1
        self._seconds = {"decode": 0.0, "transform": 0.0}  # the batch being read

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _reader()
        if all(chunk.entries is not None for chunk in self.chunks):
            yield from self._listed(worker, workers)
            return
        reader, readers = self.rank * workers + worker, self.world * workers
        for chunk in self.chunks[reader::readers]:
            items = self._shard_items(chunk)
            current = next(items, None)
            if current is None:  # an empty shard: a placeholder ends its chunk
                yield Batch(chunk.index, [Item(chunk.index, 0, {}, 0, empty=True)], True)
                continue
            batch: list[Item] = []
            while current is not None:
                following = next(items, None)  # one image ahead: is this batch the chunk's last?
                batch.append(current)
                if len(batch) == self.batch_size or following is None:
                    yield Batch(chunk.index, batch, following is None, self._seconds)
                    batch, self._seconds = [], {"decode": 0.0, "transform": 0.0}
                current = following

    def _listed(self, worker: int, workers: int) -> Iterator[Batch]:
        """A listing's batches: this process's chunks (``rank, rank + world, ...``), cut into batches that its workers
        take by turns (batch ``worker, worker + workers, ...``), so that one chunk keeps every worker busy. PyTorch's
        DataLoader takes the workers' batches by turns too, so they reach the writer in order."""
        number = 0
        for chunk in self.chunks[self.rank::self.world]:
            entries = chunk.entries
            for start in range(0, len(entries), self.batch_size):
                if number % workers == worker:
                    items = [self._entry_item(chunk, j) for j in range(start, min(start + self.batch_size,
                                                                                  len(entries)))]
                    yield Batch(chunk.index, items, start + self.batch_size >= len(entries), self._seconds)
                    self._seconds = {"decode": 0.0, "transform": 0.0}
                number += 1

    def _entry_item(self, chunk: Chunk, j: int) -> Item:
        entry = chunk.entries[j]
        meta = {"key": entry.key, "image": entry.image, "index": chunk.first + j}
        if entry.fields:
            meta["input"] = entry.fields
        raw = None
        if self.keep_raw:
            raw = {"suffix": Path(entry.image).suffix.lower().lstrip(".")}  # else re-encoded (_load)
        item = Item(chunk.index, j, meta, chunk.first + j, raw=raw, phrases=entry.phrases)
        return self._load(item, entry.image, entry.image)

    def _shard_items(self, chunk: Chunk) -> Iterator[Item]:
        import webdataset as wds

        samples = _readable(wds.tariterators.tarfile_samples([{"url": chunk.shard}]))
        key = None
        for j, sample in enumerate(samples):
            if isinstance(sample, Exception):  # the shard breaks off here: what it held so far is kept
                yield Item(chunk.index, j, {"key": None, "shard": chunk.shard, "member": None}, chunk.index * 10**6 + j,
                           error=str(broken_shard(chunk.shard, sample, j, key)))
                return
            key = sample["__key__"]
            suffix = next((k for k in IMAGE_KEYS if k in sample), None)
            meta = {"key": key, "shard": chunk.shard, "member": f"{key}.{suffix}" if suffix else None}
            item = Item(chunk.index, j, meta, chunk.index * 10**6 + j)
            if self.keep_raw:
                item.raw = {"suffix": suffix, "txt": sample.get("txt")}
                try:
                    item.raw["fields"] = _fields(sample.get("json"))
                except ValueError as e:
                    item.error = f"{chunk.shard}: {key}.json: {e}: its fields cannot be kept"
            if suffix is None:
                item.error = f"{chunk.shard}: {key}: no image ({', '.join(IMAGE_KEYS)}) in the sample"
            if item.error is not None:
                yield item
                continue
            yield self._load(item, sample[suffix], name=f"{chunk.shard}: {meta['member']}")

    def _load(self, item: Item, source, name: str | None = None) -> Item:
        started = time.perf_counter()
        try:
            if self.keep_raw:
                source = source if isinstance(source, bytes) else _read_bytes(source)
                item.raw["image"] = source
            image = load_image(source, self.max_pixels, name=name)
            if self.keep_raw and item.raw["suffix"] not in IMAGE_KEYS:  # a shard `vlm train` reads
                encoded = io.BytesIO()
                image.save(encoded, format="PNG")
                item.raw.update(image=encoded.getvalue(), suffix="png")
            decoded = time.perf_counter()
            item.pixels, item.size = self.transform(image), image.size
            self._seconds["transform"] += time.perf_counter() - decoded
        except VLMError as e:
            item.error = str(e)
            decoded = time.perf_counter()
        self._seconds["decode"] += decoded - started
        return item


def _fields(data: bytes | None) -> dict:
    """A shard sample's .json as its fields (none: {}); ValueError saying why when it holds no JSON object."""
    if data is None:
        return {}
    try:
        fields = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"invalid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    return fields


def _readable(samples: Iterator[dict]) -> Iterator[dict | Exception]:
    """A shard's samples, then the error that ended its reading early, if any (a truncated or corrupt tar, a
    download that failed): a bad shard is reported, not the end of the job."""
    try:
        yield from samples
    except Exception as e:  # tarfile's, a stream's, the network's: many kinds
        yield e


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise VLMError(f"{path}: cannot read ({e.__class__.__name__}: {e.strerror or e})") from None


def collate(batch: Batch) -> dict:
    """A reader's batch as the model step takes it: the good images' pixels stacked, and every item."""
    good = [item.pixels for item in batch.items if item.pixels is not None]
    pixels = torch.stack(good) if good else None
    for item in batch.items:
        item.pixels = None  # the stacked tensor carries them
    return {"pixels": pixels, "items": batch.items, "chunk": batch.chunk, "last": batch.last,
            "seconds": batch.seconds}
