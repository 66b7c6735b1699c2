"""DINOv2 and DINOv3 teachers: the official releases and timm's state dicts of the same networks.

Releases (torch.hub entrypoints, ``facebookresearch/dinov2`` and ``facebookresearch/dinov3``
``hubconf.py``; their files are bare state dicts): DINOv2 ViT-S/B/L/g-14 with and without
registers (``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth``, ...; ViT-g's FFN
is SwiGLU), DINOv3 ViT-S/S+/B/L/L+/H+/7B-16 (RoPE, 4 storage tokens, LayerScale;
``dinov3_vits16_pretrain_lvd1689m-08c60483.pth``, ...) and the DINOv3 ConvNeXt T/S/B/L
(``dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth``, ...). ``-k`` takes the hub entrypoint
name or timm's (``vit_small_patch14_dinov2``, ``vit_small_patch16_dinov3``,
``convnext_tiny.dinov3_lvd1689m``, with or without timm's pretrained tag).

How a file is recognised from its keys (after fastseed.teachers' unwrapping):

* DINOv2 release: ``mask_token`` and ``pos_embed`` and LayerScale (``blocks.0.ls1.gamma``). DINO
  v1's ViT releases and MoCo-v3's converted ViTs have ``pos_embed`` but neither a mask token nor
  LayerScale, so they keep their own rule (refused under auto until ``--teacher-ssl`` names them).
* timm's DINOv2 state dict: ``pos_embed`` and LayerScale, a 14-px patch conv, 0 or 4 registers
  (``reg_token``), no mask token. DINO v1 and MoCo-v3 ViTs have no LayerScale; DeiT-3 has it on
  16-px patches.
* DINOv3 ViT release: ``storage_tokens`` and ``rope_embed.periods``, no ``pos_embed`` (RoPE).
* timm's DINOv3 state dict: ``reg_token``, EVA's LayerScale names (``blocks.0.gamma_1``) and no
  ``pos_embed``; DINO v1 and MoCo-v3 ViTs have ``pos_embed``.
* DINOv3 ConvNeXt release: facebookresearch/ConvNeXt's key layout (``downsample_layers.0.0``,
  ``stages.0.0.gamma``) without a classifier (``head.weight``), which every supervised ConvNeXt
  release has. timm's ConvNeXt keys do not say which training made them: they are read as DINOv3
  only when ``-k`` names a DINOv3 ConvNeXt.

The networks are timm's (``VisionTransformer``, ``Eva``, ``ConvNeXt``: SDPA attention), loaded
strictly: the official keys are renamed by timm's own converters after fastseed checks every key
against the release layout; the keys a frozen teacher does not use are known and checked
(``mask_token``; DINOv3's ``local_cls_norm``, used only on local crops in training; ConvNeXt's
``norms.3``, the same module as ``norm``). What differs from the official forward is fixed here:

* DINOv2's position embeddings are resampled as each release does (``dinov2/models/
  vision_transformer.py: interpolate_pos_encoding``, ``dinov2/hub/backbones.py``): the plain
  models bicubically with scale factor (w0 + 0.1) / M and no antialias, the ``_reg`` models to
  the output size with antialias; timm's resampling is neither.
* DINOv3's RoPE periods are a buffer of the release file, which the official model loads and
  uses; timm computes them (a timm state dict rightly lacks them) and recomputes them when the
  model is cast: the file's values are kept through casts.

The embedding is the normed CLS token (``pool='cls'``), the mean of the normed patch tokens
(``'mean'``) or both concatenated (``'cls+mean'``, DINOv2's linear evaluation); for the ConvNeXt,
the CLS token is the normed global average (``dinov3/models/convnext.py``). ``DinoTeacher.
patch_tokens`` gives the normed patch tokens and their grid. ViTs take any side that is a
multiple of the patch size; the release resolution (and fastseed's default ``--teacher-res`` for
these teachers) is 224.

As a family of fastseed.teachers (`FAMILIES`): `claims` a file when its keys or ``-k`` name a
release, `read` returns the finished frozen teacher, `POOLS` and `release_res` say how it embeds
and at which side it runs by default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import convnext as timm_convnext
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit
from torch import nn

from fastseed.checkpoint import sha256
from fastseed.errors import TeacherLoadError
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD, Request, Teacher, TeacherBundle, _assign_strict
from fastseed.teachers.base import freeze as _freeze
from fastseed.teachers.base import unwrap as _unwrap

POOLS = ("cls", "mean", "cls+mean")
FORMATS = ("dinov2", "dinov3")
RELEASE_RES = 224  # the side every release was trained at last and is evaluated at
# dinov3 README, "Pretrained models": the SAT-493M (satellite) weights' own normalisation
SATELLITE_MEAN, SATELLITE_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
CONVNEXT_MIN_RES = 32  # its stem and three downsamplings: 32 px in all


@dataclass(frozen=True)
class Release:
    """One hub entrypoint and the timm model of the same network."""

    hub: str  # torch.hub entrypoint name
    timm: str  # timm's model (DINOv3 ViTs: the variant without q/v biases; '_qkvb' has them)
    family: str  # dinov2 | dinov3 | dinov3-convnext
    width: int  # embedding dim
    depth: int  # blocks (ConvNeXt: per stage, as a tuple)
    patch: int = 16
    registers: int = 0  # DINOv2 register_tokens / DINOv3 storage_tokens
    swiglu: bool = False
    timm_args: tuple = ()  # extra timm kwargs: ViT-L+ has no timm entrypoint of its own
    satellite: bool = False  # has SAT-493M weights too (dinov3 hub/backbones.py: Weights.SAT493M)

    @property
    def format(self) -> str:
        return "dinov2" if self.family == "dinov2" else "dinov3"


def _releases() -> dict[str, Release]:
    out = []
    # dinov2/hub/backbones.py: vit_small/base/large/giant2, img_size 518 (37x37 positions); giant:
    # ffn_layer swiglufused; _reg: num_register_tokens 4, interpolate_antialias, interpolate_offset 0
    for size, name, width, depth in (("s", "small", 384, 12), ("b", "base", 768, 12), ("l", "large", 1024, 24),
                                     ("g", "giant", 1536, 40)):
        for reg in (0, 4):
            out.append(Release(f"dinov2_vit{size}14" + ("_reg" if reg else ""),
                               f"vit_{name}_patch14{'_reg4' if reg else ''}_dinov2", "dinov2", width, depth, 14,
                               reg, swiglu=size == "g"))
    # dinov3/hub/backbones.py: patch 16, n_storage_tokens 4; S+/L+/H+ swiglu, 7B swiglu64
    for hub, name, width, depth, swiglu, args in (
            ("vits16", "vit_small_patch16_dinov3", 384, 12, False, ()),
            ("vits16plus", "vit_small_plus_patch16_dinov3", 384, 12, True, ()),
            ("vitb16", "vit_base_patch16_dinov3", 768, 12, False, ()),
            ("vitl16", "vit_large_patch16_dinov3", 1024, 24, False, ()),
            # ffn_ratio 6 with SwiGLU's 2/3: hidden 4096, which timm's SwiGLU gives from its default ratio 4
            ("vitl16plus", "vit_large_patch16_dinov3", 1024, 24, True, (("swiglu_mlp", True), ("swiglu_align_to", 8))),
            ("vith16plus", "vit_huge_plus_patch16_dinov3", 1280, 32, True, ()),
            ("vit7b16", "vit_7b_patch16_dinov3", 4096, 40, True, ())):
        out.append(Release(f"dinov3_{hub}", name, "dinov3", width, depth, 16, 4, swiglu, args,
                           satellite=hub in ("vitl16", "vit7b16")))
    # dinov3/models/convnext.py: convnext_sizes
    for size, width, depths in (("tiny", 768, (3, 3, 9, 3)), ("small", 768, (3, 3, 27, 3)),
                                ("base", 1024, (3, 3, 27, 3)), ("large", 1536, (3, 3, 27, 3))):
        out.append(Release(f"dinov3_convnext_{size}", f"convnext_{size}", "dinov3-convnext", width, depths, 32))
    return {r.hub: r for r in out}


RELEASES = _releases()


def parse_name(arch: str | None) -> tuple[Release, str] | None:
    """The release ``arch`` names (hub name, or timm's with an optional pretrained tag) and the tag."""
    if not arch:
        return None
    name, _, tag = arch.partition(".")
    if name in RELEASES:
        return RELEASES[name], tag
    plain = name.removesuffix("_qkvb")
    for release in RELEASES.values():
        if release.family == "dinov3-convnext":
            if name == release.timm and tag.startswith("dinov3"):
                return release, tag
        elif plain == release.timm and not release.timm_args:
            return release, tag
    return None


def release_res(arch: str | None) -> int | None:
    """The teacher side fastseed uses by default for ``arch``: 224 for these teachers, else None."""
    return RELEASE_RES if parse_name(arch) else None


def check_res(arch: str | None, res: int | None) -> None:
    """TeacherLoadError (one line, naming the nearest valid sides) unless a ``arch`` teacher takes ``res``."""
    found = parse_name(arch)
    if found is None or res is None:
        return
    _check_res(found[0], res, arch)


def _check_res(release: Release, res: int, arch: str) -> None:
    if release.family == "dinov3-convnext":
        if res < CONVNEXT_MIN_RES:
            raise TeacherLoadError(f"teacher resolution {res} is below {arch}'s smallest input, "
                                   f"{CONVNEXT_MIN_RES} px: pass --teacher-res {CONVNEXT_MIN_RES} or more")
        return
    p = release.patch
    if res % p == 0 and res >= p:
        return
    below, above = res // p * p, (res // p + 1) * p
    nearest = f"{below} or {above}" if below else str(above)
    raise TeacherLoadError(f"teacher resolution {res} is not a multiple of {arch}'s patch size {p}: "
                           f"pass --teacher-res {nearest}")


# ---------------------------------------------------------------------------------------------
# Reading a file's layout


@dataclass(frozen=True)
class Layout:
    family: str
    official: bool  # the release's own keys (else timm's)
    width: int
    depth: int | tuple
    patch: int
    registers: int
    swiglu: bool
    qkv_bias: bool = True

    def describe(self) -> str:
        what = {"dinov2": "DINOv2 ViT", "dinov3": "DINOv3 ViT", "dinov3-convnext": "DINOv3 ConvNeXt"}[self.family]
        where = "release" if self.official else "timm state dict"
        return f"a {what} {where} (width {self.width}, depth {self.depth})"


def _blocks(state: dict, pattern: str) -> int:
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _patch(state: dict) -> int:
    weight = state.get("patch_embed.proj.weight")
    return int(weight.shape[-1]) if weight is not None and weight.dim() == 4 else 0


def read_layout(state: dict, convnext: bool = False) -> Layout | None:
    """What the keys say (module docstring); ``convnext``: read timm's ConvNeXt keys as DINOv3's."""
    has = state.__contains__
    if has("pos_embed") and has("blocks.0.ls1.gamma") and has("cls_token"):
        official = has("mask_token")
        tokens = state.get("register_tokens" if official else "reg_token")
        registers = tokens.shape[1] if tokens is not None else 0
        if official or (_patch(state) == 14 and registers in (0, 4)):
            fc1 = state.get("blocks.0.mlp.fc1.weight")
            fc2 = state.get("blocks.0.mlp.fc2.weight")
            # timm packs SwiGLU's two input projections in fc1 (SwiGLUPacked): twice fc2's input
            swiglu = has("blocks.0.mlp.w12.weight") or (fc1 is not None and fc2 is not None
                                                       and fc1.shape[0] == 2 * fc2.shape[1])
            return Layout("dinov2", official, state["cls_token"].shape[-1], _blocks(state, r"blocks\.(\d+)\."),
                          _patch(state), registers, swiglu)
    if has("storage_tokens") and has("rope_embed.periods") and not has("pos_embed"):
        return Layout("dinov3", True, state["cls_token"].shape[-1], _blocks(state, r"blocks\.(\d+)\."), _patch(state),
                      state["storage_tokens"].shape[1], has("blocks.0.mlp.w1.weight"), has("blocks.0.attn.qkv.bias"))
    if has("reg_token") and has("blocks.0.gamma_1") and not has("pos_embed") and has("cls_token"):
        return Layout("dinov3", False, state["cls_token"].shape[-1], _blocks(state, r"blocks\.(\d+)\."),
                      _patch(state), state["reg_token"].shape[1], has("blocks.0.mlp.fc1_g.weight"),
                      has("blocks.0.attn.q_bias"))
    if has("downsample_layers.0.0.weight") and has("stages.0.0.gamma") and not has("head.weight"):
        depth = tuple(_blocks(state, rf"stages\.{i}\.(\d+)\.") for i in range(4))
        return Layout("dinov3-convnext", True, state["norm.weight"].shape[0] if has("norm.weight") else 0, depth,
                      32, 0, False)
    if convnext and has("stem.0.weight") and has("stages.0.blocks.0.conv_dw.weight"):
        depth = tuple(_blocks(state, rf"stages\.{i}\.blocks\.(\d+)\.") for i in range(4))
        norm = state.get("head.norm.weight")
        return Layout("dinov3-convnext", False, norm.shape[0] if norm is not None else 0, depth, 32, 0, False)
    return None


def detect(state: dict) -> str | None:
    """'dinov2' or 'dinov3' when the keys are one of those layouts (timm's ConvNeXt keys excepted)."""
    layout = read_layout(state)
    return None if layout is None else ("dinov2" if layout.family == "dinov2" else "dinov3")


def _matches(release: Release, layout: Layout) -> bool:
    return (release.family == layout.family and release.width == layout.width and release.swiglu == layout.swiglu
            and release.registers == layout.registers and (layout.patch in (0, release.patch)))


def _release_of(layout: Layout) -> Release | None:
    return next((r for r in RELEASES.values() if _matches(r, layout) and r.depth == layout.depth), None)


def _called(arch: str, release: Release) -> str:
    return arch if arch == release.hub else f"{arch} ({release.hub})"


@dataclass
class Found:
    release: Release
    state: dict
    arch: str
    satellite: bool


def find_release(ckpt: object, arch: str | None, ssl: str, source: str) -> Found | None:
    """The DINOv2/DINOv3 release a checkpoint holds, or None when neither the keys nor ``arch``
    name one (fastseed.teachers then reads the file as before). Raises TeacherLoadError, in one
    line saying what to pass, when the file, ``arch`` and ``ssl`` disagree."""
    if isinstance(ckpt, dict) and "fastseed" in ckpt:
        return None
    named = parse_name(arch)
    try:
        state, _ = _unwrap(ckpt)
    except TeacherLoadError:
        if named is None:
            return None  # fastseed.teachers says what the file lacks
        raise
    layout = read_layout(state, convnext=named is not None and named[0].family == "dinov3-convnext")
    if layout is None and named is None:
        if ssl in FORMATS:
            raise TeacherLoadError(f"{source}: declared --teacher-ssl {ssl} but the checkpoint has none of its "
                                   f"layouts' keys (e.g. {', '.join(list(state)[:3])}): pass --teacher-ssl auto")
        return None
    family = layout.family if layout else named[0].family
    fmt = "dinov2" if family == "dinov2" else "dinov3"
    if ssl not in ("auto", "plain", fmt):
        what = layout.describe() if layout else f"-k {arch}: a {fmt.upper()} teacher"
        raise TeacherLoadError(f"{source}: declared --teacher-ssl {ssl} but the teacher is {what}: "
                               f"pass --teacher-ssl auto or {fmt}")
    if layout is None:
        release = named[0]
        raise TeacherLoadError(
            f"{source}: -k {_called(arch, release)} but the checkpoint has none of its keys (e.g. "
            f"{', '.join(list(state)[:3])}): pass its release file or timm's {release.timm} state dict, or the "
            "-k of the checkpoint")
    release = _release_of(layout)
    if named is not None and not _matches(named[0], layout):
        hint = f"pass -k {release.hub}" if release else "it is no DINOv2/DINOv3 release"
        raise TeacherLoadError(f"{source}: -k {_called(arch, named[0])} but the checkpoint is {layout.describe()}: "
                               f"{hint}")
    if named is not None:
        release = named[0]
        if layout.depth != release.depth:
            raise TeacherLoadError(f"{source}: the checkpoint has depth {layout.depth}, {release.hub} has "
                                   f"{release.depth}: a truncated or different network")
    elif release is None:
        raise TeacherLoadError(f"{source}: the checkpoint is {layout.describe()}, which matches no release "
                               f"({', '.join(r.hub for r in RELEASES.values() if r.family == layout.family)})")
    elif arch is not None:
        raise TeacherLoadError(f"{source}: the checkpoint is {layout.describe()}, not a '{arch}': "
                               f"pass -k {release.hub}")
    # the hub reads SAT-493M from the file name (dinov3_vitl16: hash eadcf0ff); its ViT-L alone
    # carries the local CLS norm of SAT training
    tag = named[1] if named else ""
    satellite = release.satellite and ("sat493m" in Path(source).name.lower() or tag == "sat493m" or (
        release.hub == "dinov3_vitl16" and "local_cls_norm.weight" in state))
    return Found(release, state, arch or release.hub, satellite)


# ---------------------------------------------------------------------------------------------
# Official keys -> timm keys

_OFFICIAL_KEYS = {
    # dinov2/models/vision_transformer.py (block_chunks 0, as the hub builds it), layers/block.py
    "dinov2": re.compile(r"(cls_token|pos_embed|mask_token|register_tokens|patch_embed\.proj\.(weight|bias)|"
                         r"norm\.(weight|bias)|blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|"
                         r"ls[12]\.gamma|mlp\.(fc1|fc2|w12|w3)\.(weight|bias)))"),
    # dinov3/models/vision_transformer.py, layers/{block,attention,ffn_layers,rope_position_encoding}.py
    "dinov3": re.compile(r"(cls_token|storage_tokens|mask_token|rope_embed\.periods|patch_embed\.proj\.(weight|bias)|"
                         r"(norm|local_cls_norm)\.(weight|bias)|blocks\.\d+\.(norm[12]\.(weight|bias)|"
                         r"attn\.qkv\.(weight|bias|bias_mask)|attn\.proj\.(weight|bias)|ls[12]\.gamma|"
                         r"mlp\.(fc1|fc2|w1|w2|w3)\.(weight|bias)))"),
    # dinov3/models/convnext.py (norms.3 is norm, registered twice)
    "dinov3-convnext": re.compile(r"(downsample_layers\.\d+\.\d+\.(weight|bias)|stages\.\d+\.\d+\.gamma|"
                                  r"stages\.\d+\.\d+\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)|"
                                  r"(norm|norms\.3)\.(weight|bias))"),
}
_TIMM_FILTERS = {"dinov2": timm_vit.checkpoint_filter_fn, "dinov3": timm_eva.checkpoint_filter_fn,
                 "dinov3-convnext": timm_convnext.checkpoint_filter_fn}


def _official_to_timm(release: Release, state: dict, model: nn.Module, source: str) -> tuple[dict, torch.Tensor | None]:
    """The release's keys checked and renamed to ``model``'s by timm's converter; and DINOv3's
    RoPE periods from the file."""
    unknown = [k for k in state if not _OFFICIAL_KEYS[release.family].fullmatch(k)]
    if unknown:
        raise TeacherLoadError(f"{source}: {len(unknown)} keys belong to no part of {release.hub} (e.g. "
                               f"{', '.join(unknown[:3])}); a training checkpoint or another network: pass the "
                               "released backbone file")
    state = {k: v for k, v in state.items() if not k.startswith("local_cls_norm.")}  # SAT/7B training only
    periods = None
    if release.family == "dinov3":
        periods = state.pop("rope_embed.periods").float()
        for key in [k for k in state if k.endswith("attn.qkv.bias")]:
            # LinearKMaskedBias: the bias is bias * bias_mask; timm's EVA attention has no key bias
            mask = state.pop(key + "_mask", None)
            bias = state[key] if mask is None else state[key] * mask.to(state[key].dtype)
            if bias.chunk(3)[1].abs().max() != 0:
                raise TeacherLoadError(f"{source}: {key} has a key bias that its bias_mask does not zero, which "
                                       "timm's attention (and the release) does not have: not a DINOv3 release file")
            state[key] = bias
    if release.family == "dinov3-convnext":
        for name in ("weight", "bias"):
            dup = state.pop(f"norms.3.{name}", None)
            if dup is not None and not torch.equal(dup, state.get(f"norm.{name}", dup)):
                raise TeacherLoadError(f"{source}: norms.3.{name} differs from norm.{name}, which the release "
                                       "registers as the same module: the file was edited")
    return _TIMM_FILTERS[release.family](dict(state), model), periods


def _drop_classifier(state: dict, release: Release) -> dict:
    """timm state dicts: a classifier a frozen teacher does not use (``head.*``; ConvNeXt ``head.fc``)."""
    drop = "head.fc." if release.family == "dinov3-convnext" else "head."
    return {k: v for k, v in state.items() if not k.startswith(drop)}


# ---------------------------------------------------------------------------------------------
# Networks


def _timm_model(release: Release, layout: Layout, state: dict) -> nn.Module:
    """timm's network of ``release`` on the meta device, computed buffers on the CPU."""
    if release.family == "dinov2":
        pos = state["pos_embed"]
        cells = pos.shape[1] - (1 if layout.official or not layout.registers else 0)
        side = round(cells ** 0.5)
        if side * side != cells:
            raise TeacherLoadError(f"pos_embed holds {cells} patch positions, not a square grid")
        args = dict(img_size=side * release.patch, dynamic_img_size=True, depth=release.depth)
        name = release.timm
    elif release.family == "dinov3":
        args = dict(depth=release.depth, **dict(release.timm_args))
        name = release.timm + ("_qkvb" if layout.qkv_bias else "")
    else:
        args = dict(depths=release.depth)
        name = release.timm
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    # buffers computed at build time (timm: non-persistent, e.g. DINOv3's RoPE periods): on the
    # CPU, filled by timm's own init_non_persistent_buffers
    for module in model.modules():
        for key, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and key in module._non_persistent_buffers_set:
                module.register_buffer(key, torch.empty_like(buf, device="cpu"), persistent=False)
    for module in model.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return model


class DinoBackbone(nn.Module):
    """A DINOv2/DINOv3 network (timm's, ``net``) with the release's forward: ``tokens(images)``
    gives the normed CLS token [B, D], the normed patch tokens [B, N, D] and their grid."""

    def __init__(self, net: nn.Module, release: Release, pool: str, periods: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        self.release = release
        self.pool = pool
        self.num_features = release.width * (2 if pool == "cls+mean" else 1)
        self.periods = periods  # DINOv3: the release file's RoPE periods (a plain tensor: no cast touches it)
        self._restore_periods()

    def _restore_periods(self) -> None:
        if self.periods is not None:
            rope = self.net.rope
            rope.periods.copy_(self.periods.to(rope.periods.device, rope.periods.dtype))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._restore_periods()  # timm's RoPE recomputes its periods when cast
        return self

    def _dinov2_pos(self, h: int, w: int) -> torch.Tensor:
        """Patch position embeddings for an h x w grid, resampled as the release does
        (dinov2 interpolate_pos_encoding); [1, h*w, D] in fp32."""
        net = self.net
        pos = net.pos_embed.float()
        if not net.no_embed_class:
            pos = pos[:, 1:]
        side = round(pos.shape[1] ** 0.5)
        if (h, w) == (side, side):
            return pos
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.release.registers:  # _reg: interpolate_offset 0 (output size), interpolate_antialias
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        else:  # interpolate_offset 0.1: a scale factor, no antialias
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                                 antialias=False)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        p = self.release.patch
        H, W = images.shape[-2:]
        if self.release.family != "dinov3-convnext" and (H % p or W % p):
            raise ValueError(f"{self.release.hub} takes sides that are multiples of {p}, not {H}x{W}")
        net = self.net
        if self.release.family == "dinov3-convnext":
            x = net.forward_features(images)  # [B, C, h, w] before the final norm
            h, w = x.shape[-2:]
            # dinov3 convnext.py: CLS = global average; one LayerNorm over CLS and patch tokens
            seq = torch.cat([x.mean((2, 3), keepdim=True).flatten(2), x.flatten(2)], 2)
            seq = net.head.norm(seq.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
            return seq[:, 0], seq[:, 1:], (h, w)
        if self.release.family == "dinov3":
            x = net.forward_features(images)  # RoPE, CLS + storage + patches, final norm
            return x[:, 0], x[:, net.num_prefix_tokens:], (H // p, W // p)
        x = net.patch_embed(images)  # [B, h, w, D] (dynamic_img_size)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D) + self._dinov2_pos(h, w).to(x.dtype)
        cls = net.cls_token
        if not net.no_embed_class:  # the CLS position is not resampled
            cls = cls + net.pos_embed[:, :1]
        parts = [cls.expand(B, -1, -1)]
        if net.reg_token is not None:  # registers after the CLS, without positions
            parts.append(net.reg_token.expand(B, -1, -1))
        x = net.norm(net.blocks(net.norm_pre(torch.cat([*parts, x], 1))))
        return x[:, 0], x[:, net.num_prefix_tokens:], (h, w)

    def embed(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The embedding of `pool` (cls, mean or cls+mean) from the normed tokens."""
        if self.pool == "cls":
            return cls
        mean = patches.mean(1)
        return mean if self.pool == "mean" else torch.cat([cls, mean], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cls, patches, _ = self.tokens(images)
        return self.embed(cls, patches)


class DinoTeacher(Teacher):
    """``Teacher`` (no head) whose backbone is a ``DinoBackbone``."""

    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The normed patch tokens [B, N, D] (N = h*w, row-major) and the grid (h, w)."""
        _, patches, grid = self.backbone.tokens(images)
        return patches, grid

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_tokens(images)[0]

    @property
    def token_dim(self) -> int:
        return self.backbone.release.width  # cls+mean doubles the embedding, not the tokens

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, patches, (h, w) = self.backbone.tokens(images)
        tokens = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)
        return self.head(self.backbone.embed(cls, patches)), tokens


def build(release: Release, state: dict, *, pool: str = "cls", source: str = "checkpoint") -> DinoBackbone:
    """``release``'s network with the tensors of ``state`` (official or timm keys), strictly."""
    if pool not in POOLS:
        raise TeacherLoadError(f"unknown --teacher-pool '{pool}': choose {', '.join(POOLS)}")
    layout = read_layout(state, convnext=release.family == "dinov3-convnext")
    if layout is None or not _matches(release, layout) or layout.depth != release.depth:
        found = layout.describe() if layout else "no DINOv2/DINOv3 layout"
        raise TeacherLoadError(f"{source}: {release.hub} expected, the checkpoint is {found}")
    net = _timm_model(release, layout, state)
    periods = None
    if layout.official:
        state, periods = _official_to_timm(release, state, net, source)
        if periods is not None:
            computed = net.rope.periods
            if periods.shape != computed.shape or not torch.allclose(periods, computed, rtol=1e-2):
                raise TeacherLoadError(f"{source}: rope_embed.periods are not {release.hub}'s (base 100): "
                                       "another RoPE configuration")
    else:
        state = _drop_classifier(state, release)
    _assign_strict(net, state, source)
    return DinoBackbone(net, release, pool, periods)


def load(found: Found, *, sha256: str, pool: str = "cls", res: int | None = None, source: str) -> TeacherBundle:
    """A frozen ``DinoTeacher`` and what fastseed records of it."""
    release = found.release
    if res is not None:
        _check_res(release, res, found.arch)
    backbone = build(release, found.state, pool=pool, source=source)
    mean, std = (SATELLITE_MEAN, SATELLITE_STD) if found.satellite else (IMAGENET_MEAN, IMAGENET_STD)
    model = _freeze(DinoTeacher(backbone))
    dim = backbone.num_features
    return TeacherBundle(model, dim, dim, tuple(mean), tuple(std), release.format, sha256, found.arch)


def claims(ckpt: object, req: Request) -> bool:
    """A file whose keys, or whose ``-k``, name a DINOv2/DINOv3 release (`find_release`)."""
    return find_release(ckpt, req.arch, req.ssl, req.source) is not None


def read(ckpt: object, req: Request) -> TeacherBundle:
    found = find_release(ckpt, req.arch, req.ssl, req.source)
    return load(found, sha256=sha256(Path(req.source)), pool=req.pool, res=req.res, source=req.source)


def detect_format(ckpt: object) -> str | None:
    """The release format of a loaded checkpoint object under auto (fastseed.teachers.detect_format)."""
    return detect(_unwrap(ckpt)[0])


__all__ = ["DinoBackbone", "DinoTeacher", "Found", "POOLS", "RELEASES", "RELEASE_RES", "Release", "build", "check_res",
           "detect", "find_release", "load", "parse_name", "read_layout", "release_res"]
