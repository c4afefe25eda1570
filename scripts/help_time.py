"""How long `vlm --help` and `vlm caption --help` take, as a user runs them (target: under 1.5 s each).

Each command runs as a fresh process, 5 times in turn with a bare `python -c pass` (the interpreter's own start,
the floor no command can go below); the medians are reported, and the share of each above that floor.

    python scripts/help_time.py            # writes benchmarks/results/help_time.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _bench import ROOT, add_json_option, alternate, report

TARGET_S = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs of each command (after one warm-up)")
    add_json_option(parser, "help_time")
    args = parser.parse_args()

    installed = Path(sys.executable).parent / "vlm"  # the console script pip installed
    vlm = [str(installed)] if installed.exists() else [sys.executable, "-m", "vlm.cli"]
    commands = {"vlm --help": [*vlm, "--help"], "vlm caption --help": [*vlm, "caption", "--help"],
                "python -c pass": [sys.executable, "-c", "pass"]}

    def run(argv: list[str]):
        return lambda: subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)

    seconds = alternate({name: run(argv) for name, argv in commands.items()}, reps=args.reps)
    floor = seconds["python -c pass"]
    results = {f"{name} (s)": round(s, 3) for name, s in seconds.items()}
    results["target_s"] = TARGET_S
    results["meets_target"] = all(seconds[name] < TARGET_S for name in ("vlm --help", "vlm caption --help"))
    path = report(args.json, config={"reps": args.reps, "command": vlm, "statistic": "median wall time"},
                  results=results, ratios={"help_vs_python_start": seconds["vlm --help"] / floor,
                                           "caption_help_vs_python_start": seconds["vlm caption --help"] / floor},
                  threads=1)
    print(f"{'command':22s} {'median s':>9s}")
    for name, s in seconds.items():
        print(f"{name:22s} {s:9.3f}")
    print(f"target: each help under {TARGET_S} s: {'met' if results['meets_target'] else 'NOT met'}")
    print(path)


if __name__ == "__main__":
    main()
