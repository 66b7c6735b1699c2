"""The objectives, one file each, and their registry. A method is one student's objective: its
backbone and head; the queues of keys it compares against are shared by every student of a run.
The loop does not know which method it runs, and no module outside this package names one:
each method declares what the rest of fastseed asks of it.

    name, needs_teacher, global_views      what it is; whether a frozen teacher makes its targets
                                           (MoCo makes its own: `MoCo.targets`); crops per image
    official                               its official recipe (`--recipe official`, `official()`)
    defaults                               where fastseed's recipe for it differs from Config's defaults
                                           (`recipe()`, what `fastseed-train` starts from)
    flags                                  its command-line flags (fastseed/cli.py adds them)
    teacher_target(cfg)                    'head', 'backbone' or None: what of the teacher it distils
    teacher_tokens(cfg)                    whether its targets end with the teacher's token map
                                           [B, C, h, w] (the patch-token loss: methods/dense.py)
    augment_preset(teacher_format, small)  the official augmentation preset (`--aug auto`)
    check(cfg, students)                   ConfigError for a setting it cannot run with
    queues_for(cfg, dim, dtype)            the run's `Queues`, or None
    from_config(student, queues, dim, cfg, compile_fn, token_dim)   one student's objective
                                           (token_dim: the teacher's token width, when it asked for tokens)
    teacher_inputs(views) -> list          what the teacher sees, one batch per target
    loss_targets(cfg, targets)             the targets its loss sees, from the source's, once per step and outside
                                           the compiled loss (SimReg: --simreg-targets; the others: as they are)
    forward(views, targets)                the loss (what DDP wraps and torch.compile traces)
    encoder                                the backbone to evaluate and export (no head)
    queues.update(targets)                 once per step, after every student's backward: enqueue

Adding an objective: one file here and one entry in `METHODS` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from fastseed.augment import PRESETS
from fastseed.config import Config
from fastseed.errors import ConfigError

from ._common import auto_queue_size
from .dense import Dense
from .moco import MoCo
from .seed import SEED
from .simreg import SimReg

METHODS = {m.name: m for m in (SEED, SimReg, MoCo, Dense)}


def method_class(name: str):
    """The registered method called `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown --method {name!r}: choose from {', '.join(METHODS)}") from None


def official(method: str = "seed", **overrides) -> Config:
    """The official recipe of `method`: its script's lr, epochs, weight decay and warm-up, the
    per-epoch schedule, SGD, and the official augmentation preset (`--aug auto`)."""
    recipe = method_class(method).official
    if recipe is None:
        raise ConfigError(f"--method {method} has no official recipe to follow: use --recipe fastseed")
    cfg = Config(method=method, **recipe)  # the file sets SGD and the per-epoch schedule
    return cfg.replace(**overrides)


def recipe(method: str = "seed", base: Config | None = None, **overrides) -> Config:
    """fastseed's recipe of `method`: `base` (default `Config()`; the CLI's demo without --data) with
    the method and its `defaults`, then `overrides`."""
    base = base if base is not None else Config()
    return base.replace(method=method, **method_class(method).defaults).replace(**overrides)


def teacher_target(cfg: Config) -> str | None:
    """What of the teacher the run distils: 'head' (its projection), 'backbone' (its pooled
    features) or None (no teacher)."""
    return method_class(cfg.method).teacher_target(cfg)


def teacher_tokens(cfg: Config) -> bool:
    """Whether the run's targets end with the teacher's token map (fastseed.targets)."""
    return method_class(cfg.method).teacher_tokens(cfg)


def preset_name(aug: str, method: str, teacher_format: str | None, small_crops: int = 0) -> str:
    """`aug` if it names a preset; for 'auto', the method's official choice for this teacher."""
    if aug != "auto":
        if aug not in PRESETS:
            raise ConfigError(f"unknown augmentation preset {aug!r}: choose auto, {', '.join(PRESETS)}")
        return aug
    return method_class(method).augment_preset(teacher_format, small_crops)


def resolve_queue_size(cfg: Config, images: int, dim: int) -> tuple[Config, str | None]:
    """`cfg` with `queue_size` auto made a number of keys (`auto_queue_size` for `images` per epoch
    and `dim`-d keys), as checkpoints record it, and the line that says so (None when it was given)."""
    if cfg.queue_size != "auto":
        return cfg, None
    k = auto_queue_size(images, dim, cfg.batch_size)
    return cfg.replace(queue_size=k), (f"--queue-size auto: {k} keys for {images} images of {dim}-d keys "
                                       f"(at most half the images, 65536 and 2^23 / {dim})")


def resolve_preset(cfg: Config, teacher_format: str | None) -> Config:
    """`cfg` with `aug` resolved to a preset name (see `preset_name`) and `crop_scale` to the
    preset's unless given explicitly: what training's loader and the teacher cache both crop with."""
    aug = preset_name(cfg.aug, cfg.method, teacher_format, cfg.small_crops)
    return cfg.replace(aug=aug, crop_scale=tuple(cfg.crop_scale or PRESETS[aug].crop_scale))


__all__ = ["SEED", "SimReg", "MoCo", "Dense", "METHODS", "method_class", "official", "recipe", "teacher_target",
           "teacher_tokens", "preset_name", "resolve_preset", "resolve_queue_size"]
