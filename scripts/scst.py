"""SCST on the built-in scenes: CIDEr-D of the cross-entropy model before and after self-critical training.

    python scripts/scst.py                               # from runs/quality/model, about 3 minutes of SCST
    python scripts/scst.py --init runs/x/model --minutes 10 --baseline mean

Runs `vlm train --config configs/scst.yaml --init MODEL` for a fixed wall time, then scores the starting
and the final model on the same held-out scenes (vlm/eval/builtin.py). SCST's reward is pycocoevalcap's
CIDEr-D with document frequencies from the training references; its samples come from the one decoding
loop, seeded per image. Writes benchmarks/results/scst.json (--json); the path is printed last.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _bench import add_json_option, report

from vlm import load
from vlm.eval.builtin import evaluate_builtin


def _scores(model_dir: str, num_scenes: int) -> dict[str, float]:
    metrics = evaluate_builtin(load(model_dir, device="cpu"), num_scenes=num_scenes)
    return {"CIDEr-D": metrics["caption"]["CIDEr-D"], "BLEU-4": metrics["caption"]["BLEU-4"],
            "vqa_accuracy": metrics["vqa"]["accuracy"], "identical_captions": metrics["caption"]["identical_share"],
            "pointing_game": metrics["grounding"]["pointing_game"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="runs/quality/model", help="Cross-entropy model to start from.")
    parser.add_argument("--out", default="runs/bench/scst_run", help="SCST training output directory.")
    parser.add_argument("--minutes", type=float, default=3.0, help="Wall time of SCST fitting.")
    parser.add_argument("--baseline", default="greedy", choices=["greedy", "mean"])
    parser.add_argument("--num-scenes", type=int, default=200, help="Held-out scenes scored before and after.")
    add_json_option(parser, "scst")
    args = parser.parse_args()

    seconds = int(args.minutes * 60)
    command = [sys.executable, "-m", "vlm.cli", "train", "--config", "configs/scst.yaml", "--init", args.init,
               "--out", args.out, "--scst.baseline", args.baseline,
               "--trainer.max_time", f"00:00:{seconds // 60:02d}:{seconds % 60:02d}", "--val.samples", "0"]
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run: its step count is this run's
    start = time.perf_counter()
    subprocess.run(command, check=True)
    train_seconds = time.perf_counter() - start
    steps = torch.load(Path(args.out) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]

    before = _scores(args.init, args.num_scenes)
    after = _scores(str(Path(args.out) / "model"), args.num_scenes)
    path = report(args.json,
                  config={"init": args.init, "command": command, "num_scenes": args.num_scenes,
                          "baseline": args.baseline, "minutes": args.minutes},
                  results={"scst_steps": steps, "scst_seconds": train_seconds, "before": before, "after": after},
                  ratios={"CIDEr-D_scst_vs_xe": after["CIDEr-D"] / before["CIDEr-D"]})

    print(f"\nSCST: {steps} steps in {train_seconds / 60:.1f} min (baseline: {args.baseline})")
    print(f"{'metric (' + str(args.num_scenes) + ' held-out scenes)':<36}{'XE':>8}{'XE+SCST':>10}")
    for key in before:
        print(f"{key:<36}{before[key]:>8.3f}{after[key]:>10.3f}")
    print(path)


if __name__ == "__main__":
    main()
