"""WebDataset shards split over readers (DDP ranks x data-loader workers): every sample once per pass, every
reader served even with fewer shards than readers, and a clear error instead of a hang when a reader has none;
training passes shuffled (shard order and a sample buffer) and still split exactly."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlm.config import SourceConfig
from vlm.data import datasets
from vlm.data.datasets import ShardDataset, shard_sample
from vlm.data.validate import validate
from vlm.errors import VLMError

TIMEOUT = 60  # seconds a data-loader worker may take per item: a reader that never yields fails, not hangs


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def write_shards(folder: Path, sizes: list[int]) -> list[str]:
    """Shards 00000.tar ... with sizes[k] samples each; sample n's caption is "sample n". Returns all captions."""
    folder.mkdir(parents=True, exist_ok=True)
    png, captions = _png(), []
    for k, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{k:05d}.tar")) as sink:
            for _ in range(size):
                captions.append(f"sample {len(captions)}")
                sink.write({"__key__": f"{len(captions):06d}", "png": png, "txt": captions[-1].encode()})
    return captions


def caption_of(image, captions, questions, index):  # the sampler: what identifies the sample
    return captions[0]


def read_as(monkeypatch, dataset: ShardDataset, rank: int, world: int, workers: int, items: int | None = None
            ) -> list[str]:
    """What DDP rank ``rank`` of ``world`` reads through a data loader with ``workers`` workers (all of a pass, or
    its first ``items``). The rank is simulated where the code reads it, torch.distributed; workers fork with it."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, timeout=TIMEOUT if workers else 0)
    return list(islice(loader, items))


@pytest.mark.parametrize("sizes, pattern", [
    ([3, 3, 3, 3], "{folder}/{{00000..00003}}.tar"),  # as many shards as readers, divided evenly
    ([4, 4, 4, 4, 4, 4, 4, 4], "file://{folder}/{{00000..00007}}.tar"),  # two shards per reader
    ([5, 2, 6], "pipe:cat {folder}/{{00000..00002}}.tar"),  # fewer shards than readers, of other sizes
    ([9], "{folder}/00000.tar"),  # one shard for four readers
])
def test_one_pass_reads_every_sample_exactly_once_across_ranks_and_workers(tmp_path, monkeypatch, sizes, pattern):
    captions = write_shards(tmp_path / "shards", sizes)
    dataset = ShardDataset(SourceConfig(pattern.format(folder=tmp_path / "shards")), caption_of, strict=True,
                           repeat=False)
    per_rank = [read_as(monkeypatch, dataset, rank, 2, workers=2) for rank in range(2)]
    assert all(per_rank)  # every rank is served
    assert Counter(per_rank[0] + per_rank[1]) == Counter(captions)  # each sample exactly once
    if len(sizes) % 4 == 0 and len(set(sizes)) == 1:  # shards divide evenly: the ranks read equal shares
        assert len(per_rank[0]) == len(per_rank[1])


def test_training_stream_serves_every_reader_of_a_single_shard(tmp_path, monkeypatch):
    captions = write_shards(tmp_path / "shards", [8])
    dataset = ShardDataset(SourceConfig(str(tmp_path / "shards" / "00000.tar")), caption_of, strict=True)
    # Two workers per rank, one shard: before, three of the four readers looped forever without yielding.
    per_rank = [read_as(monkeypatch, dataset, rank, 2, workers=2, items=8) for rank in range(2)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(captions * 2)  # repeated passes, still evenly split


def test_a_reader_left_without_samples_is_one_clear_error(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", [2])  # two samples for four readers
    dataset = ShardDataset(SourceConfig(str(tmp_path / "shards" / "00000.tar")), caption_of, strict=True)
    with pytest.raises(VLMError, match=r"00000.tar: reader [23] of 4 .* got no usable sample"):
        read_as(monkeypatch, dataset, 1, 2, workers=2, items=4)


def test_a_shuffled_stream_reads_every_sample_once_per_pass_in_an_order_of_its_own(tmp_path):
    """data.shuffle_buffer: each pass reads the shards in a fresh order through a buffer of samples, still every
    sample once per pass; the same seed gives the same order, another seed another."""
    captions = write_shards(tmp_path / "shards", [4, 4, 4, 4])
    path = SourceConfig(str(tmp_path / "shards" / "{00000..00003}.tar"))

    def passes(seed: int, buffer: int = 5) -> list[list[str]]:
        items = list(islice(ShardDataset(path, caption_of, strict=True, seed=seed, shuffle_buffer=buffer), 48))
        return [items[i:i + 16] for i in range(0, 48, 16)]

    shuffled = passes(seed=0)
    assert all(sorted(one) == sorted(captions) for one in shuffled)  # every sample, once in each pass
    assert len({tuple(one) for one in [captions, *shuffled]}) == 4  # each pass its own order, none the files'
    numbers = [[int(caption.split()[1]) for caption in one] for one in shuffled]  # shard k holds 4k to 4k + 3
    assert any(a // 4 == b // 4 and a > b for one in numbers for a, b in zip(one, one[1:], strict=False))  # mixed
    assert passes(seed=0) == shuffled and passes(seed=1) != shuffled
    shard_orders = [[int(one[i].split()[1]) // 4 for i in range(0, 16, 4)] for one in passes(seed=0, buffer=1)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in shard_orders)  # a buffer of 1 mixes nothing: whole shards,
    assert len(set(map(tuple, shard_orders))) > 1  # in an order drawn for each pass
    assert passes(seed=0, buffer=0) == [captions] * 3  # no buffer: the shards' own order, sample after sample


def test_shuffled_shards_are_still_split_exactly_over_ranks_and_workers(tmp_path, monkeypatch):
    """Every reader draws the same shard order for a pass, so the readers (2 ranks x 2 workers) still split one
    pass into disjoint shares that cover it."""
    captions = write_shards(tmp_path / "shards", [3] * 8)  # 2 shards of 3 per reader: 12 samples per rank and pass
    dataset = ShardDataset(SourceConfig(str(tmp_path / "shards" / "{00000..00007}.tar")), caption_of, strict=True,
                           seed=3, shuffle_buffer=4)
    per_rank = [read_as(monkeypatch, dataset, rank, 2, workers=2, items=12) for rank in range(2)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(captions)
    assert per_rank[0] + per_rank[1] != captions
    with pytest.raises(VLMError, match="data.shuffle_buffer: expected 0 .off. or a positive number"):
        ShardDataset(SourceConfig(str(tmp_path / "shards" / "00000.tar")), caption_of, strict=True, shuffle_buffer=-1)


@pytest.mark.parametrize("buffer", [0, 3])
def test_an_unreadable_sample_gives_its_place_to_the_next_readable_one_and_a_resume_decodes_nothing_before(
        tmp_path, monkeypatch, buffer):
    """In training each sample read is one item, an unreadable one's place going to the next readable one, so a
    resumed stream's position needs no decoding: it skips samples undecoded and goes on as the stream did."""
    folder = tmp_path / "shards"
    folder.mkdir()
    names = ["ok 0", None, None, "ok 3", "ok 4", None, "ok 6", "ok 7", None]  # None: not an image
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for n, name in enumerate(names):
            sink.write({"__key__": f"{n:06d}", "png": _png() if name else b"broken", "txt": f"{name}".encode()})
    decoded = []
    real_load = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda data, name: decoded.append(name) or real_load(data, name=name))
    source = SourceConfig(str(folder / "00000.tar"))
    stream = ShardDataset(source, lambda image, captions, questions, key: (captions[0], key[0]), strict=False,
                          shuffle_buffer=buffer)
    full = list(islice(stream.items(), 27))  # three passes
    assert [key for _, key in full] == list(range(27))  # one item per sample read
    readable = {name for name in names if name}
    assert all(readable <= {text for text, _ in full[p:p + 9]} for p in (0, 9, 18))  # each pass: every one
    if not buffer:  # each unreadable sample's place is the next readable one's (the next pass's for the last)
        assert [text for text, _ in full[:9]] == ["ok 0", "ok 3", "ok 3", "ok 3", "ok 4", "ok 6", "ok 6", "ok 7",
                                                  "ok 0"]
    assert int(stream.skipped) == 12  # 4 unreadable samples in each of 3 passes
    total = len(decoded)  # to the first readable sample at or after the last item's
    assert total in (27, 28)
    for skip in range(1, 27):
        decoded.clear()
        assert list(islice(stream.items(skip), 27 - skip)) == full[skip:]
        assert len(decoded) == total - skip  # the samples before the position were not decoded


