"""Fused SEED / MoCo loss: normalize → queue matmul → temperature softmax → cross-entropy.

Math (DESIGN.md, "Fused loss: the math"). With ŝ = s/‖s‖, t̂ = t/‖t‖, Q̃_0 = t̂, Q̃_j = Q_j:
    a_j = ŝ·Q̃_j / τS,   b_j = t̂·Q̃_j / τT  (b_0 = 1/τT exactly),   p = softmax(a), r = softmax(b)
    loss_i = LSE(a) − Σ_j r_j a_j = LSE(a) − ŝ·v/τS,   v = Σ_j r_j Q̃_j   (hard target: v = t̂)
    ∂loss_i/∂ŝ = (Σ_j p_j Q̃_j − v)/τS = (Σ_{j≥1} p_j Q_j − c)/τS,   c = v − p_0 t̂
    ∂loss_i/∂s = (g − ŝ(ŝ·g))/‖s‖                                   (normalize backward)

Forward, split-K over the queue (flash-decoding): program (row block, split) streams its
slice of Q once and keeps, per row and in fp32, the running student max/sum (m_a, l_a), the
teacher max/sum (m_b, l_b) and the teacher-weighted queue sum v (rescaled by 2^(m_old−m_new)
whenever m_b grows). A merge kernel folds the partials in split order (deterministic) with
column 0 and writes the row loss, LSE(a) and c. Accumulating v in the forward (one extra
MMA there) means the backward never touches the teacher: it recomputes a from the saved
LSE, accumulates Σ p_j Q_j per split, and a reduce kernel sums the splits in order,
subtracts c and applies the normalize backward. Per queue tile that is 4 MMAs forward
(a, b as hi+lo, v) and 2 backward (a, Σ p Q), against 3 + 4 for recomputing b.

Precision: the teacher logits reach 1/τT = 1e4, so a bf16 t̂ (error 2^-9) would move them by
~2 units. With a bf16/fp16 queue, Q is exact in its dtype and t̂ is split as hi + lo in that
dtype: two tensor-core dots with fp32 accumulation carry t̂ to ~2^-17, ~0.01 logit units.
With an fp32 queue every dot runs as "tf32x3" (about fp32 accuracy on tensor cores).
Exponentials run in base 2 with log2(e) folded into the logit scale.

Dispatch: CUDA → Triton (compiled). CPU → the same Triton kernels in the Triton interpreter
when FASTSEED_CPU_KERNELS=triton (or, with that unset, TRITON_INTERPRET=1), else a chunked
PyTorch path holding at most B×_CHUNK logits. float64 inputs always take the PyTorch path.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from ._checks import check_loss_args
from ._interpret import Interpreted

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_NORM_EPS = 1e-12  # F.normalize's eps: ŝ = s / max(‖s‖, eps)
_CHUNK = 4096  # queue rows per step of the CPU PyTorch path: memory O(B·_CHUNK)

EPS = tl.constexpr(_NORM_EPS)
LN2 = tl.constexpr(_LN2)
LOG2E = tl.constexpr(_LOG2E)

# ---------------------------------------------------------------------------------------
# Triton kernels. Plain functions, wrapped below twice: triton.jit for CUDA tensors and
# Interpreted (the Triton interpreter) for CPU tensors, so both live in one process.
# ---------------------------------------------------------------------------------------


def _fwd_split(S, T, Q, M_A, L_A, M_B, L_B, V,
               B, K, D, stride_s, stride_t, stride_q, cols_per_split, scale_a, scale_b,
               HARD: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial statistics of queue columns [split·cols_per_split, …) for one row block.
    Writes m_a, l_a (and m_b, l_b, v unless HARD) in base-2 units to [split, row]."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    dim_ok = dims < D
    rd_ok = row_ok[:, None] & dim_ok[None, :]

    s = tl.load(S + rows[:, None] * stride_s + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    s = s / tl.maximum(tl.sqrt(tl.sum(s * s, 1)), EPS)[:, None]
    if LOWP:
        s_lp = s.to(Q.dtype.element_ty)
    if not HARD:
        t = tl.load(T + rows[:, None] * stride_t + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
        t = t / tl.maximum(tl.sqrt(tl.sum(t * t, 1)), EPS)[:, None]
        if LOWP:
            t_hi = t.to(Q.dtype.element_ty)
            t_lo = (t - t_hi.to(tl.float32)).to(Q.dtype.element_ty)
        m_b = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l_b = tl.zeros([BLOCK_B], tl.float32)
        v = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    m_a = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK_B], tl.float32)

    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, K)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_end
        q = tl.load(Q + cols[:, None] * stride_q + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        qt = tl.trans(q)
        if LOWP:
            a = tl.dot(s_lp, qt)
        else:
            a = tl.dot(s, qt, input_precision=PREC)
        a = tl.where(col_ok[None, :], a * scale_a, float("-inf"))
        m_new = tl.maximum(m_a, tl.max(a, 1))
        l_a = l_a * tl.exp2(m_a - m_new) + tl.sum(tl.exp2(a - m_new[:, None]), 1)
        m_a = m_new
        if not HARD:
            if LOWP:
                b = tl.dot(t_hi, qt)
                b = tl.dot(t_lo, qt, b)
            else:
                b = tl.dot(t, qt, input_precision=PREC)
            b = tl.where(col_ok[None, :], b * scale_b, float("-inf"))
            mb_new = tl.maximum(m_b, tl.max(b, 1))
            alpha = tl.exp2(m_b - mb_new)
            r = tl.exp2(b - mb_new[:, None])
            l_b = l_b * alpha + tl.sum(r, 1)
            if LOWP:
                v = tl.dot(r.to(Q.dtype.element_ty), q, v * alpha[:, None])
            else:
                v = tl.dot(r, q, v * alpha[:, None], input_precision=PREC)
            m_b = mb_new

    out = split * B + rows
    tl.store(M_A + out, m_a, mask=row_ok)
    tl.store(L_A + out, l_a, mask=row_ok)
    if not HARD:
        tl.store(M_B + out, m_b, mask=row_ok)
        tl.store(L_B + out, l_b, mask=row_ok)
        tl.store(V + out[:, None] * D + dims[None, :], v.to(V.dtype.element_ty), mask=rd_ok)


def _fwd_merge(S, T, M_A, L_A, M_B, L_B, V, LOSS, LSE, C,
               B, D, n_splits, stride_s, stride_t, inv_ts, scale_a, scale_b,
               HARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the split partials (in split order) with column 0; write loss_i, LSE(a)_i, c_i."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    rd_ok = row_ok[:, None] & (dims < D)[None, :]
    s = tl.load(S + rows[:, None] * stride_s + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    s = s / tl.maximum(tl.sqrt(tl.sum(s * s, 1)), EPS)[:, None]
    t = tl.load(T + rows[:, None] * stride_t + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    t = t / tl.maximum(tl.sqrt(tl.sum(t * t, 1)), EPS)[:, None]

    a0 = tl.sum(s * t, 1) * scale_a  # column 0 of the student logits, base 2
    m = a0
    for k in range(n_splits):
        m = tl.maximum(m, tl.load(M_A + k * B + rows, mask=row_ok, other=0.0))
    l = tl.exp2(a0 - m)
    for k in range(n_splits):
        mk = tl.load(M_A + k * B + rows, mask=row_ok, other=0.0)
        l += tl.load(L_A + k * B + rows, mask=row_ok, other=0.0) * tl.exp2(mk - m)
    lse2 = m + tl.log2(l)

    if HARD:
        v = t
        loss = (lse2 - a0) * LN2
    else:
        b0 = scale_b  # t̂·t̂/τT taken as exactly 1/τT (base 2)
        mb = tl.zeros([BLOCK_M], tl.float32) + b0
        for k in range(n_splits):
            mb = tl.maximum(mb, tl.load(M_B + k * B + rows, mask=row_ok, other=0.0))
        w0 = tl.exp2(b0 - mb)
        lb = w0
        v = t * w0[:, None]
        for k in range(n_splits):
            wk = tl.exp2(tl.load(M_B + k * B + rows, mask=row_ok, other=0.0) - mb)
            lb += tl.load(L_B + k * B + rows, mask=row_ok, other=0.0) * wk
            vk = tl.load(V + (k * B + rows)[:, None] * D + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
            v += vk * wk[:, None]
        v = v / lb[:, None]
        loss = lse2 * LN2 - tl.sum(s * v, 1) * inv_ts
    c = v - tl.exp2(a0 - lse2)[:, None] * t
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE + rows, lse2 * LN2, mask=row_ok)
    tl.store(C + rows[:, None] * D + dims[None, :], c, mask=rd_ok)


def _bwd_split(S, Q, LSE, G, B, K, D, stride_s, stride_q, cols_per_split, scale_a,
               LOWP: tl.constexpr, PREC: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """G[split, row] = Σ_j p_j Q_j over the split's queue columns, p = 2^(a − LSE2(a))."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    dim_ok = dims < D
    rd_ok = row_ok[:, None] & dim_ok[None, :]
    s = tl.load(S + rows[:, None] * stride_s + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    s = s / tl.maximum(tl.sqrt(tl.sum(s * s, 1)), EPS)[:, None]
    if LOWP:
        s_lp = s.to(Q.dtype.element_ty)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * LOG2E
    g = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, K)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        # Columns past the end load Q = 0, so their (finite) p adds nothing: no mask on p.
        q = tl.load(Q + cols[:, None] * stride_q + dims[None, :],
                    mask=(cols < col_end)[:, None] & dim_ok[None, :], other=0.0)
        if LOWP:
            a = tl.dot(s_lp, tl.trans(q))
            p = tl.exp2(a * scale_a - lse2[:, None])
            g = tl.dot(p.to(Q.dtype.element_ty), q, g)
        else:
            a = tl.dot(s, tl.trans(q), input_precision=PREC)
            p = tl.exp2(a * scale_a - lse2[:, None])
            g = tl.dot(p, q, g, input_precision=PREC)
    tl.store(G + (split * B + rows)[:, None] * D + dims[None, :], g.to(G.dtype.element_ty), mask=rd_ok)


