"""Teachers from the official releases of the SSL methods: MoCo v1/v2/v3, SwAV (and its wide
ResNet-50s), SimCLR (SEED's release, TF conversions, PyTorch ports), BYOL (ports, DeepMind's
conversion with TF padding), DINO, solo-learn, and plain timm state dicts.

Formats are detected from the key layout after removing ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes and unwrapping ``teacher`` / ``state_dict`` / ``model`` entries;
docs/teachers.md lists each with its source repository, how it is detected, the embedding
used and its input normalisation, and ``_LAYOUTS`` cites the official code of each layout.
Where a file cannot say (bare backbone keys: DINO, BYOL and SimCLR conversions ship backbones
only), a converter's fingerprint is read with a warning naming the flag that decides, or the
file is refused until ``ssl=`` (``--teacher-ssl``) names the method. This family claims every
file no other family claims (fastseed/teachers/__init__.py, `FAMILIES`).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import timm
import torch
from timm.layers import create_conv2d, create_pool2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import Bottleneck

from fastseed.errors import TeacherLoadError
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD, NO_NORM, Parts, Request, norm_of, unwrap
from fastseed.teachers.bundled import BUNDLED

_WIDE_RESNET = re.compile(r"resnet50[wx](\d+)$")


@dataclass(frozen=True)
class _Layout:
    """Where backbone and head live in one family of checkpoints."""

    format: str
    markers: tuple[str, ...]  # all must prefix some key for the layout to match
    backbone: str  # key prefix of the backbone
    head: str | None  # key prefix of the projection head
    act: type[nn.Module] = nn.ReLU  # between head layers (parameter-free, so not in the keys)
    ignore: tuple[str, ...] = ()  # key prefixes a frozen teacher does not need
    norm: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    tf_same: bool = False  # TensorFlow "SAME" padding in strided convs and the max pool
    caveat: str = ""  # why this reading of the file may be wrong, and the flag that decides


# First match wins, so the more specific layouts come first.
_LAYOUTS = (
    # facebookresearch/moco builder.py: encoder_q/encoder_k, v2 wraps fc as Linear-ReLU-Linear
    _Layout("moco", ("encoder_q.",), "encoder_q.", "encoder_q.fc", ignore=("encoder_k.", "queue")),
    # moco-v3 builder.py: _build_mlp heads (Linear-BN-ReLU-…-BN), MoCo_ViT's where the ViT's
    # classifier was, MoCo_ResNet's at fc; vits.py: every ViT has 12 heads (_official_backbone)
    _Layout("mocov3", ("base_encoder.cls_token",), "base_encoder.", "base_encoder.head",
            ignore=("momentum_encoder.", "predictor.")),
    _Layout("mocov3", ("base_encoder.",), "base_encoder.", "base_encoder.fc",
            ignore=("momentum_encoder.", "predictor.")),
    # lucidrains/byol-pytorch: NetWrapper projector Linear-BN-ReLU-Linear
    _Layout("byol", ("online_encoder.net.",), "online_encoder.net.", "online_encoder.projector",
            ignore=("net.", "target_encoder.", "online_predictor.")),
    # facebookresearch/dino main_dino.py: 'teacher' = MultiCropWrapper(backbone, DINOHead);
    # DINOHead.mlp is Linear-[BN]-GELU-…-Linear, last_layer the weight-normed prototypes
    _Layout("dino", ("backbone.", "head.mlp"), "backbone.", "head.mlp", act=nn.GELU,
            ignore=("head.last_layer",)),
    # sthalles/SimCLR ResNetSimCLR (backbone.fc MLP); Spijkervet/SimCLR (encoder + projector):
    # both train on unnormalised [0, 1] pixels
    _Layout("simclr", ("backbone.fc.0.",), "backbone.", "backbone.fc", norm=NO_NORM),
    _Layout("simclr", ("encoder.", "projector."), "encoder.", "projector", norm=NO_NORM),
    # solo-learn: backbone/projector/predictor and momentum_* copies
    _Layout("byol", ("backbone.", "projector.", "predictor."), "backbone.", "projector",
            ignore=("predictor.", "momentum_", "classifier.")),
    _Layout("simclr", ("backbone.", "projector."), "backbone.", "projector",
            ignore=("momentum_", "classifier.")),
    # SEED's SimCLR release: seed/architectures/simclr/simclr_resnet.py makes fc Linear-BN-ReLU-
    # Linear; tools/utils.py feeds it ImageNet-normalised images
    _Layout("simclr", ("fc.0.", "fc.1.running_mean", "fc.3."), "", "fc"),
    # facebookresearch/swav src/resnet50.py: projection_head Linear-BN-ReLU-Linear, prototypes
    _Layout("swav", ("projection_head.",), "", "projection_head", ignore=("prototypes",)),
    _Layout("swav", ("prototypes",), "", None, ignore=("prototypes",)),
    _Layout("plain", ("backbone.",), "backbone.", None, ignore=("head.", "neck.")),
    _Layout("plain", (), "", None),
)


# Bare torchvision keys name no method; the converter that wrote them may leave a fingerprint.
_SIMCLR_CONVERTED = _Layout("simclr", (), "", None, norm=NO_NORM, caveat=(
    "read as SimCLR converted from TensorFlow by tonylins/simclr-converter (the file is exactly "
    "{'state_dict': torchvision keys}), which takes [0, 1] pixels with no mean/std; "
    "--teacher-ssl simclr says so and silences this, --teacher-ssl plain loads it with ImageNet "
    "mean/std"))


_BYOL_CONVERTED = _Layout("byol-tf", (), "", None, tf_same=True, caveat=(
    "read as DeepMind BYOL converted by chigur/byol-convert (no BN counters, BN statistics stored "
    "after all weights), so with TensorFlow 'SAME' padding; --teacher-ssl byol-tf says so and "
    "silences this, --teacher-ssl plain loads it as a PyTorch-trained ResNet"))


_BYOL_SYMMETRIC = (
    "declared byol on bare torchvision keys: loaded with PyTorch's symmetric padding, right for a "
    "network trained in PyTorch; DeepMind's BYOL converted by chigur/byol-convert needs "
    "--teacher-ssl byol-tf")


_HEADLESS_VIT = (
    "a ViT state dict without a head does not say whose it is, and the input normalisation and "
    "head count depend on it: for DINO's release (ImageNet mean/std) pass --teacher-ssl dino, for "
    "MoCo-v3's convert_to_deit.py output (ImageNet mean/std, 12 heads) --teacher-ssl mocov3, for "
    "timm weights (timm's mean/std) --teacher-ssl plain")


_BACKBONE_ONLY = ("dino", "byol", "byol-tf", "simclr", "swav", "moco", "mocov3")
FORMATS = tuple(dict.fromkeys([*(lay.format for lay in _LAYOUTS), "byol-tf"]))


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _written_by_byol_convert(state: dict[str, torch.Tensor]) -> bool:
    """chigur/byol-convert fills torchvision names from haiku's parameters, then appends the BN
    moving averages, and writes no BN counters; torch's state_dict() interleaves and counts."""
    keys = list(state)
    stats = [i for i, k in enumerate(keys) if k.endswith(("running_mean", "running_var"))]
    return ("conv1.weight" in state and bool(stats) and not any(k.endswith("num_batches_tracked") for k in keys)
            and stats == list(range(len(keys) - len(stats), len(keys))))


