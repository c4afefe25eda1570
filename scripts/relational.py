"""Relational questions (issue 22): train with `vlm train` on the relational scenes, record the learning curve per
question kind, then score held-out relational scenes: VQA per kind and the pointing game of object phrases.

    python scripts/relational.py                           # trains configs/relational.yaml (about 30 minutes)
    python scripts/relational.py -- --trainer.max_steps 200 --model.encoder.context_layers 0   # a variant
    python scripts/relational.py --model runs/relational/model --no-curve   # scores an existing model

The learning curve is read from the run's validation logs (`val/vqa/accuracy/<kind>` at every
``trainer.val_check_interval`` steps, with the wall time since training started). The pointing game is printed
with the centre-point baseline beside it: the share of object phrases whose box holds the image's centre (a
map that always points at the middle). Targets (issue 22): relational kinds >= 0.94 overall and each >= 0.90,
non-relational >= 0.99, yes/no with negation >= 0.99, pointing >= 0.90, in one run of at most 30 minutes.
Writes benchmarks/results/relational.json (--json); the path is printed last.
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
from vlm.config import METHODS, MapConfig
from vlm.data.relational import NON_RELATIONAL_KINDS, RELATIONAL_KINDS, YES_NO_KINDS
from vlm.data.scenes import make_scene
from vlm.eval.builtin import evaluate_builtin
from vlm.eval.grounding import GroundingCase, pointing_by_choice

TARGETS = {"train_minutes": 30.0, "relational": 0.94, "relational_each_kind": 0.90, "non_relational": 0.99,
           "yes_no": 0.99, "pointing_game": 0.90}


def learning_curve(run_dir: Path) -> list[dict]:
    """Each validation of the run's last Lightning log: step, seconds since its first event, accuracy per kind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted((run_dir / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return []
    events = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("val/vqa/accuracy")]
    start = min((e.wall_time for t in events.Tags()["scalars"] for e in events.Scalars(t)), default=0.0)
    curve: dict[int, dict] = {}
    for tag in tags:
        for e in events.Scalars(tag):
            point = curve.setdefault(e.step, {"step": e.step, "seconds": round(e.wall_time - start, 1)})
            point[tag.removeprefix("val/vqa/").replace("accuracy/", "")] = round(e.value, 4)
    return [curve[s] for s in sorted(curve)]


def group_means(vqa: dict[str, float]) -> dict[str, float]:
    """Mean accuracy of each group of kinds (each kind weighted equally), and the weakest relational kind."""
    out = {}
    for name, kinds in (("relational", RELATIONAL_KINDS), ("non_relational", NON_RELATIONAL_KINDS),
                        ("yes_no", YES_NO_KINDS)):
        values = [vqa[f"accuracy/{k}"] for k in kinds if f"accuracy/{k}" in vqa]
        out[name] = sum(values) / len(values) if values else float("nan")
    out["relational_each_kind"] = min((vqa[f"accuracy/{k}"] for k in RELATIONAL_KINDS if f"accuracy/{k}" in vqa),
                                      default=float("nan"))
    return out


def centre_baseline(num_scenes: int, image_size: int) -> float:
    """Pointing game of a map that always points at the image's centre, over every object of the scenes."""
    hits = [x <= image_size / 2 <= x + w and y <= image_size / 2 <= y + h
            for i in range(num_scenes) for (x, y, w, h) in
            (o.box for o in make_scene(i, "val", 0, image_size, "relational").objects)]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/relational.yaml", help="`vlm train` config (default: %(default)s)")
    parser.add_argument("--model", help="Score this model instead of training one.")
    parser.add_argument("--out", default="runs/relational", help="Training output directory.")
    parser.add_argument("--num-scenes", type=int, default=500, help="Held-out scenes to score.")
    parser.add_argument("--no-curve", action="store_true", help="Do not read a learning curve from --out.")
    add_json_option(parser, "relational")
    parser.add_argument("train_args", nargs="*", help="Extra `vlm train` arguments (after --).")
    args = parser.parse_args()

    train_seconds = train_steps = None
    model_dir = args.model
    if model_dir is None:
        command = [sys.executable, "-m", "vlm.cli", "train", "--config", args.config, "--out", args.out,
                   *args.train_args]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        train_seconds = time.perf_counter() - start
        model_dir = str(Path(args.out) / "model")
        last = torch.load(Path(args.out) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        train_steps = last["global_step"]
    curve = [] if args.no_curve else learning_curve(Path(args.out))

    captioner = load(model_dir, device="cpu")
    size = captioner.model.cfg.encoder.image_size
    metrics = evaluate_builtin(captioner, num_scenes=args.num_scenes, scenes="relational")
    scenes = [make_scene(i, "val", 0, size, "relational") for i in range(args.num_scenes)]
    cases = [GroundingCase(s.image, [(o.phrase, o.box) for o in s.objects], s.captions[0]) for s in scenes]
    pointing = dict(zip(METHODS, pointing_by_choice(captioner, cases, [MapConfig(m) for m in METHODS]),
                        strict=True))
    vqa = metrics["vqa"]
    results = {
        "train_minutes": None if train_seconds is None else train_seconds / 60,
        "train_steps": train_steps,
        **group_means(vqa),
        **{k.replace("accuracy/", ""): v for k, v in vqa.items()},
        "pointing_game": max(pointing.values()),
        **{f"pointing_game/{m}": v for m, v in pointing.items()},
        "pointing_game/centre_baseline": centre_baseline(args.num_scenes, size),
        "mass_in_box": metrics["grounding"]["mass_in_box"],
        "CIDEr-D": metrics["caption"]["CIDEr-D"],
    }
    path = report(args.json, config={"config": args.config, "model": model_dir, "num_scenes": args.num_scenes,
                                     "train_args": args.train_args},
                  results=results, targets=TARGETS, curve=curve)

    if curve:
        kinds = [k for k in curve[-1] if k not in ("step", "seconds")]
        print("\nlearning curve (held-out accuracy per kind)")
        print(f"{'step':>6}{'s':>8}" + "".join(f"{k[:10]:>11}" for k in kinds))
        for point in curve:
            print(f"{point['step']:>6}{point['seconds']:>8.0f}"
                  + "".join(f"{point.get(k, float('nan')):>11.3f}" for k in kinds))
    print_results(results, TARGETS, width=32)
    print(path)


if __name__ == "__main__":
    main()
