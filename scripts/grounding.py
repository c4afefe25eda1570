"""Grounding benchmark: pointing game, mass in box, box IoU and deletion faithfulness of each map method.

    python scripts/grounding.py                     # runs/quality/model; 500 held-out built-in scenes
    python scripts/grounding.py --model M --num-scenes 200 --select-scenes 100

Each object's phrase in the scene's first reference caption (which names every object) is fed through the
decoder after the caption prompt; its map is the mean of its tokens' maps. The pointing game counts a hit when
the map's peak (of the bilinearly upsampled map) lies inside the object's box. For each method, every choice of
decoder layers and of heads (averaged, or one head; chefer always averages) is scored on separate selection scenes
(held-out scenes after the scored ones) and the best one is then scored on the scored scenes, which the choice
never sees; so are all layers with heads averaged (the default) and, for the chosen maps, the peak taken at the
centre of the argmax patch instead. Target (issue 5): the best method >= 0.90. Writes
benchmarks/results/grounding.json (--json); the path is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch
from _bench import add_json_option, report

from vlm import load as load_model
from vlm.config import MapConfig
from vlm.data.scenes import make_scene
from vlm.eval.grounding import GroundingCase, deletion_curves, grounding_scores, phrase_maps, pointing_by_choice
from vlm.grounding.maps import peak
from vlm.grounding.methods import METHODS

TARGET = 0.90


def _cases(captioner, start: int, count: int) -> list[GroundingCase]:
    size = captioner.model.cfg.encoder.image_size
    scenes = [make_scene(i, "val", 0, size) for i in range(start, start + count)]
    return [GroundingCase(s.image, [(o.phrase, o.box) for o in s.objects], s.captions[0]) for s in scenes]


def _misses(captioner, cases: list[GroundingCase], method: str, layers: list[int], head: int | None) -> dict:
    """How far the missed peaks are from their boxes (pixels): near misses say the map is too coarse."""
    maps = phrase_maps(captioner, cases, MapConfig(method, layers, head))
    regions = [(box, case) for case in cases for _, box in case.regions]
    size = captioner.model.cfg.encoder.image_size
    distances = []
    for m, (box, _) in zip(maps, regions, strict=True):
        x, y = peak(m, (size, size))
        dx, dy = max(box[0] - x, 0.0, x - box[0] - box[2]), max(box[1] - y, 0.0, y - box[1] - box[3])
        if dx or dy:
            distances.append(float(np.hypot(dx, dy)))
    return {"count": len(distances), "within_4px": sum(d < 4 for d in distances),
            "median_px": float(np.median(distances)) if distances else 0.0,
            "grid": list(maps[0].shape), "image_size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/quality/model")
    parser.add_argument("--num-scenes", type=int, default=500, help="Scored held-out scenes (0 ..).")
    parser.add_argument("--select-scenes", type=int, default=200,
                        help="Held-out scenes after the scored ones, used only to choose each method's layers, head.")
    parser.add_argument("--deletion-scenes", type=int, default=100, help="Scored scenes for the deletion curves.")
    add_json_option(parser, "grounding")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    started = time.perf_counter()

    captioner = load_model(args.model, device="cpu")
    scored = _cases(captioner, 0, args.num_scenes)
    selection = _cases(captioner, args.num_scenes, args.select_scenes)
    num_layers = len(captioner.model.decoder.blocks)
    num_heads = captioner.model.decoder.blocks[0].cross_attn.num_heads
    subsets = [list(c) for n in range(1, num_layers + 1) for c in itertools.combinations(range(num_layers), n)]

    results: dict[str, dict] = {}
    for method in METHODS:
        start = time.perf_counter()
        heads = [None] if method == "chefer" else [None, *range(num_heads)]
        choices = [MapConfig(method, layers, head) for head in heads for layers in subsets]
        picked = pointing_by_choice(captioner, selection, choices)
        best = max(range(len(choices)), key=picked.__getitem__)  # the first of equals: heads averaged first
        chosen = choices[best]
        on_scored = pointing_by_choice(captioner, scored, choices)
        results[method] = {
            "layers": chosen.layers, "head": chosen.head, "selection_pointing_game": picked[best],
            **grounding_scores(captioner, scored, chosen),
            "patch_centre_pointing_game": pointing_by_choice(captioner, scored, [chosen], False)[0],
            "default": grounding_scores(captioner, scored, MapConfig(method, list(range(num_layers)))),
            "by_choice": [{"layers": c.layers, "head": c.head, "selection_pointing_game": p, "pointing_game": q}
                          for c, p, q in zip(choices, picked, on_scored, strict=True)],
            "deletion": deletion_curves(captioner, scored[:args.deletion_scenes], chosen),
            "seconds": time.perf_counter() - start}

    best = max(results, key=lambda k: results[k]["selection_pointing_game"])
    results[best]["misses"] = _misses(captioner, scored, best, results[best]["layers"], results[best]["head"])
    seconds = time.perf_counter() - started
    path = report(
        args.json,
        config={"model": args.model, "num_scenes": args.num_scenes, "select_scenes": args.select_scenes,
                "deletion_scenes": args.deletion_scenes, "phrases": results[best]["phrases"], "box_fraction": 0.5},
        results=results,
        ratios={"best_pointing_game_vs_target": results[best]["pointing_game"] / TARGET,
                **{f"{m}_deletion_area_vs_random": results[m]["deletion"]["area_attention"]
                   / results[m]["deletion"]["area_random"] for m in METHODS}},
        threads=torch.get_num_threads(),
        best={"method": best, "layers": results[best]["layers"], "head": results[best]["head"]},
        seconds=seconds,
    )

    print(f"{'method':<8} {'layers':<10} {'head':>4} {'select':>6} {'pointing':>8} {'default':>7} {'patch':>6} "
          f"{'mass':>6} {'IoU':>6} {'del.attn':>8} {'del.rand':>8} {'sec':>6}")
    for method, r in results.items():
        d = r["deletion"]
        print(f"{method:<8} {str(r['layers']):<10} {str(r['head'] if r['head'] is not None else 'mean'):>4} "
              f"{r['selection_pointing_game']:>6.3f} {r['pointing_game']:>8.3f} {r['default']['pointing_game']:>7.3f} "
              f"{r['patch_centre_pointing_game']:>6.3f} {r['mass_in_box']:>6.3f} {r['iou']:>6.3f} "
              f"{d['area_attention']:>8.3f} {d['area_random']:>8.3f} {r['seconds']:>6.1f}")
    print(f"best (chosen on the selection scenes): {best} layers {results[best]['layers']} head "
          f"{results[best]['head']}, pointing game {results[best]['pointing_game']:.3f} on {args.num_scenes} scenes "
          f"(target {TARGET}); {seconds / 60:.1f} min")
    misses = results[best]["misses"]
    print(f"its misses: {misses['count']}, of which {misses['within_4px']} within 4 px of the box (median "
          f"{misses['median_px']:.1f} px; grid {misses['grid']} over {misses['image_size']} px)")
    print(path)


if __name__ == "__main__":
    main()
