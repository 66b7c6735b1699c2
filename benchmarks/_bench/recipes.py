"""The recipe study's recipes (benchmarks/recipes.py describes them): its factors and the
configuration of a recipe, which recipes.py and recipes_speed.py run; and one run trained and
scored by k-NN, a row of recipes.py and of dense_quality.py."""
from __future__ import annotations

import math
import time
from pathlib import Path


def data_queue(n_images: int) -> int:
    """LightlyTrain's queue buckets (its `distillation` args): ~25-50% of the dataset."""
    for limit, size in ((50, 16), (100, 32), (250, 64), (500, 128), (1000, 256), (2000, 512), (4000, 1024),
                        (10000, 2048), (20000, 4096)):
        if n_images <= limit:
            return size
    return 8192


def lars(size: dict) -> dict:
    return dict(optimizer="lars", lr=1.8 * math.sqrt(size["batch"] / 1536), weight_decay=1e-6)


FACTORS = {
    "equal-temps": lambda size, n: dict(temp=0.07, distill_t=0.07),
    "batch-in-queue": lambda size, n: dict(batch_in_queue=True),
    "queue-data": lambda size, n: dict(queue_size=max(size["batch"], min(size["queue"], data_queue(n)))),
    "linear-head": lambda size, n: dict(head="linear"),
    "mixup": lambda size, n: dict(mixup=True),
    "lars": lambda size, n: lars(size),
    "clip": lambda size, n: dict(clip_grad=1.0),
}
RECIPES = {  # the default grid, in the table's order; any other "+"-joined factors also run
    "demo": (), "default": (), "official": (), **{name: (name,) for name in FACTORS},
    "equal-temps+batch-in-queue": ("equal-temps", "batch-in-queue"),
    "equal-temps+clip": ("equal-temps", "clip"),
    "equal-temps+clip+linear-head": ("equal-temps", "clip", "linear-head"),
    "equal-temps+clip+mixup": ("equal-temps", "clip", "mixup"),
    "equal-temps+batch-in-queue+clip+linear-head": ("equal-temps", "batch-in-queue", "clip", "linear-head"),
    "peer": tuple(FACTORS),
    "peer-no-mixup": tuple(f for f in FACTORS if f != "mixup"),
    "simreg": (), "simreg-default": (), "simreg-official": (), "simreg+clip": ("clip",), "simreg+mixup": ("mixup",),
    "simreg+lars+clip": ("lars", "clip"),
    "simreg+lars+clip+mixup": ("lars", "clip", "mixup"),
}


# what a "+"-joined recipe starts from: the demo's recipe before the recipe study (none named, or "simreg"),
# fastseed's default now, or the official recipe; the factors after it are applied on top
BASES = ("simreg", "default", "simreg-default", "official", "simreg-official")


def factors(recipe: str) -> tuple[str, ...]:
    """A recipe's factors: RECIPES's, or its name split at "+" after an optional base (BASES)."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    names = recipe.split("+")
    names = names[1:] if names[0] in BASES else names
    unknown = [n for n in names if n not in FACTORS and not setting(n)]
    if unknown:
        raise SystemExit(f"recipe {recipe!r}: unknown factor(s) {', '.join(unknown)}; factors: {', '.join(FACTORS)}")
    return tuple(names)


def setting(factor: str) -> dict:
    """A factor written `field=value` (e.g. lr=0.7, optimizer=adamw, channels_last=true): that Config
    field set to the value, read as a number, a bool or None where it is one; {} for anything else."""
    from fastseed.config import Config
    name, eq, value = factor.partition("=")
    if not eq or name not in Config.__dataclass_fields__:
        return {}
    if value.lower() in ("true", "false", "none"):
        return {name: {"true": True, "false": False, "none": None}[value.lower()]}
    try:
        return {name: int(value) if value.isdigit() else float(value)}
    except ValueError:
        return {name: value}


def config(size: dict, recipe: str, train: Path, test: Path, out: Path, seed: int, n_train: int):
    from fastseed.configfile import demo
    from fastseed.methods import official
    from fastseed.methods import recipe as recipe_of
    data = dict(data=str(train), val_data=str(test), knn_bank=str(train), epochs=size["epochs"],
                max_steps=size["steps"], batch_size=size["batch"], arch=size["arch"], seed=seed, output=str(out),
                final_table=False, progress=False, resume="auto", ckpt_every=10**9, log_every=10**9, knn_every=0,
                teacher_arch="efficientnet_lite0", res=32, teacher_res=48, workers=2)
    method = "simreg" if recipe.startswith("simreg") else "seed"
    base = recipe.split("+")[0]
    run = dict(aug="weak", crop_scale=(0.6, 1.0), lr=size["lr"], weight_decay=5e-4, warmup_epochs=0.25,
               queue_size=size["queue"], **data)
    if base.endswith("official"):
        cfg = official(method, aug="weak", crop_scale=(0.6, 1.0), **data)
    elif base.endswith("default"):  # what fastseed-train runs now: the demo's data and lr schedule, and the
        cfg = recipe_of(method, demo(**run))  # method's defaults (which may set the optimiser and lr)
    else:  # the demo's recipe before the recipe study, named here so that the figures keep their meaning
        cfg = demo(method=method, temp=0.2, distill_t=0.02, head="mlp", clip_grad=None, teacher_precision="student",
                   **run)
    for factor in factors(recipe):
        cfg = cfg.replace(**(FACTORS[factor](size, n_train) if factor in FACTORS else setting(factor)))
    return cfg


def settings(cfg) -> dict:
    keys = ("method", "temp", "distill_t", "queue_size", "batch_in_queue", "head", "mixup", "optimizer", "lr",
            "weight_decay", "clip_grad", "warmup_epochs", "lr_schedule", "teacher_precision", "simreg_targets")
    from fastseed.optim import peak_lr
    return {**{k: getattr(cfg, k) for k in keys}, "peak_lr": peak_lr(cfg)}


def run_one(cfg) -> dict:
    """Train `cfg`'s student and score it: steps run, seconds, k-NN top-1 (k = 20 and 1)."""
    from fastseed.train import train as train_run
    t = time.perf_counter()
    result = train_run(cfg)
    knn = result["results"]["student"]
    return {"steps": result["step"], "train_s": round(time.perf_counter() - t, 1),
            "knn_top1@20": knn["knn_top1@20"], "knn_top1@1": knn["knn_top1@1"]}
