"""Behavioural tests for the caption metrics and the official VQA accuracy."""

import pytest

from vlm.eval import caption_scores, diversity, normalize_answer, tokenize_caption, vqa_accuracy, vqa_scores

REFERENCES = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse along the sea"],
    2: ["two dogs playing with a red ball in the grass", "dogs chase a ball across a lawn"],
    "img-3": ["a plate of pasta with tomato sauce", "a bowl of spaghetti on a wooden table"],
    4: ["a red double decker bus on a city street", "a bus driving past tall buildings"],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A man riding a horse.", "a man riding a horse"),
        ("Don't stop!", "do n't stop"),
        ("It's a dog's toy, isn't it?", "it 's a dog 's toy is n't it"),
        ('A "big" (red) bus -- on the street...', "a big red bus on the street"),
        ("  Two   DOGS\tplaying ", "two dogs playing"),
        ("a black-and-white cat at 5 o'clock", "a black-and-white cat at 5 o'clock"),
        ("it costs 3.5 dollars", "it costs 3.5 dollars"),
    ],
)
def test_tokenize_caption(text: str, expected: str) -> None:
    assert tokenize_caption(text) == expected


def test_identical_captions_score_high() -> None:
    predictions = {key: refs[0].capitalize() + "." for key, refs in REFERENCES.items()}
    scores = caption_scores(predictions, REFERENCES)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}
    assert all(type(value) is float for value in scores.values())
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr-D"] > 5.0  # a perfect match is worth about 10 on this scale


def test_wrong_captions_score_near_zero() -> None:
    predictions = {1: "zebra giraffe umbrella", 2: "snowy peaks", "img-3": "laptop keyboard", 4: "kite"}
    scores = caption_scores(predictions, REFERENCES)
    assert scores["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert scores["CIDEr-D"] == pytest.approx(0.0, abs=1e-6)


def test_caption_scores_rejects_mismatched_keys() -> None:
    predictions = {key: refs[0] for key, refs in REFERENCES.items()} | {"extra": "a cat"}
    with pytest.raises(ValueError, match="extra"):
        caption_scores(predictions, REFERENCES)
    with pytest.raises(ValueError, match="img-3"):
        caption_scores({key: "a cat" for key in REFERENCES}, REFERENCES | {"img-3": []})
    with pytest.raises(ValueError, match="img-3"):
        caption_scores({1: "a man"}, {1: ["a man"], "img-3": ["pasta"]})


def test_diversity() -> None:
    # Tokens: [a dog runs] x2 and [a cat sleeps on a mat].
    # Unigrams: 12 in all, unique {a, dog, runs, cat, sleeps, on, mat} = 7.
    # Bigrams: 2 + 2 + 5 = 9 in all, unique (a dog), (dog runs) + 5 from the third = 7.
    scores = diversity(["A dog runs.", "a dog runs", "A cat sleeps on a mat"])
    assert scores == pytest.approx(
        {"identical_share": 2 / 3, "distinct_1": 7 / 12, "distinct_2": 7 / 9, "mean_length": 4.0}
    )


def test_diversity_detects_collapse() -> None:
    scores = diversity(["a dog"] * 5)
    assert scores["identical_share"] == 1.0
    assert scores["distinct_1"] == pytest.approx(2 / 10)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Red Car", "red car"),
        ("yes.", "yes"),
        ("yes !", "yes"),
        ("3.5", "3.5"),
        ("isnt", "isn't"),
        ("dont know", "don't know"),
        ("black/white", "black white"),
        ("1,000", "1000"),
        ("  left\tside\n", "left side"),
    ],
)
def test_normalize_answer(answer: str, expected: str) -> None:
    assert normalize_answer(answer) == expected


def _ten_answers(matches: int) -> list[str]:
    return ["2"] * matches + ["3"] * (10 - matches)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        (10, 1.0),
        (4, 1.0),  # every leave-one-out subset keeps at least 3 matches
        # 3 matches: 7 subsets keep all 3 -> 1, 3 subsets keep 2 -> 2/3: (7 + 3 * 2/3) / 10 = 0.9
        (3, 0.9),
        # 2 matches: 8 subsets keep both -> min(2/3, 1), 2 subsets drop one -> 1/3: (8*2/3 + 2*1/3) / 10 = 0.6
        (2, 0.6),
        # 1 match: 9 subsets keep it -> 1/3 each, 1 drops it -> 0: 9/30 = 0.3
        (1, 0.3),
        (0, 0.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    assert vqa_accuracy("two", _ten_answers(matches)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [("yes", "yes", 1.0), ("Yes.", "yes", 1.0), ("a dog", "dog", 1.0), ("no", "yes", 0.0), ("2", "3", 0.0)],
)
def test_vqa_accuracy_single_answer_is_exact_match(prediction: str, answer: str, expected: float) -> None:
    assert vqa_accuracy(prediction, [answer]) == expected


def test_vqa_scores_per_type() -> None:
    predictions = {1: "yes", 2: "two", "q3": "red", 4: "a blue car"}
    answers = {1: ["yes"], 2: ["2"], "q3": ["blue"], 4: ["blue car"]}
    types = {1: "yes/no", 2: "number", "q3": "other", 4: "other"}
    assert vqa_scores(predictions, answers) == {"accuracy": 0.75}
    assert vqa_scores(predictions, answers, types) == {
        "accuracy": 0.75,
        "accuracy/number": 1.0,
        "accuracy/other": 0.5,
        "accuracy/yes/no": 1.0,
    }


def test_vqa_scores_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="q9"):
        vqa_scores({1: "yes", "q9": "no"}, {1: ["yes"]})
    with pytest.raises(ValueError, match="q9"):
        vqa_scores({"q9": "no"}, {"q9": ["no"]}, {})
