"""The Triton kernels of fastseed.kernels. This module imports triton alone, never torch, so
that the ahead-of-time check (check.py) can compile these very functions under any Python
that has triton: the Triton cache key of a kernel hashes its source, its line numbers and
the constexpr globals it reads, so the cache entries the check writes are the ones the JIT
looks up. The torch-side dispatch, autograd and interpreter wrappers live in seed_loss.py
and enqueue.py; the math is written out in seed_loss.py's docstring.

Ints that only count rows or columns (B, K, split sizes) are not specialised: the JIT would
otherwise compile one variant per value ≡ 0 mod 16 or == 1, which the check could not
enumerate. D and the row strides stay specialised (their divisibility lets loads vectorise).
"""

import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # F.normalize's eps: x̂ = x / max(‖x‖, eps)
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


# ---------------------------------------------------------------------------------------
# Fused path (16-bit queue, D ≤ FUSED_MAX_D): whole rows of ŝ, t̂ and v stay on chip.
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["B", "K", "cols_per_split"])
def fused_fwd_split(S, T, Q, M_A, L_A, M_B, L_B, V,
                    B, K, D, stride_s, stride_t, stride_q, cols_per_split, scale_a, scale_b,
                    HARD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
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
    s_lp = s.to(Q.dtype.element_ty)
    if not HARD:
        t = tl.load(T + rows[:, None] * stride_t + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
        t = t / tl.maximum(tl.sqrt(tl.sum(t * t, 1)), EPS)[:, None]
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
        a = tl.where(col_ok[None, :], tl.dot(s_lp, qt) * scale_a, float("-inf"))
        m_new = tl.maximum(m_a, tl.max(a, 1))
        l_a = l_a * tl.exp2(m_a - m_new) + tl.sum(tl.exp2(a - m_new[:, None]), 1)
        m_a = m_new
        if not HARD:
            b = tl.dot(t_lo, qt, tl.dot(t_hi, qt))
            b = tl.where(col_ok[None, :], b * scale_b, float("-inf"))
            mb_new = tl.maximum(m_b, tl.max(b, 1))
            alpha = tl.exp2(m_b - mb_new)
            r = tl.exp2(b - mb_new[:, None])
            l_b = l_b * alpha + tl.sum(r, 1)
            v = tl.dot(r.to(Q.dtype.element_ty), q, v * alpha[:, None])
            m_b = mb_new

    out = split * B + rows
    tl.store(M_A + out, m_a, mask=row_ok)
    tl.store(L_A + out, l_a, mask=row_ok)
    if not HARD:
        tl.store(M_B + out, m_b, mask=row_ok)
        tl.store(L_B + out, l_b, mask=row_ok)
        tl.store(V + out[:, None] * D + dims[None, :], v.to(V.dtype.element_ty), mask=rd_ok)


@triton.jit(do_not_specialize=["B", "n_splits"])
def fused_fwd_merge(S, T, M_A, L_A, M_B, L_B, V, LOSS, LSE, C,
                    B, D, n_splits, stride_s, stride_t, inv_ts, scale_a, scale_b,
                    HARD: tl.constexpr, SELF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the split partials (in split order) with column 0 (with SELF; without it the
    columns are the queue's alone: the batch's keys already in it); write loss_i, LSE(a)_i and
    LSE(b)_i (0 for a hard target) to LSE[0:2, i], and c_i."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    rd_ok = row_ok[:, None] & (dims < D)[None, :]
    s = tl.load(S + rows[:, None] * stride_s + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    s = s / tl.maximum(tl.sqrt(tl.sum(s * s, 1)), EPS)[:, None]
    t = tl.load(T + rows[:, None] * stride_t + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
    t = t / tl.maximum(tl.sqrt(tl.sum(t * t, 1)), EPS)[:, None]

    a0 = tl.sum(s * t, 1) * scale_a  # column 0 of the student logits, base 2
    if SELF:
        m = a0
    else:  # the queue holds at least one column (seed_loss checks): m ends finite
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for k in range(n_splits):
        m = tl.maximum(m, tl.load(M_A + k * B + rows, mask=row_ok, other=0.0))
    if SELF:
        l = tl.exp2(a0 - m)
    else:
        l = tl.zeros([BLOCK_M], tl.float32)
    for k in range(n_splits):
        mk = tl.load(M_A + k * B + rows, mask=row_ok, other=0.0)
        l += tl.load(L_A + k * B + rows, mask=row_ok, other=0.0) * tl.exp2(mk - m)
    lse2 = m + tl.log2(l)

    if HARD:
        v = t
        loss = (lse2 - a0) * LN2
        lse_b = tl.zeros([BLOCK_M], tl.float32)
    else:
        b0 = scale_b  # t̂·t̂/τT taken as exactly 1/τT (base 2)
        if SELF:
            mb = tl.zeros([BLOCK_M], tl.float32) + b0
        else:
            mb = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for k in range(n_splits):
            mb = tl.maximum(mb, tl.load(M_B + k * B + rows, mask=row_ok, other=0.0))
        if SELF:
            w0 = tl.exp2(b0 - mb)
            lb = w0
            v = t * w0[:, None]
        else:
            lb = tl.zeros([BLOCK_M], tl.float32)
            v = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for k in range(n_splits):
            wk = tl.exp2(tl.load(M_B + k * B + rows, mask=row_ok, other=0.0) - mb)
            lb += tl.load(L_B + k * B + rows, mask=row_ok, other=0.0) * wk
            vk = tl.load(V + (k * B + rows)[:, None] * D + dims[None, :], mask=rd_ok, other=0.0).to(tl.float32)
            v += vk * wk[:, None]
        v = v / lb[:, None]
        loss = lse2 * LN2 - tl.sum(s * v, 1) * inv_ts
        lse_b = (mb + tl.log2(lb)) * LN2
    if SELF:
        c = v - tl.exp2(a0 - lse2)[:, None] * t
    else:
        c = v
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(LSE + rows, lse2 * LN2, mask=row_ok)
    tl.store(LSE + B + rows, lse_b, mask=row_ok)
    tl.store(C + rows[:, None] * D + dims[None, :], c, mask=rd_ok)


@triton.jit(do_not_specialize=["B", "K", "cols_per_split"])
def fused_bwd_split(S, Q, LSE, G, B, K, D, stride_s, stride_q, cols_per_split, scale_a,
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
        p = tl.exp2(tl.dot(s_lp, tl.trans(q)) * scale_a - lse2[:, None])
        g = tl.dot(p.to(Q.dtype.element_ty), q, g)
    tl.store(G + (split * B + rows)[:, None] * D + dims[None, :], g.to(G.dtype.element_ty), mask=rd_ok)


@triton.jit(do_not_specialize=["B", "n_splits"])
def fused_bwd_reduce(S, G, C, GRAD, DS, B, D, n_splits, stride_s, stride_ds, inv_bts,
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


# ---------------------------------------------------------------------------------------
# D-tiled path (any D, any queue dtype): logit tiles accumulate over chunks of BLOCK_D
# dimensions, so a program holds [BLOCK_B, BLOCK_K] fp32 logits and never a whole row.
# Its inputs ŝ, t̂_hi, t̂_lo are normalised rows [B, D] (stride D) made by the host.
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile_logits(S, TH, TL, Q, rows, row_ok, cols, col_ok, D, stride_q,
                 HARD: tl.constexpr, FP32: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw dot products a = ŝ·Q_j and b = t̂·Q_j (b = t̂_hi·Q_j + t̂_lo·Q_j for a 16-bit
    queue, one "tf32x3" dot for fp32) of one [BLOCK_B, BLOCK_K] tile; b is 0 when HARD."""
    a = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    b = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        rd = rows[:, None] * D + dims[None, :]
        rd_ok = row_ok[:, None] & dim_ok[None, :]
        qt = tl.trans(tl.load(Q + cols[:, None] * stride_q + dims[None, :],
                              mask=col_ok[:, None] & dim_ok[None, :], other=0.0))
        if FP32:
            a = tl.dot(tl.load(S + rd, mask=rd_ok, other=0.0), qt, a, input_precision="tf32x3")
            if not HARD:
                b = tl.dot(tl.load(TH + rd, mask=rd_ok, other=0.0), qt, b, input_precision="tf32x3")
        else:
            a = tl.dot(tl.load(S + rd, mask=rd_ok, other=0.0), qt, a)
            if not HARD:
                b = tl.dot(tl.load(TH + rd, mask=rd_ok, other=0.0), qt, b)
                b = tl.dot(tl.load(TL + rd, mask=rd_ok, other=0.0), qt, b)
    return a, b


@triton.jit(do_not_specialize=["B", "K", "cols_per_split"])
def tiled_stats(S, TH, TL, Q, M_A, L_A, M_B, L_B, W,
                B, K, D, stride_q, cols_per_split, scale_a, scale_b,
                HARD: tl.constexpr, FP32: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial statistics of queue columns [split·cols_per_split, …) for one row block, in
    base-2 units: m_a, l_a and, unless HARD, m_b, l_b and w = Σ_j 2^(b_j − m_b)·a_j."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    m_a = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK_B], tl.float32)
    m_b = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_b = tl.zeros([BLOCK_B], tl.float32)
    w = tl.zeros([BLOCK_B], tl.float32)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, K)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_end
        a, b = _tile_logits(S, TH, TL, Q, rows, row_ok, cols, col_ok, D, stride_q,
                            HARD, FP32, BLOCK_B, BLOCK_K, BLOCK_D)
        a = a * scale_a  # columns past the end hold 0 here (Q loaded as 0)
        a_in = tl.where(col_ok[None, :], a, float("-inf"))
        m_new = tl.maximum(m_a, tl.max(a_in, 1))
        l_a = l_a * tl.exp2(m_a - m_new) + tl.sum(tl.exp2(a_in - m_new[:, None]), 1)
        m_a = m_new
        if not HARD:
            b = tl.where(col_ok[None, :], b * scale_b, float("-inf"))
            mb_new = tl.maximum(m_b, tl.max(b, 1))
            alpha = tl.exp2(m_b - mb_new)
            r = tl.exp2(b - mb_new[:, None])  # 0 past the end, where a is 0: no 0·∞
            l_b = l_b * alpha + tl.sum(r, 1)
            w = w * alpha + tl.sum(r * a, 1)
            m_b = mb_new
    out = split * B + rows
    tl.store(M_A + out, m_a, mask=row_ok)
    tl.store(L_A + out, l_a, mask=row_ok)
    if not HARD:
        tl.store(M_B + out, m_b, mask=row_ok)
        tl.store(L_B + out, l_b, mask=row_ok)
        tl.store(W + out, w, mask=row_ok)


@triton.jit(do_not_specialize=["B", "col0", "n_cols"])
def tiled_probs(S, TH, TL, Q, LSE, P, B, D, stride_q, stride_p, col0, n_cols, scale_a, scale_b,
                HARD: tl.constexpr, FP32: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """P[i, j] = p_ij − r_ij for queue columns col0 + j, j < n_cols (r = 0 when HARD), from
    the logits recomputed exactly as the forward computed them and the saved LSEs."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    local = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < B
    col_ok = local < n_cols
    a, b = _tile_logits(S, TH, TL, Q, rows, row_ok, col0 + local, col_ok, D, stride_q,
                        HARD, FP32, BLOCK_B, BLOCK_K, BLOCK_D)
    lse_a = tl.load(LSE + rows, mask=row_ok, other=0.0) * LOG2E
    p = tl.exp2(a * scale_a - lse_a[:, None])
    if not HARD:
        lse_b = tl.load(LSE + B + rows, mask=row_ok, other=0.0) * LOG2E
        p -= tl.exp2(b * scale_b - lse_b[:, None])
    tl.store(P + rows[:, None] * stride_p + local[None, :], p.to(P.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------
# Enqueue: two passes over chunks of BLOCK_D dimensions (norm, then normalised store), so
# any D launches with the same small tile.
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_write", "skip", "K"])
def enqueue_rows(Q, PTR, KEYS, n_write, skip, K, D, stride_q, stride_k,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows i of KEYS[skip:skip+n_write] → Q[(ptr + skip + i) mod K], L2-normalised."""
    i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < n_write
    src = KEYS + (skip + i)[:, None] * stride_k
    sq = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(src + dims[None, :], mask=i_ok[:, None] & (dims < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(x * x, 1)
    norm = tl.maximum(tl.sqrt(sq), EPS)
    dst = Q + ((tl.load(PTR) + skip + i) % K)[:, None] * stride_q
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        ok = i_ok[:, None] & (dims < D)[None, :]
        x = tl.load(src + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(dst + dims[None, :], (x / norm[:, None]).to(Q.dtype.element_ty), mask=ok)
