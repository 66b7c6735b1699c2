"""Where the targets come from: one object, one call, the same for every student of a run.

    targets(views, batch) -> tuple[Tensor, ...]

`views` are one batch's augmented views in the loader's order (the global view(s), then the
small crops), as every student sees them; `batch` is the list of what the loader yielded beside
the views (the labels; from a teacher cache's replay loader, the labels and the stored keys).
The result is what the students' losses compare against, computed once per batch, without
gradient, one tensor per batch of the method's `teacher_inputs(views)`:

    seed     (t(view 0) [B, D], t(the small crops, crop by crop) [N·B, D])
    simreg   (t(every view, concatenated) [V·B, D],)
    dense    (t(view 0) [B, D], the teacher's token map of view 0 [B, C, h, w])
    moco     (the key encoder's keys of view 1 [B, D],)   (no teacher: the one MoCo student
             makes its own keys, `MoCo.targets`, and is the run's target source)

A method whose `teacher_tokens(cfg)` is true (dense, and seed/simreg with --dense-weight) gets
the teacher's token map of its first input as one more, last, target: it comes from the same
teacher pass as that input's embedding (`TeacherBundle.with_tokens`), once for every student.

Beside the call, a target source describes what the keys come from, for the rest of the run:
`dim` (key width: the students' heads end there), `mean_std` (the teacher's input
normalisation, which the augmentation applies), `info` (the teacher's identity, recorded in
every checkpoint and checked on resume) and `teacher` (the frozen model, for the k-NN table).

`build_targets(cfg, ...)` builds it from the config: the live teacher (`TeacherTargets`), or,
with `cfg.teacher_cache`, the keys a teacher cache stored for the replayed crops
(`CachedTargets`: no teacher forward; the cache's header names the teacher, so none is loaded
unless the k-NN table asks for its row), or, with several teachers (-k a,b), each of them as it
would be alone, on the same views (`SeveralTargets`: a key per teacher, in -k order, and `dims`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastseed.cache import TeacherCache, teacher_record
from fastseed.checkpoint import sha256
from fastseed.config import Config
from fastseed.errors import ConfigError
from fastseed.evaluate import Resized
from fastseed.methods import Method, method_of, resolve_preset
from fastseed.runtime import Env, barrier, compiler, local_main, teacher_dtype
from fastseed.teachers import load_teacher, release_res
from fastseed.teachers.base import TeacherBundle
from fastseed.teachers.bundled import BUNDLED
from fastseed.teachers.several import keep_mask, renorm_affine, renormalize, teacher_configs


@dataclass
class TeacherTargets:
    """The live teacher: one forward per batch of `inputs(views)`."""
    teacher: TeacherBundle
    inputs: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    dim: int
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    info: dict
    tokens: bool = False  # the token map of the first input is the last target

    @property
    def token_dim(self) -> int | None:
        return self.teacher.token_dim if self.tokens else None

    @torch.no_grad()
    def targets(self, views: list[torch.Tensor], batch=None) -> tuple[torch.Tensor, ...]:
        inputs = self.inputs(views)
        if not self.tokens:
            return tuple(self.teacher(x) for x in inputs)
        first, tokens = self.teacher.with_tokens(inputs[0])
        return (first, *(self.teacher(x) for x in inputs[1:]), tokens)


@dataclass
class CachedTargets:
    """A teacher cache: the keys the replay loader read with the batch (`batch` = [labels,
    keys]), in the dtype the live teacher would give (`dtype`). The teacher's colour
    augmentation is not in them: a stored key is the teacher's view of the un-coloured crop.
    `teacher` is loaded only for the k-NN table's row and never runs in a step (None without
    the table)."""
    cache: TeacherCache
    dim: int
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    info: dict
    dtype: torch.dtype
    teacher: TeacherBundle | None = None
    token_dim = None  # a cache stores no tokens (fastseed.methods.dense.check_dense says why)

    def targets(self, views: list[torch.Tensor], batch) -> tuple[torch.Tensor, ...]:
        _, keys = batch
        return (keys.to(self.dtype),)


@dataclass
class SeveralTargets:
    """Several live teachers (-k a,b; fastseed/teachers/several.py): each one's `TeacherTargets`,
    built as a run of it alone builds it, on the same augmented views. The views come normalised
    with the first teacher's mean/std (`mean_std`, what the augmentation applies); teacher i gets
    them renormalised to its own (`renormalize`, exact when they agree) and resizes them to its
    own side. `targets` gives one key tensor per teacher, in -k order; `dims` their widths (the
    summary heads end there; `dim` is their sum, the width of all keys side by side); `keep(step)`
    which teachers' losses count at `step` (`keep_mask`, on the device, float 0/1).

    `info` records every teacher (`teachers`: each one's arch, format, sha256, dim, checkpoint,
    side, pool) and, as `sha256`, a digest of their weights' sha256s in -k order, which a resumed
    run must match (fastseed.checkpoint.restore): another teacher, or the same ones in another
    order, is refused."""
    members: list[TeacherTargets]
    pools: tuple[str, ...]  # each teacher's --teacher-pool, for the record
    seed: int = 0
    drop: float = 0.0
    device: torch.device | None = None
    teacher = None     # no one teacher: the k-NN table has a row per teacher (`knn_models`)
    token_dim = None   # no token losses with several teachers (methods/several.py says why)

    def __post_init__(self):
        first = self.members[0].mean_std
        self.affines = [renorm_affine(first, m.mean_std) for m in self.members]
        self.dims = tuple(m.dim for m in self.members)
        self.dim = sum(self.dims)
        self.mean_std = first
        teachers = [m.info | {"res": m.teacher.res, "pool": p} for m, p in zip(self.members, self.pools)]
        digest = hashlib.sha256(",".join(t["sha256"] for t in teachers).encode()).hexdigest()
        self.info = {"arch": ",".join(t["arch"] for t in teachers), "format": teachers[0]["format"], "sha256": digest,
                     "dim": self.dim, "teachers": teachers}
        self._all = torch.ones(len(self.members), device=self.device)

    @torch.no_grad()
    def targets(self, views: list[torch.Tensor], batch=None) -> tuple[torch.Tensor, ...]:
        keys = []
        for member, affine in zip(self.members, self.affines):
            keys += member.targets([renormalize(v, affine) for v in views], batch)
        return tuple(keys)

    def keep(self, step: int) -> torch.Tensor:
        if not self.drop:
            return self._all
        return keep_mask(self.seed, step, len(self.members), self.drop).to(self.device, torch.float32,
                                                                            non_blocking=True)

    def knn_models(self) -> list[nn.Module]:
        """Each teacher as the k-NN table runs it: on inputs normalised with `mean_std`,
        renormalised to its own and resized to its side."""
        return [Renormalized(Resized(m.teacher.model, m.teacher.res), affine)
                for m, affine in zip(self.members, self.affines)]


class Renormalized(nn.Module):
    """`model` on its inputs renormalised (`fastseed.teachers.several.renormalize`)."""

    def __init__(self, model: nn.Module, affine):
        super().__init__()
        self.model, self.affine = model, affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(renormalize(x, self.affine))


def teacher_side(cfg: Config) -> int:
    """The side the teacher runs at: --teacher-res, else its release's (DINOv2/DINOv3: 224,
    whatever the student's side), else the student's --res."""
    return cfg.teacher_res or release_res(cfg.teacher_arch) or cfg.res


def resolve_teacher_res(cfg: Config) -> Config:
    """`cfg` with `teacher_res` made explicit (`teacher_side`), as checkpoints and caches record it;
    with several teachers, one side per teacher."""
    sides = tuple(teacher_side(c) for c in teacher_configs(cfg))
    return cfg.replace(teacher_res=sides if len(sides) > 1 else sides[0])


def load_run_teacher(cfg: Config, device: torch.device, dtype: torch.dtype | None,
                     compile_fn: Callable[[nn.Module], nn.Module] | None,
                     method: type[Method] | None = None) -> TeacherBundle:
    """The teacher of `cfg` with the target its `method` (default: `cfg`'s) distils, ready to run on `device`."""
    target = (method or method_of(cfg)).teacher_target(cfg)
    bundle = load_teacher(cfg.teacher_arch, cfg.distill, cfg.teacher_ssl, use_head=target == "head",
                          trust=cfg.trust_checkpoint, res=teacher_side(cfg), pool=cfg.teacher_pool)
    return bundle.prepare(device, dtype=dtype, channels_last=cfg.channels_last is not False, res=teacher_side(cfg),
                          compile_fn=compile_fn)


def build_targets(cfg: Config, device: torch.device, *, dtype: torch.dtype | None,
                  compile_fn: Callable[[nn.Module], nn.Module] | None,
                  method: type[Method] | None = None) -> TeacherTargets | CachedTargets | SeveralTargets | None:
    """The frozen teacher of `cfg` on `device` (bf16 weights when its `dtype`, the teacher autocast, is bf16,
    compiled with `compile_fn`), or its keys from `cfg.teacher_cache`, or its several teachers
    (-k a,b), each built as alone; None when the run's `method` (default: `cfg`'s) makes its own keys (MoCo)."""
    method = method or method_of(cfg)
    if not method.needs_teacher:
        method.check(cfg, 1)
        return None
    teachers = teacher_configs(cfg)
    if len(teachers) > 1:
        return SeveralTargets([build_targets(c, device, dtype=dtype, compile_fn=compile_fn, method=method)
                               for c in teachers], tuple(c.teacher_pool for c in teachers), seed=cfg.seed,
                              drop=cfg.teacher_drop, device=device)
    if cfg.teacher_cache is not None:
        return cached_targets(cfg, device, dtype=dtype, method=method)
    teacher = load_run_teacher(cfg, device, dtype, compile_fn, method)
    return TeacherTargets(teacher, method.teacher_inputs, teacher.dim, (teacher.mean, teacher.std),
                          teacher.info() | {"checkpoint": cfg.distill}, tokens=method.teacher_tokens(cfg))


def claimed_teacher(cfg: Config) -> dict:
    """What the run says of its teacher without loading it: the arch, and the sha256 of the
    checkpoint when --distill names one (without it, the cache's header names the weights)."""
    claim = {"arch": cfg.teacher_arch}
    if cfg.distill is not None:
        claim["sha256"] = sha256(Path(cfg.distill))
    return claim


def cached_targets(cfg: Config, device: torch.device, *, dtype: torch.dtype | None,
                   method: type[Method] | None = None) -> CachedTargets:
    """`cfg.teacher_cache` opened and checked against the run (CacheError naming the first
    field that does not fit: beton, teacher, target, teacher resolution, crop scale, small
    crops, damage); the teacher itself is loaded only for the k-NN table (`cfg.final_table`,
    when its weights are here: bundled, or --distill), then checked in full against the header."""
    cache = TeacherCache.open(cfg.teacher_cache)
    header = cache.header
    fmt = header["teacher"]["format"]
    method = method or method_of(cfg)
    cache.check(teacher=claimed_teacher(cfg), target=method.teacher_target(cfg), small_crops=cfg.small_crops,
                teacher_res=teacher_side(cfg), crop_scale=resolve_preset(cfg, fmt).crop_scale, beton=cfg.data)
    if local_main():  # one read of the whole file per machine: the other ranks there wait for it
        cache.verify()
    barrier()
    t = header["teacher"]
    mean_std = (tuple(t["mean"]), tuple(t["std"]))
    teacher = None
    if cfg.final_table and (cfg.distill is not None or cfg.teacher_arch in BUNDLED):
        teacher = load_run_teacher(cfg, device, dtype, None, method)
        cache.check(teacher=teacher_record(teacher.info(), teacher, (teacher.mean, teacher.std)))
    info = {"arch": t["arch"], "format": fmt, "sha256": t["sha256"], "dim": t["dim"],
            "checkpoint": header["source"]["checkpoint"],
            "cache": {"path": str(Path(cfg.teacher_cache).resolve()), "sha256": cache.identity}}
    return CachedTargets(cache, cache.dim, mean_std, info, dtype or torch.float32, teacher)


def live_targets(cfg: Config, env: Env) -> TeacherTargets:
    """The live teacher of `cfg` as a training run on `env` builds it (precision, compile): what
    a teacher cache is built from (fastseed.cache.build_cache)."""
    if len(teacher_configs(cfg)) > 1:
        raise ConfigError(f"a teacher cache holds one teacher's keys: give fastseed-cache one -k, not "
                          f"{cfg.teacher_arch}")
    return build_targets(cfg.replace(teacher_cache=None), env.device, dtype=teacher_dtype(cfg, env.device),
                         compile_fn=compiler(cfg, env))
