"""The benchmark reports (scripts/_bench.py) and the results page written from them (scripts/results_page.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def modules():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import _bench
        import results_page
    finally:
        sys.path.remove(str(SCRIPTS))
    return _bench, results_page


def test_report_records_provenance(modules, tmp_path):
    _bench, _ = modules
    path = _bench.report(tmp_path / "x" / "speed.json", config={"batch": 2}, results={"a": 1.0}, ratios={"a_vs_b": 2.0},
                         threads=1, extra_section={"k": 1})
    data = json.loads(path.read_text())
    assert data["commit"] and isinstance(data["dirty"], bool)  # this test runs inside the git checkout
    assert data["command"] and data["date"]
    machine = data["machine"]
    assert machine["threads"] == 1 and machine["cores"] >= 1 and machine["torch"]
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert machine["vector"] in flags.split() and machine["vector"].startswith(("avx", "amx"))  # this x86-64 machine
    assert len(machine["load_average_at_start"]) == 3 and len(machine["load_average_at_end"]) == 3
    assert (data["config"], data["results"], data["ratios"], data["extra_section"]) == (
        {"batch": 2}, {"a": 1.0}, {"a_vs_b": 2.0}, {"k": 1})


def test_alternate_rotates_and_takes_medians(modules):
    _bench, _ = modules
    calls = []
    seconds = _bench.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # one warm-up each, then the order rotates
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_results_page_has_a_section_per_report_and_none_without(modules, tmp_path):
    _bench, results_page = modules
    _bench.report(tmp_path / "ptb_parity.json", config={"n": 10, "seed": 0},
                  results={"strings": 12, "differing": 0, "differences": []})
    _bench.report(tmp_path / "something_new.json", config={}, results={"speed": {"ours": 2.5}}, ratios={"x_vs_y": 1.5})
    page = results_page.render_page(tmp_path)
    assert "## PTB tokenizer parity" in page and "| 12 | **0** |" in page
    assert "## Something new" in page and "| speed.ours | 2.500 |" in page and "| ratio x_vs_y | 1.50 |" in page
    assert "[ptb_parity.json](../benchmarks/results/ptb_parity.json)" in page
    for missing in ("## Quality", "## Grounding", "## Speed", "## Serving"):  # no report, no section
        assert missing not in page


def test_results_page_tabulates_the_default_recipe_across_seeds(modules, tmp_path):
    _bench, results_page = modules
    scores = {"train_minutes": 6.0, "train_steps": 800, "vqa_accuracy": 0.97, "CIDEr-D": 6.2, "pointing_game": 0.944,
              "mass_in_box": 0.63}
    _bench.report(tmp_path / "quality.json", config={"model": "m", "num_scenes": 500, "train_args": []},
                  results=scores)
    _bench.report(tmp_path / "quality_seed1.json", config={"model": "m", "num_scenes": 500,
                                                           "train_args": ["--trainer.seed", "1"]},
                  results={**scores, "pointing_game": 0.812})
    _bench.report(tmp_path / "quality_seed1_captions1.json", config={"model": "m", "num_scenes": 500,
                                                                     "train_args": ["--trainer.seed", "1"]},
                  results={**scores, "pointing_game": 0.7})
    _bench.report(tmp_path / "quality_seed1_captions2.json", config={
        "model": "m", "num_scenes": 500, "train_args": ["--trainer.seed", "1", "--data.captions_per_image", "2"]},
        results={**scores, "pointing_game": 0.9})
    page = results_page.render_page(tmp_path)
    assert page.index("## Quality of the default model") < page.index("## The default recipe across seeds")
    rows = [line for line in page.splitlines() if "[quality" in line and line.startswith("| ")]
    assert [row.split(" | ")[:2] for row in rows] == [  # the run above first; captions per image of each
        ["| (defaults)", "3"], ["| `--trainer.seed 1`", "3"], ["| `--trainer.seed 1`", "1"],
        ["| `--trainer.seed 1 --data.captions_per_image 2`", "2"]]
    assert "| `--trainer.seed 1` | 3 | 6.0 | 800 | 0.970 | 6.20 | 0.812 | 0.630 | [quality_seed1.json]" in page
    assert "## Quality seed1" not in page  # a seed's report is a row of the table, not a section of its own


def test_predict_section_shows_where_the_time_goes(modules, tmp_path):
    _bench, results_page = modules
    _bench.report(tmp_path / "predict.json", config={"images": 10, "batch_size": 2, "new_tokens": 4},
                  results={"images_per_s": {"predict": 3.0, "loop": 2.0}, "maps_overhead": 0.1,
                           "peak_memory": {"1_images_mib": 5.0}, "scaling_wall_s": {"1_processes_s": 1.0}},
                  ratios={"predict_default_over_loop_default": 1.6, "predict_over_loop": 1.5},
                  profile={"unit": "seconds per 1000 images", "predict": {"wall": 8.1, "encode": 9.18},
                           "loop": {"wall": 10.9, "encode": 4.74, "text": 0.02},
                           "loop_default": {"wall": 5.0, "encode": 1.0}, "loop_one_thread": {"encode": 3.0}},
                  roofline_ratio_ceilings={"predict_over_loop": 2.5}, work_ratio_bounds={"predict_over_loop": 1.25})
    page = results_page.render_page(tmp_path)
    assert "| ratio predict_default_over_loop_default | 1.60 | >= 1.5 |" in page  # the target for it
    assert "| ratio predict_over_loop (ceiling 2.50, work bound 1.25) | 1.50 | >= 1.5 |" in page
    assert "| stage | predict | plain loop | plain loop, default model | plain loop, 1 thread |" in page
    assert "Where the time goes, in seconds per 1000 images" in page
    assert "| encode | 9.18 | 4.74 | 1.00 | 3.00 |" in page and "| text |  | 0.02 |  |  |" in page


def test_onednn_section_takes_the_speed_ups_from_min_product_up(modules, tmp_path):
    _bench, results_page = modules
    _bench.report(tmp_path / "onednn.json", config={"reps": 3, "rows": [1, 32, 64]},
                  results={"largest_losing_product": {"1_threads": 65536}, "min_product": 1_100_000,
                           "model": {"ms_per_image": {"onednn": 3.0, "torch": 4.5}, "same_tokens": True},
                           "training": {"ms_per_step": {"onednn": 300.0, "torch": 450.0},
                                        "largest_relative_gradient_difference": 2e-6}},
                  ratios={"model_onednn_vs_torch": 1.5, "training_onednn_vs_torch": 1.5},
                  speedups={"1_threads": {"1x256x256": 0.3, "16x256x256": 1.9, "32x256x256": 1.2, "64x256x256": 2.0,
                                          "256x256x256": 1.4}})
    page = results_page.render_page(tmp_path)
    assert "## oneDNN products on the CPU" in page
    assert "| 1 threads | 1.20-2.00x | 1.40x | 65,536 |" in page  # 16 rows (1,048,576) lie under MIN_PRODUCT
    assert "| encode + generate, ms per image | 4.500 | 3.000 | 1.50 | the same tokens: True |" in page
    assert "| training step, ms | 450.0 | 300.0 | 1.50 | gradients differ by 2.0e-06 at most (relative) |" in page


def test_a_fresh_process_reports_its_own_peak_memory_not_its_parents(modules):
    """Memory probes run in fresh processes started from a benchmark that holds its models: ru_maxrss would carry
    the parent's size over the exec."""
    _bench, _ = modules
    held = np.ones(2**28, dtype=np.uint8)  # 256 MiB, every page touched
    code = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import _bench; print(_bench.peak_resident_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert _bench.peak_resident_bytes() > held.nbytes  # this process's peak counts what it holds
    assert child < held.nbytes / 4  # the child's is its own: a Python interpreter, tens of MiB


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's /proc")
def test_the_tree_memory_probe_counts_a_workers_memory_and_the_pages_it_shares_once(modules):
    """`vlm predict`'s data-loader workers run the model: their memory counts, and the pages a forked worker shares
    with its parent (the model's weights) count once, not once per process as resident sizes would."""
    _bench, _ = modules
    shared = np.ones(2**27, dtype=np.uint8)  # 128 MiB, touched before the fork
    before = _bench.tree_memory_bytes()
    grows = "import numpy, time; held = numpy.ones(2**28, dtype=numpy.uint8); print(1, flush=True); time.sleep(30)"
    worker = subprocess.Popen([sys.executable, "-c", grows], stdout=subprocess.PIPE, text=True)
    forked = os.fork()
    if forked == 0:  # reads the shared pages, as a data-loader worker reads the weights, and waits
        time.sleep(30 if int(shared[::4096].sum()) else 0)
        os._exit(0)
    try:
        assert worker.stdout.readline().strip() == "1"  # the worker holds its 256 MiB
        with _bench.PeakTreeMemory(interval=0.05) as probe:
            time.sleep(0.2)
    finally:
        worker.kill()
        os.kill(forked, signal.SIGKILL)
        worker.wait()
        os.waitpid(forked, 0)
    added = probe.peak - before
    assert 2**28 < added < 2**28 + 2**26 + 2**25  # the worker's 256 MiB and an interpreter, not the 128 MiB again
