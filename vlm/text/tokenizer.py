"""Word-level or BPE tokenizer trained from the training texts with the `tokenizers` library, and the prompts.

A caption is ``[BOS] caption [EOS]``; a question-answer pair is ``[BOS] question [SEP] answer [EOS]``.
The loss covers only what follows the prompt (the caption, or the answer) and the end token.

A model imported by `vlm.hub` keeps its own tokenizer (its ``tokenizer.json``) and names which of its tokens play
these roles (`ModelConfig.special_tokens`, e.g. BLIP's [DEC] as BOS and [SEP] as EOS); UNK and SEP may then be
missing (a byte-level BPE never meets an unknown word; a captioner takes no questions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, BOS, EOS, SEP = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, SEP]
ROLES = {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS, "sep": SEP}  # vlm's own token of each role
REQUIRED_ROLES = ("pad", "bos", "eos")


class Tokenizer:
    """Text <-> token ids; special ids come from the trained vocabulary, never hard-coded."""

    def __init__(self, tokenizer: HFTokenizer, special_tokens: dict[str, str] | None = None):
        """special_tokens: the token of each role (pad, bos, eos; optionally unk, sep); None: vlm's own."""
        self.hf = tokenizer
        # Text that spells a special token ("[SEP]", "[EOS]") is tokenized as plain text, so user input can
        # never inject a special id; special ids enter sequences only through the prompt methods below.
        self.hf.encode_special_tokens = True
        self.special_tokens = dict(special_tokens) if special_tokens is not None else None
        if special_tokens is None:
            ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
            if any(i is None for i in ids):
                raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
            self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.sep_id = ids
            return
        unknown = sorted(set(special_tokens) - set(ROLES))
        missing = [r for r in REQUIRED_ROLES if r not in special_tokens]
        if unknown or missing:
            raise ValueError(f"special_tokens: unknown role(s) {unknown}" if unknown
                             else f"special_tokens: no token for role(s) {missing}")
        ids = {}
        for role, token in special_tokens.items():
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"special_tokens: the {role} token {token!r} is not in the tokenizer")
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.unk_id, self.sep_id = ids.get("unk"), ids.get("sep")

    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "word", vocab_size: int = 8000,
              min_frequency: int = 1) -> Tokenizer:
        """A word-level or byte-level BPE vocabulary from the training texts (lower-cased, NFKC-normalised)."""
        if kind == "word":
            if vocab_size <= len(SPECIAL_TOKENS):  # every word would be unknown
                raise ValueError(f"vocab_size {vocab_size}: a word-level vocabulary needs room for words beside its "
                                 f"{len(SPECIAL_TOKENS)} special tokens")
            tok = HFTokenizer(models.WordLevel(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
            tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, tidies punctuation
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                min_frequency=min_frequency)
        elif kind == "bpe":  # every byte is in the alphabet: nothing is ever unknown
            tok = HFTokenizer(models.BPE(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                          min_frequency=min_frequency,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        else:
            raise ValueError(f"tokenizer kind {kind!r} is not one of word, bpe")
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def count_unknown(self, texts: Iterable[str]) -> tuple[int, int]:
        """(unknown tokens, all tokens) over the texts: words outside the vocabulary become [UNK], counted here."""
        unknown = total = 0
        for text in texts:
            ids = self.encode(text)
            unknown += sum(i == self.unk_id for i in ids)
            total += len(ids)
        return unknown, total

    @classmethod
    def from_str(cls, json_str: str, special_tokens: dict[str, str] | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_str(json_str), special_tokens)

    @classmethod
    def from_file(cls, path: str, special_tokens: dict[str, str] | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_file(path), special_tokens)

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str) -> None:
        self.hf.save(path)

    def __len__(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def phrase_tokens(self, text: str, phrase: str) -> list[list[int]]:
        """For each whole-word, case-insensitive occurrence of phrase in text, the indices of the tokens of
        ``encode(text)`` that cover it (from the tokenizer's character offsets, so word-level and BPE alike)."""
        offsets = self.hf.encode(text, add_special_tokens=False).offsets
        spans = []
        for m in re.finditer(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", text, flags=re.IGNORECASE):
            tokens = [i for i, (a, b) in enumerate(offsets) if a < m.end() and b > m.start()]
            if tokens:
                spans.append(tokens)
        return spans

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.hf.id_to_token(i) for i in ids]

    def caption_prompt(self, prompt: str | None = None) -> list[int]:
        """[BOS], then the tokens of a text prompt that the caption continues (e.g. "a picture of")."""
        return [self.bos_id, *(self.encode(prompt) if prompt else [])]

    def question_prompt(self, question: str) -> list[int]:
        if self.sep_id is None:
            raise ValueError("this model's tokenizer has no question separator (sep): it takes no questions")
        return [self.bos_id, *self.encode(question), self.sep_id]

    def cut_prompt(self, prompt: list[int], limit: int) -> list[int]:
        """A question prompt cut to ``limit`` tokens, still ending in [SEP] (room is left for the answer)."""
        return prompt if len(prompt) <= limit else [*prompt[:limit - 1], self.sep_id]

    def training_pair(self, prompt: list[int], target: str) -> tuple[list[int], int]:
        """Full sequence ``prompt + target + [EOS]`` and the number of prompt tokens (not learned)."""
        return [*prompt, *self.encode(target), self.eos_id], len(prompt)
