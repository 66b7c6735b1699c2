"""fastseed's own checkpoints as teachers: a distilled student (and its head) teaching the next."""
from __future__ import annotations

import torch
from torch import nn

from fastseed.errors import TeacherLoadError
from fastseed.teachers.base import Parts, Request, is_state_dict, norm_of, strip_wrappers
from fastseed.teachers.official import _classifier_prefixes, build_backbone

FORMATS = ("fastseed",)


def claims(ckpt: object, req: Request) -> bool:
    """A file with a 'fastseed' entry, or any file declared fastseed (`read` then says what is wrong)."""
    return req.ssl == "fastseed" or (req.ssl == "auto" and isinstance(ckpt, dict) and "fastseed" in ckpt)


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
    if not is_state_dict(student):
        raise TeacherLoadError(f"{source}: fastseed checkpoint has no 'student' state dict")
    head = entry("head")
    head = strip_wrappers(head) if is_state_dict(head) else {}
    return saved_arch, strip_wrappers(student), head, config


def detect_format(ckpt: dict) -> str:
    return "fastseed"


def read(ckpt: dict, req: Request) -> Parts:
    arch, use_head, source = req.arch, req.use_head, req.source
    if not (isinstance(ckpt, dict) and "fastseed" in ckpt):
        raise TeacherLoadError(f"{source}: declared fastseed but there is no 'fastseed' entry")
    arch, backbone_state, head_state, config = _resolve_fastseed(ckpt, arch, source)
    with torch.device("meta"):
        backbone = build_backbone(arch)
    ignore = _classifier_prefixes(backbone)
    backbone_state = {k: v for k, v in backbone_state.items() if not k.startswith(ignore)}
    mean, std = norm_of(backbone)
    mean, std = tuple(config.get("mean", mean)), tuple(config.get("std", std))
    return Parts(arch, "fastseed", backbone, backbone_state, head_state if use_head else {}, mean, std, nn.ReLU)
