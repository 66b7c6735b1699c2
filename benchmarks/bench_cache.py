"""Teacher cache: build rate, replay-loader rate against the live-crop loader, training rate from
the cache against the live teacher, file size.

  build    `fastseed.cache.build_cache` on a beton of synthetic JPEGs: images/s (and crops/s)
           in steady state, i.e. from the first durable chunk to the last (teacher load, FFCV
           JIT and the first chunk are start-up, reported apart as build_s)
  loader   `data.ssl_loader` (RandomResizedCrop drawn in the decoder) and `data.replay_loader`
           (the cache's crop of the epoch plus its keys) on the same beton, at the same res,
           batch and workers: one warm-up epoch each, then timed epochs in the order A B B A ...,
           so a busy shared machine slows both alike. Reading the cache must not slow the loader.
  training `fastseed.train.train_step` of one student (SEED, K = --queue) fed by the live
           teacher (ssl_loader's random crops, a teacher forward per batch) and by the cache
           (replay_loader's stored crops and keys, `--teacher-cache`): the two runs are built
           once in one process on the same beton, and timed in alternating windows of
           --steps steps (live, cache, live, ...) for --rounds rounds after one warm-up window
           each; the median of the rounds' ratios (cache / live images/s) and its range. From
           them: the time the cache saves per epoch of the beton, and the break-even epochs,
           build time / time saved per epoch (for this R, and per stored crop)
  size     bytes per image of this cache, and `cache.layout` of ImageNet-1k at R = 10, D = 128

A teacher that is not bundled (-k resnet50) without --distill gets random weights with a
MoCo-v2 projection head (`_bench.data.teacher_checkpoint`): speed does not depend on them.

    .venv/bin/python benchmarks/bench_cache.py -k resnet50 -a resnet18 --res 64 --out results/cache_cpu.jsonl
    .venv/bin/python benchmarks/bench_cache.py -k efficientnet_lite0 --teacher-res 48 --res 32 --src-side 28 \\
        --batch 128 --queue 4096 --aug weak --out results/cache_cpu.jsonl   # the demo's setting
    python benchmarks/bench_cache.py --res 224 --device cuda --out results/cache_h200.jsonl  # GPU: ResNet-50
    .venv/bin/pytest benchmarks/bench_cache.py        # tiny, CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench.data import Batches, make_images, teacher_checkpoint
from _bench.timing import TrainWindow, alternate

from fastseed.provenance import append_row, provenance

IMAGENET = 1_281_167


def time_build(cfg, output: Path, *, crops: int, chunk: int, batch: int) -> dict:
    """Build the cache, noting when each chunk becomes durable (the build's own `on_chunk`)."""
    from fastseed.cache import build_cache
    from fastseed.runtime import setup_env
    from fastseed.targets import live_targets

    marks = []
    t0 = time.perf_counter()
    env = setup_env(cfg)
    cache = build_cache(cfg, output, live_targets(cfg, env), env, crops=crops, chunk=chunk, batch_size=batch,
                        progress=False, on_chunk=lambda c: marks.append((time.perf_counter(), c)))
    total = time.perf_counter() - t0
    # steady state: from the first durable chunk (teacher load, FFCV JIT and that chunk are start-up)
    # to the last, over the images of the chunks in between
    timed = [min((c + 1) * chunk, cache.num_samples) - c * chunk for _, c in marks[1:]]
    steady = sum(timed) / (marks[-1][0] - marks[0][0]) if timed else None
    return {"build_s": round(total, 2), "build_images_per_s": steady and round(steady, 1),
            "build_crops_per_s": steady and round(steady * crops, 1), "chunks_timed": len(timed), "cache": cache}


def time_loaders(beton: Path, cache, *, res: int, batch: int, workers: int, epochs: int, scale) -> dict:
    from fastseed.data import replay_loader, ssl_loader
    loaders = {"live_crops": ssl_loader(beton, batch_size=batch, res=res, scale=scale, num_workers=workers),
               "replay": replay_loader(beton, cache, batch_size=batch, res=res, num_workers=workers)}

    def epoch(loader) -> int:
        return sum(len(batch[1]) for batch in loader)

    # a warm-up epoch each (JIT, page cache), then timed epochs in the order A B, B A, ...
    timed = alternate({name: lambda loader=loader: epoch(loader) for name, loader in loaders.items()}, epochs)
    ips = {k: sum(timed.results[k]) / sum(timed.seconds[k]) for k in loaders}
    return {"live_crops_images_per_s": round(ips["live_crops"], 1), "replay_images_per_s": round(ips["replay"], 1),
            "replay_vs_live": round(ips["replay"] / ips["live_crops"], 3)}


def time_training(cfg, cache_path: Path, *, steps: int, rounds: int) -> dict:
    """Images/s of `cfg`'s run with the live teacher and with `cache_path`, alternating windows."""
    from fastseed.train import prepare

    runs = {"live": prepare(cfg.replace(output=str(cache_path.parent / "live"))),
            "cache": prepare(cfg.replace(output=str(cache_path.parent / "cached"), teacher_cache=str(cache_path)))}
    batches = {name: Batches(run.loader) for name, run in runs.items()}
    windows = {name: TrainWindow(run, batches[name]) for name, run in runs.items()}
    for run in runs.values():
        run.students.train()
    # a warm-up step each (FFCV JIT, lazy inits, compile, cuDNN autotune), then live, cache; cache, live; ...
    times = alternate({name: lambda w=w: w(steps) for name, w in windows.items()}, rounds,
                      warmup={name: lambda w=w: w(1) for name, w in windows.items()}).seconds
    for b in batches.values():
        b.close()
    ratios = [live / cached for live, cached in zip(times["live"], times["cache"])]
    n = steps * cfg.batch_size
    return {"train_live_images_per_s": round(rounds * n / sum(times["live"]), 1),
            "train_cache_images_per_s": round(rounds * n / sum(times["cache"]), 1),
            "train_ratio_median": round(statistics.median(ratios), 3), "train_ratio_min": round(min(ratios), 3),
            "train_ratio_max": round(max(ratios), 3), "train_ratios": [round(x, 3) for x in ratios],
            "train_steps_per_window": steps, "train_rounds": rounds}


def break_even(train: dict, build: dict, images: int, crops: int) -> dict:
    """Seconds the cache saves per epoch of `images`, and the epochs after which it has paid for
    its build: build time / time saved per epoch (None when it saves nothing)."""
    saved = images / train["train_live_images_per_s"] - images / train["train_cache_images_per_s"]
    rate = build["build_crops_per_s"]
    per_crop = images / rate / saved if rate and saved > 0 else None
    return {"saved_s_per_epoch": round(saved, 2), "break_even_epochs": per_crop and round(per_crop * crops, 2),
            "break_even_epochs_per_crop": per_crop and round(per_crop, 2)}


def bench(res: int = 64, images: int = 256, crops: int = 4, teacher: str = "efficientnet_lite0",
          distill: str | None = None, teacher_res: int | None = None, workers: int = 2, batch: int = 64,
          chunk: int = 256, epochs: int = 2, src_side: int | None = None, device: str | None = None,
          workdir: str | None = None, student: str = "resnet18", steps: int = 3, rounds: int = 5,
          queue: int = 65536, compile_: str = "auto", aug: str = "auto") -> dict:
    from fastseed.cache import layout
    from fastseed.config import Config
    from fastseed.data_prep import write_beton
    from fastseed.teachers.bundled import BUNDLED

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src_side = src_side or (400 if res > 64 else int(1.25 * res))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", images, src_side, workers=workers)
        write_beton(str(tmp / "images"), str(tmp / "data.beton"), max_res=512, jpeg_quality=90,
                    compress_probability=1.0, workers=workers, progress=False)
        random_teacher = distill is None and teacher not in BUNDLED
        if random_teacher:
            distill = str(teacher_checkpoint(teacher, tmp / f"{teacher}.pth"))
        cfg = Config(data=str(tmp / "data.beton"), teacher_arch=teacher, distill=distill, res=res,
                     teacher_res=teacher_res or res, device=dev.type, workers=workers, progress=False,
                     compile=compile_, arch=student, batch_size=batch, queue_size=queue, epochs=10**6, aug=aug)
        build = time_build(cfg, tmp / "data.tcache", crops=crops, chunk=chunk, batch=batch)
        cache = build.pop("cache")
        # the live loader crops at the scale the cache's boxes were drawn with (cfg.crop_scale is
        # None: the preset's, which the build resolved and recorded)
        loaders = time_loaders(tmp / "data.beton", cache, res=res, batch=batch, workers=workers, epochs=epochs,
                               scale=tuple(cache.header["crop_scale"]))
        train = time_training(cfg, tmp / "data.tcache", steps=steps, rounds=rounds)
        size = (tmp / "data.tcache").stat().st_size
    return {"res": res, "teacher_res": cfg.teacher_res, "images": images, "src_side": src_side, "crops": crops,
            "teacher": teacher, "teacher_weights": "random" if random_teacher else (distill or "bundled"),
            "student": student, "queue": queue, "compile": compile_, "aug": aug, "dim": cache.dim,
            "dtype": cache.header["dtype"],
            "precision": cache.header["precision"],
            "workers": workers, "batch": batch, "chunk": chunk, "epochs": epochs, **provenance(dev), **build,
            **loaders, **train, **break_even(train, build, images, crops), "load_average": os.getloadavg()[0],
            "cache_bytes": size, "cache_bytes_per_image": round(size / images, 1),
            "imagenet_bytes_r10_d128": layout(IMAGENET, 10, 128, 2520)["size"]}


def test_bench_cache(benchmark, tmp_path):
    """Tiny CPU run under pytest-benchmark: build, both loaders and both trainings work end to end."""
    result = benchmark.pedantic(bench, kwargs=dict(res=32, images=128, crops=2, workers=2, batch=32, chunk=32,
                                                   epochs=1, device="cpu", workdir=str(tmp_path), student="resnet10t",
                                                   steps=1, rounds=2, queue=256),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["replay_images_per_s"] > 0 and result["live_crops_images_per_s"] > 0
    assert result["train_live_images_per_s"] > 0 and result["train_cache_images_per_s"] > 0
    assert result["cache_bytes_per_image"] > 2 * 1280 * 2  # two crops of 1280-d bf16 keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=64, help="student crop side (the replay loader's)")
    p.add_argument("--teacher-res", type=int, default=None, help="teacher input side (default --res)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    gpu = "cuda" in (p.parse_known_args(argv)[0].device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # on the GPU machine: a ResNet-50 teacher, ImageNet-sized batches, 16 loader threads
    p.add_argument("--images", type=int, default=8192 if gpu else 1024)
    p.add_argument("--crops", type=int, default=2, help="R: crops stored per image")
    p.add_argument("-k", "--teacher", default="resnet50" if gpu else "efficientnet_lite0")
    p.add_argument("--distill", default=None, help="teacher checkpoint (default: bundled weights, or random ones "
                                                   "with a MoCo-v2 head)")
    p.add_argument("-a", "--student", default="resnet18")
    p.add_argument("--workers", type=int, default=min(16, len(os.sched_getaffinity(0))) if gpu else 2)
    p.add_argument("--batch", type=int, default=256 if gpu else 64,
                   help="loader and training batch, and crops per teacher forward of the build")
    p.add_argument("--chunk", type=int, default=1024 if gpu else 256, help="images per durable chunk of the build")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loader")
    p.add_argument("--steps", type=int, default=3, help="training steps per timed window")
    p.add_argument("--rounds", type=int, default=5, help="alternations of (live teacher, cache) windows")
    p.add_argument("--queue", type=int, default=65536, help="SEED queue length K")
    p.add_argument("--aug", default="auto", help="augmentation preset of both training runs (the cache's crops "
                                                 "are drawn at its scale)")
    p.add_argument("--compile", dest="compile_", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile of teacher and student (auto: on CUDA)")
    p.add_argument("--src-side", type=int, default=None)
    p.add_argument("--workdir", default=None, help="where the images, beton and cache are written (temporary)")
    p.add_argument("--out", default=None, help="append the result as one JSON line")
    a = p.parse_args(argv)
    result = bench(a.res, a.images, a.crops, a.teacher, a.distill, a.teacher_res, a.workers, a.batch, a.chunk,
                   a.epochs, a.src_side, a.device, a.workdir, a.student, a.steps, a.rounds, a.queue, a.compile_, a.aug)
    print(append_row(a.out, result))
    print(f"training: cache {result['train_cache_images_per_s']} img/s, "
          f"live teacher {result['train_live_images_per_s']} img/s: {result['train_ratio_median']}x "
          f"(median of {a.rounds}; {result['train_ratio_min']}-{result['train_ratio_max']}); "
          f"build {result['build_crops_per_s']} crops/s; break-even after "
          f"{result['break_even_epochs']} epochs at R = {a.crops}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
