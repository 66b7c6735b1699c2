"""Where the targets come from: one object, one call, the same for every student of a run.

    targets(views, batch) -> tuple[Tensor, ...]

`views` are one batch's augmented views in the loader's order (the global view(s), then the
small crops), as every student sees them; `batch` is what the loader yielded beside the views
(the labels today). The result is what the students' losses compare against, computed once
per batch, without gradient, one tensor per batch of the method's `teacher_inputs(views)`:

    seed     (t(view 0) [B, D], t(the small crops, crop by crop) [N·B, D])
    simreg   (t(every view, concatenated) [V·B, D],)
    moco     (the key encoder's keys of view 1 [B, D],)   (no teacher: the one MoCo student
             makes its own keys, `MoCo.targets`, and is the run's target source)

Beside the call, a target source describes what the keys come from, for the rest of the run:
`dim` (key width: the students' heads end there), `mean_std` (the teacher's input
normalisation, which the augmentation applies), `info` (the teacher's identity, recorded in
every checkpoint and checked on resume) and `teacher` (the frozen model, for the k-NN table).

`build_targets(cfg, ...)` builds it from the config. A teacher-embedding cache plugs in here:
a class with the same attributes whose `targets` returns the stored keys read with `batch`
(`teacher` None when no live teacher is loaded), chosen by `build_targets`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastseed.config import Config
from fastseed.methods import METHODS
from fastseed.methods._common import FrozenTeacher
from fastseed.models import to_channels_last
from fastseed.teachers import load_teacher


@dataclass
class TeacherTargets:
    """The live teacher: one forward per batch of `inputs(views)`."""
    teacher: FrozenTeacher
    inputs: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    dim: int
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    info: dict

    @torch.no_grad()
    def targets(self, views: list[torch.Tensor], batch=None) -> tuple[torch.Tensor, ...]:
        return tuple(self.teacher(x) for x in self.inputs(views))


def build_targets(cfg: Config, device: torch.device, *, dtype: torch.dtype | None,
                  compile_fn: Callable[[nn.Module], nn.Module] | None) -> TeacherTargets | None:
    """The frozen teacher of `cfg` on `device` (bf16 weights when the run autocasts to bf16,
    compiled with `compile_fn`); None for MoCo, whose student makes its own keys."""
    if cfg.method == "moco":
        return None
    use_head = cfg.teacher_use_head and not (cfg.method == "simreg" and cfg.simreg_target == "backbone")
    bundle = load_teacher(cfg.teacher_arch, cfg.distill, cfg.teacher_ssl, use_head=use_head,
                          trust=cfg.trust_checkpoint)
    model = to_channels_last(bundle.model.to(device), cfg.channels_last)
    if dtype == torch.bfloat16:
        model = model.to(torch.bfloat16)  # frozen: bf16 weights halve its memory traffic
    info = {"arch": bundle.arch, "format": bundle.format, "sha256": bundle.sha256, "dim": bundle.dim,
            "checkpoint": cfg.distill}
    return TeacherTargets(FrozenTeacher(model, cfg.teacher_res, compile_fn), METHODS[cfg.method].teacher_inputs,
                          bundle.dim, (tuple(bundle.mean), tuple(bundle.std)), info)
