"""Benchmark: training the decoder from a feature cache vs recomputing a frozen encoder every epoch.

Both sides train the same model (a frozen ResNet-50 trunk at 224 px, a small decoder) for one epoch on the same
images, with the same seed, through Lightning; the cached side reads the trunk's maps from a memory-mapped file
built once beforehand. Reports seconds per epoch (first batch to end of epoch, median over alternating
repetitions), the one-off cache build time, and the largest difference between the two loss curves (the same
maps and the same batches: they should be equal).

    python scripts/feature_cache.py [--images 192] [--repeats 3] [--encoder resnet50] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from _bench import add_json_option, report

from vlm.config import DataConfig, DecoderConfig, EncoderConfig, ModelConfig, OptimConfig, SourceConfig
from vlm.data.datasets import SourceData
from vlm.data.export import write_shapes
from vlm.data.features import build_cache
from vlm.data.module import DataModule
from vlm.data.transforms import image_transform
from vlm.text.tokenizer import Tokenizer
from vlm.train.module import CaptionModule


class Epoch(L.Callback):
    """The epoch's wall time (from its first batch to its end, without the trainer's set-up) and its losses."""

    def __init__(self):
        self.values: list[float] = []
        self.start = self.seconds = 0.0

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start


def one_epoch(cfg: ModelConfig, data_cfg: DataConfig, train: SourceData, tokenizer: Tokenizer,
              cache: str | None) -> tuple[float, list[float]]:
    L.seed_everything(0, verbose=False)
    module = CaptionModule.create(cfg, OptimConfig(warmup_steps=1), tokenizer)
    transform = image_transform(module.model.encoder.trunk, cfg.encoder.image_size)
    data = DataModule(replace(data_cfg, feature_cache=cache), tokenizer, transform, cfg.encoder.image_size,
                      train_data=train, encoder=module.model.encoder)
    if cache:
        data.prepare_data()  # built already: this only checks the fingerprint
    epoch = Epoch()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[epoch])
    trainer.fit(module, data)
    return epoch.seconds, epoch.values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    add_json_option(parser, "feature_cache")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="vlm_cache_bench_"))
    files = write_shapes(work / "data", args.images, split="train", image_size=args.image_size)
    data_cfg = DataConfig(sources=[SourceConfig(str(files["jsonl"]))], batch_size=32, num_workers=0,
                          captions_per_image=1, questions_per_image=2)
    train = SourceData(data_cfg.sources, strict=True)
    tokenizer = Tokenizer.train(train.texts(100_000))
    cfg = ModelConfig(encoder=EncoderConfig(name=args.encoder, feature_level=-1, image_size=args.image_size,
                                            model_args={}, trainable=False),
                      decoder=DecoderConfig(width=128, depth=2, num_heads=4))
    # Build the cache once (timed): the cost the cached side pays before its first epoch.
    L.seed_everything(0, verbose=False)
    module = CaptionModule.create(cfg, OptimConfig(), tokenizer)
    transform = image_transform(module.model.encoder.trunk, args.image_size)
    dataset = DataModule(data_cfg, tokenizer, transform, args.image_size, train_data=train).train_set
    cache = str(work / "features.npy")
    start = time.perf_counter()
    build_cache(Path(cache).with_name("features.train.npy"), dataset, module.model.encoder, batch_size=32)
    build_s = time.perf_counter() - start

    times = {"images": [], "cache": []}
    curves = {}
    for _ in range(args.repeats):  # alternate the sides: this machine's speed drifts
        for side in ("images", "cache"):
            seconds, losses = one_epoch(cfg, data_cfg, train, tokenizer, cache if side == "cache" else None)
            times[side].append(seconds)
            curves[side] = losses
    diff = max(abs(a - b) for a, b in zip(curves["images"], curves["cache"], strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    path = report(
        args.json, threads=torch.get_num_threads(),
        config={"encoder": args.encoder, "image_size": args.image_size, "images": args.images, "batch_size": 32,
                "repeats": args.repeats, "steps_per_epoch": len(curves["images"])},
        results={"epoch_s_images": med["images"], "epoch_s_cache": med["cache"], "cache_build_s": build_s,
                 "epochs_per_s_images": 1 / med["images"], "epochs_per_s_cache": 1 / med["cache"],
                 "max_loss_difference": diff, "losses_images": curves["images"], "losses_cache": curves["cache"]},
        ratios={"epochs_per_s_cache_vs_images": med["images"] / med["cache"]})
    print(f"{'side':10s} {'s/epoch':>9s}")
    print(f"{'images':10s} {med['images']:9.2f}")
    print(f"{'cache':10s} {med['cache']:9.2f}   (built once in {build_s:.2f} s)")
    print(f"speed-up {med['images'] / med['cache']:.1f}x; loss curves differ by at most {diff:.2e}")
    print(path)


if __name__ == "__main__":
    main()
