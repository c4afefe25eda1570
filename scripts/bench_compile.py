"""Does ``optim.compile`` (torch.compile of encoder and decoder) speed up a training step of the default model?

    .venv/bin/python scripts/bench_compile.py --threads 1    # about 8 minutes on 2 cores, mostly compiling

Two copies of the default model with the same weights, one compiled in place as ``optim.compile`` does,
train on the same batch (64 images, 7 sequences of 20 tokens each); forward and backward steps alternate
over --reps repetitions after one warm-up each (the compiled one's warm-up is the compile time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import add_json_option, alternate, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.config import ModelConfig  # noqa: E402
from vlm.model.vlm import VisionLanguageModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per side")
    add_json_option(parser, "compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 200
    models = {"eager": VisionLanguageModel(ModelConfig(), vocab), "compiled": VisionLanguageModel(ModelConfig(), vocab)}
    models["compiled"].load_state_dict(models["eager"].state_dict())
    models["compiled"].encoder.compile()
    models["compiled"].decoder.compile()
    images, ids = torch.randn(64, 3, 64, 64), torch.randint(0, vocab, (64 * 7, 20))

    def step(model) -> None:
        logits = model(images, ids).logits  # (S, T, V)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    start = time.perf_counter()
    step(models["compiled"])
    compile_s = time.perf_counter() - start
    seconds = alternate({name: (lambda m=model: step(m)) for name, model in models.items()}, args.reps)
    results = {"first_compiled_step_s": compile_s, **{f"{n}_step_s": s for n, s in seconds.items()}}
    out = report(args.json, config={"model": "default", "images": 64, "sequences": 64 * 7, "tokens": 20,
                                    "reps": args.reps},
                 results=results, ratios={"compiled_steps_per_s_vs_eager": seconds["eager"] / seconds["compiled"]},
                 threads=args.threads)
    print(f"first compiled step (compiling): {compile_s:.0f} s")
    print(f"{'step':10} {'eager':>8} {'compiled':>9}")
    print(f"{'seconds':10} {seconds['eager']:8.3f} {seconds['compiled']:9.3f}")
    print(out)


if __name__ == "__main__":
    main()
