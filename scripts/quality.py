"""Quality of the default run: train with `vlm train` (timed), then score 500 held-out built-in scenes.

    python scripts/quality.py                      # trains the default model (about 15 minutes), then scores it
    python scripts/quality.py --model runs/x/model # scores an existing model

Targets (issue 2): training within 15 minutes on 2 CPU cores, VQA accuracy >= 0.90, caption
CIDEr-D >= 1.5, pointing-game accuracy >= 0.80. Writes benchmarks/results/quality.json (--json); the path
is printed last.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from _bench import add_json_option, print_results, report

from vlm import load
from vlm.eval.builtin import evaluate_builtin

TARGETS = {"train_minutes": 15.0, "vqa_accuracy": 0.90, "CIDEr-D": 1.5, "pointing_game": 0.80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Score this model instead of training the default one.")
    parser.add_argument("--out", default="runs/quality", help="Training output directory.")
    parser.add_argument("--num-scenes", type=int, default=500)
    add_json_option(parser, "quality")
    parser.add_argument("train_args", nargs="*", help="Extra `vlm train` arguments (after --).")
    args = parser.parse_args()

    train_seconds = train_steps = None
    model_dir = args.model
    if model_dir is None:
        command = [sys.executable, "-m", "vlm.cli", "train", "--out", args.out, *args.train_args]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        train_seconds = time.perf_counter() - start
        model_dir = str(Path(args.out) / "model")
        last = torch.load(Path(args.out) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        train_steps = last["global_step"]  # the recipe stops at max_steps or max_time, whichever comes first

    start = time.perf_counter()
    metrics = evaluate_builtin(load(model_dir, device="cpu"), num_scenes=args.num_scenes)
    eval_seconds = time.perf_counter() - start
    results = {
        "train_minutes": None if train_seconds is None else train_seconds / 60,
        "train_steps": train_steps,
        "eval_seconds": eval_seconds,
        "vqa_accuracy": metrics["vqa"]["accuracy"],
        "CIDEr-D": metrics["caption"]["CIDEr-D"],
        "BLEU-4": metrics["caption"]["BLEU-4"],
        "pointing_game": metrics["grounding"]["pointing_game"],
        "mass_in_box": metrics["grounding"]["mass_in_box"],
        **{k: v for k, v in metrics["vqa"].items() if k != "accuracy"},
        "identical_captions": metrics["caption"]["identical_share"],
    }
    path = report(args.json, config={"model": model_dir, "num_scenes": args.num_scenes, "train_args": args.train_args},
                  results=results, targets=TARGETS)

    print_results(results, TARGETS)
    print(path)


if __name__ == "__main__":
    main()
