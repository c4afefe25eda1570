import pickle
from dataclasses import asdict

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vlm.model.linear as onednn
from tests.conftest import tiny_config
from vlm.config import DecodingConfig, model_config_from_dict
from vlm.model.generate import generate
from vlm.model.linear import OneDNNLinear, ReorderedWeight, linear, use_onednn
from vlm.model.vlm import VisionLanguageModel

ENCODERS = [
    # (timm name, feature level, extra timm args)
    ("resnet18", 2, {"channels": [8, 16, 32, 64]}),
    ("test_resnet", -1, {}),
    ("test_convnext", -1, {}),
    ("test_efficientnet", -1, {}),
    ("test_vit", -1, {}),
    ("test_vit", -1, {"reg_tokens": 4}),  # class token + 4 registers to drop
]


@pytest.mark.parametrize(("name", "level", "args"), ENCODERS)
def test_grid_matches_the_encoders_own_feature_map(tokenizer, name, level, args):
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(name=name, feature_level=level, model_args=args), len(tokenizer))
    images = torch.randn(2, 3, 64, 96)  # non-square
    reference = timm.create_model(name, features_only=True, out_indices=(level,), **args)
    h, w = reference(images)[-1].shape[-2:]
    memory, grid = model.encoder(images)
    assert grid == (h, w)
    assert memory.shape == (2, h * w, 32)
    out = model(images, torch.randint(5, len(tokenizer), (2, 6)), need_weights=True)
    assert out.logits.shape == (2, 6, len(tokenizer))
    assert all(a.shape == (2, 4, 6, h * w) for a in out.cross_attentions)
    assert torch.isfinite(out.logits).all()


def test_every_trainable_parameter_gets_a_gradient(tiny_model, tokenizer):
    tiny_model.train()
    ids = torch.randint(5, len(tokenizer), (4, 9))
    out = tiny_model(torch.randn(2, 3, 64, 64), ids)  # two sequences per image
    F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    # A gradient may be exactly zero at init (ResNet zero-initialises each block's last norm), never missing.
    missing = [n for n, p in tiny_model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())
    assert tiny_model.decoder.tok_emb.weight.grad.any() and tiny_model.encoder.proj[1].weight.grad.any()


