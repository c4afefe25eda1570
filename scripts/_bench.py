"""What every benchmark under scripts/ shares: the machine, the commit, side-by-side timing, the JSON report.

    from _bench import add_json_option, alternate, report    # scripts/ is on sys.path when a script runs

    parser = argparse.ArgumentParser()
    add_json_option(parser, "speed")                         # --json, default benchmarks/results/speed.json
    ...
    seconds = alternate({"ours": run_ours, "theirs": run_theirs}, reps=5)
    path = report(args.json, config={...}, results={...}, ratios={...}, threads=args.threads)
    print(path)                                              # the report's path is printed last

The report is `{"commit", "command", "date", "machine", "config", "results", "ratios", ...}` as
/work/shared/BENCHMARKS.md describes; the machine's load average is read at the start and at the end of
the run, since other work on a shared machine slows what is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git: the report says commit null
        return ""


# Read when a script starts: the work it measures is that of the checkout at the start, whatever happens after.
# Dirty: a tracked file differs, reports and the page made from them aside (one benchmark's new report does not
# change what the next one measures).
_LOAD_AT_START = os.getloadavg()
_COMMIT_AT_START = {"commit": _git("rev-parse", "--short", "HEAD") or None,
                    "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                       ":(exclude)benchmarks/results", ":(exclude)docs/results.md"))}


def add_json_option(parser: argparse.ArgumentParser, name: str) -> None:
    """Add --json, the report's path, defaulting to benchmarks/results/NAME.json (the committed evidence)."""
    parser.add_argument("--json", default=os.path.relpath(RESULTS / f"{name}.json"),
                        help="where to write the JSON report (default: %(default)s)")


def commit() -> dict:
    """The checked-out commit (short hash) and whether tracked files differed from it, read when the run started."""
    return dict(_COMMIT_AT_START)


def machine(threads: int | None = None, device: str = "cpu", **extra) -> dict:
    """CPU, cores, torch threads, library versions, device (the card's name on CUDA) and load averages."""
    import torch

    info = {"cpu": _cpu_name(), "vector": _vector_extension(), "cores": os.cpu_count(),
            "threads": threads or torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "device": device,
            "load_average_at_start": [round(x, 2) for x in _LOAD_AT_START],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        info["card"] = torch.cuda.get_device_name()
    return {**info, **extra}


def _vector_extension() -> str:
    """The CPU's widest vector instructions (avx512f, avx2, ...): machines that a virtualised CPU name ("AMD EPYC")
    does not tell apart differ most in this, and matrix products' speed with it."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = set(flags.split(":", 1)[1].split())
    return next((f for f in ("amx_tile", "avx512f", "avx2", "avx") if f in found), "none")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str = "cpu") -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds one call takes (the device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], reps: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each callable, run in turn (the order rotating) after one warm-up each.

    Alternating the sides within each repetition spreads the machine's drift over all of them alike.
    """
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(fns[name], device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_resident_bytes() -> int:
    """This process's peak resident memory, in bytes: Linux's VmHWM, the peak of its own address space.

    Not ru_maxrss: Linux carries it across the exec that starts a child process, so a fresh process started from a
    larger one (a benchmark that has built its models) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: KiB, or bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def tree_memory_bytes(pid: int | None = None) -> int:
    """Memory of a process (default: this one) and all its descendants, in bytes (Linux's smaps_rollup): the process's
    resident set, and each descendant's private pages. A forked worker's view of the model's weights and of the
    libraries is its parent's pages, counted once there; what it allocates or writes is its own. (Proportional set
    sizes would split shared libraries' pages with every other process that maps them, the benchmark that started
    this one included.) 0 where the system does not say."""
    total, stack, root = 0, [pid or os.getpid()], True
    while stack:
        process = stack.pop()
        try:
            for task in os.listdir(f"/proc/{process}/task"):
                with open(f"/proc/{process}/task/{task}/children") as children:
                    stack += [int(child) for child in children.read().split()]
            with open(f"/proc/{process}/smaps_rollup") as rollup:
                fields = dict(line.split()[:2] for line in rollup if line.split()[0].endswith(":"))
            counted = ("Rss:",) if root else ("Private_Clean:", "Private_Dirty:")
            total += sum(int(fields[name]) for name in counted) * 1024
        except (OSError, KeyError, ValueError):  # gone meanwhile, or no /proc
            pass
        root = False
    return total


class PeakTreeMemory:
    """The peak of `tree_memory_bytes` while the block runs, sampled every ``interval`` seconds in a thread, and at
    its end (``peak``, bytes): the memory of a process that starts workers (data-loader workers that run the model)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_memory_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_memory_bytes())


def paired_overhead(plain: Callable[[], object], extra: Callable[[], object], reps: int, device: str = "cpu") -> float:
    """Median over reps of extra's time over plain's, each pair run back to back (the order alternating), minus 1.

    A ratio within each pair cancels the machine's drift, which medians of the two sides taken apart do not.
    """
    return statistics.median(paired_ratios(plain, extra, reps, device)) - 1


def paired_ratios(plain: Callable[[], object], extra: Callable[[], object], reps: int, device: str = "cpu"
                  ) -> list[float]:
    """Extra's time over plain's in each of reps pairs run back to back (the order alternating), after a warm-up."""
    plain(), extra()
    ratios = []
    for r in range(reps):
        if r % 2:
            e, p = timed(extra, device), timed(plain, device)
        else:
            p, e = timed(plain, device), timed(extra, device)
        ratios.append(e / p)
    return ratios


def report(path: str | Path, config: dict, results: dict, ratios: dict | None = None, *,
           threads: int | None = None, device: str = "cpu", machine_extra: dict | None = None, **sections) -> Path:
    """Write the JSON report (commit, command, machine, config, results, ratios, other sections); return its path."""
    data = {**commit(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(threads, device, **(machine_extra or {})),
            "config": config, "results": results, "ratios": ratios or {}, **sections}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_results(results: dict, targets: dict, width: int = 24) -> None:
    """A metric / value / target table of a report's scalar results (None left out)."""
    print(f"\n{'metric':<{width}}{'value':>10}{'target':>10}")
    for key, value in results.items():
        if value is None:
            continue
        target = targets.get(key)
        print(f"{key:<{width}}{value:>10.3f}{'' if target is None else f'{target:>10.2f}'}")