def _bwd_reduce(S, G, C, GRAD, DS, B, D, n_splits, stride_s, stride_ds, inv_bts,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """g = (Σ_splits G − c)·grad/(B·τS), then the normalize backward into DS (student dtype)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    rd_ok = row_ok[:, None] & (dims < D)[None, :]
    g = -tl.load(C + rows[:, None] * D + dims[None, :], mask=rd_ok, other=0.0)
    for k in range(n_splits):
        g += tl.load(G + (k * B + rows)[:, None] * D + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    g = g * (tl.load(GRAD).to(tl.float32) * inv_bts)
    x = tl.load(S + rows[:, None] * stride_s + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    y = x / tl.maximum(norm, EPS)[:, None]
    proj = (g - y * tl.sum(y * g, 1)[:, None]) / tl.maximum(norm, EPS)[:, None]
    ds = tl.where((norm > EPS)[:, None], proj, g / EPS)
    tl.store(DS + rows[:, None] * stride_ds + dims[None, :], ds.to(DS.dtype.element_ty), mask=rd_ok)


def _autotuned(fn, key):
    # BLOCK_K / warps / stages only: the split plan (BLOCK_B, n_splits) is fixed by the
    # caller because it sizes the partial buffers. A config that does not fit the GPU (shared
    # memory at D=256, BLOCK_K=128) fails to compile and the autotuner skips it. Eight configs
    # bound the first call's compile time. Config(kwargs, num_warps, num_stages) is the same
    # from triton 3.0 to 3.8.
    configs = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bk in (64, 128) for w in (4, 8) for st in (2, 3)]
    return triton.autotune(configs=configs, key=key)(triton.jit(fn))


_CUDA = {
    "fwd_split": _autotuned(_fwd_split, ["B", "D", "cols_per_split", "HARD", "LOWP", "BLOCK_B"]),
    "fwd_merge": triton.jit(_fwd_merge),
    "bwd_split": _autotuned(_bwd_split, ["B", "D", "cols_per_split", "LOWP", "BLOCK_B"]),
    "bwd_reduce": triton.jit(_bwd_reduce),
}
_CPU = {name: Interpreted(fn) for name, fn in
        (("fwd_split", _fwd_split), ("fwd_merge", _fwd_merge),
         ("bwd_split", _bwd_split), ("bwd_reduce", _bwd_reduce))}
_CPU_BLOCK_K = 32  # the interpreter pays per tile op; small tiles keep odd-K tests honest

# ---------------------------------------------------------------------------------------
# Dispatch and launch plans
# ---------------------------------------------------------------------------------------

_last_path = None  # "triton" or "torch": which implementation ran last (for tests)


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


_SM_COUNT = {}


def _plan(b: int, k: int, device: torch.device):
    """(BLOCK_B, n_splits, cols_per_split). On CUDA about two programs per SM, so B=256
    (4 row blocks of 64) runs 4×64 = 256 programs on an H100's 132 SMs; splits cover whole
    multiples of 128 columns so every autotuned BLOCK_K tiles them evenly."""
    if device.type != "cuda":
        block_b = 16 if b <= 16 else 32
        n_splits = min(3, triton.cdiv(k, _CPU_BLOCK_K))
        cols = triton.cdiv(triton.cdiv(k, n_splits), _CPU_BLOCK_K) * _CPU_BLOCK_K
        return block_b, triton.cdiv(k, cols), cols
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    block_b = 16 if b <= 16 else 32 if b <= 32 else 64
    row_blocks = triton.cdiv(b, block_b)
    want = max(1, triton.cdiv(2 * _SM_COUNT[device], row_blocks))
    cols = triton.cdiv(triton.cdiv(k, want), 128) * 128
    return block_b, triton.cdiv(k, cols), cols


def _lowp(queue: torch.Tensor) -> bool:
    return queue.dtype in (torch.bfloat16, torch.float16)


def _partial_dtype(queue: torch.Tensor) -> torch.dtype:
    # The [n_splits, B, D] partials of v and of the gradient are the op's only sizeable
    # buffers (B=256, 256 programs: 8 MiB in fp32, against ~350 MiB for the eager reference).
    # With a bf16 queue they are stored in bf16 (relative error 2^-9 per partial, summed in
    # fp32), which halves them; statistics (m, l) stay fp32.
    return torch.bfloat16 if queue.dtype == torch.bfloat16 else torch.float32


def _tuned_kwargs(device: torch.device) -> dict:
    # The autotuned CUDA kernels pick BLOCK_K themselves; the interpreter uses a fixed one.
    return {} if device.type == "cuda" else {"BLOCK_K": _CPU_BLOCK_K}


def _triton_forward(s, t, queue, student_temp, teacher_temp, hard):
    global _last_path
    _last_path = "triton"
    s, t, queue = (x if x.stride(-1) == 1 else x.contiguous() for x in (s, t, queue))
    kern = _CUDA if s.is_cuda else _CPU
    (b, d), k = s.shape, queue.shape[0]
    block_b, n_splits, cols = _plan(b, k, s.device)
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
    kern["fwd_split"][(triton.cdiv(b, block_b), n_splits)](
        s, t, queue, m_a, l_a, m_b, l_b, v,
        b, k, d, s.stride(0), t.stride(0), queue.stride(0), cols, scale_a, scale_b,
        HARD=hard, LOWP=_lowp(queue), PREC="tf32x3",
        BLOCK_B=block_b, BLOCK_D=block_d, **_tuned_kwargs(s.device))
    loss_rows = torch.empty(b, **f32)
    lse = torch.empty(b, **f32)
    c = torch.empty(b, d, **f32)
    block_m = 16
    kern["fwd_merge"][(triton.cdiv(b, block_m),)](
        s, t, m_a, l_a, m_b, l_b, v, loss_rows, lse, c,
        b, d, n_splits, s.stride(0), t.stride(0), 1.0 / student_temp, scale_a, scale_b,
        HARD=hard, BLOCK_M=block_m, BLOCK_D=block_d)
    return loss_rows.mean(), lse, c


def _triton_backward(grad, s, queue, lse, c, student_temp):
    global _last_path
    _last_path = "triton"
    s, queue = (x if x.stride(-1) == 1 else x.contiguous() for x in (s, queue))
    kern = _CUDA if s.is_cuda else _CPU
    (b, d), k = s.shape, queue.shape[0]
    block_b, n_splits, cols = _plan(b, k, s.device)
    block_d = max(16, triton.next_power_of_2(d))
    g = torch.empty(n_splits, b, d, dtype=_partial_dtype(queue), device=s.device)
    kern["bwd_split"][(triton.cdiv(b, block_b), n_splits)](
        s, queue, lse, g, b, k, d, s.stride(0), queue.stride(0), cols, _LOG2E / student_temp,
        LOWP=_lowp(queue), PREC="tf32x3",
        BLOCK_B=block_b, BLOCK_D=block_d, **_tuned_kwargs(s.device))
    ds = torch.empty_like(s, memory_format=torch.contiguous_format)
    block_m = 16
    kern["bwd_reduce"][(triton.cdiv(b, block_m),)](
        s, g, c, grad.reshape(()).contiguous(), ds, b, d, n_splits, s.stride(0), ds.stride(0),
        1.0 / (b * student_temp), BLOCK_M=block_m, BLOCK_D=block_d)
    return ds


# ---------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU without the interpreter, float64): the same statistics, one
# block of _CHUNK queue rows at a time, so memory is O(B·_CHUNK) instead of O(B·K).
# ---------------------------------------------------------------------------------------


def _torch_forward(student, teacher, queue, student_temp, teacher_temp, hard):
    global _last_path
    _last_path = "torch"
    dtype = _acc_dtype(student, teacher, queue)
    s = F.normalize(student.to(dtype), dim=1)
    t = F.normalize(teacher.to(dtype), dim=1)
    a0 = (s * t).sum(1) / student_temp
    m_a, l_a = a0.clone(), torch.ones_like(a0)
    m_b, l_b, v = torch.full_like(a0, 1.0 / teacher_temp), torch.ones_like(a0), t.clone()
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
        loss_rows = lse - a0
    else:
        v = v / l_b[:, None]
        loss_rows = lse - (s * v).sum(1) / student_temp
    c = v - torch.exp(a0 - lse)[:, None] * t
    return loss_rows.mean(), lse, c


def _torch_backward(grad, student, queue, lse, c, student_temp):
    global _last_path
    _last_path = "torch"
    dtype = lse.dtype
    x = student.to(dtype)
    s = F.normalize(x, dim=1)
    g = -c
    for k0 in range(0, queue.shape[0], _CHUNK):
        q = queue[k0:k0 + _CHUNK].to(dtype)
        g = g + torch.exp(s @ q.T / student_temp - lse[:, None]) @ q
    g = g * (grad.to(dtype) / (student.shape[0] * student_temp))
    norm = x.norm(dim=1, keepdim=True)
    proj = (g - s * (s * g).sum(1, keepdim=True)) / norm
    return torch.where(norm > _NORM_EPS, proj, g / _NORM_EPS).to(student.dtype)


# ---------------------------------------------------------------------------------------
# Op registration: opaque to torch.compile, differentiable with respect to the student only.
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("fastseed::fused_ce", mutates_args=())
def _fused_ce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
              student_temp: float, teacher_temp: float, hard: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (mean loss, LSE(a) per row, c per row); the last two feed the backward."""
    with torch.autocast(student.device.type, enabled=False):
        if _use_triton(student, teacher, queue):
            return _triton_forward(student, teacher, queue, student_temp, teacher_temp, hard)
        return _torch_forward(student, teacher, queue, student_temp, teacher_temp, hard)


@_fused_ce.register_fake
def _(student, teacher, queue, student_temp, teacher_temp, hard):
    dtype = _acc_dtype(student, teacher, queue)
    b, d = student.shape
    return (student.new_empty((), dtype=dtype), student.new_empty((b,), dtype=dtype),
            student.new_empty((b, d), dtype=dtype))


@torch.library.custom_op("fastseed::fused_ce_backward", mutates_args=())
def _fused_ce_backward(grad: torch.Tensor, student: torch.Tensor, queue: torch.Tensor,
                       lse: torch.Tensor, c: torch.Tensor, student_temp: float) -> torch.Tensor:
    with torch.autocast(student.device.type, enabled=False):
        if _use_triton(student, queue, lse):
            return _triton_backward(grad, student, queue, lse, c, student_temp)
        return _torch_backward(grad, student, queue, lse, c, student_temp)


@_fused_ce_backward.register_fake
def _(grad, student, queue, lse, c, student_temp):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, _teacher, queue, student_temp, _teacher_temp, _hard = inputs
    _loss, lse, c = output
    ctx.mark_non_differentiable(lse, c)
    ctx.save_for_backward(student, queue, lse, c)
    ctx.student_temp = student_temp


def _backward(ctx, grad_loss, _grad_lse, _grad_c):
    student, queue, lse, c = ctx.saved_tensors
    ds = _fused_ce_backward(grad_loss, student, queue, lse, c, ctx.student_temp)
    return ds, None, None, None, None, None


_fused_ce.register_autograd(_backward, setup_context=_setup_context)

# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def seed_loss(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, *,
              student_temp: float = 0.2, teacher_temp: float = 1e-4) -> torch.Tensor:
    """SEED loss, mean over rows of −Σ_j softmax(b)_j log_softmax(a)_j (see module doc).
    student, teacher: raw [B, D] embeddings; queue: [K, D] unit rows. Gradient to student only.
    Returns an fp32 scalar (float64 when an input is float64)."""
    check_loss_args("student", student, "teacher", teacher, queue,
                    {"student_temp": student_temp, "teacher_temp": teacher_temp})
    return _fused_ce(student, teacher.detach(), queue.detach(),
                     float(student_temp), float(teacher_temp), False)[0]


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, *,
                  temp: float = 0.2) -> torch.Tensor:
    """MoCo InfoNCE: cross-entropy of [q̂·k̂, q̂·Q]/τ with target 0. Gradient to query only."""
    check_loss_args("query", query, "key", key, queue, {"temp": temp})
    return _fused_ce(query, key.detach(), queue.detach(), float(temp), 1.0, True)[0]
