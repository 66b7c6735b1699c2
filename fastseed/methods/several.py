"""Several teachers, one student (`-k a,b`; fastseed/teachers/several.py splits the settings):
the student's pooled feature goes through one summary head per teacher, each to its teacher's
embedding width, and the loss is the weighted mean of one loss per teacher over the teachers
kept at this step:

    L = Σ_i k_i·w_i·L_i / Σ_i k_i·w_i

w_i: `--teacher-weights` (default 1 each); k_i ∈ {0, 1}: whether teacher i counts at this step
(`--teacher-drop`, `fastseed.teachers.several.keep_mask`; at least one does). A dropped teacher
is multiplied by 0, not skipped: every head is in every step's graph (DDP's static graph, one
compiled graph), its gradient zero. L_i, `--summary-loss`:

    cosine        2 − 2·cos(p_i, t_i), SimReg's loss (fastseed/methods/simreg.py), the default
    cos-smoothl1  0.5·(1 − cos(p_i, t_i)) + 0.5·smoothL1_β=1(p_i, t_i) averaged over dimensions:
                  UNIC's summary loss (Sariyildiz et al., "UNIC: Universal Classification Models
                  via Multi-teacher Distillation", ECCV 2024; its released loss, λ_cos = λ_sL1 = 0.5);
                  AM-RADIO (Ranzinger et al., CVPR 2024) and Theia combine the same two terms

each a mean over the batch, p_i the head's prediction, t_i teacher i's key (standardised per
dimension over the global batch with `--simreg-targets standardize`, as SimReg's).

Only SimReg distils several teachers here (`several_method`). The heads are the student's
(optimised, checkpointed under `buffers` as `heads.<i>.*`); k-NN and fastseed-export use the
backbone alone, as they drop SimReg's head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.errors import ConfigError
from fastseed.teachers.several import teacher_archs, teacher_configs, teacher_weights

from .base import Method
from .simreg import SimReg, standardize


def summary_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """One teacher's loss, a scalar: the mean over the batch of the module docstring's L_i."""
    cos = F.cosine_similarity(pred, target, dim=1)
    if kind == "cosine":
        return (2 - 2 * cos).mean()
    return 0.5 * (1 - cos).mean() + 0.5 * F.smooth_l1_loss(pred, target, beta=1.0)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ k_i·w_i·L_i / Σ k_i·w_i of the per-teacher `losses` [n], `weights` [n] and `keep` [n] (0/1)."""
    w = weights * keep
    return (w * losses).sum() / w.sum()


class SummaryHeads(nn.ModuleList):
    """One head per teacher on the pooled student feature; a call gives each head's prediction.
    A module with a forward, so FSDP2 gathers its shards as it does for `head`."""

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        return [head(pooled) for head in self]


class SimRegSeveral(SimReg):
    """SimReg from several teachers: a head per teacher (`--head`'s kind, to that teacher's
    width), the loss of the module docstring. Its targets are one key per teacher, in `-k`
    order, then the keep mask [n] (fastseed.train.train_step appends it)."""

    def __init__(self, student: nn.Module, queues=None, *, dims: tuple[int, ...], head: str = "linear",
                 weights: list[float] | None = None, loss: str = "cosine", **_):
        Method.__init__(self)  # not SimReg's: it builds one head
        self.student = student
        self.heads = SummaryHeads([self.make_head(student.num_features, d, head) for d in dims])
        self.register_buffer("weights", torch.tensor(weights or [1.0] * len(dims)), persistent=False)
        self.summary = loss  # --summary-loss

    @classmethod
    def from_config(cls, student: nn.Module, queues, dim, cfg, compile_fn=None,
                    token_dim: int | None = None) -> "SimRegSeveral":
        """`dim`: the teachers' key widths, one per teacher (fastseed.targets.SeveralTargets.dims)."""
        return cls(student, queues, dims=tuple(dim), head=cfg.head, weights=teacher_weights(cfg),
                   loss=cfg.summary_loss)

    @staticmethod
    def check(cfg, students: int) -> None:
        SimReg.check(cfg, students)
        k = f"-k {cfg.teacher_arch}"
        if cfg.dense_weight > 0 or cfg.local_weight > 0:
            raise ConfigError(f"the token losses (--dense-weight, --local-weight) distil one teacher's patch tokens: "
                              f"not with several teachers ({k}) yet; drop them, or distil one teacher")
        if cfg.teacher_cache is not None:
            raise ConfigError(f"a teacher cache holds one teacher's keys: with several teachers ({k}) drop "
                              "--teacher-cache")
        if cfg.small_crops:
            raise ConfigError(f"--small-crops is not supported with several teachers ({k}) yet: drop it")
        if cfg.dim is not None:
            raise ConfigError(f"--dim names one key width; with several teachers ({k}) each head ends at its "
                              "teacher's width: drop --dim")

    @staticmethod
    def loss_targets(cfg, targets: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Each teacher's keys, standardised with every rank's rows under `--simreg-targets standardize`."""
        if cfg.simreg_targets == "standardize":
            return tuple(standardize(t) for t in targets)
        return targets

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = torch.cat(views) if len(views) > 1 else views[0]
        *keys, keep = targets
        preds = self.heads(self.student(x))
        losses = torch.stack([summary_loss(p.float(), t.float(), self.summary) for p, t in zip(preds, keys)])
        return weighted_loss(losses, self.weights, keep)


SEVERAL = {SimReg: SimRegSeveral}  # each method that distils several teachers, and the form that does


def several_method(method: type[Method], cfg) -> type[Method]:
    """The form of `method` that distils `cfg`'s teachers: `method` itself for one teacher; for
    several, its several-teacher form (ConfigError for a method without one). `cfg`'s teacher
    lists are checked against -k either way (`teacher_configs`)."""
    teacher_configs(cfg)
    if len(teacher_archs(cfg)) == 1:
        return method
    if method not in SEVERAL:
        supported = ", ".join(f"--method {m.name}" for m in SEVERAL)
        raise ConfigError(f"several teachers (-k {cfg.teacher_arch}) are distilled by {supported} only; --method "
                          f"{method.name} distils one teacher: pass one -k, or {supported}")
    return SEVERAL[method]
