"""The web app's endpoints in-process: answers equal the Python API's, bad requests get one-line 4xx JSON; and
`vlm serve` as a real process answering HTTP on loopback."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import vlm.serve
from tests.conftest import ServeProcess, image_sensitive_model
from vlm.api import Captioner, load
from vlm.cli import main
from vlm.config import DecodingConfig
from vlm.data.scenes import make_scene
from vlm.errors import VLMError
from vlm.grounding.methods import METHODS
from vlm.serve import create_app
from vlm.serve.app import display_image
from vlm.serve.worker import ModelWorker

QUESTIONS = ["how many objects are there?", "what color is the circle?", "is there a red square?"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The model thread and the test's threads share 2 busy cores: one intra-op thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_data_uri(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))


@pytest.fixture
def captioner(tiny_model, tokenizer) -> Captioner:
    return Captioner(tiny_model, tokenizer, device="cpu")


@pytest.fixture
def scenes():
    return [make_scene(i, "val", image_size=64).image for i in range(4)]


@pytest.fixture
def client(captioner):
    with TestClient(create_app(captioner, max_upload_bytes=200_000, max_pixels=512 * 512)) as c:
        yield c


def upload(image: Image.Image, name: str = "scene.png") -> dict:
    return {"image": (name, png_bytes(image), "image/png")}


def test_health_and_methods(client):
    health = client.get("/api/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["image_size"] == 64
    assert client.get("/api/methods").json() == {"methods": list(METHODS), "default": "raw"}


def test_caption_and_ask_equal_the_python_api(client, captioner, scenes):
    r = client.post("/api/caption", files=upload(scenes[0]))
    assert r.status_code == 200
    assert r.json() == {"caption": captioner.caption(scenes[0])[0]}
    r = client.post("/api/ask", files=upload(scenes[1]), data={"question": QUESTIONS[1]})
    assert r.status_code == 200
    assert r.json() == {"question": QUESTIONS[1], "answer": captioner.ask(scenes[1], QUESTIONS[1])[0]}


@pytest.mark.parametrize(("question", "method"), [(None, None), (QUESTIONS[0], "rollout"), (None, "chefer")])
def test_attend_returns_maps_and_overlays(client, captioner, scenes, question, method):
    data = {k: v for k, v in (("question", question), ("method", method)) if v}
    body = client.post("/api/attend", files=upload(scenes[2]), data=data).json()
    expected = captioner.attend(scenes[2], question=question, method=method or METHODS[0])
    assert body["text"] == expected.text and body["tokens"] == expected.tokens and body["question"] == question
    assert body["method"] == (method or METHODS[0])
    assert body["grid"] == list(expected.maps.shape[1:]) and body["image_size"] == [64, 64]
    np.testing.assert_allclose(np.array(body["maps"]), expected.maps, atol=1e-6)
    shown = decode_data_uri(body["image"])
    assert shown.size == display_image(scenes[2]).size == (64, 64)
    assert len(body["overlays"]) == len(expected.tokens)
    overlays = [np.asarray(decode_data_uri(uri).convert("RGB")) for uri in body["overlays"]]
    assert all(o.shape == (64, 64, 3) for o in overlays)
    assert not np.array_equal(overlays[0], np.asarray(shown.convert("RGB")))  # the map is drawn over the image


def test_attend_without_overlays(client, scenes):
    body = client.post("/api/attend", files=upload(scenes[0]), data={"overlays": "false"}).json()
    assert "overlays" not in body and len(body["maps"]) == len(body["tokens"])


def test_ground_maps_the_given_text(client, captioner, scenes):
    text = "a small red circle"
    body = client.post("/api/ground", files=upload(scenes[0]), data={"text": text, "method": "rollout"}).json()
    expected = captioner.text_maps([scenes[0]], [text], method="rollout")[0]
    assert body["tokens"] == captioner.tokenizer.tokens(captioner.tokenizer.encode(text))
    np.testing.assert_allclose(np.array(body["maps"]), expected, atol=1e-6)
    assert len(body["overlays"]) == len(body["tokens"])


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="static/app.js"' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def big_noise_png() -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)))


@pytest.mark.parametrize(("path", "files", "data", "status", "says"), [
    ("/api/caption", {"image": ("notes.txt", b"not an image at all", "text/plain")}, {}, 400, "cannot read image"),
    ("/api/caption", {"image": ("cut.png", png_bytes(Image.new("RGB", (64, 64), "red"))[:60], "image/png")}, {},
     400, "cut.png"),
    ("/api/caption", {"image": ("empty.png", b"", "image/png")}, {}, 400, "empty file"),
    ("/api/caption", {"image": ("huge.png", png_bytes(Image.new("RGB", (600, 600))), "image/png")}, {}, 400,
     "pixels exceeds the limit"),
    ("/api/caption", {"image": ("noise.png", big_noise_png(), "image/png")}, {}, 413, "upload limit"),
    ("/api/caption", None, {"beam": "1"}, 422, "missing field 'image'"),
    ("/api/caption", "scene", {"beam": "0"}, 422, "field 'beam'"),
    ("/api/ask", "scene", {}, 422, "missing field 'question'"),
    ("/api/ask", "scene", {"question": "  "}, 400, "question"),
    ("/api/attend", "scene", {"question": " \t"}, 400, "question"),
    ("/api/attend", "scene", {"method": "nonsense"}, 422, "method 'nonsense'"),
    ("/api/ground", "scene", {"text": ""}, 422, "field 'text'"),
    ("/api/caption", "scene", {"beam": "2", "beam_size": "2"}, 422, "beam_size is given twice"),
    ("/api/caption", "scene", {"sample": "true", "beam_size": "2"}, 422, "beam_size 1 with sample"),
    ("/api/caption", "scene", {"num_samples": "9"}, 422, "field 'num_samples'"),
    ("/api/caption", "scene", {"sample": "true", "temperature": "nan"}, 422, "temperature must be a finite"),
    ("/api/ground", "scene", {"text": "red", "method": "chefer", "head": "0"}, 422, "chefer"),
])
def test_bad_requests_get_one_line_4xx(client, scenes, path, files, data, status, says):
    files = upload(scenes[0]) if files == "scene" else files
    r = client.post(path, files=files, data=data)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error and "\n" not in error and "Traceback" not in error


def test_form_fields_are_the_decoding_and_map_options(client, captioner, scenes):
    sampled = dict(sample=True, top_k=5, temperature=1.5, seed=3, num_samples=2, max_new_tokens=6)
    r = client.post("/api/caption", files=upload(scenes[1]), data={k: str(v) for k, v in sampled.items()})
    expected = captioner.caption(scenes[1], **sampled)
    assert len(expected) == 2 and r.json() == {"caption": expected[0], "samples": expected}
    assert expected != captioner.caption(scenes[1], **{**sampled, "seed": 4})  # the seed matters
    beam = client.post("/api/caption", files=upload(scenes[1]), data={"beam_size": "3"}).json()["caption"]
    assert beam == client.post("/api/caption", files=upload(scenes[1]), data={"beam": "3"}).json()["caption"]
    assert beam == captioner.caption(scenes[1], beam_size=3)[0]
    body = client.post("/api/ground", files=upload(scenes[0]),
                       data={"text": "a red circle", "layers": ["1"], "head": "2", "overlays": "false"}).json()
    expected = captioner.text_maps([scenes[0]], ["a red circle"], layers=[1], head=2)[0]
    assert not np.allclose(expected, captioner.text_maps([scenes[0]], ["a red circle"])[0], atol=1e-3)
    np.testing.assert_allclose(np.array(body["maps"]), expected, atol=1e-5)


def test_unknown_route_is_json_404(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_a_bug_is_a_500_without_traceback(captioner, scenes, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail\nTraceback (most recent call last)")

    monkeypatch.setattr(captioner, "caption", broken)
    with TestClient(create_app(captioner), raise_server_exceptions=False) as c:
        r = c.post("/api/caption", files=upload(scenes[0]))
    assert r.status_code == 500 and r.json() == {"error": "internal error (RuntimeError)"}


def test_concurrent_clients_get_the_sequential_answers(client, captioner, scenes):
    jobs = [(i % 4, QUESTIONS[i % 3] if i % 2 else None) for i in range(16)]
    expected = [captioner.ask(scenes[s], q)[0] if q else captioner.caption(scenes[s])[0] for s, q in jobs]

    def request(job):
        scene, question = jobs[job]
        if question is None:
            return client.post("/api/caption", files=upload(scenes[scene])).json()["caption"]
        return client.post("/api/ask", files=upload(scenes[scene]), data={"question": question}).json()["answer"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(request, range(len(jobs)))) == expected


class BlockingCaptioner(Captioner):
    """Holds its first caption call until released, so the jobs sent meanwhile queue up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started, self.release = threading.Event(), threading.Event()

    def caption(self, *args, **kwargs):
        if not self.started.is_set():
            self.started.set()
            assert self.release.wait(30)
        return super().caption(*args, **kwargs)


