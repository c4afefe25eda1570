"""The data of a training run as one LightningDataModule: the built-in scenes, or datasets on disk and WebDataset
shards mixed by weight, and with ``data.feature_cache`` either one's cached encoder maps instead of its images.

Every kind gives the same batches (`vlm.data.batch.Batch`) from the same loaders: torchdata's StatefulDataLoader,
whose position (for indexed data the state of `TrainOrder`) a checkpoint stores, so a resumed run continues the
batches of the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vlm.config import DataConfig
from vlm.data.batch import Batch, collate
from vlm.data.builtin import SceneDataset
from vlm.data.datasets import (
    EndlessStream,
    Mixture,
    RecordDataset,
    RecordStream,
    ResumedStream,
    Sampler,
    ShardDataset,
    SkipCounter,
    SourceData,
    StreamMixture,
    mixture_weights,
)
from vlm.data.features import CachedDataset, build_cache
from vlm.data.transforms import input_size
from vlm.errors import VLMError
from vlm.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# torchdata's StatefulDataLoader calls a deprecated torch function on every iteration; the warning is not ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
# Lightning's caution for an IterableDataset with a length: a training stream's is `ENDLESS`, and its readers are split.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

Transform = Callable[[Image.Image], Tensor]


class TrainOrder(DistributedSampler):
    """The training order, split over the DDP processes: a function of (seed, epoch) alone. Yields `Key`s
    (index, epoch), so every draw of an item is seeded too.

    A permutation per epoch, or with ``weights`` (one per sample) draws with replacement by weight. Every
    process gets ceil(n / processes) keys, padded with repeats like torch's DistributedSampler, in batches of
    ``batch_size`` (an incomplete last batch is dropped).

    The epoch and the position within it are the sampler's state, which torchdata's StatefulDataLoader stores in
    the checkpoint, so a resumed run continues the same order: it is restored before the loader starts, and
    Lightning sets the epoch only after that (it leaves a DistributedSampler in place under DDP). An epoch restored
    in its middle wins over the loop's: a run that stopped at ``max_steps`` there saved its loop at the next epoch
    (Lightning counts the stopped epoch as done), so resuming it with more steps would otherwise start a new
    permutation at the old position, skipping samples; the loop's later epochs follow the restored one. A state
    saved after an epoch's last batch starts the next epoch, as the loop does.
    """

    def __init__(self, size: int, seed: int, batch_size: int, weights: Tensor | None = None):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(range(size), num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed)
        self.batch_size, self.weights = batch_size, weights
        self.yielded, self._resume_at = 0, 0  # keys of this epoch given out by this process; where to resume
        self._restored: int | None = None  # the epoch restored by load_state_dict, until the loop next sets one
        self._epoch_offset = 0  # this sampler's epoch minus the loop's

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        order = (torch.randperm(n, generator=g) if self.weights is None
                 else torch.multinomial(self.weights, n, replacement=True, generator=g)).tolist()
        order = (order * math.ceil(self.total_size / n))[: self.total_size]
        self.yielded, self._resume_at = self._resume_at, 0
        for index in order[self.rank : self.total_size : self.num_replicas][self.yielded :]:
            self.yielded += 1
            yield index, self.epoch

    def set_epoch(self, epoch: int) -> None:
        if self._restored is not None:
            self._epoch_offset, self._restored = self._restored - epoch, None
        super().set_epoch(epoch + self._epoch_offset)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.num_samples - state["yielded"] < self.batch_size:  # written after the epoch's last batch
            self.epoch, self._resume_at = state["epoch"] + 1, 0
        else:
            self.epoch, self._resume_at = state["epoch"], state["yielded"]
        self._restored = self.epoch if self._resume_at else None  # mid-epoch: that epoch goes on


def _layout_text(layout: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in layout.items())


class StreamLoader(StatefulDataLoader):
    """The loader of a training stream. Its position is the data module's (`ResumedStream`): torchdata's own state
    counts the batches its iterator gave out, which after a stop at max_steps is none (Lightning ends the loop's
    iterator), so a resumed run read the stream again from its start."""

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class DataModule(L.LightningDataModule):
    """Training and validation data of a run (`DataConfig`):

    - the built-in scenes when ``cfg.sources`` is empty (validation: the held-out scenes);
    - otherwise ``cfg.sources`` mixed by weight: file-based ones indexed and drawn by weight (`TrainOrder`), or, with
      any WebDataset shards among them, all streamed (`StreamMixture`); validation from ``cfg.val_sources`` (files
      only), none without. ``train_data`` and ``val_data`` are these sources already read (`SourceData`, as
      ``vlm train`` reads them to build the vocabulary); they are read here when not given;
    - with ``cfg.feature_cache``, either one with each image replaced by the trunk map of ``encoder`` (frozen),
      computed once per split into a memory-mapped file (`vlm.data.features.build_cache`) in `prepare_data`.

    ``transform`` makes the model's input images (``image_size``, the encoder's: a side or [height, width]);
    ``train_transform`` (default ``transform``) those of file-based and streamed training data, e.g. with
    ``data.crop_scale``'s random crop; the built-in scenes are never augmented. ``seed`` (the run's,
    ``trainer.seed``) sets the training order and the items' draws.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, transform: Transform, image_size: int | list[int], *,
                 train_transform: Transform | None = None, seed: int = 0, train_data: SourceData | None = None,
                 val_data: SourceData | None = None, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg, self.seed, self.pad_id = cfg, seed, tokenizer.pad_id
        height, width = input_size(image_size)
        self.input_size = (width, height)  # of the model's input images, where the batches' boxes are
        self.weights: Tensor | None = None  # indexed sources mixed by weight: each sample's sampling weight
        self._skipped: SkipCounter | None = None
        self._loaders: list[StatefulDataLoader] = []  # every loader made, so that `stop_workers` reaches them
        self.train_batches = 0  # training batches taken so far, over resumes (`state_dict`)
        self._resumed_layout: dict[str, int] | None = None  # `_stream_layout` of the run resumed
        if cfg.sources:
            self._skipped = SkipCounter()
            self.train_set, self.weights = self._sources_train_set(
                train_data or SourceData(cfg.sources, cfg.strict), tokenizer, train_transform or transform)
            if val_data is None and cfg.val_sources:
                val_data = SourceData(cfg.val_sources, cfg.strict, "data.val_sources")
            self.val_set = self._sources_val_set(val_data, tokenizer, transform)
        else:
            self.train_set = SceneDataset("train", cfg, tokenizer, transform, image_size, seed)
            self.val_set = SceneDataset("val", cfg, tokenizer, transform, image_size)
        self.encoder = encoder if cfg.feature_cache else None
        if cfg.feature_cache:
            if encoder is None or encoder.cfg.trainable:
                raise VLMError("data.feature_cache needs a frozen encoder: set model.encoder.trainable: false")
            if cfg.hflip > 0 or cfg.crop_scale < 1:
                raise VLMError("data.feature_cache: cached features cannot be augmented; set data.hflip: 0 and "
                               "data.crop_scale: 1")
            if isinstance(self.train_set, IterableDataset):
                raise VLMError("data.feature_cache works with file-based data and the built-in scenes, not shards")

    def _sources_train_set(self, train: SourceData, tokenizer: Tokenizer, transform: Transform
                           ) -> tuple[Dataset, Tensor | None]:
        """The training sources as one dataset, and the per-sample weights that mix indexed ones (None: streamed)."""
        cfg, skipped = self.cfg, self._skipped
        sampler = Sampler(cfg, tokenizer, transform, train=True, seed=self.seed)
        if any(r is None for r in train.records):  # shards stream: every source becomes a stream, mixed by weight
            streams = [ShardDataset(s, sampler, cfg.strict, skipped, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
                       if r is None
                       else RecordStream(RecordDataset(r, sampler, cfg.strict, skipped), cfg.seed)
                       for s, r in zip(train.sources, train.records, strict=True)]
            return (streams[0] if len(streams) == 1
                    else StreamMixture(streams, [s.weight for s in train.sources], cfg.seed)), None
        datasets = [RecordDataset(r, sampler, cfg.strict, skipped) for r in train.records]
        return Mixture(datasets), mixture_weights([len(d) for d in datasets], [s.weight for s in train.sources])

    def _sources_val_set(self, val: SourceData | None, tokenizer: Tokenizer, transform: Transform) -> Dataset | None:
        if val is None or not val.sources:
            return None
        if any(r is None for r in val.records):
            raise VLMError("validation sources must be files (COCO, Karpathy, VQA, JSONL), not shards")
        sampler = Sampler(self.cfg, tokenizer, transform, train=False)
        return Mixture([RecordDataset(r, sampler, self.cfg.strict, self._skipped) for r in val.records])

    @property
    def skipped(self) -> int:
        """Samples skipped while loading (unreadable images, with ``data.strict`` off), over all loader workers."""
        return 0 if self._skipped is None else int(self._skipped)

    def cache_path(self, split: str) -> Path:
        """The feature cache of a split ("train" or "val"): ``data.feature_cache`` with the split before its suffix."""
        path = Path(self.cfg.feature_cache)
        return path.with_name(f"{path.stem}.{split}{path.suffix or '.npy'}")

    def prepare_data(self) -> None:
        """Compute the feature caches once (on each node's first process); the others wait at setup."""
        if not self.cfg.feature_cache:
            return
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            if dataset is not None:
                build_cache(self.cache_path(split), dataset, self.encoder, self.cfg.batch_size, self.cfg.num_workers)

    def _loader(self, split: str, dataset: Dataset) -> StatefulDataLoader:
        """The one loader of every kind: stateful (a checkpoint records its position); training draws indexed data
        in `TrainOrder` (dropping an incomplete last batch), streams in their own order.

        Training data smaller than one batch (per process) would give no batch at all: its batches are then all
        of it, with a warning, rather than a run that trains nothing."""
        cached = bool(self.cfg.feature_cache)
        if cached:
            dataset = CachedDataset(dataset, self.cache_path(split), self.input_size)
        sampler, batch_size = None, self.cfg.batch_size
        if split == "train" and not isinstance(dataset, IterableDataset):
            sampler = TrainOrder(len(dataset), self.seed, batch_size, self.weights)
            if sampler.num_samples < batch_size:
                log.warning("data.batch_size %d is more than the %d training samples per process: batches of %d",
                            batch_size, sampler.num_samples, sampler.num_samples)
                sampler.batch_size = batch_size = sampler.num_samples
        workers = self.cfg.num_workers
        streaming = split == "train" and isinstance(dataset, EndlessStream)
        if streaming and self.train_batches:  # a resumed run: on after the batches trained on
            now = self._stream_layout()
            if self._resumed_layout not in (None, now):  # the position counts batches of each worker's readers
                log.warning("data: resuming a stream with %s, not %s as before: it goes on from about where it "
                            "stopped, not exactly", _layout_text(now), _layout_text(self._resumed_layout))
            dataset = ResumedStream(dataset, self.train_batches, batch_size)
        loader = (StreamLoader if streaming else StatefulDataLoader)(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
            collate_fn=partial(collate, pad_id=self.pad_id, features=cached), drop_last=sampler is not None,
            persistent_workers=workers > 0)
        self._loaders.append(loader)
        return loader

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.trainer is not None and self.trainer.training:
            self.train_batches += 1  # counted for every kind of data: a stream's position
        return batch

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint keeps of the data module: the training batches taken (in a run of streams, the
        position a resumed run goes on from; indexed data keeps its position in its sampler, `TrainOrder`), and the
        layout they were taken in."""
        return {"train_batches": self.train_batches, **self._stream_layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.train_batches = int(state.get("train_batches", 0))
        self._resumed_layout = {key: state[key] for key in self._stream_layout() if key in state} or None

    def _stream_layout(self) -> dict[str, int]:
        """Processes, loader workers per process and batch size: a stream's readers and their batches."""
        processes = self.trainer.world_size if self.trainer is not None else 1
        return {"processes": processes, "num_workers": self.cfg.num_workers, "batch_size": self.cfg.batch_size}

    def stop_workers(self) -> None:
        """Stop the loaders' worker processes now. A checkpoint saved after `Trainer.fit` asks each loader for its
        state, which starts its (persistent) workers again; left to the garbage collector, they were stopped only
        after a 5 s wait each, at some later point of the process (of a Python caller, a test suite)."""
        for loader in self._loaders:
            if loader._iterator is not None and hasattr(loader._iterator, "_shutdown_workers"):
                loader._iterator._shutdown_workers()
            loader._iterator = None

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", self.train_set)

    def val_dataloader(self) -> StatefulDataLoader | list:
        return [] if self.val_set is None else self._loader("val", self.val_set)
