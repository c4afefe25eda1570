"""Caption metrics: BLEU-1..4 and CIDEr-D with the COCO toolkit scorers, plus collapse guards.

The official COCO pipeline tokenizes with the Stanford PTB tokenizer (a Java program); `tokenize_caption`
approximates it in pure Python so evaluation runs anywhere.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

# Tokens the pycocoevalcap PTBTokenizer drops after tokenizing, plus the raw characters that the Java
# tokenizer turns into some of them (brackets -> -LRB- etc., double quotes -> `` or '').
_DROPPED_TOKENS = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
    | {"(", ")", "{", "}", '"'}
)
# PTB contraction splits: "don't" -> "do n't", "it's" -> "it 's", "we'll" -> "we 'll".
_NEGATION = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|m|d|ll|re|ve)\b")
# Numbers with separators ("3.5", "1,000"), the split contractions, words (hyphenated, "o'clock"), ellipses
# and dashes, and finally any other single non-space character.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|n't|'(?:s|m|d|ll|re|ve)\b|\w+(?:[-'/]\w+)*|\.\.\.|--|\S")

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D")


def tokenize_caption(text: str) -> str:
    """Lowercase, split PTB-style and drop punctuation, returning space-joined tokens.

    Approximates the COCO evaluation pipeline (Stanford PTBTokenizer followed by pycocoevalcap's punctuation
    removal) so scores are comparable with published numbers without needing Java.
    """
    text = _CLITIC.sub(r"\1 '\2", _NEGATION.sub(r"\1 n't", text.lower()))
    return " ".join(token for token in _TOKEN.findall(text) if token not in _DROPPED_TOKENS)


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D of one predicted caption per item against its reference captions.

    Both mappings must have the same keys and every item needs at least one reference; texts are tokenized
    with `tokenize_caption` first, as the COCO toolkit does. CIDEr-D is computed over the given corpus (its
    IDF comes from these references), so it is only meaningful on a corpus of many images.
    """
    _check_keys(predictions, references)
    # The scorers expect {id: [str, ...]}; positional ints keep any hashable key type safe for them.
    res = {i: [tokenize_caption(predictions[key])] for i, key in enumerate(predictions)}
    gts = {i: [tokenize_caption(ref) for ref in references[key]] for i, key in enumerate(predictions)}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length statistics.
        bleu, _ = Bleu(4).compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(CAPTION_METRICS, [float(b) for b in bleu] + [float(cider)], strict=True))


def _check_keys(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    """Raise ValueError naming the first key that is missing on either side or has no references."""
    if not predictions:
        raise ValueError("no predictions to score")
    for key in predictions:
        if key not in references:
            raise ValueError(f"prediction {key!r} has no references")
        if len(references[key]) == 0:
            raise ValueError(f"prediction {key!r} has an empty reference list")
    for key in references:
        if key not in predictions:
            raise ValueError(f"reference {key!r} has no prediction")


def diversity(captions: Sequence[str]) -> dict[str, float]:
    """Collapse guards for generated captions, computed on `tokenize_caption` tokens.

    "identical_share" is the share of captions equal to the most common one (1.0 means the model says the same
    thing for every image); "distinct_1"/"distinct_2" are unique over total uni-/bigrams across the corpus;
    "mean_length" is the mean number of tokens per caption.
    """
    if not captions:
        raise ValueError("no captions to measure")
    tokenized = [tokenize_caption(caption).split() for caption in captions]
    most_common_count = Counter(" ".join(tokens) for tokens in tokenized).most_common(1)[0][1]
    return {
        "identical_share": most_common_count / len(captions),
        "distinct_1": _distinct(tokenized, 1),
        "distinct_2": _distinct(tokenized, 2),
        "mean_length": sum(len(tokens) for tokens in tokenized) / len(captions),
    }


def _distinct(tokenized: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams divided by all n-grams in the corpus; 0.0 when no caption is n tokens long."""
    ngrams = [tuple(tokens[i : i + n]) for tokens in tokenized for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0