def _match_layout(state: dict[str, torch.Tensor], top: tuple[str, ...], ssl: str) -> _Layout:
    def matches(layout: _Layout) -> bool:
        return all(_has_prefix(state, m) for m in layout.markers)

    if ssl == "auto":
        layout = next(lay for lay in _LAYOUTS if matches(lay))
        vit = _has_prefix(state, layout.backbone + "cls_token")
        if layout.format == "plain" and vit and not _has_prefix(state, layout.backbone + "head."):
            raise TeacherLoadError(_HEADLESS_VIT)
        if layout.format == "plain" and not layout.backbone:
            if top == ("state_dict",) and "conv1.weight" in state:
                return _SIMCLR_CONVERTED
            if _written_by_byol_convert(state):
                return _BYOL_CONVERTED
        return layout
    candidates = [layout for layout in _LAYOUTS if layout.format == ssl]
    for layout in candidates:
        if matches(layout):
            return layout
    if ssl in _BACKBONE_ONLY and not any(matches(lay) for lay in _LAYOUTS if lay.format != "plain"):
        # Backbone-only releases of these methods are plain state dicts.
        plain = _match_layout(state, top, "plain")
        bare = not plain.backbone
        return _Layout(ssl, (), plain.backbone, None, ignore=plain.ignore,
                       norm=NO_NORM if ssl == "simclr" and bare else plain.norm, tf_same=ssl == "byol-tf",
                       caveat=_BYOL_SYMMETRIC if ssl == "byol" and bare else "")
    detected = _match_layout(state, top, "auto")
    expected = " or ".join(sorted({"+".join(c.markers) for c in candidates if c.markers}))
    found = f"has no {expected} keys" if expected else "is not a backbone-only state dict"
    example = next(iter(k for m in detected.markers for k in state if k.startswith(m)), next(iter(state)))
    raise TeacherLoadError(
        f"declared --teacher-ssl {ssl} but the checkpoint {found}; it looks like "
        f"'{detected.format}' (e.g. key '{example}'): pass --teacher-ssl {detected.format} or auto")


