"""One thread owns the model: requests wait in a queue, and concurrent caption or ask requests run as one batch."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from vlm.api import Captioner
from vlm.config import DecodingConfig
from vlm.grounding.ground import text_tokens_and_maps


@dataclass
class Job:
    """A request for the model thread: ``kind`` is caption, ask, attend or ground; ``args`` are the keyword
    arguments of its `Captioner` method for one image, with ``decoding`` (a DecodingConfig) for caption, ask and
    attend, and ``maps`` (a MapConfig) for attend and ground."""

    kind: str
    args: dict[str, Any]
    future: Future = field(default_factory=Future)


class ModelWorker:
    """Runs every model call on one thread, so the model is never used by two requests at once.

    A caption or ask job's result is its list of texts (num_samples of them, one unless it sampled several).
    Jobs that arrive while the model is busy are taken together: caption jobs whose whole DecodingConfig is
    equal go into one ``Captioner.caption`` call, ask jobs likewise into one ``Captioner.ask`` call (batched
    generation gives the same tokens as one image at a time, and each job's image keeps its own seed); attend
    and ground jobs run one by one.
    """

    def __init__(self, captioner: Captioner, max_batch: int = 16):
        self.captioner = captioner
        self.max_batch = max_batch
        self.batches: deque[tuple[str, int]] = deque(maxlen=1000)  # (kind, size) of recent model calls, newest last
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vlm-model", daemon=True)
        self._thread.start()

    def submit(self, kind: str, **args: Any) -> Future:
        """Queue a job; its future holds the result (or the exception the model call raised)."""
        if not self._thread.is_alive():
            raise RuntimeError("the model worker has stopped")
        job = Job(kind, args)
        self._queue.put(job)
        return job.future

    def pending(self) -> int:
        """Jobs waiting for the model thread."""
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, stop = [job], False
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            for group in _groups([j for j in jobs if j.future.set_running_or_notify_cancel()]):
                self._execute(group)
            if stop:
                return

    def _execute(self, group: list[Job]) -> None:
        kind, c = group[0].kind, self.captioner
        calls: dict[str, Callable[[list[Job]], list[Any]]] = {
            "caption": lambda js: _per_job(js, c.caption([j.args["image"] for j in js], _batched(js))),
            "ask": lambda js: _per_job(js, c.ask([j.args["image"] for j in js], [j.args["question"] for j in js],
                                                 _batched(js))),
            "attend": lambda js: [c.attend(**js[0].args)],
            "ground": lambda js: [text_tokens_and_maps(c, **js[0].args)],
        }
        try:
            self.batches.append((kind, len(group)))
            results = calls[kind](group)
        except Exception as e:  # one bad job must not fail the others of its batch
            if len(group) > 1:
                for job in group:
                    self._execute([job])
                return
            group[0].future.set_exception(e)
            return
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Caption and ask jobs grouped by kind and equal DecodingConfig, in order of arrival; the other jobs alone."""
    groups: list[list[Job]] = []
    for job in jobs:
        same = next((g for g in groups if job.kind in ("caption", "ask") and g[0].kind == job.kind
                     and g[0].args["decoding"] == job.args["decoding"]), None)
        if same is None:
            groups.append([job])
        else:
            same.append(job)
    return groups


def _batched(jobs: list[Job]) -> DecodingConfig:
    """The group's DecodingConfig for one call over all its images: a seed given as one int becomes that seed
    for every image, as each job would have had alone."""
    decoding: DecodingConfig = jobs[0].args["decoding"]
    return replace(decoding, seed=[decoding.seed] * len(jobs)) if isinstance(decoding.seed, int) else decoding


def _per_job(jobs: list[Job], texts: list[str]) -> list[list[str]]:
    """The group's texts split by job: each job's num_samples texts (one, unless it sampled several)."""
    k = jobs[0].args["decoding"].num_samples
    return [texts[i * k:(i + 1) * k] for i in range(len(jobs))]

