"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D of sampled captions directly.

For each image, ``scst.samples`` captions are sampled from the model; each is rewarded with its CIDEr-D
against the image's references, minus a baseline: the greedy caption's CIDEr-D ("greedy"), or the mean
reward of the image's other samples ("mean", Luo 2020). The loss is the policy gradient
``-(reward - baseline) * log p(caption)``, averaged over the sampled tokens; a caption better than the
baseline has its probability raised, a worse one lowered.

CIDEr-D's document frequencies come from the reference captions of the first ``scst.df_items`` training
items, the same on every process, so rewards do not depend on how the data is split across GPUs.

Dimensions: B images, K samples per image, R = B * K rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import Tensor

from vlm.config import ModelConfig, OptimConfig, SCSTConfig
from vlm.data.builtin import Batch
from vlm.errors import VLMError
from vlm.eval.caption import tokenize_caption
from vlm.model.decoder import KeysValues
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer
from vlm.train.guards import skip_nonfinite
from vlm.train.module import CaptionModule

NGRAMS, SIGMA = 4, 6.0  # CIDEr-D's n-gram order and length-penalty width, as in the COCO toolkit


def _ngram_counts(words: list[str]) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, NGRAMS + 1) for i in range(len(words) - n + 1))


class CiderD:
    """CIDEr-D with document frequencies fixed from a reference corpus (one list of captions per item).

    Computes exactly what pycocoevalcap's Cider computes (clipped tf-idf cosine per n-gram order, Gaussian
    length penalty, x10), but the idf comes from the given corpus instead of the captions being scored.
    """

    def __init__(self, corpus: Sequence[Sequence[str]]):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.document_frequency: Counter = Counter()
        for refs in corpus:
            self.document_frequency.update({g for ref in refs for g in _ngram_counts(tokenize_caption(ref).split())})
        self.log_documents = math.log(float(len(corpus)))

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(NGRAMS)]
        norm = [0.0] * NGRAMS
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = tf * (self.log_documents - math.log(max(1.0, self.document_frequency[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:  # the toolkit measures length in bigrams; kept for parity
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, caption: str, references: Sequence[str]) -> float:
        """CIDEr-D of one caption against its references."""
        vec, norm, length = self._vector(_ngram_counts(tokenize_caption(caption).split()))
        total = 0.0
        for ref in references:
            vec_ref, norm_ref, length_ref = self._vector(_ngram_counts(tokenize_caption(ref).split()))
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * SIGMA**2))
            for n in range(NGRAMS):
                val = sum(min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_ref[n] != 0:
                    val /= norm[n] * norm_ref[n]
                total += val * penalty
        return total / NGRAMS / len(references) * 10.0


@torch.no_grad()
def rollout(model: VisionLanguageModel, image_kv: list[KeysValues], prompt: list[int], k: int, *, eos_id: int,
            pad_id: int, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
            generator: torch.Generator | None = None) -> Tensor:
    """k captions per image continuing one shared prompt: (R, T) tokens, image-major, end token included,
    padding after it. Multinomial sampling (or greedy), with the KV cache; image keys/values are not copied.
    """
    B = image_kv[0][0].shape[0]
    R = B * k
    device = image_kv[0][0].device
    T = min(max_new_tokens, model.cfg.decoder.max_length - len(prompt))  # the end token included, as generate
    cache = model.decoder.new_cache(R, like=image_kv[0][0])
    ids = torch.tensor(prompt, device=device).expand(R, -1)  # (R, P): one prompt, no padding needed
    tokens = torch.full((R, T), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    for t in range(T):
        logits, _, _ = model.decoder(ids, image_kv, cache=cache)
        logits = logits[:, -1].float()  # (R, V)
        if greedy:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        token = token.masked_fill(finished, pad_id)
        tokens[:, t] = token
        finished |= token == eos_id
        if bool(finished.all()):
            return tokens[:, :t + 1]
        ids = token[:, None]  # (R, 1)
    return tokens


def sequence_mask(tokens: Tensor, eos_id: int) -> Tensor:
    """(R, T) True on every token up to and including the first end token."""
    is_eos = (tokens == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def policy_loss(logits: Tensor, tokens: Tensor, mask: Tensor, advantage: Tensor) -> Tensor:
    """``-(reward - baseline) * log p(token)`` averaged over the sampled tokens.

    logits (R, T, V) predict tokens (R, T); mask (R, T) marks real tokens; advantage (R,).
    """
    logp = logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # (R, T)
    return -(advantage[:, None] * logp * mask).sum() / mask.sum().clamp(min=1)


class SCSTModule(CaptionModule):
    """Fine-tunes a captioner with self-critical policy gradient; validation as for cross-entropy."""

    def __init__(self, model: dict, optim: dict, tokenizer: str, scst: dict):
        super().__init__(model, optim, tokenizer)
        self.scst_cfg = SCSTConfig(**scst)
        if self.scst_cfg.baseline == "mean" and self.scst_cfg.samples < 2:
            raise VLMError(f"scst.baseline mean needs scst.samples >= 2, got {self.scst_cfg.samples}")
        self.cider: CiderD | None = None

    @classmethod
    def create(cls, model: ModelConfig, optim: OptimConfig, tokenizer: Tokenizer, scst: SCSTConfig) -> SCSTModule:
        return cls(asdict(model), asdict(optim), tokenizer.to_str(), asdict(scst))

    def on_train_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        n = min(self.scst_cfg.df_items, len(dataset))
        self.cider = CiderD([dataset.references(i)["captions"] for i in range(n)])

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        cfg, tok = self.scst_cfg, self.tokenizer
        dataset = self.trainer.train_dataloader.dataset
        references = [dataset.references(i)["captions"] for i in batch.index.tolist()]
        encode = self.model.encode_features if batch.features else self.model.encode  # feature cache or images
        image_kv, grid = encode(batch.images)
        prompt = tok.caption_prompt()
        kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=cfg.max_new_tokens)
        k = cfg.samples
        tokens = rollout(self.model, image_kv, prompt, k, temperature=cfg.temperature, **kw)  # (R, T)
        rewards = self._rewards(tokens, references, k)  # (R,)
        if cfg.baseline == "greedy":
            greedy = rollout(self.model, image_kv, prompt, 1, greedy=True, **kw)  # (B, T')
            baseline = self._rewards(greedy, references, 1).repeat_interleave(k)  # (R,)
            self.log("train/greedy_reward", baseline.mean())
        else:  # mean of the image's other samples
            per_image = rewards.view(-1, k)
            baseline = ((per_image.sum(1, keepdim=True) - per_image) / (k - 1)).view(-1)
        mask = sequence_mask(tokens, tok.eos_id)
        ids = torch.cat([torch.tensor(prompt, device=tokens.device).expand(len(tokens), -1), tokens[:, :-1]], 1)
        logits = self.model.decode(image_kv, grid, ids).logits[:, len(prompt) - 1:]  # (R, T, V): predict tokens
        loss = policy_loss(logits, tokens, mask, rewards - baseline)
        if skip_nonfinite(self, loss, self.optim_cfg.nonfinite_skips):
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/reward", rewards.mean(), prog_bar=True)
        return loss

    def _rewards(self, tokens: Tensor, references: list[list[str]], k: int) -> Tensor:
        """CIDEr-D of each row's caption against its image's references (row r reads image r // k)."""
        mask = sequence_mask(tokens, self.tokenizer.eos_id)
        texts = [self.tokenizer.decode(row[m].tolist()) for row, m in zip(tokens, mask, strict=True)]
        scores = [self.cider.score(text, references[r // k]) for r, text in enumerate(texts)]
        return torch.tensor(scores, device=tokens.device)
