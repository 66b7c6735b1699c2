"""The method contract: what the rest of fastseed asks of an objective, with the answers most
methods give. A method subclasses `Method` and overrides what differs (docs/ARCHITECTURE.md,
"Adding an objective").

A run resolves its method once (`fastseed.methods.method_class`, from `cfg.method`, in the CLI or
at the start of `fastseed.train.prepare`) and passes the class on: the class answers the
questions asked before any student exists (what the teacher distils, which queues, which
augmentation), and `from_config` builds each student's instance, the module that trains.
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import Queues


class Method(nn.Module):
    """One student's objective: its backbone (`student`), its head, and its loss. Class-level
    members describe the method; the defaults below are what a method distilling one frozen
    teacher's keys, on one crop, without queues, answers."""

    name: str = ""                 # its `--method` name
    needs_teacher: bool = True     # a frozen teacher makes its targets; False: `targets()` makes them
    global_views: int = 1          # crops per image the student sees (MoCo: 2, query and key)
    official: dict | None = None   # its official recipe (fastseed/recipes/<name>-official.yaml), or None
    defaults: dict = {}            # where fastseed's recipe differs from Config's defaults
    flags: tuple = ()              # its command-line flags (`_common.flag`), added by fastseed/cli.py
    target_flags: tuple = ()       # the flags that decide `teacher_target` (fastseed-cache has them too)
    student: nn.Module

    # what the run asks of the method before any student exists
    @classmethod
    def teacher_target(cls, cfg) -> str | None:
        """What of the teacher it distils: 'head' (its projection), 'backbone' (its pooled
        features) or None (no teacher)."""
        return "backbone" if cls.needs_teacher else None

    @classmethod
    def teacher_tokens(cls, cfg) -> bool:
        """Whether its targets end with the teacher's token map [B, C, h, w] (methods/dense.py)."""
        return False

    @staticmethod
    def augment_preset(teacher_format: str | None, small_crops: int) -> str:
        """Its official augmentation preset for this teacher's checkpoint format (`--aug auto`):
        'weak' (crop and flip) unless it says otherwise, for a regression on one view that
        student and teacher share (--method dense)."""
        return "weak"

    @staticmethod
    def check(cfg, students: int) -> None:
        """ConfigError for a setting it cannot run with (`students`: how many train in the run)."""

    @classmethod
    def queues_for(cls, cfg, dim: int, queue_dtype: torch.dtype) -> Queues | None:
        """The run's queues of `dim`-d keys, shared by every student; None for a method without."""
        return None

    @staticmethod
    def make_queues(**sizes) -> Queues | None:
        """`queues_for` from explicit sizes (`dim`, `queue_size`, ...: tests and tools)."""
        return None

    @staticmethod
    def teacher_inputs(views: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the teacher sees, one batch per target: the first crop."""
        return [views[0]]

    @staticmethod
    def loss_targets(cfg, targets: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The targets its loss sees, made from the source's once per step, outside the compiled
        loss: as they are."""
        return targets

    # export: its head rebuilt from a checkpoint
    @staticmethod
    def head_kind(state: dict[str, torch.Tensor]) -> str | None:
        """The kind of a saved head (`--head`), for a method with several; None: one kind."""
        return None

    @staticmethod
    def make_head(in_dim: int, out_dim: int, kind: str | None = None) -> nn.Module:
        """Its embedding head, as `__init__` builds it; `kind`: `head_kind`'s answer."""
        raise NotImplementedError

    # one student
    @classmethod
    def from_config(cls, student: nn.Module, queues: Queues | None, dim: int, cfg, compile_fn=None,
                    token_dim: int | None = None) -> "Method":
        """One student's objective around the run's shared `queues` (`token_dim`: the teacher's token
        width, when it asked for tokens; `compile_fn`: for modules it runs outside its forward)."""
        raise NotImplementedError

    @property
    def encoder(self) -> nn.Module:
        """The backbone that is evaluated and exported (no head)."""
        return self.student

    def targets(self, views: list[torch.Tensor], batch=None) -> tuple[torch.Tensor, ...]:
        """Its own targets, for a method without a teacher (`needs_teacher` False)."""
        raise NotImplementedError(f"--method {self.name} takes its targets from a teacher")

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss: what DDP wraps and torch.compile traces."""
        raise NotImplementedError
