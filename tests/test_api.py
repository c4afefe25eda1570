import numpy as np
import pytest

from tests.conftest import random_images
from vlm import Captioner, load
from vlm.data.scenes import make_scene
from vlm.errors import VLMError


@pytest.fixture
def captioner(tiny_model, tokenizer) -> Captioner:
    return Captioner(tiny_model, tokenizer, device="cpu")


@pytest.fixture
def scenes():
    return [make_scene(i, "val") for i in range(3)]


def test_caption_accepts_paths_and_pil_images_and_batches(captioner, scenes, tmp_path):
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(tmp_path / f"{i}.png")
        scene.image.save(paths[-1])
    from_pil = captioner.caption([s.image for s in scenes])
    assert captioner.caption(paths) == from_pil
    assert captioner.caption(str(paths[1])) == [from_pil[1]]
    assert captioner.caption([s.image for s in scenes], batch_size=2) == from_pil


def test_ask_pairs_images_with_questions(captioner, scenes):
    questions = [s.questions[0].question for s in scenes]
    answers = captioner.ask([s.image for s in scenes], questions)
    assert len(answers) == 3
    assert answers[2] == captioner.ask(scenes[2].image, questions[2])[0]
    with pytest.raises(VLMError, match="3 images but 2 questions"):
        captioner.ask([s.image for s in scenes], questions[:2])


def test_attend_maps_are_distributions_over_the_grid(captioner, scenes):
    result = captioner.attend(scenes[0].image)
    assert result.text == captioner.caption(scenes[0].image)[0]
    assert len(result.tokens) == result.maps.shape[0] > 0
    assert result.maps.shape[1:] == (8, 8)
    np.testing.assert_allclose(result.maps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    answer = captioner.attend(scenes[0].image, question="what size is the red circle?", layers=[1])
    assert answer.question == "what size is the red circle?" and answer.maps.shape[0] == len(answer.tokens)
    with pytest.raises(VLMError, match="out of range"):
        captioner.attend(scenes[0].image, layers=[5])


def test_text_maps_follow_the_text(captioner, scenes, tokenizer):
    texts = [s.captions[0] for s in scenes]
    maps = captioner.text_maps([s.image for s in scenes], texts)
    for text, m in zip(texts, maps, strict=True):
        assert m.shape == (len(tokenizer.encode(text)), 8, 8)


def test_save_and_load_round_trip(captioner, scenes, tmp_path):
    captioner.save(tmp_path / "model")
    again = load(tmp_path / "model", device="cpu")
    images = [s.image for s in scenes]
    assert again.caption(images) == captioner.caption(images)
    question = "how many objects are there?"
    assert again.ask(images[0], question) == captioner.ask(images[0], question)


def test_overlong_question_is_cut_to_fit(captioner, scenes):
    answer = captioner.ask(scenes[0].image, "is there " + "a red circle and " * 30 + "a cross?")
    assert isinstance(answer[0], str)


def test_api_samples_do_not_depend_on_the_batch_size(tiny_model, tokenizer):
    captioner = Captioner(tiny_model, tokenizer, device="cpu")
    images = random_images(3)
    whole = captioner.caption(images, sample=True, seed=5, top_p=0.9)
    assert captioner.caption(images, sample=True, seed=5, top_p=0.9, batch_size=2) == whole
    assert captioner.caption(images[1:], sample=True, seed=6, top_p=0.9) == whole[1:]  # image i uses seed + i
    assert captioner.caption(images, sample=True, seed=5, top_k=1) == captioner.caption(images)
    with pytest.raises(VLMError, match="temperature"):
        captioner.caption(images, sample=True, temperature=-1.0)
