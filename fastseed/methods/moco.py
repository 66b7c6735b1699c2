"""MoCo-v2 (Chen et al., 2020): the from-scratch baseline, and a way to train a teacher.

Query encoder = student + MLP head; key encoder = its momentum copy (m = 0.999);
L = CE([q̂·k̂, q̂·Q]/τ, 0), q from one view and k from the other (asymmetric, as the
official code); the keys then enter the queue. The keys come from this student's own momentum
encoder, so a MoCo run has one student, and that student is its own target source
(`targets(views, batch)`, the call `fastseed.targets` describes).
Shuffling BN: on one device the key batch is shuffled and normalised in groups, so that
batch statistics cannot leak which key is the positive (the multi-GPU shuffle, emulated).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastseed.configfile import method_recipe
from fastseed.errors import ConfigError
from fastseed.kernels import info_nce_loss
from fastseed.models import projection_head

from ._common import QUEUE_SIZE, TEMP, Queues, check_queue_size, flag
from .base import Method


class MoCo(Method):
    name = "moco"
    needs_teacher = False  # its keys come from its own momentum encoder (`targets`)
    global_views = 2       # query and key from two crops of each image
    official = method_recipe("moco-official")  # fastseed/recipes/moco-official.yaml, with its sources
    defaults = method_recipe("moco")            # fastseed/recipes/moco.yaml: MoCo-v2's τ 0.2, no clipping
    flags = (TEMP, QUEUE_SIZE, flag("--moco-m", dest="moco_m", type=float, help="key encoder momentum"))

    def __init__(self, student: nn.Module, queues: Queues, *, dim: int = 128, temp: float = 0.2,
                 moco_m: float = 0.999, bn_groups: int = 4, compile_fn=None, **_):
        super().__init__()
        self.student = student
        self.head = self.make_head(student.num_features, dim)
        self.key_encoder = nn.Sequential(copy.deepcopy(student), copy.deepcopy(self.head))
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        # compiled like the student; held as a bound method, since a compiled module held here
        # would enter the state dict a second time (under _orig_mod)
        self._encode_key = (compile_fn(self.key_encoder) if compile_fn else self.key_encoder).__call__
        self.queue = queues.queue
        self.temp, self.m, self.bn_groups = temp, moco_m, bn_groups

    @classmethod
    def from_config(cls, student: nn.Module, queues: Queues, dim: int, cfg, compile_fn=None,
                    token_dim: int | None = None) -> "MoCo":
        return cls(student, queues, dim=dim, temp=cfg.temp, moco_m=cfg.moco_m, compile_fn=compile_fn)

    @staticmethod
    def make_head(in_dim: int, out_dim: int) -> nn.Module:
        """Its head, as `__init__` builds it (fastseed-export rebuilds it from a checkpoint)."""
        return projection_head(in_dim, out_dim)

    @staticmethod
    def augment_preset(teacher_format: str | None, small_crops: int) -> str:
        """'moco_v2' (facebookresearch/moco README: --aug-plus)."""
        return "moco_v2"

    @staticmethod
    def check(cfg, students: int) -> None:
        if students > 1:
            raise ConfigError(f"--method moco trains one student (its keys come from its own momentum encoder): "
                              f"pass one -a, not {cfg.arch}")
        if cfg.teacher_cache is not None:
            raise ConfigError("--teacher-cache holds a teacher's keys; --method moco has no teacher: "
                              "drop one or the other")
        if cfg.dense_weight or cfg.local_weight:
            raise ConfigError("--dense-weight and --local-weight distil a teacher's patch tokens; --method moco has "
                              "no teacher")
        check_queue_size(cfg)

    @staticmethod
    def make_queues(*, dim: int, queue_size: int, queue_dtype: torch.dtype = torch.float32, **_) -> Queues:
        return Queues(queue_size, dim, queue_dtype)

    @classmethod
    def queues_for(cls, cfg, dim: int, queue_dtype: torch.dtype) -> Queues:
        return cls.make_queues(dim=dim, queue_size=cfg.queue_size, queue_dtype=queue_dtype)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        q = [p.detach() for p in (*self.student.parameters(), *self.head.parameters())]
        k = list(self.key_encoder.parameters())
        torch._foreach_lerp_(k, q, 1.0 - self.m)

    @torch.no_grad()
    def targets(self, views: list[torch.Tensor], batch=None) -> tuple[torch.Tensor, ...]:
        """Keys of the second view, key encoder in train mode with shuffled BN groups."""
        self._momentum_update()
        x = views[1]
        perm = torch.randperm(x.shape[0], device=x.device)
        groups = max(1, min(self.bn_groups, x.shape[0] // 2))
        k = torch.cat([self._encode_key(c) for c in x[perm].chunk(groups)])
        return (torch.empty_like(k).index_copy_(0, perm, k),)

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        q = self.head(self.student(views[0]))
        return info_nce_loss(q, targets[0], self.queue.keys, temp=self.temp)
