"""`vlm train`: fit on the built-in scenes with Lightning, then export the model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from vlm.api import Captioner
from vlm.config import TrainConfig
from vlm.data.builtin import SceneDataModule, scene_texts
from vlm.data.transforms import image_transform
from vlm.text.tokenizer import Tokenizer
from vlm.train.module import CaptionModule

TOKENIZER_SCENES = 2000  # training scenes whose texts build the vocabulary


def train(cfg: TrainConfig, out: str | Path) -> Path | None:
    """Train, write Lightning checkpoints to out/checkpoints and the exported model to out/model.

    Returns the exported model directory on the process that wrote it (rank 0), None on the others.
    """
    out = Path(out)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    tokenizer = Tokenizer.train(scene_texts(TOKENIZER_SCENES, cfg.data.seed))
    module = CaptionModule.create(cfg.model, cfg.optim, tokenizer)
    image_size = cfg.model.encoder.image_size
    data = SceneDataModule(cfg.data, tokenizer, image_transform(module.model.encoder.trunk, image_size), image_size)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                                  monitor="val/loss", save_top_k=1, save_last=True)
    trainer_args = asdict(cfg.trainer)
    trainer_args.pop("seed")
    trainer = L.Trainer(**trainer_args, default_root_dir=out, callbacks=[checkpoints, LearningRateMonitor()],
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    if not trainer.is_global_zero:
        return None
    return Captioner(module.model, tokenizer, device="cpu").save(out / "model")
