"""`vlm train`: fit on the built-in scenes or datasets on disk with Lightning, then export the model."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import Strategy

from vlm.api import read_model
from vlm.checkpoint import save_model
from vlm.config import ModelConfig, TrainConfig
from vlm.data.builtin import scene_texts
from vlm.data.datasets import EndlessStream, SourceData
from vlm.data.module import DataModule
from vlm.data.transforms import image_transform
from vlm.errors import VLMError
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer
from vlm.train.callbacks import GenerationMetrics
from vlm.train.checkpoints import AtomicCheckpointIO, BatchLog, StepSeed, resume_model, resume_path
from vlm.train.module import CaptionModule
from vlm.train.progress import Progress, quiet_lightning
from vlm.train.scst import SCSTModule
from vlm.train.sharding import FSDPStrategy, unsharded

log = logging.getLogger(__name__)

TOKENIZER_SCENES = 2000  # training scenes whose texts build the vocabulary


def train(cfg: TrainConfig, out: str | Path, resume: str | None = None, init: str | None = None) -> Path | None:
    """Train, write Lightning checkpoints to out/checkpoints and the exported model to out/model.

    ``resume`` (a checkpoint, or "last" for out/checkpoints/last.ckpt) continues a run: step, optimizer,
    schedule and data position, with the checkpoint's model config and tokenizer (``init`` and the config's model
    and tokenizer settings are then unused: a new tokenizer would remap the token ids of the trained embeddings).
    ``init`` (an exported model or checkpoint) gives the starting weights, model config and tokenizer (required by
    SCST).

    Returns the exported model directory on the process that wrote it (rank 0), None on the others.
    """
    try:
        cfg.validate()
    except ValueError as e:
        raise VLMError(str(e)) from None
    out = Path(out)
    sharded = cfg.trainer.strategy == "fsdp"
    if sharded and cfg.scst.enabled:
        raise VLMError("trainer.strategy fsdp: SCST does not run under sharding; use ddp")
    ckpt_path = resume_path(resume, out, sharded) if resume else None  # fail before any work
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    data_cfg = cfg.data
    train_data = val_data = None
    if data_cfg.sources:
        train_data = SourceData(data_cfg.sources, data_cfg.strict)
        val_data = (SourceData(data_cfg.val_sources, data_cfg.strict, "data.val_sources") if data_cfg.val_sources
                    else None)
        if cfg.scst.enabled:
            check_scst_sources(train_data)
        texts = train_data.texts(data_cfg.tokenizer.max_texts)
    else:
        texts = scene_texts(TOKENIZER_SCENES, data_cfg.seed, data_cfg.scenes)
    tok_cfg = data_cfg.tokenizer
    resumed = None  # the model config of the checkpoint a run resumes
    if ckpt_path is not None:  # the same model and token ids, whatever --data, --model or --init say now
        resumed, tokenizer = resume_model(ckpt_path)
        start = None  # the weights come from the checkpoint
    elif init:
        start, tokenizer = read_model(init)
    else:
        try:
            start, tokenizer = None, Tokenizer.train(texts, tok_cfg.kind, tok_cfg.vocab_size, tok_cfg.min_frequency)
        except ValueError as e:  # kind or vocab_size
            raise VLMError(f"data.tokenizer: {e}") from None
    if resumed is not None or start is not None:
        source = f"--resume {resume}" if resumed is not None else f"--init {init}"
        warn_unused_model_settings(cfg.model, resumed or start.cfg, source)
    module = build_module(cfg, tokenizer, start, resumed)
    trunk, size = module.model.encoder.trunk, module.model.cfg.encoder.image_size
    data = DataModule(data_cfg, tokenizer, image_transform(trunk, size), size,
                      train_transform=image_transform(trunk, size, data_cfg.crop_scale), seed=cfg.trainer.seed,
                      train_data=train_data, val_data=val_data, encoder=module.model.encoder)
    if isinstance(data.train_set, EndlessStream) and cfg.trainer.max_steps < 1:  # the schedule needs an end too
        raise VLMError(f"trainer.max_steps {cfg.trainer.max_steps}: training on shards streams them without end; "
                       "give a number of steps")
    report = data_report(cfg, tokenizer, texts, train_data, val_data)
    if data.val_set is None:  # nothing validates, so nothing to save after: last.ckpt every interval, for --resume
        checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=cfg.trainer.val_check_interval,
                                      save_top_k=0, save_last=True)
    else:  # last.ckpt and the best by validation, after each validation
        checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                                      save_top_k=1, save_last=True,
                                      **({"monitor": "val/caption/CIDEr-D", "mode": "max"}
                                         if cfg.scst.enabled and cfg.val.generate else {"monitor": "val/loss"}))
    trainer_args = asdict(cfg.trainer)
    trainer_args.pop("seed")
    if data.val_set is None:  # no validation loop at all (Lightning warned of an empty one at every interval)
        trainer_args["limit_val_batches"] = 0
    if sharded:  # FSDP2, on GPUs and CPUs alike (vlm.train.sharding)
        trainer_args["strategy"] = FSDPStrategy()
    # Progress: a bar with images/s and ETA on a terminal, a line every log_every_n_steps steps when piped.
    callbacks = [LearningRateMonitor(), StepSeed(cfg.trainer.seed), Progress(every=cfg.trainer.log_every_n_steps)]
    if not cfg.trainer.fast_dev_run:  # a check of the setup writes no checkpoint (Lightning's saves one at the end)
        callbacks.insert(0, checkpoints)
    if data_cfg.batch_log:
        callbacks.append(BatchLog(data_cfg.batch_log))
    if cfg.val.generate:
        callbacks.insert(0, GenerationMetrics(cfg.val.samples, cfg.val.collapse_share, maps=cfg.val.maps))
    # check_val_every_n_epoch=None: val_check_interval counts training batches across epochs, so data smaller
    # than one interval still validates.
    try:
        try:
            with quiet_lightning():
                trainer = L.Trainer(**trainer_args, default_root_dir=out, callbacks=callbacks, num_sanity_val_steps=0,
                                    check_val_every_n_epoch=None, plugins=[AtomicCheckpointIO()])
                trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
        except VLMError as e:
            raise worker_error(e) from None
        if trainer.global_step == 0:  # never export an untrained model as if it were the result
            raise VLMError("training ran no step (trainer.max_steps or trainer.max_time stopped it first, or the "
                           "data gave no batch); no model exported")
        # The final state, also after a max_time stop; the full state (optimiser, loops) so that --resume continues.
        # Not after a fast_dev_run: it would replace the last.ckpt of a real run in ``out``.
        if not cfg.trainer.fast_dev_run:
            trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)
    finally:
        data.stop_workers()
    model = unsharded(module.model)  # under FSDP every process takes part in gathering the weights
    skipped = skipped_over_processes(trainer.strategy, data.skipped)  # every process takes part
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The last collective is done: close the process group now rather than leave its threads to the
        # interpreter's exit, where destroying them could abort the process ("terminate called without an active
        # exception", printed after the run's last line).
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return None
    report["skipped_while_loading"] = skipped
    out.mkdir(parents=True, exist_ok=True)  # a fast_dev_run without validation has written nothing there yet
    (out / "data_report.json").write_text(json.dumps(report, indent=2))
    return save_model(model, tokenizer, out / "model")


def warn_unused_model_settings(given: ModelConfig, used: ModelConfig, source: str) -> None:
    """A warning naming each model setting (changed from its default by the config or command line) that is not
    used because the model comes from ``source``: never ignored silently."""
    def flat(cfg: ModelConfig) -> dict:  # model.encoder.name: ..., model.attention_layers: ...
        return {f"model.{part}" + (f".{key}" if key else ""): v for part, value in asdict(cfg).items()
                for key, v in (value.items() if part in ("encoder", "decoder") else [("", value)])}

    given_, used_, default = flat(given), flat(used), flat(ModelConfig())
    unused = [f"{key}={given_[key]!r} (the model's: {used_.get(key)!r})" for key in given_
              if given_[key] != default.get(key) and given_[key] != used_.get(key)]
    if unused:
        log.warning("the model comes from %s: its own config is used, not %s", source, ", ".join(unused))


def skipped_over_processes(strategy: Strategy, skipped: int) -> int:
    """Samples skipped while loading by all processes: each counts only those of its own loader workers."""
    return int(strategy.reduce(torch.tensor(skipped, dtype=torch.long, device=strategy.root_device),
                               reduce_op="sum").item())


def worker_error(error: VLMError) -> VLMError:
    """A VLMError raised in a data-loader worker (bad data under ``data.strict``) as its own one line: torch raises
    it again in the main process with the worker's traceback in the message."""
    lines = str(error).rstrip().splitlines()
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    if len(lines) > 1 and lines[0].startswith("Caught ") and lines[-1].startswith(prefix):
        return type(error)(lines[-1][len(prefix):])
    return error


