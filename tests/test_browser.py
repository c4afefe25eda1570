"""End to end in headless Chromium: `vlm serve` with a tiny model, and the HTML evaluation report.

Needs Debian's `chromium` (scripts/setup_tools.sh installs it) and playwright, which drives that browser
(playwright's own browser download is not reachable here). Screenshots go to $VLM_TEST_ARTIFACTS if set,
else to a pytest temporary directory; the path is printed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ServeProcess, tiny_config
from vlm.api import Captioner
from vlm.data.builtin import scene_texts
from vlm.data.scenes import make_scene
from vlm.eval.report import write_report
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

try:
    from playwright import sync_api as playwright_api
except ImportError:
    playwright_api = None

CHROMIUM = os.environ.get("VLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.flagship,
              pytest.mark.skipif(playwright_api is None, reason="playwright is not installed (pip install .[dev])"),
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed and could not be "
                                                          "(scripts/setup_tools.sh installs it as root)")]

WAIT_MS = 45_000  # generous: the machine may be busy
QUESTION = "what color is the circle?"
CANVAS_ALPHA = """(canvas) => {
  const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0;
  for (let i = 3; i < d.length; i += 4) sum += d[i];
  return sum;
}"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("VLM_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def captioner():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process shares 2 busy cores with the server and the browser
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(scene_texts(300, seed=0))
    yield Captioner(VisionLanguageModel(tiny_config(), len(tokenizer)).eval(), tokenizer, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    playwright_api.expect.set_options(timeout=WAIT_MS)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.set_default_timeout(WAIT_MS)
    yield page
    page.close()


@pytest.fixture(scope="module")
def server(captioner, tmp_path_factory):
    """`vlm serve` starting in a subprocess; a test calls `server.ready()` once it has done its own setup."""
    folder = tmp_path_factory.mktemp("served")
    server = ServeProcess(captioner.save(folder / "model"), folder / "serve.log")
    yield server
    server.stop()


def test_page_captions_shows_maps_and_answers(server, captioner, page, artifacts, tmp_path):
    image = make_scene(3, "val", image_size=64).image
    image.save(tmp_path / "scene.png")
    caption = captioner.attend(image).tokens
    answer = captioner.attend(image, question=QUESTION).tokens

    page.goto(server.ready())
    page.set_input_files("#file", str(tmp_path / "scene.png"))
    page.wait_for_selector('#caption[data-state="done"]')
    tokens = page.locator("#caption .token")
    assert tokens.all_inner_texts() == caption

    view = page.locator("#view")
    plain = view.get_attribute("src")
    tokens.nth(0).click()
    playwright_api.expect(view).not_to_have_attribute("src", plain)
    first = view.get_attribute("src")
    assert first.startswith("data:image/png;base64,")
    tokens.nth(1).click()
    playwright_api.expect(view).not_to_have_attribute("src", first)
    playwright_api.expect(page.locator("#view-label")).to_contain_text(f"caption token 2/{len(caption)}")
    page.locator("#next").click()
    playwright_api.expect(tokens.nth(2)).to_have_class("token selected")
    assert page.locator("#slider").input_value() == "2"
    page.screenshot(path=str(artifacts / "app_caption.png"))

    page.select_option("#method", "rollout")  # the caption is attended again with the other method
    page.wait_for_selector('#caption[data-state="done"]')
    tokens.nth(1).click()
    playwright_api.expect(page.locator("#view-label")).to_contain_text("caption token 2")
    assert view.get_attribute("src") not in (plain, first, None)

    page.fill("#question", QUESTION)
    page.press("#question", "Enter")
    page.wait_for_selector('#answer[data-state="done"]')
    assert page.locator("#answer .token").all_inner_texts() == answer
    before = view.get_attribute("src")
    page.locator("#answer .token").first.click()
    playwright_api.expect(view).not_to_have_attribute("src", before)
    playwright_api.expect(page.locator("#view-label")).to_contain_text("answer token 1")
    page.screenshot(path=str(artifacts / "app_answer.png"))


def test_page_takes_a_dropped_file_and_shows_a_bad_upload_error(server, page):
    page.goto(server.ready())
    dropped = page.evaluate_handle("""(bytes) => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([new Uint8Array(bytes)], "notes.png", { type: "image/png" }));
      return transfer;
    }""", list(b"this is not an image"))
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    playwright_api.expect(page.locator("#error")).to_contain_text("upload 'notes.png': cannot read image")


def test_report_hover_shows_the_token_map(captioner, page, artifacts, tmp_path):
    samples = []
    for i, score in enumerate([0.8, 0.2, None]):
        image = make_scene(i, "val", image_size=64).image
        cap, ans = captioner.attend(image), captioner.attend(image, question=QUESTION)
        samples.append({"id": f"scene {i}", "image": image, "caption": cap.text, "references": ["a red circle"],
                        "score": score, "tokens": cap.tokens, "maps": cap.maps,
                        "questions": [{"question": QUESTION, "answer": ans.text, "truth": ["red"], "score": 0.0,
                                       "tokens": ans.tokens, "maps": ans.maps}]})
    path = write_report(tmp_path / "report.html", {"caption": {"CIDEr-D": 0.5}}, samples)

    page.goto(path.as_uri())
    cards = page.locator(".sample:not([hidden])")
    assert cards.evaluate_all("cs => cs.map(c => c.dataset.id)") == ["scene 1", "scene 0", "scene 2"]  # worst first
    canvas = cards.first.locator("canvas")
    assert canvas.evaluate(CANVAS_ALPHA) == 0
    token = cards.first.locator(".caption .tok").nth(1)
    token.hover()
    playwright_api.expect(cards.first.locator(".label")).to_contain_text(f"token 2: {samples[1]['tokens'][1]}")
    assert canvas.evaluate(CANVAS_ALPHA) > 0
    page.screenshot(path=str(artifacts / "report_hover.png"))
    page.locator("h1").hover()
    assert canvas.evaluate(CANVAS_ALPHA) == 0

    page.fill("#max-score", "0.5")
    playwright_api.expect(page.locator("#shown")).to_have_text("1 of 3 samples")
    page.select_option("#sort", "id")
    page.fill("#max-score", "")
    assert cards.evaluate_all("cs => cs.map(c => c.dataset.id)") == ["scene 0", "scene 1", "scene 2"]
