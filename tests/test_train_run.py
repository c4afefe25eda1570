"""vlm/train/run.py: `train` end to end (bf16-mixed, validation, export) and the checks made before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.config import DataConfig, OptimConfig, SCSTConfig, TrainConfig, TrainerConfig, ValConfig
from vlm.data.scenes import make_scene
from vlm.train.run import train

ROOT = Path(__file__).resolve().parents[1]


def _tiny_train_config(**trainer) -> TrainConfig:
    return TrainConfig(model=tiny_config(), data=DataConfig(train_scenes=64, val_scenes=4, batch_size=8, num_workers=0,
                                                            questions_per_image=2),
                       optim=OptimConfig(lr=3e-3, warmup_steps=0),
                       trainer=TrainerConfig(**{"max_steps": 8, "max_time": None, "val_check_interval": 8,
                                                "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                                                **trainer}),
                       val=ValConfig(samples=1))


def test_bf16_mixed_trains_validates_and_exports_a_model_that_generates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exported = train(_tiny_train_config(precision="bf16-mixed"), tmp_path)
    events = EventAccumulator(str(next((tmp_path / "lightning_logs").glob("version_*")))).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss falls
    assert "val/caption/CIDEr-D" in events.Tags()["scalars"]  # validation generation ran
    model = Captioner.load(exported, device="cpu")
    scenes = [make_scene(i, "val", image_size=64) for i in range(3)]
    captions = model.caption([s.image for s in scenes])
    assert all(captions)
    ckpt = Captioner.load(str(tmp_path / "checkpoints" / "last.ckpt"), device="cpu")
    assert ckpt.caption([s.image for s in scenes]) == captions  # the export holds the trained weights


def test_scst_under_fsdp_is_one_line_error_before_any_work(tmp_path):
    from vlm.errors import VLMError

    cfg = TrainConfig(trainer=TrainerConfig(strategy="fsdp"), scst=SCSTConfig(enabled=True))
    with pytest.raises(VLMError, match="SCST does not run under sharding; use ddp"):
        train(cfg, tmp_path, init=str(tmp_path / "missing"))
    assert not any(tmp_path.iterdir())


def test_data_smaller_than_a_batch_trains_and_no_step_exports_nothing(tmp_path):
    """Four records and batches of 8 train every step (before: 0 steps, a random model exported with exit 0); a run
    that takes no step is an error, not an untrained model presented as the result."""
    import torch

    from vlm.config import SourceConfig
    from vlm.data.export import write_shapes
    from vlm.errors import VLMError

    jsonl = write_shapes(tmp_path / "data", 4)["jsonl"]
    cfg = _tiny_train_config(max_steps=3, val_check_interval=100)
    cfg.data.sources = [SourceConfig(str(jsonl))]
    exported = train(cfg, tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and Captioner.load(exported, device="cpu").caption(
        [str(tmp_path / "data" / "images" / "000000000001.png")])
    cfg.trainer.max_steps = 0
    with pytest.raises(VLMError, match="^training ran no step .*; no model exported$"):
        train(cfg, tmp_path / "none")
    assert not (tmp_path / "none" / "model").exists()


def test_scst_on_shards_or_without_captions_is_one_line_error_before_any_work(tmp_path):
    """SCST looks up each image's reference captions by dataset index: shards (once "object of type 'ShardDataset'
    has no len()") and sources without captions are refused, naming the source, before the model is loaded."""
    from vlm.config import SourceConfig
    from vlm.data.export import write_shapes
    from vlm.errors import VLMError

    paths = write_shapes(tmp_path / "data", 4)
    for source, message in [(SourceConfig(str(paths["shards"] / "00000.tar")),
                             r"^data.sources\[1\]: SCST needs file-based training sources with reference captions "
                             r"\(COCO, Karpathy, JSONL\), not shards \(.*00000.tar\)$"),
                            (SourceConfig(str(paths["questions"]), images=str(paths["images"]),
                                          annotations=str(paths["annotations"])),
                             r"^data.sources\[1\]: SCST needs reference captions, and .*questions.json has none$")]:
        cfg = TrainConfig(data=DataConfig(sources=[SourceConfig(str(paths["jsonl"])), source]),
                          scst=SCSTConfig(enabled=True))
        with pytest.raises(VLMError, match=message):
            train(cfg, tmp_path / "run", init=str(tmp_path / "missing"))  # refused before --init is read
        assert not (tmp_path / "run").exists()