def test_a_truncated_shard_is_reported_where_it_broke_and_reading_goes_on(tmp_path):
    """A shard that breaks off keeps the samples it held and is reported (skipped and counted, or with strict one
    error naming it), and the next shard is read; `vlm data validate` reports it the same way."""
    captions = write_shards(tmp_path / "shards", [4, 4])
    broken = tmp_path / "shards" / "00000.tar"
    broken.write_bytes(broken.read_bytes()[:7000])  # the first sample, then part of the second
    source = SourceConfig(str(tmp_path / "shards" / "{00000..00001}.tar"))
    dataset = ShardDataset(source, caption_of, strict=False, repeat=False)
    assert list(dataset) == captions[:1] + captions[4:] and int(dataset.skipped) == 1
    message = rf"{broken}: unreadable after 1 sample\(s\), the last 000001 \(ReadError: [^\n]+\)"
    with pytest.raises(VLMError, match=f"^{message}$"):
        list(ShardDataset(source, caption_of, strict=True, repeat=False))
    report = validate(source)
    assert report["images"] == 5 and report["problems"] == 1 and not report["ok"]
    assert re.fullmatch(message, report["problem_list"][0])


def _json_sample(meta) -> dict:
    return {"__key__": "000007", "png": _png(), "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("meta, problem", [
    ({"questions": [{"question": "what color?", "answers": "red"}]}, "questions[0] needs \"answers\""),
    ({"questions": [{"question": "how many?", "answers": [2]}]}, "questions[0] needs \"answers\""),
    ({"questions": [{"question": "what?", "answers": []}]}, "questions[0] needs \"answers\""),
    ({"questions": [{"question": "what?", "answers": ["red", " "]}]}, "questions[0] needs \"answers\""),
    ({"questions": ["what color?"]}, "questions[0] must be an object with a non-empty string \"question\""),
    ({"questions": [{"question": 3, "answers": ["red"]}]}, "questions[0] must be an object"),
    ({"questions": {"question": "what?", "answers": ["red"]}}, "\"questions\" must be a list"),
    (["a caption"], "expected a JSON object"),
])
def test_shard_questions_are_checked_as_jsonl_lines_are(tmp_path, meta, problem):
    """A sample's .json questions: objects with a string question and a non-empty list of non-empty string answers
    ("red" was read as the answers r, e, d; a number crashed the tokenizer); a bad one skips its sample, named by
    shard and key."""
    with pytest.raises(VLMError) as error:
        shard_sample(_json_sample(meta), "shard.tar: 000007")
    assert str(error.value).startswith(f"shard.tar: 000007.json: {problem}")
    good = {"caption": "a red square", "questions": [{"question": " what  color? ", "answers": ["red", " dark red "]}]}
    _, captions, questions = shard_sample(_json_sample(good), "shard.tar: 000007")
    assert captions == ["a red square"]
    assert [(q.question, q.answers) for q in questions] == [("what color?", ["red", "dark red"])]

    shard = tmp_path / "00000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write(_json_sample(meta))
        sink.write({**_json_sample(good), "__key__": "000008"})
    dataset = ShardDataset(SourceConfig(str(shard)), caption_of, strict=False, repeat=False)
    assert list(dataset) == ["a red square"] and int(dataset.skipped) == 1
    assert validate(SourceConfig(str(shard)))["problem_list"] == [str(error.value).replace("shard.tar", str(shard))]


def test_a_strict_error_in_a_loader_worker_reaches_vlm_train_as_its_own_one_line(tmp_path):
    """torch raises a worker's VLMError again with the worker's traceback in its message; `vlm train` shows the
    error's own line (`vlm.train.run.worker_error`), as it does without workers."""
    from vlm.train.run import worker_error

    write_shards(tmp_path / "shards", [4])
    broken = tmp_path / "shards" / "00000.tar"
    broken.write_bytes(broken.read_bytes()[:7000])
    dataset = ShardDataset(SourceConfig(str(broken)), caption_of, strict=True, repeat=False)
    with pytest.raises(VLMError) as error:
        list(DataLoader(dataset, batch_size=None, num_workers=1, timeout=TIMEOUT))
    assert "Traceback" in str(error.value)
    assert re.fullmatch(rf"{broken}: unreadable after 1 sample\(s\), the last 000001 \(ReadError: [^\n]+\)",
                        str(worker_error(error.value)))
    plain = VLMError("a.jsonl:3: empty or missing caption")
    assert worker_error(plain) is plain
