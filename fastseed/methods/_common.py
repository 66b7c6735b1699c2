"""What the methods share: the queues of teacher keys, and the flags more than one declares."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from fastseed.errors import ConfigError
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


def queue_size_arg(text: str) -> int | str:
    """`--queue-size`: a number of keys, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of keys nor auto") from None


QUEUE_SIZE = flag("--queue-size", "--moco-k", dest="queue_size", type=queue_size_arg,
                  help="queue length K, or auto (the default): the largest power of two up to half the data set's "
                       "images, at most 65536 and 2^23 / key width (the papers' 65536 x 128), at least the batch")
PAPER_QUEUE = 65536          # SEED's and MoCo's K
PAPER_QUEUE_ELEMENTS = 65536 * 128  # their K x D: a queue of wider keys holds fewer


def auto_queue_size(images: int, dim: int, batch: int) -> int:
    """`--queue-size auto`: the largest power of two up to images / 2, capped at 65,536 keys and at
    2^23 / `dim` (the papers' queue, 65,536 keys of 128-d, in elements), and at least the global
    batch rounded up to a power of two.

    Why: the papers' 65,536 keys were sized for ImageNet's 1.28M images; 1,500 images would sit in
    such a queue about 44 times each, so the softmax over it compares each crop mostly with copies
    of keys it has seen, and with 1280-d keys the loss costs about twice the student's step on a
    CPU. Half the data set is the middle of the 20-50 % that short distillation runs use
    (LightlyTrain's queue: 8,192 keys for 20k images, 2,048 up to 10k); the K·D cap keeps the
    queue's memory and FLOPs at the paper's whatever the key width. Examples: 1,500 images ->
    512; 5,000 -> 2,048; 32,000 images of 1280-d keys -> 4,096; ImageNet of 128-d keys -> 65,536."""
    k = 1 << max(0, (images // 2).bit_length() - 1)
    k = min(k, PAPER_QUEUE, 1 << max(0, (PAPER_QUEUE_ELEMENTS // max(1, dim)).bit_length() - 1))
    return max(k, 1 << max(0, (batch - 1).bit_length()))


def check_queue_size(cfg) -> None:
    """ConfigError for a `queue_size` that is neither auto nor a positive number of keys."""
    k = cfg.queue_size
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"--queue-size {k!r}: give a number of keys >= 1, or auto")


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