def _mlp_pass(f, mlp, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Output and gradients of x and every MLP parameter, and the bytes autograd saved for backward."""
    saved = []
    mlp.zero_grad()
    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = f(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    weights = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    activations = sum(n for ptr, n in stored.items() if ptr not in weights)
    return [y, x.grad, *(p.grad for p in mlp.parameters())], activations


@pytest.mark.parametrize(("autocast", "on_onednn"), [(False, False), (True, False), (False, True)])
def test_decoder_mlp_recomputes_its_gelu_with_the_same_gradients(tiny_model, autocast, on_onednn, monkeypatch):
    mlp = tiny_model.decoder.blocks[0].mlp
    with torch.no_grad():
        mlp[2].bias.normal_()  # it starts at zero
    x = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if on_onednn:  # ours with every product on oneDNN, against F.linear's
            monkeypatch.setattr(onednn, "MIN_PRODUCT", 0)
        ours, ours_bytes = _mlp_pass(mlp, mlp, x)
        monkeypatch.setattr(onednn, "ENABLED", False)
        plain, plain_bytes = _mlp_pass(lambda v: mlp[2](F.gelu(mlp[0](v))), mlp, x)
    for a, b in zip(ours, plain, strict=True):
        assert a.dtype == b.dtype
        if on_onednn:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same operations in the same dtypes
    hidden = 3 * 7 * mlp[0].out_features * (2 if autocast else 4)
    assert ours_bytes <= plain_bytes - hidden  # gelu(h) is no longer kept for backward


def test_sequences_of_one_image_read_only_that_image(tiny_model, tokenizer):
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, len(tokenizer), (6, 5))
    together = tiny_model(images, ids, need_weights=True)  # sequences 0-2 read image 0, 3-5 image 1
    for i in range(2):
        alone = tiny_model(images[i:i + 1], ids[3 * i:3 * i + 3], need_weights=True)
        torch.testing.assert_close(alone.logits, together.logits[3 * i:3 * i + 3], atol=1e-5, rtol=1e-4)
        for a, b in zip(alone.cross_attentions, together.cross_attentions, strict=True):
            torch.testing.assert_close(a, b[3 * i:3 * i + 3], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="split evenly"):
        tiny_model(images, ids[:5])


def test_frozen_encoder_has_no_trainable_trunk(tokenizer):
    model = VisionLanguageModel(tiny_config(trainable=False), len(tokenizer))
    assert not any(p.requires_grad for p in model.encoder.trunk.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_tiny_model_overfits_a_small_batch(tokenizer):
    from vlm.data.scenes import make_scene
    from vlm.data.transforms import image_transform

    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(), len(tokenizer))
    transform = image_transform(model.encoder.trunk, 64)
    scenes = [make_scene(i, "train") for i in range(4)]
    images = torch.stack([transform(s.image) for s in scenes])
    targets = [s.captions[0] for s in scenes]
    seqs = [tokenizer.training_pair(tokenizer.caption_prompt(), t)[0] for t in targets]
    T = max(map(len, seqs))
    ids = torch.full((4, T), tokenizer.pad_id)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    labels = ids[:, 1:].masked_fill(ids[:, 1:] == tokenizer.pad_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        logits = model(images, ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    with torch.no_grad():
        image_kv, _ = model.encode(images)
    gen = generate(model, image_kv, [tokenizer.caption_prompt()] * 4, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, config=DecodingConfig(max_new_tokens=35))
    assert [tokenizer.decode(t) for t in gen.tokens] == targets


def test_model_config_of_an_earlier_version_loads_without_the_dropped_null_patch_option():
    config = asdict(tiny_config())
    config["decoder"]["null_patch"] = False  # written by the versions that had the option, switched off
    assert model_config_from_dict(config) == tiny_config()
    config["decoder"]["null_patch"] = True
    with pytest.raises(ValueError, match="null_patch"):
        model_config_from_dict(config)


@pytest.mark.parametrize("layers", [[3], [-4], []])
def test_attention_layers_outside_the_decoder_are_refused_when_the_model_is_built(tokenizer, layers):
    """They failed at the first training step with the grounding loss on, or made no map at all."""
    cfg = tiny_config()  # two decoder layers
    cfg.attention_layers = layers
    with pytest.raises(ValueError, match=r"^model.attention_layers \[.*\]: the decoder has 2 layers \(0 to 1, or "
                                         r"negative from the last\)$"):
        VisionLanguageModel(cfg, len(tokenizer))
    cfg.attention_layers = [1, -2]
    VisionLanguageModel(cfg, len(tokenizer))


def test_onednn_products_equal_f_linear_follow_the_weight_and_leave_the_rest_to_torch():
    layer = use_onednn(nn.Sequential(nn.Linear(256, 256)))[0]
    assert type(layer) is OneDNNLinear
    x = torch.randn(32, 256)  # 32 x 256 x 256 multiply-adds: over MIN_PRODUCT
    with torch.no_grad():
        for _ in range(2):
            y = layer(x)
            assert layer.reordered.tensor is not None  # oneDNN's product ran
            torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)
            layer.weight.mul_(-2)  # the next product must follow the changed weight
    with torch.no_grad():  # torch.compile traces the plain product (as `optim.compile`'s validation does)
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x),
                                   F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)
    copied = pickle.loads(pickle.dumps(layer))  # oneDNN's layout cannot be pickled: a copy reorders its own
    assert copied.reordered.tensor is None and torch.equal(copied.weight, layer.weight)
    w, b = layer.weight.detach(), layer.bias.detach()
    reordered = ReorderedWeight()
    with torch.no_grad():
        linear(x[:1], w, b, reordered)  # 65,536 multiply-adds: F.linear's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, w, b, reordered).dtype == torch.bfloat16
        with FlopCounterMode(display=False) as flops:  # the operators are watched: plain ones
            linear(x, w, b, reordered)
    assert flops.get_total_flops() == 2 * 32 * 256 * 256
    assert reordered.tensor is None


def test_onednn_products_train_with_f_linears_gradients():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(4, 8, 256), torch.randn(512, 256), torch.randn(512)  # 16 M multiply-adds
    grads = []
    for on in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = linear(*leaves) if on else F.linear(*leaves)
        assert (type(y.grad_fn).__name__ == "_ProductBackward") == on  # forward and backward on oneDNN
        (y * torch.linspace(-1, 1, 512)).sum().backward()
        grads.append([y.detach()] + [t.grad for t in leaves])
    for ours, theirs in zip(*grads, strict=True):
        assert theirs.abs().max() > 1
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    leaves = [x.clone(), weight.clone().requires_grad_(), None]  # the input needs no gradient: none computed
    linear(*leaves).sum().backward()
    torch.testing.assert_close(leaves[1].grad, x.reshape(-1, 256).sum(0).expand(512, -1), rtol=1e-5, atol=1e-4)


def test_a_model_trains_on_onednn_with_the_gradients_of_f_linear(tokenizer, monkeypatch):
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(name="test_vit", feature_level=-1, model_args={"img_size": 64}),
                                len(tokenizer)).train()
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    monkeypatch.setattr(onednn, "MIN_PRODUCT", 0)  # every product of the tiny model through oneDNN
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(5, len(tokenizer), (4, 9))
    products = []
    apply = onednn._Product.apply
    monkeypatch.setattr(onednn._Product, "apply", lambda *a: products.append(1) or apply(*a))
    grads = []
    for on in (True, False):
        monkeypatch.setattr(onednn, "ENABLED", on)
        model.zero_grad()
        out = model(images, ids)
        F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(products) >= 30  # the trunk's, the decoder's and the head's products
    assert grads[0].keys() == grads[1].keys()
    for name, theirs in grads[1].items():
        torch.testing.assert_close(grads[0][name], theirs, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(float(g.abs().sum()) for g in grads[1].values()) > 1


def test_a_model_encodes_and_generates_on_onednn_as_on_f_linear(tokenizer, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(name="test_vit", feature_level=-1, model_args={"img_size": 64})
    model = VisionLanguageModel(config, len(tokenizer)).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) > 20 and all(type(m) is OneDNNLinear for m in linears)  # the timm trunk's too
    monkeypatch.setattr(onednn, "MIN_PRODUCT", 0)  # the tiny model's products: all through oneDNN
    images, prompts = torch.randn(3, 3, 64, 64), [tokenizer.caption_prompt()] * 3

    def run():
        with torch.no_grad():
            image_kv, _ = model.encode(images)
            return generate(model, image_kv, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                            config=DecodingConfig(max_new_tokens=8, min_new_tokens=8, beam_size=2),
                            return_attention=True)

    ours = run()
    assert all(m.reordered.tensor is not None for m in linears) and model.decoder._head_weight.tensor is not None
    monkeypatch.setattr(onednn, "ENABLED", False)
    plain = run()
    assert len(set(plain.scores)) == 3  # the images make a difference
    assert ours.tokens == plain.tokens
    torch.testing.assert_close(torch.tensor(ours.scores), torch.tensor(plain.scores), rtol=0, atol=1e-5)
    for a, b in zip(ours.attentions, plain.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_inference_after_a_fused_optimizer_step_reads_the_new_weights():
    layer = use_onednn(nn.Sequential(nn.Linear(256, 256)))[0]
    x = torch.randn(32, 256)  # over MIN_PRODUCT
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)  # it leaves the weight's _version as it is
    outputs = []
    for _ in range(2):
        with torch.no_grad():  # inference between training steps, as validation does
            outputs.append(layer(x))
            torch.testing.assert_close(outputs[-1], F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-4)
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (outputs[1] - outputs[0]).abs().max() > 1  # the step changed the weights
