"""What `vlm predict` writes into OUT, one chunk at a time, each file appearing whole or not at all.

- ``part-NNNNN.jsonl`` (or ``.parquet``, or ``.tar`` with ``--format webdataset``): the chunk's records, in input
  order. Written to ``OUT/.tmp`` and renamed into place when the chunk's last batch is done.
- ``manifest/part-NNNNN.json``: written (atomically) after the chunk's file: its source (listing range or shard),
  file, record count and the images that could not be read, each with its reason. A chunk is done when both exist;
  a rerun with the same arguments skips done chunks and redoes the others (a half-written chunk left only its
  temporary file, which is overwritten).
- ``job.json``: what the outputs depend on (model, input and a digest of its listing, tasks, decoding, maps,
  chunking, format, pixel limit, precision); a rerun into the same OUT with other values, or over a listing that
  changed, is refused once a chunk is done.
- ``manifest.json`` and ``errors.jsonl``: the whole job, gathered by the first process at the end: every done
  chunk with its counts, and every unreadable image with its reason.

With ``--format webdataset`` each chunk is a tar shard in the img2dataset layout `vlm train` reads: the image as
it was (``KEY.jpg`` ...; another format than JPEG, PNG or WebP re-encoded as ``KEY.png``), the original
``KEY.txt`` alt-text (shard input), and ``KEY.json``: the original .json fields (or a JSONL line's fields),
``"vlm_caption"`` (the new caption: train on it with ``SourceConfig.caption_key: vlm_caption``) and ``"vlm"``
(the whole prediction record). A shard sample whose .json is no JSON object goes to the errors with its reason,
as its fields could not be kept.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from vlm.errors import VLMError
from vlm.predict.inputs import Chunk, Item

OUTPUT_FORMATS = ("jsonl", "parquet", "webdataset")
SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet", "webdataset": ".tar"}
CAPTION_KEY = "vlm_caption"
"""The .json key of the new caption in shards written with --format webdataset."""


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_job(out: Path, job: dict) -> None:
    """Refuse an OUT that holds another job's outputs; record this job's description otherwise (also over the
    description of a run that finished no chunk: one that failed at its start, say, left nothing to keep)."""
    path = out / "job.json"
    if path.exists() and any((out / "manifest").glob("part-*.json")):
        try:
            before = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise VLMError(f"{path}: unreadable ({e.__class__.__name__}); remove it or use another --out") from None
        differ = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
        if "listing" in differ:
            raise VLMError(f"{out}: holds outputs of a run over another listing of {job['input']} (images added, "
                           "removed or renamed since, or another input); use another --out")
        if differ:
            raise VLMError(f"{out}: holds outputs of a run with other arguments ({differ[0]}: "
                           f"{before.get(differ[0])!r}, now {job.get(differ[0])!r}); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(job, indent=2))


def done_chunks(out: Path, chunks: list[Chunk], fmt: str) -> set[int]:
    """Chunks whose file and manifest entry both exist."""
    return {c.index for c in chunks
            if (out / "manifest" / f"{c.id}.json").exists() and (out / f"{c.id}{SUFFIX[fmt]}").exists()}


def record_text(record: dict, item: Item, fmt: str) -> str:
    """A record as its chunk's file holds it: its JSON line (jsonl; parquet is made from the lines), or with
    webdataset the sample's .json: the original fields (a shard's .json, a JSONL line's fields), the new caption
    under `CAPTION_KEY` and the record under "vlm". Made where the record is (on the CPU, in the data-loader
    worker), so that the main process only writes."""
    if fmt != "webdataset":
        return json.dumps(record, ensure_ascii=False)
    meta: dict[str, Any] = {**(item.raw or {}).get("fields", {}), **record.get("input", {})}
    if "caption" in record:
        meta[CAPTION_KEY] = record["caption"]
    meta["vlm"] = record
    return json.dumps(meta, ensure_ascii=False)


class _Sink:
    """One chunk being written to its temporary file."""

    def __init__(self, out: Path, chunk: Chunk, fmt: str):
        self.out, self.chunk, self.fmt = out, chunk, fmt
        (out / ".tmp").mkdir(exist_ok=True)
        self.tmp = out / ".tmp" / f"{chunk.id}{SUFFIX[fmt]}"
        self.records = 0
        self.errors: list[dict] = []
        if fmt == "webdataset":
            self.tar = tarfile.open(self.tmp, "w")
        else:
            self.file = open(self.tmp.with_suffix(".jsonl") if fmt == "parquet" else self.tmp, "w", encoding="utf-8")

    def write(self, text: str, item: Item) -> None:
        """Add a record, as `record_text` made it."""
        self.records += 1
        if self.fmt != "webdataset":
            self.file.write(text + "\n")
            return
        raw = item.raw or {}
        key = item.meta["key"] if "shard" in item.meta else f"{item.meta['index']:09d}"
        files = [(raw["suffix"], raw["image"]), ("json", text.encode())]
        if raw.get("txt") is not None:
            files.insert(1, ("txt", raw["txt"]))
        for suffix, data in files:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> dict:
        """Close, move the file into place, then write the manifest entry; return the entry."""
        final = self.out / f"{self.chunk.id}{SUFFIX[self.fmt]}"
        if self.fmt == "webdataset":
            self.tar.close()
        else:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self.fmt == "parquet":
                _to_parquet(self.tmp.with_suffix(".jsonl"), self.tmp)
                self.tmp.with_suffix(".jsonl").unlink()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, final)
        entry = {"chunk": self.chunk.id, **self.chunk.describe(), "file": final.name, "records": self.records,
                 "errors": self.errors}
        (self.out / "manifest").mkdir(exist_ok=True)
        write_atomic(self.out / "manifest" / f"{self.chunk.id}.json", json.dumps(entry))
        return entry


def parquet_schema():
    """The Parquet layout of a record (the JSONL one, with "input" as a JSON string)."""
    import pyarrow as pa

    token = pa.struct([("token", pa.string()), ("id", pa.int64()), ("logprob", pa.float64()),
                       ("patches", pa.list_(pa.list_(pa.float64())))])
    return pa.schema([
        ("schema", pa.int32()), ("key", pa.string()), ("image", pa.string()), ("shard", pa.string()),
        ("member", pa.string()), ("index", pa.int64()), ("input", pa.string()), ("image_size", pa.list_(pa.int64())),
        ("model", pa.string()), ("caption", pa.string()), ("caption_tokens", pa.list_(token)),
        ("grid", pa.list_(pa.int64())),
        ("phrases", pa.list_(pa.struct([("phrase", pa.string()), ("tokens", pa.list_(pa.int64())),
                                        ("box", pa.list_(pa.float64())), ("peak", pa.list_(pa.float64()))]))),
        ("answers", pa.list_(pa.struct([("question", pa.string()), ("answer", pa.string()),
                                        ("tokens", pa.list_(token))]))),
    ])


def _to_parquet(jsonl: Path, path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # checked before the run starts; kept for a direct call
        raise VLMError("--format parquet needs pyarrow: pip install 'vlm[parquet]'") from None
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    for r in records:
        if "input" in r:
            r["input"] = json.dumps(r["input"], ensure_ascii=False)
    pq.write_table(pa.Table.from_pylist(records, schema=parquet_schema()), path)


def read_outputs(out: str | os.PathLike) -> list[dict]:
    """Every record of a finished job's OUT, chunk after chunk (JSONL, Parquet or webdataset .json "vlm")."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    records: list[dict] = []
    for entry in manifest["chunks"]:
        path = out / entry["file"]
        if path.suffix == ".jsonl":
            records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for r in pq.read_table(path).to_pylist():
                r = _without_nulls(r)
                if "input" in r:
                    r["input"] = json.loads(r["input"])
                records.append(r)
        else:
            with tarfile.open(path) as tar:
                records += [json.loads(tar.extractfile(m).read())["vlm"] for m in tar.getmembers()
                            if m.name.endswith(".json")]
    return records


