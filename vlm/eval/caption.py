"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with the COCO toolkit scorers, plus collapse guards.

The official COCO pipeline tokenizes with the Stanford PTB tokenizer (a Java program); `tokenize_caption` reproduces
it in pure Python (`vlm.eval.ptb`), so BLEU, ROUGE-L and CIDEr-D need no Java. METEOR (and SPICE, when its Stanford
models are installed) are Java programs themselves: they run when ``java`` is found, and are reported as skipped
otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import pycocoevalcap.bleu.bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vlm.eval.ptb import ptb_tokenize_lines

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")
# SPICE needs the Stanford CoreNLP 3.6.0 jars that pycocoevalcap's get_stanford_models.py downloads.
_SPICE_MODELS = Path(pycocoevalcap.bleu.bleu.__file__).parents[1] / "spice" / "lib" / "stanford-corenlp-3.6.0.jar"


@functools.lru_cache(maxsize=1 << 16)
def tokenize_caption(text: str) -> str:
    """Lowercase, PTB-tokenize and drop punctuation exactly as the COCO toolkit does; space-joined tokens."""
    return ptb_tokenize_lines([text])[0]


def java_metrics(meteor: bool = True, spice: bool = True) -> tuple[list[str], dict[str, str]]:
    """The Java-based metrics that can run here, and a note for each requested one that cannot."""
    run, skipped = [], {}
    java = shutil.which("java") is not None
    if meteor:
        if java:
            run.append("METEOR")
        else:
            skipped["METEOR"] = "skipped: java not found (METEOR is a Java program)"
    if spice:
        if not java:
            skipped["SPICE"] = "skipped: java not found (SPICE is a Java program)"
        elif not _SPICE_MODELS.is_file():
            skipped["SPICE"] = f"skipped: Stanford CoreNLP models missing ({_SPICE_MODELS.name}; run " \
                               "python -m pycocoevalcap.spice.get_stanford_models)"
        else:
            run.append("SPICE")
    return run, skipped


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], java: Sequence[str] = ()
) -> dict[str, float]:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D of one predicted caption per item against its references.

    ``java`` adds "METEOR" and/or "SPICE" (see `java_metrics`). Both mappings must have the same keys and every
    item needs at least one reference. CIDEr-D's IDF comes from these references, so it is only meaningful on a
    corpus of many images.
    """
    return caption_evaluation(predictions, references, java)[0]


def caption_evaluation(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], java: Sequence[str] = ()
) -> tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
    """Corpus scores (as `caption_scores`) and each item's own BLEU-4, ROUGE-L, CIDEr-D (and Java metrics)."""
    _check_keys(predictions, references)
    keys = list(predictions)
    # The scorers expect {id: [str, ...]}; positional ints keep any hashable key type safe for them. Like the COCO
    # toolkit, all predictions are tokenized as one text, and all references as another.
    res = {i: [line] for i, line in enumerate(ptb_tokenize_lines([predictions[key] for key in keys]))}
    lines = iter(ptb_tokenize_lines([ref for key in keys for ref in references[key]]))
    gts = {i: [next(lines) for _ in references[key]] for i, key in enumerate(keys)}
    corpus: dict[str, float] = {}
    per_item: dict[Hashable, dict[str, float]] = {key: {} for key in keys}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length statistics.
        bleu, bleu_items = Bleu(4).compute_score(gts, res)
    corpus |= {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scorers = [("ROUGE-L", Rouge), ("CIDEr-D", Cider)]
    if "METEOR" in java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append(("METEOR", Meteor))
    if "SPICE" in java:
        from pycocoevalcap.spice.spice import Spice

        scorers.append(("SPICE", Spice))
    for i, key in enumerate(keys):
        per_item[key]["BLEU-4"] = float(bleu_items[3][i])
    for name, scorer in scorers:
        score, items = scorer().compute_score(gts, res)
        corpus[name] = float(score)
        for i, key in enumerate(keys):
            item = items[i]
            per_item[key][name] = float(item["All"]["f"] if isinstance(item, dict) else item)  # SPICE: a dict
    return corpus, per_item


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
