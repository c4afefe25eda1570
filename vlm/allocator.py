"""Freed host memory kept for reuse while a model infers on the CPU, as PyTorch's caching allocator does on GPUs.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block of 128 KiB or more (a threshold that
grows as such blocks are freed) by mapping fresh pages from the kernel, and hands freed memory at the top of a heap
back once more than twice that lies free. An inference step allocates and frees activations of megabytes (a batch
of 32 through a ViT block: 8.5 MB for the MLP's hidden layer alone), so glibc maps and unmaps them again and again,
and every page of every such tensor is faulted in and zeroed by the kernel before the model writes it. Kept for
reuse instead, on the 2-core virtual machine of docs/results.md ("Freed memory kept", scripts/allocator.py):
encoding ran 1.7-2.8x as fast and `Captioner.caption` 1.3-1.7x, and steadier (the default model's loop over the same
1,000 images took 1.9-2.0 s or 3.6-3.9 s with glibc's defaults, as its moving threshold settled, and 2.0-2.3 s kept).
`vlm predict`, measured when it ran its batches in threads of one process, changed little (1.07-1.08x).

`keep_freed_memory` asks glibc to serve blocks of up to 32 MiB (its largest threshold) from its heaps and never to
hand freed memory back while less than 2 GiB of it lies free: the process keeps its peak resident memory, which is
what a long inference job holds anyway. `vlm.api.Captioner` calls it when it infers on the CPU, so `vlm caption`,
`vlm predict` and the Python API do (training does not). On other C libraries (macOS, musl) it does nothing. Set
`ENABLED` False before loading a model to keep the C library's defaults.
"""

from __future__ import annotations

import ctypes
import platform

ENABLED = True
"""Whether `keep_freed_memory` changes anything. Set it False to leave the C library's defaults."""

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's mallopt parameters (malloc.h)."""

MMAP_THRESHOLD = 32 * 2**20
"""Blocks below this come from the heaps: glibc's largest threshold on 64-bit systems (half its heap size)."""

TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of a heap handed back to the system only above this (mallopt's largest int)."""

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Keep this process's freed memory for reuse (once per process; the setting is the process's, inherited by
    forked data-loader workers); whether glibc took it."""
    global _kept
    if _kept is None and ENABLED:
        _kept = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                      TRIM_THRESHOLD))
    return bool(_kept)
