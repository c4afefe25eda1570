"""Training and validation data from datasets on disk (records) and WebDataset shards, mixed by weight.

An item is the same as the built-in scenes' (`vlm.data.builtin.Item`): the image tensor, its caption and
question-answer sequences, and its index; `vlm.data.builtin.collate` batches both kinds.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader  # resumable: it saves its position

from vlm.config import DataConfig, SourceConfig
from vlm.data.builtin import (
    Item,
    TrainingSequence,
    UnitBox,
    _draw,
    caption_sequence,
    collate,
    fraction_box,
    question_sequence,
)
from vlm.data.images import load_image
from vlm.data.records import Question, Record, Region, Report, detect_format, read_records
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


class Sampler:
    """Turns one image and its texts into an item: draws the sequences, flips only when no text says left/right."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, transform: Transform, train: bool):
        self.cfg, self.tokenizer, self.transform, self.train = cfg, tokenizer, transform, train

    def seed(self, index: int) -> int:
        """Training draws fresh texts (and flips) every epoch; validation always the same ones."""
        return int(torch.randint(2**31, ())) if self.train else index

    def sequences(self, captions: list[str], questions: list[Question], rng: np.random.Generator,
                  regions: Sequence[tuple[str, UnitBox]] = ()) -> list[list[TrainingSequence]]:
        """The item's groups: caption sequences (grounded where they name a region), then question-answer ones."""
        tok = self.tokenizer
        caption_seqs = [caption_sequence(tok, captions[i], regions)
                        for i in _draw(rng, len(captions), self.cfg.captions_per_image)] if captions else []
        question_seqs = [question_sequence(tok, questions[i].question, questions[i].answer)
                         for i in _draw(rng, len(questions), self.cfg.questions_per_image)] if questions else []
        return [caption_seqs, question_seqs]

    def __call__(self, image: Image.Image, captions: list[str], questions: list[Question], index: int,
                 regions: Sequence[Region] = ()) -> Item:
        rng = np.random.default_rng(self.seed(index))
        # The random crop moves the regions where no box follows them: no grounded tokens then.
        boxes = [] if self.train and self.cfg.crop_scale < 1.0 else [
            (r.phrase, fraction_box(r.bbox, image.size)) for r in regions]
        groups = self.sequences(captions, questions, rng, boxes)
        if (self.train and self.cfg.hflip > 0 and rng.random() < self.cfg.hflip
                and not mentions_side([*captions, *(t for q in questions for t in (q.question, *q.answers))])):
            image = ImageOps.mirror(image)
            groups = [[(ids, prompt_len, [(p, (1 - x1, y0, 1 - x0, y1)) for p, (x0, y0, x1, y1) in grounded])
                       for ids, prompt_len, grounded in group] for group in groups]
        return self.transform(image), groups, index


class SkipCounter:
    """Samples skipped while loading, counted across data-loader worker processes."""

    def __init__(self):
        self.value = multiprocessing.get_context("spawn").Value("i", 0)

    def add(self) -> None:
        with self.value.get_lock():
            self.value.value += 1

    def __int__(self) -> int:
        return self.value.value


class RecordDataset(Dataset):
    """Records of one file-based source -> items. An unreadable image stops (strict) or is skipped and counted."""

    def __init__(self, records: list[Record], sampler: Sampler, strict: bool, skipped: SkipCounter | None = None):
        if not records:
            raise VLMError("a data source has no usable records")
        self.records, self.sampler, self.strict = records, sampler, strict
        self.skipped = skipped or SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def references(self, index: int) -> dict:
        return references(self.records[index])

    def __getitem__(self, index: int) -> Item:
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
            return self.sampler(image, record.captions, record.questions, i, record.regions)
        raise VLMError("no readable image in the data source")

    def sequences(self, index: int) -> list[list[TrainingSequence]]:
        """Item ``index`` without its image (training from cached features; its regions are not read then, as
        their boxes need the image's size)."""
        record = self.records[index]
        return self.sampler.sequences(record.captions, record.questions,
                                      np.random.default_rng(self.sampler.seed(index)))


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

    def __getitem__(self, index: int) -> Item:
        dataset, i = self._locate(index)
        image, groups, _ = dataset[i]
        return image, groups, index

    def references(self, index: int) -> dict:
        dataset, i = self._locate(index)
        return dataset.references(i)

    def sequences(self, index: int) -> list[list[TrainingSequence]]:
        dataset, i = self._locate(index)
        return dataset.sequences(i)


