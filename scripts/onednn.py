"""oneDNN's float32 products (`vlm.model.linear`) against PyTorch's own (``F.linear``, MKL) on this CPU.

- products: one ``linear`` of each size (the rows x inputs x outputs of the default model's and of scripts/bench.py's
  layers, rows from 1 to 2048) on 1 and on all threads, both ways alternated (--reps, medians): oneDNN's speed-up,
  and the largest product (multiply-adds) that oneDNN lost (`vlm.model.linear.MIN_PRODUCT` should be above it);
- model: scripts/bench.py's model (the dimensions of scripts/predict.py's), encoding 32 images and greedily
  generating 16 tokens for them, with `vlm.model.linear.ENABLED` on and off (alternated, medians), in ms per image,
  and whether the tokens are the same; and a training step of it (32 images, captions of 24 tokens, forward,
  backward, AdamW) both ways, in ms, with the largest relative difference of their first steps' gradients.

    .venv/bin/python scripts/onednn.py     # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import add_json_option, alternate, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import build_ours  # noqa: E402

import vlm.model.linear as onednn  # noqa: E402
from vlm.config import DecodingConfig  # noqa: E402
from vlm.model.generate import generate  # noqa: E402

SHAPES = [(256, 256), (256, 768), (256, 1024), (1024, 256), (256, 1000), (384, 384), (384, 1536), (1536, 384),
          (768, 768), (768, 3072), (3072, 768)]
ROWS = [1, 2, 4, 8, 16, 32, 64, 256, 2048]


def products(threads: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    speedups = {}
    with torch.no_grad():
        for k, n in SHAPES:
            weight, bias = torch.randn(n, k), torch.randn(n)
            reordered = onednn.ReorderedWeight()
            for rows in ROWS:
                x = torch.randn(rows, k)
                calls = max(1, int(2e7 // (rows * k * n)))  # ~20 M multiply-adds a timed call

                def ours(x=x, weight=weight, bias=bias, reordered=reordered, calls=calls):
                    for _ in range(calls):
                        onednn.linear(x, weight, bias, reordered)

                def torchs(x=x, weight=weight, bias=bias, calls=calls):
                    for _ in range(calls):
                        F.linear(x, weight, bias)

                saved, onednn.MIN_PRODUCT = onednn.MIN_PRODUCT, 0  # every size through oneDNN
                try:
                    seconds = alternate({"onednn": ours, "torch": torchs}, reps)
                finally:
                    onednn.MIN_PRODUCT = saved
                speedups[(rows, k, n)] = round(seconds["torch"] / seconds["onednn"], 3)
    return speedups


def largest_losing_product(speedups: dict) -> int:
    """The most multiply-adds (rows x inputs x outputs) of a product that ran slower on oneDNN (0: none did)."""
    return max((rows * k * n for (rows, k, n), s in speedups.items() if s < 1), default=0)


def model_side(reps: int) -> dict:
    torch.manual_seed(0)
    model = build_ours(torch.device("cpu")).eval()
    pixels = torch.randn(32, 3, 128, 128)
    decoding = DecodingConfig(max_new_tokens=16, min_new_tokens=16)
    tokens = {}

    def run(on: bool):
        def step():
            onednn.ENABLED = on
            with torch.no_grad():
                image_kv, _ = model.encode(pixels)
                tokens[on] = generate(model, image_kv, [[1]] * len(pixels), eos_id=2, pad_id=0,
                                      config=decoding).tokens
        return step

    saved = onednn.ENABLED
    try:
        seconds = alternate({"onednn": run(True), "torch": run(False)}, reps)
    finally:
        onednn.ENABLED = saved
    return {"ms_per_image": {k: round(v * 1e3 / len(pixels), 3) for k, v in seconds.items()},
            "same_tokens": tokens[True] == tokens[False]}


def training_side(reps: int) -> dict:
    torch.manual_seed(0)
    model = build_ours(torch.device("cpu")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels, ids = torch.randn(32, 3, 128, 128), torch.randint(5, 1000, (32, 24))

    def gradients(on: bool) -> list[torch.Tensor]:
        onednn.ENABLED = on
        model.zero_grad()
        logits = model(pixels, ids).logits
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def run(on: bool):
        def step():
            gradients(on)
            optimizer.step()
        return step

    saved = onednn.ENABLED
    try:
        ours, theirs = gradients(True), gradients(False)
        difference = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs, strict=True) if b.norm() > 0)
        seconds = alternate({"onednn": run(True), "torch": run(False)}, reps)
    finally:
        onednn.ENABLED = saved
    return {"ms_per_step": {k: round(v * 1e3, 1) for k, v in seconds.items()},
            "largest_relative_gradient_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    add_json_option(parser, "onednn")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    speedups = {f"{t}_threads": products(t, args.reps) for t in sorted({1, cores})}
    torch.set_num_threads(cores)
    model, training = model_side(args.reps), training_side(args.reps)
    losing = {t: largest_losing_product(s) for t, s in speedups.items()}
    results = {"largest_losing_product": losing, "min_product": onednn.MIN_PRODUCT, "model": model,
               "training": training}
    ratios = {"model_onednn_vs_torch": round(model["ms_per_image"]["torch"] / model["ms_per_image"]["onednn"], 3),
              "training_onednn_vs_torch": round(training["ms_per_step"]["torch"] / training["ms_per_step"]["onednn"],
                                                3)}
    named = {t: {"x".join(map(str, size)): v for size, v in s.items()} for t, s in speedups.items()}
    path = report(args.json, config={"reps": args.reps, "shapes": SHAPES, "rows": ROWS}, results=results,
                  ratios=ratios, threads=cores, speedups=named)
    print(json.dumps({"results": results, "ratios": ratios}, indent=2))
    for t, s in named.items():
        print(f"\n{t}: oneDNN speed-up over F.linear (rows x inputs x outputs)")
        for key, v in s.items():
            print(f"  {key:<18}{v:>7.2f}")
    print(path)


if __name__ == "__main__":
    main()
