"""Typed configuration. Defaults train the default captioner on the built-in scenes.

The dataclasses are read by jsonargparse, so every field is a ``--section.key`` command-line option
and a YAML key; the docstring under a field is its help text; unknown keys are errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal


@dataclass
class EncoderConfig:
    name: str = "resnet18"
    """timm model name: any CNN or ViT that timm can create."""
    pretrained: bool = False
    """Load timm's pretrained weights (downloaded by timm) when the model is built to train; a saved model (an
    exported directory or checkpoint) loads its own weights, without downloading these."""
    weights: str | None = None
    """Local weights file (safetensors or a timm state dict) to load instead of downloading (as ``pretrained``: not
    read when a saved model loads)."""
    feature_level: int = 2
    """Which of the trunk's feature levels (timm ``feature_info``) becomes the patch grid; -1 is the last.
    For a ResNet, level 2 has stride 8; for a ViT, levels are blocks."""
    image_size: int | list[int] = 64
    """Images are resized (not cropped) to this size: a side, or [height, width] for non-square input (a ViT
    then needs model_args such as {"img_size": [h, w]} or {"dynamic_img_size": true})."""
    model_args: dict[str, Any] = field(default_factory=lambda: {"channels": [32, 64, 128, 256]})
    """Extra keyword arguments for ``timm.create_model`` (e.g. img_size, patch_size, depth). The default
    narrows resnet18's stages for speed; give {} or the new backbone's own when changing ``name``."""
    trainable: bool = True
    """Train the encoder (False freezes it)."""
    train_last: int | None = None
    """Train only the last N stages or blocks of the encoder (timm's coarse parameter groups, e.g. a ResNet's
    layers or a ViT's blocks); the rest stays frozen. None trains all of it (when trainable)."""
    context_layers: int = 0
    """Transformer blocks (self-attention among all patches, MLP; the decoder's width and heads) on the projected
    patch features before the decoder reads them: global context, e.g. for relations between objects. They are
    trained even with a frozen trunk; every map method is carried through them. 0: none."""
    features: Literal["projected", "final"] = "projected"
    """What the decoder attends to. projected: the feature_level map's patches, normalised, projected to the
    decoder width, with 2-D sine-cosine positions added (vlm's own). final: a ViT's final output tokens as they are
    (after its final norm, at its own width, prefix/class tokens included, no added positions): what an imported
    captioner's decoder was trained on. Maps then drop the prefix columns and are renormalised over the patches."""
    norm_eps: float | None = None
    """Epsilon of every LayerNorm in the trunk (None: timm's; HF ViT uses 1e-12, BLIP's vision tower 1e-5)."""
    mean: list[float] | None = None
    """Per-channel mean that images are normalised with (None: timm's data config of the backbone)."""
    std: list[float] | None = None
    """Per-channel standard deviation that images are normalised with (None: timm's data config)."""
    interpolation: str | None = None
    """Resize interpolation: bilinear, bicubic, ... (None: timm's data config of the backbone)."""


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
    norm: Literal["pre", "post"] = "pre"
    """Where each block's LayerNorms sit: pre (before each sub-layer, plus a final norm before the head: vlm's own
    and GPT-2's) or post (after each residual sum, no final norm: BERT's, BLIP's text decoder)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm of the decoder (BERT and BLIP's text decoder use 1e-12, GPT-2 1e-5)."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """The MLP's (and head transform's) activation: exact GELU, or its tanh approximation (GPT-2's gelu_new)."""
    embed_norm: bool = False
    """A LayerNorm over token + position embeddings (BERT)."""
    head_transform: bool = False
    """Dense, activation and LayerNorm before the tied output head (BERT's cls.predictions.transform)."""
    head_bias: bool = False
    """A learned per-token bias on the output logits (BERT's cls.predictions.bias)."""
    cross_width: int | None = None
    """Width of the image features the cross-attention keys and values are computed from (None: the decoder
    width; an imported BLIP-large reads 1024-wide ViT tokens into a 768-wide decoder)."""


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    attention_layers: list[int] | None = None
    """Decoder layers whose cross-attention (heads averaged) makes a token's map; None means all layers."""
    special_tokens: dict[str, str] | None = None
    """The tokenizer's tokens playing vlm's roles: pad, bos (the decoder's start token), eos (the end token), and
    optionally unk and sep (the question separator); None: vlm's own [PAD] [BOS] [EOS] [UNK] [SEP]. Imported
    models take theirs from the source (BLIP starts from [DEC] and stops at [SEP])."""
    answers_questions: bool = True
    """The model was trained to answer questions (False: a captioner, e.g. an imported one, that refuses ask)."""


@dataclass
class SourceConfig:
    """One dataset on disk or in shards (see vlm.data.records for the formats)."""

    path: str
    """Annotation file: COCO captions/instances JSON, Karpathy split JSON, VQA questions JSON, JSONL file; or for
    webdataset a shard path, URL or brace pattern (e.g. "data/{00000..00099}.tar")."""
    format: str = "auto"
    """auto, coco, karpathy, vqa, jsonl or webdataset."""
    images: str | None = None
    """Image folder (COCO, Karpathy, VQA); JSONL image paths are relative to the JSONL file unless this is set."""
    annotations: str | None = None
    """VQA v2 annotations JSON (the answers) that goes with the questions file in ``path``; or, with COCO
    captions in ``path``, the instances JSON of the same images (its boxes become regions)."""
    split: str | None = None
    """Karpathy split: train (includes restval), val or test."""
    weight: float = 1.0
    """Share of training images drawn from this source, relative to the other sources (a positive number)."""
    caption_key: str | None = None
    """WebDataset: the .json key holding the caption(s) to train on (a string or a list of strings), e.g.
    "vlm_caption" in shards written by ``vlm predict --format webdataset``; "txt" trains on the .txt alt-text;
    None: .json "captions" or "caption", else the .txt."""


@dataclass
class TokenizerConfig:
    kind: str = "word"
    """word (a word-level vocabulary) or bpe (byte-level BPE: no unknown tokens)."""
    vocab_size: int = 8000
    """Largest vocabulary (BPE merges stop here; word-level keeps the most frequent words)."""
    min_frequency: int = 1
    """Words (or merges) seen fewer times in the training texts are left out of the vocabulary."""
    max_texts: int = 500_000
    """Training texts (captions, questions, answers) read to build the vocabulary."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Training datasets, mixed by their weights; empty trains on the built-in scenes."""
    val_sources: list[SourceConfig] = field(default_factory=list)
    """Validation datasets (file-based formats); with sources but no val_sources there is no validation."""
    strict: bool = False
    """Stop at the first bad sample (missing or unreadable image, empty text, broken line) naming it; False skips
    bad samples and reports how many (logged and written to OUT/data_report.json)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    hflip: float = 0.0
    """Probability of a horizontal flip in training, never applied to images whose texts mention left or right."""
    crop_scale: float = 1.0
    """Random resized crop in training keeping at least this share of the image area (1.0: no crop)."""
    feature_cache: str | None = None
    """With a frozen encoder: compute the encoder's features once into this memory-mapped file and train the
    decoder from it (no augmentation then)."""
    train_scenes: int = 200_000
    """Distinct built-in training scenes (generated on the fly, deterministic by seed)."""
    val_scenes: int = 500
    """Held-out built-in scenes (a fixed seed range disjoint from training)."""
    captions_per_image: int = 3
    """Caption sequences decoded per image in a training batch (the image is encoded once; drawn without repeats
    while the image has enough). Each caption's phrases also train the grounding loss: on the built-in scenes 3
    instead of 1 made the default run's pointing game hold across seeds (docs/results.md, across seeds)."""
    questions_per_image: int = 6
    """Question-answer sequences decoded per image in a training batch (drawn without repeats while the
    scene has enough)."""
    batch_size: int = 64
    """Images per batch (each carries captions_per_image + questions_per_image sequences); training data smaller
    than one batch per process is trained on in batches of all of it."""
    num_workers: int = 1
    """Data loader worker processes."""
    batch_log: str | None = None
    """Append one JSON line per training step and process to this file: the batch's sample indices and
    fingerprints of its texts and pixels (vlm.train.checkpoints.BatchLog), e.g. to check that a resumed run sees
    the same samples as an uninterrupted one."""
    seed: int = 0
    """Seed of the built-in scene generator and of the training streams' orders (shards, records mixed with them)."""
    shuffle_buffer: int = 1000
    """Training on shards: each pass reads the shards in a fresh order and mixes each reader's samples through a
    buffer of this many raw samples (0: the shards' own order, sample after sample)."""
    scenes: Literal["shapes", "relational", "mixed"] = "shapes"
    """Built-in scene family: shapes (1 to 4 objects, questions about one object at a time), relational (six
    objects of unique colours; closest/farthest, how many share X's shape, relative position, yes/no with
    negations: vlm.data.relational defines each question kind) or mixed (even scenes shapes, odd relational)."""


@dataclass
class OptimConfig:
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    encoder_lr: float | None = None
    """Peak learning rate of the encoder (None: lr); the schedule scales it like lr."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a share of the peak."""
    label_smoothing: float = 0.0
    """Label smoothing of the token cross-entropy."""
    task_weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.5, "vqa": 1.0})
    """Weight of each task's mean token loss (tasks: caption, vqa)."""
    nonfinite_skips: int = 0
    """Batches with a NaN or infinite loss to skip (counted and logged) before training stops; 0 stops at the
    first, naming the step and keeping the last good checkpoint."""
    grounding_weight: float = 0.05
    """Weight of the grounding loss (0: off): where a training caption names a region of its image (the built-in
    scenes' objects, JSONL "regions", COCO instance boxes in a file that also has captions), the map of each of
    the phrase's tokens (cross-attention of ``model.attention_layers``, heads averaged) is trained to lie inside
    the region's box, as -log of its share inside. Phrases that two regions share, or that a caption names twice,
    are left out, and so are all regions under ``data.crop_scale`` < 1 and with a feature cache of records."""
    compile: bool = False
    """torch.compile the encoder and decoder for training (in place, so checkpoints are unchanged). Off by
    default: it did not speed up training on a 2-core CPU (README, Speed)."""


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer``."""

    max_steps: int = 800
    """Optimizer steps to train for."""
    fast_dev_run: bool | int = False
    """Run this many training and validation batches (True: 1) to check a setup, with no checkpoints."""
    max_time: str | None = "00:00:14:00"
    """Stop after this wall time ("DD:HH:MM:SS"), whatever the step count."""
    accelerator: str = "auto"
    """cpu, gpu, mps or auto."""
    devices: int | str = "auto"
    """Devices per node (an int, or "auto")."""
    num_nodes: int = 1
    """Machines to train on."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ...; fsdp shards the model with FSDP2 on GPUs or CPUs (vlm.train.sharding)."""
    precision: str = "32-true"
    """Lightning precision, e.g. bf16-mixed (autocast, on GPUs and CPUs)."""
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


