"""The objectives, one file each, and their registry. A method is one student's objective: its
backbone and head; the queues of keys it compares against are shared by every student of a run.
The loop does not know which method it runs, and no module outside this package names one:
each method is a `Method` (methods/base.py, the contract, with the answers most methods give)
and declares what the rest of fastseed asks of it.

A training run resolves its method once (`method_of(cfg)`, at the start of `train.prepare`) and
passes the class on: to the loader (`global_views`), the target source (`teacher_inputs`,
`teacher_target`, `teacher_tokens`), each student (`from_config`) and the step (`loss_targets`).
The CLI looks a name up with `method_class`; fastseed-export rebuilds a saved head with `head_of`.

Adding an objective: one file here and one entry in `METHODS` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import torch
from torch import nn

from fastseed.augment import PRESETS
from fastseed.config import Config
from fastseed.errors import ConfigError

from ._common import auto_queue_size
from .base import Method
from .dense import Dense
from .moco import MoCo
from .seed import SEED
from .several import several_method
from .simreg import SimReg

METHODS = {m.name: m for m in (SEED, SimReg, MoCo, Dense)}


def method_class(name: str):
    """The registered method called `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown --method {name!r}: choose from {', '.join(METHODS)}") from None


def method_of(cfg: Config) -> type[Method]:
    """The method `cfg` runs (ConfigError for an unknown name); with several teachers (-k a,b), its
    form that distils them (`several.several_method`: ConfigError for a method without one, or
    for teacher lists that do not fit -k)."""
    return several_method(method_class(cfg.method), cfg)


def head_of(method: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A saved embedding head of `method` rebuilt from its state dict (fastseed-export): its
    kind (`head_kind`) and its sizes read from the weights, the weights loaded strictly."""
    cls = method_class(method)
    linears = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    kind = cls.head_kind(state)
    head = cls.make_head(linears[0].shape[1], linears[-1].shape[0], *([kind] if kind else []))
    head.load_state_dict(state, strict=True)
    return head


def official(method: str = Config.method, **overrides) -> Config:
    """The official recipe of `method`: its script's lr, epochs, weight decay and warm-up, the
    per-epoch schedule, SGD, and the official augmentation preset (`--aug auto`)."""
    recipe = method_class(method).official
    if recipe is None:
        raise ConfigError(f"--method {method} has no official recipe to follow: use --recipe fastseed")
    cfg = Config(method=method, **recipe)  # the file sets SGD and the per-epoch schedule
    return cfg.replace(**overrides)


def recipe(method: str = Config.method, base: Config | None = None, **overrides) -> Config:
    """fastseed's recipe of `method`: `base` (default `Config()`; the CLI's demo without --data) with
    the method and its `defaults`, then `overrides`."""
    base = base if base is not None else Config()
    return base.replace(method=method, **method_class(method).defaults).replace(**overrides)


def teacher_target(cfg: Config) -> str | None:
    """What of the teacher the run distils: 'head' (its projection), 'backbone' (its pooled
    features) or None (no teacher)."""
    return method_of(cfg).teacher_target(cfg)


def teacher_tokens(cfg: Config) -> bool:
    """Whether the run's targets end with the teacher's token map (fastseed.targets)."""
    return method_of(cfg).teacher_tokens(cfg)


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


__all__ = ["Method", "SEED", "SimReg", "MoCo", "Dense", "METHODS", "method_class", "method_of", "head_of", "official",
           "recipe", "teacher_target", "teacher_tokens", "preset_name", "resolve_preset", "resolve_queue_size"]
