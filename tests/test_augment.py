"""Batched augmentation vs torchvision: exact single ops, MoCo-v2 batch statistics, format; the
fused CPU kernel against the batched PyTorch path on the same draws."""
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF

from fastseed.augment import (Normalize, SSLAugment, _gaussian_blur, _hue_shift, blur_kernel_size,
                              byol_augment, cpu_backend, moco_v2_augment)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def colorful(n, side, seed=0):
    """Smooth random color images (uint8 NHWC), like natural photos in their statistics."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_single_ops_match_torchvision():
    x = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    for shift in (0.0, 0.1, -0.07, 0.45):
        want = torch.stack([TF.adjust_hue(im, shift) for im in x])
        torch.testing.assert_close(_hue_shift(x.clone(), torch.full((6,), shift)), want, atol=1e-5, rtol=0)
    sigma = torch.tensor([0.1, 0.4, 0.9, 1.3, 1.7, 2.0])
    want = torch.stack([TF.gaussian_blur(im, [5, 5], [s.item()] * 2) for im, s in zip(x, sigma)])
    torch.testing.assert_close(_gaussian_blur(x, sigma, 5), want, atol=1e-6, rtol=0)
    assert [blur_kernel_size(s) for s in (224, 96, 64, 32)] == [23, 9, 7, 3]


def test_normalize_matches_torchvision():
    u8 = colorful(4, 16)
    want = T.Normalize(MEAN, STD)(u8.permute(0, 3, 1, 2).float() / 255)
    got = Normalize(MEAN, STD)(u8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_jitter_only_brightness_is_per_sample_scaling():
    aug = SSLAugment(mean=(0, 0, 0), std=(1, 1, 1), jitter=(0.4, 0, 0, 0), jitter_p=1.0, grayscale_p=0, blur_p=0)
    u8 = colorful(32, 8).clone()
    u8[:] = u8[:1]  # 32 copies of one image: the differences are the per-sample factors
    x = u8.permute(0, 3, 1, 2).float() / 255
    y = aug(u8)
    mask = ((x * 1.4 < 1) & (x > 0.05)).expand_as(y)  # pixels no factor could clip, not near 0
    f = (y[mask].view(32, -1) / x.expand_as(y)[mask].view(32, -1).clamp_min(1e-6))
    assert torch.allclose(f, f[:, :1], atol=1e-3)  # one factor per sample
    assert f[:, 0].min() >= 0.6 - 1e-4 and f[:, 0].max() <= 1.4 + 1e-4 and f[:, 0].std() > 0.1


def torchvision_moco_v2(side):
    return T.Compose([
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(side), sigma=(0.1, 2.0))], p=0.5),
        T.Normalize(MEAN, STD),
    ])


def summary(y):
    """Per-channel mean and std of a normalized batch, and the share of gray images."""
    pixels = y.float() * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    gray = ((pixels - pixels.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 2e-3).float().mean()
    return y.float().mean((0, 2, 3)), y.float().std((0, 2, 3)), gray


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    u8 = colorful(8192, 16, seed=2)
    tv = torchvision_moco_v2(16)
    want = torch.stack([tv(im) for im in u8.permute(0, 3, 1, 2).float() / 255])
    return u8, summary(want)


# Tolerances, measured on these 8192 images: torchvision against itself over seeds spreads by
# ~0.015 in a channel mean and ~0.004 in a std; the gray share has binomial sd 0.0044. This
# implementation lands within 0.003 (means) and 0.005 (stds). Without the color jitter the
# means move by 0.03 and the stds by 0.04; without the blur the stds move by 0.03: the
# tolerances below (0.015 / 0.015 / 0.02) catch either.
@pytest.mark.parametrize("path", ["fused (CPU)", "batched (CPU)", "static (CUDA)"])
def test_moco_v2_statistics_match_torchvision(reference, path, monkeypatch):
    u8, (mean_tv, std_tv, gray_tv) = reference
    aug = moco_v2_augment(MEAN, STD)
    g = torch.Generator().manual_seed(5)
    if path.startswith("static"):
        y = aug._static(u8, aug._empty_output(u8), g)  # the fixed-size-group path CUDA takes
    else:
        monkeypatch.setenv("FASTSEED_CPU_AUGMENT", path.split()[0].replace("batched", "torch"))
        y = aug(u8, generator=g)
    mean, std, gray = summary(y)
    torch.testing.assert_close(mean, mean_tv, atol=0.015, rtol=0)
    torch.testing.assert_close(std, std_tv, atol=0.015, rtol=0)
    assert abs(gray - gray_tv) < 0.02 and abs(gray - 0.2) < 0.02, (gray, gray_tv)


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_output_format_dtype_and_generator(backend, monkeypatch):
    monkeypatch.setenv("FASTSEED_CPU_AUGMENT", backend)
    u8 = colorful(16, 24)
    aug = moco_v2_augment(MEAN, STD, out_dtype=torch.bfloat16)
    y = aug(u8[:, 2:, 1:], generator=torch.Generator().manual_seed(0))  # non-contiguous input
    assert y.shape == (16, 3, 22, 23) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(y).all()
    a = aug(u8, generator=torch.Generator().manual_seed(7))
    b = aug(u8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # chunked CPU path (224 px -> chunks of 8) gives the same format
    big = aug(colorful(10, 224))
    assert big.shape == (10, 3, 224, 224) and big.is_contiguous(memory_format=torch.channels_last)


def test_byol_pair_solarizes_second_view():
    v1, v2 = byol_augment(MEAN, STD)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    u8 = colorful(8, 16)
    assert v1(u8).shape == v2(u8).shape == (8, 3, 16, 16)


@pytest.mark.parametrize("path", ["fused (CPU)", "batched (CPU)", "static (CUDA)"])
def test_grayscale_first_grays_before_the_jitter(path, monkeypatch):
    """SimCLR's order (jacobswan1/SEED tools/utils.py:248-252: RandomGrayscale, then ColorJitter).
    A gray image has no hue: with every image grayed and hue-jittered, graying first leaves the
    luma of the input, graying last the luma of hue-rotated colours."""
    u8 = colorful(32, 12, seed=3)
    x = u8.permute(0, 3, 1, 2).float() / 255
    luma = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand(-1, 3, -1, -1)
    got = {}
    for first in (True, False):
        aug = SSLAugment(mean=(0, 0, 0), std=(1, 1, 1), jitter=(0, 0, 0, 0.4), jitter_p=1.0, grayscale_p=1.0,
                         grayscale_first=first, blur_p=0)
        g = torch.Generator().manual_seed(0)
        if path.startswith("static"):
            got[first] = aug._static(u8, aug._empty_output(u8), g)
        else:
            monkeypatch.setenv("FASTSEED_CPU_AUGMENT", path.split()[0].replace("batched", "torch"))
            got[first] = aug(u8, generator=g)
    torch.testing.assert_close(got[True], luma, atol=1e-6, rtol=0)
    assert (got[False] - luma).abs().amax() > 0.05


FUSED_CASES = {  # name: (augmentation, batch, height, width, input crop)
    "moco_v2 64px": (lambda: moco_v2_augment(MEAN, STD), 37, 64, 64, None),
    "moco_v2 odd 23x17, crop view": (lambda: moco_v2_augment(MEAN, STD), 29, 23, 17, (3, 5)),
    "byol view 1 (always blurred)": (lambda: byol_augment(MEAN, STD)[0], 16, 40, 40, None),
    "byol view 2 (solarized)": (lambda: byol_augment(MEAN, STD)[1], 64, 16, 16, None),
    "hue 0.5 only, every sample": (lambda: SSLAugment(mean=MEAN, std=STD, jitter=(0, 0, 0, 0.5), jitter_p=1.0,
                                                      grayscale_p=0, blur_p=0), 24, 12, 12, None),
    "strong jitter, all ops": (lambda: SSLAugment(mean=MEAN, std=STD, jitter=(0.9, 0.9, 0.9, 0.3), jitter_p=1.0,
                                                  grayscale_p=0.5, blur_p=1.0, blur_sigma=(0.5, 3.0),
                                                  solarize_p=0.5), 40, 31, 30, None),
    "one image, blur only": (lambda: SSLAugment(mean=(0, 0, 0), std=(1, 1, 1), jitter_p=0, grayscale_p=0,
                                                blur_p=1.0, blur_sigma=(1.5, 2.0)), 1, 96, 9, None),
    "gray first, jitter always": (lambda: SSLAugment(mean=MEAN, std=STD, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                                                     grayscale_first=True, blur_p=0), 48, 20, 20, None),
    "identity": (lambda: SSLAugment(mean=(0, 0, 0), std=(1, 1, 1), jitter_p=0, grayscale_p=0, blur_p=0),
                 5, 7, 11, None),
}


# The two paths share the draws and the float32 formulas but not the summation order (the
# contrast mean, the blur taps) or the fused multiply-adds: measured differences are <= 5e-6 in
# normalized units (~1e-6 of the [0, 1] range). A wrong op, order or draw moves them by > 1e-2.
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_cpu_matches_batched_reference(case, monkeypatch):
    make, n, h, w, crop = FUSED_CASES[case]
    aug = make()
    u8 = colorful(n, max(h, w) + 8, seed=len(case))
    u8 = u8[:, crop[0]:crop[0] + h, crop[1]:crop[1] + w] if crop else u8[:, :h, :w].contiguous()
    got = {}
    for backend in ("torch", "fused"):
        monkeypatch.setenv("FASTSEED_CPU_AUGMENT", backend)
        got[backend] = aug(u8, generator=torch.Generator().manual_seed(11))
    assert got["fused"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got["fused"], got["torch"], atol=2e-5, rtol=0)
    if case != "identity":  # the comparison is not vacuous: the augmentation changed the images
        x = u8.permute(0, 3, 1, 2).float() / 255
        y = (got["torch"] - aug.normalize.shift) / (aug.normalize.scale * 255)
        assert (y - x).abs().amax() > 0.05


def test_fused_cpu_threads_and_dtype(monkeypatch):
    """Thread count does not change the result (images are independent); bf16 output rounds the
    float32 result."""
    monkeypatch.setenv("FASTSEED_CPU_AUGMENT", "fused")
    u8 = colorful(33, 32, seed=4)
    aug, aug16 = moco_v2_augment(MEAN, STD), moco_v2_augment(MEAN, STD, out_dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = aug(u8, generator=torch.Generator().manual_seed(2))
        torch.set_num_threads(3)
        three = aug(u8, generator=torch.Generator().manual_seed(2))
        half = aug16(u8, generator=torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert torch.equal(half, one.to(torch.bfloat16))


def test_cpu_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTSEED_CPU_AUGMENT", raising=False)
    assert cpu_backend() == "fused"
    monkeypatch.setenv("FASTSEED_CPU_AUGMENT", "numpy")
    with pytest.raises(ValueError, match="FASTSEED_CPU_AUGMENT"):
        moco_v2_augment(MEAN, STD)(colorful(2, 8))
