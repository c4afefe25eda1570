"""Write docs/results.md from the benchmark reports under benchmarks/results/: one section per report found.

    .venv/bin/python scripts/results_page.py      # after re-running benchmarks; commit the page with the reports

Each section gives the command that wrote the report (as recorded in it), what is measured, the figures, the
commit, the date and the machine (with its load average), and links the JSON. A benchmark without a report
gets no section, so the page never cites evidence that is not in the repository.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlm.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"

INTRO = """# Measured results

Every figure on this page comes from a script under `scripts/`, run from the repository root, which writes a JSON
report to [`benchmarks/results/`](../benchmarks/results/); the reports are committed beside this page, and
`scripts/results_page.py` writes this page from them. A report records the command line, the commit it ran on
(the short `git rev-parse HEAD` when the run started; "+ uncommitted changes" when tracked files differed from
it), the date, and the machine: CPU, cores, torch threads, library versions, device (the card's name on a GPU)
and the load average at the start and at the end of the run. To re-measure, run a section's command, then
`.venv/bin/python scripts/results_page.py`.

Unless a section says otherwise the machine is one of this project's development machines: 2 cores of an x86-64
server CPU (each section names its CPU: sessions have run on AMD EPYC and Intel Xeon machines), no GPU. Compare
absolute figures only within a section. It is shared, so the load average (runnable processes: 2 means both cores
busy) says how much else ran. Timings of two sides are taken side by side in one process, alternating
the sides over several repetitions and reporting medians (`scripts/_bench.py`), so that ratios survive the
machine's drift better than absolute figures do.
"""


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- one renderer per report: what is measured, then the figures -------------------------------------------------

QUALITY_TARGETS = {"train_minutes": "<= 15", "vqa_accuracy": ">= 0.90", "CIDEr-D": ">= 1.5", "pointing_game": ">= 0.80"}
QUALITY_LABELS = {"train_minutes": "`vlm train` wall time, start to exported model (min)",
                  "train_steps": "training steps reached (of 800)",
                  "vqa_accuracy": "VQA accuracy (official metric)", "CIDEr-D": "caption CIDEr-D (greedy)",
                  "BLEU-4": "caption BLEU-4 (greedy)", "pointing_game": "pointing game (all layers, heads averaged)",
                  "mass_in_box": "attention mass inside the object's box",
                  "identical_captions": "share of identical captions"}


def quality(report: dict) -> str:
    r = report["results"]
    rows = [[label, fmt(r[k]), QUALITY_TARGETS.get(k, "")] for k, label in QUALITY_LABELS.items()
            if r.get(k) is not None]
    rows += [[f"&nbsp;&nbsp; VQA {k.split('/', 1)[-1]}", fmt(v), ""] for k, v in r.items()
             if k not in QUALITY_LABELS and k != "eval_seconds" and isinstance(v, float)]
    c = report["config"]
    extra = f" plus `{' '.join(c['train_args'])}`" if c["train_args"] else ""
    trained = ("`vlm train` with the default recipe (built-in scenes, at most 800 steps or 14 minutes of fitting)"
               f"{extra}" if r.get("train_minutes") is not None else f"The model `{c['model']}`")
    about = (f"{trained}, scored on {c['num_scenes']} held-out scenes. The pointing game feeds the "
             "first reference caption (which names every object) through the decoder and averages the maps of each "
             "object phrase's tokens; a hit is a peak inside the object's box. The references are templated, so "
             "CIDEr-D is far higher than on natural captions: it says the model names the right objects in the "
             "right order. The step count reached depends on the machine's speed.")
    return about + "\n\n" + table(["metric", "measured", "target"], rows)


def grounding(report: dict) -> str:
    rows = []
    for method, r in report["results"].items():
        d = r["deletion"]
        head = "heads averaged" if r["head"] is None else f"head {r['head']}"
        rows.append([method, f"{r['layers']}, {head}", fmt(r["selection_pointing_game"]), fmt(r["pointing_game"]),
                     fmt(r["default"]["pointing_game"]), fmt(r["patch_centre_pointing_game"]), fmt(r["mass_in_box"]),
                     fmt(r["iou"]), f"{fmt(d['area_attention'])} / {fmt(d['area_random'])}"])
    c = report["config"]
    best = report["best"]["method"]
    misses = report["results"][best].get("misses")
    about = (f"{c['num_scenes']} held-out scenes ({c['phrases']:,} object phrases) scored with the model "
             f"`{c['model']}`. For each method, every choice of decoder layers and heads is scored on "
             f"{c['select_scenes']} other held-out scenes; only the best choice there is scored on the scored scenes. "
             "The pointing game takes the peak of the bilinearly upsampled map; \"patch centre\" takes it at the "
             "centre of the argmax patch. The deletion areas are under the phrase's probability as the most-attended "
             f"(or random) patches are removed, on {c['deletion_scenes']} scenes: lower is more faithful. Target: the "
             "best method >= 0.90.")
    text = about + "\n\n" + table(["method", "layers, head chosen", "selection", "pointing game",
                                   "all layers, heads averaged", "patch centre", "mass in box", "box IoU",
                                   "deletion area, attended / random"], rows)
    if misses:
        text += (f"\n\nOf the best maps' {misses['count']} misses, {misses['within_4px']} peak within 4 pixels of the "
                 f"box (median {misses['median_px']:.1f} px; grid {misses['grid'][0]} x {misses['grid'][1]} over "
                 f"{misses['image_size']} px).")
    return text


SPEED_TARGETS = {"train_images_per_s": ">= 1.3", "greedy_b1_images_per_s": ">= 3", "beam": ">= 2", "greedy_b": ">= 2",
                 "train_peak_tensor_memory_mb": "<= 1", "train_peak_memory_mb": "<= 1",
                 "train_flop_share_of_matmul_peak": ">= 0.60"}


def _speed_target(metric: str) -> str:
    for key, target in SPEED_TARGETS.items():
        if metric.startswith(key):
            return target
    return ""


SPEED_LABELS = {"train_images_per_s": "training, images/s", "train_peak_tensor_memory_mb": "peak training-step memory, "
                "tensors MB", "train_peak_memory_mb": "peak training-step memory, resident MB",
                "train_flop_share_of_matmul_peak": "training FLOP/s as share of the matmul peak"}


def _speed_label(metric: str) -> str:
    found = re.fullmatch(r"(greedy|beam(\d+))_b(\d+)_images_per_s", metric)
    if found:
        decoding = "greedy" if found[1] == "greedy" else f"beam {found[2]}"
        return f"generation, batch {found[3]} {decoding}, images/s"
    return SPEED_LABELS.get(metric, metric)


def speed(report: dict) -> str:
    ours, hf = report["results"]["ours"], report["results"]["hf"]
    ceilings = report.get("roofline_ratio_ceilings", {})
    rows = []
    for metric in ours:
        if metric not in hf or metric.endswith("_gflop") or metric == "params_m":
            continue
        ceiling = ceilings.get(f"{metric}_vs_hf")
        ratio = "" if metric.endswith("share_of_matmul_peak") else fmt(ours[metric] / hf[metric], 2)
        rows.append([_speed_label(metric), fmt(ours[metric]), fmt(hf[metric]), ratio, fmt(ceiling, 2),
                     _speed_target(metric)])
    overheads = [f"{k.replace('_attention_overhead', '').replace('_', ' ')} {v:+.1%}" for k, v in ours.items()
                 if k.endswith("attention_overhead")]
    rows.append(["returning attention maps (time added)", " / ".join(overheads), "", "", "", "<= 10%"])
    c, m = report["config"], report["machine"]
    about = ("Ours against `transformers.VisionEncoderDecoderModel` (ViT encoder + BERT decoder with cross-attention), "
             f"both from scratch with the same dimensions ({c['image']} px images, {c['patch']} px patches, width "
             f"{c['width']}, {c['enc_layers']} + {c['dec_layers']} layers, {c['heads']} heads, MLP {c['mlp']}, "
             f"vocabulary {c['vocab']}, dropout 0), the same {c['optimizer_impl']} AdamW, batch {c['batch']}, "
             f"captions of {c['caption_length']} tokens, exactly {c['new_tokens']} generated tokens, medians of "
             f"{c['reps']} alternating repetitions. Throughputs are images/s; memory is the peak rise over a "
             "training step (tensors: from torch's memory timeline; resident: the process's VmHWM, each side in a "
             "fresh process). The ceiling is a roofline bound on the ratio: HF's time over the least time our work "
             f"could take, our counted FLOPs at the measured matmul peak ({m['matmul_peak_gflop_per_s']:.0f} GFLOP/s; "
             "on the CPU the faster of torch's product and oneDNN's, which our layers use) and, "
             f"per generated token, at least one read of the decoder weights "
             f"({m['decoder_weight_read_ms']:.2f} ms: one sum over a buffer of them all, the memory's own rate; "
             f"torch's one-row products take {m['decoder_weight_products_ms']:.2f} ms). Maps' cost is the median of "
             "per-pair ratios, plain and with maps timed back to back.")
    text = about + "\n\n" + table(["metric", "ours", "HF", "ours / HF", "ceiling", "target"], rows)
    onnx = report["results"].get("onnx")
    if onnx:
        targets = {"greedy_b1": (">= 3", ">= 1.3"), "greedy_b32": (">= 2", ">= 1.2"), "beam3_b32": (">= 2", ">= 1.2"),
                   "greedy_b1_int8": (">= 5", ">= 2")}
        onnx_rows = []
        for name, (vs_hf, vs_ort) in targets.items():
            if f"{name}_images_per_s" not in onnx:
                continue
            label = _speed_label(f"{name.replace('_int8', '')}_images_per_s") + (", int8" if "int8" in name else "")
            ceiling = ceilings.get(f"onnx_{name}_images_per_s_vs_hf")  # over HF eager as timed beside the row
            onnx_rows.append([label, fmt(onnx[f"{name}_images_per_s"]), fmt(onnx[f"{name}_hf_onnx_images_per_s"]),
                              f"{fmt(onnx[f'{name}_vs_hf'], 2)} ({vs_hf})",
                              f"{fmt(onnx[f'{name}_vs_hf_onnx'], 2)} ({vs_ort})", fmt(ceiling, 2)])
        if "greedy_b1_attention_overhead" in onnx:
            onnx_rows.append(["returning attention maps (time added), batch 1 greedy",
                              f"{onnx['greedy_b1_attention_overhead']:+.1%}", "", "(<= 10%)", "", ""])
        b1_reps = report["config"].get("onnx_batch1_reps", c["reps"])
        b32_reps = report["config"].get("onnx_batch32_reps", c["reps"])
        text += ("\n\nOn ONNX Runtime (`vlm export --format onnx`, `--runtime onnx`; 2 threads) against HF eager and "
                 "against HF's model on ONNX Runtime with its key/value cache (exported by the script with "
                 "`torch.onnx` in optimum's layout, encoder / first step / step with past, and run in our decoding "
                 f"loop; its greedy tokens equal HF eager's: {onnx.get('hf_onnx_equals_hf_eager')}). Both ONNX "
                 "sides get the same ONNX Runtime fusions (`vlm.deploy.export.fuse`), run with the runtime's session "
                 "options (`vlm.deploy.runtime.session_options`: pools that sleep between runs) and one torch thread "
                 "in the decoding loop. Ours has ONNX Runtime's own attention operator in its step graph "
                 "(`vlm.deploy.export`; the ORT optimizer finds none to fuse in HF's BERT decoder), which writes the "
                 "cache in place and reads it through a beam index table (HF's cache is copied in and out of each "
                 "step and reordered with the beams, as optimum's generation does), runs a call over "
                 "several images in lanes (the images split between one-thread encoder runs and decoding loops side "
                 "by side, `vlm.deploy.runtime.OnnxModel.in_lanes`) and a batch-1 step on a one-thread session "
                 "(`vlm.deploy.runtime.SMALL_STEP_ROWS`); HF's sessions use both threads for every step (one set "
                 "of options for all of a model's sessions, as optimum takes them, and one run per step). Batch-1 "
                 f"rows are medians of {b1_reps} alternating repetitions, batch-32 rows of {b32_reps}. Each row's "
                 "ceiling is over HF eager as timed beside it (int8's over fp32's least time)"
                 + (f", with our products at ONNX Runtime's own matmul peak ({ort_peak:.0f} GFLOP/s on the model's "
                    "largest product shape or the large square, whichever is faster) where that beats torch's"
                    if (ort_peak := m.get("onnx_matmul_peak_gflop_per_s")) else "")
                 + ". Targets in brackets.\n\n"
                 + table(["metric", "ours on ORT", "HF on ORT", "ours / HF eager", "ours / HF on ORT",
                          "ceiling vs HF eager"], onnx_rows))
    return text


def compile_(report: dict) -> str:
    r, c = report["results"], report["config"]
    about = (f"A training step (forward and backward) of the default model on {c['images']} images x "
             f"{c['sequences'] // c['images']} sequences of {c['tokens']} tokens, eager against `optim.compile: true` "
             f"(`torch.compile` of encoder and decoder), medians of {c['reps']} alternating steps.")
    rows = [["eager step (s)", fmt(r["eager_step_s"])], ["compiled step (s)", fmt(r["compiled_step_s"])],
            ["compiled steps/s over eager", fmt(report["ratios"]["compiled_steps_per_s_vs_eager"], 2)],
            ["first compiled step, compiling (s)", fmt(r["first_compiled_step_s"], 0)]]
    return about + "\n\n" + table(["measured", "value"], rows)


def load_check(report: dict) -> str:
    c = report["config"]
    rows = []
    for side, label in (("concurrent", f"{c['clients']} x {c['requests_per_client']}"),
                        ("single", f"1 x {c['requests_per_client']}")):
        r = report["results"][side]
        rows.append([label, fmt(r["requests_per_s"], 1), f"{r['p50_ms']:.0f} ms", f"{r['p95_ms']:.0f} ms",
                     f"{r['failed'] + r['wrong']} of {r['requests']}"])
    about = (f"`vlm serve` on loopback with the model `{c['model']}`: {c['clients']} concurrent clients against 1, "
             f"{c['mix']}, each answer checked against the Python API's; medians over {c['reps']} alternating "
             "repetitions.")
    return about + "\n\n" + table(["clients x requests", "requests/s", "p50 latency", "p95 latency",
                                   "failed or wrong"], rows)


def ptb_parity(report: dict) -> str:
    r, c = report["results"], report["config"]
    about = ("`vlm/eval/ptb.py`, our pure-Python copy of the Stanford PTBTokenizer as pycocoevalcap runs it, against "
             f"the official Java program ({report['machine'].get('java', 'java')}) in one JVM run: every hard piece "
             f"of the probe list alone and {c['n']:,} random mixes of them (seed {c['seed']}: punctuation inside "
             "words, URLs, e-mails, abbreviations, numbers, currency, contractions, Unicode quotes and dashes, "
             "emoji, odd spaces), compared token for token.")
    return about + "\n\n" + table(["strings", "differing from Java"], [[fmt(r["strings"]), f"**{r['differing']}**"]])


def generic(report: dict, about: str = "") -> str:
    """Any other report: its scalar results (two levels deep) and its ratios."""
    rows = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and prefix.count(".") < 2:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, int | float | str | bool) or value is None:
            rows.append([prefix, fmt(value)])

    walk("", report.get("results", {}))
    rows += [[f"ratio {k}", fmt(v, 2)] for k, v in report.get("ratios", {}).items()]
    return (about + "\n\n" if about else "") + table(["measured", "value"], rows)


RELATIONAL_LABELS = {"relational": "relational kinds (closest, farthest, count_same, relative)",
                     "relational_each_kind": "lowest relational kind", "non_relational": "non-relational kinds",
                     "yes_no": "yes/no with negation", "pointing_game": "pointing game of object phrases (raw)",
                     "pointing_game/centre_baseline": "&nbsp;&nbsp; centre-point baseline",
                     "train_minutes": "`vlm train` wall time (min)"}


def relational(report: dict) -> str:
    r, targets = report["results"], report.get("targets", {})
    rows = [[label, fmt(r[k]), f">= {targets[k]}" if k in targets and k != "train_minutes" else
             (f"<= {targets[k]}" if k in targets else "")] for k, label in RELATIONAL_LABELS.items() if k in r]
    rows += [[f"&nbsp;&nbsp; {k}", fmt(v), ""] for k, v in r.items() if k not in RELATIONAL_LABELS
             and k not in ("train_steps", "accuracy", "CIDEr-D", "mass_in_box", "pointing_game/raw")]
    curve = report.get("curve") or []
    kinds = [k for k in curve[0] if k not in ("step", "seconds")] if curve else []
    about = (f"`vlm train --config configs/relational.yaml` ({fmt(r.get('train_steps'))} steps) on the relational "
             "scenes (docs/data.md defines each question kind), scored on held-out relational scenes. The pointing "
             "game is the raw map's (rollout and chefer below); the centre-point baseline is a map that always "
             "points at the image's centre.")
    text = about + "\n\n" + table(["metric", "measured", "target"], rows)
    if curve:
        text += ("\n\nLearning curve: held-out accuracy per question kind at each validation (step, seconds since "
                 "training started).\n\n" + table(["step", "s", *kinds],
                                                  [[str(c["step"]), fmt(c["seconds"], 0), *(fmt(c[k]) for k in kinds)]
                                                   for c in curve]))
    return text


PREDICT_TARGETS = {"predict_default_over_loop_default": ">= 1.5", "predict_over_loop": ">= 1.5",
                   "predict_over_hf": ">= 2", "maps_overhead": "<= 0.15", "memory_growth": "<= 0.10",
                   "predict_onnx_over_loop": ">= 1.5", "predict_onnx_over_hf": ">= 2"}


def predict(report: dict) -> str:
    r, ratios = report["results"], report.get("ratios", {})
    rows = [[f"images/s, {k}", fmt(v), ""] for k, v in r["images_per_s"].items()]
    rows += [["`--maps` extra time", fmt(r["maps_overhead"]), PREDICT_TARGETS["maps_overhead"]]]
    if "maps_overhead_pairs" in r:
        pairs = r["maps_overhead_pairs"]
        rows += [["`--maps` extra time, each pair (least to most)", ", ".join(fmt(v) for v in pairs), ""]]
    rows += [[f"peak memory, {k.replace('_', ' ')}", fmt(v), ""] for k, v in r["peak_memory"].items()]
    rows += [[f"wall time, {k.replace('_', ' ')}", fmt(v), ""] for k, v in r["scaling_wall_s"].items()]
    ceilings, bounds = report.get("roofline_ratio_ceilings", {}), report.get("work_ratio_bounds", {})
    for k, v in ratios.items():
        notes = ([f"ceiling {fmt(ceilings[k], 2)}"] if k in ceilings else []) + (
            [f"work bound {fmt(bounds[k], 2)}"] if k in bounds else [])
        rows.append([f"ratio {k}" + (f" ({', '.join(notes)})" if notes else ""), fmt(v, 2), PREDICT_TARGETS.get(k, "")])
    c = report["config"]
    default = ("the default model (`predict_default`, `loop_default`: `ModelConfig()`, random weights) and "
               if "predict_default" in r["images_per_s"] else "")
    about = (f"`vlm predict` over {c['images']:,} PNG and JPEG images of mixed sizes on disk, batches of "
             f"{c['batch_size']}, {c['new_tokens']} greedy tokens each, against a plain loop over `Captioner.caption` "
             f"(same model and batches), with {default}the model of transformers' VisionEncoderDecoder's "
             "dimensions (scripts/bench.py's), and against transformers' generation on that VisionEncoderDecoder "
             "(transformers 5 has no image-to-text pipeline, so the script runs the pipeline's steps). `predict_onnx` "
             "and `loop_onnx` are the latter model's two on ONNX Runtime (`runtime=\"onnx\"`, "
             "the model exported with `vlm export --format onnx`). Peak memory of fresh processes predicting each "
             "image count, with their data-loader workers, which run the model (torch runtime; the main process's "
             "resident memory and each worker's private memory, sampled every 0.1 s: the pages a worker shares with "
             "the main process, the weights and the libraries, count once); wall time of "
             "the command on 1 and 2 processes, start-up "
             f"included (medians of {c.get('reps', 1)} runs of each, alternated). A ratio's ceiling is its roofline "
             "bound: the other side's time per image over the least time one image can take on these cores, its "
             "model FLOPs at the matmul peak plus its image decoding and resizing (the loop's profile) shared out "
             "over the cores"
             + (f" ({fmt(r['least_ms_per_image'])} ms" if "least_ms_per_image" in r else "")
             + (f"; the default model's {fmt(r['least_ms_per_image_default'])} ms"
                if "least_ms_per_image_default" in r else "")
             + (f"; the `predict_onnx` ratios' with the products at ONNX Runtime's own matmul peak, where that is "
                f"higher: {fmt(r['least_ms_per_image_onnx'])} ms)." if "least_ms_per_image_onnx" in r
                else ")." if "least_ms_per_image" in r else ".")
             + (" A ratio's work bound is the same from measured work: the other side's time per image over the "
                "one-thread profile's (`loop_one_thread`: reading, encoding and generating on one torch thread) "
                "shared out over the cores, the least time any schedule of that work can take here (one thread per "
                "core wastes less than a team: see the profiles)." if "work_ratio_bounds" in report else "")
             + (f" `--maps`' extra time is the median over {pairs} pairs of runs (torch runtime), without and with "
                "maps back to back, of the ratio within each pair." if (pairs := c.get("maps_reps", c.get("reps")))
                else "")
             + (" `two_workers_stage_time_over_one` is what running side by side costs each worker: the default "
                "model's stage time (reading, the model, the records; summed over the workers) with two workers over "
                f"one worker's, for the same images (the median of {c.get('reps', 1)} alternated pairs)."
                if "two_workers_stage_time_over_one" in ratios else ""))
    return about + "\n\n" + table(["metric", "measured", "target"], rows) + predict_profile(report.get("profile"))


PROFILE_ABOUT = """Where the time goes, in {unit} (`vlm predict`'s own stage timers, the summary's `profile`,
and the script's timers around the loop's stages). A stage's time is summed over the processes that ran it, so
stages that overlap (the data-loader workers, each reading, running the model on one torch thread and making the
records' JSON text, side by side; the main process waiting and writing) add up to more than the wall time; `main cpu`
is the CPU time of the main process itself. Model work (encode + generate) bounds the rest: on these 2 cores its
one-thread core-seconds halved are the floor of the wall time."""


def predict_profile(profile: dict | None) -> str:
    """The stage-by-stage table of `scripts/predict.py`'s ``profile`` section (none: nothing)."""
    if not profile:
        return ""
    names = {"predict": "predict", "predict_maps": "predict --maps", "predict_onnx": "predict on ORT",
             "loop": "plain loop", "predict_default": "predict, default model",
             "loop_default": "plain loop, default model", "loop_one_thread": "plain loop, 1 thread",
             "loop_default_one_thread": "plain loop, default model, 1 thread"}
    runs = [k for k in names if k in profile]
    stages = list(dict.fromkeys(k for run in runs for k in profile[run]))
    rows = [[stage.replace("_", " "), *[fmt(profile[run].get(stage), 2) for run in runs]] for stage in stages]
    header = ["stage", *[names[r] for r in runs]]
    return "\n\n" + PROFILE_ABOUT.format(unit=profile.get("unit", "seconds")) + "\n\n" + table(header, rows)


def onnx_quality(report: dict) -> str:
    r, gaps = report["results"], report["ratios"]["int8_vs_fp32"]
    bounds = {"CIDEr-D": "<= 0.02 (relative)", "VQA accuracy": "<= 0.01", "pointing game": "<= 0.02"}
    rows = [[m, fmt(r["torch"][m]), fmt(r["onnx_fp32"][m]), fmt(r["onnx_int8"][m]), fmt(gaps[m], 4), bounds.get(m, "")]
            for m in r["torch"]]
    model = report["config"]["model"]
    trained = "`vlm train --out runs/default`, the default run" if model == "runs/default/model" \
        else "`scripts/quality.py`"
    about = (f"The model `{model}` (trained by {trained}), on the held-out scenes "
             "(`vlm eval`'s built-in scoring: greedy captions and answers, raw maps) with torch, its ONNX export on "
             "ONNX Runtime, and the export quantized to int8 (`vlm export --quantize int8`, dynamic); the gap is int8 "
             "against fp32.")
    return about + "\n\n" + table(["metric", "torch", "ONNX fp32", "ONNX int8", "gap", "bound"], rows)


def onednn(report: dict) -> str:
    r, c = report["results"], report["config"]
    model = r["model"]
    about = ("PyTorch's float32 product on the CPU (`F.linear`: MKL) against oneDNN's on a reordered weight "
             "(`vlm.model.linear`, which the model's layers use on the CPU, inferring and training), one `linear` "
             f"of each size (rows {', '.join(map(str, c['rows']))} x the inputs and outputs of the default "
             "model's and the benchmark model's layers), medians of "
             f"{c['reps']} alternating repetitions: oneDNN's speed-up, by thread count. `vlm.model.linear.MIN_PRODUCT` "
             f"({r['min_product']:,} multiply-adds) sends a product to oneDNN from that size up: it must lie above the "
             "largest product oneDNN lost. Then scripts/bench.py's model encoding 32 images and greedily generating "
             "16 tokens each, and a training step of it (32 images, captions of 24 tokens, AdamW), both ways.")
    rows = []
    for threads, speedups in report["speedups"].items():
        chosen = [v for k, v in speedups.items() if multiply_adds(k) >= r["min_product"]]
        rows.append([threads.replace("_", " "), f"{min(chosen):.2f}-{max(chosen):.2f}x",
                     f"{sorted(chosen)[len(chosen) // 2]:.2f}x", fmt(r["largest_losing_product"][threads])])
    text = about + "\n\n" + table(["torch threads", "speed-up from MIN_PRODUCT up", "median",
                                    "largest product oneDNN lost"], rows)
    model_rows = [["encode + generate, ms per image", fmt(model["ms_per_image"]["torch"]),
                   fmt(model["ms_per_image"]["onednn"]), fmt(report["ratios"]["model_onednn_vs_torch"], 2),
                   f"the same tokens: {model['same_tokens']}"]]
    if training := r.get("training"):
        model_rows.append(["training step, ms", fmt(training["ms_per_step"]["torch"], 1),
                           fmt(training["ms_per_step"]["onednn"], 1),
                           fmt(report["ratios"]["training_onednn_vs_torch"], 2),
                           f"gradients differ by {training['largest_relative_gradient_difference']:.1e} at most "
                           "(relative)"])
    return text + "\n\n" + table(["the model", "F.linear", "oneDNN", "speed-up", "agreement"], model_rows)


def allocator(report: dict) -> str:
    c, rates, ratios = report["config"], report["results"]["images_per_s"], report["ratios"]
    about = ("Inference on the CPU with freed memory kept for reuse (`vlm.allocator`, what `Captioner` sets on the "
             "CPU) against the C library's defaults, each run in a fresh process (the setting is a process's), the two "
             f"alternating over {c['reps']} runs (medians), timed from the model's loading to the last caption: "
             f"`Captioner.caption` over {c['images']} images (loop), `vlm predict` over them (predict), and the "
             f"encoder alone over {c['encode_batches']} batches of random pixels (encode); batches of "
             f"{c['batch_size']}, {c['new_tokens']} new tokens, scripts/predict.py's two models.")
    names = {"bench": "benchmark model", "default": "default model"}
    rows = [[side, names[model], fmt(rates[f"{side}_{model}_default"], 1), fmt(rates[f"{side}_{model}_kept"], 1),
             fmt(ratios[f"{side}_{model}_kept_over_default"], 2)]
            for side in ("loop", "predict", "encode") for model in names if f"{side}_{model}_kept" in rates]
    return about + "\n\n" + table(["images/s", "model", "glibc's defaults", "freed memory kept", "speed-up"], rows)


def multiply_adds(size: str) -> int:
    """Multiply-adds of a product named rows x inputs x outputs ("32x256x1024")."""
    rows, k, n = (int(v) for v in size.split("x"))
    return rows * k * n


@dataclass
class Section:
    name: str  # benchmarks/results/NAME.json
    title: str
    render: Callable[[dict], str] | None = None  # None: every scalar result, after ``about``
    about: str = ""

    def text(self, report: dict) -> str:
        return self.render(report) if self.render else generic(report, self.about)


SECTIONS = [
    Section("quality", "Quality of the default model", quality),
    Section("grounding", "Grounding: map methods", grounding),
    Section("speed", "Speed and memory against transformers", speed),
    Section("compile", "torch.compile of a training step", compile_),
    Section("load_check", "Serving under concurrent clients", load_check),
    Section("ptb_parity", "PTB tokenizer parity with the Java original", ptb_parity),
    Section("feature_cache", "Feature cache", about="An epoch of training the decoder from cached frozen-trunk maps "
            "against recomputing the encoder, and whether the two loss curves agree."),
    Section("memory", "Data-loader memory at COCO scale", about="Proportional memory (PSS) of the process tree over "
            "an epoch of COCO-sized synthetic annotations with data-loader workers, against the main process alone."),
    Section("scst", "Self-critical sequence training", about="SCST fitted from `runs/quality/model`, then both models "
            "scored on the same held-out scenes. SCST trains on captions only; VQA accuracy and the pointing game "
            "show what that costs the other tasks."),
    Section("predict", "`vlm predict` throughput", predict),
    Section("onednn", "oneDNN products on the CPU", onednn),
    Section("allocator", "Freed memory kept", allocator),
    Section("relational", "Relational questions", relational),
    Section("onnx_quality", "int8 quality on ONNX Runtime", onnx_quality),
    Section("listing", "Listing millions of images for `vlm predict`", about="Seconds and resident memory per "
            "million images to list a JSONL file (a quarter of the lines with fields, a tenth with a key), a text "
            "file of paths and a folder of files (200,000, a tenth of them no image), digest included, against the "
            "least such a pass does: `json.loads` of every line, splitting the file into lines, or `os.walk` "
            "(medians of 3 runs, alternated)."),
    Section("retire", "Retiring ended images from decoding", about="The decoding alone (`decode`, caption "
            "prompts, batches of 32) of the default model trained on the built-in scenes, whose captions differ in "
            "length by the number of objects: images whose rows have all ended leave the later steps (`retire`), "
            "against every row decoded to the end (medians of alternated runs, the same tokens checked). "
            "The row_steps ratios: the rows the steps ran, summed, retiring over not; tokens: the texts' lengths."),
    Section("help_time", "Start-up time of the command line", about="Seconds for `vlm --help` and `vlm caption --help` "
            "in fresh processes (medians, alternating with a bare `python -c pass`); target under 1.5 s."),
]


def provenance(report: dict, path: Path) -> str:
    m = report["machine"]
    dirty = " + uncommitted changes" if report.get("dirty") else ""
    device = m.get("card") or m.get("device", "cpu")
    load = (f"load average {m['load_average_at_start'][0]:.1f} at the start, {m['load_average_at_end'][0]:.1f} at the "
            "end" if "load_average_at_start" in m else "load average not recorded")
    cpu = f"{m.get('cpu')} ({m['vector']})" if "vector" in m else m.get("cpu")  # widest vector instructions
    return (f"Commit `{report.get('commit')}`{dirty}, {report.get('date', '')[:16].replace('T', ' ')} UTC; "
            f"{cpu}, {m.get('cores')} cores, torch threads: {m.get('threads')}, torch {m.get('torch')}, "
            f"{device}; {load}. Report: [{path.name}](../benchmarks/results/{path.name}).")


GRID = """## The attention grid in the README

`assets/attention_grid.png` is `vlm attend`'s `grid.png` for held-out scene 0 with the model that
`scripts/quality.py` trained for the report above (`--out runs/quality` by default; each panel: one generated token's
map, heads and layers averaged); redraw it after re-running that script:

```bash
.venv/bin/python -c "from vlm.data.scenes import make_scene; make_scene(0, 'val').image.save('/tmp/scene0.png')"
.venv/bin/vlm attend --model runs/quality/model /tmp/scene0.png --out /tmp/scene0
cp /tmp/scene0/grid.png assets/attention_grid.png
```
"""


SEEDS_ABOUT = """The default recipe trained with other seeds (the first row is the run above) and the runs that
chose it (`scripts/quality.py -- --trainer.seed N ...`, each its own report). The seed sets the initial weights,
the training order and each item's drawn texts. Reports named `*_captions1*` ran at commits before `4ef0094`, whose
default was one caption per image: there the pointing game held on seeds 1 and 2 (0.94, 0.95) but not on seed 0
(0.80), and a larger grounding weight raised it only by costing VQA; decoding 2 and then 3 of each image's captions
per batch (each caption's phrases train the grounding loss too) raised seed 0 to 0.92 and 0.94, and 3 became the
default (`data.captions_per_image`). The guard that a default change must keep (issue 22): VQA >= 0.95, CIDEr-D >=
5 and pointing >= 0.93 within 15 minutes. Wall times depend on what else the machine ran (each report records its
load average); a run given more time than the recipe's 14 minutes says so in its arguments."""


def _captions_per_image(path: Path, args: list[str]) -> int:
    """What a quality report's run decoded per image: its argument, else 1 for a `*_captions1*` report (the default
    before 4ef0094), else today's default."""
    if "--data.captions_per_image" in args:
        return int(args[args.index("--data.captions_per_image") + 1])
    return 1 if "_captions1" in path.name else DataConfig.captions_per_image


def seeds(results: Path) -> str:
    """The default recipe's runs with other seeds or arguments (quality.json, then quality_*.json), one row each."""
    rows = []
    for path in [results / "quality.json", *sorted(results.glob("quality_*.json"))]:
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        r, args = report["results"], report["config"]["train_args"]
        rows.append([f"`{' '.join(args)}`" if args else "(defaults)", str(_captions_per_image(path, args)),
                     fmt(r.get("train_minutes"), 1), fmt(r.get("train_steps"), 0), fmt(r["vqa_accuracy"]),
                     fmt(r["CIDEr-D"], 2), fmt(r["pointing_game"]), fmt(r["mass_in_box"]),
                     f"[{path.name}](../benchmarks/results/{path.name}), `{report.get('commit')}`"])
    if len(rows) < 2:
        return ""
    return "## The default recipe across seeds\n\n" + SEEDS_ABOUT + "\n\n" + table(
        ["`vlm train` arguments", "captions per image", "minutes", "steps", "VQA", "CIDEr-D", "pointing game",
         "mass in box", "report"], rows) + "\n"


def render_page(results: Path) -> str:
    parts = [INTRO]
    known = {s.name for s in SECTIONS}
    others = [Section(p.stem, p.stem.replace("_", " ").capitalize()) for p in sorted(results.glob("*.json"))
              if p.stem not in known and not p.stem.startswith("quality_")]
    for section in SECTIONS + others:
        path = results / f"{section.name}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        parts.append(f"## {section.title}\n\n```bash\n{report.get('command', '')}\n```\n\n{section.text(report)}\n\n"
                     f"{provenance(report, path)}\n")
        if section.name == "quality" and (extra := seeds(results)):
            parts.append(extra)
    return "\n".join([*parts, GRID])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="folder of JSON reports")
    parser.add_argument("--out", default=str(PAGE), help="the page to write")
    args = parser.parse_args()
    Path(args.out).write_text(render_page(Path(args.results)))
    print(args.out)


if __name__ == "__main__":
    main()
