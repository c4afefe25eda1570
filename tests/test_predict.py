"""`vlm predict`: every image exactly once on any number of processes, resumable after kill -9, bad images
reported, the same tokens (and log-probabilities within 1e-5) whatever the processes or batches, maps summaries as
`vlm attend` makes them, and recaptioned shards that `vlm train` trains on.

One tiny untrained model whose texts depend on the image (`image_sensitive_model`); images are random.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_info, threadpool_limits

import vlm.predict.module
from tests.conftest import image_sensitive_model, random_images, tiny_config
from vlm.api import Captioner
from vlm.checkpoint import save_model
from vlm.cli import main
from vlm.config import DecodingConfig, MapConfig, SourceConfig
from vlm.data.datasets import shard_texts
from vlm.data.images import load_image
from vlm.errors import VLMError
from vlm.grounding.maps import box_from_map, combine
from vlm.model.vlm import VisionLanguageModel
from vlm.predict import predict, read_outputs
from vlm.predict.inputs import Chunk, Entry, _joined, list_chunks, listing_digest
from vlm.predict.module import TorchBackend
from vlm.predict.outputs import CAPTION_KEY
from vlm.predict.summary import content_phrases
from vlm.train.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
CPU = dict(accelerator="cpu", devices=1, num_workers=0)
MAX_PIXELS = 80 * 80  # the 100 x 100 image is over it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the subprocesses get: tiny models only lose to threads' coordination on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    return save_model(image_sensitive_model(tokenizer), tokenizer, tmp_path_factory.mktemp("model") / "model")


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """10 good images (PNG and JPEG, in a subfolder too) and 3 bad ones: not an image, truncated, too large."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i, image in enumerate(random_images(10)):
        image.save(root / ("sub" if i % 3 == 0 else "") / f"im{i:02d}.{'jpg' if i % 2 else 'png'}")
    (root / "notes.txt").write_text("not listed: not an image suffix")
    (root / "bad.jpg").write_bytes(b"not an image at all")
    (root / "truncated.png").write_bytes(_png(random_images(1)[0])[:200])
    Image.new("RGB", (100, 100), (9, 9, 9)).save(root / "huge.png")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two shards (5 and 3 samples, img2dataset layout with alt-text), one sample's image corrupt."""
    root = tmp_path_factory.mktemp("shards")
    images = random_images(8)
    for s, (start, stop) in enumerate([(0, 5), (5, 8)]):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(start, stop):
                data = b"corrupt" if i == 6 else _png(images[i], "JPEG")
                for suffix, payload in (("jpg", data), ("txt", f"alt text {i}".encode()),
                                        ("json", json.dumps({"caption": f"alt text {i}", "n": i}).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def _records(out: Path) -> dict[str, dict]:
    records = read_outputs(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "an image was predicted twice"
    return {r["key"]: r for r in records}


def _assert_same(a: dict[str, dict], b: dict[str, dict], tol: float = 1e-5) -> None:
    """The same images, tokens and texts; log-probabilities within tol."""
    assert a.keys() == b.keys()
    for key in a:
        for task in ("caption_tokens",):
            ta, tb = a[key].get(task, []), b[key].get(task, [])
            assert [t["id"] for t in ta] == [t["id"] for t in tb], key
            assert np.allclose([t["logprob"] for t in ta], [t["logprob"] for t in tb], atol=tol, rtol=0), key
        assert a[key].get("caption") == b[key].get("caption")
        for qa, qb in zip(a[key].get("answers", []), b[key].get("answers", []), strict=True):
            assert qa["answer"] == qb["answer"] and [t["id"] for t in qa["tokens"]] == [t["id"] for t in qb["tokens"]]
            assert np.allclose([t["logprob"] for t in qa["tokens"]], [t["logprob"] for t in qb["tokens"]], atol=tol,
                               rtol=0)


def _not_trivial(records: dict[str, dict]) -> None:
    """What is compared differs from image to image: equal outputs are evidence."""
    captions = {r["caption"] for r in records.values()}
    assert len(captions) >= len(records) // 2, captions
    assert all(r["caption_tokens"] and all(t["logprob"] < -1e-3 for t in r["caption_tokens"]) for r in records.values())


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm.cli", "predict", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _ddp(model_dir: Path, source: Path | str, out: Path, *extra: str) -> subprocess.Popen:
    return _cli("--model", str(model_dir), "--input", str(source), "--out", str(out), "--accelerator", "cpu",
                "--devices", "2", "--strategy", "ddp", *extra)


@pytest.fixture(scope="module")
def runs(model_dir, folder, shards, tmp_path_factory) -> dict:
    """Two-process runs (started first, in the background) and their one-process counterparts.

    Folder: chunks of 4 in batches of 3, one worker per process (2 readers). Shards: beam search, two workers per
    process (4 readers for 2 shards)."""
    tmp = tmp_path_factory.mktemp("runs")
    shard_glob = str(shards / "{00000..00001}.tar")
    ddp_folder = _ddp(model_dir, folder, tmp / "ddp_folder", "--chunk_size", "4", "--batch_size", "3",
                      "--num_workers", "1", "--max_pixels", str(MAX_PIXELS), "--question", "what color is it ?")
    ddp_shards = _ddp(model_dir, shard_glob, tmp / "ddp_shards", "--beam_size", "2", "--batch_size", "2",
                      "--num_workers", "2")
    one = predict(model_dir, str(folder), tmp / "one_folder", chunk_size=4, batch_size=3, max_pixels=MAX_PIXELS,
                  questions=["what color is it ?"], **CPU)
    one_shards = predict(model_dir, shard_glob, tmp / "one_shards", decoding=DecodingConfig(beam_size=2),
                         batch_size=2, **CPU)
    logs = {}
    for name, proc in (("folder", ddp_folder), ("shards", ddp_shards)):
        logs[name] = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, logs[name][-3000:]
    return {"tmp": tmp, "one": one, "one_shards": one_shards, "logs": logs}


def test_two_processes_predict_every_image_once_as_one_process_does(runs, folder):
    tmp = runs["tmp"]
    one, two = _records(tmp / "one_folder"), _records(tmp / "ddp_folder")
    good = {f"im{i:02d}.{'jpg' if i % 2 else 'png'}" if i % 3 else f"sub/im{i:02d}.{'jpg' if i % 2 else 'png'}"
            for i in range(10)}
    assert set(one) == good
    _not_trivial(one)
    _assert_same(one, two)
    assert all(len(r["answers"]) == 1 for r in two.values())
    manifest = json.loads((tmp / "ddp_folder" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["records"] == 10 and manifest["errors"] == 3
    assert [c["count"] for c in manifest["chunks"]] == [4, 4, 4, 1]


def test_two_processes_report_the_jobs_progress_not_the_first_ones_share(runs):
    """The first process's last line counts every process's images (13 files, 3 of them bad: each is an item read)
    of the job's total; its own share is 8 (chunks 0 and 2). The counts' folder is gone at the end."""
    last = [line for line in runs["logs"]["folder"].splitlines() if line.startswith("predict: ")][-1]
    assert last.split(" | ")[0] == "predict: 13/13 images (2 processes)", last
    shards = [line for line in runs["logs"]["shards"].splitlines() if line.startswith("predict: ")][-1]
    assert shards.split(" | ")[0] == "predict: 8/? images (2 processes)", shards  # shards: no total known
    assert not (runs["tmp"] / "ddp_folder" / ".progress").exists()


def test_bad_images_go_to_the_errors_file_with_their_reason_and_the_run_finishes(runs):
    for out in ("one_folder", "ddp_folder"):
        errors = {e["key"]: e["error"] for e in map(json.loads, (runs["tmp"] / out / "errors.jsonl").open())}
        assert set(errors) == {"bad.jpg", "truncated.png", "huge.png"}
        assert "cannot read image" in errors["bad.jpg"] and "cannot read image" in errors["truncated.png"]
        assert f"exceeds the limit of {MAX_PIXELS}" in errors["huge.png"]
    assert runs["one"]["errors"] == 3 and runs["one"]["records"] == 10


def test_shards_fewer_than_readers_beam_search_equal_one_process(runs):
    tmp = runs["tmp"]
    one, two = _records(tmp / "one_shards"), _records(tmp / "ddp_shards")
    assert set(one) == {f"{i:06d}" for i in range(8)} - {"000006"}
    _not_trivial(one)
    _assert_same(one, two)
    assert one["000001"]["shard"].endswith("00000.tar") and one["000001"]["member"] == "000001.jpg"
    errors = [json.loads(line) for line in (tmp / "ddp_shards" / "errors.jsonl").open()]
    assert [e["key"] for e in errors] == ["000006"] and "cannot read image" in errors[0]["error"]


def test_tokens_do_not_depend_on_the_batch(runs, model_dir, folder, shards, tmp_path):
    alone = predict(model_dir, str(folder), tmp_path / "alone", chunk_size=4, batch_size=1, max_pixels=MAX_PIXELS,
                    questions=["what color is it ?"], **CPU)
    assert alone["records"] == 10
    _assert_same(_records(runs["tmp"] / "one_folder"), _records(tmp_path / "alone"))
    predict(model_dir, str(shards / "{00000..00001}.tar"), tmp_path / "beams", decoding=DecodingConfig(beam_size=2),
            batch_size=3, **CPU)
    _assert_same(_records(runs["tmp"] / "one_shards"), _records(tmp_path / "beams"))


def _seen_in(monkeypatch, owner, name: str, log: Path, what) -> None:
    """Make ``owner.name`` (a function) append ``what()`` to the file ``log`` on every call: a file, as the
    data-loader workers that call it are processes of their own."""
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        with open(log, "a") as f:
            f.write(json.dumps(what()) + "\n")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)


def _seen(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("chunk_size", [3, 100])
def test_on_the_cpu_the_workers_run_the_model_and_the_records_come_in_input_order(model_dir, folder, tmp_path,
                                                                                  monkeypatch, chunk_size):
    """Three workers each read batches and predict them (one process each), even when all the images are one chunk,
    and write each record's text, so that the main process only writes; the records are those of the main process
    predicting alone, in listing order."""
    _seen_in(monkeypatch, TorchBackend, "encode", tmp_path / "pids", os.getpid)
    _seen_in(monkeypatch, vlm.predict.module, "record_text", tmp_path / "text_pids", os.getpid)
    args = dict(chunk_size=chunk_size, batch_size=1, max_pixels=MAX_PIXELS, accelerator="cpu", devices=1)
    workers = predict(model_dir, str(folder), tmp_path / "workers", num_workers=3, **args)
    assert workers["profile"]["workers"] == 3
    in_workers, texts_in_workers = set(_seen(tmp_path / "pids")), set(_seen(tmp_path / "text_pids"))
    (tmp_path / "pids").unlink()
    (tmp_path / "text_pids").unlink()
    alone = predict(model_dir, str(folder), tmp_path / "alone", num_workers=0, **args)
    assert alone["profile"]["workers"] == 0 and set(_seen(tmp_path / "pids")) == {os.getpid()}
    assert set(_seen(tmp_path / "text_pids")) == {os.getpid()}
    model_seconds = alone["profile"]["encode"] + alone["profile"]["generate"]
    assert alone["profile"]["main_cpu"] > 0.5 * model_seconds > 0  # the main process's own CPU time ran the model
    assert len(in_workers) == 3 and os.getpid() not in in_workers and texts_in_workers == in_workers
    records = read_outputs(tmp_path / "workers")
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)  # as listed, whatever ends first
    _not_trivial(_records(tmp_path / "alone"))
    assert records == read_outputs(tmp_path / "alone")


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_outputs(model_dir, tmp_path):
    source = tmp_path / "many"
    source.mkdir()
    for i, image in enumerate(random_images(24)):
        image.save(source / f"{i:03d}.png")
    args = dict(chunk_size=2, batch_size=2)
    full = predict(model_dir, str(source), tmp_path / "full", **args, **CPU)
    out = tmp_path / "killed"
    proc = _cli("--model", str(model_dir), "--input", str(source), "--out", str(out), "--chunk_size", "2",
                "--batch_size", "2", "--num_workers", "0", "--accelerator", "cpu", "--devices", "1")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list((out / "manifest").glob("*.json"))) < 2:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it was killed: " + proc.communicate()[0][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "manifest").glob("*.json")))
    assert 2 <= done < 12, done
    assert not (out / "manifest.json").exists()
    resumed = predict(model_dir, str(source), out, **args, **CPU)
    assert resumed["chunks_skipped"] == done and resumed["chunks_this_run"] == 12 - done
    expected = _records(tmp_path / "full")
    _not_trivial(expected)
    assert _records(out) == expected  # record for record, bit for bit: batches never depend on the split
    assert resumed["records"] == full["records"] == 24

    # A chunk left half-written (its file cut short, no manifest entry, a stale temporary file) is redone.
    (out / "manifest" / "part-00003.json").unlink()
    text = (out / "part-00003.jsonl").read_text()
    (out / "part-00003.jsonl").write_text(text[:len(text) // 2])
    (out / ".tmp" / "part-00003.jsonl").write_text("junk\n")
    again = predict(model_dir, str(source), out, **args, **CPU)
    assert again["chunks_this_run"] == 1 and again["records_this_run"] == 2
    assert _records(out) == expected


def test_a_rerun_with_other_arguments_is_refused(model_dir, folder, runs):
    with pytest.raises(VLMError, match="other arguments .decoding"):
        predict(model_dir, str(folder), runs["tmp"] / "one_folder", chunk_size=4, max_pixels=MAX_PIXELS,
                questions=["what color is it ?"], decoding=DecodingConfig(beam_size=3), **CPU)


@pytest.mark.parametrize("method", ["raw", "rollout"])  # raw: from generation's own weights; rollout: token_maps
def test_maps_summaries_equal_what_attend_gives(model_dir, tmp_path, method):
    captioner = Captioner.load(model_dir, device="cpu")
    images = random_images(3)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.resize((64 + 32 * i, 64)).save(paths[-1])  # sizes differ: boxes are in each image's pixels
    attended = [captioner.attend(p, method=method) for p in paths]
    given = attended[0].tokens[1]  # a word of the first caption, given as a phrase
    lines = [{"image": p.name, "phrases": [given, "absent words"]} if i == 0 else {"image": p.name, "id": i}
             for i, p in enumerate(paths)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    predict(model_dir, str(tmp_path / "in.jsonl"), tmp_path / "out", maps=True, map_config=MapConfig(method),
            top_k=4, batch_size=3, **CPU)
    records = _records(tmp_path / "out")
    assert records["1.png"]["input"] == {"id": 1}
    tops = {tuple(p[0] for p in t["patches"]) for r in records.values() for t in r["caption_tokens"]}
    assert len(tops) > 3  # the tokens look at different patches: equal summaries are evidence
    for path, att in zip(paths, attended, strict=True):
        record = records[path.name]
        assert record["caption"] == att.text and record["grid"] == list(att.maps.shape[1:])
        for token, token_map in zip(record["caption_tokens"], att.maps, strict=True):
            flat = token_map.ravel()
            top = np.argsort(-flat, kind="stable")[:4]
            assert [p[0] for p in token["patches"]] == top.tolist()
            assert np.allclose([p[1] for p in token["patches"]], flat[top], atol=1e-5)
        size = Image.open(path).size
        phrases = ([(given, [att.tokens.index(given)]), ("absent words", None)] if path.name == "0.png"
                   else content_phrases(att.tokens))
        assert phrases and [p["phrase"] for p in record["phrases"]] == [p for p, _ in phrases]
        for made, (_, idx) in zip(record["phrases"], phrases, strict=True):
            if idx is None:
                assert made["box"] is None
                continue
            box = box_from_map(combine(att.maps[idx]), size, 0.5)  # vlm ground's rule on attend's maps
            assert made["tokens"] == idx and np.allclose(made["box"], box, atol=0.01)


def test_parquet_holds_the_jsonl_records(model_dir, folder, runs, tmp_path):
    predict(model_dir, str(folder), tmp_path / "pq", chunk_size=4, batch_size=3, max_pixels=MAX_PIXELS,
            questions=["what color is it ?"], format="parquet", **CPU)
    files = sorted((tmp_path / "pq").glob("part-*"))
    assert len(files) == 4 and all(p.suffix == ".parquet" for p in files)
    assert _records(tmp_path / "pq") == _records(runs["tmp"] / "one_folder")


def test_recaptioned_shards_keep_the_alt_text_and_train(model_dir, shards, tmp_path):
    out = tmp_path / "recaptioned"
    predict(model_dir, str(shards / "{00000..00001}.tar"), out, batch_size=4, format="webdataset", **CPU)
    records = _records(out)
    with tarfile.open(out / "part-00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000002.json").read())
        assert tar.extractfile("000002.txt").read() == b"alt text 2"
    assert names[:3] == ["000000.jpg", "000000.txt", "000000.json"] and len(names) == 15
    assert meta["caption"] == "alt text 2" and meta["n"] == 2 and meta[CAPTION_KEY] == records["000002"]["caption"]
    pattern = str(out / "part-{00000..00001}.tar")
    assert shard_texts(SourceConfig(pattern, caption_key=CAPTION_KEY), 100) == [
        records[k]["caption"] for k in sorted(records)]
    assert shard_texts(SourceConfig(pattern), 100)[0] == "alt text 0"  # the default still reads the alt-text
    source = json.dumps([{"path": pattern, "format": "webdataset", "caption_key": CAPTION_KEY}])
    code = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.sources", source,
                 "--val.generate", "false", "--trainer.max_steps", "2", "--data.batch_size", "4",
                 "--data.questions_per_image", "0", "--out", str(tmp_path / "run")])
    assert code == 0 and (tmp_path / "run" / "model" / "model.safetensors").exists()
    vocabulary = Captioner.load(tmp_path / "run" / "model").tokenizer.hf.get_vocab()
    assert all(w in vocabulary for w in records["000002"]["caption"].split())  # learned from the new captions
    assert "alt" not in vocabulary


def test_a_shard_sample_whose_json_is_no_object_is_an_error_when_recaptioning(model_dir, tmp_path):
    """--format webdataset keeps each sample's .json fields: a sample whose .json is invalid or not an object goes to
    the errors with its reason (its fields cannot be kept), and the run goes on; predicting into JSONL, which does
    not keep them, predicts it."""
    images = random_images(3)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, meta in enumerate([b'{"n": 0}', b"[1, 2]", b'{"n": 2']):
            for suffix, payload in (("jpg", _png(images[i], "JPEG")), ("json", meta)):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    summary = predict(model_dir, str(tmp_path / "00000.tar"), tmp_path / "out", format="webdataset", **CPU)
    assert summary["complete"] and summary["records"] == 1 and summary["errors"] == 2
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], e["error"].split(": ", 1)[1]) for e in errors] == [
        ("000001", "000001.json: not a JSON object: its fields cannot be kept"),
        ("000002", "000002.json: invalid JSON (Expecting ',' delimiter: line 1 column 8 (char 7)): its fields "
                   "cannot be kept")]
    with tarfile.open(tmp_path / "out" / "part-00000.tar") as tar:
        assert tar.getnames() == ["000000.jpg", "000000.json"]
        assert json.loads(tar.extractfile("000000.json").read())["n"] == 0
    assert predict(model_dir, str(tmp_path / "00000.tar"), tmp_path / "jsonl", **CPU)["records"] == 3


