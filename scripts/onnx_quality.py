"""int8 quality of the ONNX export: the default model's held-out scene scores on ONNX Runtime, int8 against fp32.

    .venv/bin/python scripts/onnx_quality.py --model runs/default/model      # 500 held-out scenes

Exports the model twice with maps (`vlm export --format onnx --maps`, then with --quantize int8), scores the torch
model, the fp32 export and the int8 export with `vlm eval`'s built-in scoring (`vlm.eval.builtin.evaluate_builtin`:
greedy captions and answers, raw maps), and checks issue 21's bounds of int8 against fp32: CIDEr-D within 2%
relative, VQA accuracy within 1 point, pointing game within 0.02. The fp32 export's scores should equal torch's
(the same tokens up to float rounding). Exits non-zero when a bound is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _bench import add_json_option, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.api import load  # noqa: E402
from vlm.checkpoint import load_model  # noqa: E402
from vlm.config import MapConfig  # noqa: E402
from vlm.deploy.export import export_onnx  # noqa: E402
from vlm.eval.builtin import evaluate_builtin  # noqa: E402

BOUNDS = {"CIDEr-D": ("relative", 0.02), "VQA accuracy": ("absolute", 0.01), "pointing game": ("absolute", 0.02)}


def scores(captioner, num_scenes: int) -> dict[str, float]:
    metrics = evaluate_builtin(captioner, num_scenes=num_scenes, maps=MapConfig(method="raw"))
    return {"CIDEr-D": metrics["caption"]["CIDEr-D"], "VQA accuracy": metrics["vqa"]["accuracy"],
            "pointing game": metrics["grounding"]["pointing_game"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/model", help="exported model directory or .ckpt")
    parser.add_argument("--num-scenes", type=int, default=500, help="held-out scenes scored")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ONNX Runtime threads")
    add_json_option(parser, "onnx_quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"torch": scores(load(args.model, device="cpu"), args.num_scenes)}
    with tempfile.TemporaryDirectory() as folder:
        for name, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
            export_onnx(*load_model(args.model), Path(folder) / name, maps=True, quantize=quantize)
            results[name] = scores(load(Path(folder) / name, runtime="onnx", threads=args.threads), args.num_scenes)
    checks = {}
    for metric, (kind, bound) in BOUNDS.items():
        fp32, int8 = results["onnx_fp32"][metric], results["onnx_int8"][metric]
        gap = abs(int8 - fp32) / max(abs(fp32), 1e-12) if kind == "relative" else abs(int8 - fp32)
        checks[metric] = {"gap": gap, "bound": bound, "kind": kind, "ok": gap <= bound}
    config = {"model": args.model, "num_scenes": args.num_scenes, "maps": "raw", "decoding": "greedy"}
    out = report(args.json, config, results, {"int8_vs_fp32": {m: c["gap"] for m, c in checks.items()}},
                 threads=args.threads, checks=checks)
    print(f"{'metric':16} {'torch':>8} {'fp32':>8} {'int8':>8} {'gap':>8} {'bound':>8}")
    for metric, check in checks.items():
        row = [results[side][metric] for side in ("torch", "onnx_fp32", "onnx_int8")]
        print(f"{metric:16} " + " ".join(f"{v:8.4f}" for v in row) + f" {check['gap']:8.4f} {check['bound']:8.4f}"
              + ("" if check["ok"] else "  MISSED"))
    print(out)
    if not all(c["ok"] for c in checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
