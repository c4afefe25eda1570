"""Tiny random-weight Hugging Face captioners saved to a directory, as `vlm import` reads them (offline).

Each builder saves a model (``save_pretrained``), its tokenizer.json and its preprocessor_config.json to ``out``
and returns the transformers model (eval mode, eager attention, so it can return its cross-attentions). Import
one with ``vlm.hub.load_hf(str(out))`` (or ``vlm.load(f"hf:{out}")``).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "picture", "of", "cat", "dog", "red", "blue", "on", "the", "table", "two", "sitting", "grass",
         "man", "woman", "with", "and", "in", "field", "car", "street", "##s", "big", "small", "green", "white",
         "black", "photo", "bird", "tree", "sky", "water", "boat"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
BERT_VOCAB = BERT_SPECIALS + WORDS  # 39 tokens
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _bert_tokenizer(out: Path, bos: str = "[DEC]"):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(BERT_VOCAB)}, bos_token=bos)
    tok.save_pretrained(out)
    return tok


def _image_processor(out: Path, kind: str) -> None:
    from transformers import BlipImageProcessor, ViTImageProcessor

    cls = BlipImageProcessor if kind == "blip" else ViTImageProcessor
    cls(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD, resample=3).save_pretrained(out)


def _spread(model: torch.nn.Module, seed: int) -> None:
    """Random weights larger than transformers' init (std 0.02), so logits differ clearly between inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name or ".ln_" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def tiny_blip(out: str | Path, text_width: int = 32, seed: int = 0):
    """BlipForConditionalGeneration: 48-wide ViT into a ``text_width`` BERT decoder (BLIP-large's 1024 -> 768)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    out = Path(out)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(BERT_VOCAB), hidden_size=text_width, encoder_hidden_size=VISION["hidden_size"],
                intermediate_size=2 * text_width, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=BERT_VOCAB.index("[DEC]"), sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=VISION, text_config=text))
    _spread(model, seed)
    model.save_pretrained(out)
    _bert_tokenizer(out)
    _image_processor(out, "blip")
    return BlipForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()


def tiny_vit_gpt2(out: str | Path, seed: int = 0):
    """VisionEncoderDecoderModel: a 48-wide ViT and a 32-wide GPT-2 with cross-attention (enc_to_dec_proj)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    out = Path(out)
    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    vit = ViTConfig(**VISION, qkv_bias=True)
    gpt2 = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      add_cross_attention=True, bos_token_id=eos, eos_token_id=eos)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config)
    _spread(model, seed)
    model.save_pretrained(out)
    _image_processor(out, "vit")
    return VisionEncoderDecoderModel.from_pretrained(out, attn_implementation="eager").eval()


def tiny_vit_bert(out: str | Path, seed: int = 0):
    """VisionEncoderDecoderModel: a 48-wide ViT and a 48-wide BERT decoder (no projection), [CLS] starts."""
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    out = Path(out)
    torch.manual_seed(seed)
    vit = ViTConfig(**VISION, qkv_bias=True)
    bert = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                      pad_token_id=0, bos_token_id=4)  # a bos that is not the decoder's start token: [CLS] is
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, bert)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = 2, 3, 0
    model = VisionEncoderDecoderModel(config=config)
    _spread(model, seed)
    model.save_pretrained(out)
    _bert_tokenizer(out, bos="[CLS]")
    _image_processor(out, "vit")
    return VisionEncoderDecoderModel.from_pretrained(out, attn_implementation="eager").eval()