def _without_nulls(value: Any) -> Any:
    """A Parquet row as its JSONL record: the fields a record lacks are nulls in Parquet's fixed layout (a
    phrase's missing "box" and "peak" are nulls in both)."""
    if isinstance(value, dict):
        return {k: (v if k in ("box", "peak") else _without_nulls(v)) for k, v in value.items()
                if v is not None or k in ("box", "peak")}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


class ChunkWriter(BasePredictionWriter):
    """Writes each chunk's records as its batches come, and commits the chunk when its last batch is done; at the
    end the first process gathers manifest.json and errors.jsonl."""

    def __init__(self, out: Path, fmt: str, chunks: list[Chunk], job: dict):
        super().__init__(write_interval="batch")
        self.out, self.fmt, self.job = out, fmt, job
        self.chunks = {c.index: c for c in chunks}
        self.open: dict[int, _Sink] = {}
        self.pending: set[str] = set()
        """Chunks this run predicts (set by the data module)."""
        self.summary: dict | None = None
        self.seconds = {"write": 0.0}
        """Time this process spent writing records and committing chunks."""

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        started = time.perf_counter()
        chunk = batch["chunk"]
        sink = self.open.get(chunk) or self.open.setdefault(chunk, _Sink(self.out, self.chunks[chunk], self.fmt))
        for item, text in zip(batch["items"], prediction, strict=True):  # `record_text`s
            if item.empty:
                continue
            if text is None:
                sink.errors.append({**item.meta, "position": item.position, "error": item.error})
            else:
                sink.write(text, item)
        if batch["last"]:
            self.open.pop(chunk).commit()
        self.seconds["write"] += time.perf_counter() - started

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.open:  # a chunk whose last batch never came: the stream ended early
            raise VLMError(f"chunks {sorted(self.chunks[c].id for c in self.open)} ended without their last batch")
        trainer.strategy.barrier("vlm-predict-gather")
        if trainer.is_global_zero:
            self.summary = gather(self.out, list(self.chunks.values()), self.fmt, self.job, self.pending)


def gather(out: Path, chunks: list[Chunk], fmt: str, job: dict, pending: set[str]) -> dict:
    """manifest.json and errors.jsonl from every chunk's manifest entry; the job's summary."""
    entries = []
    for chunk in chunks:
        path = out / "manifest" / f"{chunk.id}.json"
        if path.exists() and (out / f"{chunk.id}{SUFFIX[fmt]}").exists():
            entries.append(json.loads(path.read_text()))
    errors = [{"chunk": e["chunk"], **err} for e in entries for err in e["errors"]]
    manifest = {"job": job, "complete": len(entries) == len(chunks), "chunks_total": len(chunks),
                "records": sum(e["records"] for e in entries), "errors": len(errors),
                "chunks": [{k: v for k, v in e.items() if k != "errors"} | {"errors": len(e["errors"])}
                           for e in entries]}
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    write_atomic(out / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    now = [e for e in entries if e["chunk"] in pending]
    return {"records": manifest["records"], "errors": len(errors), "chunks": len(entries),
            "chunks_total": len(chunks), "chunks_this_run": len(now),
            "records_this_run": sum(e["records"] for e in now),
            "errors_this_run": sum(len(e["errors"]) for e in now), "complete": manifest["complete"]}
