"""Word-level tokenizer trained from the training texts with the `tokenizers` library, and the prompts.

A caption is ``[BOS] caption [EOS]``; a question-answer pair is ``[BOS] question [SEP] answer [EOS]``.
The loss covers only what follows the prompt (the caption, or the answer) and the end token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, BOS, EOS, SEP = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, SEP]


class Tokenizer:
    """Text <-> token ids; special ids come from the trained vocabulary, never hard-coded."""

    def __init__(self, tokenizer: HFTokenizer):
        self.hf = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.sep_id = ids

    @classmethod
    def train(cls, texts: Iterable[str], min_frequency: int = 1) -> Tokenizer:
        tok = HFTokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, tidies punctuation
        tok.train_from_iterator(
            texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency)
        )
        return cls(tok)

    @classmethod
    def from_str(cls, json_str: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(json_str))

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        return cls(HFTokenizer.from_file(path))

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str) -> None:
        self.hf.save(path)

    def __len__(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.hf.id_to_token(i) for i in ids]

    def caption_prompt(self) -> list[int]:
        return [self.bos_id]

    def question_prompt(self, question: str) -> list[int]:
        return [self.bos_id, *self.encode(question), self.sep_id]

    def training_pair(self, prompt: list[int], target: str) -> tuple[list[int], int]:
        """Full sequence ``prompt + target + [EOS]`` and the number of prompt tokens (not learned)."""
        return [*prompt, *self.encode(target), self.eos_id], len(prompt)
