"""SEED (Fang et al., ICLR 2021): the student mimics the teacher's similarity distribution
over a queue of teacher keys.

    a = [ŝ·t̂, ŝ·Q]/τS,  b = [t̂·t̂, t̂·Q]/τT,  L = mean_i CE(softmax(b_i), log_softmax(a_i))

then the teacher keys enter the queue. Small-patch variant: the small crops have a queue of
their own and L = CE224 + CE96. As in the official code (jacobswan1/SEED,
seed/small_patch_builder.py), only crop 0's teacher key of each image enters the small queue,
at the rows the image's large-crop key takes in the large queue: one pointer for both, so both
queues turn over once per K images and hold one key per image (`small_enqueue="all"` pushes
every small crop's key instead, N times as fast).
"""
from __future__ import annotations

import torch
from torch import nn

from fastseed.kernels import seed_loss
from fastseed.models import projection_head

from ._common import FrozenTeacher, Queue


class SEED(nn.Module):
    def __init__(self, student: nn.Module, teacher: FrozenTeacher, *, dim: int, queue_size: int,
                 temp: float = 0.2, distill_t: float = 1e-4, small_crops: int = 0,
                 small_enqueue: str = "first", queue_dtype: torch.dtype = torch.float32, **_):
        super().__init__()
        self.student = student
        self.head = projection_head(student.num_features, dim)
        self.queue = Queue(queue_size, dim, queue_dtype, seed=1)
        self.small_queue = Queue(queue_size, dim, queue_dtype, seed=2) if small_crops else None
        self.temp, self.distill_t, self.small_enqueue = temp, distill_t, small_enqueue
        self.teacher = teacher  # plain attribute: not a submodule

    @property
    def encoder(self) -> nn.Module:
        return self.student

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.student(x))

    @torch.no_grad()
    def targets(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Student and teacher see the same view. Small crops are batched into one call."""
        small = views[1:]
        out = (self.teacher(views[0]),)
        if small:
            out += (self.teacher(torch.cat(small)),)
        return out

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = seed_loss(self.embed(views[0]), targets[0], self.queue.keys,
                         student_temp=self.temp, teacher_temp=self.distill_t)
        if len(views) > 1:
            loss = loss + seed_loss(self.embed(torch.cat(views[1:])), targets[1], self.small_queue.keys,
                                    student_temp=self.temp, teacher_temp=self.distill_t)
        return loss

    @torch.no_grad()
    def update(self, targets: tuple[torch.Tensor, ...]) -> None:
        # only after backward: the fused loss's backward re-reads the queue rows
        if len(targets) > 1:
            small = targets[1]  # crop-major: crop c of image b is row c*B + b
            if self.small_enqueue == "first":
                self.small_queue.ptr.copy_(self.queue.ptr)  # the large queue's pointer, before it moves
                small = small[:targets[0].shape[0]]
            self.small_queue.push(small)
        self.queue.push(targets[0])
