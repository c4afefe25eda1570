"""Encoder options: local weights, freezing (all, the last N stages), its own learning rate, non-square input,
and the feature cache (training from cached maps equals training from images)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_config
from vlm.config import DataConfig, OptimConfig
from vlm.data.batch import collate
from vlm.data.builtin import SceneDataset
from vlm.data.features import CachedDataset, build_cache
from vlm.data.transforms import image_transform
from vlm.model.encoder import ImageEncoder
from vlm.model.vlm import VisionLanguageModel
from vlm.train.module import CaptionModule

ARGS = {"channels": [8, 16, 32, 64]}


def _trunk_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, **ARGS).state_dict()


def test_local_weights_file_safetensors_and_state_dict(tmp_path):
    state = _trunk_state(7)
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        enc = ImageEncoder(tiny_config(weights=str(tmp_path / name)).encoder, 32)
        loaded = enc.trunk.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in loaded)  # the pruned trunk's weights are the file's


def test_trunk_weights_that_cannot_be_had_are_one_line_naming_the_option(tmp_path, monkeypatch):
    """A weights file missing or unreadable, or timm's download failing, is a one-line error naming the option
    (timm's own said "FileNotFoundError", or only what the download said)."""
    import timm.models._builder as timm_builder

    with pytest.raises(ValueError, match=r"^encoder.weights /nowhere/w.safetensors: no such file$"):
        ImageEncoder(tiny_config(weights="/nowhere/w.safetensors").encoder, 32)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"^encoder.weights .*bad.safetensors: cannot load the trunk's weights "
                                         r"\(SafetensorError: .*\)$"):
        ImageEncoder(tiny_config(weights=str(tmp_path / "bad.safetensors")).encoder, 32)

    def offline(*args, **kwargs):
        raise OSError("no connection\nand more")

    monkeypatch.setattr(timm_builder, "load_pretrained", offline)
    with pytest.raises(ValueError) as e:
        ImageEncoder(tiny_config(pretrained=True).encoder, 32)
    assert str(e.value) == ("encoder.pretrained: cannot get timm's weights for resnet18 (OSError: no connection); "
                            "without the internet, give them as encoder.weights FILE")


def test_frozen_encoder_stays_in_eval_and_gets_no_gradient(tokenizer):
    model = VisionLanguageModel(tiny_config(trainable=False), len(tokenizer))
    assert not model.encoder.trunk.training  # from construction: Lightning restores recorded modes directly
    model.train()
    assert not model.encoder.trunk.training and model.encoder.proj.training
    assert not any(p.requires_grad for p in model.encoder.trunk.parameters())


def test_train_last_unfreezes_only_the_last_stages():
    enc = ImageEncoder(tiny_config(train_last=1).encoder, 32)  # level 2 keeps stem, layer1, layer2
    trained = {n.split(".")[0] for n, p in enc.trunk.named_parameters() if p.requires_grad}
    assert trained == {"layer2"}
    vit = ImageEncoder(tiny_config(name="test_vit", feature_level=-1, model_args={}, train_last=2).encoder, 32)
    blocks = {n.split(".")[1] for n, p in vit.trunk.named_parameters() if p.requires_grad and n.startswith("blocks")}
    frozen_blocks = {n.split(".")[1] for n, p in vit.trunk.named_parameters()
                     if not p.requires_grad and n.startswith("blocks")}
    assert blocks and max(map(int, frozen_blocks)) < min(map(int, blocks))
    assert not vit.trunk.patch_embed.proj.weight.requires_grad


def test_encoder_has_its_own_learning_rate(tokenizer):
    module = CaptionModule.create(tiny_config(), OptimConfig(lr=1e-3, encoder_lr=1e-5), tokenizer)
    trainer = {"estimated_stepping_batches": 100, "precision": "32-true", "gradient_clip_val": 1.0}
    module.trainer = type("T", (), trainer)()
    opt = module.configure_optimizers()["optimizer"]
    trunk = {id(p) for p in module.model.encoder.trunk.parameters()}
    for group in opt.param_groups:
        in_trunk = {id(p) in trunk for p in group["params"]}
        assert len(in_trunk) == 1 and group["initial_lr"] == (1e-5 if in_trunk.pop() else 1e-3)
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert all(p.ndim >= 2 for g in decayed for p in g["params"])


def test_non_square_images_give_a_non_square_grid(tokenizer):
    model = VisionLanguageModel(tiny_config(image_size=[32, 64]), len(tokenizer)).eval()
    transform = image_transform(model.encoder.trunk, [32, 64])
    from PIL import Image

    pixels = transform(Image.new("RGB", (300, 100))).unsqueeze(0)
    assert pixels.shape == (1, 3, 32, 64)
    _, grid = model.encode(pixels)
    assert grid == (4, 8)  # stride 8


def test_feature_cache_gives_the_same_loss_as_images(tmp_path, tokenizer):
    torch.manual_seed(0)
    module = CaptionModule.create(tiny_config(trainable=False), OptimConfig(), tokenizer).eval()
    cfg = DataConfig(val_scenes=6)
    dataset = SceneDataset("val", cfg, tokenizer, image_transform(module.model.encoder.trunk, 64), 64)
    build_cache(tmp_path / "f.npy", dataset, module.model.encoder, batch_size=4)
    again = build_cache(tmp_path / "f.npy", dataset, module.model.encoder, batch_size=4)  # reused, not rebuilt
    assert again.shape[0] == 6
    cached = CachedDataset(dataset, tmp_path / "f.npy", (64, 64))
    from_images = collate([dataset[i] for i in range(6)], tokenizer.pad_id)
    from_cache = collate([cached[i] for i in range(6)], tokenizer.pad_id, features=True)
    assert all(torch.equal(a, b) for a, b in zip(from_images.ids, from_cache.ids, strict=True))
    with torch.no_grad():
        loss_images, _ = module._loss(from_images)
        loss_cache, _ = module._loss(from_cache)
    torch.testing.assert_close(loss_cache, loss_images, rtol=1e-5, atol=1e-6)


def test_train_last_keeps_the_batch_norm_statistics_of_the_frozen_stages():
    """Training updates running statistics even where no parameter trains: the frozen stages' norms stay in eval
    mode (from construction, as Lightning restores recorded modes directly), the trained stage's learn."""
    enc = ImageEncoder(tiny_config(train_last=1).encoder, 32)
    frozen, trained = enc.trunk.layer1[0].bn1, enc.trunk.layer2[0].bn1
    assert not frozen.training and not enc.trunk.bn1.training  # before any train() call
    enc.train()
    assert not frozen.training and trained.training
    before = {name: bn.running_mean.clone() for name, bn in (("frozen", frozen), ("trained", trained))}
    enc(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(frozen.running_mean, before["frozen"])
    assert (trained.running_mean - before["trained"]).abs().max() > 1e-3