class WideResNet50(nn.Module):
    """ResNet-50 with the stem and every stage ``widen`` times wider, torchvision key names.

    SwAV ``resnet50w{2,4,5}`` (src/resnet50.py since commit 5d50133) and SimCLR
    ``resnet50x{2,4}`` (simclr-converter resnet_wider.py) are the same network: stem width and
    stage planes ``64·widen·2^i``, bottleneck base width 64, so the inner width of a block is its
    planes. Backbone parameters: 93.9M (2x), 375.4M (4x), 586.5M (5x), the counts of the SwAV
    README. timm's ResNet keeps a 64-channel stem, so it cannot build these.
    """

    def __init__(self, widen: int):
        super().__init__()
        self.inplanes = 64 * widen
        # SwAV pads by 1 (nn.ConstantPad2d) before a stem conv of padding 2: the same as padding 3.
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, blocks in enumerate((3, 4, 6, 3)):
            planes, stride = 64 * widen * 2 ** i, 1 if i == 0 else 2
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * 4
            layers += [Bottleneck(self.inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_features = self.inplanes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x.mean((2, 3)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _tf_same_padding(model: nn.Module) -> nn.Module:
    """Pad every strided conv and max pool as TensorFlow's padding='SAME' does (timm's layers).

    SAME pads max((ceil(n/s) − 1)·s + k − n, 0) in all, the odd pixel after: on even sizes (0, 1)
    for a 3x3/s2 conv or pool and (2, 3) for the 7x7/s2 stem, where PyTorch pads (1, 1) and
    (3, 3). Stride-1 convs are left alone: with odd kernels SAME is symmetric there.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1) and module.kernel_size != (1, 1):
            same = create_conv2d(module.in_channels, module.out_channels, module.kernel_size[0],
                                 stride=module.stride[0], padding="same", bias=module.bias is not None)
        elif isinstance(module, nn.MaxPool2d):
            same = create_pool2d("max", module.kernel_size, module.stride, padding="same")
        else:
            continue
        model.set_submodule(name, same)
    return model


def build_backbone(arch: str, **timm_args) -> nn.Module:
    """Backbone returning pooled features [B, num_features]; parameters are left uninitialised."""
    wide = _WIDE_RESNET.match(arch)
    if wide and int(wide[1]) > 1:
        return WideResNet50(int(wide[1]))
    name = "resnet50" if wide else ("tf_" + arch if arch in BUNDLED else arch)
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **timm_args)
    except RuntimeError as e:
        raise TeacherLoadError(f"unknown teacher arch '{arch}': {e}") from e


def _official_backbone(arch: str, layout: _Layout) -> nn.Module:
    """``arch`` as the method that wrote the checkpoint builds it, on the meta device."""
    with torch.device("meta"):
        backbone = build_backbone(arch)
        if layout.format == "mocov3" and isinstance(backbone, VisionTransformer):
            # moco-v3 vits.py gives each of its ViTs 12 heads (timm's vit_small has 6); no shape shows it
            backbone = build_backbone(arch, num_heads=12)
        if layout.tf_same:
            _tf_same_padding(backbone)
    return backbone


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    if isinstance(backbone, WideResNet50):
        return ("fc.",)
    name = getattr(backbone, "pretrained_cfg", {}).get("classifier", "fc")
    return tuple(f"{n}." for n in ((name,) if isinstance(name, str) else name))


def _split(state: dict[str, torch.Tensor], layout: _Layout, backbone: nn.Module, use_head: bool,
           source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Backbone and head tensors of a checkpoint; raises on keys no layout rule accounts for."""
    head_prefix = f"{layout.head}." if layout.head else None
    classifier = tuple(layout.backbone + p for p in _classifier_prefixes(backbone))
    # A classifier is one Linear; numbered layers in its slot are a projection head (SEED's
    # SimCLR, MoCo-v3's ViT, MoCo-v2's encoder saved alone), which a frozen teacher must not lose.
    mlp = re.compile("|".join(re.escape(p) + r"\d+\." for p in classifier))
    backbone_state, head_state, leftover, mlp_keys = {}, {}, [], []
    for key, value in state.items():
        if head_prefix and key.startswith(head_prefix):
            head_state[key[len(head_prefix):]] = value
        elif key.startswith(classifier):
            if mlp.match(key):
                mlp_keys.append(key)
        elif any(key.startswith(p) for p in layout.ignore):
            continue
        elif key.startswith(layout.backbone):
            backbone_state[key[len(layout.backbone):]] = value
        else:
            leftover.append(key)
    if leftover:
        raise TeacherLoadError(
            f"{source}: {len(leftover)} keys belong to no part of a '{layout.format}' teacher "
            f"(e.g. {', '.join(leftover[:3])}); pass the right --teacher-ssl")
    if mlp_keys and use_head:
        layers = sorted({m.group(0).rstrip(".") for m in map(mlp.match, mlp_keys)})
        raise TeacherLoadError(
            f"{source}: layers {', '.join(layers)} in the classifier slot form a projection head, not "
            f"a classifier, and a '{layout.format}' teacher has no head there: pass the --teacher-ssl "
            "of the method that wrote the file, or --teacher-no-head to distil the backbone features")
    return backbone_state, (head_state if use_head else {})


def claims(ckpt: object, req: Request) -> bool:
    """Every file no family before this one claimed."""
    return True


def read(ckpt: object, req: Request) -> Parts:
    arch, ssl, use_head, source = req.arch, req.ssl, req.use_head, req.source
    if arch is None:
        raise TeacherLoadError(f"{source}: pass the teacher arch (e.g. resnet50)")
    state, top = unwrap(ckpt)
    layout = _match_layout(state, top, ssl)
    if layout.caveat:
        warnings.warn(f"{source}: {layout.caveat}", stacklevel=3)
    backbone = _official_backbone(arch, layout)
    backbone_state, head_state = _split(state, layout, backbone, use_head, source)
    mean, std = norm_of(backbone) if layout.format == "plain" else layout.norm
    return Parts(arch, layout.format, backbone, backbone_state, head_state, mean, std, layout.act)


def detect_format(state: dict) -> str:
    """The official layout a loaded checkpoint object is read as under auto (see the module docstring)."""
    flat, top = unwrap(state)
    return _match_layout(flat, top, "auto").format
