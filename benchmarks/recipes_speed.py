"""Training speed of fastseed beside LightlyTrain 0.18's `distillationv1` on the runs of the
recipe study (benchmarks/recipes.py, recipes_lightly.py): the same train subset, bundled ImageNet
EfficientNet-Lite0 teacher at 48 px, ResNet-18 student at 32 px from random init, batch 64,
crop 0.6-1 + flip, 2 loader workers (issue 24, item 4). Precision is each tool's choice on this
CPU: fastseed's auto runs fp32 students and, where the CPU has AMX tiles, a bf16 teacher;
LightlyTrain's auto is 32-true, and it is timed at bf16-mixed too (--lightly-precisions): the
ratio is against its fastest row.

Each timing is a fresh process that trains S steps or 2S steps and reports the wall time of
the training call alone: `fastseed.train.train` (teacher load, loader, S steps, checkpoint; no
k-NN: no --val-data) and `lightly_train.pretrain` (set-up, S steps, checkpoint, export). The
steady rate is S x batch / (t(2S) - t(S)): what a longer run gains per step, with set-up,
imports and the JIT of either tool taken out. The tools alternate, and the order flips every
repetition, so that a drift of the machine falls on both. The load average before each run is
recorded: a figure counts only from a quiet machine.

    .venv/bin/python benchmarks/recipes_speed.py --lightly-python /work/ltvenv/bin/python --reps 2
    .venv/bin/python benchmarks/recipes_speed.py --size tiny --lightly-python ...   # seconds

The recipes are each tool's own (they are what is compared): fastseed's default (SGD, τS = τT =
0.07, linear head, clipping) and, with --fastseed-recipes, any recipes.py recipe (`peer` adds
the peer's mixup, LARS, batch in the queue and queue size; `default+teacher_precision=fp32` the
default with an fp32 teacher); LightlyTrain's v1 mixes inputs, clips and runs LARS. Rows: --out
(default benchmarks/results/recipes_speed_<size>.jsonl, each with the command that ran it); the table
and the command: .md beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench.rows import command_line
from _bench.tables import markdown

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    "tiny": dict(train=256, test=200, epochs=1, steps=4, batch=32, lr=0.05, queue=128, arch="resnet18"),
    "cpu": dict(train=5000, test=2000, epochs=3, steps=128, batch=64, lr=0.1, queue=4096, arch="resnet18"),
}


def one_fastseed(recipe: str, dataset: str, size: dict, steps: int, work: Path, out: Path) -> dict:
    """`train` for `steps` steps of recipes.py's `recipe`, timed; no k-NN."""
    from _bench.data import betons
    from _bench.recipes import config

    from fastseed.train import train
    train_beton, test_beton = betons(dataset, size, work)
    n_train = min(size["train"], 4000) if dataset == "mnist-5k" else size["train"]
    epochs = -(-steps // (n_train // size["batch"]))
    cfg = config({**size, "steps": steps, "epochs": epochs}, recipe, train_beton, test_beton, out, 0, n_train)
    cfg = cfg.replace(val_data=None, resume=None)
    t = time.perf_counter()
    train(cfg)
    return {"train_s": time.perf_counter() - t}


def one_lightly(recipe: str, dataset: str, size: dict, steps: int, work: Path, out: Path) -> dict:
    """`lightly_train.pretrain` (distillationv1) for `steps` steps, timed (recipes_lightly.py); a
    recipe `distillationv1+P` runs at its precision P (e.g. bf16-mixed; else its auto, 32-true here)."""
    from _bench.data import betons
    from _bench.lightly import TEACHER, TEACHER_RES, TeacherAtSide, png_folder, train_lightly

    from fastseed.teachers import load_teacher
    betons(dataset, size, work)
    n_train = min(size["train"], 4000) if dataset == "mnist-5k" else size["train"]
    teacher = TeacherAtSide(load_teacher(TEACHER, None).model.backbone, TEACHER_RES)
    timing = train_lightly("distillationv1", png_folder(dataset, size, work), out, {**size, "steps": steps}, 0,
                           n_train, teacher, precision=recipe.partition("+")[2] or "auto")
    return {"train_s": timing["train_s"]}


def timed(python: str, tool: str, recipe: str, a, steps: int) -> dict:
    """One timing in a fresh process of `python`; the load average just before it."""
    out = Path(a.workdir) / f"speed_{tool}_{recipe}_{steps}"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    cmd = [python, __file__, "--one", tool, "--recipe", recipe, "--steps", str(steps), "--size", a.size,
           "--dataset", a.dataset, "--workdir", a.workdir, "--run-dir", str(out)]
    # fastseed from this checkout: a LightlyTrain venv does not have it installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{tool} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": tool, "recipe": recipe, "steps": steps, "train_s": round(result["train_s"], 2),
            "load_before": round(load, 2)}


