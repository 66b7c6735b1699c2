"""Fused SEED / MoCo loss: normalize → queue matmul → temperature softmax → cross-entropy.

Math (docs/ARCHITECTURE.md, "The fused loss: the math"). With ŝ = s/‖s‖, t̂ = t/‖t‖, Q̃_0 = t̂, Q̃_j = Q_j:
    a_j = ŝ·Q̃_j / τS,   b_j = t̂·Q̃_j / τT  (b_0 = 1/τT exactly),   p = softmax(a), r = softmax(b)
    loss_i = LSE(a) − Σ_j r_j a_j = LSE(a) − ŝ·v/τS,   v = Σ_j r_j Q̃_j   (hard target: r = e_0)
    g = ∂loss_i/∂ŝ = Σ_j (p_j − r_j) Q̃_j / τS = (G − c)/τS, with G the queue terms:
        fused path  G = Σ_{j≥1} p_j Q_j,           c = v − p_0 t̂
        tiled path  G = Σ_{j≥1} (p_j − r_j) Q_j,   c = (r_0 − p_0) t̂
    ∂loss_i/∂s = (g − ŝ(ŝ·g))/‖s‖                                   (normalize backward)
Exponentials run in base 2 with log2(e) folded into the logit scales.

Two Triton paths, chosen by `path(D, queue dtype)` (the kernels are in bodies.py):

"fused" (16-bit queue, D ≤ FUSED_MAX_D; the headline B=256, K=65536, D=128 bf16 case).
Split-K over the queue (flash-decoding): program (row block, split) streams its slice of Q
once and keeps, per row and in fp32, the running student max/sum (m_a, l_a), the teacher
max/sum (m_b, l_b) and the teacher-weighted queue sum v (rescaled by 2^(m_old−m_new)
whenever m_b grows). A merge kernel folds the partials in split order (deterministic) with
column 0 and writes the row loss, LSE(a), LSE(b) and c = v − p_0 t̂. The backward never
touches the teacher: it recomputes a from the saved LSE, accumulates G = Σ p_j Q_j per
split, and a reduce kernel sums the splits in order, subtracts c and applies the normalize
backward. Per queue tile: 4 MMAs forward (a, b as hi+lo, v), 2 backward (a, Σ p Q).
Whole rows of ŝ, t̂ and v sit in registers, which is what bounds D: at D=256 the only bf16
configs without spills (8 warps) need 215-232 registers and up to 229,952 B of the
232,448 B of shared memory on sm_100 (triton 3.8); at D=1280 ptxas ran ~50 s per config,
spilled ~58 KB and asked for ~1.25 MB of shared memory. An fp32 queue at D=128 spilled
0.9-2.2 KB in each config tried ("tf32x3" splits every operand tile into hi and lo).

"tiled" (every other D and dtype). Logit tiles [BLOCK_B, BLOCK_K] accumulate over chunks of
BLOCK_D dimensions, so no program holds a whole row and any D launches with the same small
tiles. The forward (tiled_stats) keeps the scalars m_a, l_a, m_b, l_b and w = Σ 2^(b−m_b)·a
(loss = LSE(a) − w/l_b needs no v); the host folds the splits. The backward recomputes a and
b per tile (tiled_probs) and writes p − r for one chunk of queue columns ([B, chunk] in the
queue dtype, memory O(B·chunk)); G += (p − r)·Q_chunk is a cuBLAS matmul. Per queue tile:
3 MMAs forward, 3 + 1 backward: 14·B·K·D FLOP, against 12 for the fused path, and no
register bound on D.

Precision: the teacher logits reach 1/τT = 1e4, so a bf16 t̂ (error 2^-9) would move them by
~2 units. With a bf16/fp16 queue, Q is exact in its dtype and t̂ is split as hi + lo in that
dtype: two tensor-core dots with fp32 accumulation carry t̂ to ~2^-17, ~0.01 logit units.
With an fp32 queue every dot runs as "tf32x3" (about fp32 accuracy on tensor cores).

Dispatch: CUDA → Triton (compiled). CPU → the same Triton kernels in the Triton interpreter
when FASTSEED_CPU_KERNELS=triton (or, with that unset, TRITON_INTERPRET=1), else a chunked
PyTorch path holding at most B×_CHUNK logits. float64 inputs always take the PyTorch path.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from . import bodies
from ._checks import check_loss_args
from ._interpret import Interpreted

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_NORM_EPS = 1e-12  # F.normalize's eps: ŝ = s / max(‖s‖, eps)
_CHUNK = 4096  # queue rows per step of the CPU PyTorch path: memory O(B·_CHUNK)
FUSED_MAX_D = 128
_P_ELEMS = 1 << 22  # p − r values per backward chunk of the tiled path: 8 MiB in bf16

# ---------------------------------------------------------------------------------------
# Paths and launch configurations: pure functions of the shapes, dtypes and GPU arch, so
# that check.py can enumerate and compile every kernel the dispatcher can launch.
# ---------------------------------------------------------------------------------------


def path(d: int, queue_dtype: torch.dtype) -> str:
    """'fused' or 'tiled' (see the module doc for why the fused path stops at FUSED_MAX_D)."""
    return "fused" if queue_dtype in (torch.bfloat16, torch.float16) and d <= FUSED_MAX_D else "tiled"


def algorithm_flops(b: int, k: int, d: int, queue_dtype: torch.dtype) -> int:
    """Tensor-core FLOP of one forward+backward, counting a hi+lo dot as two: 12·B·K·D on
    the fused path (forward a, b_hi, b_lo, v; backward a, Σ p Q), 14·B·K·D on the tiled one
    (forward a, b_hi, b_lo; backward a, b_hi, b_lo and the (p − r)·Q matmul; an fp32 queue
    has no lo dot but runs each dot as three tf32 MMAs). The math alone needs 8·B·K·D."""
    return (12 if path(d, queue_dtype) == "fused" else 14) * b * k * d


def _tiled_block_d(d: int, dtype: torch.dtype) -> int:
    # 128 bytes of a row per D chunk (64 bf16/fp16 or 32 fp32 values: one cache line, four
    # k-steps of a 16-bit MMA), fewer when D itself is narrower.
    return min(128 // dtype.itemsize, max(16, triton.next_power_of_2(d)))


# Two configs per autotuned kernel, one per trade-off of tile width against warps: a
# [64, 64] logit tile on one warpgroup or a [64, 128] one on two. In the fused forward at
# D=128 they hold (2·BLOCK_K + D)·64/threads = 128 and 96 fp32 tile values per thread,
# which ptxas fits in 214 and 183 registers without spills (sm_90, triton 3.8); BLOCK_K=128
# on 4 warps (192 values) spilled 24 B. Three stages keep two queue tiles in flight while
# one is consumed (the loops stream the queue). Each config costs a compile per kernel
# variant, dtype and arch, here in check.py and at first use on a GPU.
_CONFIGS = [triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=3)]


def _fp32_tiles(configs, named_args, **meta):
    # "tf32x3" splits both fp32 operands into tf32 hi and lo parts: a [64, 128] logit tile
    # (BLOCK_K=128) spilled 64-88 B on sm_90 and, with triton 3.6 on sm_100, asked for 544
    # tensor-memory columns of 512 and compiled to a `trap`; BLOCK_K=64 fits both.
    return [c for c in configs if not meta["FP32"] or c.kwargs["BLOCK_K"] == 64]


def _autotuned(fn, key, prune=None):
    # Only BLOCK_K, warps and stages are tuned: the split plan (BLOCK_B, n_splits) is fixed by
    # the caller because it sizes the partial buffers, and BLOCK_D by D. A config that did not
    # fit would still compile (ptxas took ~50 s for one at D=1280) and only fail at launch
    # with OutOfResources, which the autotuner takes for an infinitely slow config (and if
    # none fits, the launch raises): check.py compiles every config here for sm_90 and sm_100
    # and fails if one spills or overflows shared memory. Config(kwargs, num_warps,
    # num_stages) is the same from triton 3.0 to 3.8.
    return triton.autotune(configs=_CONFIGS, key=key, prune_configs_by=prune and {"early_config_prune": prune})(fn)


_CUDA = {
    "fused_fwd_split": _autotuned(bodies.fused_fwd_split, ["B", "D", "cols_per_split", "HARD", "BLOCK_B"]),
    "fused_fwd_merge": bodies.fused_fwd_merge,
    "fused_bwd_split": _autotuned(bodies.fused_bwd_split, ["B", "D", "cols_per_split", "BLOCK_B"]),
    "fused_bwd_reduce": bodies.fused_bwd_reduce,
    "tiled_stats": _autotuned(bodies.tiled_stats, ["B", "D", "cols_per_split", "HARD", "FP32", "BLOCK_B"],
                              _fp32_tiles),
    "tiled_probs": _autotuned(bodies.tiled_probs, ["B", "D", "n_cols", "HARD", "FP32", "BLOCK_B"], _fp32_tiles),
}
# The interpreter runs the plain functions (.fn) on CPU tensors, with fixed small tiles: it
# pays per tile op, and 32-wide tiles make odd K and D cross tile and chunk edges in tests.
_CPU = {name: Interpreted(getattr(bodies, name).fn) for name in _CUDA}
_CPU_TILE = 32


@dataclass(frozen=True)
class Launcher:
    """Where kernels run: the compiled kernels on a GPU of compute capability `arch` (90 for
    sm_90, …) with `programs` worth running at once, or (arch None) the interpreter."""
    kernels: dict
    arch: int | None = None
    programs: int = 0

    def block_k(self) -> dict:
        # The autotuned CUDA kernels pick BLOCK_K themselves; the interpreter uses a fixed one.
        return {} if self.arch is not None else {"BLOCK_K": _CPU_TILE}


def _launcher(device: torch.device) -> Launcher:
    if device.type != "cuda":
        return Launcher(_CPU)
    props = torch.cuda.get_device_properties(device)
    return Launcher(_CUDA, 10 * props.major + props.minor, 2 * props.multi_processor_count)


def _plan(b: int, k: int, launcher: Launcher):
    """(BLOCK_B, n_splits, cols_per_split). Compiled: row blocks of 64 (one wgmma tile; a
    smaller batch masks rows) and about two programs per SM, so B=256 runs 4 row blocks ×
    66 splits on an H200's 132 SMs; splits cover whole multiples of 128 columns so every
    BLOCK_K tiles them evenly. Interpreter: blocks of 16 rows and 3 splits, so that tests
    at small K cross split edges."""
    if launcher.arch is None:
        block_b, want, align = 16, 3, _CPU_TILE
    else:
        block_b, align = 64, 128
        want = max(1, triton.cdiv(launcher.programs, triton.cdiv(b, block_b)))
    cols = triton.cdiv(triton.cdiv(k, want), align) * align
    return block_b, triton.cdiv(k, cols), cols


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

_last_path = None  # "fused", "tiled" or "torch": which implementation ran last (for tests)


def cpu_backend() -> str:
    """'triton' (interpreter) or 'torch' (chunked) for CPU tensors, read at call time."""
    choice = os.environ.get("FASTSEED_CPU_KERNELS", "").strip().lower()
    if choice in ("torch", "triton"):
        return choice
    if choice:
        raise ValueError(f"FASTSEED_CPU_KERNELS must be 'torch' or 'triton', got {choice!r}")
    return "triton" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "torch"


def _use_triton(*xs: torch.Tensor) -> bool:
    if any(x.dtype == torch.float64 for x in xs):
        return False
    return xs[0].is_cuda or (xs[0].device.type == "cpu" and cpu_backend() == "triton")


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _partial_dtype(queue: torch.Tensor) -> torch.dtype:
    # The [n_splits, B, D] partials of v and of the gradient are the fused path's only
    # sizeable buffers (B=256, 264 programs: 8 MiB in fp32, against ~350 MiB for the eager
    # reference). With a bf16 queue they are stored in bf16 (relative error 2^-9 per partial,
    # summed in fp32), which halves them; statistics (m, l) stay fp32.
    return torch.bfloat16 if queue.dtype == torch.bfloat16 else torch.float32


def _contiguous_rows(*xs):
    return (x if x.stride(-1) == 1 else x.contiguous() for x in xs)


# ----------------------------------------------------------------------------- fused path


def _fused_forward(s, t, queue, student_temp, teacher_temp, hard, self_logit, launcher):
    s, t, queue = _contiguous_rows(s, t, queue)
    (b, d), k = s.shape, queue.shape[0]
    block_b, n_splits, cols = _plan(b, k, launcher)
    block_d = max(16, triton.next_power_of_2(d))
    f32 = dict(dtype=torch.float32, device=s.device)
    m_a, l_a = torch.empty(n_splits, b, **f32), torch.empty(n_splits, b, **f32)
    if hard:
        m_b = l_b = v = m_a  # unused by the HARD kernels
    else:
        m_b, l_b = torch.empty(n_splits, b, **f32), torch.empty(n_splits, b, **f32)
        v = torch.empty(n_splits, b, d, dtype=_partial_dtype(queue), device=s.device)
    scale_a = _LOG2E / student_temp
    scale_b = _LOG2E / teacher_temp
    launcher.kernels["fused_fwd_split"][(triton.cdiv(b, block_b), n_splits)](
        s, t, queue, m_a, l_a, m_b, l_b, v,
        b, k, d, s.stride(0), t.stride(0), queue.stride(0), cols, scale_a, scale_b,
        HARD=hard, BLOCK_B=block_b, BLOCK_D=block_d, **launcher.block_k())
    loss_rows = torch.empty(b, **f32)
    lse = torch.empty(2, b, **f32)
    c = torch.empty(b, d, **f32)
    block_m = 16
    launcher.kernels["fused_fwd_merge"][(triton.cdiv(b, block_m),)](
        s, t, m_a, l_a, m_b, l_b, v, loss_rows, lse, c,
        b, d, n_splits, s.stride(0), t.stride(0), 1.0 / student_temp, scale_a, scale_b,
        HARD=hard, SELF=self_logit, BLOCK_M=block_m, BLOCK_D=block_d)
    return loss_rows.mean(), lse, c


def _fused_backward(grad, s, queue, lse, c, student_temp, launcher):
    s, queue = _contiguous_rows(s, queue)
    (b, d), k = s.shape, queue.shape[0]
    block_b, n_splits, cols = _plan(b, k, launcher)
    block_d = max(16, triton.next_power_of_2(d))
    g = torch.empty(n_splits, b, d, dtype=_partial_dtype(queue), device=s.device)
    launcher.kernels["fused_bwd_split"][(triton.cdiv(b, block_b), n_splits)](
        s, queue, lse, g, b, k, d, s.stride(0), queue.stride(0), cols, _LOG2E / student_temp,
        BLOCK_B=block_b, BLOCK_D=block_d, **launcher.block_k())
    ds = torch.empty_like(s, memory_format=torch.contiguous_format)
    block_m = 16
    launcher.kernels["fused_bwd_reduce"][(triton.cdiv(b, block_m),)](
        s, g, c, grad.reshape(()).contiguous(), ds, b, d, n_splits, s.stride(0), ds.stride(0),
        1.0 / (b * student_temp), BLOCK_M=block_m, BLOCK_D=block_d)
    return ds


# ----------------------------------------------------------------------------- tiled path


def _tiled_operands(s, t, queue):
    """ŝ, t̂ in fp32 and the kernels' operands: ŝ and t̂ = hi + lo in the queue's dtype, or
    ŝ, t̂ in fp32 (lo unused) for an fp32 queue. [B, D] elementwise work: a few µs."""
    s32 = F.normalize(s.float(), dim=1, eps=_NORM_EPS)
    t32 = F.normalize(t.float(), dim=1, eps=_NORM_EPS)
    if queue.dtype == torch.float32:
        return s32, t32, s32, t32, t32
    t_hi = t32.to(queue.dtype)
    return s32, t32, s32.to(queue.dtype), t_hi, (t32 - t_hi.float()).to(queue.dtype)


def _tiled_forward(s, t, queue, student_temp, teacher_temp, hard, self_logit, launcher):
    (queue,) = _contiguous_rows(queue)
    (b, d), k = s.shape, queue.shape[0]
    s32, t32, s_op, t_hi, t_lo = _tiled_operands(s, t, queue)
    block_b, n_splits, cols = _plan(b, k, launcher)
    m_a, l_a, m_b, l_b, w = torch.empty(5, n_splits, b, dtype=torch.float32, device=s.device)
    scale_a = _LOG2E / student_temp
    scale_b = _LOG2E / teacher_temp
    launcher.kernels["tiled_stats"][(triton.cdiv(b, block_b), n_splits)](
        s_op, t_hi, t_lo, queue, m_a, l_a, m_b, l_b, w,
        b, k, d, queue.stride(0), cols, scale_a, scale_b,
        HARD=hard, FP32=queue.dtype == torch.float32, BLOCK_B=block_b, BLOCK_D=_tiled_block_d(d, queue.dtype),
        **launcher.block_k())
    # Fold the splits with column 0 (unless the batch's keys are in the queue: no column 0),
    # in base 2 (the fused merge kernel's formulas).
    if not self_logit:
        m = m_a.amax(0)
        lse2 = m + torch.log2((l_a * torch.exp2(m_a - m)).sum(0))
        mb = m_b.amax(0)
        wb = torch.exp2(m_b - mb)
        lb = (l_b * wb).sum(0)
        loss_rows = (lse2 - (w * wb).sum(0) / lb) * _LN2
        return loss_rows.mean(), torch.stack([lse2, mb + torch.log2(lb)]) * _LN2, torch.zeros_like(s32)
    a0 = (s32 * t32).sum(1) * scale_a
    m = torch.maximum(m_a.amax(0), a0)
    lse2 = m + torch.log2(torch.exp2(a0 - m) + (l_a * torch.exp2(m_a - m)).sum(0))
    p0 = torch.exp2(a0 - lse2)
    if hard:
        loss_rows, lse_b2, r0 = (lse2 - a0) * _LN2, torch.zeros_like(lse2), torch.ones_like(lse2)
    else:
        mb = m_b.amax(0).clamp_min(scale_b)
        wb = torch.exp2(m_b - mb)
        w0 = torch.exp2(scale_b - mb)
        lb = w0 + (l_b * wb).sum(0)
        loss_rows = (lse2 - (a0 * w0 + (w * wb).sum(0)) / lb) * _LN2
        lse_b2 = mb + torch.log2(lb)
        r0 = torch.exp2(scale_b - lse_b2)
    c = (r0 - p0)[:, None] * t32
    return loss_rows.mean(), torch.stack([lse2, lse_b2]) * _LN2, c


def _tiled_backward(grad, s, t, queue, lse, c, student_temp, teacher_temp, hard, launcher):
    (queue,) = _contiguous_rows(queue)
    (b, d), k = s.shape, queue.shape[0]
    s32, _, s_op, t_hi, t_lo = _tiled_operands(s, t, queue)
    block_b = _plan(b, k, launcher)[0]
    # Whole multiples of 128 columns, so P's row stride is the same multiple of 16 whatever K
    # is, and the compiled kernel (its stride argument is specialised mod 16) the same one.
    chunk = min(triton.cdiv(k, 128), triton.cdiv(max(1, _P_ELEMS // b), 128)) * 128
    p = torch.empty(b, chunk, dtype=queue.dtype, device=s.device)
    g = -c
    for col0 in range(0, k, chunk):
        n = min(chunk, k - col0)
        launcher.kernels["tiled_probs"][lambda meta: (triton.cdiv(b, block_b), triton.cdiv(n, meta["BLOCK_K"]))](
            s_op, t_hi, t_lo, queue, lse, p, b, d, queue.stride(0), p.stride(0), col0, n,
            _LOG2E / student_temp, _LOG2E / teacher_temp,
            HARD=hard, FP32=queue.dtype == torch.float32, BLOCK_B=block_b, BLOCK_D=_tiled_block_d(d, queue.dtype),
            **launcher.block_k())
        g = g + p[:, :n] @ queue[col0:col0 + n]
    g = g * (grad.float() / (b * student_temp))
    norm = s.float().norm(dim=1, keepdim=True)
    proj = (g - s32 * (s32 * g).sum(1, keepdim=True)) / norm
    return torch.where(norm > _NORM_EPS, proj, g / _NORM_EPS).to(s.dtype)


def _triton_forward(s, t, queue, student_temp, teacher_temp, hard, launcher, self_logit=True):
    global _last_path
    _last_path = path(s.shape[1], queue.dtype)
    forward = _fused_forward if _last_path == "fused" else _tiled_forward
    return forward(s, t, queue, student_temp, teacher_temp, hard, self_logit, launcher)


def _triton_backward(grad, s, t, queue, lse, c, student_temp, teacher_temp, hard, launcher):
    global _last_path
    _last_path = path(s.shape[1], queue.dtype)
    if _last_path == "fused":
        return _fused_backward(grad, s, queue, lse, c, student_temp, launcher)
    return _tiled_backward(grad, s, t, queue, lse, c, student_temp, teacher_temp, hard, launcher)


# ---------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU without the interpreter, float64): the same statistics, one
# block of _CHUNK queue rows at a time, so memory is O(B·_CHUNK) instead of O(B·K).
# ---------------------------------------------------------------------------------------


def _torch_forward(student, teacher, queue, student_temp, teacher_temp, hard, self_logit=True):
    global _last_path
    _last_path = "torch"
    dtype = _acc_dtype(student, teacher, queue)
    s = F.normalize(student.to(dtype), dim=1)
    t = F.normalize(teacher.to(dtype), dim=1)
    a0 = (s * t).sum(1) / student_temp
    if self_logit:
        m_a, l_a = a0.clone(), torch.ones_like(a0)
        m_b, l_b, v = torch.full_like(a0, 1.0 / teacher_temp), torch.ones_like(a0), t.clone()
    else:  # no column 0: the statistics start empty (the first chunk makes the maxima finite)
        m_a, l_a = torch.full_like(a0, -math.inf), torch.zeros_like(a0)
        m_b, l_b, v = torch.full_like(a0, -math.inf), torch.zeros_like(a0), torch.zeros_like(t)
    for k0 in range(0, queue.shape[0], _CHUNK):
        q = queue[k0:k0 + _CHUNK].to(dtype)
        a = s @ q.T / student_temp
        m_new = torch.maximum(m_a, a.amax(1))
        l_a = l_a * torch.exp(m_a - m_new) + torch.exp(a - m_new[:, None]).sum(1)
        m_a = m_new
        if not hard:
            bl = t @ q.T / teacher_temp
            mb_new = torch.maximum(m_b, bl.amax(1))
            alpha = torch.exp(m_b - mb_new)
            r = torch.exp(bl - mb_new[:, None])
            l_b = l_b * alpha + r.sum(1)
            v = v * alpha[:, None] + r @ q
            m_b = mb_new
    lse = m_a + torch.log(l_a)
    if hard:
        loss_rows, lse_b = lse - a0, torch.zeros_like(lse)
    else:
        v = v / l_b[:, None]
        loss_rows, lse_b = lse - (s * v).sum(1) / student_temp, m_b + torch.log(l_b)
    c = v - torch.exp(a0 - lse)[:, None] * t if self_logit else v
    return loss_rows.mean(), torch.stack([lse, lse_b]), c


def _torch_backward(grad, student, queue, lse, c, student_temp):
    global _last_path
    _last_path = "torch"
    dtype = lse.dtype
    x = student.to(dtype)
    s = F.normalize(x, dim=1)
    g = -c
    for k0 in range(0, queue.shape[0], _CHUNK):
        q = queue[k0:k0 + _CHUNK].to(dtype)
        g = g + torch.exp(s @ q.T / student_temp - lse[0, :, None]) @ q
    g = g * (grad.to(dtype) / (student.shape[0] * student_temp))
    norm = x.norm(dim=1, keepdim=True)
    proj = (g - s * (s * g).sum(1, keepdim=True)) / norm
    return torch.where(norm > _NORM_EPS, proj, g / _NORM_EPS).to(student.dtype)


# ---------------------------------------------------------------------------------------
# Op registration: opaque to torch.compile, differentiable with respect to the student only.
# Inductor's on-disk cache keys a compiled graph by its code, which names the op but not its
# output shapes: an op whose outputs change must change its name too (a graph compiled when
# the saved LSE was [B] failed its size assertion once it became [2, B]).
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("fastseed::seed_ce", mutates_args=())
def _seed_ce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
              student_temp: float, teacher_temp: float, hard: bool, self_logit: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (mean loss, [LSE(a); LSE(b)] per row, c per row); the last two feed the backward.
    `self_logit` False: no column 0 (the batch's keys are already in the queue); the backward
    needs no flag, c carries column 0's term or is the teacher-weighted queue sum alone."""
    with torch.autocast(student.device.type, enabled=False):
        if _use_triton(student, teacher, queue):
            return _triton_forward(student, teacher, queue, student_temp, teacher_temp, hard,
                                   _launcher(student.device), self_logit)
        return _torch_forward(student, teacher, queue, student_temp, teacher_temp, hard, self_logit)


