"""Bounded load check of `vlm serve` on loopback: 8 concurrent clients x 50 requests, against 1 client.

Starts `vlm serve` on a free 127.0.0.1 port with the default trained model (runs/quality/model) if present,
else a tiny random one; each client sends caption and ask requests (alternating) for held-out built-in
scenes and checks every answer equals the Python API's. The two sides (8 clients at once, then 1 client
alone) alternate over --reps repetitions; reported: requests/s, p50/p95 latency (median over repetitions),
failed and wrong answers. Writes benchmarks/results/load_check.json (--json); the path is printed last.

    .venv/bin/python scripts/load_check.py [--model DIR] [--clients 8] [--requests 50] [--reps 3]
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from _bench import add_json_option, report

from vlm.api import Captioner, load
from vlm.config import DecoderConfig, EncoderConfig, ModelConfig
from vlm.data.builtin import scene_texts
from vlm.data.scenes import make_scene
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

DEFAULT_MODEL = Path("runs/quality/model")
NUM_SCENES = 16


def tiny_model(out: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(scene_texts(300, seed=0))
    cfg = ModelConfig(encoder=EncoderConfig(name="resnet18", feature_level=2, image_size=64,
                                            model_args={"channels": [8, 16, 32, 64]}),
                      decoder=DecoderConfig(width=32, depth=2, num_heads=4))
    return Captioner(VisionLanguageModel(cfg, len(tokenizer)).eval(), tokenizer, device="cpu").save(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vlm.cli", "serve", "--model", str(model), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/api/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"vlm serve did not start on {url}")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_requests(captioner: Captioner) -> list[dict]:
    """Caption and ask requests for held-out scenes, each with the answer the Python API gives."""
    scenes = [make_scene(i, "val", image_size=captioner.model.cfg.encoder.image_size) for i in range(NUM_SCENES)]
    captions = captioner.caption([s.image for s in scenes])
    answers = captioner.ask([s.image for s in scenes], [s.questions[0].question for s in scenes])
    out = []
    for scene, caption, answer in zip(scenes, captions, answers, strict=True):
        image = png(scene.image)
        out.append({"path": "/api/caption", "image": image, "data": {}, "key": "caption", "expected": caption})
        out.append({"path": "/api/ask", "image": image, "data": {"question": scene.questions[0].question},
                    "key": "answer", "expected": answer})
    return out


def client(url: str, requests: list[dict], first: int, count: int) -> list[tuple[float, str]]:
    """Send ``count`` requests in turn; (latency in s, "ok" | "failed" | "wrong") for each."""
    results = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for k in range(count):
            req = requests[(first + k) % len(requests)]
            start = time.perf_counter()
            try:
                r = http.post(req["path"], files={"image": ("scene.png", req["image"], "image/png")}, data=req["data"])
                status = "failed" if r.status_code != 200 else "ok" if r.json()[req["key"]] == req["expected"] \
                    else "wrong"
            except httpx.HTTPError:
                status = "failed"
            results.append((time.perf_counter() - start, status))
    return results


def run_side(url: str, requests: list[dict], clients: int, per_client: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda c: client(url, requests, c * 7, per_client), range(clients)))
    wall = time.perf_counter() - start
    latencies = np.array([t for results in done for t, _ in results])
    statuses = [s for results in done for _, s in results]
    return {"requests": len(statuses), "failed": statuses.count("failed"), "wrong": statuses.count("wrong"),
            "requests_per_s": len(statuses) / wall, "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p95_ms": float(np.percentile(latencies, 95) * 1000), "wall_s": wall}


def median_side(runs: list[dict]) -> dict:
    keys = ("requests_per_s", "p50_ms", "p95_ms", "wall_s")
    return {**{k: statistics.median(r[k] for r in runs) for k in keys},
            "requests": sum(r["requests"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "wrong": sum(r["wrong"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported model (default: runs/quality/model, else tiny)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--reps", type=int, default=3)
    add_json_option(parser, "load_check")
    args = parser.parse_args()

    model = Path(args.model) if args.model else DEFAULT_MODEL if DEFAULT_MODEL.is_dir() else \
        tiny_model(Path("runs/bench/load_check_tiny_model"))
    requests = make_requests(load(model, device="cpu"))
    proc, url = start_server(model)
    try:
        client(url, requests, 0, 4)  # warm-up
        sides: dict[str, list[dict]] = {"concurrent": [], "single": []}
        for _ in range(args.reps):
            sides["concurrent"].append(run_side(url, requests, args.clients, args.requests))
            sides["single"].append(run_side(url, requests, 1, args.requests))
    finally:
        proc.terminate()
        proc.wait(30)

    results = {name: median_side(runs) for name, runs in sides.items()}
    path = report(
        args.json,
        config={"model": str(model), "clients": args.clients, "requests_per_client": args.requests,
                "reps": args.reps, "mix": "caption and ask alternating, greedy", "server": "vlm serve, loopback"},
        results=results,
        ratios={"requests_per_s_concurrent_vs_single": results["concurrent"]["requests_per_s"]
                / results["single"]["requests_per_s"]},
    )

    print(f"\n{'side':<28}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'failed':>8}{'wrong':>7}")
    for name, label in (("concurrent", f"{args.clients} clients x {args.requests}"), ("single", "1 client")):
        r = results[name]
        print(f"{label:<28}{r['requests_per_s']:>8.1f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['failed']:>8}"
              f"{r['wrong']:>7}")
    print(path)
    if any(r["failed"] or r["wrong"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
