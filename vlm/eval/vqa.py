"""The official VQA v2 accuracy: answer normalisation and the leave-one-out "3 humans agree" score.

Reimplements `vqaEval.py` of GT-Vision-Lab's VQA API (PythonEvaluationTools, master): the prediction gets
processPunctuation + processDigitArticle, the human answers only processPunctuation and only when they disagree,
then min(#matching other humans / 3, 1) is averaged over the answers left out in turn. (Checked against that
source: the prediction is normalised whatever the humans said; some third-party copies do it only when they
disagree.) Questions with fewer than ten answers use our documented `few_answers_accuracy` rule instead.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence

# The official table, quirks included: keys are looked up after lowercasing, so the capitalised ones ("Im")
# never match, and "somebody'd" maps to "somebodyd". Kept verbatim for parity with published numbers.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # each character is one mark, in the official order
# Official periodStrip is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead (not a lookbehind) that always
# holds before a ".", so it removes every period not followed by a digit ("yes." -> "yes", "3.5" stays).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in `count`, so only the first 32
# periods of an answer are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_COMMA_STRIP = re.compile(r"\d,\d")  # a digit-grouping comma anywhere ("1,000") deletes all punctuation
# The official metric counts a prediction right once this many humans gave the same answer.
_HUMANS_FOR_FULL_CREDIT = 3
OFFICIAL_ANSWER_COUNT = 10
"""Questions with at least this many human answers (VQA v2, VizWiz, TextVQA, OK-VQA) are scored exactly as the
official script; fewer answers use `few_answers_accuracy`."""


def process_punctuation(text: str) -> str:
    """Official processPunctuation: delete or space out punctuation, then strip sentence periods.

    A mark is deleted when it touches a space somewhere in the text (or the text has a "1,000"-style number),
    otherwise replaced by a space, so "black/white" -> "black white" but "yes !" -> "yes ", and "yes?" -> "yes "
    (the space is kept: nothing strips it).
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """Official processDigitArticle: lowercase, number words to digits, drop articles, add apostrophes."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """Normalise an answer as the official VQA evaluation normalises a prediction: "Two dogs." -> "2 dogs".

    Newlines/tabs become spaces and the ends are stripped, then punctuation handling, lowercasing, number words
    to digits, article removal and contraction restoration ("isnt" -> "isn't") in the official order.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(process_punctuation(text))


def official_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official `vqaEval.py` score of one prediction against its human answers (GT-Vision-Lab's
    PythonEvaluationTools), quirks included.

    The prediction is always fully normalised (`normalize_answer`). The human answers are used as given when
    they all agree, and otherwise only punctuation-processed (`process_punctuation`): their case and articles
    stay, and "yes?" becomes "yes " (which then matches no normalised prediction). Each answer entry is left out
    in turn (one entry, not every equal string) and the prediction scores min(1, #matching other entries / 3);
    the result is the mean over the entries. With ten answers: 4+ matches -> 1.0, 3 -> 0.9, 2 -> 0.6, 1 -> 0.3.
    """
    predicted = normalize_answer(prediction)
    truth = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    total = sum(answer == predicted for answer in truth)
    subset_scores = [min(1, (total - (answer == predicted)) / _HUMANS_FOR_FULL_CREDIT) for answer in truth]
    return float(sum(subset_scores)) / len(subset_scores)


def few_answers_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Our rule for questions with 1 to 9 human answers, where the official formula is not meant to apply (it
    scores a lone answer 0 and caps agreeing answers below 1): min(1, #matching answers / min(3, #answers)).

    Both sides are fully normalised (`normalize_answer`), since such data are rarely pre-normalised: a single
    answer is an exact match after normalisation, two answers give 0.5 per match, three or more the official
    "3 humans agree" credit without the leave-one-out.
    """
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == predicted for answer in answers)
    return min(1.0, matches / min(_HUMANS_FOR_FULL_CREDIT, len(answers)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers of its question, in [0, 1].

    With `OFFICIAL_ANSWER_COUNT` (10) or more answers: exactly the official script (`official_accuracy`);
    with fewer: `few_answers_accuracy`.
    """
    if not answers:
        raise ValueError("no ground-truth answers")
    if len(answers) >= OFFICIAL_ANSWER_COUNT:
        return official_accuracy(prediction, answers)
    return few_answers_accuracy(prediction, answers)


def vqa_scores(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
) -> dict[str, float]:
    """Mean VQA accuracy in [0, 1] as {"accuracy": ...}, plus "accuracy/<type>" per answer type when given.

    Keys of `predictions` and `answers` must match, and `answer_types` (e.g. "yes/no", "number", "other") must
    cover every prediction; a ValueError names the offending key.
    """
    if not predictions:
        raise ValueError("no predictions to score")
    if set(predictions) != set(answers):
        key = next(iter(set(predictions).symmetric_difference(answers)))
        raise ValueError(f"key {key!r} is in only one of predictions and answers")
    accuracies = {key: vqa_accuracy(prediction, answers[key]) for key, prediction in predictions.items()}
    scores = {"accuracy": sum(accuracies.values()) / len(accuracies)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = defaultdict(list)
        for key, accuracy in accuracies.items():
            if key not in answer_types:
                raise ValueError(f"prediction {key!r} has no answer type")
            by_type[answer_types[key]].append(accuracy)
        scores |= {f"accuracy/{kind}": sum(values) / len(values) for kind, values in sorted(by_type.items())}
    return scores
