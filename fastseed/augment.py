"""Batched augmentation on the device: uint8 NHWC crops -> normalized channels-last views.

Every sample draws its own parameters; the work is a fixed number of batched tensor ops, with
no loop over samples and no host sync, so it runs the same on CUDA and CPU tensors and under
torch.compile. The recipe is torchvision's MoCo-v2 chain after RandomResizedCrop and flip
(those run in the FFCV decoder, `fastseed.data`):

    RandomApply(ColorJitter(b, c, s, h), p=jitter_p)   # the 4 ops in a random order per sample
    RandomGrayscale(p=grayscale_p)                      # before the jitter if grayscale_first
    RandomApply(GaussianBlur(k ~ 0.1 x side, sigma), p=blur_p)
    RandomSolarize(0.5, p=solarize_p)                   # BYOL's second view; MoCo-v2: none
    Normalize(mean, std)

Same formulas as torchvision's tensor ops: brightness/contrast/saturation blend with black /
the mean luma / the luma (0.299, 0.587, 0.114) and clamp after each op; hue rotates the HSV
hue; blur is a separable Gaussian with reflect padding. Two exact-in-distribution shortcuts
keep the cost near one pass per op instead of four:

* Hue position. Each sample's op order is a uniform random permutation, as in torchvision,
  but the hue's place in it is stratified over the batch: a random quarter of the batch has hue
  first, another quarter second, and so on. Every sample's order is still uniform over the 24;
  only the hue of that quarter is computed at each of the 4 stages (not the whole batch 4x).
* Blur and grayscale subsets. The blurred (grayed) samples are a random round(p x N) of the
  batch, so the other samples cost nothing (the blur is the dearest op: 0.9 ms per 224 px
  image on 2 CPU cores). Per sample the probability is round(p N)/N, exactly p when p N is
  whole (256 x 0.2 = 51.2 -> 51: 0.1992).
These two apply to CUDA tensors (fixed-size groups: no host sync, compile friendly). CPU
tensors take independent per-sample draws exactly as torchvision does (variable-size groups
cost nothing there). On CPU the drawn parameters then go to a fused numba kernel that takes
each image through all of its ops in one visit (`fastseed._color_cpu`: 64 px, batch 256, 2
cores: ~40k images/s against ~6k for the batched ops below); FASTSEED_CPU_AUGMENT=torch selects
the batched PyTorch ops instead, processed in cache-sized chunks. The batched ops are the
reference the fused kernel is tested against.

`PRESETS` holds the official augmentations (MoCo-v2, SEED's SwAV and SimCLR variants, SimReg's
weak one), each a crop scale for the loader and the colour ops for `SSLAugment`;
`fastseed.methods.preset_name` picks the official one for a method and a teacher's checkpoint format.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale and PIL's convert('L')


def blur_kernel_size(side: int) -> int:
    """torchvision's MoCo-v2 uses 23 at 224 px, i.e. 10 % of the side, made odd."""
    k = int(0.1 * side)
    return max(3, k + 1 - k % 2)


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of x (N, 3, H, W) in [0, 1] by shift (N,) turns. V = max and the
    chroma max - min are kept; the channels are rebuilt with HSV->RGB's closed form
    c_n = V - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 = h.add_(6.0 * shift.view(-1, 1, 1))  # hue in sixths of a turn, mod 6 below
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        torch.sub(maxc, chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), out=out[:, c])
    return out


def _gaussian_kernels(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Normalized 1-D Gaussians of size k, one per sigma: (N, k), as torchvision's."""
    t = torch.linspace(-(k // 2), k // 2, k, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Separable Gaussian blur of x (N, C, H, W) with one sigma per sample: a depthwise conv
    (groups = N*C) on reflect-padded input, as torchvision's gaussian_blur."""
    n, c, h, w = x.shape
    kernel = _gaussian_kernels(sigma.to(x.dtype), k).repeat_interleave(c, 0)  # (N*C, k)
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, k, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, k), groups=n * c)
    return y.view(n, c, h, w)


def cpu_backend() -> str:
    """How CPU tensors are augmented: 'fused' (all ops of an image in one numba pass,
    `fastseed._color_cpu`; the default) or 'torch' (the batched reference path). Read at call
    time from FASTSEED_CPU_AUGMENT."""
    choice = os.environ.get("FASTSEED_CPU_AUGMENT", "fused").strip().lower() or "fused"
    if choice not in ("fused", "torch"):
        raise ValueError(f"FASTSEED_CPU_AUGMENT must be 'fused' or 'torch', got {choice!r}")
    return choice


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


class Normalize(nn.Module):
    """uint8 (N, H, W, 3) -> (x/255 - mean)/std as (N, 3, H, W) channels-last `out_dtype`."""

    def __init__(self, mean, std, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)),
                             persistent=False)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
                             / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # permute() of NHWC memory is already channels-last: one fused pass, no layout copy.
        y = torch.addcmul(self.shift, x.permute(0, 3, 1, 2), self.scale)
        return y.to(self.out_dtype, memory_format=torch.channels_last)


