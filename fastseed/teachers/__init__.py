"""Frozen teachers: `load_teacher` reads a checkpoint through the family that claims it.

    load_teacher(arch, checkpoint, ssl="auto", use_head=True, trust=False) -> TeacherBundle

A family is one module with `FORMATS` (the --teacher-ssl names it reads), `claims(ckpt, ssl)`,
`detect(ckpt)` (the format auto reads a claimed file as) and `read(arch, ckpt, ssl, use_head,
source) -> Parts`; `FAMILIES` asks them in order, and the
first that claims the file reads it (`official` claims whatever is left). No checkpoint (or
``ssl='bundled'``) loads the bundled EfficientNet-Lite weights. Adding a family is one file here
and one entry in `FAMILIES` (docs/ARCHITECTURE.md, "Adding a teacher family").

Loading is strict: every parameter and buffer comes from the file, and every key of the file is
used or known to be irrelevant to a frozen teacher (momentum copies, queues, prototypes,
predictors, classifiers); anything else raises TeacherLoadError and nothing is returned. A file
that only full unpickling can read raises CheckpointReadError unless ``trust``.
"""
from __future__ import annotations

from pathlib import Path

from fastseed.checkpoint import read_file, sha256
from fastseed.errors import TeacherLoadError
from fastseed.teachers import bundled, distilled, official
from fastseed.teachers.base import TeacherBundle, assemble

FAMILIES = (distilled, official)
SSL_CHOICES = ("auto", *dict.fromkeys(f for family in FAMILIES for f in family.FORMATS), "bundled")


def load_teacher(arch: str | None, checkpoint: str | None = None, ssl: str = "auto",
                 use_head: bool = True, trust: bool = False) -> TeacherBundle:
    """A frozen teacher; the format is detected from the checkpoint unless ``ssl`` names it.
    ``arch`` may be None for fastseed checkpoints (they record theirs)."""
    if ssl not in SSL_CHOICES:
        raise TeacherLoadError(f"unknown --teacher-ssl '{ssl}'; choose from {', '.join(SSL_CHOICES)}")
    if checkpoint is None or ssl == "bundled" or checkpoint == "bundled":
        return bundled.load(arch)
    path = Path(checkpoint)
    if not path.is_file():
        raise TeacherLoadError(f"teacher checkpoint {path} does not exist")
    ckpt = read_file(path, trust)
    family = next(f for f in FAMILIES if f.claims(ckpt, ssl))
    return assemble(family.read(arch, ckpt, ssl, use_head, str(path)), sha256(path), str(path))


def detect_format(ckpt: object) -> str:
    """The format a loaded checkpoint object is read as under auto."""
    return next(f for f in FAMILIES if f.claims(ckpt, "auto")).detect(ckpt)
