"""Students and heads: timm backbones, SEED/MoCo projection heads, the SimReg predictor; the
channels-last layout and the resize a teacher at its own resolution needs."""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fastseed.errors import ConfigError


def create_student(arch: str) -> nn.Module:
    """A timm backbone from random init, pooled features out (`model.num_features` wide)."""
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:6]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown --arch {arch!r}: use a timm model name{hint}")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    # the channels of forward_features' map (what a patch-token objective projects), before the
    # pooled width below replaces timm's num_features
    model.feature_map_dim = model.num_features
    # MobileNetV3-style nets keep a conv head after pooling: their pooled output is
    # head_hidden_size wide (mobilenetv3_large_100: 1280), not num_features (960).
    model.num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return model


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """SEED / MoCo-v2 head: Linear(d, d) - ReLU - Linear(d, out)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def simreg_predictor(in_dim: int, out_dim: int) -> nn.Sequential:
    """SimReg's deep predictor (dropped after training):
    Linear(d,2d)-BN-ReLU-Linear(2d,d)-Linear(d,2d)-BN-ReLU-Linear(2d,D_t)."""
    h = 2 * in_dim
    return nn.Sequential(
        nn.Linear(in_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, in_dim),
        nn.Linear(in_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, out_dim),
    )


def token_map(feats: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """A last feature map as NCHW: a CNN's [B, C, h, w] as it is; a ViT's tokens [B, prefix + N, C]
    without the `prefix_tokens` (class/register) and laid on their square h×w grid (N = h², row-major,
    as a square input gives them)."""
    if feats.dim() == 4:
        return feats
    tokens = feats[:, prefix_tokens:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid (the input must be square)")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`x` [B, C, H, W] on an h×w grid: area when it shrinks, bilinear when it grows (why:
    fastseed/methods/dense.py's docstring)."""
    (H, W), (h, w) = x.shape[-2:], grid
    if (H, W) == (h, w):
        return x
    if H >= h and W >= w:
        return F.adaptive_avg_pool2d(x, (h, w))
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def to_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    # Convolutions in NHWC skip a layout transpose per layer in cuDNN on tensor cores.
    return model.to(memory_format=torch.channels_last) if enabled else model


CPU_CONTIGUOUS_MAX_RES = 64  # on a CPU, plain convolutions at or below this many px train faster NCHW


def student_channels_last(setting: bool | None, model: nn.Module, res: int, device: torch.device) -> bool:
    """A student's memory format: `setting` (`--channels-last`/`--no-channels-last`) when given;
    auto (None): channels-last on CUDA; on a CPU, channels-last for a model with grouped (depthwise)
    convolutions or inputs above 64 px, else the plain NCHW layout. Measured on a 2-core x86 CPU
    (AMX; fp32 forward, backward and fused SGD, batch 64, milliseconds, NCHW vs channels-last):
    ResNet-18 at 32 px 145 vs 164, ResNet-50 at 32 px 438 vs 481, ResNet-18 at 96 px 802 vs 765
    and at 224 px (batch 16) 1119 vs 945, EfficientNet-B0 at 32 px 419 vs 192, MobileNetV3-Large
    at 32 px 283 vs 146 (docs/profiling.md, "Memory format")."""
    if setting is not None:
        return setting
    if device.type != "cpu":
        return True
    grouped = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    return grouped or res > CPU_CONTIGUOUS_MAX_RES


def resize(x: torch.Tensor, res: int | None) -> torch.Tensor:
    """A batch of images at side `res` (bilinear, antialiased when shrinking; None: as it is)."""
    if res is None or x.shape[-1] == res:
        return x
    return F.interpolate(x, size=(res, res), mode="bilinear", antialias=res < x.shape[-1],
                         align_corners=False).contiguous(memory_format=torch.channels_last)
