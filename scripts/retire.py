"""What retiring ended images saves the decoding loop: `vlm.model.generate.decode` with and without ``retire``.

A trained captioner's texts differ in length from image to image (on the built-in scenes, a caption has 4 to 21
words, by the number of objects), and a batch decodes until its longest text ends. Without retiring, every ended
row still runs in each later step, as free padding; with it, an image whose rows have all ended leaves the backend
once a quarter of the images it holds have, so the later steps run fewer rows.

The model: the default model (`ModelConfig()`) trained by `vlm train` on the built-in scenes for --steps steps (or
--model DIR). Images: --images held-out scenes (`make_scene(i, "val")`), encoded once, in batches of --batch-size.
Timed: the decoding alone (`decode` with the torch backend, caption prompts, the default decoding options but
``beam_size``), greedy and with --beam beams, each with and without retiring, alternated over --reps repetitions
(medians), on the process's torch threads. Reported: images/s of each, the ratio (retiring over not), the share of
row-steps that retiring runs (rows summed over the steps, against every row in every step), and the texts' lengths
in tokens (mean, least, most, and the mean over batches of a batch's longest).
The two sides' tokens are checked equal.

    .venv/bin/python scripts/retire.py                   # about 3.5 minutes on 2 cores, most of it training
    .venv/bin/python scripts/retire.py --steps 5 --images 64 --reps 1 --json /tmp/r.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _bench import add_json_option, alternate, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.api import Captioner  # noqa: E402
from vlm.config import DecodingConfig  # noqa: E402
from vlm.data.scenes import make_scene  # noqa: E402
from vlm.model.generate import TorchDecoder, decode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class CountingDecoder(TorchDecoder):
    """The torch backend, summing the rows of its steps."""

    row_steps = 0

    def step(self, ids, *args):
        self.row_steps += len(ids)
        return super().step(ids, *args)


def train(out: Path, steps: int) -> Path:
    subprocess.run([sys.executable, "-m", "vlm.cli", "train", "--out", str(out), "--trainer.max_steps", str(steps)],
                   cwd=ROOT, check=True, capture_output=True)
    return out / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a trained model directory (default: train one, --steps)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the default model")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    add_json_option(parser, "retire")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else train(Path(tmp) / "run", args.steps)
        captioner = Captioner.load(model_dir, device="cpu")
    model, tokenizer = captioner.model, captioner.tokenizer
    images = [make_scene(i, "val").image for i in range(args.images)]  # the transform resizes them for the model
    with torch.no_grad():
        batches = [model.encode(torch.stack([captioner.transform(im) for im in images[i:i + args.batch_size]]))[0]
                   for i in range(0, len(images), args.batch_size)]
    prompt = captioner.caption_prompt()
    decodings = {"greedy": DecodingConfig(), "beam": DecodingConfig(beam_size=args.beam)}

    def run(decoding: DecodingConfig, retire: bool, backend=TorchDecoder) -> tuple[list[list[int]], int]:
        tokens, row_steps = [], 0
        for image_kv in batches:
            decoder = backend(model, image_kv)
            out = decode(decoder, [prompt] * len(image_kv[0][0]), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         config=decoding, retire=retire)
            tokens += out.tokens
            row_steps += getattr(decoder, "row_steps", 0)
        return tokens, row_steps

    results, ratios, lengths = {}, {}, {}
    for name, decoding in decodings.items():
        (full_tokens, full_steps), (tokens, steps) = (run(decoding, r, CountingDecoder) for r in (False, True))
        assert tokens == full_tokens, f"{name}: retiring changed the texts"
        ratios[f"{name}_row_steps_retiring_over_all"] = round(steps / full_steps, 3)
        counts = [len(t) for t in tokens]
        per_batch_longest = [max(counts[i:i + args.batch_size]) for i in range(0, len(counts), args.batch_size)]
        lengths[name] = {"mean": round(statistics.mean(counts), 2), "min": min(counts), "max": max(counts),
                         "mean_longest_of_a_batch": round(statistics.mean(per_batch_longest), 2)}
        seconds = alternate({"all_rows": lambda d=decoding: run(d, False), "retiring": lambda d=decoding: run(d, True)},
                            reps=args.reps)
        results[f"{name}_images_per_s"] = round(args.images / seconds["all_rows"], 1)
        results[f"{name}_retiring_images_per_s"] = round(args.images / seconds["retiring"], 1)
        ratios[f"{name}_retiring_over_all_rows"] = round(seconds["all_rows"] / seconds["retiring"], 3)
    config = {**vars(args), "model": args.model or f"default, trained {args.steps} steps"}
    results["tokens"] = lengths
    path = report(args.json, config=config, results=results, ratios=ratios, threads=torch.get_num_threads())
    print(json.dumps({"results": results, "ratios": ratios}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
