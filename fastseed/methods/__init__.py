"""One objective per file. A method is one student's objective: its backbone and head; the
queues of keys it compares against are shared by every student of a run. The loop does not
know which method it runs. Every method has the same calls:

    make_queues(dim=, queue_size=, ...)   (static) the run's `Queues`, or None (SimReg)
    Method(student, queues, dim=, ...)    one student's objective
    teacher_inputs(views) -> list         (static) what the teacher sees, one batch per target
                                          (MoCo instead makes its own keys: `MoCo.targets`)
    forward(views, targets)               the loss (what DDP wraps and torch.compile traces)
    encoder                               the backbone to evaluate and export (no head)
    queues.update(targets)                once per step, after every student's backward: enqueue
"""
from __future__ import annotations

from .moco import MoCo
from .seed import SEED
from .simreg import SimReg

METHODS = {"seed": SEED, "simreg": SimReg, "moco": MoCo}

__all__ = ["SEED", "SimReg", "MoCo", "METHODS"]
