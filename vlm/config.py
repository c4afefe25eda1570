"""Typed configuration. Defaults train the default captioner on the built-in scenes.

The dataclasses are read by jsonargparse, so every field is a ``--section.key`` command-line option
and a YAML key; the docstring under a field is its help text; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EncoderConfig:
    name: str = "resnet18"
    """timm model name: any CNN or ViT that timm can create."""
    pretrained: bool = False
    """Load timm's pretrained weights (downloaded by timm)."""
    weights: str | None = None
    """Local weights file (safetensors or a timm state dict) to load instead of downloading."""
    feature_level: int = 2
    """Which of the trunk's feature levels (timm ``feature_info``) becomes the patch grid; -1 is the last.
    For a ResNet, level 2 has stride 8; for a ViT, levels are blocks."""
    image_size: int = 64
    """Images are resized (not cropped) to this square size."""
    model_args: dict[str, Any] = field(default_factory=lambda: {"channels": [32, 64, 128, 256]})
    """Extra keyword arguments for ``timm.create_model`` (e.g. img_size, patch_size, depth). The default
    narrows resnet18's stages for speed; give {} or the new backbone's own when changing ``name``."""
    trainable: bool = True
    """Train the encoder (False freezes it)."""


@dataclass
class DecoderConfig:
    width: int = 128
    """Model width D of the decoder and of the projected patch features."""
    depth: int = 3
    """Number of decoder blocks (self-attention, cross-attention, MLP)."""
    num_heads: int = 4
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the model width."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches."""
    max_length: int = 40
    """Longest token sequence (prompt + answer or caption) the decoder accepts."""


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    attention_layers: list[int] | None = None
    """Decoder layers whose cross-attention (heads averaged) makes a token's map; None means all layers."""


@dataclass
class DataConfig:
    train_scenes: int = 200_000
    """Distinct built-in training scenes (generated on the fly, deterministic by seed)."""
    val_scenes: int = 500
    """Held-out built-in scenes (a fixed seed range disjoint from training)."""
    captions_per_image: int = 1
    """Caption sequences decoded per image in a training batch (the image is encoded once)."""
    questions_per_image: int = 6
    """Question-answer sequences decoded per image in a training batch (drawn without repeats while the
    scene has enough)."""
    batch_size: int = 64
    """Images per batch (each carries captions_per_image + questions_per_image sequences)."""
    num_workers: int = 1
    """Data loader worker processes."""
    seed: int = 0
    """Seed of the built-in scene generator."""


@dataclass
class OptimConfig:
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a share of the peak."""
    label_smoothing: float = 0.0
    """Label smoothing of the token cross-entropy."""
    task_weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.5, "vqa": 1.0})
    """Weight of each task's mean token loss (tasks: caption, vqa)."""


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer``."""

    max_steps: int = 800
    """Optimizer steps to train for."""
    max_time: str | None = "00:00:14:00"
    """Stop after this wall time ("DD:HH:MM:SS"), whatever the step count."""
    accelerator: str = "auto"
    """cpu, gpu, mps or auto."""
    devices: int | str = "auto"
    """Devices per node (an int, or "auto")."""
    num_nodes: int = 1
    """Machines to train on."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp, ..."""
    precision: str = "32-true"
    """Lightning precision, e.g. bf16-mixed on GPUs."""
    accumulate_grad_batches: int = 1
    """Batches whose gradients are summed per optimizer step."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradient norm to this value."""
    val_check_interval: int = 400
    """Run validation every this many training batches."""
    log_every_n_steps: int = 50
    """Log training metrics every this many steps."""
    seed: int = 0
    """Seed for weights and data order."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from its ``asdict`` form (an exported model's config.json)."""
    d = dict(d)
    try:
        return ModelConfig(
            encoder=EncoderConfig(**d.pop("encoder", {})), decoder=DecoderConfig(**d.pop("decoder", {})), **d
        )
    except TypeError as e:  # unknown or misspelt key
        raise ValueError(f"model config does not match this version of vlm: {e}") from None
