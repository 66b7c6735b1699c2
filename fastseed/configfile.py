"""Runs described by files: a YAML mapping of `Config` fields, read by `--config FILE` and
`--recipe FILE`, written to OUTPUT/config.yaml when a run starts (`write_config`) and printed by
`--print-config`; the recipes that ship with fastseed are such files (fastseed/recipes/*.yaml).

A file's keys are Config's fields (fastseed/config.py); a value must have the field's type (an
int where a float is asked is fine; a list where a tuple is asked is read as one) and lie in the
field's range (`RANGES`, `CHOICES`). Anything else is a ConfigError of one line that names the
file and the key, raised before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import yaml

from fastseed.config import Config
from fastseed.errors import ConfigError

RECIPES_DIR = Path(__file__).with_name("recipes")
# fields whose values must lie in a range: (low, high, whether low itself is allowed)
RANGES = {
    "epochs": (1, None, True), "batch_size": (1, None, True), "res": (1, None, True), "teacher_res": (1, None, True),
    "eval_res": (1, None, True), "small_crops": (0, None, True), "small_res": (1, None, True),
    "workers": (1, None, True), "lr": (0, None, False), "base_lr": (0, None, False), "momentum": (0, 1, True),
    "weight_decay": (0, None, True), "warmup_epochs": (0, None, True), "warmup_cap": (0, 1, True),
    "temp": (0, None, False), "distill_t": (0, None, False), "moco_m": (0, 1, True), "dense_weight": (0, None, True),
    "local_weight": (0, None, True), "local_t": (0, None, False), "clip_grad": (0, None, True),
    "dist_timeout": (0, None, False), "log_every": (1, None, True), "ckpt_every": (1, None, True),
    "knn_every": (0, None, True), "knn_k": (1, None, True), "knn_t": (0, None, False), "max_steps": (1, None, True),
    "dim": (1, None, True), "teacher_weights": (0, None, False), "teacher_drop": (0, 1, True),
}
CHOICES = {
    "lr_scaling": ("linear", "sqrt"), "lr_schedule": ("step", "epoch"), "optimizer": ("sgd", "lars", "adamw"),
    "teacher_pool": ("cls", "mean", "cls+mean"), "small_enqueue": ("first", "all"),
    "simreg_target": ("backbone", "projection"), "simreg_targets": ("raw", "standardize"),
    "head": ("linear", "bn-linear", "mlp"), "device": ("auto", "cuda", "cpu"),
    "precision": ("auto", "bf16", "fp16", "fp32"), "teacher_precision": ("auto", "student", "bf16", "fp16", "fp32"),
    "compile": ("auto", "on", "off"), "summary_loss": ("cosine", "cos-smoothl1"),
}
COMMA_LISTS = ("teacher_pool",)  # one value for all or one per teacher: each entry is checked
_HINTS = typing.get_type_hints(Config)


def _fits(value, hint) -> tuple[bool, object]:
    """(whether `value` has type `hint`, the value as the field holds it: lists made tuples)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, v = _fits(value, arm)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) \
            if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            return False, value
        out = []
        for v, arm in zip(value, arms):
            ok, v = _fits(v, arm)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return False, value


def _type_name(hint) -> str:
    """`int`, `float | None`, `tuple[float, float] | None`: the annotation as Config writes it."""
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_setting(key: str, value, source: str):
    """`value` as field `key` holds it; ConfigError naming `source` and `key` when it does not fit."""
    if key not in _HINTS:
        raise ConfigError(f"{source}: unknown key {key!r}: the keys are fastseed.config.Config's fields "
                          "(fastseed-train --print-config shows them)")
    ok, value = _fits(value, _HINTS[key])
    if not ok:
        name = _type_name(_HINTS[key])
        raise ConfigError(f"{source}: {key}: {value!r} is not {'an' if name[0] in 'aeiou' else 'a'} {name}")
    entries = value.split(",") if key in COMMA_LISTS and isinstance(value, str) else [value]
    if key in CHOICES and value is not None and any(v not in CHOICES[key] for v in entries):
        raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    if key in RANGES and value is not None:
        lo, hi, closed = RANGES[key]
        for v in value if isinstance(value, tuple) else (value,):
            if (v < lo if closed else v <= lo) or (hi is not None and v > hi):
                where = f"{'>=' if closed else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ConfigError(f"{source}: {key}: {v!r} is out of range (it must be {where})")
    if key == "queue_size" and value != "auto" and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{source}: queue_size: {value!r}: give a number of keys >= 1, or auto")
    return value


def read_settings(path: str | os.PathLike) -> dict:
    """The settings of a YAML file, each checked (`check_setting`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of settings (key: value), not a {type(data).__name__}")
    return {k: check_setting(k, v, str(path)) for k, v in data.items()}


def recipe_names() -> list[str]:
    """The recipes that ship with fastseed (fastseed/recipes/*.yaml), by name."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_settings(name: str) -> dict:
    """A shipped recipe's settings (fastseed/recipes/NAME.yaml), checked."""
    return read_settings(RECIPES_DIR / f"{name}.yaml")


def method_recipe(name: str) -> dict:
    """A shipped recipe's settings without its `method` (what a method class holds as its
    `official` or `defaults`)."""
    return {k: v for k, v in recipe_settings(name).items() if k != "method"}


def demo(**overrides) -> Config:
    """A run that shows SEED working within minutes on a 2-core CPU: fastseed/recipes/demo.yaml
    (real Fashion-MNIST, the bundled ImageNet EfficientNet-Lite0 teacher; why each value: its
    comments), then `overrides`."""
    return Config().replace(**recipe_settings("demo")).replace(**overrides)


def recipe_file(name: str) -> Path:
    """A shipped recipe's file, or `name` itself when it is a file."""
    shipped = RECIPES_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    if Path(name).is_file():
        return Path(name)
    raise ConfigError(f"--recipe {name}: neither a recipe ({', '.join(recipe_names())}) nor a file")


def settings_of(cfg: Config) -> dict:
    """`cfg` as plain data in Config's field order (tuples as lists): what config.yaml holds and
    what the loggers record as the run's parameters."""
    def plain(v):
        return list(plain(x) for x in v) if isinstance(v, tuple) else v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def to_yaml(cfg: Config, header: str = "") -> str:
    """`cfg` as a YAML mapping in Config's field order; tuples as lists."""
    return header + yaml.safe_dump(settings_of(cfg), sort_keys=False, default_flow_style=None, width=120)


def write_config(cfg: Config, path: Path) -> None:
    """OUTPUT/config.yaml: the settings the run started with, written atomically; `fastseed-train
    --config` of it runs the same run again (pass another --output to keep this one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_yaml(cfg, "# fastseed-train --config this-file reruns this run (flags given win over it)\n"))
    os.replace(tmp, path)
