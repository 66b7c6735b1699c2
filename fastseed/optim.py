"""Optimisers and learning-rate schedules.

Two schedules: fastseed's per-step linear warm-up then cosine to zero (`lr_at`), its warm-up at
most `--warmup-cap` of the run's steps, and the official per-epoch one (`epoch_lr`, `--recipe
official`). `Schedule` picks one for a run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fastseed.config import Config
from fastseed.errors import ConfigError


def peak_lr(cfg: Config) -> float:
    """`cfg.lr`, or base_lr scaled to the batch: SEED/MoCo's linear rule, base_lr x batch / 256, or
    the square-root rule that LARS runs use (SimCLR, LightlyTrain), base_lr x sqrt(batch / 256)."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.lr_scaling == "sqrt":
        return cfg.base_lr * math.sqrt(cfg.batch_size / 256)
    if cfg.lr_scaling == "linear":
        return cfg.base_lr * cfg.batch_size / 256
    raise ConfigError(f"unknown --lr-scaling {cfg.lr_scaling!r}: choose linear or sqrt")


def build_optimizer(cfg: Config, module: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """`cfg.optimizer` over the trainable parameters of `module`: fused kernels on CUDA and CPU
    (on a 2-core CPU the fused SGD step of a ResNet-18 takes 7 ms, the foreach one 28 ms), but
    foreach ones over FSDP's sharded parameters: DTensor has no sharding rule for the fused SGD."""
    params = [p for p in module.parameters() if p.requires_grad]
    sharded = any(isinstance(p, DTensor) for p in params)
    fused = device.type in ("cuda", "cpu") and not sharded
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None, foreach=None if fused else True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer == "lars":
        # As LARS is used in SimCLR, BYOL and LightlyTrain: biases and norm layers' parameters
        # (1-d) take no weight decay and no trust ratio (timm's Lars adapts a group only when
        # its weight decay is non-zero), so they train at the plain lr; every weight matrix and
        # kernel takes both.
        from timm.optim import Lars
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        return Lars([g for g in groups if g["params"]], lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown --optimizer {cfg.optimizer!r}: choose sgd, lars or adamw")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine to zero, per step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_lr(epoch: int, epochs: int, warmup_epochs: float, peak: float, start: float) -> float:
    """The official schedule, one value per epoch (jacobswan1/SEED tools/utils.py:89-101; with no
    warm-up it is MoCo's main_moco.py:372-381 and SimReg's tools.py:13-18):

        epoch < W:  start + (peak - start) / W * epoch     SEED: start = lr, peak = lr x batch/256
        otherwise:  peak * (1 + cos(pi * epoch / epochs)) / 2

    The cosine counts the warm-up epochs too, so it resumes below `peak` after the warm-up."""
    if epoch < warmup_epochs:
        return start + (peak - start) / warmup_epochs * epoch
    return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclass
class Schedule:
    """The learning rate of a step for a student of peak `lr`: fastseed's per-step schedule, or
    the official per-epoch one warming up from the lr of batch 256 (SEED's lr) to `lr` (its
    lr x batch/256)."""
    cfg: Config
    steps_per_epoch: int
    total: int

    def __post_init__(self):
        if self.cfg.lr_schedule not in ("step", "epoch"):
            raise ConfigError(f"unknown lr_schedule {self.cfg.lr_schedule!r}: step or epoch")
        self.asked = int(self.cfg.warmup_epochs * self.steps_per_epoch)  # --warmup-epochs, in steps
        cap = self.cfg.warmup_cap
        if cap is not None and not 0 <= cap <= 1:
            raise ConfigError(f"--warmup-cap {cap}: give a share of the run between 0 and 1")
        # a run of a few epochs would otherwise spend them warming up (5 epochs of a 2-epoch run)
        self.warmup = self.asked if cap is None else min(self.asked, int(cap * self.total))

    def note(self) -> str | None:
        """The line said once at the start when --warmup-cap shortened the warm-up."""
        if self.cfg.lr_schedule != "step" or self.warmup >= self.asked:
            return None
        return (f"warm-up: {self.warmup} steps, not the {self.asked} of --warmup-epochs {self.cfg.warmup_epochs:g}: "
                f"at most {self.cfg.warmup_cap:.0%} of the {self.total}-step run (--warmup-cap)")

    def __call__(self, step: int, lr: float) -> float:
        c = self.cfg
        if c.lr_schedule == "epoch":
            return epoch_lr(step // self.steps_per_epoch, c.epochs, c.warmup_epochs, lr, lr * 256 / c.batch_size)
        return lr_at(step, self.total, self.warmup, lr)