class SSLAugment(nn.Module):
    """Per-sample random color jitter, grayscale, blur, solarize, then normalize (see module doc).

    forward(x, generator=None): x uint8 (N, H, W, 3) on any device (any strides, e.g. a view
    from `fastseed.data.ssl_loader`); generator on x's device for reproducible draws. Returns
    (N, 3, H, W) in `out_dtype`, torch.channels_last memory format, normalized.
    """

    def __init__(self, *, mean, std, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, grayscale_first: bool = False, blur_p: float = 0.5,
                 blur_sigma=(0.1, 2.0), solarize_p: float = 0.0, out_dtype: torch.dtype = torch.float32,
                 cpu_chunk_pixels: int = 8 * 224 * 224):
        super().__init__()
        self.cpu_chunk_pixels = cpu_chunk_pixels
        b, c, s, h = jitter
        if not 0 <= h <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {h}")
        self.ranges = [(max(0.0, 1 - v), 1 + v) for v in (b, c, s)]
        self.hue = h
        self.jitter_p, self.grayscale_p, self.blur_p, self.solarize_p = jitter_p, grayscale_p, blur_p, solarize_p
        self.grayscale_first = grayscale_first
        self.blur_sigma = blur_sigma
        self.normalize = Normalize(mean, std, out_dtype)
        # The 24 orders of (brightness 0, contrast 1, saturation 2, hue 3), grouped by where hue
        # sits: rows 6p .. 6p+5 have the hue at stage p.
        perms = sorted(itertools.permutations(range(4)), key=lambda p: p.index(3))
        self.register_buffer("orders", torch.tensor(perms, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (f"jitter={self.ranges}+hue {self.hue} p={self.jitter_p}, grayscale_p={self.grayscale_p}"
                f"{' (first)' if self.grayscale_first else ''}, blur_p={self.blur_p} sigma={self.blur_sigma}, "
                f"solarize_p={self.solarize_p}")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, h, w, _ = x.shape
        if x.is_cuda:
            return self._static(x, self._empty_output(x), generator)
        out = self._empty_output(x)
        if cpu_backend() == "fused":
            return self._fused(x, out, generator)
        # Batched ops on CPU: chunks that stay in cache. Each op is one memory-bound pass; over a batch of 64
        # images at 224 px (38 MB per fp32 copy) that runs at RAM speed, over 8 images at cache
        # speed: 410 vs 298 images/s on a 2-core EPYC VM. Small images need no chunks.
        # Small images the other way round: per-op dispatch, not memory, dominates, so a whole
        # batch of up to 2^20 pixels is one chunk (64 px, batch 256, 2 cores: 6.2k vs 5.8k
        # images/s in 98-image chunks; the data benchmark 4.91-5.15x torchvision vs 4.39-4.76x).
        chunk = n if n * h * w <= 1 << 20 else max(1, self.cpu_chunk_pixels // (h * w))
        for i in range(0, n, chunk):
            self._bernoulli(x[i:i + chunk], out[i:i + chunk], generator)
        return out

    def _empty_output(self, x):
        n, h, w, _ = x.shape
        return torch.empty((n, 3, h, w), dtype=self.normalize.out_dtype, device=x.device,
                           memory_format=torch.channels_last)

    def _draw(self, n: int, dev, generator):
        u = torch.rand(n, 8, generator=generator, device=dev)
        one = torch.ones(n, device=dev)
        on = u[:, 0] < self.jitter_p
        factors = torch.stack([torch.where(on, _uniform(u[:, 1 + i], *r), one) for i, r in enumerate(self.ranges)]
                              + [one], 1)  # (N, 4); the hue slot is a no-op blend
        hue = torch.where(on, _uniform(u[:, 4], -self.hue, self.hue), torch.zeros_like(one))
        return u, factors, hue

    def _static(self, x, out, generator):
        """Fixed-size groups (no host sync, torch.compile friendly): the hue stage and the blur
        subset are stratified over the batch as described in the module doc."""
        n, dev = x.shape[0], x.device
        u, factors, hue = self._draw(n, dev, generator)
        # Sample perm[j] gets its hue at stage j % 4, the other ops in random order.
        perm = torch.randperm(n, generator=generator, device=dev)
        hue_stage = torch.empty(n, dtype=torch.int64, device=dev)
        hue_stage[perm] = torch.arange(n, device=dev) % 4
        pick = torch.randint(0, 6, (n,), generator=generator, device=dev)
        order = self.orders[hue_stage * 6 + pick]  # (N, 4)
        hue_groups = [perm[stage::4] for stage in range(4)]
        blur = torch.randperm(n, generator=generator, device=dev)[:round(self.blur_p * n)]
        gray = torch.randperm(n, generator=generator, device=dev)[:round(self.grayscale_p * n)]
        return self._augment(x, out, u, factors, hue, order, hue_groups, blur, gray)

    def _bernoulli_draws(self, n, dev, generator):
        """Independent draws per sample, exactly torchvision's: each sample's op order uniform
        over the 24, blur with probability blur_p; only the jittered samples are jittered.
        Returns u, factors, hue, order (one row per jittered sample) and the jittered / blurred
        / gray masks (N,)."""
        u, factors, hue = self._draw(n, dev, generator)
        jittered = u[:, 0] < self.jitter_p
        order = torch.rand(int(jittered.sum()), 4, generator=generator, device=dev).argsort(1)
        blur = torch.rand(n, generator=generator, device=dev) < self.blur_p
        gray = u[:, 5] < self.grayscale_p
        return u, factors, hue, order, jittered, blur, gray

    def _bernoulli(self, x, out, generator):
        """The batched PyTorch path (any device; variable-size groups: a host sync on CUDA,
        free on CPU): the reference for `_fused`."""
        u, factors, hue, order, *masks = self._bernoulli_draws(x.shape[0], x.device, generator)
        jittered, blur, gray = (m.nonzero().view(-1) for m in masks)
        hue_stage = (order == 3).int().argmax(1)
        hue_groups = [(hue_stage == stage).nonzero().view(-1) for stage in range(4)]
        return self._augment(x, out, u, factors, hue, order, hue_groups, blur, gray, jittered)

    def _fused(self, x, out, generator):
        """CPU: the same draws as `_bernoulli`, then every op of one image in one fused pass
        while the image is in cache (`fastseed._color_cpu`)."""
        from fastseed import _color_cpu
        n, h, w, _ = x.shape
        u, factors, hue, order, jittered, blur, gray = self._bernoulli_draws(n, x.device, generator)
        full_order = torch.zeros(n, 4, dtype=torch.int64)
        full_order[jittered] = order
        kernels = _gaussian_kernels(_uniform(u[:, 7], *self.blur_sigma), blur_kernel_size(min(h, w)))
        y = out if out.dtype == torch.float32 else self._empty_output(x).float()
        _color_cpu.augment(x, y, jittered, full_order, factors, hue, gray, self.grayscale_first, blur, kernels,
                           u[:, 6] < self.solarize_p, (self.normalize.scale * 255.0).view(3),
                           self.normalize.shift.view(3))
        if y is not out:
            out.copy_(y)
        return out

    def _augment(self, x, out, u, factors, hue, order, hue_groups, blur, gray, jittered=None):
        """Apply the drawn parameters; `order`/`hue_groups` index the `jittered` samples
        (None: all of them). Writes the normalized result into `out`."""
        n, h, w, _ = x.shape
        # NCHW contiguous while augmenting: each channel is one contiguous plane, so the
        # per-channel math (luma, hue) vectorizes; channels-last again only at the end.
        x = torch.mul(x.permute(0, 3, 1, 2), 1 / 255, out=torch.empty((n, 3, h, w), device=x.device))
        if self.grayscale_first:
            x = self._grayscale(x, gray)
        if self.jitter_p > 0 and jittered is None:
            x = self._jitter(x, factors, hue, order, hue_groups)
        elif self.jitter_p > 0 and jittered.numel() > 0:
            x.index_copy_(0, jittered, self._jitter(x.index_select(0, jittered), factors[jittered], hue[jittered],
                                                    order, hue_groups))
        if not self.grayscale_first:
            x = self._grayscale(x, gray)

        if self.blur_p > 0 and blur.numel() > 0:
            sigma = _uniform(u[blur, 7], *self.blur_sigma)
            x.index_copy_(0, blur, _gaussian_blur(x.index_select(0, blur), sigma, blur_kernel_size(min(h, w))))

        if self.solarize_p > 0:
            sol = (u[:, 6] < self.solarize_p).view(n, 1, 1, 1)
            x = torch.where(sol & (x >= 0.5), 1.0 - x, x)

        # Normalize on the float image: (x - mean)/std == x*255*scale + shift.
        return torch.addcmul(self.normalize.shift, x, self.normalize.scale * 255.0, out=out)

    def _grayscale(self, x, gray):
        if self.grayscale_p > 0 and gray.numel() > 0:  # only the chosen samples: 1/5 of a pass
            x.index_copy_(0, gray, _luma(x.index_select(0, gray)).expand(-1, 3, -1, -1))
        return x

    def _jitter(self, x, factors, hue, order, hue_groups):
        """ColorJitter on x (M, 3, H, W) in [0, 1]: stage s applies op order[:, s] to each sample."""
        m = x.shape[0]
        for stage in range(4):
            op = order[:, stage]
            f = factors.gather(1, op[:, None]).view(m, 1, 1, 1)
            # blend f*x + (1-f)*target, target = 0 | mean luma | luma for b | c | s
            gray = _luma(x)
            w_sat = (op == 2).to(x.dtype).view(m, 1, 1, 1) * (1 - f)
            w_con = (op == 1).to(x.dtype).view(m, 1, 1, 1) * (1 - f)
            target = torch.addcmul(gray.mean((2, 3), keepdim=True) * w_con, gray, w_sat)  # one plane
            x = torch.addcmul(target, x, f).clamp_(0.0, 1.0)
            idx = hue_groups[stage]
            if self.hue > 0 and idx.numel() > 0:
                x.index_copy_(0, idx, _hue_shift(x.index_select(0, idx), hue[idx]))
        return x


@dataclass(frozen=True)
class Preset:
    """An official augmentation: RandomResizedCrop's area share (done by the FFCV loader,
    `fastseed.data.ssl_loader(scale=...)`, which also flips with p 1/2, as every preset here
    does), then the colour ops of `SSLAugment`."""

    crop_scale: tuple[float, float]
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    grayscale_first: bool = False
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


PRESETS = {
    # facebookresearch/moco main_moco.py:223-235 (--aug-plus); jacobswan1/SEED tools/utils.py:225-236
    "moco_v2": Preset(crop_scale=(0.2, 1.0)),
    # jacobswan1/SEED tools/utils.py:202-212 (swav_aug): MoCo-v2's colour ops on a wider crop range
    "swav": Preset(crop_scale=(0.14, 1.0)),
    # jacobswan1/SEED tools/utils.py:248-255 (simclr_aug, = mocov1_aug): grayscale, then a jitter
    # with hue 0.4 applied to every image, no blur
    "simclr": Preset(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_first=True,
                     blur_p=0.0),
    # UCDvision/simreg dataloader.py:63-68 (augmentation_weak; run.sh --weak_weak): crop and flip
    "weak": Preset(crop_scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
}


def preset_augment(name: str, mean, std, out_dtype: torch.dtype = torch.float32) -> SSLAugment:
    """The colour ops of preset `name` (its crop scale goes to the loader)."""
    p = PRESETS[name]
    return SSLAugment(mean=mean, std=std, jitter=p.jitter, jitter_p=p.jitter_p, grayscale_p=p.grayscale_p,
                      grayscale_first=p.grayscale_first, blur_p=p.blur_p, blur_sigma=p.blur_sigma,
                      out_dtype=out_dtype)


def moco_v2_augment(mean, std, out_dtype: torch.dtype = torch.float32) -> SSLAugment:
    """MoCo-v2 / SEED: jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2, blur sigma 0.1-2 p 0.5."""
    return preset_augment("moco_v2", mean, std, out_dtype)


def byol_augment(mean, std, out_dtype: torch.dtype = torch.float32) -> tuple[SSLAugment, SSLAugment]:
    """BYOL's asymmetric pair: jitter 0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2; view 1 always
    blurred, view 2 blurred with p 0.1 and solarized with p 0.2."""
    common = dict(mean=mean, std=std, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2,
                  blur_sigma=(0.1, 2.0), out_dtype=out_dtype)
    return SSLAugment(blur_p=1.0, solarize_p=0.0, **common), SSLAugment(blur_p=0.1, solarize_p=0.2, **common)
