"""SEED (Fang et al., ICLR 2021): the student mimics the teacher's similarity distribution
over a queue of teacher keys.

    a = [ŝ·t̂, ŝ·Q]/τS,  b = [t̂·t̂, t̂·Q]/τT,  L = mean_i CE(softmax(b_i), log_softmax(a_i))

then the teacher keys enter the queue. Small-patch variant: the small crops have a queue of
their own and L = CE224 + CE96; which small keys enter it: `Queues`. The queues hold teacher
keys only, so every student of a run shares them.
"""
from __future__ import annotations

import torch
from torch import nn

from fastseed.kernels import seed_loss
from fastseed.models import projection_head

from ._common import Queues


class SEED(nn.Module):
    def __init__(self, student: nn.Module, queues: Queues, *, dim: int, temp: float = 0.2,
                 distill_t: float = 1e-4, **_):
        super().__init__()
        self.student = student
        self.head = projection_head(student.num_features, dim)
        self.queue, self.small_queue = queues.queue, queues.small_queue  # shared by every student
        self.temp, self.distill_t = temp, distill_t

    @staticmethod
    def make_queues(*, dim: int, queue_size: int, queue_dtype: torch.dtype = torch.float32, small_crops: int = 0,
                    small_enqueue: str = "first", **_) -> Queues:
        return Queues(queue_size, dim, queue_dtype, small_crops, small_enqueue)

    @staticmethod
    def teacher_inputs(views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student and teacher see the same view. Small crops are batched into one call."""
        return [views[0], torch.cat(views[1:])] if len(views) > 1 else [views[0]]

    @property
    def encoder(self) -> nn.Module:
        return self.student

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.student(x))

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = seed_loss(self.embed(views[0]), targets[0], self.queue.keys,
                         student_temp=self.temp, teacher_temp=self.distill_t)
        if len(views) > 1:
            loss = loss + seed_loss(self.embed(torch.cat(views[1:])), targets[1], self.small_queue.keys,
                                    student_temp=self.temp, teacher_temp=self.distill_t)
        return loss