def test_a_cnn_trunk_trains_on_the_cpu_in_batches_of_any_size(tmp_path):
    """torch 2.14's oneDNN crashes the process in the backward of a channels-last strided 1x1 convolution (a
    ResNet's downsampling) for odd batches: on the CPU the trunk trains in the default layout. In a subprocess, as
    the crash would take the test process with it."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "vlm.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                          "--data.batch_size", "5", "--trainer.max_steps", "2", "--trainer.val_check_interval", "100",
                          "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    model = Captioner.load(tmp_path / "run" / "model", device="cpu").model
    assert model.encoder.channels_last  # loaded for inference, where channels-last is faster and crashes nothing


def test_a_run_without_validation_checkpoints_and_resumes_with_its_own_model_and_tokenizer(tmp_path, monkeypatch,
                                                                                           caplog):
    """With no data.val_sources nothing validates, so the checkpoint written after validation never came: last.ckpt
    is written every val_check_interval steps instead. Resuming takes the checkpoint's model config and tokenizer:
    other data (here the built-in scenes, whose words train another tokenizer) or another --model must not
    renumber or reshape the trained weights (it failed loading them, or trained on remapped token ids), and the
    setting not used is named."""
    import json
    import warnings

    import torch

    from vlm.config import SourceConfig
    from vlm.data.export import write_shapes
    from vlm.train.checkpoints import AtomicCheckpointIO

    saved = []
    save = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint",
                        lambda self, checkpoint, path, storage_options=None: (
                            saved.append((Path(path).name, checkpoint["global_step"])), save(self, checkpoint, path)))
    cfg = _tiny_train_config(max_steps=4, val_check_interval=2)
    cfg.data.sources = [SourceConfig(str(write_shapes(tmp_path / "data", 8)["jsonl"]))]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        first = train(cfg, tmp_path / "run")
    assert saved == [("last.ckpt", 2), ("last.ckpt", 4), ("last.ckpt", 4)]  # periodic, periodic, final
    assert not [str(w.message) for w in said if "across ranks is zero" in str(w.message)]  # no empty validation loop
    tokenizer = (first / "tokenizer.json").read_text()
    other = _tiny_train_config(max_steps=6, val_check_interval=2)  # the built-in scenes: another vocabulary
    other.model.decoder.depth = 4
    with caplog.at_level("WARNING", logger="vlm.train.run"):
        resumed = train(other, tmp_path / "run", resume="last")
    assert ("the model comes from --resume last: its own config is used, not model.decoder.depth=4 (the model's: 2)"
            in caplog.messages)  # said, not silently ignored
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (resumed / "tokenizer.json").read_text() == tokenizer
    assert json.loads((resumed / "config.json").read_text())["model"]["decoder"]["depth"] == 2
    assert Captioner.load(resumed, device="cpu").caption([str(tmp_path / "data" / "images" / "000000000001.png")])


def test_shards_missing_or_streamed_without_a_step_limit_are_one_line_errors_before_training(tmp_path):
    """A listed shard that does not exist was skipped as unreadable in every pass; a stream without max_steps
    never ends (and its learning-rate schedule had no end to decay to)."""
    from vlm.config import SourceConfig
    from vlm.data.export import write_shapes
    from vlm.errors import VLMError

    shards = write_shapes(tmp_path / "data", 4)["shards"]
    cfg = _tiny_train_config()
    cfg.data.sources = [SourceConfig(str(shards / "{00000..00001}.tar"))]
    with pytest.raises(VLMError, match=rf"^{shards}/{{00000..00001}}.tar: no such shard {shards}/00001.tar$"):
        train(cfg, tmp_path / "run")
    cfg.data.sources = [SourceConfig(str(shards / "*.tar"))]
    cfg.trainer.max_steps = -1
    with pytest.raises(VLMError, match=r"^trainer.max_steps -1: training on shards streams them without end; give a "
                                       r"number of steps$"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_a_check_run_without_validation_exports_into_a_new_directory(tmp_path):
    """A fast_dev_run without validation saves no checkpoint, so nothing else makes the output directory."""
    cfg = _tiny_train_config(fast_dev_run=1)
    cfg.data.val_scenes = 0
    out = tmp_path / "new" / "run"
    exported = train(cfg, out)
    assert (out / "data_report.json").is_file() and (exported / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()  # nothing but the export and the report was written


@pytest.mark.parametrize("start", ["init", "resume"])
def test_a_run_from_saved_weights_does_not_fetch_the_trunk_weights_they_replace(tokenizer, tmp_path, monkeypatch,
                                                                                start):
    """A run that starts from a model (--init) or resumes a checkpoint takes its weights from there: the encoder's
    pretrained trunk weights, which the model's config names, are neither downloaded nor read (offline, or on
    another machine, that failed). A fresh run does load them."""
    import timm.models._builder as timm_builder
    import torch

    from vlm.model.vlm import VisionLanguageModel
    from vlm.train.run import build_module

    def fetched(*args, **kwargs):
        raise AssertionError("the trunk's pretrained weights were loaded")

    monkeypatch.setattr(timm_builder, "load_pretrained", fetched)
    (tmp_path / "trunk.safetensors").write_bytes(b"the weights a fresh run starts from")
    model_cfg = tiny_config(weights=str(tmp_path / "trunk.safetensors"))
    cfg = _tiny_train_config()
    cfg.model = model_cfg
    with pytest.raises(ValueError, match="pretrained weights were loaded"):
        build_module(cfg, tokenizer, None)  # a fresh run: the weights file is what it starts from
    saved = VisionLanguageModel(model_cfg, len(tokenizer), pretrained=False)
    module = build_module(cfg, tokenizer, saved if start == "init" else None, model_cfg if start == "resume" else None)
    assert module.model.cfg == model_cfg
    if start == "init":
        assert all(torch.equal(module.model.state_dict()[k], v) for k, v in saved.state_dict().items())
