"""Teacher cache: build rate, replay-loader rate against the live-crop loader, file size.

  build    `fastseed.cache.build_cache` on a beton of synthetic JPEGs: images/s (and crops/s)
           in steady state, i.e. from the first durable chunk to the last (teacher load, FFCV
           JIT and the first chunk are start-up, reported apart as build_s)
  loader   `data.ssl_loader` (RandomResizedCrop drawn in the decoder) and `data.replay_loader`
           (the cache's crop of the epoch plus its keys) on the same beton, at the same res,
           batch and workers: one warm-up epoch each, then timed epochs in the order A B B A ...,
           so a busy shared machine slows both alike. Reading the cache must not slow the loader.
  size     bytes per image of this cache, and `cache.layout` of ImageNet-1k at R = 10, D = 128
  training the step rate with keys from the cache against the live teacher: round 2, when
           fastseed-train takes a cache (bench_train.py will time both in one run)

    .venv/bin/python benchmarks/bench_cache.py --res 64 --images 2048 --crops 4 --out results/cache_cpu.jsonl
    .venv/bin/python benchmarks/bench_cache.py --res 224 --images 20000 --workers 16 -k resnet50 \\
        --distill moco_v2_800ep_pretrain.pth.tar --batch 256 --out results/cache_h100.jsonl   # GPU machine
    .venv/bin/pytest benchmarks/bench_cache.py        # tiny, CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_data import make_images  # the same synthetic JPEGs as the data benchmark
from fastseed.provenance import provenance

IMAGENET = 1_281_167


def time_build(cfg, output: Path, *, crops: int, chunk: int, batch: int) -> dict:
    """Build the cache, noting when each chunk becomes durable (the build's own `on_chunk`)."""
    from fastseed.cache import build_cache

    marks = []
    t0 = time.perf_counter()
    cache = build_cache(cfg, output, crops=crops, chunk=chunk, batch_size=batch, progress=False,
                        on_chunk=lambda c: marks.append((time.perf_counter(), c)))
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

    counts, times = dict.fromkeys(loaders, 0), dict.fromkeys(loaders, 0.0)
    for loader in loaders.values():  # warm-up: JIT, page cache
        epoch(loader)
    for k in range(epochs):
        names = list(loaders)[::1 if k % 2 == 0 else -1]  # A B, B A, ...: neither always runs second
        for name in names:
            loader = loaders[name]
            t = time.perf_counter()
            counts[name] += epoch(loader)
            times[name] += time.perf_counter() - t
    ips = {k: counts[k] / times[k] for k in loaders}
    return {"live_crops_images_per_s": round(ips["live_crops"], 1), "replay_images_per_s": round(ips["replay"], 1),
            "replay_vs_live": round(ips["replay"] / ips["live_crops"], 3)}


def bench(res: int = 64, images: int = 256, crops: int = 4, teacher: str = "efficientnet_lite0",
          distill: str | None = None, teacher_res: int | None = None, workers: int = 2, batch: int = 64,
          chunk: int = 256, epochs: int = 2, src_side: int | None = None, device: str | None = None,
          workdir: str | None = None) -> dict:
    from fastseed.cache import layout
    from fastseed.config import Config
    from fastseed.data_prep import write_beton

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src_side = src_side or (400 if res > 64 else int(1.25 * res))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", images, src_side)
        write_beton(str(tmp / "images"), str(tmp / "data.beton"), max_res=512, jpeg_quality=90,
                    compress_probability=1.0, workers=workers, progress=False)
        cfg = Config(data=str(tmp / "data.beton"), teacher_arch=teacher, distill=distill, res=res,
                     teacher_res=teacher_res or res, device=dev.type, workers=workers, progress=False)
        build = time_build(cfg, tmp / "data.tcache", crops=crops, chunk=chunk, batch=batch)
        cache = build.pop("cache")
        # the live loader crops at the scale the cache's boxes were drawn with (cfg.crop_scale is
        # None: the preset's, which the build resolved and recorded)
        loaders = time_loaders(tmp / "data.beton", cache, res=res, batch=batch, workers=workers, epochs=epochs,
                               scale=tuple(cache.header["crop_scale"]))
        size = (tmp / "data.tcache").stat().st_size
    return {"res": res, "teacher_res": cfg.teacher_res, "images": images, "src_side": src_side, "crops": crops,
            "teacher": teacher, "dim": cache.dim, "dtype": cache.header["dtype"],
            "precision": cache.header["precision"],
            "workers": workers, "batch": batch, "chunk": chunk, "epochs": epochs, **provenance(dev), **build,
            **loaders, "cache_bytes": size, "cache_bytes_per_image": round(size / images, 1),
            "imagenet_bytes_r10_d128": layout(IMAGENET, 10, 128, 2520)["size"]}


def test_bench_cache(benchmark, tmp_path):
    """Tiny CPU run under pytest-benchmark: build and both loaders work end to end."""
    result = benchmark.pedantic(bench, kwargs=dict(res=32, images=128, crops=2, workers=2, batch=32, chunk=32,
                                                   epochs=1, device="cpu", workdir=str(tmp_path)),
                                rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["replay_images_per_s"] > 0 and result["live_crops_images_per_s"] > 0
    assert result["cache_bytes_per_image"] > 2 * 1280 * 2  # two crops of 1280-d bf16 keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=64, help="student crop side (the replay loader's)")
    p.add_argument("--teacher-res", type=int, default=None, help="teacher input side (default --res)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--crops", type=int, default=4, help="R: crops stored per image")
    p.add_argument("-k", "--teacher", default="efficientnet_lite0")
    p.add_argument("--distill", default=None, help="teacher checkpoint (default: the bundled weights)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="loader batch, and crops per teacher forward")
    p.add_argument("--chunk", type=int, default=256, help="images per durable chunk of the build")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loader")
    p.add_argument("--src-side", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--workdir", default=None, help="where the images, beton and cache are written (temporary)")
    p.add_argument("--out", default=None, help="append the result as one JSON line")
    a = p.parse_args(argv)
    result = bench(a.res, a.images, a.crops, a.teacher, a.distill, a.teacher_res, a.workers, a.batch, a.chunk,
                   a.epochs, a.src_side, a.device, a.workdir)
    line = json.dumps(result)
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
