"""`vlm predict` throughput against a plain loop over `Captioner.caption` and against transformers' generation.

Our model and transformers' VisionEncoderDecoder are those of scripts/bench.py (same dimensions, random weights;
ours with a 1000-word tokenizer, `words`); the default model is `ModelConfig()`'s (random weights, the same tokenizer).
Images: --images PNG and JPEG files of mixed sizes on disk. Every side generates exactly --new-tokens tokens per
image (the end token forbidden before), greedy, batches of --batch-size.

- predict: `vlm.predict.predict` in this process (one device, --workers loader workers, which on the CPU run the
  model too; default: one per core), with and without --maps;
- loop: `Captioner.caption` over the same paths in batches of the same size (decoding in the main process);
- predict_default, loop_default: the same two with the default model (the issue's comparison with the loop);
- predict_onnx, loop_onnx: the same two on ONNX Runtime (`runtime="onnx"`), the model exported with
  `vlm export --format onnx` (--onnx 0 leaves them out);
- hf: what transformers' image-to-text pipeline did (it is gone from transformers 5): ViTImageProcessor in
  batches, `generate`, `batch_decode`, on the HF VisionEncoderDecoder;
- scaling: `vlm predict` as a command on 1 and on 2 CPU processes (DDP), wall time including start-up (medians
  of --reps runs of each, alternated);
- sharing the cores: the default model's predict with its default workers and with one worker, alternated (--reps
  pairs): the median over the pairs of the two workers' stage time (reading, the model, the records, summed over the
  workers) over the one worker's, for the same images: what running side by side on the 2 cores costs each;
- memory: the peak memory of a fresh process and its data-loader workers (which run the model) predicting each of
  --memory-images images: the main process's resident memory and each worker's private memory, so that the pages a
  worker shares with it (the weights, the libraries) count once (`PeakTreeMemory`);
- ceilings: each ratio's roofline bound, the other side's time per image over the least time one image can take on
  this machine (`least_seconds_per_image`: its model FLOPs at the matmul peak, plus its image reading, from the loop's
  profile, shared out over the cores); the predict_onnx ratios' at ONNX Runtime's own matmul peak where that is
  higher (bench.py's `onnx_matmul_peak`);
- profile (its own section): where the time goes, in seconds per 1,000 images. predict: its own stage timers
  (the summary's ``profile``, `vlm.predict.run.profile`) from the last timed run with and without maps: wall
  time, then the busy time of each stage summed over the processes that ran it (reading and the model in the
  data-loader workers, waiting and writing in the main process), so stages overlap and may add up to
  more than the wall.
  loop: the same stages of `Captioner.caption`'s work, timed one after the other by this script over the first
  --profile-images images (one batch at a time, the process's torch threads); loop_one_thread and
  loop_default_one_thread: the same on one torch thread.
- work bounds (their own section): each ratio's bound from measured work, the other side's time per image over the
  one-thread profile's time per image (reading, encoding, generating, decoding text) shared out over the cores: no
  schedule of that work on these cores (reading overlapped with the model, batches side by side) takes less, as one
  thread per core runs the products and the per-token operators at least as efficiently as a team does here (the
  loop's profiles: 2 threads take more core-seconds than 1).

    .venv/bin/python scripts/predict.py                                   # the issue's sizes
    .venv/bin/python scripts/predict.py --images 16 --memory-images 8,32 --reps 1 --json /tmp/p.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from _bench import add_json_option, alternate, paired_ratios, report
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DIMS, Side, build_hf, build_ours, generation_flops, matmul_peak, onnx_matmul_peak  # noqa: E402

from vlm.api import Captioner, load  # noqa: E402
from vlm.checkpoint import save_model  # noqa: E402
from vlm.cli import main as vlm  # noqa: E402
from vlm.config import DecodingConfig, ModelConfig  # noqa: E402
from vlm.data.images import load_image  # noqa: E402
from vlm.data.transforms import input_size  # noqa: E402
from vlm.model.vlm import VisionLanguageModel  # noqa: E402
from vlm.predict import predict  # noqa: E402
from vlm.predict.summary import STOP_WORDS  # noqa: E402
from vlm.text.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n images of mixed sizes (64 to 320 px a side), PNG and JPEG alternately."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(64, 321, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / f"{i:06d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def words(n: int) -> list[str]:
    """n words, those of `vlm.predict.summary.STOP_WORDS` among them, the rest made of letters: a caption of random
    tokens then has runs of content words, so that --maps boxes phrases as it does for a real captioner's text."""
    made = (a + b + c + d for a in "bdfgklmnprst" for b in "aeiou" for c in "bdfgklmnprst" for d in "aeiou")
    return [*sorted(STOP_WORDS), *(w for w in made if w not in STOP_WORDS)][:n]