CAPTION_TOKENS, ANSWER_TOKENS = 30, 8  # max_new_tokens when it is None: a caption, an answer to a question
METHODS = ("raw", "rollout", "chefer")  # MapConfig.method's values (vlm.grounding.methods says what each does)


@dataclass
class DecodingConfig:
    """How text is generated: greedy (the default), beam search or sampling (`vlm.model.generate`)."""

    max_new_tokens: int | None = None
    """Longest generated text in tokens, the end token included; None: 30 for a caption, 8 for an answer."""
    min_new_tokens: int = 0
    """The end token is forbidden before this many tokens."""
    beam_size: int = 1
    """Beam size (1: greedy or sampling). Alias: ``--beam`` on the command line, ``beam`` in vlm serve."""
    length_penalty: float = 0.0
    """Beam search ranks its hypotheses by score / length ** length_penalty."""
    no_repeat_ngram_size: int = 0
    """No n-gram of this size occurs twice among the generated tokens (0: off)."""
    sample: bool = False
    """Draw each token from the model's distribution instead of taking the most likely."""
    temperature: float = 1.0
    """Sampling temperature: any finite positive number; below 1 sharper, above 1 flatter. Towards 0 sampling tends
    to greedy (however small, 1e-39 or 5e-324, it takes the most likely token), towards infinity to a uniform draw
    among the tokens top_k and top_p keep."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample within the smallest set of tokens holding this much probability mass."""
    num_samples: int = 1
    """Sequences sampled per image (with sample), image after image; one image's draws share its seed."""
    seed: int | list[int] | None = None
    """Seed of the sampling: image i uses seed + i (whatever the batch), or one seed per image; None: random."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first option out of range."""
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.sample and self.beam_size > 1:
            raise ValueError("sampling draws one sequence per image: use beam_size 1 with sample")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.num_samples > 1 and not self.sample:
            raise ValueError(f"num_samples {self.num_samples} needs sample (greedy and beam give one sequence)")
        if not 0 < self.temperature < float("inf"):  # also false for NaN, which would decode empty text
            raise ValueError(f"temperature must be a finite positive number, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be 0 (off) or positive, got {self.no_repeat_ngram_size}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be 0 or positive, got {self.min_new_tokens}")

    def for_images(self, first: int, count: int, total: int) -> DecodingConfig:
        """The decoding of ``count`` of a call's ``total`` images, starting at image ``first`` (a batch of a longer
        list, a lane): an int seed moves along, so image i keeps seed + i; a list of seeds is cut to those images
        (ValueError unless it has one seed per image of the call)."""
        if isinstance(self.seed, int):
            return replace(self, seed=self.seed + first)
        if isinstance(self.seed, list):
            if len(self.seed) != total:
                raise ValueError(f"{len(self.seed)} seeds for {total} images")
            return replace(self, seed=self.seed[first:first + count])
        return self

    def token_budget(self, answer: bool = False) -> int:
        """max_new_tokens, or its default for a caption (30) or an answer (8)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return ANSWER_TOKENS if answer else CAPTION_TOKENS


@dataclass
class MapConfig:
    """How a token's map over the image is made from the decoder's attention (`vlm.grounding.methods`)."""

    method: Literal["raw", "rollout", "chefer"] = "raw"
    """raw cross-attention, rollout through the decoder, or chefer (gradient-weighted relevancy)."""
    layers: list[int] | None = None
    """Decoder layers whose cross-attention makes the map, e.g. [2]; None: the model's attention_layers (else
    all layers)."""
    head: int | None = None
    """One cross-attention head instead of the mean over heads (raw and rollout); None: the mean."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError for an unknown method or a head with chefer (layer and head ranges need the model)."""
        if self.method not in METHODS:
            raise ValueError(f"grounding method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.head is not None and self.method == "chefer":
            raise ValueError("the chefer method averages the heads by definition; it takes no head")


@dataclass
class ValConfig:
    generate: bool = True
    """At each validation, generate captions (greedy) and answers for the whole val set, gathered across
    processes, and log CIDEr-D, BLEU-4, VQA accuracy and the collapse guards."""
    samples: int = 4
    """Val images logged with their generated caption and per-token attention overlays."""
    collapse_share: float = 0.5
    """Warn when at least this share of the val captions is one and the same sentence."""
    maps: MapConfig = field(default_factory=MapConfig)
    """How the logged samples' token maps are made (the same function and options as ``vlm attend``)."""


@dataclass
class SCSTConfig:
    enabled: bool = False
    """Train with self-critical sequence training (reward: CIDEr-D) instead of cross-entropy; start from
    ``--init MODEL``."""
    baseline: Literal["greedy", "mean"] = "greedy"
    """Reward baseline: greedy (the greedy caption's CIDEr-D) or mean (the mean of the other samples)."""
    samples: int = 5
    """Captions sampled per image."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_new_tokens: int = 30
    """Longest sampled caption."""
    df_items: int = 5000
    """Training items whose reference captions give CIDEr-D's document frequencies (the same on every
    process, never per batch)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    val: ValConfig = field(default_factory=ValConfig)
    scst: SCSTConfig = field(default_factory=SCSTConfig)

    def validate(self) -> None:
        """ValueError naming the first option out of range among the counts and rates `vlm train` would otherwise
        trip over mid-run (a division by zero, an empty model) or report without the option's name."""
        m, d, o, t = self.model.decoder, self.data, self.optim, self.trainer
        counts = {"model.decoder.width": m.width, "model.decoder.depth": m.depth, "model.decoder.num_heads":
                  m.num_heads, "model.decoder.max_length": m.max_length, "data.batch_size": d.batch_size,
                  "trainer.accumulate_grad_batches": t.accumulate_grad_batches, "trainer.val_check_interval":
                  t.val_check_interval, "trainer.log_every_n_steps": t.log_every_n_steps}
        if not d.sources:  # the built-in scenes
            counts["data.train_scenes"] = d.train_scenes
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in {"data.num_workers": d.num_workers, "optim.warmup_steps": o.warmup_steps}.items():
            if value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}")
        rates = {"optim.lr": (o.lr, "a positive number", lambda v: 0 < v < math.inf),
                 "optim.encoder_lr": (o.encoder_lr, "a positive number or null",
                                      lambda v: v is None or 0 < v < math.inf),
                 "optim.weight_decay": (o.weight_decay, "0 or more", lambda v: 0 <= v < math.inf),
                 "optim.label_smoothing": (o.label_smoothing, "in [0, 1)", lambda v: 0 <= v < 1),
                 "model.decoder.dropout": (m.dropout, "in [0, 1)", lambda v: 0 <= v < 1),
                 "data.hflip": (d.hflip, "in [0, 1]", lambda v: 0 <= v <= 1),
                 "data.crop_scale": (d.crop_scale, "in (0, 1]", lambda v: 0 < v <= 1)}
        for name, (value, wanted, ok) in rates.items():
            if not ok(value):  # also false for NaN
                raise ValueError(f"{name} must be {wanted}, got {value}")


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from its ``asdict`` form (an exported model's config.json)."""
    d = dict(d)
    decoder = dict(d.pop("decoder", {}))
    if decoder.pop("null_patch", False):  # a short-lived option (its models load without it when it was off)
        raise ValueError("model config has decoder.null_patch, which this version of vlm no longer has")
    try:
        return ModelConfig(
            encoder=EncoderConfig(**d.pop("encoder", {})), decoder=DecoderConfig(**decoder), **d
        )
    except TypeError as e:  # unknown or misspelt key
        raise ValueError(f"model config does not match this version of vlm: {e}") from None