def test_worker_batches_the_jobs_that_queued(tiny_model, tokenizer, scenes):
    captioner = BlockingCaptioner(tiny_model, tokenizer, device="cpu")
    worker = ModelWorker(captioner)
    try:
        first = worker.submit("caption", image=scenes[0], decoding=DecodingConfig())
        assert captioner.started.wait(30)
        asks = [worker.submit("ask", image=scenes[i], question=QUESTIONS[i % 3], decoding=DecodingConfig())
                for i in range(4)]
        captions = [worker.submit("caption", image=scenes[i], decoding=DecodingConfig()) for i in range(3)]
        sampled = [worker.submit("caption", image=scenes[i], decoding=DecodingConfig(sample=True, seed=seed))
                   for i, seed in ((0, 3), (1, 3), (0, 4))]
        captioner.release.set()
        answers = [f.result(30) for f in asks]
        texts = [f.result(30) for f in [first, *captions]]
        drawn = [f.result(30) for f in sampled]
    finally:
        worker.close()
    # Only jobs whose whole DecodingConfig is equal share a batch; each keeps its own seed in it.
    assert list(worker.batches) == [("caption", 1), ("ask", 4), ("caption", 3), ("caption", 2), ("caption", 1)]
    assert answers == [captioner.ask(scenes[i], QUESTIONS[i % 3]) for i in range(4)]
    assert texts == [captioner.caption(scenes[i]) for i in (0, 0, 1, 2)]
    assert drawn == [captioner.caption(scenes[i], sample=True, seed=seed) for i, seed in ((0, 3), (1, 3), (0, 4))]
    assert drawn[0] != drawn[2]  # the seed matters


