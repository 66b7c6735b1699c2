"""Teacher checkpoints as the official code writes them, built without fastseed's model classes.

Key names and shapes come from each method's own source (cited where used); networks are
torchvision's, timm's (for the ViTs MoCo-v3 subclasses), or the functional ResNet-50 forward
below, written from the official definitions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

STAGES = (3, 4, 6, 3)  # ResNet-50 blocks per stage


def fill_random(state: dict, seed: int) -> dict:
    """Random values in place, BN statistics included, so eval-mode BN depends on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif t.dim() == 1:  # BN weight
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(1.0 / t[0].numel()))
    return state


def randomize(model: nn.Module, seed: int) -> nn.Module:
    fill_random(model.state_dict(), seed)
    return model.eval()


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def swav_resnet50_spec(widen: int) -> dict:
    """{key: shape} of facebookresearch/swav src/resnet50.py ``resnet50w{widen}`` (backbone).

    Stem and stage planes are widened: ``inplanes = width_per_group * widen``, stage i has
    ``planes = 64 * widen * 2**i``; the bottleneck base width is ``width_per_group`` (64), so the
    inner width is ``planes`` (commit 5d50133 "fix bug with wider models"). BN entries are
    weight, bias, running_mean, running_var and num_batches_tracked.
    """
    spec = {}

    def bn(name, c):
        spec.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                     f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    inplanes = 64 * widen
    spec["conv1.weight"] = (inplanes, 3, 7, 7)
    bn("bn1", inplanes)
    for i, blocks in enumerate(STAGES):
        planes = 64 * widen * 2 ** i
        for b in range(blocks):
            p = f"layer{i + 1}.{b}"
            spec[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            spec[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            spec[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                spec[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return spec


def state_from_spec(spec: dict, seed: int) -> dict:
    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("tracked") else torch.float32)
             for k, shape in spec.items()}
    return fill_random(state, seed)


def parameter_count(spec: dict) -> int:
    """Learnable parameters only (the running statistics are buffers)."""
    return sum(math.prod(s) for k, s in spec.items() if not k.endswith(("running_mean", "running_var", "tracked")))


def tf_same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow padding='SAME': out = ceil(n / s), total pad = max((out - 1)·s + k − n, 0),
    the smaller half before, the larger half after (tf.nn.conv2d documentation)."""
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad takes the last dim first
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def resnet50_forward(sd: dict, x: torch.Tensor, padding: str) -> torch.Tensor:
    """Pooled features of a ResNet-50 state dict (torchvision names), eval-mode BN.

    ``padding='swav'``: swav/src/resnet50.py, ``nn.ConstantPad2d(1)`` before the stem conv, which
    has padding 2; the max pool and 3x3 convs pad 1 on every side (torchvision's layout).
    ``padding='tf_same'``: DeepMind BYOL (byol/utils/networks.py, haiku Conv2D/max_pool with
    padding='SAME' everywhere): the stem conv, the max pool and every strided conv pad as
    TensorFlow does; padding never reaches the max (TF ignores it).
    """
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)

    def conv(t, name, stride, k):
        if padding == "tf_same":
            return F.conv2d(tf_same_pad(t, k, stride), sd[name], stride=stride)
        return F.conv2d(t, sd[name], stride=stride, padding=k // 2)

    if padding == "swav":
        x = F.conv2d(F.pad(x, (1, 1, 1, 1)), sd["conv1.weight"], stride=2, padding=2)
        x = F.max_pool2d(F.relu(bn(x, "bn1")), 3, 2, 1)
    else:
        x = F.relu(bn(conv(x, "conv1.weight", 2, 7), "bn1"))
        x = F.max_pool2d(tf_same_pad(x, 3, 2, value=-math.inf), 3, 2)
    for i, blocks in enumerate(STAGES):
        for b in range(blocks):
            p, stride = f"layer{i + 1}.{b}", 2 if i > 0 and b == 0 else 1
            out = F.relu(bn(conv(x, p + ".conv1.weight", 1, 1), p + ".bn1"))
            out = F.relu(bn(conv(out, p + ".conv2.weight", stride, 3), p + ".bn2"))
            out = bn(conv(out, p + ".conv3.weight", 1, 1), p + ".bn3")
            if b == 0:
                x = bn(conv(x, p + ".downsample.0.weight", stride, 1), p + ".downsample.1")
            x = F.relu(out + x)
    return x.mean((2, 3))
