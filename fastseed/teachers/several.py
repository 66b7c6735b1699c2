"""Several teachers, one student (agglomerative distillation, as AM-RADIO, UNIC and Theia do):
the teacher settings of a run split into one single-teacher `Config` per teacher, the input
normalisation each teacher needs, and which teachers' losses count at a step.

    -k efficientnet_lite0,efficientnet_lite2 --distill ,   --teacher-res 224,260

`-k` names the teachers; `--distill`, `--teacher-ssl`, `--teacher-res` and `--teacher-pool`
take one value for all or one per teacher (as `-a` and `--lr` do for students; `--distill`
one per teacher, an empty entry or `bundled` for a bundled teacher), `--teacher-weights` one
positive weight per teacher (default equal). `teacher_configs` splits them; a run of one
teacher keeps its `Config` as it is.

Every teacher sees the same augmented crop. The loader normalises it with the first teacher's
mean and std; teacher i gets it renormalised to its own (`renormalize`) and resized to its own
side (`TeacherBundle` resizes to its `res`). Teacher dropping (`--teacher-drop P`, after UNIC,
Sariyildiz et al., ECCV 2024): at each step each teacher's loss is kept with probability 1 − P,
at least one kept; the draw is a function of (seed, step) alone (`keep_mask`), so every rank
draws the same and a resumed run drops the teachers a run never stopped drops.
"""
from __future__ import annotations

import numpy as np
import torch

from fastseed.config import Config
from fastseed.errors import ConfigError

SUMMARY_LOSSES = ("cosine", "cos-smoothl1")
_DROP_STREAM = 0x7EAC4E55  # tells the drop draws apart from any other stream seeded by (seed, step)


def teacher_archs(cfg: Config) -> list[str]:
    """The teachers of `cfg`, in `-k` order."""
    return [a.strip() for a in cfg.teacher_arch.split(",")]


def _per_teacher(flag: str, values: list, archs: list[str], *, one_for_all: bool = True) -> list:
    """`values` as one per teacher: one value given for all (when `one_for_all`), or one each."""
    n = len(archs)
    if len(values) == n:
        return values
    if len(values) == 1 and one_for_all:
        return values * n
    how = "one for all, or one per teacher" if one_for_all else "one per teacher"
    raise ConfigError(f"{flag} has {len(values)} value(s) for {n} teacher(s) (-k {','.join(archs)}): give {how}, "
                      "comma-separated")


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def teacher_configs(cfg: Config) -> list[Config]:
    """One single-teacher `Config` per teacher of `cfg` (-k a comma list), in `-k` order, each
    with its own --distill, --teacher-ssl, --teacher-res and --teacher-pool; ConfigError naming
    the flag whose list does not fit the teachers. One teacher: `cfg` as it is (a one-entry list
    made a value)."""
    archs = teacher_archs(cfg)
    if "" in archs:
        raise ConfigError(f"-k {cfg.teacher_arch}: name each teacher, comma-separated (e.g. -k "
                          "efficientnet_lite0,efficientnet_lite2)")
    n = len(archs)
    if cfg.distill is None or n == 1:  # one teacher: its path as given, commas and all
        distill = [cfg.distill] * n
    else:
        distill = [None if d.strip() in ("", "bundled") else d.strip() for d in cfg.distill.split(",")]
        distill = _per_teacher("--distill", distill, archs, one_for_all=False)
    ssl = _per_teacher("--teacher-ssl", [s.strip() for s in cfg.teacher_ssl.split(",")], archs)
    res = _per_teacher("--teacher-res", _values(cfg.teacher_res), archs)
    pool = _per_teacher("--teacher-pool", [p.strip() for p in cfg.teacher_pool.split(",")], archs)
    weights = _per_teacher("--teacher-weights", _values(cfg.teacher_weights), archs)
    if any(w is not None and not w > 0 for w in weights):
        raise ConfigError(f"--teacher-weights {cfg.teacher_weights}: each weight must be > 0")
    if not 0 <= cfg.teacher_drop < 1:
        raise ConfigError(f"--teacher-drop {cfg.teacher_drop}: a probability in [0, 1) (0: keep every teacher)")
    if cfg.summary_loss not in SUMMARY_LOSSES:
        raise ConfigError(f"--summary-loss {cfg.summary_loss!r}: choose {' or '.join(SUMMARY_LOSSES)}")
    if n == 1:
        alone = {"--teacher-weights": cfg.teacher_weights is not None, "--teacher-drop": cfg.teacher_drop > 0,
                 "--summary-loss": cfg.summary_loss != Config.summary_loss}
        given = [flag for flag, on in alone.items() if on]
        if given:
            raise ConfigError(f"{', '.join(given)} weigh, drop or score the losses of several teachers: with one "
                              f"(-k {archs[0]}) drop {'them' if len(given) > 1 else 'it'}, or name several with -k")
        return [cfg.replace(teacher_arch=archs[0], distill=distill[0], teacher_ssl=ssl[0], teacher_res=res[0],
                            teacher_pool=pool[0])]
    return [cfg.replace(teacher_arch=a, distill=d, teacher_ssl=s, teacher_res=r, teacher_pool=p,
                        teacher_weights=None, teacher_drop=0.0, summary_loss=Config.summary_loss)
            for a, d, s, r, p in zip(archs, distill, ssl, res, pool)]


def teacher_weights(cfg: Config) -> list[float]:
    """Each teacher's loss weight (`--teacher-weights`; default 1 each)."""
    weights = _per_teacher("--teacher-weights", _values(cfg.teacher_weights), teacher_archs(cfg))
    return [1.0 if w is None else float(w) for w in weights]


def renorm_affine(src: tuple[tuple[float, ...], tuple[float, ...]], dst: tuple[tuple[float, ...], tuple[float, ...]]
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) [1, C, 1, 1] float32 with x·a + b = ((x·std₀ + mean₀) − meanᵢ) / stdᵢ per channel,
    a = std₀ / stdᵢ, b = (mean₀ − meanᵢ) / stdᵢ (computed in float64): an input normalised with
    `src` = (mean₀, std₀) renormalised to `dst` = (meanᵢ, stdᵢ). None when they are the same
    (the input is then passed on as it is, bit for bit)."""
    if [list(map(float, v)) for v in src] == [list(map(float, v)) for v in dst]:
        return None
    m0, s0, m1, s1 = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (*src, *dst))
    return (s0 / s1).float(), ((m0 - m1) / s1).float()


def renormalize(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """`x` [B, C, H, W] renormalised with `renorm_affine`'s (a, b), in float32, in `x`'s dtype and
    memory format; `x` itself when `affine` is None."""
    if affine is None:
        return x
    a, b = (t.to(x.device) for t in affine)
    return (x.float() * a + b).to(x.dtype)


def keep_mask(seed: int, step: int, teachers: int, drop: float) -> torch.Tensor:
    """[teachers] bool: which teachers' losses count at `step`. Each is kept with probability
    1 − `drop`, from a draw u ~ U[0, 1) per teacher (kept: u ≥ drop) of a generator seeded by
    (`seed`, `step`) alone; when none is kept, the teacher with the largest u is (at least one
    always counts). The same on every rank and in a resumed run as in one never stopped."""
    u = np.random.default_rng([_DROP_STREAM, seed % 2**63, step]).random(teachers)
    keep = u >= drop
    if not keep.any():
        keep[u.argmax()] = True
    return torch.from_numpy(keep)
