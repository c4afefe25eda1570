"""Benchmark: memory of the training data at COCO scale, the process tree's PSS over one epoch with forked workers.

Writes synthetic annotations in the official VQA v2 layout at VQA v2 train's scale (434k questions x 10 answers
over 118k images; every image is one tiny JPEG, hard-linked, so that reading images costs little), reads them as
training does (`SourceData` -> `DataModule`), and runs one full epoch of the training data loader with 4
workers, sampling the proportional set size (PSS: each page divided among the processes sharing it) of the main
process and its workers. "main alone" is the main process's PSS once the data is built, before the workers start.

Two sides, each in a fresh process, one after the other (memory does not drift as speed does; one run each):
- flat: the records as training keeps them, `FlatRecords` (one byte buffer of pickles + offsets);
- list: the same records as a Python list of `Record`s (the storage before), at ``--list-scale`` of the size by
  default, as the list side grows by about the records' size per worker (several GB at full scale).
Target: the flat side's peak tree PSS within 1.3x of its main process alone. PSS also counts shared libraries
divided among every process on the machine that maps them, so the anonymous part (Pss_Anon: heaps, records) is
reported beside it.

    python scripts/memory.py [--scale 1.0] [--list-scale 0.25] [--workers 4] [--batch-size 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import psutil
from _bench import add_json_option, report
from PIL import Image

IMAGES, QUESTIONS, ANSWERS = 118_287, 434_000, 10
LINKS_PER_FILE = 50_000  # ext4 allows 65,000 links to one inode
WORDS = ("red", "blue", "dog", "cat", "table", "man", "woman", "car", "tree", "sign", "plate", "bus", "kite", "ball")


def write_vqa(folder: Path, scale: float) -> dict[str, str]:
    """Official-layout VQA v2 train files of ``scale`` x the real size, and an image folder of hard links."""
    rng = np.random.default_rng(0)
    images, questions = max(1, round(IMAGES * scale)), max(1, round(QUESTIONS * scale))
    (folder / "images").mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(jpeg, format="JPEG")
    for image_id in range(1, images + 1):
        path = folder / "images" / f"COCO_train2014_{image_id:012d}.jpg"
        if (image_id - 1) % LINKS_PER_FILE == 0:  # a file system allows only so many links to one file
            first = path
            first.write_bytes(jpeg.getvalue())
        else:
            os.link(first, path)
    image_of = np.sort(np.concatenate([np.arange(1, images + 1), rng.integers(1, images + 1, questions - images)]))
    words = rng.integers(len(WORDS), size=(questions, 6))
    answer_words = rng.integers(len(WORDS), size=(questions, ANSWERS))
    qs, anns = [], []
    for qid, (image_id, w, a) in enumerate(zip(image_of.tolist(), words.tolist(), answer_words.tolist(), strict=True)):
        text = f"what is the {WORDS[w[0]]} {WORDS[w[1]]} next to the {WORDS[w[2]]} {qid} {WORDS[w[3]]}?"
        qs.append(json.dumps({"image_id": image_id, "question": text, "question_id": qid}))
        answers = ", ".join(json.dumps({"answer": WORDS[k], "answer_confidence": "yes", "answer_id": n + 1})
                            for n, k in enumerate(a))
        anns.append(f'{{"question_id": {qid}, "image_id": {image_id}, "question_type": "what is the", '
                    f'"answer_type": "other", "multiple_choice_answer": "{WORDS[a[0]]}", "answers": [{answers}]}}')
    (folder / "questions.json").write_text('{"data_subtype": "train2014", "questions": [' + ", ".join(qs) + "]}")
    (folder / "annotations.json").write_text('{"data_subtype": "train2014", "annotations": ['
                                             + ", ".join(anns) + "]}")
    return {"path": str(folder / "questions.json"), "annotations": str(folder / "annotations.json"),
            "images": str(folder / "images")}


def memory(process: psutil.Process) -> tuple[int, int]:
    """(PSS, anonymous PSS) of one process, in bytes."""
    pss = process.memory_full_info().pss
    anon = 0
    with open(f"/proc/{process.pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Anon:"):
                anon = int(line.split()[1]) * 1024
    return pss, anon


def tree_memory() -> tuple[int, int, int]:
    """(PSS, anonymous PSS) summed over this process and its children, and the number of processes."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    totals = [0, 0]
    for p in processes:
        try:
            for k, v in enumerate(memory(p)):
                totals[k] += v
        except psutil.NoSuchProcess:
            continue
    return totals[0], totals[1], len(processes)


