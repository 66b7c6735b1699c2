"""The intra-image patch-relation loss (`--local-weight W`, `--local-t τ`): per image, how each
patch relates to the image's other patches, as the teacher sees it, is what the student learns.

With the student's last map S, through a 1×1 projector P dropped after training and resized to
the teacher's h×w token grid, and the teacher's token map T, both L2-normalised per token
(n = h·w tokens per image; i ≠ j below):

    a_ij = cos(P(S)_i, P(S)_j) / τ,   b_ij = cos(T_i, T_j) / τ
    L = mean_{b, i} Σ_{j≠i} p_ij (log p_ij − log q_ij),   p_i = softmax_j(b_i·), q_i = softmax_j(a_i·)

the KL divergence from the teacher's distribution to the student's, for every patch of every
image, over the image's other patches. A patch's similarity to itself is 1 for both and says
nothing, so it is left out of both softmaxes (LightlyTrain's distillation v3 keeps it in, where at
τ = 0.07 it takes most of each row's mass); a grid of one token has no relation to learn and is
refused. τ defaults to 0.07, as the queue loss's temperatures.

It adds to SEED, SimReg or --method dense (each calls `LocalHead` and `check_local`); the teacher's
tokens come with its embedding from the one teacher pass per step (`fastseed.targets`), and the
student's map from the same backbone pass as its pooled features (`dense.backbone_features`).
Resizing and projecting commute (`fastseed.models.to_grid`), so the projector runs on the teacher's grid.
Under DDP or FSDP each rank's images are whole: the loss is per image, and the mean over a rank's
images is what the gradient all-reduce averages, as for the other losses. The cost is one
[n, C] × [C, n] product per image for each side: at 224 px, a 7×7 or 16×16 grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.errors import ConfigError

from ._common import flag
from fastseed.models import to_grid

LOCAL_WEIGHT = flag("--local-weight", dest="local_weight", type=float,
                    help="seed, simreg, dense: add W x the intra-image patch-relation loss (the teacher's "
                         "patch-to-patch similarity distributions, KL to the student's) (default 0)")
LOCAL_T = flag("--local-t", dest="local_t", type=float,
               help="the patch-relation loss's temperature (default 0.07)")


def relation_logits(tokens: torch.Tensor, t: float) -> torch.Tensor:
    """[B, n, n − 1]: each token's cosine similarity to the image's other tokens, over `t`, from
    a token map [B, C, h, w], in fp32.

    The cosines come from the Gram matrix G = XᵀX, divided by the norms on its diagonal, not
    from normalised tokens: the [B, n, n] matrix is C/n times smaller than [B, C, n] (26x for
    1280 channels on a 7×7 grid), where normalising the tokens was the larger part of the loss's
    time in a CPU profile (B 64, 7×7). The norms are clamped at 1e-12, as F.normalize's are."""
    x = tokens.flatten(2).float()                          # [B, C, n]
    gram = torch.bmm(x.transpose(1, 2), x)                 # [B, n, n]
    norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()
    sim = gram / (norm.unsqueeze(2) * norm.unsqueeze(1) * t)
    n = sim.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return sim[:, off].view(sim.shape[0], n, n - 1)       # row i without its column i


def local_loss(student: torch.Tensor, teacher: torch.Tensor, t: float = 0.07) -> torch.Tensor:
    """The module docstring's L for the student's map `student` and the teacher's `teacher`, both
    [B, ·, h, w] on the same grid; no gradient to `teacher`."""
    if student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"student map {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} are on "
                         "different grids")
    log_q = F.log_softmax(relation_logits(student, t), dim=-1)
    log_p = F.log_softmax(relation_logits(teacher.detach(), t), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class LocalHead(nn.Module):
    """The projector of the patch-relation loss: a 1×1 convolution from the student map's
    channels to the teacher's token width, on the teacher's grid; checkpointed with the method
    and never exported, as `dense.DenseHead`."""

    def __init__(self, in_dim: int, token_dim: int, t: float = 0.07):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, token_dim, 1)
        self.t = t

    @classmethod
    def for_student(cls, student: nn.Module, token_dim: int | None, t: float) -> "LocalHead":
        if token_dim is None:
            raise ConfigError("the patch-relation loss needs the teacher's tokens: a live teacher, not a cache")
        return cls(getattr(student, "feature_map_dim", student.num_features), token_dim, t)

    def forward(self, fmap: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h, w = tokens.shape[-2:]
        if h * w < 2:
            raise ConfigError(f"--local-weight: the teacher's token grid is {h}x{w}, one token relates to no other: "
                              "raise --teacher-res (or --res) so the teacher gives at least 2 tokens")
        return local_loss(self.proj(to_grid(fmap, (h, w))), tokens, self.t)


def check_local(cfg) -> None:
    """ConfigError for a patch-relation loss that cannot run with `cfg`: a negative weight, a
    temperature <= 0, or a teacher cache (it stores one key per crop, not tokens:
    `dense.check_dense` says what tokens would cost)."""
    if cfg.local_weight < 0:
        raise ConfigError(f"--local-weight {cfg.local_weight}: give a weight >= 0")
    if cfg.local_t <= 0:
        raise ConfigError(f"--local-t {cfg.local_t}: give a temperature > 0")
    if cfg.local_weight and cfg.teacher_cache is not None:
        raise ConfigError("--teacher-cache stores one key per crop, not the teacher's patch tokens that "
                          "--local-weight compares: drop --teacher-cache to use the live teacher")


def token_losses(method: nn.Module, fmap: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """W_dense × the patch-token loss + W_local × the patch-relation loss of a method that holds
    `dense_weight`/`dense` and `local_weight`/`local` (those with a zero weight are not built)."""
    loss = fmap.new_zeros((), dtype=torch.float32)
    if method.dense_weight:
        loss = loss + method.dense_weight * method.dense(fmap, tokens)
    if method.local_weight:
        loss = loss + method.local_weight * method.local(fmap, tokens)
    return loss