class _Trainer:
    is_global_zero, world_size, global_step, max_steps, progress_bar_metrics = True, 1, 0, -1, {}


def test_progress_prints_a_plain_line_every_n_batches_when_not_a_terminal():
    stream = io.StringIO()  # not a terminal
    progress = Progress(every=2, total=10, stream=stream)
    progress.on_predict_start(_Trainer(), None)
    for _ in range(5):
        progress.on_predict_batch_end(_Trainer(), None, None, {"items": [1, 2]}, 0)
    progress.on_predict_end(_Trainer(), None)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["predict: 4/10 images", "predict: 8/10 images",
                                                        "predict: 10/10 images"]
    assert all("images/s" in line and "eta" in line for line in lines)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_token_logprobs_are_the_models_log_probabilities_of_the_kept_tokens(tokenizer, beam_size):
    model = image_sensitive_model(tokenizer)
    captioner = Captioner(model, tokenizer, device="cpu")
    _, image_kv, _ = captioner._encode(random_images(3))
    prompt = tokenizer.caption_prompt()
    gen = captioner._generate(image_kv, [prompt] * 3, DecodingConfig(beam_size=beam_size, max_new_tokens=8))
    for i, (ids, logprobs) in enumerate(zip(gen.tokens, gen.token_logprobs, strict=True)):
        assert len(ids) == len(logprobs) > 1
        seq = torch.tensor([[*prompt, *ids]])
        with torch.no_grad():
            logits = model.decoder(seq, [(k[i:i + 1], v[i:i + 1]) for k, v in image_kv]).logits[0].float()
        teacher = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(1, seq[0, len(prompt):, None])[:, 0]
        assert teacher.std() > 1e-4  # the tokens' log-probabilities differ: agreeing is evidence
        assert np.allclose(logprobs, teacher.numpy(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    """The model exported to ONNX with its attention outputs (for raw and rollout maps)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--model", str(model_dir), "--out", str(out), "--maps"]) == 0
    return out


def test_onnx_runtime_writes_the_torch_runtimes_records(model_dir, onnx_dir, folder, tmp_path, capsys):
    args = dict(questions=["what color is it ?"], maps=True, map_config=MapConfig("rollout"), top_k=4,
                batch_size=2, **CPU)
    predict(model_dir, str(folder / "sub"), tmp_path / "torch", **args)
    summary = predict(onnx_dir, str(folder / "sub"), tmp_path / "onnx", runtime="onnx", **{**args, "num_workers": 2})
    assert summary["profile"]["workers"] == 2  # the two batches side by side, on one-thread sessions
    torch_records, onnx_records = _records(tmp_path / "torch"), _records(tmp_path / "onnx")
    assert len(torch_records) == 4
    _not_trivial(torch_records)
    _assert_same(torch_records, onnx_records, tol=1e-4)
    tops = {tuple(p[0] for p in t["patches"]) for r in torch_records.values() for t in r["caption_tokens"]}
    assert len(tops) > 3  # the tokens look at different patches: equal summaries are evidence
    for key, record in torch_records.items():
        theirs = onnx_records[key]
        assert record["grid"] == theirs["grid"] and len(record["phrases"]) == len(theirs["phrases"])
        for ours, other in zip(record["caption_tokens"], theirs["caption_tokens"], strict=True):
            assert [p[0] for p in ours["patches"]] == [p[0] for p in other["patches"]]
            assert np.allclose([p[1] for p in ours["patches"]], [p[1] for p in other["patches"]], atol=1e-4)
    # The export's identity is its own (a hash of its files): its outputs are no torch run's to resume.
    assert onnx_records[key]["model"] != record["model"]
    with pytest.raises(VLMError, match="other arguments .model"):
        predict(model_dir, str(folder / "sub"), tmp_path / "onnx", **args)
    # Chefer needs autograd: refused in one line before anything runs.
    assert main(["predict", "--model", str(onnx_dir), "--input", str(folder / "sub"), "--out", str(tmp_path / "c"),
                 "--runtime", "onnx", "--maps", "--method", "chefer", "--accelerator", "cpu"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "chefer" in error[0] and "torch runtime" in error[0], error
    assert not (tmp_path / "c").exists()


def test_prompt_leads_each_caption_as_captioner_caption_does(model_dir, folder, tmp_path):
    prompt = "a red"
    predict(model_dir, str(folder / "sub"), tmp_path / "out", prompt=prompt, batch_size=4, **CPU)
    records = _records(tmp_path / "out")
    captioner = Captioner.load(model_dir, device="cpu")
    keys = sorted(records)
    expected = captioner.caption([folder / "sub" / k for k in keys], prompt=prompt)
    assert [records[k]["caption"] for k in keys] == expected
    assert all(text.startswith(prompt + " ") for text in expected)
    plain = captioner.caption([folder / "sub" / k for k in keys])
    assert sum(e != f"{prompt} {p}" for e, p in zip(expected, plain, strict=True)) >= 2  # the prompt steers them
    for k in keys:  # the tokens are the generated ones, after the prompt
        assert records[k]["caption"] == f"{prompt} " + captioner.tokenizer.decode(
            [t["id"] for t in records[k]["caption_tokens"]])
    with pytest.raises(VLMError, match="other arguments .prompt"):
        predict(model_dir, str(folder / "sub"), tmp_path / "out", prompt="a blue", batch_size=4, **CPU)


def test_a_resume_over_a_changed_listing_is_refused(model_dir, tmp_path):
    """A file added to the folder would shift the chunks under the finished outputs (one image predicted twice,
    another never): the resume is refused, not silently mixed."""
    source = tmp_path / "grow"
    source.mkdir()
    for i, image in enumerate(random_images(5)):
        image.save(source / f"im{i + 1}.png")
    out = tmp_path / "out"
    predict(model_dir, str(source), out, chunk_size=2, **CPU)
    (out / "manifest" / "part-00002.json").unlink()  # as if killed before the last chunk
    predict(model_dir, str(source), out, chunk_size=2, **CPU)  # the same listing resumes
    random_images(1)[0].save(source / "im0.png")  # sorts first: the same number of chunks
    with pytest.raises(VLMError, match="another listing"):
        predict(model_dir, str(source), out, chunk_size=2, **CPU)


def test_a_run_that_failed_before_any_chunk_leaves_nothing_that_refuses_the_corrected_one(model_dir, folder,
                                                                                          tmp_path, capsys):
    out = tmp_path / "out"
    # Map options out of range for the model: one line before anything runs (it was the first batch's traceback).
    assert main(["predict", "--model", str(model_dir), "--input", str(folder / "sub"), "--out", str(out), "--maps",
                 "--head", "9", "--accelerator", "cpu"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "attention head 9 out of range" in error[0], error
    # A bad pixel limit is an argument error, not every image's.
    for limit, env in ((-5, None), (None, "abc")):
        if env:
            os.environ["VLM_MAX_PIXELS"] = env
        try:
            with pytest.raises(VLMError, match="expected a positive number of pixels"):
                predict(model_dir, str(folder / "sub"), out, max_pixels=limit, **CPU)
        finally:
            os.environ.pop("VLM_MAX_PIXELS", None)
    assert not out.exists()
    # A run that fails after recording its arguments (here the trainer's) finished no chunk: its job.json yields.
    with pytest.raises(Exception, match="nonsense"):
        predict(model_dir, str(folder / "sub"), out, precision="nonsense", **CPU)
    assert json.loads((out / "job.json").read_text())["precision"] == "nonsense"
    summary = predict(model_dir, str(folder / "sub"), out, **CPU)
    assert summary["records"] == 4 and summary["complete"]
    with pytest.raises(VLMError, match="other arguments .precision"):  # once a chunk is done, it holds
        predict(model_dir, str(folder / "sub"), out, precision="bf16-mixed", **CPU)


def test_a_truncated_shard_keeps_what_it_held_and_reports_where_it_broke(model_dir, shards, tmp_path):
    cut = tmp_path / "shards"
    cut.mkdir()
    (cut / "00000.tar").write_bytes((shards / "00000.tar").read_bytes())
    with tarfile.open(shards / "00001.tar") as tar:  # samples 5..7: cut in the middle of sample 7's image
        member = tar.getmember("000007.jpg")
    (cut / "00001.tar").write_bytes((shards / "00001.tar").read_bytes()[:member.offset_data + member.size // 2])
    summary = predict(model_dir, str(cut / "*.tar"), tmp_path / "out", batch_size=2, **CPU)  # a glob of shards
    assert summary["complete"] and summary["chunks"] == 2
    records = _records(tmp_path / "out")
    assert {f"{i:06d}" for i in range(6)} <= set(records) and "000007" not in records
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    # Sample 6's files end where sample 7's image breaks off: the break is after sample 5.
    assert any("00001.tar: unreadable after 1 sample(s), the last 000005 (ReadError" in e["error"]
               for e in errors), errors
    with pytest.raises(VLMError, match="no such shard"):  # a missing local shard: named before anything runs
        predict(model_dir, str(cut / "{00000..00002}.tar"), tmp_path / "out2", **CPU)


def test_recaptioned_shards_hold_images_that_training_reads_whatever_the_input_format(model_dir, tmp_path):
    from vlm.data.datasets import IMAGE_KEYS, shard_sample

    source = tmp_path / "formats"
    source.mkdir()
    images = random_images(3)
    for image, name in zip(images, ("a.bmp", "b.gif", "c.tiff"), strict=True):
        image.save(source / name)
    (source / "list.txt").write_text("a.bmp\nb.gif\nc.tiff\n")
    predict(model_dir, str(source / "list.txt"), tmp_path / "out", format="webdataset", **CPU)
    with tarfile.open(tmp_path / "out" / "part-00000.tar") as tar:
        names = tar.getnames()
        assert [n for n in names if not n.endswith(".json")] == [f"00000000{i}.png" for i in range(3)]
        for i, name in enumerate(("a.bmp", "b.gif", "c.tiff")):  # each image as predict read it
            png = Image.open(io.BytesIO(tar.extractfile(f"00000000{i}.png").read()))
            assert np.array_equal(np.asarray(png), np.asarray(load_image(source / name)))
    import webdataset as wds

    samples = list(wds.tariterators.tarfile_samples([{"url": str(tmp_path / "out" / "part-00000.tar")}]))
    assert len(samples) == 3 and all(any(k in s for k in IMAGE_KEYS) for s in samples)
    assert all(shard_sample(s, s["__key__"], CAPTION_KEY) for s in samples)


def test_bf16_autocast_reaches_the_workers(model_dir, folder, tmp_path):
    """--precision bf16-mixed runs the model in bf16 in the data-loader workers as in the main process (Lightning's
    autocast wraps the step, not the workers), so a batch's numbers do not depend on where it ran."""
    args = dict(batch_size=2, accelerator="cpu", devices=1)
    logprobs = {}
    for name, precision, workers in (("bf16_main", "bf16-mixed", 0), ("bf16_two", "bf16-mixed", 2),
                                     ("fp32_two", "32-true", 2)):
        predict(model_dir, str(folder / "sub"), tmp_path / name, precision=precision, num_workers=workers, **args)
        logprobs[name] = {k: [t["logprob"] for t in r["caption_tokens"]] for k, r in _records(tmp_path / name).items()}
    assert logprobs["bf16_two"] != logprobs["fp32_two"]  # bf16 changes the numbers: equal ones below are evidence
    assert logprobs["bf16_two"] == logprobs["bf16_main"]


def test_numpys_blas_runs_one_thread_in_the_workers_and_as_before_after(model_dir, folder, tmp_path, monkeypatch):
    """The maps' numpy products run beside the model: OpenBLAS's own threads would take its cores."""
    _seen_in(monkeypatch, vlm.predict.module, "phrase_boxes", tmp_path / "blas",
             lambda: {i["user_api"]: i["num_threads"] for i in threadpool_info()}["blas"])
    with threadpool_limits(limits=2, user_api="blas"):  # more than one before, whatever the machine
        predict(model_dir, str(folder / "sub"), tmp_path / "p", maps=True, batch_size=2, **{**CPU, "num_workers": 2})
        after = {i["user_api"]: i["num_threads"] for i in threadpool_info()}["blas"]
    assert _seen(tmp_path / "blas") and set(_seen(tmp_path / "blas")) == {1}
    assert after == 2


def test_full_collections_skip_what_existed_before_the_run_and_a_callers_freeze_stays(model_dir, folder, tmp_path,
                                                                                        monkeypatch):
    """The records in flight trigger Python's full collections, which would rescan the model, torch and Lightning
    each time: those objects are frozen for the run (the data-loader workers inherit the freeze), and only for it."""
    _seen_in(monkeypatch, vlm.predict.module, "phrase_boxes", tmp_path / "frozen", gc.get_freeze_count)
    assert gc.get_freeze_count() == 0
    two = {**CPU, "num_workers": 2}
    predict(model_dir, str(folder / "sub"), tmp_path / "p", maps=True, batch_size=2, **two)
    frozen = _seen(tmp_path / "frozen")
    assert frozen and min(frozen) > 100_000  # torch alone makes that many objects
    assert gc.get_freeze_count() == 0  # as before the run
    gc.freeze()  # the caller's own
    try:
        before = gc.get_freeze_count()
        predict(model_dir, str(folder / "sub"), tmp_path / "q", maps=True, batch_size=2, **two)
        assert gc.get_freeze_count() >= before
    finally:
        gc.unfreeze()


def test_a_jsonl_key_of_null_falls_back_to_the_image(model_dir, folder, tmp_path):
    listing = tmp_path / "in.jsonl"
    listing.write_text(json.dumps({"image": str(folder / "sub" / "im00.png"), "key": None}) + "\n"
                       + json.dumps({"image": str(folder / "sub" / "im03.jpg"), "key": "mine"}) + "\n")
    predict(model_dir, str(listing), tmp_path / "out", **CPU)
    assert set(_records(tmp_path / "out")) == {str(folder / "sub" / "im00.png"), "mine"}


def test_texts_that_end_at_once_are_recorded_empty_with_maps_on(tokenizer, folder, tmp_path):
    cfg = tiny_config()
    model = VisionLanguageModel(replace(cfg, decoder=replace(cfg.decoder, head_bias=True)), len(tokenizer)).eval()
    with torch.no_grad():
        model.decoder.head_bias[tokenizer.eos_id] = 100.0  # every caption and answer ends before its first token
    model_dir = save_model(model, tokenizer, tmp_path / "model")
    predict(model_dir, str(folder / "sub"), tmp_path / "out", questions=["what color is it ?"], maps=True, **CPU)
    records = _records(tmp_path / "out")
    assert len(records) == 4
    for record in records.values():
        assert record["caption"] == "" and record["caption_tokens"] == [] and record["phrases"] == []
        assert record["answers"] == [{"question": "what color is it ?", "answer": "", "tokens": []}]


def test_lightnings_remarks_that_users_cannot_act_on_are_left_out(model_dir, folder, tmp_path, caplog, recwarn):
    with caplog.at_level("INFO", logger="lightning"):
        predict(model_dir, str(folder / "sub"), tmp_path / "out", **CPU)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert any("GPU available" in m for m in said)  # Lightning's information still shows
    assert not [m for m in said if "litlogger" in m]  # not its advertisement
    assert not [str(w.message) for w in recwarn if "LeafSpec" in str(w.message)]  # nor torch's note to it


def test_a_listing_holds_each_image_with_its_key_fields_and_phrases(tmp_path):
    """A list file skips blank and comment lines and strips spaces; a JSONL line gives the image, its key (else the
    image as written), its other fields and its phrases; paths are relative to the file's folder."""
    (tmp_path / "list.txt").write_text("# photos\n  a.jpg  \n\n  # indented\n./b c.jpg\r\n/abs/d.png\nsub//e.jpg\n")
    _, chunks = list_chunks(str(tmp_path / "list.txt"), chunk_size=2)
    assert [len(c.entries) for c in chunks] == [2, 2]
    assert [(e.image, e.key) for c in chunks for e in c.entries] == [
        (f"{tmp_path}/a.jpg", "a.jpg"), (f"{tmp_path}/b c.jpg", "./b c.jpg"), ("/abs/d.png", "/abs/d.png"),
        (f"{tmp_path}/sub/e.jpg", "sub//e.jpg")]
    lines = [{"image": "a.jpg"}, {"image": "b.jpg", "key": 7, "n": 1}, {"image": "c.jpg", "key": None,
                                                                         "phrases": ["red circle"]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"
                                       + json.dumps(lines[2]) + "\n")
    _, chunks = list_chunks(str(tmp_path / "in.jsonl"))
    assert [(e.image, e.key, e.fields, e.phrases) for e in chunks[0].entries] == [
        (f"{tmp_path}/a.jpg", "a.jpg", None, None), (f"{tmp_path}/b.jpg", "7", {"n": 1}, None),
        (f"{tmp_path}/c.jpg", "c.jpg", None, ["red circle"])]


def test_a_folder_lists_its_image_files_at_any_depth_as_rglob_walks(tmp_path):
    """Image files by suffix (any case) at any depth, in a folder named like an image too, and a link to a file; not
    ".jpg" (no suffix), other files, nor what lies behind a link to a folder (rglob's walk); sorted by key."""
    root = tmp_path / "photos"
    for name in ["b.JPG", "a/c.png", "a/deeper/d.webp", "x.jpg/e.jpeg", ".hidden/f.gif", ".jpg", "notes.txt",
                 "a/g.tiff.bak"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    (root / "h.png").symlink_to(root / "b.JPG")
    (root / "gone.png").symlink_to(root / "missing.png")
    keys = [e.key for e in list_chunks(str(root))[1][0].entries]
    assert keys == [".hidden/f.gif", "a/c.png", "a/deeper/d.webp", "b.JPG", "h.png", "x.jpg/e.jpeg"]
    assert keys == sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".gif") and p.is_file())
    assert list_chunks(str(root))[1][0].entries[0].image == f"{root}/.hidden/f.gif"


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg"', "in.jsonl:2: invalid JSON (Expecting ',' delimiter)"),
    ('["a.jpg"]', 'in.jsonl:2: each line must be an object with an "image" path'),
    ('{"image": 3}', 'in.jsonl:2: each line must be an object with an "image" path'),
    ('{"image": "a.jpg", "phrases": "red"}', 'in.jsonl:2: "phrases" must be a list of non-empty strings'),
])
def test_a_bad_jsonl_line_is_refused_naming_its_file_and_line(tmp_path, line, message):
    (tmp_path / "in.jsonl").write_text('{"image": "ok.jpg"}\n' + line + "\n")
    with pytest.raises(VLMError) as e:
        list_chunks(str(tmp_path / "in.jsonl"))
    assert str(e.value) == f"{tmp_path}/{message}"


