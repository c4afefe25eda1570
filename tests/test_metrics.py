"""Behavioural tests for the caption metrics (parity with the official Java pipeline) and the official VQA accuracy."""

import copy
import random
import re
import shutil

import pytest

from vlm.eval import caption_scores, diversity, normalize_answer, tokenize_caption, vqa_accuracy, vqa_scores
from vlm.eval.caption import caption_evaluation, java_metrics
from vlm.eval.ptb import ptb_tokenize_lines
from vlm.eval.vqa import CONTRACTIONS

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
        ('A "big" (red) bus -- on the street...', "a big -lrb- red -rrb- bus on the street"),
        ("  Two   DOGS\tplaying ", "two dogs playing"),
        ("a black-and-white cat at 5 o'clock", "a black-and-white cat at 5 o'clock"),
        ("it costs 3.5 dollars", "it costs 3.5 dollars"),
        # The official pipeline lowercases -LRB- before removing punctuation, so brackets survive as -lrb-.
        ("a pizza (with cheese)", "a pizza -lrb- with cheese -rrb-"),
        ("Mr. Smith gonna see the U.S. team, etc.", "mr. smith gon na see the u.s. team etc."),
        ("“Quoted” — café… 😀 50% off $5", "quoted café 50 % off $ 5"),
    ],
)
def test_tokenize_caption(text: str, expected: str) -> None:
    assert tokenize_caption(text) == expected


def test_identical_captions_score_high() -> None:
    predictions = {key: refs[0].capitalize() + "." for key, refs in REFERENCES.items()}
    scores = caption_scores(predictions, REFERENCES)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert all(type(value) is float for value in scores.values())
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["CIDEr-D"] > 5.0  # a perfect match is worth about 10 on this scale


# Captions with varied punctuation, case, numbers, contractions, hyphens, quotes and Unicode, made here.
SUBJECTS = ["a man", "A woman", "the dog", "Two cats", "three kids", "an old lady", "a DOG", "The girl", "Mr. Smith",
            "Dr. Jones", "a black-and-white cat", "a 4-year-old boy", "an 18-wheeler truck", "O'Brien",
            "the Café owner", "a naïve puppy", "a t-shirt vendor", "people", "the U.S. team", "a man's dog"]
VERBS = ["is riding", "rides", "isn't holding", "doesn't like", "can't reach", "won't eat", "they're watching",
         "it's near", "is gonna jump over", "cannot see", "has", "holds", "looks at", "stands next to",
         "sits on", "I'm near", "we'll pass", "you'd like", "should've taken", "is e-mailing"]
OBJECTS = ["a horse", "the beach", "a red double-decker bus", "the bus stop", "a 3.5 ft. pole", "1,000 balloons",
           "2 1/2 pizzas", "a $5.99 sandwich", "50% of the cake", "the 1990s car", "the '90s radio", "a U-turn sign",
           "a pizza (with cheese)", "a [red] box", "some {blue} boxes", "the boys' toys", "James's car",
           "the kids' kites", "an ice-cream cone", "rock'n'roll records", "St. Mark's square", "a café",
           "Jan. 5th flyers", "No. 5 jersey", "the city's skyline", "a co-op building", "the e.g. sign", "two dogs"]
TAILS = ["", ".", "!", "?", "...", "!!", "?!", " at 5 o'clock.", " at 12:30 p.m.", " at 7 a.m.", ", etc.", " -- wow.",
         "; nice.", ": see it", " — fast", " – slow", "…", " 😀", " on a sunny day.", " near AT&T park",
         " with #hashtag", " vs. a cat", " in the U.K.", ", 'cause why not", " (again).", " ..", " ... yes"]
