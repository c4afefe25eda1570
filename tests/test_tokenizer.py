import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vlm.data.builtin import scene_texts
from vlm.text.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_round_trip_and_special_ids(tokenizer):
    text = "a small red circle to the left of a large blue square"
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text
    assert len({tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id}) == 5
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == text


def test_lowercases_and_maps_unknown_words_to_unk(tokenizer):
    ids = tokenizer.encode("A RED zebra?")
    assert ids[0] == tokenizer.encode("a")[0]
    assert ids[2] == tokenizer.unk_id
    assert tokenizer.decode(tokenizer.encode("what color is the circle?")) == "what color is the circle?"


def test_question_prompt_and_training_pair(tokenizer):
    prompt = tokenizer.question_prompt("how many objects are there?")
    assert prompt[0] == tokenizer.bos_id and prompt[-1] == tokenizer.sep_id
    seq, n = tokenizer.training_pair(prompt, "3")
    assert seq[:n] == prompt and seq[-1] == tokenizer.eos_id and tokenizer.decode(seq[n:]) == "3"


def test_serialises_exactly(tokenizer):
    again = Tokenizer.from_str(tokenizer.to_str())
    assert len(again) == len(tokenizer)
    assert again.encode("is there a green cross?") == tokenizer.encode("is there a green cross?")


# Property tests: the tokenizer meets arbitrary user text (questions, phrases) at inference time.
WORDS = sorted(w for w in Tokenizer.train(scene_texts(300, seed=0)).hf.get_vocab() if w.isalnum())
SPECIAL_IDS_EXCEPT_UNK = "pad_id", "bos_id", "eos_id", "sep_id"
PATIENT = settings(deadline=None)  # a shared, loaded CI machine must not fail an example for being slow


@PATIENT
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30), st.booleans())
def test_in_vocabulary_text_round_trips(tokenizer, words, question_mark):
    text = " ".join(words) + ("?" if question_mark else "")
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids and len(ids) == len(words) + question_mark
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == text


@PATIENT
@given(st.text(max_size=200))
def test_arbitrary_unicode_never_crashes_or_yields_special_ids(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert not {getattr(tokenizer, name) for name in SPECIAL_IDS_EXCEPT_UNK} & set(ids)
    assert isinstance(tokenizer.decode(ids), str)
    prompt = tokenizer.question_prompt(text)
    assert prompt[0] == tokenizer.bos_id and prompt[-1] == tokenizer.sep_id and prompt[1:-1] == ids


@PATIENT
@given(st.text(alphabet="bjkqvxz", min_size=1, max_size=12))  # letters no scene word is made of alone
def test_unknown_words_map_to_one_unk_each(tokenizer, word):
    assume(word.lower() not in WORDS)
    assert tokenizer.encode(f"a {word} red") == [*tokenizer.encode("a"), tokenizer.unk_id, *tokenizer.encode("red")]


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_strings_in_text_do_not_inject_special_ids(tokenizer, special):
    ids = tokenizer.encode(f"is there {special} a red circle {special}")
    special_ids = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id}
    assert not special_ids & set(ids)
    assert tokenizer.decode(ids) == "is there a red circle"  # the spelled-out token is unknown text
    again = Tokenizer.from_str(tokenizer.to_str())  # holds after a save and load too
    assert again.encode(special) == tokenizer.encode(special) and again.bos_id not in again.encode(special)


def test_normalisation_folds_case_and_compatibility_forms(tokenizer):
    assert tokenizer.encode("ＲＥＤ Circle") == tokenizer.encode("red circle")


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(scene_texts(300, seed=0), kind="bpe", vocab_size=400)


@PATIENT
@given(st.text(max_size=200))
def test_bpe_round_trips_any_text_after_normalisation(bpe, text):
    ids = bpe.encode(text)
    assert bpe.unk_id not in ids  # every byte is in the alphabet
    assert not {getattr(bpe, name) for name in SPECIAL_IDS_EXCEPT_UNK} & set(ids)
    assert bpe.decode(ids) == bpe.hf.normalizer.normalize_str(text)


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_bpe_reads_special_token_strings_as_text(bpe, special):
    ids = bpe.encode(f"is there {special}?")
    assert bpe.decode(ids) == f"is there {special.lower()}?"
    assert bpe.question_prompt(special).count(bpe.sep_id) == 1


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_phrase_tokens_cover_whole_word_occurrences(kind):
    texts = ["a small red circle to the left of a big blue square", "there is a small red circle"] * 20
    tok = Tokenizer.train(texts, kind=kind, vocab_size=300)
    text = "A Small red circle left of a big blue square and a small red circle"
    ids = tok.encode(text)
    spans = tok.phrase_tokens(text, "small RED circle")
    assert len(spans) == 2
    for span in spans:  # each occurrence: its own consecutive tokens, which spell the phrase
        assert span == list(range(span[0], span[-1] + 1))
        assert tok.decode([ids[i] for i in span]).strip() == "small red circle"
    (span,) = tok.phrase_tokens(text, "blue square")
    assert tok.decode([ids[i] for i in span]).strip() == "blue square"
    assert tok.phrase_tokens(text, "circ") == [] and tok.phrase_tokens(text, "green") == []
