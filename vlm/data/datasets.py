"""Training and validation items from datasets on disk (records) and WebDataset shards, mixed by weight (the
loaders: `vlm.data.module.DataModule`).

An item is the same as the built-in scenes' (`vlm.data.batch.Item`): the image tensor, its caption and
question-answer sequences, and its index; `vlm.data.batch.collate` batches both kinds.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import pickle
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import islice

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from vlm.config import DataConfig, SourceConfig
from vlm.data.batch import Item, TrainingSequence, caption_sequence, map_boxes, question_sequence
from vlm.data.boxes import PixelBox, mirrored_box, resized_box
from vlm.data.draws import Key, draw_indices, draw_rng, rekey, split_key
from vlm.data.images import load_image
from vlm.data.records import (
    ANSWERS_NEEDED,
    Question,
    Record,
    Region,
    Report,
    detect_format,
    given_answers,
    read_records,
)
from vlm.errors import VLMError
from vlm.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Tensor]
SIDE_WORDS = re.compile(r"\b(left|right|lefts|rights|leftmost|rightmost)\b", re.IGNORECASE)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def mentions_side(texts: list[str]) -> bool:
    """True when any text says left or right (a flipped image would contradict it)."""
    return any(SIDE_WORDS.search(t) for t in texts)


def record_texts(record: Record) -> list[str]:
    return [*record.captions, *(t for q in record.questions for t in (q.question, *q.answers))]


def references(record: Record) -> dict:
    """What generations on this record are scored against."""
    return {"captions": list(record.captions),
            "questions": [{"question": q.question, "answers": list(q.answers), "kind": q.answer_type,
                           "question_id": q.question_id} for q in record.questions]}


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's and Python's global generators (which timm's random crop draws from) seeded for the duration, then
    restored."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed would also reseed GPUs
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class Sampler:
    """Turns one image and its texts into an item: draws the sequences, flips only when no text says left/right.

    Every draw (texts, flip, crop) comes from `draw_rng` of the item's key: in training (index, epoch) from
    `vlm.data.module.TrainOrder` with the run's ``seed``, so each epoch draws afresh and a resumed run draws what the
    uninterrupted one did; validation keys are plain indices, always drawing the same.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, transform: Transform, train: bool, seed: int = 0):
        self.cfg, self.tokenizer, self.transform, self.train, self.seed = cfg, tokenizer, transform, train, seed

    def sequences(self, captions: list[str], questions: list[Question], rng: np.random.Generator,
                  regions: Sequence[tuple[str, PixelBox]] = ()) -> list[list[TrainingSequence]]:
        """The item's groups: caption sequences (grounded where they name a region), then question-answer ones."""
        tok = self.tokenizer
        caption_seqs = [caption_sequence(tok, captions[i], regions)
                        for i in draw_indices(rng, len(captions), self.cfg.captions_per_image)] if captions else []
        question_seqs = [question_sequence(tok, questions[i].question, questions[i].answer)
                         for i in draw_indices(rng, len(questions), self.cfg.questions_per_image)] if questions else []
        return [caption_seqs, question_seqs]

    def __call__(self, image: Image.Image, captions: list[str], questions: list[Question], key: Key,
                 regions: Sequence[Region] = ()) -> Item:
        rng = draw_rng(self.seed, key)
        # The random crop moves the regions where no box follows them: no grounded tokens then.
        boxes = [] if self.train and self.cfg.crop_scale < 1.0 else [(r.phrase, r.bbox) for r in regions]
        groups = self.sequences(captions, questions, rng, boxes)  # boxes in pixels of `image`, mapped below
        flipped = (self.train and self.cfg.hflip > 0 and rng.random() < self.cfg.hflip
                   and not mentions_side([*captions, *(t for q in questions for t in (q.question, *q.answers))]))
        if flipped:
            image = ImageOps.mirror(image)
        with seeded(int(rng.integers(2**63))) if self.train else nullcontext():
            tensor = self.transform(image)
        if boxes:  # into the model's input image: flipped with the image, then resized with it
            size, input_size = image.size, (tensor.shape[-1], tensor.shape[-2])
            groups = map_boxes(groups, lambda box: resized_box(mirrored_box(box, size[0]) if flipped else box,
                                                               size, input_size))
        return tensor, groups, split_key(key)[0]


