"""FFCV without its hold on torch's thread count.

FFCV 1.0.2's `Compiler.set_num_threads(n)` sets numba's threads, which its pipelines need, and
also `torch.set_num_threads(n)`. It is called when `ffcv.pipeline.compiler` is first imported
(n = 1), by every Loader and at every epoch (n = the loader's workers). So a process that imports
FFCV computes its student on one core until a Loader resets the count, and `--workers 1` trains
on one core: 165 instead of 250 images/s on a 2-core CPU (ResNet-18, batch 64); `--workers 4` on
a 64-core host leaves 60 idle. Numba's threads and torch's intra-op threads are separate pools.

`keep_torch_threads()` is called before fastseed's first FFCV import (fastseed.data, fastseed.cache,
fastseed.data_prep.write): it imports FFCV's compiler, puts back the torch count it found, and
makes `Compiler.set_num_threads` set numba's alone. Where FFCV was imported before it (by user
code, or a test module), the count it finds is the one FFCV left: tests/conftest.py calls it first.
"""
from __future__ import annotations

import os
import sys

import torch

_done = False


def keep_torch_threads() -> None:
    """Once per process: FFCV's Compiler sets numba's threads only; torch keeps its count."""
    global _done
    if _done:
        return
    imported = "ffcv.pipeline.compiler" in sys.modules
    threads = torch.get_num_threads()
    import numba
    from ffcv.pipeline.compiler import Compiler  # at its first import: Compiler.set_num_threads(1)

    def set_num_threads(cls, n: int) -> None:
        if n < 1:  # FFCV's own rule: 0 or less means every CPU
            n = os.cpu_count() or 1
        cls.num_threads = n
        numba.set_num_threads(n)

    Compiler.set_num_threads = classmethod(set_num_threads)
    if not imported:
        torch.set_num_threads(threads)
    _done = True