QUOTES = [('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"), ("", "")]

def make_captions(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subject, verb, obj, tail = (rng.choice(x) for x in (SUBJECTS, VERBS, OBJECTS, TAILS))
        text = f"{subject} {verb} {obj}{tail}"
        style = rng.random()
        if style < 0.15:
            text = text.upper()
        elif style < 0.3:
            text = text.capitalize()
        if rng.random() < 0.15:
            left, right = rng.choice(QUOTES)
            text = f"{left}{text}{right}"
        if rng.random() < 0.1:
            text = text.replace(" ", "  ", 1).replace("a", "\ta", 1)
        out.append(text)
    return out


# Strings the PTB lexer treats specially: punctuation inside words, URLs, e-mails, abbreviations, acronyms, numbers,
# currency, contractions, quotes, dashes, ellipses, emoji, accents, odd spaces and line breaks.
HARD = ["k!ids", "a.b", "x-ray's", "3/4", "e-mail@x", "mail e-mail@x.com now", "see http://x.com/a?b=1.",
        "www.example.org/path", "example.net/foo", "“quoted” ‘single’ «angle» „low‟", "wait... what…", ". . . ..",
        "....", "at 5 p.m.", "the U.S. The dog", "I. The cat", "in the U.S.", "$5", "US$5.99", "€10 £3 ¢50 ¥9",
        "50%", "salt & pepper", "AT&T S&P &amp; &lt;b&gt; &quot;hi&quot;", "a co-op", "the '90s", "can't", "won't",
        "shouldn't've", "it’s don’t", "o'clock", "O'Brien", "y'all 'em rock'n'roll 'cause 'tis 'twas",
        "cannot gonna gotta wanna", "😀", "a 👍🏽 b", "café naïve Zoë résumé", "a\u00a0b", "a\tb", "a -- b",
        "a --- b ----- c", "x..y", "wow!!", "what?!?", "Mr. Smith vs. Dr. Jones, etc.", "Jan. 5", "No. 5", "fig. 3",
        "Inc.x", "2 1/2", "½ ¼", "1,000.50", "-1.5", "12:30", "10/12/2010", "(555) 123-4567", ":-) ;) :D", "^_^",
        "<b>bold</b>", "a <i class=\"x\"> b", "#tag @user", "c++ c#", "Ph.D. a.k.a. e.g. i.e.", "C.D.s -LRB-",
        "\u00ad soft\u00adhyphen", "zero\u200bwidth", "ΟΔΟΣ 4x4Σ", "中文", "line one\rline two", "a\x0cb"]


def hard_captions(n: int, seed: int = 0) -> list[str]:
    """The HARD strings, punctuation inserted inside words, and n seeded random mixes of both with plain words."""
    punctuation = list("!?.,;:'\"`-_/\\@#$%&*+=~^|()[]{}<>") + ["’", "“", "”", "…", "—", "–", "·", "\u00a0", "é"]
    inside = [f"ki{p}ds" for p in punctuation] + [f"a{p}b" for p in punctuation]
    words = ["a", "man", "dog", "the", "is", "on", "red", "bus", "x", "s", "t", "mr", "co", "jan", "no", "com"]
    separators = [" "] * 10 + ["", "  ", "\t", "\u00a0"]
    rng = random.Random(seed)
    mixes = []
    for _ in range(n):
        parts = [rng.choice(words if rng.random() < 0.4 else HARD + inside) for _ in range(rng.randint(2, 8))]
        parts = [p.upper() if rng.random() < 0.1 else p.capitalize() if rng.random() < 0.2 else p for p in parts]
        mixes.append("".join(p + rng.choice(separators) for p in parts).strip(" "))
    return HARD + inside + mixes


@pytest.mark.flagship
@pytest.mark.skipif(shutil.which("java") is None, reason="the official PTB tokenizer needs java "
                                                       "(scripts/setup_tools.sh installs it as root)")
def test_matches_official_java_pipeline() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # 300 ordinary captions (each with 4 ordinary references) and 150 hard ones (each with 4 hard references).
    ordinary, hard = make_captions(1500, seed=0), hard_captions(600, seed=0)
    predictions = dict(enumerate(ordinary[:300] + hard[:150]))
    references = {i: ordinary[300 + 4 * i: 304 + 4 * i] if i < 300 else hard[150 + 4 * (i - 300): 154 + 4 * (i - 300)]
                  for i in predictions}
    # The official pipeline: the Java tokenizer once over all predictions and once over all references.
    official_res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    official_gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    ours_res = ptb_tokenize_lines(list(predictions.values()))
    ours_gts = iter(ptb_tokenize_lines([r for refs in references.values() for r in refs]))
    for i in predictions:  # token for token, every string
        assert ours_res[i] == official_res[i][0], predictions[i]
        assert [next(ours_gts) for _ in references[i]] == official_gts[i], references[i]
    bleu, _ = Bleu(4).compute_score(official_gts, official_res, verbose=0)
    official = {"BLEU-4": bleu[3], "ROUGE-L": Rouge().compute_score(official_gts, official_res)[0],
                "CIDEr-D": Cider().compute_score(official_gts, official_res)[0]}
    ours = caption_scores(predictions, references)
    assert 0.05 < official["BLEU-4"] < 0.9 and official["CIDEr-D"] > 0.1  # a corpus that discriminates
    for name, value in official.items():
        assert ours[name] == pytest.approx(value, abs=1e-4), name


def test_captions_are_lexed_as_one_text_like_the_official_pipeline() -> None:
    # pycocoevalcap writes one caption a line and the lexer reads them as one text: a one-letter initial before
    # "The ..." loses its period, also across lines; a caption with another line break shifts the ones after it.
    assert ptb_tokenize_lines(["by J.", "The dog"]) == ["by j", "the dog"]
    assert ptb_tokenize_lines(["by J.", "the dog"]) == ["by j.", "the dog"]
    assert ptb_tokenize_lines(["one\rtwo", "three", "four"]) == ["one", "two", "three"]
    assert tokenize_caption("by J.") == "by j."


def test_per_item_scores_match_corpus_cider() -> None:
    predictions = {key: refs[1] for key, refs in REFERENCES.items()} | {4: "a cat"}
    corpus, per_item = caption_evaluation(predictions, REFERENCES)
    assert set(per_item) == set(REFERENCES)
    # Corpus CIDEr-D is the mean of the per-image scores; a caption sharing nothing with its references gets 0.
    assert corpus["CIDEr-D"] == pytest.approx(sum(s["CIDEr-D"] for s in per_item.values()) / len(per_item))
    assert per_item[4]["CIDEr-D"] == 0.0 and per_item[1]["CIDEr-D"] > 1.0


def test_java_metrics_skipped_with_a_note_without_java(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    run, skipped = java_metrics()
    assert run == [] and set(skipped) == {"METEOR", "SPICE"}
    assert all("java not found" in note for note in skipped.values())


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


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # min(1, matches / min(3, #answers)), both sides fully normalised
        ("The Dog", ["a dog", "cat"], 0.5),
        ("yes", ["Yes?", "yes", "no"], 2 / 3),
        ("two", ["2", "2", "Two", "3", "4"], 1.0),
        ("two", ["2", "3", "4", "5", "6", "7", "8", "9", "10"], 1 / 3),
        ("red", ["blue", "green"], 0.0),
    ],
)
def test_vqa_accuracy_with_fewer_than_ten_answers_uses_the_few_answers_rule(
        prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


# A transcription of VQAEval.evaluate/processPunctuation/processDigitArticle from GT-Vision-Lab's VQA API
# (PythonEvaluationTools/vqaEvaluation/vqaEval.py, master), kept as close to the original as Python 3 allows, as
# the reference our own implementation is checked against. Its contractions table is vlm's, which was compared
# key by key and in order with the official one (all 120 entries equal).
_REF_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                   "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_REF_ARTICLES = ["a", "an", "the"]
_REF_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_REF_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_REF_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"]


def _ref_process_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in _REF_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_REF_COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _REF_PERIOD_STRIP.sub("", out_text, count=re.UNICODE)  # the official passes re.UNICODE as `count`


def _ref_process_digit_article(in_text: str) -> str:
    out_text = []
    for word in in_text.lower().split():
        word = dict(_REF_MANUAL_MAP).setdefault(word, word)
        if word not in _REF_ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    return " ".join(out_text)


def _official_vqa_eval(res_ans: str, answers: list[str]) -> float:
    """VQAEval.evaluate's accuracy of one question, its answers as the VQA v2 annotation entries."""
    gts = {"answers": copy.deepcopy([{"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                                     for n, a in enumerate(answers)])}
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    res_ans = _ref_process_punctuation(res_ans)
    res_ans = _ref_process_digit_article(res_ans)
    gt_acc = []
    gt_answers = [ans["answer"] for ans in gts["answers"]]
    if len(set(gt_answers)) > 1:
        for ans_dic in gts["answers"]:
            ans_dic["answer"] = _ref_process_punctuation(ans_dic["answer"])
    for gt_ans_datum in gts["answers"]:
        other_gt_ans = [item for item in gts["answers"] if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        acc = min(1, float(len(matching_ans)) / 3)
        gt_acc.append(acc)
    return float(sum(gt_acc)) / len(gt_acc)


def _others(n: int) -> list[str]:
    return ["blue", "green", "black", "white", "pink", "gray", "tan", "gold", "teal", "navy"][:n]


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # Agreeing answers are not normalised at all: their article (and case) stay, so "the dog" never matches.
        ("the dog", ["a dog"] * 10, 0.0),
        ("Yes", ["Yes"] * 10, 0.0),
        ("yes?", ["yes"] * 10, 1.0),  # the prediction always is
        ("2", ["two"] * 10, 0.0),
        ("yes", ["yes."] * 10, 0.0),
        ("yes", ["yes."] * 9 + ["no"], 1.0),  # disagreeing: now punctuation-processed
        # Disagreeing answers get punctuation only: articles and number words stay, "yes?" becomes "yes ".
        ("the dog", ["a dog"] * 8 + ["dog"] * 2, 0.6),
        ("yes", ["yes?"] * 8 + ["yes"] * 2, 0.6),
        ("yes", ["yes?"] * 9 + ["no"], 0.0),
        ("two", ["two"] * 7 + ["2"] * 3, 0.9),
        ("1,000", ["1,000"] * 6 + ["1000"] * 4, 1.0),  # a digit comma deletes every mark
        ("black/white", ["black/white"] * 5 + ["black white"] * 5, 1.0),
        ("dont know", ["dont know"] * 7 + ["don't know"] * 3, 0.9),  # "'" is no mark; contraction on one side
        ("3.5", ["3.5"] * 2 + ["3"] * 8, 0.6),
        ("yes" + "." * 40, ["yes"] * 9 + ["no"], 0.0),  # only the first 32 periods are removed
        ("  Red\n", ["red"] + _others(9), 0.3),
        ("red\n/white/blue", ["red whiteblue"] * 3 + _others(7), 0.9),  # the newline is a space: "/" touches it
        # A prediction matching 1, 2, 3 or 4 of ten disagreeing humans (one entry left out at a time).
        ("red", ["red"] + _others(9), 0.3),
        ("red", ["red"] * 2 + _others(8), 0.6),
        ("red", ["red"] * 3 + _others(7), 0.9),
        ("red", ["red"] * 4 + _others(6), 1.0),
        ("red", ["red"] * 3 + ["red."] + _others(6), 1.0),  # "red." -> "red" for the ground truth too
    ],
)
def test_vqa_accuracy_is_the_official_script_on_ten_answers(prediction: str, answers: list[str],
                                                            expected: float) -> None:
    assert _official_vqa_eval(prediction, answers) == pytest.approx(expected)
    assert vqa_accuracy(prediction, answers) == _official_vqa_eval(prediction, answers)


_FRAGMENTS = ["a", "the", "an", "dog", "Dog", "yes", "no", "two", "2", "none", "0", "isnt", "isn't", "3.5", "1,000",
              "1000", "red", "?", "!", ".", ",", "/", "-", "(", ")", '"', "'", "\t", "\n", " ", "black/white"]


def test_vqa_accuracy_equals_the_official_script_on_random_answers() -> None:
    rng = random.Random(0)

    def text() -> str:
        return "".join(rng.choices(_FRAGMENTS, k=rng.randint(1, 4)))

    disagreeing = 0
    for _ in range(600):
        pool = [text() for _ in range(rng.randint(1, 4))]
        answers = rng.choices(pool, k=rng.choice([10, 10, 11]))  # few distinct answers, so that matches happen
        disagreeing += len(set(answers)) > 1
        for prediction in (text(), rng.choice(pool)):
            assert vqa_accuracy(prediction, answers) == _official_vqa_eval(prediction, answers), (prediction, answers)
    assert disagreeing > 300


def test_vqa_scores_is_the_official_mean_where_full_normalisation_differs() -> None:
    answers = {1: ["a dog"] * 8 + ["dog"] * 2, 2: ["yes?"] * 8 + ["yes"] * 2, 3: ["no"] * 10, 4: ["a dog"] * 10}
    predictions = {1: "the dog", 2: "yes", 3: "no", 4: "the dog"}
    official = sum(_official_vqa_eval(predictions[k], answers[k]) for k in answers) / len(answers)
    assert official == pytest.approx((0.6 + 0.6 + 1.0 + 0.0) / 4)
    assert vqa_scores(predictions, answers)["accuracy"] == pytest.approx(official, abs=1e-12)


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
