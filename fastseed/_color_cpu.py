"""Fused CPU augmentation: every op of `fastseed.augment.SSLAugment` after the parameter
draws (color jitter, grayscale, blur, solarization, normalization) as one numba kernel that
takes each image through all of them while it sits in cache.

The batched PyTorch path (`SSLAugment._augment`) is the reference: each of its ops is a full
pass over the batch, ~80 passes in all (the hue alone is ~35), so on a small CPU the batch
streams through memory again and again. Here an image is read once as uint8, taken through its
ops in planar float32 scratch (a contiguous loop per op, branch-free inside, which LLVM
vectorizes), then written once, normalized, into the channels-last output. Same float32
formulas in the same order; the parameters are drawn by the caller with torch's generator, so
both paths see the same draws (tests/test_augment.py compares them op by op).

The kernel releases the GIL; the batch is split over `torch.get_num_threads()` Python threads.
No numba parallel region is launched: FFCV's loader threads run their own, and numba's default
workqueue layer does not allow two at once.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

_F = np.float32
L0, L1, L2 = _F(0.299), _F(0.587), _F(0.114)  # fastseed.augment.LUMA
ZERO, ONE, TWO, FOUR, SIX = _F(0.0), _F(1.0), _F(2.0), _F(4.0), _F(6.0)
INV255 = _F(1 / 255)


@numba.njit(nogil=True, cache=True, inline="always")
def _clamp01(v):
    return min(max(v, ZERO), ONE)


@numba.njit(nogil=True, cache=True, inline="always")
def _wrap6(k):
    """k mod 6 for k in [-6, 18): torch.remainder(k, 6) without a division."""
    k = k + SIX if k < ZERO else k
    k = k - SIX if k >= SIX else k
    return k - SIX if k >= SIX else k


@numba.njit(nogil=True, cache=True)
def _hue(r, g, b, shift):
    """In-place HSV hue rotation of planes r, g, b by `shift` turns (augment._hue_shift)."""
    s6 = SIX * shift
    for p in range(r.shape[0]):
        rr, gg, bb = r[p], g[p], b[p]
        mx = max(max(rr, gg), bb)
        chroma = mx - min(min(rr, gg), bb)
        safe = chroma if chroma > ZERO else ONE
        num = (gg - bb) if mx == rr else ((bb - rr) if mx == gg else (rr - gg))
        off = ZERO if mx == rr else (TWO if mx == gg else FOUR)
        h6 = (num / safe + off) + s6
        k = _wrap6(h6 + _F(5.0))
        r[p] = mx - chroma * _clamp01(min(k, FOUR - k))
        k = _wrap6(h6 + _F(3.0))
        g[p] = mx - chroma * _clamp01(min(k, FOUR - k))
        k = _wrap6(h6 + ONE)
        b[p] = mx - chroma * _clamp01(min(k, FOUR - k))


@numba.njit(nogil=True, cache=True, inline="always")
def _grayscale(r, g, b):
    """In-place luma of planes r, g, b into all three (augment._luma)."""
    for p in range(r.shape[0]):
        v = L0 * r[p] + L1 * g[p] + L2 * b[p]
        r[p] = v
        g[p] = v
        b[p] = v


@numba.njit(nogil=True, cache=True, inline="always")
def _reflect(i, n):
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


@numba.njit(nogil=True, cache=True)
def _blur(plane, tmp, h, w, kern):
    """Separable Gaussian blur of plane (h*w,) in place, reflect padding (augment._gaussian_blur:
    the vertical pass, then the horizontal one). tmp: scratch of the same size. Inner loops run
    over row views with a range index, which numba knows is non-negative (no wrap-around
    check), so LLVM vectorizes them."""
    k = kern.shape[0]
    rad = k // 2
    for y in range(h):
        dst = tmp[y * w:(y + 1) * w]
        dst[:] = ZERO
        for j in range(k):
            src_row = _reflect(y + j - rad, h)
            src = plane[src_row * w:(src_row + 1) * w]
            c = kern[j]
            for x in range(w):
                dst[x] += c * src[x]
    for y in range(h):
        src = tmp[y * w:(y + 1) * w]
        dst = plane[y * w:(y + 1) * w]
        dst[:] = ZERO
        for j in range(k):
            c = kern[j]
            d = j - rad
            lo, hi = max(0, -d), min(w, w - d)  # x + d inside [0, w) for lo <= x < hi
            for x in range(lo):
                dst[x] += c * src[_reflect(x + d, w)]
            inner_dst, inner_src = dst[lo:hi], src[lo + d:hi + d]
            for x in range(hi - lo):
                inner_dst[x] += c * inner_src[x]
            for x in range(hi, w):
                dst[x] += c * src[_reflect(x + d, w)]


@numba.njit(nogil=True, cache=True)
def _augment_range(x, out, h, w, lo, hi, jittered, order, factors, hue, gray, blurred, kernels,
                   solarized, mul, add, gray_first):
    """Images lo..hi-1 of x (uint8 N, H*W, 3) into out (float32 N, H*W, 3), in the reference
    order: jitter stage s applies op order[i, s] (0 brightness, 1 contrast, 2 saturation,
    3 hue) with factor factors[i, op] / shift hue[i] where jittered[i]; luma for all channels
    where gray[i] (before the jitter if gray_first); the blur kernels[i] where blurred[i];
    1 - v for v >= 0.5 where solarized[i]; then out = v * mul + add per channel."""
    n_px = h * w
    r = np.empty(n_px, np.float32)
    g = np.empty(n_px, np.float32)
    b = np.empty(n_px, np.float32)
    tmp = np.empty(n_px, np.float32)
    for i in range(lo, hi):
        xi, oi = x[i], out[i]
        for p in range(n_px):
            r[p] = _F(xi[p, 0]) * INV255
            g[p] = _F(xi[p, 1]) * INV255
            b[p] = _F(xi[p, 2]) * INV255
        if gray[i] and gray_first:
            _grayscale(r, g, b)
        if jittered[i]:
            for s in range(4):
                op = order[i, s]
                f = factors[i, op]
                if op == 0:  # blend with black
                    for p in range(n_px):
                        r[p] = _clamp01(r[p] * f)
                        g[p] = _clamp01(g[p] * f)
                        b[p] = _clamp01(b[p] * f)
                elif op == 1:  # blend with the mean luma
                    acc = 0.0
                    for p in range(n_px):
                        acc += L0 * r[p] + L1 * g[p] + L2 * b[p]
                    t = _F(acc / n_px) * (ONE - f)
                    for p in range(n_px):
                        r[p] = _clamp01(t + r[p] * f)
                        g[p] = _clamp01(t + g[p] * f)
                        b[p] = _clamp01(t + b[p] * f)
                elif op == 2:  # blend with the luma
                    for p in range(n_px):
                        t = (L0 * r[p] + L1 * g[p] + L2 * b[p]) * (ONE - f)
                        r[p] = _clamp01(t + r[p] * f)
                        g[p] = _clamp01(t + g[p] * f)
                        b[p] = _clamp01(t + b[p] * f)
                elif hue[i] != ZERO:
                    _hue(r, g, b, hue[i])
        if gray[i] and not gray_first:
            _grayscale(r, g, b)
        if blurred[i]:
            _blur(r, tmp, h, w, kernels[i])
            _blur(g, tmp, h, w, kernels[i])
            _blur(b, tmp, h, w, kernels[i])
        if solarized[i]:
            for p in range(n_px):
                r[p] = ONE - r[p] if r[p] >= _F(0.5) else r[p]
                g[p] = ONE - g[p] if g[p] >= _F(0.5) else g[p]
                b[p] = ONE - b[p] if b[p] >= _F(0.5) else b[p]
        m0, m1, m2, a0, a1, a2 = mul[0], mul[1], mul[2], add[0], add[1], add[2]
        for p in range(n_px):
            oi[p, 0] = r[p] * m0 + a0
            oi[p, 1] = g[p] * m1 + a1
            oi[p, 2] = b[p] * m2 + a2


_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def augment(x: torch.Tensor, out: torch.Tensor, jittered: torch.Tensor, order: torch.Tensor,
            factors: torch.Tensor, hue: torch.Tensor, gray: torch.Tensor, gray_first: bool, blurred: torch.Tensor,
            kernels: torch.Tensor, solarized: torch.Tensor, mul: torch.Tensor, add: torch.Tensor) -> None:
    """x uint8 (N, H, W, 3) CPU, any strides; out float32 (N, 3, H, W) channels-last, written.
    jittered/gray/blurred/solarized bool (N,); gray_first: grayscale before the jitter;
    order int64 (N, 4); factors float32 (N, 4);
    hue float32 (N,); kernels float32 (N, k) normalized 1-D Gaussians, k odd and < min(H, W)
    (rows of unblurred samples are ignored); mul, add float32 (3,)."""
    global _pool, _pool_size
    n, h, w, _ = x.shape
    if not out.is_contiguous(memory_format=torch.channels_last) or out.dtype != torch.float32:
        raise ValueError("out must be float32 channels-last")
    if kernels.shape[1] // 2 >= min(h, w):
        raise ValueError(f"blur kernel of size {kernels.shape[1]} is too large for {h}x{w} images")
    xs = x.numpy()
    if xs.strides[1:] != (w * 3, 3, 1):  # one flat run per image, e.g. a crop view: copy
        xs = np.ascontiguousarray(xs)
    # (N, H*W, 3) views: merging H and W needs no copy now, whatever the batch stride
    args = [xs.reshape(n, h * w, 3), out.permute(0, 2, 3, 1).numpy().reshape(n, h * w, 3), h, w, 0, n]
    b8, i64, f32 = torch.bool, torch.int64, torch.float32
    args += [t.to(dtype).contiguous().numpy() for t, dtype in (
        (jittered, b8), (order, i64), (factors, f32), (hue, f32), (gray, b8), (blurred, b8), (kernels, f32),
        (solarized, b8), (mul, f32), (add, f32))] + [bool(gray_first)]
    threads = max(1, min(torch.get_num_threads(), n))
    if threads == 1:
        _augment_range(*args)
        return
    if _pool is None or _pool_size < threads:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="fastseed-augment"), threads
    bounds = np.linspace(0, n, threads + 1).round().astype(int)
    jobs = [_pool.submit(_augment_range, *args[:4], int(lo), int(hi), *args[6:])
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    for job in jobs:
        job.result()
