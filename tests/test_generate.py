"""vlm/model/generate.py: each decoding option agrees with and without the cache and does what it says; batched
equals one image at a time; the returned attention is one map per generated token, of the kept sequence."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ending_model
from vlm.config import DecodingConfig
from vlm.model.generate import TorchDecoder, decode, generate

OPTIONS = {
    "greedy": {},
    "beam_length_penalty": dict(beam_size=3, length_penalty=1.0),
    "greedy_no_repeat": dict(no_repeat_ngram_size=2),
    "beam_no_repeat": dict(beam_size=3, no_repeat_ngram_size=1),
    "sample": dict(sample=True, seed=0),
    "sample_temperature_top_k": dict(sample=True, temperature=1.5, top_k=5, seed=1),
    "sample_top_p_no_repeat": dict(sample=True, top_p=0.8, no_repeat_ngram_size=2, seed=2),
    "min_new_tokens": dict(min_new_tokens=5),
    "sample_k_per_image": dict(sample=True, num_samples=3, top_k=20, seed=3),
}


def _run(model, tokenizer, images, prompts, use_cache=True, return_attention=False, **options):
    options.setdefault("max_new_tokens", 8)
    with torch.no_grad():
        image_kv, _ = model.encode(images)
    return generate(model, image_kv, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    config=DecodingConfig(**options), use_cache=use_cache, return_attention=return_attention)


def _prompts(tokenizer):  # of different lengths, so the batch is left-padded
    return [tokenizer.caption_prompt(), tokenizer.question_prompt("what color is the circle?"),
            tokenizer.question_prompt("how many red objects are there?")]


def _repeats(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.fixture
def eos_model(tiny_model, tokenizer):
    """The tiny model, made to prefer the end token strongly at every step."""
    with torch.no_grad():
        direction = torch.zeros(tiny_model.decoder.cfg.width)
        direction[0] = 1.0
        tiny_model.decoder.tok_emb.weight[tokenizer.eos_id] = 50 * direction
        tiny_model.decoder.ln_f.bias.copy_(direction)
    return tiny_model


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_gives_the_same_result_with_and_without_the_cache(tiny_model, tokenizer, name):
    images = torch.randn(3, 3, 64, 64)
    cached = _run(tiny_model, tokenizer, images, _prompts(tokenizer), return_attention=True, **OPTIONS[name])
    uncached = _run(tiny_model, tokenizer, images, _prompts(tokenizer), return_attention=True, use_cache=False,
                    **OPTIONS[name])
    assert cached.tokens == uncached.tokens
    assert all(len(t) > 0 for t in cached.tokens)
    torch.testing.assert_close(torch.tensor(cached.scores), torch.tensor(uncached.scores), atol=1e-4, rtol=1e-4)
    for a, b, tokens in zip(cached.attentions, uncached.attentions, cached.tokens, strict=True):
        assert a.shape[0] == len(tokens)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", OPTIONS)
def test_returning_attention_leaves_tokens_and_scores_unchanged(tiny_model, tokenizer, name):
    images = torch.randn(3, 3, 64, 64)
    plain = _run(tiny_model, tokenizer, images, _prompts(tokenizer), **OPTIONS[name])
    mapped = _run(tiny_model, tokenizer, images, _prompts(tokenizer), return_attention=True, **OPTIONS[name])
    assert plain.attentions is None
    assert mapped.tokens == plain.tokens
    assert mapped.scores == plain.scores  # exactly: the maps are computed once decoding ends
    for attn, tokens in zip(mapped.attentions, mapped.tokens, strict=True):
        assert attn.shape[0] == len(tokens)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


@pytest.mark.parametrize("options", [dict(beam_size=3), dict(sample=True, seed=0)], ids=["beam", "sample"])
def test_returned_attention_is_that_of_the_kept_sequence_read_again(tiny_model, tokenizer, options):
    images, prompt = torch.randn(2, 3, 64, 64), tokenizer.caption_prompt()
    gen = _run(tiny_model, tokenizer, images, [prompt] * 2, return_attention=True, **options)
    for i, (tokens, attn) in enumerate(zip(gen.tokens, gen.attentions, strict=True)):
        with torch.no_grad():
            out = tiny_model(images[i:i + 1], torch.tensor([prompt + tokens]), need_weights=True)
        # the position before each generated token predicted it
        again = torch.stack([w[0, :, len(prompt) - 1:-1] for w in out.cross_attentions], dim=1)  # (H, L, T, N)
        torch.testing.assert_close(attn, again.permute(2, 1, 0, 3), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sample_temperature_top_k", "sample_top_p_no_repeat", "beam_no_repeat",
                                  "sample_k_per_image"])
def test_batched_equals_one_image_at_a_time(tiny_model, tokenizer, name):
    images, prompts = torch.randn(3, 3, 64, 64), _prompts(tokenizer)
    options = dict(OPTIONS[name])
    seed = options.pop("seed", None)
    k = options.get("num_samples", 1)
    batched = _run(tiny_model, tokenizer, images, prompts, seed=seed, **options)
    assert len(batched.tokens) == 3 * k
    for i in range(3):  # image i of a batch samples with seed + i, its k samples all from that seed
        single = _run(tiny_model, tokenizer, images[i:i + 1], prompts[i:i + 1],
                      seed=None if seed is None else [seed + i], **options)
        assert single.tokens == batched.tokens[i * k:(i + 1) * k]
    if k > 1:  # an image's samples are k draws, not one draw repeated
        assert all(len({tuple(t) for t in batched.tokens[i * k:(i + 1) * k]}) > 1 for i in range(3))


def test_beam_of_one_is_greedy_and_beam_scores_are_no_worse(tiny_model, tokenizer):
    images = torch.randn(4, 3, 64, 64)
    prompts = [tokenizer.caption_prompt()] * 4
    greedy = _run(tiny_model, tokenizer, images, prompts, max_new_tokens=12)
    assert _run(tiny_model, tokenizer, images, prompts, beam_size=1, max_new_tokens=12).tokens == greedy.tokens
    beam = _run(tiny_model, tokenizer, images, prompts, beam_size=4, max_new_tokens=12)
    assert all(b >= g - 1e-4 for b, g in zip(beam.scores, greedy.scores, strict=True))


def test_batched_generation_equals_one_image_at_a_time(tiny_model, tokenizer):
    images = torch.randn(3, 3, 64, 64)
    prompts = [tokenizer.question_prompt("is there a red circle?"), tokenizer.caption_prompt(),
               tokenizer.question_prompt("what shape is the small blue object?")]  # different lengths
    batched = _run(tiny_model, tokenizer, images, prompts, return_attention=True, max_new_tokens=12)
    for i in range(3):
        single = _run(tiny_model, tokenizer, images[i:i + 1], prompts[i:i + 1], return_attention=True,
                      max_new_tokens=12)
        assert single.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(single.attentions[0], batched.attentions[i], atol=1e-5, rtol=1e-4)


def test_returned_attention_has_one_map_per_generated_token(tiny_model, tokenizer):
    images = torch.randn(2, 3, 64, 64)
    gen = _run(tiny_model, tokenizer, images, [tokenizer.caption_prompt()] * 2, return_attention=True,
               max_new_tokens=12)
    h, w = tiny_model.encoder(images)[1]
    for tokens, attn in zip(gen.tokens, gen.attentions, strict=True):
        assert attn.shape == (len(tokens), 2, 4, h * w)  # (T, L, H, N)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


def test_a_seed_reproduces_a_sample_and_other_seeds_differ(tiny_model, tokenizer):
    images = torch.randn(4, 3, 64, 64)
    prompts = [tokenizer.caption_prompt()] * 4
    first = _run(tiny_model, tokenizer, images, prompts, sample=True, seed=7)
    assert _run(tiny_model, tokenizer, images, prompts, sample=True, seed=7).tokens == first.tokens
    others = [_run(tiny_model, tokenizer, images, prompts, sample=True, seed=s).tokens for s in (8, 100, 200)]
    assert any(o != first.tokens for o in others)
    assert first.tokens != _run(tiny_model, tokenizer, images, prompts).tokens  # not greedy in disguise


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4), dict(temperature=1e-39),
                                     dict(temperature=5e-324), dict(temperature=1e-39, top_p=0.9, top_k=5)],
                         ids=["top_k_1", "top_p_tiny", "temperature_tiny", "temperature_1e-39", "temperature_least",
                              "temperature_1e-39_filtered"])
def test_sampling_that_keeps_only_the_best_token_is_greedy(tiny_model, tokenizer, options):
    images = torch.randn(3, 3, 64, 64)
    greedy = _run(tiny_model, tokenizer, images, _prompts(tokenizer))
    sampled = _run(tiny_model, tokenizer, images, _prompts(tokenizer), sample=True, seed=3, **options)
    assert sampled.tokens == greedy.tokens
    torch.testing.assert_close(torch.tensor(sampled.scores), torch.tensor(greedy.scores))


def test_a_temperature_however_small_leaves_no_nan():
    from vlm.model.generate import _tempered

    logp = torch.tensor([[-0.4, -1.2, -3.0, float("-inf")], [float("-inf")] * 4])  # a row all -inf stays so
    for temperature in (1.0, 1e-39, 5e-324):
        scaled = _tempered(logp, temperature)
        assert not scaled.isnan().any() and scaled[0, 0] == 0 and (scaled[0, 1:] < 0).all()
        assert (scaled[1] == float("-inf")).all()
    torch.testing.assert_close(_tempered(logp, 2.0)[0].softmax(-1), (logp[0] / 2.0).softmax(-1))


def test_sampled_first_tokens_follow_the_filtered_distribution(tiny_model, tokenizer):
    n, temperature, top_k = 2000, 2.0, 3
    image = torch.randn(1, 3, 64, 64)
    prompt = tokenizer.caption_prompt()
    with torch.no_grad():
        logits = tiny_model(image, torch.tensor([prompt])).logits[0, -1]  # (V,)
    top = (logits / temperature).topk(top_k)
    expected = top.values.softmax(-1)
    gen = _run(tiny_model, tokenizer, image, [prompt], max_new_tokens=1, sample=True, num_samples=n,
               temperature=temperature, top_k=top_k, seed=0)  # n draws for one image
    first = torch.tensor([t[0] if t else tokenizer.eos_id for t in gen.tokens])
    assert set(first.tolist()) <= set(top.indices.tolist())
    observed = torch.stack([(first == i).float().mean() for i in top.indices])
    torch.testing.assert_close(observed, expected, atol=0.035, rtol=0)  # 3 standard errors


@pytest.mark.parametrize("options", [dict(), dict(beam_size=3), dict(sample=True, top_k=3, seed=0)],
                         ids=["greedy", "beam", "sample"])
@pytest.mark.parametrize("n", [1, 2])
def test_no_repeat_ngram_forbids_repeats(tiny_model, tokenizer, options, n):
    images = torch.randn(4, 3, 64, 64)
    prompts = [tokenizer.caption_prompt()] * 4
    free = _run(tiny_model, tokenizer, images, prompts, max_new_tokens=16, **options)
    assert any(_repeats(t, n) for t in free.tokens)  # the random model does repeat itself
    banned = _run(tiny_model, tokenizer, images, prompts, max_new_tokens=16, no_repeat_ngram_size=n, **options)
    assert not any(_repeats(t, n) for t in banned.tokens)
    assert all(len(t) > 0 for t in banned.tokens)


def test_min_new_tokens_delays_the_end_and_generation_stops_when_all_end(eos_model, tokenizer):
    calls = []
    eos_model.decoder.register_forward_hook(lambda *_: calls.append(1))
    images, prompts = torch.randn(2, 3, 64, 64), [tokenizer.caption_prompt()] * 2
    assert _run(eos_model, tokenizer, images, prompts, max_new_tokens=20).tokens == [[], []]
    assert len(calls) == 1  # everything ended at the first step: no further decoder calls
    for options in (dict(), dict(beam_size=2), dict(sample=True, seed=0)):
        gen = _run(eos_model, tokenizer, images, prompts, max_new_tokens=20, min_new_tokens=4, **options)
        assert [len(t) for t in gen.tokens] == [4, 4]
        assert tokenizer.eos_id not in sum(gen.tokens, [])


def test_a_larger_length_penalty_never_picks_a_shorter_beam(tiny_model, tokenizer):
    torch.manual_seed(1)
    images = torch.randn(6, 3, 64, 64)
    prompts = [tokenizer.caption_prompt()] * 6
    with torch.no_grad():  # make the end token likely enough that beams end at various lengths
        tiny_model.decoder.tok_emb.weight[tokenizer.eos_id] = 0.0
        tiny_model.decoder.tok_emb.weight[tokenizer.eos_id, 0] = 1.0
    lengths = [[len(t) for t in _run(tiny_model, tokenizer, images, prompts, beam_size=4, length_penalty=lp).tokens]
               for lp in (0.0, 1.0, 3.0)]
    for shorter, longer in zip(lengths, lengths[1:], strict=False):
        assert all(a <= b for a, b in zip(shorter, longer, strict=True))
    assert lengths[0] != lengths[-1]  # the penalty did change some choices


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature must be a finite"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(sample=True, beam_size=2), "beam_size 1"), (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
])
def test_bad_options_are_refused_by_name(tiny_model, tokenizer, bad, message):
    with pytest.raises(ValueError, match=message):
        _run(tiny_model, tokenizer, torch.randn(1, 3, 64, 64), [tokenizer.caption_prompt()], **bad)


class CountingDecoder(TorchDecoder):
    """The torch backend, counting the rows of each step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rows_seen: list[int] = []

    def step(self, ids, *args):
        self.rows_seen.append(len(ids))
        return super().step(ids, *args)