def test_one_bad_job_does_not_fail_its_batch(captioner, scenes):
    worker = ModelWorker(captioner)
    try:
        good = worker.submit("ask", image=scenes[0], question=QUESTIONS[0], decoding=DecodingConfig())
        bad = worker.submit("ask", image="/no/such/image.png", question=QUESTIONS[0], decoding=DecodingConfig())
        assert good.result(30) == captioner.ask(scenes[0], QUESTIONS[0])
        with pytest.raises(Exception, match="no such image"):
            bad.result(30)
    finally:
        worker.close()


@pytest.mark.parametrize("limits", [{"max_pixels": 0}, {"max_upload_bytes": 0}])
def test_bad_limits_fail_at_start(captioner, limits):
    with pytest.raises(VLMError, match="expected a positive number"):
        create_app(captioner, **limits)


def test_cli_serve_reports_a_missing_model(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlm serve: error:") and "missing" in err and len(err.strip().splitlines()) == 1


def test_cli_serve_on_a_busy_port_is_one_line(tiny_model, tokenizer, tmp_path):
    model_dir = Captioner(tiny_model, tokenizer, "cpu").save(tmp_path / "model")
    with socket.socket() as held:  # the port is taken
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "vlm.cli", "serve", "--model", str(model_dir), "--host",
                                 "127.0.0.1", "--port", str(port)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "serving" not in result.stdout  # it never served
    assert result.stderr.startswith(f"vlm serve: error: cannot listen on 127.0.0.1:{port}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_static_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(vlm.serve.__file__).parent
    globs = tomllib.loads((root.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in globs["vlm.serve"] for p in root.glob(pattern) if p.is_file()}
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in shipped}
    assert shipped == {p for p in (root / "static").rglob("*") if p.is_file()}


# ---------------------------------------------------------------- `vlm serve` as a real process


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    """The URL of `vlm serve` running a tiny model in its own process, and the same model loaded here."""
    folder = tmp_path_factory.mktemp("served")
    model_dir = Captioner(image_sensitive_model(tokenizer), tokenizer, "cpu").save(folder / "model")
    server = ServeProcess(model_dir, folder / "serve.log")
    try:
        yield server.ready(), load(model_dir, device="cpu")
    finally:
        server.stop()


def test_vlm_serve_answers_http_on_loopback_as_the_python_api(served, scenes):
    url, captioner = served
    with httpx.Client(base_url=url, timeout=120) as http:
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        caption = http.post("/api/caption", files=upload(scenes[1]))
        assert caption.status_code == 200 and caption.json() == {"caption": captioner.caption(scenes[1])[0]}
        assert caption.json()["caption"] not in ("", captioner.caption(scenes[1].transpose(0))[0])  # sees the image
        answer = http.post("/api/ask", files=upload(scenes[1]), data={"question": QUESTIONS[1]})
        assert answer.json() == {"question": QUESTIONS[1], "answer": captioner.ask(scenes[1], QUESTIONS[1])[0]}
        attended = http.post("/api/attend", files=upload(scenes[2]), data={"overlays": "false"})
        expected = captioner.attend(scenes[2])
        assert attended.status_code == 200 and attended.json()["tokens"] == expected.tokens
        np.testing.assert_allclose(np.array(attended.json()["maps"]), expected.maps, atol=1e-6)
        bad = http.post("/api/caption", files={"image": ("notes.png", b"not an image", "image/png")})
        assert bad.status_code == 400 and "notes.png" in bad.json()["error"]
