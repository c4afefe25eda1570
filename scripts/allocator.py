"""CPU inference with freed host memory kept for reuse (`vlm.allocator`) against the C library's defaults.

The setting is a process's, so every run is a fresh process (this script with --run), timed inside it from the model
loaded to the last caption; the two settings alternate over --reps runs of each (medians). Each side captions the
same --images PNG and JPEG files of mixed sizes (scripts/predict.py's), greedily, --new-tokens tokens each, in
batches of --batch-size, on all threads, with scripts/predict.py's two models (scripts/bench.py's and the default
one, random weights):

- loop: `Captioner.caption` over the paths (reading, then the model on the process's torch threads);
- predict: `vlm.predict.predict` over the folder (its default loader workers, one per core, which run the model);
- encode: `VisionLanguageModel.encode` alone over --encode-batches batches of random pixels (no reading): where the
  setting matters most.

Ratios: images/s with freed memory kept over images/s without (above 1: keeping it is faster).

    .venv/bin/python scripts/allocator.py     # ~8 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench import add_json_option, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict import make_images, our_model  # noqa: E402

SIDES = ("loop", "predict", "encode")
MODELS = ("bench", "default")


def run(side: str, model: Path, images: Path, kept: bool, args: argparse.Namespace) -> float:
    """Seconds of one side in this process, with freed memory kept or not."""
    import vlm.allocator
    from vlm.api import Captioner
    from vlm.config import DecodingConfig
    from vlm.data.transforms import input_size
    from vlm.predict import predict

    vlm.allocator.ENABLED = kept
    decoding = DecodingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    start = time.perf_counter()
    if side == "predict":
        predict(model, str(images), tempfile.mkdtemp(dir=images.parent), batch_size=args.batch_size,
                accelerator="cpu", devices=1, decoding=decoding, progress_every=10**9)
    else:
        captioner = Captioner.load(model, device="cpu")
        assert vlm.allocator.keep_freed_memory() == kept, "the setting was not applied as asked"
        if side == "loop":
            captioner.caption(sorted(str(p) for p in images.iterdir()), decoding, args.batch_size)
        else:
            pixels = torch.randn(args.batch_size, 3, *input_size(captioner.model.cfg.encoder.image_size))
            with torch.no_grad():
                for _ in range(args.encode_batches):
                    captioner.model.encode(pixels)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--encode-batches", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sides", default=",".join(SIDES), help="which of loop, predict, encode to run")
    parser.add_argument("--run", nargs=4, metavar=("SIDE", "MODEL", "IMAGES", "KEPT"), help=argparse.SUPPRESS)
    add_json_option(parser, "allocator")
    args = parser.parse_args()
    if args.run:
        side, model, images, kept = args.run
        print(run(side, Path(model), Path(images), kept == "1", args))
        return
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"bench": our_model(tmp), "default": our_model(tmp, default=True)}
        make_images(tmp / "images", args.images)
        seconds: dict[str, list[float]] = {}
        for r in range(args.reps):
            for side in sides:
                for name in MODELS:
                    for kept in ((False, True) if r % 2 == 0 else (True, False)):
                        out = subprocess.run(
                            [sys.executable, __file__, "--images", str(args.images), "--batch-size",
                             str(args.batch_size), "--new-tokens", str(args.new_tokens), "--encode-batches",
                             str(args.encode_batches), "--run", side, str(models[name]), str(tmp / "images"),
                             str(int(kept))], capture_output=True, text=True, check=True)
                        key = f"{side}_{name}_{'kept' if kept else 'default'}"
                        seconds.setdefault(key, []).append(float(out.stdout.strip().splitlines()[-1]))
    images = {"loop": args.images, "predict": args.images, "encode": args.encode_batches * args.batch_size}
    rates = {k: round(images[k.split("_")[0]] / statistics.median(v), 2) for k, v in seconds.items()}
    ratios = {f"{side}_{name}_kept_over_default": round(rates[f"{side}_{name}_kept"] / rates[f"{side}_{name}_default"],
                                                        3)
              for side in sides for name in MODELS}
    results = {"images_per_s": rates, "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()}}
    path = report(args.json, config=vars(args), results=results, ratios=ratios, threads=torch.get_num_threads())
    print(json.dumps({"images_per_s": rates, "ratios": ratios}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