def mixture_weights(sizes: list[int], weights: list[float]) -> Tensor:
    """Per-sample sampling weights so that source k makes up weights[k] / sum(weights) of the draws."""
    return torch.cat([torch.full((n,), w / n, dtype=torch.double) for n, w in zip(sizes, weights, strict=True)])


def shard_sample(sample: dict, where: str) -> tuple[bytes, list[str], list[Question]]:
    """Image bytes, captions and questions of one WebDataset sample (img2dataset layout: KEY.jpg + .txt/.json)."""
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise VLMError(f"{where}: no image ({', '.join(IMAGE_KEYS)}) in the sample")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VLMError(f"{where}.json: invalid JSON ({e})") from None
    captions = meta.get("captions") or ([meta["caption"]] if meta.get("caption") else [])
    if not captions and "txt" in sample:
        captions = [sample["txt"].decode("utf-8", errors="replace")]
    captions = [" ".join(c.split()) for c in captions if isinstance(c, str) and c.strip()]
    questions = [Question(q["question"], list(q["answers"]), q.get("question_id"), q.get("answer_type"))
                 for q in meta.get("questions", []) if q.get("question") and q.get("answers")]
    if not captions and not questions:
        raise VLMError(f"{where}: no caption (.txt or .json \"caption\"/\"captions\") and no questions")
    return image, captions, questions


class ShardDataset(IterableDataset):
    """WebDataset tar shards (local paths, URLs or brace patterns) streamed without unpacking.

    Shards are split across processes (DDP ranks) and data-loader workers, and read again and again in training.
    """

    def __init__(self, source: SourceConfig, sampler: Sampler, strict: bool, skipped: SkipCounter | None = None,
                 repeat: bool = True, seed: int = 0):
        self.source, self.sampler, self.strict, self.repeat, self.seed = source, sampler, strict, repeat, seed
        self.skipped = skipped or SkipCounter()

    def samples(self) -> Iterator[tuple[str, dict]]:
        """(where, raw sample) of every sample of every shard this process and worker reads."""
        import webdataset as wds

        pipeline = wds.WebDataset(self.source.path, shardshuffle=False, nodesplitter=wds.split_by_node,
                                  workersplitter=wds.split_by_worker, empty_check=False)
        for sample in pipeline:
            yield f"{sample.get('__url__', self.source.path)}: {sample['__key__']}", sample

    def __iter__(self) -> Iterator[Item]:
        count = 0
        while True:
            for where, sample in self.samples():
                try:
                    data, captions, questions = shard_sample(sample, where)
                    image = load_image(data, name=where)
                except VLMError as e:
                    if self.strict:
                        raise
                    self.skipped.add()
                    log.warning("skipped %s", e)
                    continue
                yield self.sampler(image, captions, questions, count)
                count += 1
            if not self.repeat:
                return