class SkipCounter:
    """Samples skipped while loading, counted across data-loader worker processes."""

    def __init__(self):
        self.value = multiprocessing.get_context("spawn").Value("i", 0)

    def add(self) -> None:
        with self.value.get_lock():
            self.value.value += 1

    def __int__(self) -> int:
        return self.value.value


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file as `load_image` gives it (EXIF rotation applied), without decoding it
    (PNG excepted: PIL decodes it to find its EXIF)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except Exception as e:  # not an image, truncated, missing: PIL raises many kinds of error
        raise VLMError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from None
    return (height, width) if turned else (width, height)


class FlatRecords(Sequence[Record]):
    """Records kept as one numpy byte buffer of their pickles and an array of where each ends (detectron2's way of
    storing a dataset list).

    Data-loader workers are forked: they share the main process's memory until they write to it, and reading a
    Python object writes its reference count (and the garbage collector walks every container), so over an epoch
    a list of records would be copied into every worker. The buffer is two objects, read without writing: its
    pages stay shared. Indexing unpickles a fresh `Record`.
    """

    def __init__(self, records: Iterable[Record]):
        pickles = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum([len(b) for b in pickles], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(pickles), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Record:
        index = range(len(self._ends))[index]  # negative indices count from the end; out of range: IndexError
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._buffer[start:int(self._ends[index])])

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))


class RecordDataset(Dataset):
    """Records of one file-based source -> items. An unreadable image stops (strict) or is skipped and counted.

    The records are kept as `FlatRecords` (given so, or converted), which forked data-loader workers share."""

    def __init__(self, records: Sequence[Record], sampler: Sampler, strict: bool, skipped: SkipCounter | None = None):
        if not records:
            raise VLMError("a data source has no usable records")
        self.records = records if isinstance(records, FlatRecords) else FlatRecords(records)
        self.sampler, self.strict = sampler, strict
        self.skipped = skipped or SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def references(self, index: int) -> dict:
        return references(self.records[index])

    def __getitem__(self, key: Key) -> Item:
        index, _ = split_key(key)
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            record = self.records[i]
            try:
                image = load_image(record.image)
            except VLMError as e:
                if self.strict:
                    raise VLMError(f"{record.where}: {e}") from None
                self.skipped.add()
                log.warning("skipped %s: %s", record.where, e)
                continue
            return self.sampler(image, record.captions, record.questions, rekey(key, i), record.regions)
        raise VLMError("no readable image in the data source")

    def sequences(self, key: Key, input_size: tuple[int, int]) -> list[list[TrainingSequence]]:
        """Item ``key`` without its image (training from cached features of input images of ``input_size``,
        (width, height)): the same draws, regions included (their boxes need only the image's size, read from the
        file's header). No augmentation: the cached maps are those of the plain resized images."""
        record = self.records[split_key(key)[0]]
        boxes = []
        if record.regions:
            size = image_size(record.image)
            boxes = [(r.phrase, resized_box(r.bbox, size, input_size)) for r in record.regions]
        return self.sampler.sequences(record.captions, record.questions, draw_rng(self.sampler.seed, key), boxes)


class Mixture(Dataset):
    """Several datasets as one, index by index (references too)."""

    def __init__(self, datasets: list[RecordDataset]):
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[RecordDataset, int]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.datasets[k], index - int(self.offsets[k])

    def __getitem__(self, key: Key) -> Item:
        index, _ = split_key(key)
        dataset, i = self._locate(index)
        image, groups, _ = dataset[rekey(key, i)]
        return image, groups, index

    def references(self, index: int) -> dict:
        dataset, i = self._locate(index)
        return dataset.references(i)

    def sequences(self, key: Key, input_size: tuple[int, int]) -> list[list[TrainingSequence]]:
        dataset, i = self._locate(split_key(key)[0])
        return dataset.sequences(rekey(key, i), input_size)