def our_model(folder: Path, default: bool = False) -> Path:
    """scripts/bench.py's model, or with ``default`` the default model (`ModelConfig()`), and a 1000-word tokenizer,
    saved."""
    torch.manual_seed(0)
    model = (VisionLanguageModel(ModelConfig(), DIMS["vocab"]) if default else build_ours(torch.device("cpu"))).eval()
    tokenizer = Tokenizer.train([" ".join(words(DIMS["vocab"] - 5))], vocab_size=DIMS["vocab"])
    assert len(tokenizer) == DIMS["vocab"], len(tokenizer)
    return save_model(model, tokenizer, folder / ("default_model" if default else "model"))


def hf_side(paths: list[str], batch: int, new_tokens: int):
    from transformers import BertTokenizerFast, ViTImageProcessor

    model = build_hf(torch.device("cpu")).eval()
    processor = ViTImageProcessor(size={"height": DIMS["image"], "width": DIMS["image"]})
    tokenizer = BertTokenizerFast(vocab={f"w{i}": i for i in range(DIMS["vocab"])}, unk_token="w1", pad_token="w0")

    @torch.no_grad()
    def run():
        out = []
        for i in range(0, len(paths), batch):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
            pixels = processor(images=images, return_tensors="pt").pixel_values
            ids = model.generate(pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            out += tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out

    return run


def stage_seconds(profile: dict) -> float:
    """The work of a predict profile's workers: reading, the model and the records, summed over the workers."""
    return sum(profile.get(k, 0.0) for k in ("decode", "transform", "encode", "generate", "generate_and_maps", "maps",
                                              "records", "json"))


def per_thousand(seconds: dict, images: int) -> dict:
    return {k: round(v * 1000 / images, 3) if isinstance(v, float) else v for k, v in seconds.items()}


@torch.no_grad()
def loop_profile(captioner: Captioner, paths: list[str], decoding: DecodingConfig, batch: int,
                 threads: int | None = None) -> dict:
    """Seconds per 1,000 images of each stage of `Captioner.caption`'s work, one after the other, on ``threads``
    torch threads (default: the process's)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    seconds = dict.fromkeys(("decode", "transform", "encode", "generate", "text"), 0.0)
    start = captioner.caption_prompt()
    for i in range(0, len(paths), batch):
        t0 = time.perf_counter()
        images = [load_image(p) for p in paths[i:i + batch]]
        t1 = time.perf_counter()
        pixels = torch.stack([captioner.transform(im) for im in images])
        t2 = time.perf_counter()
        image_kv, _ = captioner.model.encode(pixels)
        t3 = time.perf_counter()
        gen = captioner._generate(image_kv, [start] * len(images), decoding)
        t4 = time.perf_counter()
        [captioner.tokenizer.decode(t) for t in gen.tokens]
        t5 = time.perf_counter()
        for stage, t in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            seconds[stage] += t
    profile = {"wall": round(sum(seconds.values()) * 1000 / len(paths), 3), **per_thousand(seconds, len(paths)),
               "torch_threads": torch.get_num_threads()}
    torch.set_num_threads(saved)
    return profile


def least_seconds_per_image(captioner: Captioner, reading_seconds: float, peak: float, args: argparse.Namespace
                             ) -> float:
    """The roofline bound of captioning one image on this machine: its model FLOPs (counted by FlopCounterMode over
    one batch's encoding and greedy decoding) at the matmul ``peak`` (FLOP/s), plus its image reading (decoding and
    resizing, ``reading_seconds`` on one thread: the loop's profile) shared out over every core. No job on these
    cores takes less: the products and the reading together use all of them."""
    side = Side("ours", captioner.model, torch.device("cpu"), nullcontext)
    pixels = torch.randn(args.batch_size, 3, *input_size(captioner.model.cfg.encoder.image_size))
    flops = generation_flops(side, pixels, args.new_tokens, 1) / args.batch_size
    return flops / peak + reading_seconds / (os.cpu_count() or 1)


def peak_memory(model: Path, folder: Path, out: Path, args: argparse.Namespace) -> float:
    """MiB of peak memory of a fresh process and its workers predicting every image of folder (`PeakTreeMemory`)."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'scripts')!r}]\n"
            "from vlm.predict import predict\nfrom vlm.config import DecodingConfig\n"
            "from _bench import PeakTreeMemory\nwith PeakTreeMemory() as memory:\n"
            f"    predict({str(model)!r}, {str(folder)!r}, {str(out)!r}, batch_size={args.batch_size}, "
            f"num_workers={args.workers}, accelerator='cpu', devices=1, decoding=DecodingConfig("
            f"max_new_tokens={args.new_tokens}, min_new_tokens={args.new_tokens}), progress_every=10**9)\n"
            "print(memory.peak)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 2**20


def cli_seconds(model: Path, folder: Path, out: Path, devices: int, args: argparse.Namespace) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "vlm.cli", "predict", "--model", str(model), "--input", str(folder), "--out",
               str(out), "--batch_size", str(args.batch_size),
               "--max_new_tokens", str(args.new_tokens), "--min_new_tokens", str(args.new_tokens),
               "--accelerator", "cpu", "--devices", str(devices), "--progress_every", str(10**9)]
    if args.workers is not None:  # else predict's default: the cores shared among the processes
        command += ["--num_workers", str(args.workers)]
    if devices > 1:
        command += ["--strategy", "ddp"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None,
                        help="vlm predict's --num_workers (default: its own, one per core on the CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--maps-reps", type=int, default=7,
                        help="pairs of runs (plain, --maps) whose median ratio is --maps' cost: 3 pairs of 2000 images "
                             "read 6-17%% on this machine within one session")
    parser.add_argument("--memory-images", default="1000,10000", help="image counts whose peak memory is compared")
    parser.add_argument("--profile-images", type=int, default=500, help="images of the loop's profile")
    parser.add_argument("--onnx", type=int, default=1, help="1: also predict and loop on ONNX Runtime")
    add_json_option(parser, "predict")
    args = parser.parse_args()
    decoding = DecodingConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, default_model = our_model(tmp), our_model(tmp, default=True)
        paths = make_images(tmp / "images", args.images)
        captioner, default_captioner = Captioner.load(model, device="cpu"), Captioner.load(default_model, device="cpu")
        runs = iter(range(10**6))
        profiles = {}

        def ours(maps: bool = False, runtime: str = "torch", default: bool = False, workers: int | None = None):
            def run():
                source = (default_model if default else model) if runtime == "torch" else tmp / "onnx"
                summary = predict(source, str(tmp / "images"),
                                  tmp / f"out{next(runs)}", batch_size=args.batch_size,
                                  num_workers=workers or args.workers, accelerator="cpu", devices=1,
                                  decoding=decoding, maps=maps, progress_every=10**9, runtime=runtime)
                profile = summary["profile"]
                profiles["predict" + ("_maps" if maps else "") + ("_onnx" if runtime == "onnx" else "")
                         + ("_default" if default else "") + ("_one_worker" if workers == 1 else "")] = {
                    "wall": round(summary["seconds"] * 1000 / args.images, 3),
                    **per_thousand({k: v for k, v in profile.items() if k != "workers"}, args.images),
                    "workers": profile["workers"],
                    "worker_torch_threads": 1}  # what PyTorch's DataLoader sets in each worker
            return run

        sides = {"predict": ours(), "loop": lambda: captioner.caption(paths, decoding, args.batch_size),
                 "hf": hf_side(paths, args.batch_size, args.new_tokens), "predict_default": ours(default=True),
                 "loop_default": lambda: default_captioner.caption(paths, decoding, args.batch_size)}
        if args.onnx:
            assert vlm(["export", "--model", str(model), "--format", "onnx", "--out", str(tmp / "onnx")]) == 0
            on_ort = load(tmp / "onnx", runtime="onnx")
            sides |= {"predict_onnx": ours(runtime="onnx"),
                      "loop_onnx": lambda: on_ort.caption(paths, decoding, args.batch_size)}
        seconds = alternate(sides, reps=args.reps)
        maps_ratios = paired_ratios(ours(), ours(maps=True), reps=args.maps_reps)
        sharing = []  # the same work's stage time in two workers side by side over one worker's alone
        for r in range(args.reps):
            for run in ((ours(default=True), ours(default=True, workers=1))[::1 if r % 2 == 0 else -1]):
                run()
            sharing.append(stage_seconds(profiles["predict_default"]) / stage_seconds(profiles[
                "predict_default_one_worker"]))
        profiles["loop"] = loop_profile(captioner, paths[:args.profile_images], decoding, args.batch_size)
        profiles["loop_default"] = loop_profile(default_captioner, paths[:args.profile_images], decoding,
                                                args.batch_size)
        profiles["loop_one_thread"] = loop_profile(captioner, paths[:args.profile_images], decoding, args.batch_size,
                                                   threads=1)
        profiles["loop_default_one_thread"] = loop_profile(default_captioner, paths[:args.profile_images], decoding,
                                                           args.batch_size, threads=1)
        reading = (profiles["loop"]["decode"] + profiles["loop"]["transform"]) / 1000
        peak = matmul_peak(torch.device("cpu"), args.reps)
        least = {"torch": least_seconds_per_image(captioner, reading, peak, args),
                 "default": least_seconds_per_image(default_captioner, (profiles["loop_default"]["decode"]
                                                                       + profiles["loop_default"]["transform"]) / 1000,
                                                    peak, args)}
        if args.onnx:  # the predict_onnx ratios' bound: products at ONNX Runtime's own peak where it beats torch's
            least["onnx"] = least_seconds_per_image(
                captioner, reading, max(peak, onnx_matmul_peak(os.cpu_count() or 1, args.reps, args.batch_size)), args)
        walls: dict[int, list[float]] = {1: [], 2: []}  # the two commands alternated, medians: one run can stall
        for r in range(args.reps):
            for d in ((1, 2) if r % 2 == 0 else (2, 1)):
                walls[d].append(cli_seconds(model, tmp / "images", tmp / f"cli{d}", d, args))
        scaling = {f"{d}_processes_s": statistics.median(w) for d, w in walls.items()}
        memory = {}  # image count -> MiB
        for n in (int(v) for v in args.memory_images.split(",")):
            make_images(tmp / f"memory{n}", n, seed=1)
            memory[n] = round(peak_memory(model, tmp / f"memory{n}", tmp / f"memory_out{n}", args), 1)
            shutil.rmtree(tmp / f"memory{n}")
    rates = {name: args.images / s for name, s in seconds.items()}
    results = {"images_per_s": {k: round(v, 2) for k, v in rates.items()},
               "maps_overhead": round(statistics.median(maps_ratios) - 1, 3),
               "maps_overhead_pairs": sorted(round(v - 1, 3) for v in maps_ratios),
               "scaling_wall_s": {k: round(v, 2) for k, v in scaling.items()},
               "peak_memory": {f"{n}_images_mib": mib for n, mib in memory.items()}}
    ratios = {"predict_default_over_loop_default": round(rates["predict_default"] / rates["loop_default"], 3),
              "predict_over_loop": round(rates["predict"] / rates["loop"], 3),
              "predict_over_hf": round(rates["predict"] / rates["hf"], 3),
              **({"predict_onnx_over_loop": round(rates["predict_onnx"] / rates["loop"], 3),
                  "predict_onnx_over_loop_onnx": round(rates["predict_onnx"] / rates["loop_onnx"], 3),
                  "predict_onnx_over_hf": round(rates["predict_onnx"] / rates["hf"], 3)} if args.onnx else {}),
              "two_over_one_process": round(scaling["1_processes_s"] / scaling["2_processes_s"], 3),
              "two_workers_stage_time_over_one": round(statistics.median(sharing), 3),
              "memory_growth": round(memory[max(memory)] / memory[min(memory)] - 1, 3) if len(memory) > 1 else None}
    # the ratios' roofline bounds: the other side's time over the least time an image can take here
    which = {"predict_onnx": "onnx", "predict_default": "default"}  # a ratio's least time: by its numerator
    ceilings = {k: round(1 / rates[k.split("_over_")[-1]] / least[which.get(k.split("_over_")[0], "torch")], 2)
                for k in ratios if k.split("_over_")[-1] in rates}
    work = {name: profiles[f"loop{name}_one_thread"]["wall"] / 1000 / (os.cpu_count() or 1)  # seconds per image
            for name in ("", "_default")}
    work_bounds = {k: round(1 / rates[k.split("_over_")[-1]] / work["_default" if "default" in k else ""], 2)
                   for k in ("predict_default_over_loop_default", "predict_over_loop", "predict_over_hf")}
    results["least_ms_per_image"] = round(least["torch"] * 1e3, 3)
    results["least_ms_per_image_default"] = round(least["default"] * 1e3, 3)
    if "onnx" in least:
        results["least_ms_per_image_onnx"] = round(least["onnx"] * 1e3, 3)
    profile = {"unit": "seconds per 1000 images", **profiles}
    path = report(args.json, config={**vars(args), "dims": DIMS}, results=results, ratios=ratios,
                  threads=torch.get_num_threads(), profile=profile, roofline_ratio_ceilings=ceilings,
                  work_ratio_bounds=work_bounds)
    print(json.dumps({"results": results, "ratios": ratios, "profile": profile}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
