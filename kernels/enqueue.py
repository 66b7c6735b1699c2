"""Fused queue enqueue: L2-normalise N keys, cast them to the queue's dtype and write them
into the ring buffer at rows ptr … ptr+N−1 (mod K), advancing ptr, without a host sync.

Equivalent to enqueuing the keys one at a time: key i lands in row (ptr+i) mod K. When N > K
only the last K keys survive, so only they are written (each row exactly once, no write
race); their first row is (ptr + N − K) mod K. The pointer is read on the device, so the
call never waits for the GPU.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from ._checks import check_enqueue_args
from ._interpret import Interpreted
from .seed_loss import cpu_backend

EPS = tl.constexpr(1e-12)  # F.normalize's eps


def _enqueue_kernel(Q, PTR, KEYS, n_write, skip, K, D, stride_q, stride_k,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows i of KEYS[skip:skip+n_write] → Q[(ptr + skip + i) mod K]."""
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    ok = (i < n_write)[:, None] & (dims < D)[None, :]
    x = tl.load(KEYS + (skip + i)[:, None] * stride_k + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), EPS)[:, None]
    row = (tl.load(PTR) + skip + i) % K
    tl.store(Q + row[:, None] * stride_q + dims[None, :], x.to(Q.dtype.element_ty), mask=ok)


_CUDA_KERNEL = triton.jit(_enqueue_kernel)
_CPU_KERNEL = Interpreted(_enqueue_kernel)
_last_path = None  # "triton" or "torch" (for tests)


@torch.library.custom_op("fastseed::enqueue_", mutates_args=("queue", "ptr"))
def _enqueue_op(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    global _last_path
    k, d = queue.shape
    n = keys.shape[0]
    skip = max(0, n - k)
    n_write = n - skip
    with torch.no_grad():
        use_triton = queue.dtype != torch.float64 and keys.dtype != torch.float64 and (
            queue.is_cuda or cpu_backend() == "triton")
        if n_write > 0 and use_triton and queue.stride(1) == 1:
            _last_path = "triton"
            keys = keys if keys.stride(-1) == 1 else keys.contiguous()
            block_n = 16
            kernel = _CUDA_KERNEL if queue.is_cuda else _CPU_KERNEL
            kernel[(triton.cdiv(n_write, block_n),)](
                queue, ptr, keys, n_write, skip, k, d, queue.stride(0), keys.stride(0),
                BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)))
        elif n_write > 0:
            _last_path = "torch"
            dtype = torch.float64 if keys.dtype == torch.float64 else torch.float32
            rows = F.normalize(keys[skip:].to(dtype), dim=1).to(queue.dtype)
            idx = (ptr.reshape(1) + skip + torch.arange(n_write, device=queue.device)) % k
            queue.index_copy_(0, idx, rows)
        ptr.copy_((ptr + n) % k)


@_enqueue_op.register_fake
def _(queue, ptr, keys):
    return None


def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write L2-normalised keys [N, D] into queue [K, D] at rows ptr … ptr+N−1 (mod K) and
    advance the int64 tensor ptr in place to (ptr+N) mod K. Any N; no host sync."""
    check_enqueue_args(queue, ptr, keys)
    _enqueue_op(queue, ptr, keys.detach())
