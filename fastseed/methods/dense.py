"""Patch-token distillation: the student's last feature map, through a 1×1 projector dropped
after training, regresses the teacher's L2-normalised patch tokens (as LightlyTrain's
distillation v2 regresses the teacher's last-layer patch features). With the student map S
resized to the teacher's h×w grid and projected to P(S), and the teacher's token map T:

    L = mean_{b, i<h·w} ‖ P(S)_bi/‖P(S)_bi‖ − T_bi/‖T_bi‖ ‖² = mean_{b, i} 2 − 2·cos(P(S)_bi, T_bi)

A CNN teacher's last feature map is its tokens (`Teacher.features`), so any teacher has them.
`--method dense` trains L alone (with `--local-weight W`, plus W × the patch-relation loss of
fastseed/methods/local.py); `--dense-weight W` adds W·L to SEED or SimReg (their files call
`DenseHead` and `check_dense`). The tokens come with the teacher's embedding from one teacher
pass per step for every student (`fastseed.targets.TeacherTargets`: the last target); each
student's map comes from the same backbone pass as its pooled features (`backbone_features`).

Resizing the student map to the teacher grid: area (adaptive average pooling) when it shrinks,
so each teacher token is matched by the mean of the student cells over its footprint and no cell
is skipped; bilinear (align_corners=False: cell centres, as both grids cover the same crop) when
it grows, e.g. a ResNet's 7×7 at 224 px against a ViT/14's 16×16. Resize, then project: the two
commute (both resizes are per-channel weights summing to 1, the projector is affine per token),
and projecting the teacher's grid costs less whenever the student's is the larger.

The cost of storing tokens is why a teacher cache refuses them (`check_dense`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.configfile import method_recipe
from fastseed.errors import ConfigError
from fastseed.models import to_grid, token_map

from ._common import flag
from .base import Method
from .local import LOCAL_T, LOCAL_WEIGHT, LocalHead, check_local, token_losses

DENSE_WEIGHT = flag("--dense-weight", dest="dense_weight", type=float,
                    help="seed, simreg: add W x the patch-token loss (--method dense) to the objective (default 0)")


def dense_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over images and tokens of 2 − 2·cos between `student` and `teacher` [B, C, h, w]
    (the squared distance of the L2-normalised tokens), in fp32; no gradient to `teacher`."""
    return (2 - 2 * F.cosine_similarity(student.float(), teacher.detach().float(), dim=1)).mean()


def backbone_features(student: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled features (what `student(x)` gives) and the last feature map [B, C, H, W] of
    one backbone pass: timm's forward_features, then its forward_head."""
    feats = student.forward_features(x)
    return student.forward_head(feats), token_map(feats, getattr(student, "num_prefix_tokens", 0))


class DenseHead(nn.Module):
    """The projector: a 1×1 convolution from the student map's channels to the teacher's token
    width, applied on the teacher's grid; part of the method's state (checkpointed, resumed)
    and never exported (fastseed-export writes the backbone, or the backbone and `head`)."""

    def __init__(self, in_dim: int, token_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, token_dim, 1)

    @classmethod
    def for_student(cls, student: nn.Module, token_dim: int | None) -> "DenseHead":
        if token_dim is None:
            raise ConfigError("the patch-token loss needs the teacher's tokens: a live teacher, not a cache")
        return cls(getattr(student, "feature_map_dim", student.num_features), token_dim)

    def forward(self, fmap: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`dense_loss` of the student map `fmap` against the teacher's token map `tokens`. The
        loss is the forward (a call, not a method): under FSDP a call gathers the shards."""
        return dense_loss(self.proj(to_grid(fmap, tokens.shape[-2:])), tokens)


def check_dense(cfg, weight: float) -> None:
    """ConfigError for a patch-token loss of `weight` that cannot run with `cfg`.

    A teacher cache stores one key per crop; tokens would be a map per crop. With bf16 values,
    per crop: EfficientNet-Lite0 at 224 px, 7×7×1280 = 125,440 B against a 1280-d key's 2,560 B
    (49×) or a 128-d head key's 256 B (490×); DINOv2 ViT-B/14 at 224 px, 16×16×768 = 393,216 B.
    For ImageNet's 1.28M images × 10 crops: 1.6 TB and 5.0 TB, against 33 GB for the 1280-d
    keys and ~140 GB for the JPEGs themselves. So the cache refuses tokens."""
    if weight < 0:
        raise ConfigError(f"--dense-weight {weight}: give a weight >= 0")
    if weight and cfg.teacher_cache is not None:
        raise ConfigError("--teacher-cache stores one key per crop, not the teacher's patch tokens (7x7x1280 bf16 "
                          "at 224 px is 49x a 1280-d key, 1.6 TB for ImageNet x 10 crops): drop --teacher-cache "
                          "to distil tokens from the live teacher")


class Dense(Method):
    name = "dense"
    needs_teacher = True   # its targets are a frozen teacher's tokens
    global_views = 1       # student and teacher see the same crop
    official = None        # no official recipe: --recipe official refuses
    defaults = method_recipe("dense")  # fastseed/recipes/dense.yaml: measured without clipping
    flags = (DENSE_WEIGHT, LOCAL_WEIGHT, LOCAL_T)

    def __init__(self, student: nn.Module, queues=None, *, token_dim: int | None = None, local_weight: float = 0.0,
                 local_t: float = 0.07, **_):
        super().__init__()
        self.student = student
        self.dense = DenseHead.for_student(student, token_dim)  # no embedding head: nothing to pool into
        self.dense_weight, self.local_weight = 1.0, local_weight
        if local_weight:
            self.local = LocalHead.for_student(student, token_dim, local_t)

    @classmethod
    def from_config(cls, student: nn.Module, queues, dim: int, cfg, compile_fn=None, token_dim=None) -> "Dense":
        return cls(student, queues, token_dim=token_dim, local_weight=cfg.local_weight, local_t=cfg.local_t)

    @staticmethod
    def teacher_tokens(cfg) -> bool:
        return True

    @staticmethod
    def check(cfg, students: int) -> None:
        if cfg.dense_weight:
            raise ConfigError(f"--method dense trains the patch-token loss alone; --dense-weight "
                              f"{cfg.dense_weight} adds it to --method seed or simreg")
        if cfg.small_crops:
            raise ConfigError("--small-crops is SEED's small-patch variant: --method dense uses one crop")
        check_dense(cfg, 1.0)
        check_local(cfg)

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        fmap = token_map(self.student.forward_features(views[0]), getattr(self.student, "num_prefix_tokens", 0))
        return token_losses(self, fmap, targets[-1])