def test_listing_joins_paths_as_pathlib_does():
    """The join of a listed name to its file's folder is pathlib's, plain names taking the short way."""
    parts = ["", ".", "..", "a", "b.jpg", "/", "//", "a/", "./a", "a//b", "a/./b", "/abs/x.png", "//net/x", "a/..",
             "x/.", " sp ", "ä/ö.jpg", "///x", ".hidden", "..x"]
    names = {x + y for x in parts for y in parts} | {x + "/" + y for x in parts for y in parts}
    bases = [str(Path(b)) for b in (".", "/", "data", "/data/x", "//")]
    differ = [(b, n) for b in bases for n in names if _joined(b, n) != str(Path(b) / n)]
    assert len(names) > 500 and not differ, differ[:5]


def test_the_listing_digest_is_the_json_of_each_entry():
    """The digest a job records hashes each entry's JSON text; entries without fields or phrases take a shorter way
    to the same text (quotes, backslashes, control and non-ASCII characters included)."""
    entries = [Entry(f"/d/{name}", name) for name in ['a"b', "c\\d", "e\x01\n", "ü😀", "\u2028"]]
    entries += [Entry("/d/f", "f", {"n": 1}), Entry("/d/g", "g", None, ["red"])]
    expected = hashlib.sha256()
    for e in entries:
        expected.update(json.dumps([e.key, e.image, e.fields or {}, e.phrases], sort_keys=True,
                                   ensure_ascii=False).encode() + b"\n")
    assert listing_digest([Chunk(0, entries)]) == "sha256:" + expected.hexdigest()[:16]
    assert listing_digest([Chunk(0, entries[:-1])]) != listing_digest([Chunk(0, entries)])


def test_listing_makes_no_garbage_collections_and_leaves_the_collector_as_it_was(tmp_path):
    """A listing of many images pauses the cyclic collector, whose collections would rescan the entries made so far
    (dozens of collections here); the collector is on again after (and stays off when the caller had turned it off)."""
    (tmp_path / "in.jsonl").write_text("".join(f'{{"image": "{i}.jpg", "n": {i}}}\n' for i in range(20000)))
    collections = []
    callback = lambda phase, info: collections.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        list_chunks(str(tmp_path / "in.jsonl"))
        assert len(collections) <= 1 and gc.isenabled()  # one of the youngest objects, once it is on again
        gc.disable()
        list_chunks(str(tmp_path / "in.jsonl"))
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.callbacks.remove(callback)
