"""Fused queue enqueue: L2-normalise N keys, cast them to the queue's dtype and write them
into the ring buffer at rows ptr … ptr+N−1 (mod K), advancing ptr, without a host sync.

Equivalent to enqueuing the keys one at a time: key i lands in row (ptr+i) mod K. When N > K
only the last K keys survive, so only they are written (each row exactly once, no write
race); their first row is (ptr + N − K) mod K. The pointer is read on the device, so the
call never waits for the GPU. The kernel (bodies.enqueue_rows) walks D in chunks of
BLOCK_D, so any D launches with the same [16, BLOCK_D] tile.
"""

import torch
import torch.nn.functional as F
import triton
from . import bodies
from ._checks import check_enqueue_args
from ._interpret import Interpreted
from .seed_loss import cpu_backend

BLOCK_N = 16
_CPU_KERNEL = Interpreted(bodies.enqueue_rows.fn)
_last_path = None  # "triton" or "torch" (for tests)


def block_d(d: int) -> int:
    # One 128-wide chunk is 16 fp32 values per thread at 4 warps; narrower D needs less.
    return min(128, max(16, triton.next_power_of_2(d)))


def _launch(kernel, queue, ptr, keys, skip, n_write):
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    k, d = queue.shape
    kernel[(triton.cdiv(n_write, BLOCK_N),)](queue, ptr, keys, n_write, skip, k, d, queue.stride(0), keys.stride(0),
                                             BLOCK_N=BLOCK_N, BLOCK_D=block_d(d))


@torch.library.custom_op("fastseed::enqueue_", mutates_args=("queue", "ptr"))
def _enqueue_op(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    global _last_path
    k = queue.shape[0]
    n = keys.shape[0]
    skip = max(0, n - k)
    n_write = n - skip
    with torch.no_grad():
        use_triton = queue.dtype != torch.float64 and keys.dtype != torch.float64 and (
            queue.is_cuda or cpu_backend() == "triton")
        if n_write > 0 and use_triton and queue.stride(1) == 1:
            _last_path = "triton"
            _launch(bodies.enqueue_rows if queue.is_cuda else _CPU_KERNEL, queue, ptr, keys, skip, n_write)
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
