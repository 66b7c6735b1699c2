"""What every teacher family shares: the frozen teacher a run calls, and the strict assembly of
a backbone and its projection head from a checkpoint's tensors.

A family (fastseed/teachers/__init__.py, `FAMILIES`) reads its files into `Parts`: the backbone
built on the meta device, its tensors, the head's tensors, the input normalisation. `assemble`
turns parts into a `TeacherBundle`, loading strictly: every parameter and buffer comes from the
file, and a key the family did not account for raises TeacherLoadError.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fastseed.errors import TeacherLoadError
from fastseed.models import resize, to_channels_last, token_map

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


NO_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # TF SimCLR: raw [0, 1] pixels


_WRAPPERS = ("module.", "_orig_mod.")


class Teacher(nn.Module):
    """Backbone (pooled features) followed by the projection head, or by nothing."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map as tokens [B, N, C], before pooling and head: a CNN's
        H×W positions (row-major), a ViT's patch tokens (its class/register tokens dropped)."""
        return self.features(images)[1].flatten(2).transpose(1, 2)

    @property
    def token_dim(self) -> int:
        """C of `tokens`: the channels of forward_features (timm's num_features of the backbone)."""
        return self.backbone.num_features

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding (`forward`) and the token map [B, C, h, w] it was pooled from, in one
        backbone pass: forward_features, then the backbone's own forward_head and the head."""
        feats = self.backbone.forward_features(images)
        embedding = self.head(self.backbone.forward_head(feats))
        return embedding, token_map(feats, getattr(self.backbone, "num_prefix_tokens", 0))


@dataclass
class TeacherBundle:
    """A loaded, frozen teacher and what a run needs to know of it. Calling it embeds a batch:
    resized to `res` (None: as given), under inference_mode, through the compiled forward when
    `prepare` was given a compiler. It is held outside the module tree of the students: never in
    an optimizer, DDP or a checkpoint (checkpoints record `info()` only)."""
    model: nn.Module  # frozen, eval; forward(images NCHW float) -> [B, dim], not normalised
    dim: int  # embedding dim: head output, or feature_dim without a head
    feature_dim: int  # pooled backbone features
    mean: tuple[float, ...]  # input normalisation the teacher was trained with
    std: tuple[float, ...]
    format: str
    sha256: str  # of the checkpoint file (of the bundled weight file for `bundled`)
    arch: str
    res: int | None = None  # input side it runs at (None: the student's crop side)
    fn: Callable | None = field(default=None, repr=False)  # the forward a call runs (compiled or not)
    features_fn: Callable | None = field(default=None, repr=False)  # `Teacher.features`, compiled or not

    def info(self) -> dict:
        """The teacher's identity, as checkpoints and caches record it."""
        return {"arch": self.arch, "format": self.format, "sha256": self.sha256, "dim": self.dim}

    def prepare(self, device: torch.device, *, dtype: torch.dtype | None = None, channels_last: bool = True,
                res: int | None = None, compile_fn: Callable[[nn.Module], nn.Module] | None = None) -> "TeacherBundle":
        """Ready to run on `device`: bf16 weights when the run autocasts to bf16 (frozen, so they
        halve its memory traffic), channels-last, compiled with `compile_fn`, inputs resized to `res`."""
        model = to_channels_last(self.model.to(device), channels_last)
        if dtype == torch.bfloat16:
            model = model.to(torch.bfloat16)
        self.model, self.res = model, res
        self.fn = compile_fn(model) if compile_fn else model
        # torch.compile is lazy: a run that never asks for tokens never compiles this one. A
        # module of the user's own (no `features`) serves embeddings only.
        features = getattr(model, "features", None)
        self.features_fn = None if features is None else compile_fn(features) if compile_fn else features
        return self

    @property
    def token_dim(self) -> int:
        """C of the teacher's tokens (`Teacher.token_dim`)."""
        return self.model.token_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # `is None`, not `or`: a compiled module (OptimizedModule) raises on bool(), through __len__
        fn = self.fn if self.fn is not None else self.model
        with torch.inference_mode():
            t = fn(resize(x, self.res))
        # inference tensors cannot be saved for backward; the loss keeps t for its backward
        return t.clone()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's tokens of a batch (`Teacher.tokens`), at its resolution."""
        with torch.inference_mode():
            t = self.model.tokens(resize(x, self.res))
        return t.clone()

    def with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding of a batch (as a call gives it) and its token map [B, C, h, w]
        (`Teacher.features`), from one teacher pass at its resolution."""
        fn = self.features_fn if self.features_fn is not None else self.model.features
        with torch.inference_mode():
            t, tokens = fn(resize(x, self.res))
        return t.clone(), tokens.clone()


@dataclass
class Request:
    """What `load_teacher` was asked for, as every family's `claims` and `read` see it."""
    arch: str | None
    ssl: str
    use_head: bool
    res: int | None   # the side the teacher will run at (None: not said)
    pool: str         # the embedding of a teacher with tokens (families with POOLS)
    source: str       # the checkpoint's path, for messages


@dataclass
class Parts:
    """A teacher as a family reads it from a file, before assembly."""
    arch: str
    format: str
    backbone: nn.Module  # built on the meta device, returning pooled features
    backbone_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    act: type[nn.Module] = nn.ReLU  # between head layers (parameter-free, so not in the keys)


def assemble(parts: Parts, sha256: str, source: str) -> TeacherBundle:
    """`Teacher(backbone, head)` loaded strictly from `parts`, frozen, with its dims checked."""
    head = None
    if parts.head_state:
        with torch.device("meta"):
            head = _head_from_state(parts.head_state, parts.act, "head")
    model = Teacher(parts.backbone, head)
    state = {f"backbone.{k}": v for k, v in parts.backbone_state.items()}
    state.update({f"head.{k}": v for k, v in parts.head_state.items()})
    _assign_strict(model, state, source)
    feature_dim = parts.backbone.num_features
    dim = _out_dim(model.head, feature_dim)
    first = next((m for m in model.head.modules() if isinstance(m, nn.Linear)), None)
    if first is not None and first.in_features != feature_dim:
        raise TeacherLoadError(f"{source}: projection head takes {first.in_features} features, "
                               f"backbone {parts.arch} gives {feature_dim}")
    return TeacherBundle(freeze(model), dim, feature_dim, tuple(map(float, parts.mean)),
                         tuple(map(float, parts.std)), parts.format, sha256, parts.arch)


def is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def unwrap(obj: object) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The state dict inside a checkpoint, and the top-level keys of the checkpoint."""
    if not isinstance(obj, dict):
        raise TeacherLoadError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    top = tuple(str(k) for k in obj)
    if is_state_dict(obj):
        return strip_wrappers(obj), top
    # DINO keeps 'student' and 'teacher'; the teacher is the network DINO evaluates.
    for key in ("teacher", "state_dict", "model", "student"):
        if is_state_dict(obj.get(key)):
            return strip_wrappers(obj[key]), top
    raise TeacherLoadError(
        f"no state dict found in checkpoint (top-level keys: {', '.join(top[:6])}); expected a "
        "dict of tensors or one under 'state_dict', 'model', 'teacher' or 'student'")


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


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def norm_of(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
