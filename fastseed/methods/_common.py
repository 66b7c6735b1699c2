"""What the methods share: the queues of teacher keys, and the flags more than one declares."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.kernels import enqueue_
from fastseed.runtime import gather_rows


def flag(*names: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One command-line flag of a method: argparse's names and keywords (`dest` is the setting;
    a Config field, or a key of `Config.method_args` for a setting no Config field holds)."""
    return names, kwargs


TEMP = flag("--temp", dest="temp", type=float,
            help="student temperature (default 0.07; the SEED paper's 0.2) or MoCo's InfoNCE temperature (0.2)")
HEAD = flag("--head", dest="head", choices=["mlp", "linear", "bn-linear"],
            help="the student's head: linear (one Linear, the default), bn-linear (BatchNorm1d then "
                 "Linear: SimReg's official linear predictor) or mlp (the papers': SEED's "
                 "Linear-ReLU-Linear, SimReg's deep predictor)")


def linear_head(in_dim: int, out_dim: int, kind: str = "linear") -> nn.Sequential:
    """`--head linear`: one Linear (a Sequential, so a saved head has the keys of the others);
    `--head bn-linear`: BatchNorm1d, then the Linear (UCDvision/simreg mlp_arch.py get_linear_proj,
    its `--linear_pred`)."""
    linear = nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.BatchNorm1d(in_dim), linear) if kind == "bn-linear" else nn.Sequential(linear)


def head_kind(state: dict[str, torch.Tensor]) -> str:
    """The `--head` kind of a saved head's state dict (fastseed-export): one Linear, with or
    without a BatchNorm1d before it, or more than one (mlp)."""
    linears = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if len(linears) > 1:
        return "mlp"
    return "bn-linear" if any(k.endswith("running_mean") for k in state) else "linear"


def same_targets(cfg, targets: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`loss_targets` of a method whose loss sees the source's targets as they are."""
    return targets


QUEUE_SIZE = flag("--queue-size", "--moco-k", dest="queue_size", type=int, help="queue length K")


class Queue(nn.Module):
    """A FIFO ring of K unit-norm keys [K, D] and its int64 write pointer (both buffers, so
    they are checkpointed and identical on every rank)."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1).to(dtype))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        enqueue_(self.keys, self.ptr, gather_rows(keys.detach()))  # every rank enqueues the same rows


class Queues(nn.Module):
    """The keys every student of a run compares against, one set for all of them: the queue
    and, for SEED's small crops, the small-crop queue. Each student's method holds the same
    `Queue` modules (so each student's checkpoint carries them, as a solo run's does); `update`
    runs once per step, after every student's backward (their fused losses re-read the rows).

    Small crops (`targets[1]`, crop-major: crop c of image b is row c*B + b): as the official
    SEED code (jacobswan1/SEED, seed/small_patch_builder.py), only crop 0's key of each image
    enters the small queue, at the rows the image's key takes in the large queue: one pointer
    for both, so both turn over once per K images. `small_enqueue="all"` pushes every small
    crop's key with the small queue's own pointer instead (N times as fast)."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, small_crops: int = 0,
                 small_enqueue: str = "first"):
        super().__init__()
        self.queue = Queue(size, dim, dtype, seed=1)
        self.small_queue = Queue(size, dim, dtype, seed=2) if small_crops else None
        self.small_enqueue = small_enqueue

    @torch.no_grad()
    def update(self, targets: tuple[torch.Tensor, ...]) -> None:
        if self.small_queue is not None:
            small = targets[1]
            if self.small_enqueue == "first":
                self.small_queue.ptr.copy_(self.queue.ptr)  # the large queue's pointer, before it moves
                small = small[:targets[0].shape[0]]
            self.small_queue.push(small)
        self.queue.push(targets[0])
