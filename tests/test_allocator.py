"""Freed host memory kept for reuse while a model infers on the CPU (`vlm.allocator`)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]

# A process that loads a model on the CPU (with `vlm.allocator.ENABLED` as its first argument says), then frees a
# 24 MiB tensor: glibc's defaults hand its pages back (resident memory falls by about 24 MiB), kept memory stays.
FREE_AND_MEASURE = """
import sys
import torch
import vlm.allocator
from vlm.api import Captioner

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

vlm.allocator.ENABLED = sys.argv[1] == "1"
Captioner.load(sys.argv[2], device="cpu")
block = torch.ones(6 * 2**20)
held = resident()
del block
print(vlm.allocator.keep_freed_memory(), (held - resident()) / 2**20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's setting")
def test_a_cpu_captioner_keeps_freed_memory_for_reuse(tokenizer, tiny_model, tmp_path):
    path = save_model(tiny_model, tokenizer, tmp_path / "model")
    runs = {enabled: subprocess.Popen([sys.executable, "-c", FREE_AND_MEASURE, enabled, str(path)], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for enabled in ("0", "1")}  # side by side: each pays its own start-up
    handed_back = {}
    for enabled, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        kept, mib = out.split()
        assert kept == ("True" if enabled == "1" else "False")
        handed_back[enabled] = float(mib)
    assert handed_back["0"] > 20  # the C library's defaults: the freed tensor's pages went back to the system
    assert handed_back["1"] < 4  # kept: the next activations reuse them