def check_scst_sources(train_data: SourceData) -> None:
    """SCST rewards each image's sampled captions against its reference captions, looked up by dataset index: it
    needs file-based training sources with captions."""
    for i, (source, records) in enumerate(zip(train_data.sources, train_data.records, strict=True)):
        if records is None:
            raise VLMError(f"data.sources[{i}]: SCST needs file-based training sources with reference captions "
                           f"(COCO, Karpathy, JSONL), not shards ({source.path})")
        if not any(r.captions for r in records):
            raise VLMError(f"data.sources[{i}]: SCST needs reference captions, and {source.path} has none")


def build_module(cfg: TrainConfig, tokenizer: Tokenizer, start: VisionLanguageModel | None,
                 resumed: ModelConfig | None = None) -> CaptionModule:
    """Cross-entropy or SCST module; with ``start``, its model config and weights; with ``resumed`` (the model
    config of the checkpoint a run resumes, which then gives the weights), that config."""
    if cfg.scst.enabled and start is None and resumed is None:
        raise VLMError("scst.enabled needs --init MODEL: a cross-entropy model or checkpoint to start from")
    model_cfg = resumed if resumed is not None else start.cfg if start is not None else cfg.model
    pretrained = start is None and resumed is None  # else the trunk's pretrained weights would be replaced
    if cfg.scst.enabled:
        module = SCSTModule.create(model_cfg, cfg.optim, tokenizer, cfg.scst, pretrained)
    else:
        module = CaptionModule.create(model_cfg, cfg.optim, tokenizer, pretrained)
    if start is not None:
        module.model.load_state_dict(start.state_dict())
    return module