@_seed_ce.register_fake
def _(student, teacher, queue, student_temp, teacher_temp, hard, self_logit):
    dtype = _acc_dtype(student, teacher, queue)
    b, d = student.shape
    return (student.new_empty((), dtype=dtype), student.new_empty((2, b), dtype=dtype),
            student.new_empty((b, d), dtype=dtype))


@torch.library.custom_op("fastseed::seed_ce_backward", mutates_args=())
def _seed_ce_backward(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                       queue: torch.Tensor, lse: torch.Tensor, c: torch.Tensor,
                       student_temp: float, teacher_temp: float, hard: bool) -> torch.Tensor:
    with torch.autocast(student.device.type, enabled=False):
        if _use_triton(student, queue, lse):
            return _triton_backward(grad, student, teacher, queue, lse, c, student_temp, teacher_temp,
                                    hard, _launcher(student.device))
        return _torch_backward(grad, student, queue, lse, c, student_temp)


@_seed_ce_backward.register_fake
def _(grad, student, teacher, queue, lse, c, student_temp, teacher_temp, hard):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, queue, student_temp, teacher_temp, hard, _self_logit = inputs
    _loss, lse, c = output
    ctx.mark_non_differentiable(lse, c)
    ctx.save_for_backward(student, teacher, queue, lse, c)
    ctx.temps = (student_temp, teacher_temp, hard)