def table(rows: list[dict], size: dict) -> str:
    """Per tool and recipe: median end-to-end seconds at S and 2S steps, and the steady rate."""
    s = min(r["steps"] for r in rows)
    lines, rates = [], {}
    for key in dict.fromkeys((r["tool"], r["recipe"]) for r in rows):
        by = {}
        for r in rows:
            if (r["tool"], r["recipe"]) == key:
                by.setdefault(r["rep"], {})[r["steps"]] = r["train_s"]
        pairs = [v for v in by.values() if len(v) == 2]
        rate = [s * size["batch"] / (v[2 * s] - v[s]) for v in pairs]
        rates[key] = statistics.median(rate)
        lines.append((key, len(pairs), statistics.median(v[s] for v in pairs),
                      statistics.median(v[2 * s] for v in pairs), rates[key]))
    base = max((v for (tool, _), v in rates.items() if tool == "lightly"), default=None)  # its fastest row
    return markdown(["tool", "recipe", "reps", f"s at {s} steps", f"s at {2 * s} steps", "steady images/s",
                     "vs fastest LightlyTrain"],
                    [[tool, recipe, n, f"{t1:.1f}", f"{t2:.1f}", f"{rate:.0f}", f"{rate / base:.2f}x" if base else ""]
                     for (tool, recipe), n, t1, t2, rate in lines], "llrrrrr")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--dataset", choices=("fashion-mnist", "mnist-5k"), default="fashion-mnist")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--fastseed-recipes", nargs="+", default=["default"])
    p.add_argument("--lightly-python", default=None, help="a LightlyTrain venv's python (recipes_lightly.py)")
    p.add_argument("--lightly-precisions", nargs="+", default=["auto", "bf16-mixed"],
                   help="LightlyTrain's precision per row (auto: its own choice, 32-true on a CPU)")
    p.add_argument("--workdir", default=None, help="default: data/recipes_<size>/ (recipes.py's, git-ignored)")
    p.add_argument("--out", default=None)
    p.add_argument("--one", choices=("fastseed", "lightly"), help=argparse.SUPPRESS)
    p.add_argument("--recipe", default="default", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    size = SIZES[a.size]
    a.workdir = a.workdir or str(ROOT / "data" / f"recipes_{a.size}")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.one:  # a child: one timing, one JSON line
        run = Path(a.run_dir)
        result = (one_fastseed(a.recipe, a.dataset, size, a.steps, Path(a.workdir), run) if a.one == "fastseed"
                  else one_lightly(a.recipe, a.dataset, size, a.steps, Path(a.workdir), run))
        print(json.dumps(result))
        return [result]

    from fastseed.provenance import append_row, provenance
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"recipes_speed_{a.size}.jsonl")
    tools = [("fastseed", r, sys.executable) for r in a.fastseed_recipes]
    if a.lightly_python:
        tools += [("lightly", "distillationv1" + (f"+{p}" if p != "auto" else ""), a.lightly_python)
                  for p in a.lightly_precisions]
    rows, started = [], time.strftime("%Y-%m-%d %H:%M:%S")
    command = command_line("benchmarks/recipes_speed.py", argv)
    for rep in range(a.reps):
        order = tools if rep % 2 == 0 else tools[::-1]
        for tool, recipe, python in order:
            for steps in (size["steps"], 2 * size["steps"]):
                row = {**timed(python, tool, recipe, a, steps), "rep": rep, "run": started, "dataset": a.dataset,
                       "size": a.size, "batch": size["batch"], "res": 32, "teacher_res": 48, "command": command,
                       **provenance("cpu")}
                rows.append(row)
                print(append_row(out, row), file=sys.stderr)
    first = rows[0]
    text = table(rows, size) + f"\n\n{first['device']}, commit {first['commit']}, torch {first['torch']}: `{command}`"
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