def run_side(side: str, files: dict[str, str], fraction: float, workers: int, batch_size: int) -> dict:
    """One epoch of the training loader on the records stored as ``side``; what memory it took."""
    from torchvision.transforms.functional import pil_to_tensor

    from vlm.config import DataConfig, SourceConfig
    from vlm.data.datasets import SourceData
    from vlm.data.module import DataModule
    from vlm.text.tokenizer import Tokenizer

    start = time.perf_counter()
    source = SourceConfig(files["path"], images=files["images"], annotations=files["annotations"])
    cfg = DataConfig(sources=[source], batch_size=batch_size, num_workers=workers, questions_per_image=2)
    train = SourceData(cfg.sources, strict=True)
    if side == "list":
        train.records[0] = list(islice(train.records[0], max(1, round(len(train.records[0]) * fraction))))
    tokenizer = Tokenizer.train(train.texts(50_000))
    data = DataModule(cfg, tokenizer, pil_to_tensor, 64, train_data=train)  # 64: unused (no boxes, no cache)
    dataset = data.train_set.datasets[0]
    if side == "list":
        dataset.records = train.records[0]  # the storage before: a list of Record objects
    assert isinstance(dataset.records, list) == (side == "list")
    read_s = time.perf_counter() - start
    main_alone, main_alone_anon, _ = tree_memory()
    samples = []
    start = time.perf_counter()
    loader = data.train_dataloader()
    steps = 0
    for steps, _ in enumerate(loader, 1):
        if steps % 50 == 0:
            samples.append(tree_memory())
    samples.append(tree_memory())  # at the end of the epoch, workers still alive (persistent)
    epoch_s = time.perf_counter() - start
    peak = max(samples)
    return {"side": side, "records": len(dataset), "questions": sum(len(r.questions) for r in dataset.records),
            "steps": steps, "read_s": read_s, "epoch_s": epoch_s, "processes": peak[2],
            "main_alone_pss_mb": main_alone / 2**20, "main_alone_anon_pss_mb": main_alone_anon / 2**20,
            "tree_pss_peak_mb": peak[0] / 2**20, "tree_anon_pss_peak_mb": max(s[1] for s in samples) / 2**20,
            "tree_pss_end_mb": samples[-1][0] / 2**20,
            "tree_pss_mb_every_50_steps": [round(s[0] / 2**20) for s in samples],
            "tree_vs_main_alone": peak[0] / main_alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="of VQA v2 train's size (434k questions)")
    parser.add_argument("--list-scale", type=float, default=0.25, help="of --scale, for the list side")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    add_json_option(parser, "memory")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_side(args.side, json.loads(args.files), args.list_scale if args.side == "list" else 1.0,
                          args.workers, args.batch_size)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="vlm_memory_") as work:
        start = time.perf_counter()
        files = write_vqa(Path(work), args.scale)
        write_s = time.perf_counter() - start
        sides = {}
        for side in ("flat", "list"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--files", json.dumps(files),
                                  "--list-scale", str(args.list_scale), "--workers", str(args.workers),
                                  "--batch-size", str(args.batch_size)], check=True, capture_output=True, text=True)
            sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
    flat, listed = sides["flat"], sides["list"]
    path = report(args.json, machine_extra={"memory_gb": round(psutil.virtual_memory().total / 2**30, 1)},
                  config={"scale": args.scale, "list_scale": args.list_scale, "workers": args.workers,
                          "batch_size": args.batch_size, "questions_per_image": 2, "answers_per_question": ANSWERS,
                          "write_s": write_s},
                  results=sides, ratios={"flat_tree_pss_vs_main_alone": flat["tree_vs_main_alone"],
                                         "list_tree_pss_vs_main_alone": listed["tree_vs_main_alone"],
                                         "flat_vs_list_tree_pss_vs_main_alone": flat["tree_vs_main_alone"]
                                         / listed["tree_vs_main_alone"]})
    print(f"{'side':6s} {'images':>8s} {'questions':>10s} {'main alone MB':>14s} {'tree peak MB':>13s} "
          f"{'anon peak MB':>13s} {'ratio':>6s} {'epoch s':>8s}")
    for s in (flat, listed):
        print(f"{s['side']:6s} {s['records']:8d} {s['questions']:10d} {s['main_alone_pss_mb']:14.0f} "
              f"{s['tree_pss_peak_mb']:13.0f} {s['tree_anon_pss_peak_mb']:13.0f} {s['tree_vs_main_alone']:6.2f} "
              f"{s['epoch_s']:8.1f}")
    print(f"target: flat tree PSS within 1.3x of the main process alone: {flat['tree_vs_main_alone']:.2f}x")
    print(path)


if __name__ == "__main__":
    main()
