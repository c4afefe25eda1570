"""vlm/train/scst.py: the CIDEr-D reward, k samples per image, the policy gradient and the SCST stage."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.config import DataConfig, DecodingConfig, OptimConfig, SCSTConfig, TrainConfig, TrainerConfig, ValConfig
from vlm.data.scenes import make_scene
from vlm.eval.caption import caption_scores, tokenize_caption
from vlm.model.generate import generate
from vlm.train.run import train
from vlm.train.scst import CiderD, policy_loss, sequence_mask, tokens_with_end


def test_cider_d_with_the_scored_corpus_as_document_frequencies_matches_pycocoevalcap():
    scenes = [make_scene(i, "val") for i in range(12)]
    predictions = {i: s.captions[(i + 1) % 5] if i % 3 else scenes[(i + 1) % 12].captions[0]
                   for i, s in enumerate(scenes)}
    references = {i: s.captions for i, s in enumerate(scenes)}
    cider = CiderD(list(references.values()))
    ours = cider.scores([predictions[i] for i in range(12)], [references[i] for i in range(12)])
    expected = caption_scores(predictions, references)["CIDEr-D"]
    assert sum(ours) / len(ours) == pytest.approx(expected, rel=1e-9)
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in references.items()}
    _, per_item = Cider().compute_score(gts, {i: [tokenize_caption(p)] for i, p in predictions.items()})
    assert len(set(ours)) > 3 and ours == pytest.approx(list(per_item), rel=1e-9)
    # Scoring a few of the items against the whole corpus's frequencies gives those items' corpus scores.
    assert cider.scores([predictions[i] for i in (2, 7)], [references[i] for i in (2, 7)]) == pytest.approx(
        [per_item[2], per_item[7]], rel=1e-9)


def test_cider_d_document_frequencies_do_not_depend_on_the_batch():
    corpus = [make_scene(i, "train").captions for i in range(50)]
    cider = CiderD(corpus)
    refs = make_scene(3, "val").captions
    (alone,) = cider.scores([refs[0]], [refs[1:]])
    assert CiderD(corpus).scores([refs[0]], [refs[1:]]) == [alone] and alone > 0
    assert cider.scores(["a square", refs[0]], [refs[1:], refs[1:]]) == [cider.scores(["a square"], [refs[1:]])[0],
                                                                          alone]
    assert cider.scores(["a square"], [refs[1:]])[0] < alone


def test_sampled_captions_are_k_per_image_with_the_end_token_and_padding(tiny_model, tokenizer):
    with torch.no_grad():
        image_kv, _ = tiny_model.encode(torch.randn(2, 3, 64, 64))
    gen = generate(tiny_model, image_kv, [tokenizer.caption_prompt()] * 2, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, config=DecodingConfig(max_new_tokens=10, sample=True, num_samples=4,
                                                                  seed=[5, 9]))
    tokens = tokens_with_end(gen, tokenizer.eos_id, tokenizer.pad_id, torch.device("cpu"))
    assert tokens.shape[0] == 8 and tokens.shape[1] <= 10
    mask = sequence_mask(tokens, tokenizer.eos_id)
    assert (tokens[~mask] == tokenizer.pad_id).all()
    for row, m, kept, ended in zip(tokens, mask, gen.tokens, gen.ended, strict=True):
        assert row[m].tolist() == kept + [tokenizer.eos_id] * ended
    assert any(gen.ended) and len({tuple(t) for t in gen.tokens}) > 1  # sampling, not greedy


def test_policy_gradient_raises_the_better_sample_and_lowers_the_worse(tiny_model, tokenizer):
    model = tiny_model.train()
    images = torch.randn(1, 3, 64, 64)
    tokens = torch.tensor([tokenizer.encode("a small red circle") + [tokenizer.eos_id],
                           tokenizer.encode("a large blue cross") + [tokenizer.eos_id]])  # (2, T), one image
    ids = torch.cat([torch.full((2, 1), tokenizer.bos_id), tokens[:, :-1]], 1)
    mask = sequence_mask(tokens, tokenizer.eos_id)

    def logp() -> torch.Tensor:
        image_kv, grid = model.encode(images)
        logits = model.decode(image_kv, grid, ids).logits
        return (logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1) * mask).sum(1)

    before = logp().detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    image_kv, grid = model.encode(images)
    loss = policy_loss(model.decode(image_kv, grid, ids).logits, tokens, mask, torch.tensor([1.0, -1.0]))
    loss.backward()
    optimizer.step()
    after = logp().detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_scst_stage_trains_from_an_exported_model_and_changes_it(tiny_model, tokenizer, tmp_path):
    tiny = TrainConfig(model=tiny_config(), data=DataConfig(train_scenes=32, val_scenes=4, batch_size=4, num_workers=0,
                                                             questions_per_image=1),
                       trainer=TrainerConfig(max_steps=2, max_time=None, val_check_interval=2, accelerator="cpu",
                                             devices=1), val=ValConfig(generate=False))
    base = Captioner(tiny_model, tokenizer, device="cpu").save(tmp_path / "ce")
    scst = TrainConfig(**{**{k: getattr(tiny, k) for k in ("model", "data", "trainer", "val")},
                          "optim": OptimConfig(lr=1e-3, warmup_steps=0),
                          "scst": SCSTConfig(enabled=True, baseline="mean", samples=3, df_items=32)})
    exported = train(scst, tmp_path / "scst", init=str(base))
    ckpt = torch.load(tmp_path / "scst" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["scst"] == asdict(scst.scst)
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(exported / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
