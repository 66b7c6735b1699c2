"""Pieces the three methods share: teacher calls, the queue, cross-rank gathering."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastseed.kernels import enqueue_


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All ranks' keys in rank order, so that every rank enqueues the same rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    out = keys.new_empty((dist.get_world_size() * keys.shape[0], *keys.shape[1:]))
    dist.all_gather_into_tensor(out, keys.contiguous())
    return out


def resize(x: torch.Tensor, res: int | None) -> torch.Tensor:
    if res is None or x.shape[-1] == res:
        return x
    return F.interpolate(x, size=(res, res), mode="bilinear", antialias=res < x.shape[-1],
                         align_corners=False).contiguous(memory_format=torch.channels_last)


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
        enqueue_(self.keys, self.ptr, gather_keys(keys.detach()))


class FrozenTeacher:
    """A frozen teacher held outside the module tree: never in the optimizer, DDP or a
    checkpoint (a checkpoint records only its identity and hash)."""

    def __init__(self, model: nn.Module, res: int | None = None, compile_fn=None):
        self.model = model
        self.res = res
        self.fn = compile_fn(model) if compile_fn else model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            t = self.fn(resize(x, self.res))
        # inference tensors cannot be saved for backward; the loss keeps t for its backward
        return t.clone()
