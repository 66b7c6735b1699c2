"""One objective per file. A method owns its student, head and queue; the loop does not know
which method it runs. Every method has the same four calls:

    targets(views) -> tuple      teacher (or key-encoder) embeddings, no gradient
    forward(views, targets)      the loss (this is what DDP wraps and torch.compile traces)
    update(targets)              after the optimizer step: enqueue, momentum update
    encoder                      the backbone to evaluate and export (no head)
"""
from __future__ import annotations

from .moco import MoCo
from .seed import SEED
from .simreg import SimReg

METHODS = {"seed": SEED, "simreg": SimReg, "moco": MoCo}

__all__ = ["SEED", "SimReg", "MoCo", "METHODS"]
