"""SimReg (Navaneet et al., BMVC 2021): the student, through a deep MLP predictor that is
dropped after training, regresses the teacher's L2-normalised features:

    L = mean_i 2 − 2·cos(pred(s_i), t_i)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.models import simreg_predictor


class SimReg(nn.Module):
    def __init__(self, student: nn.Module, queues=None, *, dim: int, **_):
        super().__init__()
        self.student = student
        self.head = simreg_predictor(student.num_features, dim)

    @staticmethod
    def make_queues(**_) -> None:
        return None  # no queue: nothing is shared but the teacher's targets

    @staticmethod
    def teacher_inputs(views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(views) if len(views) > 1 else views[0]]

    @property
    def encoder(self) -> nn.Module:
        return self.student

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = torch.cat(views) if len(views) > 1 else views[0]
        pred = self.head(self.student(x)).float()
        return (2 - 2 * F.cosine_similarity(pred, targets[0].float(), dim=1)).mean()
