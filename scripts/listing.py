"""How long `vlm predict` takes to list a JSONL file or a text file of a million images, or a folder of files, and
the memory the listing holds, against the least such a pass can do: `json.loads` of every line (JSONL), splitting the
file into lines, or `os.walk` over the folder.

The listing (`vlm.predict.inputs.list_chunks`, then `listing_digest`, which a job records to refuse a resume over a
changed listing) runs in the benchmark's process, alternating with the floor (medians). Its memory is what a fresh
process holds once it has listed: its resident memory after listing less before (after the imports); a job holds it
throughout, and its data-loader workers share it.

    python scripts/listing.py            # writes benchmarks/results/listing.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import ROOT, add_json_option, alternate, report

from vlm.predict.inputs import list_chunks, listing_digest


def write_inputs(folder: Path, lines: int, files: int) -> dict[str, Path]:
    """A JSONL file (relative paths; every fourth line with fields, every tenth with a key), a list file, and a
    folder of empty files (a thousand to a subfolder, every tenth file another than an image)."""
    jsonl, listed, images = folder / "images.jsonl", folder / "images.txt", folder / "photos"
    for i in range(files):
        if i % 1000 == 0:
            (images / f"{i // 1000:04d}").mkdir(parents=True)
        (images / f"{i // 1000:04d}" / f"img_{i:07d}.{'txt' if i % 10 == 9 else 'jpg'}").touch()
    with open(jsonl, "w") as f, open(listed, "w") as g:
        for i in range(lines):
            image = f"photos/{i // 1000:04d}/img_{i:07d}.jpg"
            record: dict = {"image": image}
            if i % 4 == 0:
                record |= {"caption": f"a photo {i}", "source": "archive"}
            if i % 10 == 0:
                record["key"] = f"id{i}"
            f.write(json.dumps(record) + "\n")
            g.write(image + "\n")
    return {"jsonl": jsonl, "list": listed, "folder": images}


def listing_memory_mib(path: Path) -> float:
    """MiB of resident memory a fresh process holds for its listing of path (and its digest): its resident memory
    after listing less before (after the imports)."""
    code = (f"import sys, os; sys.path[:0] = [{str(ROOT)!r}]\n"
            "from vlm.predict.inputs import list_chunks, listing_digest\n"
            "def resident(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            f"before = resident()\nfmt, chunks = list_chunks({str(path)!r})\nlisting_digest(chunks)\n"
            "print(resident() - before)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="images listed in the JSONL and list files")
    parser.add_argument("--files", type=int, default=200_000, help="files in the folder (figures are per million)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each side (after one warm-up)")
    add_json_option(parser, "listing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(Path(tmp), args.lines, args.files)

        def listing(path: Path):
            return lambda: listing_digest(list_chunks(str(path))[1])

        def json_floor():
            with open(paths["jsonl"]) as f:
                return [json.loads(line) for line in f]

        def lines_floor():
            return paths["list"].read_text().splitlines()

        def walk_floor():
            return sum(len(files) for _, _, files in os.walk(paths["folder"]))

        seconds = alternate({"jsonl": listing(paths["jsonl"]), "jsonl_floor": json_floor,
                             "list": listing(paths["list"]), "list_floor": lines_floor,
                             "folder": listing(paths["folder"]), "folder_floor": walk_floor}, reps=args.reps)
        memory = {name: listing_memory_mib(path) for name, path in paths.items()}
    per_million = {name: 1e6 / (args.files if name.startswith("folder") else args.lines) for name in seconds}
    results = {"seconds_per_million": {k: round(v * per_million[k], 3) for k, v in seconds.items()},
               "memory_mib_per_million": {k: round(v * per_million[k], 1) for k, v in memory.items()}}
    ratios = {"jsonl_vs_json_loads": seconds["jsonl"] / seconds["jsonl_floor"],
              "list_vs_splitting_lines": seconds["list"] / seconds["list_floor"],
              "folder_vs_os_walk": seconds["folder"] / seconds["folder_floor"]}
    path = report(args.json, config={"lines": args.lines, "files": args.files, "reps": args.reps,
                                     "statistic": "median wall time"},
                  results=results, ratios={k: round(v, 2) for k, v in ratios.items()}, threads=1)
    print(f"{'input':8s} {'s / million':>12s} {'floor s':>8s} {'MiB / million':>14s}")
    for name in paths:
        print(f"{name:8s} {results['seconds_per_million'][name]:12.2f} "
              f"{results['seconds_per_million'][name + '_floor']:8.2f} {results['memory_mib_per_million'][name]:14.1f}")
    print(path)


if __name__ == "__main__":
    main()