def _stream_position() -> tuple[int, int]:
    """(this reader's number, how many readers) over DDP processes and data-loader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + worker, world * workers


class RecordStream(IterableDataset):
    """A file-based dataset read as an endless stream in a fresh random order each pass (to mix with shards)."""

    def __init__(self, dataset: RecordDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __iter__(self) -> Iterator[Item]:
        reader, readers = _stream_position()
        for epoch in range(2**62):
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
            for i in order[reader::readers]:
                yield self.dataset[int(i)]


class StreamMixture(IterableDataset):
    """Streams interleaved at random by weight: each item comes from stream k with probability weights[k]."""

    def __init__(self, streams: list[IterableDataset], weights: list[float], seed: int):
        self.streams, self.seed = streams, seed
        self.p = np.asarray(weights, dtype=float) / sum(weights)

    def __iter__(self) -> Iterator[Item]:
        reader, _ = _stream_position()
        rng = np.random.default_rng((self.seed, reader))
        iterators = [iter(s) for s in self.streams]
        count = 0
        while True:
            image, groups, _ = next(iterators[rng.choice(len(iterators), p=self.p)])
            yield image, groups, count
            count += 1


def shard_texts(source: SourceConfig, limit: int) -> list[str]:
    """Texts of the first samples of a shard source, to build the vocabulary from."""
    texts: list[str] = []
    for where, sample in ShardDataset(source, None, strict=False, repeat=False).samples():
        try:
            _, captions, questions = shard_sample(sample, where)
        except VLMError:
            continue
        texts += [*captions, *(t for q in questions for t in (q.question, *q.answers))]
        if len(texts) >= limit:
            break
    return texts[:limit]


class SourceData:
    """The records of file-based sources, read once (with their reports) and shared by the tokenizer and the data."""

    def __init__(self, sources: list[SourceConfig], strict: bool):
        self.sources = sources
        self.records: list[list[Record] | None] = []
        self.reports: list[Report] = []
        for source in sources:
            if detect_format(source) == "webdataset":
                self.records.append(None)
                self.reports.append(Report())
            else:
                records, report = read_records(source, strict=strict)
                if not records:
                    raise VLMError(f"{source.path}: no usable records"
                                   + (f" ({report.problems[0]}, ...)" if report.problems else ""))
                for problem in report.problems:
                    log.warning("skipped %s", problem)
                self.records.append(records)
                self.reports.append(report)

    def texts(self, limit: int) -> list[str]:
        texts: list[str] = []
        for source, records in zip(self.sources, self.records, strict=True):
            if records is None:
                texts += shard_texts(source, limit - len(texts))
            else:
                texts += [t for r in records for t in record_texts(r)][: limit - len(texts)]
            if len(texts) >= limit:
                break
        return texts

    def summary(self) -> list[dict]:
        return [{"path": s.path, "format": detect_format(s), "records": rep.records if recs is not None else None,
                 "skipped": rep.skipped, "problems": rep.problems[:20]}
                for s, recs, rep in zip(self.sources, self.records, self.reports, strict=True)]


class SourceDataModule(L.LightningDataModule):
    """Training data mixed from sources by weight; validation from file-based sources."""

    def __init__(self, cfg: DataConfig, train: SourceData, val: SourceData | None, tokenizer: Tokenizer,
                 train_transform: Transform, val_transform: Transform):
        super().__init__()
        self.cfg, self.pad_id = cfg, tokenizer.pad_id
        self.skipped = SkipCounter()
        sampler = Sampler(cfg, tokenizer, train_transform, train=True)
        if any(r is None for r in train.records):  # shards stream: every source becomes a stream, mixed by weight
            streams = [ShardDataset(s, sampler, cfg.strict, self.skipped, seed=cfg.seed) if r is None
                       else RecordStream(RecordDataset(r, sampler, cfg.strict, self.skipped), cfg.seed)
                       for s, r in zip(train.sources, train.records, strict=True)]
            self.train_set: Dataset = streams[0] if len(streams) == 1 else StreamMixture(
                streams, [s.weight for s in train.sources], cfg.seed)
            self.weights = None
        else:
            datasets = [RecordDataset(r, sampler, cfg.strict, self.skipped) for r in train.records]
            self.train_set = Mixture(datasets)
            self.weights = mixture_weights([len(d) for d in datasets], [s.weight for s in train.sources])
        self.val_set = None
        if val is not None and val.sources:
            if any(r is None for r in val.records):
                raise VLMError("validation sources must be files (COCO, Karpathy, VQA, JSONL), not shards")
            val_sampler = Sampler(cfg, tokenizer, val_transform, train=False)
            self.val_set = Mixture([RecordDataset(r, val_sampler, cfg.strict, self.skipped) for r in val.records])

    def _loader(self, dataset: Dataset, sampler=None, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        return StatefulDataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, shuffle=shuffle,
                                  num_workers=self.cfg.num_workers, collate_fn=partial(collate, pad_id=self.pad_id),
                                  drop_last=drop_last, persistent_workers=self.cfg.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self.weights is None:  # streamed
            return self._loader(self.train_set)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        sampler = WeightedRandomSampler(self.weights, num_samples=len(self.weights), generator=generator)
        return self._loader(self.train_set, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set)
