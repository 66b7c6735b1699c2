"""SEED (Fang et al., ICLR 2021): the student mimics the teacher's similarity distribution
over a queue of teacher keys.

    a = [ŝ·t̂, ŝ·Q]/τS,  b = [t̂·t̂, t̂·Q]/τT,  L = mean_i CE(softmax(b_i), log_softmax(a_i))

then the teacher keys enter the queue. Small-patch variant: the small crops have a queue of
their own and L = CE224 + CE96; which small keys enter it: `Queues`. The queues hold teacher
keys only, so every student of a run shares them. `--dense-weight W` adds W × the patch-token
loss of the global view (fastseed/methods/dense.py), `--local-weight W` W × its patch-relation
loss (fastseed/methods/local.py).
"""
from __future__ import annotations

import torch
from torch import nn

from fastseed.configfile import method_recipe
from fastseed.errors import ConfigError
from fastseed.kernels import seed_loss
from fastseed.models import projection_head

from ._common import HEAD, QUEUE_SIZE, TEMP, Queues, check_queue_size, flag, head_kind, linear_head
from .base import Method
from .dense import DENSE_WEIGHT, DenseHead, backbone_features, check_dense
from .local import LOCAL_T, LOCAL_WEIGHT, LocalHead, check_local, token_losses


class SEED(Method):
    name = "seed"
    needs_teacher = True   # its targets are a frozen teacher's keys
    global_views = 1       # student and teacher see the same crop
    official = method_recipe("seed-official")  # fastseed/recipes/seed-official.yaml: the paper's, with sources
    defaults = method_recipe("seed")            # fastseed/recipes/seed.yaml: Config's own defaults
    flags = (
        TEMP,
        flag("--distill-t", dest="distill_t", type=float, help="teacher temperature (default 0.07; the paper's 1e-4)"),
        QUEUE_SIZE,
        flag("--small-crops", dest="small_crops", type=int, help="SEED small-patch: number of small crops (6)"),
        flag("--small-res", dest="small_res", type=int, help="SEED small-patch: the small crops' side"),
        flag("--small-enqueue", dest="small_enqueue", choices=["first", "all"],
             help="keys entering the small-crop queue: first (official: crop 0 of each image, at the large "
                  "queue's pointer) or all (every small crop)"),
        DENSE_WEIGHT,
        LOCAL_WEIGHT,
        LOCAL_T,
        flag("--batch-in-queue", dest="batch_in_queue", action="store_const", const=True,
             help="enqueue the batch's teacher keys before the loss, whose logits are then the queue's alone "
                  "(no t.t column): every row sees the batch's other keys too"),
        HEAD,
    )

    def __init__(self, student: nn.Module, queues: Queues, *, dim: int, temp: float = 0.2,
                 distill_t: float = 1e-4, dense_weight: float = 0.0, token_dim: int | None = None,
                 batch_in_queue: bool = False, head: str = "mlp", local_weight: float = 0.0, local_t: float = 0.07,
                 **_):
        super().__init__()
        self.student = student
        self.head = self.make_head(student.num_features, dim, head)
        self.queue, self.small_queue = queues.queue, queues.small_queue  # shared by every student
        self.temp, self.distill_t, self.dense_weight, self.local_weight = temp, distill_t, dense_weight, local_weight
        self.self_logit = not batch_in_queue  # with the batch in the queue its keys are columns already
        if dense_weight:  # without it the state is SEED's alone, as before the patch-token loss
            self.dense = DenseHead.for_student(student, token_dim)
        if local_weight:
            self.local = LocalHead.for_student(student, token_dim, local_t)

    @classmethod
    def from_config(cls, student: nn.Module, queues: Queues, dim: int, cfg, compile_fn=None,
                    token_dim: int | None = None) -> "SEED":
        return cls(student, queues, dim=dim, temp=cfg.temp, distill_t=cfg.distill_t, dense_weight=cfg.dense_weight,
                   token_dim=token_dim, batch_in_queue=cfg.batch_in_queue, head=cfg.head,
                   local_weight=cfg.local_weight, local_t=cfg.local_t)

    @staticmethod
    def make_head(in_dim: int, out_dim: int, kind: str = "mlp") -> nn.Module:
        """Its head, as `__init__` builds it (fastseed-export rebuilds it from a checkpoint):
        SEED's Linear-ReLU-Linear, or one Linear (`--head linear`, after a BatchNorm1d with `bn-linear`)."""
        if kind in ("linear", "bn-linear"):
            return linear_head(in_dim, out_dim, kind)
        return projection_head(in_dim, out_dim)

    head_kind = staticmethod(head_kind)  # fastseed-export: the kind of a saved head

    @staticmethod
    def teacher_target(cfg) -> str:
        """SEED distils in the teacher's projection space (--teacher-no-head: its pooled backbone)."""
        return "head" if cfg.teacher_use_head else "backbone"

    @staticmethod
    def augment_preset(teacher_format: str | None, small_crops: int) -> str:
        """With small crops, 'swav' for any teacher (jacobswan1/SEED main_small-patch.py:142-143);
        else by the teacher's checkpoint format (main.py:165-168): swav -> 'swav', simclr ->
        'simclr', moco -> 'moco_v2'. SEED has no rule for the other formats (mocov3, byol, dino,
        dinov2, dinov3, plain, fastseed, bundled): they get 'weak' (crop and flip, no colour ops),
        which beat MoCo-v2's colour ops at equal steps with the bundled teacher on the colour set
        and Fashion-MNIST (docs/objectives.md, "Defaults on three sets")."""
        if small_crops:
            return "swav"
        if teacher_format in ("swav", "simclr"):
            return teacher_format
        return "moco_v2" if teacher_format == "moco" else "weak"

    @staticmethod
    def teacher_tokens(cfg) -> bool:
        """Whether its targets end with the teacher's token map (`--dense-weight`, `--local-weight`)."""
        return cfg.dense_weight > 0 or cfg.local_weight > 0

    @staticmethod
    def check(cfg, students: int) -> None:
        check_dense(cfg, cfg.dense_weight)
        check_local(cfg)
        if cfg.batch_in_queue and cfg.small_crops:
            raise ConfigError("--batch-in-queue is for the global crop's queue: drop it or --small-crops")
        check_queue_size(cfg)
        if cfg.batch_in_queue and cfg.queue_size != "auto" and cfg.queue_size < cfg.batch_size:
            raise ConfigError(f"--batch-in-queue needs --queue-size ({cfg.queue_size}) >= --batch-size "
                              f"({cfg.batch_size}): the queue must hold the whole batch")

    @staticmethod
    def make_queues(*, dim: int, queue_size: int, queue_dtype: torch.dtype = torch.float32, small_crops: int = 0,
                    small_enqueue: str = "first", **_) -> Queues:
        return Queues(queue_size, dim, queue_dtype, small_crops, small_enqueue)

    @classmethod
    def queues_for(cls, cfg, dim: int, queue_dtype: torch.dtype) -> Queues:
        return cls.make_queues(dim=dim, queue_size=cfg.queue_size, queue_dtype=queue_dtype,
                               small_crops=cfg.small_crops, small_enqueue=cfg.small_enqueue)

    @staticmethod
    def teacher_inputs(views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student and teacher see the same view. Small crops are batched into one call."""
        return [views[0], torch.cat(views[1:])] if len(views) > 1 else [views[0]]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.student(x))

    def forward(self, views: list[torch.Tensor], targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
        tokens = self.dense_weight or self.local_weight
        if tokens:  # one backbone pass: the map for the token losses, its pooling for the head
            pooled, fmap = backbone_features(self.student, views[0])
            s = self.head(pooled)
        else:
            s = self.embed(views[0])
        loss = seed_loss(s, targets[0], self.queue.keys, student_temp=self.temp, teacher_temp=self.distill_t,
                         self_logit=self.self_logit)
        if tokens:
            loss = loss + token_losses(self, fmap, targets[-1])
        if len(views) > 1:
            loss = loss + seed_loss(self.embed(torch.cat(views[1:])), targets[1], self.small_queue.keys,
                                    student_temp=self.temp, teacher_temp=self.distill_t)
        return loss