RETIRING = {  # options, and the end token's bias that makes this seeded model's texts end at varied steps
    "greedy": ({}, 0.6),
    "greedy_uncached": (dict(use_cache=False), 0.6),
    "greedy_no_repeat": (dict(no_repeat_ngram_size=1), 0.5),
    "beam_no_repeat": (dict(beam_size=3, no_repeat_ngram_size=1, length_penalty=1.0), 0.5),
    "sample_k_per_image": (dict(sample=True, num_samples=3, top_k=20, seed=0), 1.0),
}


@pytest.mark.parametrize("name", RETIRING)
def test_retiring_ended_images_leaves_every_sequence_and_map_as_it_was(tokenizer, name):
    """Images whose rows have all ended leave the backend's later steps (``retire``): the steps run fewer rows, and
    the tokens, end flags, scores, log-probabilities and maps are those of decoding every row to the end."""
    options, bias = RETIRING[name]
    options = dict(options)
    use_cache = options.pop("use_cache", True)
    model = ending_model(tokenizer, bias)
    torch.manual_seed(1)
    with torch.no_grad():
        image_kv, _ = model.encode(torch.randn(12, 3, 64, 64))
    prompts = [tokenizer.caption_prompt(), tokenizer.question_prompt("what color is the circle?")] * 6
    runs = {}
    for retire in (False, True):
        backend = CountingDecoder(model, image_kv, use_cache)
        out = decode(backend, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                     config=DecodingConfig(max_new_tokens=16, **options), return_attention=True, retire=retire)
        runs[retire] = out, backend.rows_seen
    (full, full_rows), (retired, retired_rows) = runs[False], runs[True]
    assert len({len(t) for t in full.tokens}) >= 3  # texts of varied lengths
    assert set(full_rows) == {full_rows[0]} and len(set(retired_rows)) >= 3  # every row, against two retirements
    assert retired_rows == sorted(retired_rows, reverse=True) and len(retired_rows) == len(full_rows)
    assert retired.tokens == full.tokens and retired.ended == full.ended
    torch.testing.assert_close(torch.tensor(retired.scores), torch.tensor(full.scores), atol=1e-5, rtol=0)
    for a, b, ta, tb in zip(retired.token_logprobs, full.token_logprobs, retired.attentions, full.attentions,
                            strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        torch.testing.assert_close(ta, tb, atol=1e-6, rtol=0)
    maps = torch.cat([t for t in full.attentions if len(t)])  # (tokens, L, H, N)
    assert float(maps.amax()) > 1.5 / maps.shape[-1]  # real maps, peaking above uniform: not zeros compared