def mixture_weights(sizes: list[int], weights: list[float]) -> Tensor:
    """Per-sample sampling weights so that source k makes up weights[k] / sum(weights) of the draws."""
    return torch.cat([torch.full((n,), w / n, dtype=torch.double) for n, w in zip(sizes, weights, strict=True)])


def shard_sample(sample: dict, where: str, caption_key: str | None = None
                 ) -> tuple[bytes, list[str], list[Question]]:
    """Image bytes, captions and questions of one WebDataset sample (img2dataset layout: KEY.jpg + .txt/.json).

    ``caption_key`` (`SourceConfig.caption_key`): the .json key whose caption(s) are used, or "txt" for the .txt
    alt-text; None: .json "captions" or "caption", else the .txt."""
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise VLMError(f"{where}: no image ({', '.join(IMAGE_KEYS)}) in the sample")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VLMError(f"{where}.json: invalid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise VLMError(f"{where}.json: expected a JSON object")
    if caption_key == "txt":
        captions = []
    elif caption_key is not None:
        captions = meta.get(caption_key) or []
        captions = [captions] if isinstance(captions, str) else captions
    else:
        captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    if not captions and "txt" in sample and caption_key in (None, "txt"):
        captions = [sample["txt"].decode("utf-8", errors="replace")]
    captions = [" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()]
    questions = shard_questions(meta.get("questions"), f"{where}.json")
    if not captions and not questions:
        raise VLMError(f"{where}: no caption (.txt or .json \"caption\"/\"captions\") and no questions")
    return image, captions, questions


def shard_questions(given, where: str) -> list[Question]:
    """The questions of a sample's .json, checked as the JSONL reader checks its lines (a question is an object
    with a non-empty string "question" and "answers": a non-empty list of non-empty strings); a VLMError names the
    first bad one, and the sample is skipped (or stops training with ``data.strict``)."""
    if given is None:
        return []
    if not isinstance(given, list):
        raise VLMError(f"{where}: \"questions\" must be a list")
    questions = []
    for n, q in enumerate(given):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
            raise VLMError(f"{where}: questions[{n}] must be an object with a non-empty string \"question\"")
        answers = given_answers(q)
        if answers is None:
            raise VLMError(f"{where}: questions[{n}] needs {ANSWERS_NEEDED}")
        questions.append(Question(" ".join(q["question"].split()), answers, q.get("question_id"), q.get("answer_type")))
    return questions


def reader_share(shards: list[str], reader: int, readers: int) -> tuple[list[str], int, int]:
    """What reader ``reader`` of ``readers`` reads: its shards, and which of their samples it keeps (the j-th
    sample read when j % parts == part).

    With at least as many shards as readers, reader r reads whole shards r, r + readers, ...; with fewer, the
    readers share the shards round-robin and those sharing one split its samples. Either way every sample is read
    by exactly one reader per pass.
    """
    if len(shards) >= readers:
        return shards[reader::readers], 0, 1
    shard = reader % len(shards)
    return [shards[shard]], reader // len(shards), len(range(shard, readers, len(shards)))


def shard_urls(pattern: str, where: str) -> list[str]:
    """The shards a source's path lists: brace patterns (``{00000..00099}``) expanded, globs of local shards matched
    (sorted), URLs kept. A listed local shard that does not exist, or no shard at all, is an error naming ``where``
    (the option or source)."""
    import glob

    import webdataset as wds

    shards = []
    for url in wds.shardlists.expand_urls(pattern):
        local = "://" not in url and not url.startswith("pipe:")
        if local and re.search(r"[*?[]", url) and not os.path.exists(url):  # a pattern of local shards
            shards += sorted(glob.glob(url, recursive=True))
        elif local and not os.path.isfile(url.removeprefix("file:")):
            raise VLMError(f"{where}: no such shard {url}")
        else:
            shards.append(url)
    if not shards:
        raise VLMError(f"{where}: no shards")
    return shards


ENDLESS = 2**62  # the length a training stream reports: it is read again and again, until trainer.max_steps


class EndlessStream(IterableDataset):
    """A training stream, read again and again. It reports a length (`ENDLESS`): Lightning fetches one batch ahead
    of training from a loader of unknown length (to see its end), which a resumed run would have skipped; with a
    length it fetches each batch as it trains on it. Where a resumed run starts is `ResumedStream`'s."""

    def __len__(self) -> int:
        return ENDLESS


_rotation = 0  # set in a loader worker by `ResumedStream`: the worker reads as worker (id + rotation) % workers


class ResumedStream(EndlessStream):
    """A training stream going on after the first ``batches`` batches of ``batch_size`` (those a resumed run trained
    on, over all its loader workers), exactly as the uninterrupted run's loader would.

    The loader hands out batches from its workers in turn, so worker w had made batches w, w + W, ...; a fresh
    loader starts with worker 0, which therefore reads as worker ``batches % W`` did (and so on), and each skips
    the items its batches held (``stream.items(skip)``: shard samples are read but not decoded, file records not
    read, nothing drawn or transformed), in all the workers at once."""

    def __init__(self, stream: ShardDataset | RecordStream | StreamMixture, batches: int, batch_size: int):
        self.stream, self.batches, self.batch_size = stream, batches, batch_size

    def __iter__(self) -> Iterator[Item]:
        global _rotation
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        _rotation = self.batches % workers
        made = len(range((worker + _rotation) % workers, self.batches, workers))  # batches that worker made
        return self.stream.items(made * self.batch_size)


class ShardDataset(EndlessStream):
    """WebDataset tar shards (local paths, URLs, brace patterns or globs of local shards: `shard_urls`) streamed
    without unpacking.

    Shards are split across the readers, DDP ranks times data-loader workers (`reader_share`), and read again and
    again in training. With a ``shuffle_buffer`` (training: ``data.shuffle_buffer``), each pass reads the shards
    in an order of its own, the same in every reader (seeded by ``seed`` and the pass, so the readers still split
    them exactly), and each reader's samples go through a buffer of that many that yields them in random order
    (seeded by ``seed``, the pass and the reader); every sample is still read once per pass.
    """

    def __init__(self, source: SourceConfig, sampler: Sampler, strict: bool, skipped: SkipCounter | None = None,
                 repeat: bool = True, seed: int = 0, shuffle_buffer: int = 0):
        if shuffle_buffer < 0:
            raise VLMError(f"data.shuffle_buffer: expected 0 (off) or a positive number of samples, got "
                           f"{shuffle_buffer}")
        self.source, self.sampler, self.strict, self.repeat, self.seed = source, sampler, strict, repeat, seed
        self.shuffle_buffer = shuffle_buffer
        self.shards = shard_urls(source.path, source.path)  # listed once, up front: a missing shard is named now
        self.skipped = skipped or SkipCounter()

    def samples(self, reader: int = 0, readers: int = 1, order: int | None = None
                ) -> Iterator[tuple[str, dict | VLMError]]:
        """(where, raw sample) of every sample reader ``reader`` of ``readers`` reads (all of them by default), the
        shards in their listed order, or with ``order`` in the shuffled order of that pass.

        A shard that breaks off (truncated, corrupt, a failed download) gives the samples it held, then (shard,
        VLMError saying where it broke) in place of a sample, from the first of the readers sharing it; reading
        goes on with the next shard, and the caller reports the error, or raises it with ``strict``."""
        import webdataset as wds

        shards = self.shards
        if order is not None:
            shards = [shards[i] for i in np.random.default_rng((self.seed, order)).permutation(len(shards))]
        shards, part, parts = reader_share(shards, reader, readers)
        j = 0  # samples read so far, over this reader's shards
        for url in shards:
            read, key = 0, None
            try:
                for sample in wds.tariterators.tarfile_samples([{"url": url}]):
                    if j % parts == part:
                        yield f"{sample.get('__url__', url)}: {sample['__key__']}", sample
                    j, read, key = j + 1, read + 1, sample["__key__"]
            except Exception as e:  # tarfile's, a stream's, the network's: many kinds
                if part == 0:
                    yield url, broken_shard(url, e, read, key)

    def _pass(self, reader: int, readers: int, number: int) -> Iterator[tuple[str, dict | VLMError]]:
        """One pass of this reader's samples, shuffled with a buffer when there is one."""
        if not self.shuffle_buffer:
            return self.samples(reader, readers)
        return shuffled(self.samples(reader, readers, order=number), self.shuffle_buffer,
                        np.random.default_rng((self.seed, number, reader)))

    def __len__(self) -> int:
        if not self.repeat:  # one pass (validation, vocabulary): a length only reading could tell
            raise TypeError("one pass over shards has no known length")
        return ENDLESS

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def items(self, skip: int = 0) -> Iterator[Item]:
        """The stream's items after its first ``skip`` (`ResumedStream`), which are neither decoded nor drawn.

        Each sample a reader reads is one item of its stream, so that positions do not depend on decoding: in
        training (``repeat``), an unreadable sample (reported and counted) gives its place to the next readable
        one, drawn again with the unreadable one's key (as a file record's index gives the next readable image);
        a single pass (``repeat`` off) leaves it out."""
        reader, readers = _stream_position()
        count, waiting = 0, []  # samples read (over passes); keys of unreadable ones waiting for a readable one
        for number in range(ENDLESS):
            seen, readable = count, False
            for where, sample in self._pass(reader, readers, number):
                count += 1
                if count <= skip:  # trained on before the resumed run: only counted
                    continue
                try:
                    if isinstance(sample, VLMError):  # the shard broke off here; its samples before are kept
                        raise sample
                    data, captions, questions = shard_sample(sample, where, self.source.caption_key)
                    image = load_image(data, name=where)
                except VLMError as e:
                    if self.strict:
                        raise
                    self.skipped.add()
                    log.warning("skipped %s", e)
                    if self.repeat:
                        waiting.append(count - 1)
                    continue
                for key in [*waiting, count - 1]:  # a reader's count runs on over passes
                    yield self.sampler(image, captions, questions, (key, 0))
                waiting, readable = [], True
            if not self.repeat:
                return
            if count == seen or (not readable and seen >= skip):  # another pass would find none readable either
                raise VLMError(f"{self.source.path}: reader {reader} of {readers} (DDP processes x data-loader "
                               "workers) got no usable sample; a shard has fewer samples than the readers sharing "
                               "it, or all were skipped. Use fewer data.num_workers or more shards")


def broken_shard(url: str, error: Exception, read: int, key: str | None) -> VLMError:
    """One line saying where shard ``url`` broke off: after ``read`` samples, the last with key ``key``."""
    detail = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    detail = " ".join(detail.split())[:300] or "corrupt data"
    where = f"after {read} sample(s), the last {key}" if read else "from its start"
    return VLMError(f"{url}: unreadable {where} ({error.__class__.__name__}: {detail})")


def shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """``items`` in random order through a buffer of ``size``: once it is full, each new item takes the place of
    one drawn at random, which is yielded; what remains at the end comes out shuffled (a stream's shuffle, as
    WebDataset's ``shuffle``, held to memory of ``size`` items)."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _stream_position() -> tuple[int, int]:
    """(this reader's number, how many readers) over DDP processes and data-loader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + (worker + _rotation) % workers, world * workers


class RecordStream(EndlessStream):
    """A file-based dataset read as an endless stream in a fresh random order each pass (to mix with shards)."""

    def __init__(self, dataset: RecordDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def items(self, skip: int = 0) -> Iterator[Item]:
        """The stream's items after its first ``skip`` (`ResumedStream`), which are not read (each index gives one
        item, an unreadable image being replaced by the next readable one)."""
        reader, readers = _stream_position()
        share = len(range(reader, len(self.dataset), readers))  # this reader's indices of each epoch
        if not share:
            raise VLMError(f"{len(self.dataset)} records for {readers} readers (DDP processes x data-loader "
                           f"workers): reader {reader} gets none; use fewer data.num_workers")
        first = skip // share  # the epochs skipped whole are not even drawn
        for epoch in range(first, ENDLESS):
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))[reader::readers]
            for i in order[skip - first * share if epoch == first else 0:]:
                yield self.dataset[(int(i), epoch)]


class StreamMixture(EndlessStream):
    """Streams interleaved at random by weight: each item comes from stream k with probability weights[k]."""

    def __init__(self, streams: list[IterableDataset], weights: list[float], seed: int):
        self.streams, self.seed = streams, seed
        self.p = np.asarray(weights, dtype=float) / sum(weights)

    def __iter__(self) -> Iterator[Item]:
        return self.items()

    def items(self, skip: int = 0) -> Iterator[Item]:
        """The mixture's items after its first ``skip`` (`ResumedStream`): the draws of those say how many items
        of each stream to skip."""
        reader, _ = _stream_position()
        rng = np.random.default_rng((self.seed, reader))
        drawn = rng.choice(len(self.streams), size=skip, p=self.p)  # the same draws as one at a time
        skips = np.bincount(drawn, minlength=len(self.streams))
        iterators = [s.items(int(k)) for s, k in zip(self.streams, skips, strict=True)]
        count = skip
        while True:
            image, groups, _ = next(iterators[rng.choice(len(iterators), p=self.p)])
            yield image, groups, count
            count += 1


def shard_texts(source: SourceConfig, limit: int) -> list[str]:
    """Texts of the first samples of a shard source, to build the vocabulary from."""
    texts: list[str] = []
    for where, sample in ShardDataset(source, None, strict=False, repeat=False).samples():
        if isinstance(sample, VLMError):  # a broken shard: training reports it
            continue
        try:
            _, captions, questions = shard_sample(sample, where, source.caption_key)
        except VLMError:
            continue
        texts += [*captions, *(t for q in questions for t in (q.question, *q.answers))]
        if len(texts) >= limit:
            break
    return texts[:limit]


class SourceData:
    """The records of file-based sources, read once (with their reports) and shared by the tokenizer and the data.

    Each source's records are kept as `FlatRecords` (the lists that read them are freed), and shards as None.
    ``name`` (the config key of ``sources``, for messages): a source whose weight is not positive is an error before
    any source is read, and so is one with no caption or question (regions alone: nothing to train on, since they
    only ground caption words) before the tokenizer and the model are built."""

    def __init__(self, sources: list[SourceConfig], strict: bool, name: str = "data.sources"):
        self.sources = sources
        self.records: list[FlatRecords | None] = []
        self.reports: list[Report] = []
        for i, source in enumerate(sources):
            if not (isinstance(source.weight, (int, float)) and 0 < source.weight < math.inf):
                raise VLMError(f"{name}[{i}].weight: expected a positive number, got {source.weight!r}")
        for source in sources:
            if detect_format(source) == "webdataset":
                self.records.append(None)
                self.reports.append(Report())
            else:
                records, report = read_records(source, strict=strict)
                if not records:
                    raise VLMError(f"{source.path}: no usable records"
                                   + (f" ({report.problems[0]}, ...)" if report.problems else ""))
                if not any(r.captions or r.questions for r in records):
                    raise VLMError(f"{source.path}: no captions or questions to train on, only regions (which "
                                   "ground caption words); give captions too, e.g. the captions file as path and "
                                   "this one as annotations")
                for problem in report.problems:
                    log.warning("skipped %s", problem)
                self.records.append(FlatRecords(records))
                del records
                self.reports.append(report)

    def texts(self, limit: int) -> list[str]:
        texts: list[str] = []
        for source, records in zip(self.sources, self.records, strict=True):
            if records is None:
                texts += shard_texts(source, limit - len(texts))
            else:
                texts += islice((t for r in records for t in record_texts(r)), limit - len(texts))
            if len(texts) >= limit:
                break
        return texts

    def summary(self) -> list[dict]:
        return [{"path": s.path, "format": detect_format(s), "records": rep.records if recs is not None else None,
                 "skipped": rep.skipped, "problems": rep.problems[:20]}
                for s, recs, rep in zip(self.sources, self.records, self.reports, strict=True)]
