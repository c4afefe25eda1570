"""vlm/train/run.py: `train` end to end (bf16-mixed, validation, export) and the checks made before any work."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.config import DataConfig, OptimConfig, SCSTConfig, TrainConfig, TrainerConfig, ValConfig
from vlm.data.scenes import make_scene
from vlm.train.run import train


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
