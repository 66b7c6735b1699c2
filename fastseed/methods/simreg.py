"""SimReg (Navaneet et al., BMVC 2021): the student, through a deep MLP predictor that is
dropped after training, regresses the teacher's L2-normalised features:

    L = mean_i 2 − 2·cos(pred(s_i), t_i)

`--simreg-targets standardize` (fastseed's recipe; the paper regresses `raw` keys) first
standardises each dimension of the targets over the global batch, t ← (t − mean) / (std + 1e-5):
an ImageNet teacher's features of a narrow domain share a large common component, which the raw
cosine mostly spends the student on (docs/objectives.md, "Recipes at equal steps": SimReg on MNIST-5k).
`--dense-weight W` adds W × the patch-token loss (fastseed/methods/dense.py), `--local-weight W`
W × the patch-relation loss (fastseed/methods/local.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.configfile import method_recipe
from fastseed.errors import ConfigError
from fastseed.models import simreg_predictor
from fastseed.runtime import gather_rows

from ._common import HEAD, flag, head_kind, linear_head
from .base import Method
from .dense import DENSE_WEIGHT, DenseHead, backbone_features, check_dense
from .local import LOCAL_T, LOCAL_WEIGHT, LocalHead, check_local, token_losses


TARGETS = ("raw", "standardize")
STD_EPS = 1e-5


def standardize(keys: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """`keys` [B, D] (this rank's rows) with each dimension standardised over the global batch:
    (k − mean) / (std + eps), mean and std (unbiased) over every rank's rows, in float32, so a
    run on N ranks regresses what one process with the whole batch would."""
    rows = gather_rows(keys).float()
    return (keys.float() - rows.mean(0)) / (rows.std(0) + eps)


class SimReg(Method):
    name = "simreg"
    needs_teacher = True
    global_views = 1
    official = method_recipe("simreg-official")  # fastseed/recipes/simreg-official.yaml, with its sources
    defaults = method_recipe("simreg")            # fastseed/recipes/simreg.yaml: measured at equal steps
    target_flags = (flag("--simreg-target", dest="simreg_target", choices=["backbone", "projection"],
                         help="SimReg regresses the teacher's pooled backbone (default) or its projection"),)
    flags = (*target_flags, DENSE_WEIGHT, LOCAL_WEIGHT, LOCAL_T, HEAD,
             flag("--simreg-targets", dest="simreg_targets", choices=TARGETS,
                  help="SimReg regresses the teacher's keys as they are (raw: the paper's, --recipe official) or "
                       "each dimension standardised over the global batch (standardize: the default)"))

    def __init__(self, student: nn.Module, queues=None, *, dim: int, dense_weight: float = 0.0,
                 token_dim: int | None = None, head: str = "mlp", local_weight: float = 0.0, local_t: float = 0.07,
                 **_):
        super().__init__()
        self.student = student
        self.head = self.make_head(student.num_features, dim, head)
        self.dense_weight, self.local_weight = dense_weight, local_weight
        if dense_weight:
            self.dense = DenseHead.for_student(student, token_dim)
        if local_weight:
            self.local = LocalHead.for_student(student, token_dim, local_t)

    @classmethod
    def from_config(cls, student: nn.Module, queues, dim: int, cfg, compile_fn=None,
                    token_dim: int | None = None) -> "SimReg":
        return cls(student, queues, dim=dim, dense_weight=cfg.dense_weight, token_dim=token_dim, head=cfg.head,
                   local_weight=cfg.local_weight, local_t=cfg.local_t)

    @staticmethod
    def make_head(in_dim: int, out_dim: int, kind: str = "mlp") -> nn.Module:
        """Its head, as `__init__` builds it (fastseed-export rebuilds it from a checkpoint): SimReg's
        deep predictor, or one Linear (`--head linear`, after a BatchNorm1d with `bn-linear`)."""
        if kind in ("linear", "bn-linear"):
            return linear_head(in_dim, out_dim, kind)
        return simreg_predictor(in_dim, out_dim)

    head_kind = staticmethod(head_kind)  # fastseed-export: the kind of a saved head

    @staticmethod
    def teacher_target(cfg) -> str:
        """The pooled backbone (fc removed) unless --simreg-target projection (SimReg's --teacher_fc)."""
        return "head" if cfg.teacher_use_head and cfg.simreg_target == "projection" else "backbone"

    @staticmethod
    def augment_preset(teacher_format: str | None, small_crops: int) -> str:
        """'weak', on one view for student and teacher (UCDvision/simreg run.sh: --single_aug --weak_weak)."""
        return "weak"

    @staticmethod
    def teacher_tokens(cfg) -> bool:
        """Whether its targets end with the teacher's token map (`--dense-weight`, `--local-weight`)."""
        return cfg.dense_weight > 0 or cfg.local_weight > 0

    @staticmethod
    def check(cfg, students: int) -> None:
        check_dense(cfg, cfg.dense_weight)
        check_local(cfg)
        if cfg.simreg_targets not in TARGETS:
            raise ConfigError(f"simreg_targets {cfg.simreg_targets!r}: choose {' or '.join(TARGETS)}")
        if cfg.simreg_targets == "standardize" and cfg.batch_size < 2:
            raise ConfigError("--simreg-targets standardize needs a batch of at least 2 images (a std over one "
                              "row is undefined): raise --batch-size or pass --simreg-targets raw")

    @staticmethod
    def loss_targets(cfg, targets: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """What its loss regresses: the source's keys, or with `--simreg-targets standardize` the
        keys (targets[0]; not a token map after them) standardised with every rank's rows."""
        if cfg.simreg_targets == "standardize":
            return (standardize(targets[0]), *targets[1:])
        return targets

    @staticmethod
    def teacher_inputs(views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(views) if len(views) > 1 else views[0]]

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = torch.cat(views) if len(views) > 1 else views[0]
        tokens = self.dense_weight or self.local_weight
        if tokens:  # one backbone pass: the map for the token losses, its pooling for the predictor
            pooled, fmap = backbone_features(self.student, x)
        else:
            pooled = self.student(x)
        pred = self.head(pooled).float()
        loss = (2 - 2 * F.cosine_similarity(pred, targets[0].float(), dim=1)).mean()
        if tokens:
            loss = loss + token_losses(self, fmap, targets[-1])
        return loss
