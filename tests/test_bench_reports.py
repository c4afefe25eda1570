"""The benchmark reports (scripts/_bench.py) and the results page written from them (scripts/results_page.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