def _backward(ctx, grad_loss, _grad_lse, _grad_c):
    ds = _seed_ce_backward(grad_loss, *ctx.saved_tensors, *ctx.temps)
    return ds, None, None, None, None, None, None


_seed_ce.register_autograd(_backward, setup_context=_setup_context)

# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def seed_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, *,
              student_temp: float = 0.2, teacher_temp: float = 1e-4, self_logit: bool = True) -> torch.Tensor:
    """SEED loss, mean over rows of −Σ_j softmax(b)_j log_softmax(a)_j (see module doc).
    student, teacher: raw [B, D] embeddings; queue: [K, D] unit rows. Gradient to student only.
    `self_logit` False drops column 0 (ŝ·t̂, t̂·t̂): the logits are the queue's alone, for a
    queue the batch's keys entered before the loss (`--batch-in-queue`).
    Returns an fp32 scalar (float64 when an input is float64)."""
    check_loss_args("student", student, "teacher", teacher, queue,
                    {"student_temp": student_temp, "teacher_temp": teacher_temp})
    if not self_logit and queue.shape[0] == 0:
        raise ValueError("seed_loss with self_logit=False needs a queue of at least one row: "
                         "its logits are the queue's")
    return _seed_ce(student, teacher.detach(), queue.detach(),
                     float(student_temp), float(teacher_temp), False, bool(self_logit))[0]


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, *,
                  temp: float = 0.2) -> torch.Tensor:
    """MoCo InfoNCE: cross-entropy of [q̂·k̂, q̂·Q]/τ with target 0. Gradient to query only."""
    check_loss_args("query", query, "key", key, queue, {"temp": temp})
    return _seed_ce(query, key.detach(), queue.detach(), float(temp), 1.0, True, True)[0]