def data_report(cfg: TrainConfig, tokenizer: Tokenizer, texts: list[str], train_data: SourceData | None,
                val_data: SourceData | None) -> dict:
    """What the run trains on: sources, skipped records, vocabulary and unknown words (logged, and stored)."""
    unknown, total = tokenizer.count_unknown(texts)
    report = {"tokenizer": {"kind": cfg.data.tokenizer.kind, "vocab_size": len(tokenizer),
                            "train_unknown_tokens": unknown, "train_tokens": total}}
    if val_data is not None:
        val_texts = val_data.texts(cfg.data.tokenizer.max_texts)
        report["tokenizer"]["val_unknown_tokens"], report["tokenizer"]["val_tokens"] = \
            tokenizer.count_unknown(val_texts)
    if train_data is not None:
        report["train_sources"] = train_data.summary()
        skipped = sum(r.skipped for r in train_data.reports)
        if skipped:
            log.warning("skipped %d bad training records (strict: false); see data_report.json", skipped)
    if val_data is not None:
        report["val_sources"] = val_data.summary()
    tok = report["tokenizer"]
    if unknown:
        log.warning("%d of %d training tokens (%.2f%%) are unknown words ([UNK]): raise tokenizer.vocab_size or "
                    "lower tokenizer.min_frequency, or use tokenizer.kind: bpe", unknown, total,
                    100 * unknown / max(total, 1))
    if tok.get("val_unknown_tokens"):
        log.warning("%d of %d validation tokens are unknown words ([UNK])", tok["val_unknown_tokens"],
                    tok["val_tokens"])
    return report
