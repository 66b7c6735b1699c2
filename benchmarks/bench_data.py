"""Data pipeline throughput: fastseed (FFCV decode + crops, batched augmentation on the device)
vs torchvision (ImageFolder + DataLoader, PIL, the same MoCo-v2 crops and augmentations, the
same worker count), on the same images, measured in the same run.

    .venv/bin/python benchmarks/bench_data.py --res 224 --images 512 --workers 2 --out r.json
    .venv/bin/python benchmarks/bench_data.py --res 64 --images 2048 --workers 2
    .venv/bin/pytest benchmarks/bench_data.py        # tiny, CPU

Images are synthetic JPEGs (smooth random fields plus texture, quality 90) with the longest side
`--src-side` (default 400 for res > 64, else 1.25 x res). The beton stores them as JPEG at >64 px
(FFCV ImageNet recipe) and raw at <=64 px (what fastseed-prep does for small images).
Both pipelines deliver ready tensors: normalized float (N, 3, res, res) on the device. Each is
timed over `--epochs` full passes after one warm-up pass (the warm-up pays FFCV's JIT and the
DataLoader's worker start), alternating pipelines so that a busy shared machine slows both.
On CUDA the fastseed side synchronizes once per epoch, not per batch.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _bench.data import jpeg_set, shm_prefetch
from _bench.timing import alternate

from fastseed.augment import cpu_backend
from fastseed.provenance import append_row, provenance

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_transform(res: int):
    import torchvision.transforms as T
    return T.Compose([
        T.RandomResizedCrop(res, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(max(3, int(0.1 * res) | 1), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def run_torchvision(folder: Path, res: int, batch: int, workers: int, device: torch.device, epochs: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(folder), transform=torchvision_transform(res))
    workers, prefetch, note = shm_prefetch(workers, batch * 3 * res * res * 4, want=4)
    if note:
        print(f"torchvision loader: {note}", flush=True)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=prefetch)

    def epoch():
        n = 0
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n
    return epoch


def run_fastseed(beton: Path, res: int, batch: int, workers: int, device: torch.device, epochs: int,
                 compile_augment: bool = False):
    from fastseed.augment import moco_v2_augment
    from fastseed.data import ssl_loader
    loader = ssl_loader(beton, batch_size=batch, res=res, device=device, num_workers=workers)
    augment = moco_v2_augment(MEAN, STD).to(device)
    if compile_augment:
        augment = torch.compile(augment)
    gen = torch.Generator(device).manual_seed(0)

    def epoch():
        n = 0
        for (view,), y in loader:
            x = augment(view, generator=gen)
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n
    return epoch


def bench(res: int = 64, images: int = 256, workers: int = 2, batch: int = 64, epochs: int = 2,
          src_side: int | None = None, device: str | None = None, workdir: str | None = None,
          compile_augment: bool = False, data_dir: str | None = None) -> dict:
    """`data_dir` keeps the JPEGs and the beton (see `jpeg_set`); by default they are temporary."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(workers)  # fastseed's augmentation on CPU gets the same cores
    src_side = src_side or (400 if res > 64 else int(1.25 * res))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        folder, beton = jpeg_set(Path(data_dir or tmp), images, src_side, compress=res > 64, workers=workers)
        prep_s = time.perf_counter() - t0
        runs = {"fastseed": run_fastseed(beton, res, batch, workers, dev, epochs, compile_augment),
                "torchvision": run_torchvision(folder, res, batch, workers, dev, epochs)}
        # a warm-up epoch each (JIT compile, worker start, page cache), then `epochs` of each in turn
        timed = alternate(runs, epochs, flip=False)
    ips = {k: sum(timed.results[k]) / sum(timed.seconds[k]) for k in runs}
    return {
        "res": res, "images": images, "src_side": src_side, "workers": workers, "batch": batch,
        "epochs": epochs, **provenance(dev), "compile_augment": compile_augment,
        "cpu_augment": cpu_backend() if dev.type == "cpu" else None, "prep_s": round(prep_s, 2),
        "fastseed_images_per_s": round(ips["fastseed"], 1),
        "torchvision_images_per_s": round(ips["torchvision"], 1),
        "speedup": round(ips["fastseed"] / ips["torchvision"], 2),
    }


def test_bench_data(benchmark):
    """Tiny CPU run under pytest-benchmark: both pipelines work end to end."""
    result = benchmark.pedantic(bench, kwargs=dict(res=32, images=128, workers=2, batch=32, epochs=1,
                                                   device="cpu"), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["fastseed_images_per_s"] > 0 and result["torchvision_images_per_s"] > 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--src-side", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--workdir", default=None, help="where the images and the beton are written (temporary)")
    p.add_argument("--compile", action="store_true", help="torch.compile the augmentation")
    p.add_argument("--data-dir", default=None, help="keep the JPEGs and the beton here, reused by a later run")
    p.add_argument("--out", default=None, help="append the result as one JSON line")
    a = p.parse_args(argv)
    result = bench(a.res, a.images, a.workers, a.batch, a.epochs, a.src_side, a.device, a.workdir, a.compile,
                   a.data_dir)
    print(append_row(a.out, result))
    return result


if __name__ == "__main__":
    main()
