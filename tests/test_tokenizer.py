from vlm.text.tokenizer import Tokenizer


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
