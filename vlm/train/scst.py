"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D of sampled captions directly.

For each image, ``scst.samples`` captions are sampled from the model; each is rewarded with its CIDEr-D
against the image's references, minus a baseline: the greedy caption's CIDEr-D ("greedy"), or the mean
reward of the image's other samples ("mean", Luo 2020). The loss is the policy gradient
``-(reward - baseline) * log p(caption)``, averaged over the sampled tokens; a caption better than the
baseline has its probability raised, a worse one lowered.

Samples and the greedy caption come from `vlm.model.generate.generate`, the one decoding loop; an image's k
samples are drawn from its own generator, seeded by the step and the image's dataset index. CIDEr-D is
pycocoevalcap's scorer, with document frequencies from the reference captions of the first ``scst.df_items``
training items, the same on every process, so rewards do not depend on how the data is split across GPUs.

Dimensions: B images, K samples per image, R = B * K rows, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer
from torch import Tensor

from vlm.config import DecodingConfig, ModelConfig, OptimConfig, SCSTConfig
from vlm.data.batch import Batch
from vlm.errors import VLMError
from vlm.eval.caption import tokenize_caption
from vlm.model.decoder import KeysValues
from vlm.model.generate import Generation, generate
from vlm.text.tokenizer import Tokenizer
from vlm.train.guards import skip_nonfinite
from vlm.train.module import CaptionModule
from vlm.train.sharding import full_parameters

NGRAMS, SIGMA = 4, 6.0  # CIDEr-D's n-gram order and length-penalty width, as in the COCO toolkit


class _Frequencies(dict):
    """Document frequencies that read 0 for an unseen n-gram without storing it (the scorer looks up every
    n-gram of every caption, and the table is kept for the whole run)."""

    def __missing__(self, gram: tuple[str, ...]) -> float:
        return 0.0


class _Corpus(list):
    """The scored items, whose length is the size of the corpus the document frequencies came from: CiderScorer
    takes log(len(crefs)) as the corpus size in its idf."""

    def __init__(self, items: list, documents: int):
        super().__init__(items)
        self.documents = documents

    def __len__(self) -> int:
        return self.documents


class CiderD:
    """CIDEr-D with document frequencies fixed from a reference corpus (one list of captions per item).

    The score is pycocoevalcap's ``CiderScorer`` (the one `vlm eval` reports as CIDEr-D: clipped tf-idf
    cosine per n-gram order, Gaussian length penalty of sigma 6, x10); only the idf comes from the given
    corpus instead of from the captions being scored.
    """

    def __init__(self, corpus: Sequence[Sequence[str]]):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        scorer = CiderScorer(n=NGRAMS, sigma=SIGMA)
        for refs in corpus:
            scorer.cook_append(None, [tokenize_caption(r) for r in refs])
        scorer.compute_doc_freq()
        self.document_frequency = _Frequencies(scorer.document_frequency)
        self.documents = len(corpus)

    def scores(self, captions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """CIDEr-D of each caption against its own references."""
        scorer = CiderScorer(n=NGRAMS, sigma=SIGMA)
        for caption, refs in zip(captions, references, strict=True):
            scorer.cook_append(tokenize_caption(caption), [tokenize_caption(r) for r in refs])
        scorer.document_frequency = self.document_frequency
        scorer.crefs = _Corpus(scorer.crefs, self.documents)
        return [float(s) for s in scorer.compute_cider()]


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

    def __init__(self, model: dict, optim: dict, tokenizer: str, scst: dict, pretrained: bool = True):
        super().__init__(model, optim, tokenizer, pretrained)
        self.scst_cfg = SCSTConfig(**scst)
        if self.scst_cfg.baseline == "mean" and self.scst_cfg.samples < 2:
            raise VLMError(f"scst.baseline mean needs scst.samples >= 2, got {self.scst_cfg.samples}")
        self.cider: CiderD | None = None

    @classmethod
    def create(cls, model: ModelConfig, optim: OptimConfig, tokenizer: Tokenizer, scst: SCSTConfig,
               pretrained: bool = True) -> SCSTModule:
        return cls(asdict(model), asdict(optim), tokenizer.to_str(), asdict(scst), pretrained)

    def on_train_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        n = min(self.scst_cfg.df_items, len(dataset))
        self.cider = CiderD([dataset.references(i)["captions"] for i in range(n)])

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        cfg, tok = self.scst_cfg, self.tokenizer
        dataset = self.trainer.train_dataloader.dataset
        indices = batch.index.tolist()
        references = [dataset.references(i)["captions"] for i in indices]
        encode = self.model.encode_features if batch.features else self.model.encode  # feature cache or images
        image_kv, grid = encode(batch.images)
        prompt = tok.caption_prompt()
        k = cfg.samples
        # Each image's samples come from its own generator, seeded by the step and the image's dataset index, so
        # they do not depend on the batch or on how the data is split across processes.
        seeds = [(torch.initial_seed() + self.global_step * len(dataset) + i) % 2**63 for i in indices]
        sampling = DecodingConfig(max_new_tokens=cfg.max_new_tokens, sample=True, temperature=cfg.temperature,
                                  num_samples=k, seed=seeds)
        with full_parameters(self.model):  # generation's step count differs between processes
            samples = self._generate(image_kv, prompt, sampling)
            greedy = (self._generate(image_kv, prompt, DecodingConfig(max_new_tokens=cfg.max_new_tokens))
                      if cfg.baseline == "greedy" else None)
        rewards = self._rewards(samples, references, k)  # (R,)
        if greedy is not None:
            baseline = self._rewards(greedy, references, 1).repeat_interleave(k)  # (R,)
            self.log("train/greedy_reward", baseline.mean())
        else:  # mean of the image's other samples
            per_image = rewards.view(-1, k)
            baseline = ((per_image.sum(1, keepdim=True) - per_image) / (k - 1)).view(-1)
        tokens = tokens_with_end(samples, tok.eos_id, tok.pad_id, image_kv[0][0].device)  # (R, T): end token included
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

    def _generate(self, image_kv: list[KeysValues], prompt: list[int], decoding: DecodingConfig) -> Generation:
        B = image_kv[0][0].shape[0]
        return generate(self.model, image_kv, [prompt] * B, eos_id=self.tokenizer.eos_id,
                        pad_id=self.tokenizer.pad_id, config=decoding)

    def _rewards(self, gen: Generation, references: list[list[str]], k: int) -> Tensor:
        """CIDEr-D of each generated caption against its image's references (sequence r reads image r // k)."""
        texts = [self.tokenizer.decode(t) for t in gen.tokens]
        scores = self.cider.scores(texts, [references[r // k] for r in range(len(texts))])
        return torch.tensor(scores, device=self.device)


def tokens_with_end(gen: Generation, eos_id: int, pad_id: int, device: torch.device) -> Tensor:
    """(R, T) generated tokens, each with its end token when it ended, padded after it."""
    rows = [t + [eos_id] if ended else t for t, ended in zip(gen.tokens, gen.ended, strict=True)]
    tokens = torch.full((len(rows), max(1, max(map(len, rows)))), pad_id, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    return tokens
