"""What does a dense task get from an encoder? Semantic segmentation of mosaics of real images
by a linear probe on the encoder's frozen last feature map: raw pixels, a random-init student,
the bundled ImageNet EfficientNet-Lite0 teacher and trained fastseed students.

Mosaics. A g×g grid on a side-S canvas (default 2×2 at 64 px and 3×3 at 96 px: 32 px cells;
cell edges at round(i·S/g)) holds one item per cell: the item's long side scaled to a share
U(0.6, 1) of the cell, its aspect kept, at a uniform offset inside the cell. Every pixel is
labelled with the class of the item covering it, the rest with the background class (index =
number of classes). Train mosaics draw items from the train split only, held-out mosaics from
the test split only (without replacement while the split lasts). Two sources:
  fashion-mnist: Debian's dataset-fashion-mnist (10 classes); an item is its 28 px grey image,
    foreground = grey >= 16 (of 255) at 28 px, resized with it (area when shrinking, linear
    when enlarging) and kept where the resized foreground share is >= 0.5; pasted as grey on a
    dark grey texture (a smooth 8×8 random field in [0, 48] plus pixel noise in [0, 16]). Not
    black: on black, one pixel's value alone
    (> 0) separates item from background, which would credit raw pixels with the background
    class and every edge; on the texture the dim pixels of dark items (5% of foreground is
    below 37) overlap the background's values, so the background must be told from context.
  stamps: the colour cut-outs of benchmarks/stamps.py (its `CLASSES`, `cutouts`, `split` with
    its default share and seed, `background`, `paste`: alpha >= 128 is the item).
Mosaics are cached per (source, grid, side, counts, seed) as .npz under the work folder.

Encoders. Features are the encoder's LAST feature map [B, C, h, w] (timm `forward_features`,
then `fastseed.models.token_map`), computed once per image set under no_grad, the encoder in
eval mode. Images are uint8 / 255, then (x - mean) / std with the teacher's mean/std (0.5 for
the bundled teacher): that is how fastseed trains students (the k-NN monitor normalises with
the teacher's mean/std too); a trained student uses the mean/std its checkpoint records.
  raw: the normalised image itself (C = 3, h = w = S).
  init: `fastseed.models.create_student(--arch)` after torch.manual_seed(seed), at side S.
  teacher: `load_teacher("efficientnet_lite0", use_head=False)`, its token map
    (`TeacherBundle.with_tokens`) at --teacher-side, px or a multiple of S such as 2x (default S:
    a 2×2 map at 64 px, 3×3 at 96 px: one token per cell).
  checkpoint: a fastseed checkpoint (`fastseed.export.read_student`) or an export folder
    (`load_encoder`), at side S unless `res` is given.

Probe. Features standardised per channel with the train set's mean and std, then scaled by
1/sqrt(C) (a position's vector has mean square norm 1), so that one lr fits every encoder: an SGD
step then moves the logits by the same amount for C = 3 and C = 1280, where Adam's per-channel
steps move them by ~lr·C (measured: AdamW at lr 0.01 left the 1280-channel teacher below
background-only pixel accuracy while the 3-channel raw row was still converging). A 1×1 Conv2d
C -> classes + 1, zero-initialised; its logits upsampled bilinearly (align_corners False) to
S×S; pixel cross-entropy; SGD, momentum 0.9, lr 3 cosine to zero, no weight decay, batch 16
mosaics, 400 steps, batches from a permutation per epoch drawn from `seed`. The same schedule
for every encoder, never tuned per row; on 1,000 Fashion-MNIST train mosaics, 1,600 steps
lowered the final train loss of the raw, init and teacher (1× and 2× side) rows by 0.04 at
most. Metrics on the held-out mosaics: IoU_c = TP / (TP + FP + FN) per class, background
included; mIoU = the mean over the classes present in the prediction or
the truth (a class absent from both is skipped); pixel accuracy = correct pixels / all pixels;
both in %. A probe that predicts background everywhere scores the background's pixel share
(about 70%) as accuracy and about that share / (classes + 1) as mIoU.

Reading the figures: at the default sides a stride-32 encoder has one token per 32 px cell,
and the last map of such a small input barely localises (a token of a 2×2 teacher map told its
own cell's class no better than a neighbour's, ~20% against 10% chance); there every row but
raw pixels scored background-only in benchmarks/results/dense_probe_cpu.md. The teacher at
3× the side (3×3 tokens per cell) is the first row well above it.

    .venv/bin/python benchmarks/dense_probe.py --dataset fashion-mnist --rows raw init teacher --size cpu
    .venv/bin/python benchmarks/dense_probe.py --dataset stamps --rows raw init teacher --size cpu
    .venv/bin/python benchmarks/dense_probe.py --dataset fashion-mnist --rows teacher --teacher-side 3x
    .venv/bin/python benchmarks/dense_probe.py --dataset fashion-mnist --rows --checkpoint RUN/checkpoint_last.pt
    .venv/bin/python benchmarks/dense_probe.py --dataset fashion-mnist --rows raw init --size tiny   # tests

A row already in --out (same dataset, layout, row, encoder or checkpoint, teacher side, seed,
counts) is skipped when started again; --threads sets torch's CPU threads (the cpu figures: 1,
which on the shared 2-core machine ran the probe's small steps several times faster than 2).
Rows: --out (JSON lines, default benchmarks/results/dense_probe_<size>.jsonl); the table: the
same name with .md. A stride-32 encoder at the mosaic's side gives one vector per 32 px cell
and localises nothing (every such row scores background everywhere): probe students with
`res` (a checkpoint row's input side; benchmarks/defaults_study.py uses 256 px).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("fashion-mnist", "stamps")
ROWS = ("raw", "init", "teacher")
LAYOUTS = ((2, 64), (3, 96))
TEACHER = "efficientnet_lite0"
TEACHER_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the bundled teachers' (teachers/bundled.py)
FASHION_CLASSES = 10
FASHION_THRESHOLD = 16  # grey >= this (of 255) at 28 px is the item
ITEM_SCALE = (0.6, 1.0)  # an item's long side, as a share of its cell's side
PROBE = dict(steps=400, batch=16, lr=3.0, momentum=0.9)
SIZES = {
    # the pipeline end to end in seconds (tests/test_dense_probe.py): proves nothing
    "tiny": dict(n_train=48, n_test=24, steps=20),
    # a 2-core CPU: mosaics, features and the probe of one row within a minute
    "cpu": dict(n_train=1000, n_test=500, steps=PROBE["steps"]),
}


# ---------------------------------------------------------------- mosaics
def num_classes(dataset: str) -> int:
    """Item classes of `dataset`; the background is one more, at this index."""
    if dataset == "fashion-mnist":
        return FASHION_CLASSES
    if dataset == "stamps":
        return len(_stamps().CLASSES)
    raise ValueError(f"unknown dataset {dataset!r}: {', '.join(DATASETS)}")


def _stamps():
    # imported on use: the module lives beside this file and is only needed for --dataset stamps
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stamps
    return stamps


class FashionItems:
    """Fashion-MNIST items of one split as cut-outs: `[i]` has `rgba` [28, 28, 4] (grey in RGB,
    alpha 255 where grey >= FASHION_THRESHOLD) and `label`."""

    def __init__(self, split: str):
        from fastseed.data_prep.sources import fashion_mnist
        source = fashion_mnist(split)
        self.images, self.labels, self.split = source.images, source.labels, split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> SimpleNamespace:
        grey = self.images[i]
        alpha = np.where(grey >= FASHION_THRESHOLD, 255, 0).astype(np.uint8)
        return SimpleNamespace(rgba=np.dstack([grey, grey, grey, alpha]), label=int(self.labels[i]),
                               source=f"fashion-mnist:{self.split}:{i}")


def dark_texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """A dark grey texture [side, side, 3] uint8: a smooth 8×8 random field in [0, 48],
    bilinearly enlarged, plus per-pixel noise in [0, 16]."""
    import cv2
    field = cv2.resize(rng.uniform(0, 48, (8, 8)).astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    grey = np.clip(field + rng.uniform(0, 16, (side, side)), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def paste_rgba(canvas: np.ndarray, item, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`item.rgba` resized to the box (y, x, h, w) and laid on `canvas` where its alpha >= 128;
    returns the canvas and that mask [H, W] (the same rule as stamps.paste)."""
    import cv2
    y, x, h, w = box
    rgba = item.rgba
    shrink = h < rgba.shape[0] or w < rgba.shape[1]
    small = cv2.resize(rgba, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    hit = small[:, :, 3] >= 128
    canvas[y:y + h, x:x + w][hit] = small[:, :, :3][hit]
    mask = np.zeros(canvas.shape[:2], bool)
    mask[y:y + h, x:x + w] = hit
    return canvas, mask


def cell_edges(grid: int, side: int) -> np.ndarray:
    return np.round(np.linspace(0, side, grid + 1)).astype(int)


def render(items: Sequence, n: int, *, grid: int, side: int, classes: int, rng: np.random.Generator,
           background: Callable, paste: Callable) -> tuple[np.ndarray, np.ndarray, list[list[tuple]]]:
    """`n` mosaics of `items` (each with `.rgba` and `.label`): images uint8 [n, S, S, 3], masks
    int64 [n, S, S], and per mosaic the placements (item index, (y, x, h, w)) in cell order."""
    edges = cell_edges(grid, side)
    cells = grid * grid
    need = n * cells
    # without replacement while the pool lasts, so a small set repeats no item
    order = np.concatenate([rng.permutation(len(items)) for _ in range(-(-need // len(items)))])[:need]
    images = np.empty((n, side, side, 3), np.uint8)
    masks = np.full((n, side, side), classes, np.int64)
    placements = []
    for m in range(n):
        canvas = np.ascontiguousarray(background(rng, side), dtype=np.uint8)
        placed = []
        for c in range(cells):
            index = int(order[m * cells + c])
            item = items[index]
            y0, x0 = edges[c // grid], edges[c % grid]
            ch, cw = edges[c // grid + 1] - y0, edges[c % grid + 1] - x0
            ih, iw = item.rgba.shape[:2]
            long_side = rng.uniform(*ITEM_SCALE) * min(ch, cw)
            h = max(1, round(long_side * ih / max(ih, iw)))
            w = max(1, round(long_side * iw / max(ih, iw)))
            box = (int(y0 + rng.integers(0, ch - h + 1)), int(x0 + rng.integers(0, cw - w + 1)), h, w)
            canvas, hit = paste(canvas, item, box)
            masks[m][hit] = item.label
            placed.append((index, box))
        images[m] = canvas
        placements.append(placed)
    return images, masks, placements


def item_splits(dataset: str) -> tuple[Sequence, Sequence, Callable, Callable]:
    """(train items, test items, background, paste) of a source."""
    if dataset == "fashion-mnist":
        return FashionItems("train"), FashionItems("test"), dark_texture, paste_rgba
    if dataset == "stamps":
        stamps = _stamps()
        train, test = stamps.split(stamps.cutouts())
        return train, test, stamps.background, stamps.paste
    raise ValueError(f"unknown dataset {dataset!r}: {', '.join(DATASETS)}")


def mosaic_sets(dataset: str, work: Path, *, grid: int, side: int, n_train: int, n_test: int,
                seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images uint8 [N, S, S, 3], masks int64 [N, S, S]), (test images, masks)): train
    mosaics from train-split items, test mosaics from test-split items; written once to
    work/mosaics_<dataset>_g<grid>_s<side>_<n_train>_<n_test>_seed<seed>.npz."""
    work = Path(work)
    path = work / f"mosaics_{dataset}_g{grid}_s{side}_{n_train}_{n_test}_seed{seed}.npz"
    if not path.exists():
        classes = num_classes(dataset)
        train_items, test_items, background, paste = item_splits(dataset)
        arrays = {}
        for name, items, n, stream in (("train", train_items, n_train, 0), ("test", test_items, n_test, 1)):
            images, masks, _ = render(items, n, grid=grid, side=side, classes=classes,
                                      rng=np.random.default_rng([seed, stream]), background=background, paste=paste)
            arrays[f"{name}_images"], arrays[f"{name}_masks"] = images, masks.astype(np.uint8)
        work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        return tuple((z[f"{name}_images"], z[f"{name}_masks"].astype(np.int64)) for name in ("train", "test"))


# ---------------------------------------------------------------- metrics
def confusion(pred: torch.Tensor, truth: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] int64 pixel counts, rows the true class, columns the predicted one."""
    return torch.bincount(truth.reshape(-1) * n + pred.reshape(-1), minlength=n * n).reshape(n, n)


def scores(cm) -> dict:
    """mIoU (mean over classes present in the truth or the prediction), pixel accuracy (both %)
    and the per-class IoU (%; None for a class absent from both) of a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = [None if u == 0 else 100.0 * t / u for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    return {"miou": float(np.mean(present)), "pixel_acc": 100.0 * float(tp.sum() / cm.sum()), "iou": iou}


# ---------------------------------------------------------------- the probe
def extract(features_fn: Callable, images: np.ndarray, *, mean, std, batch: int = 64,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """features_fn of every image (uint8 [N, S, S, 3] -> /255 -> (x - mean) / std), float32 [N, C, h, w]."""
    device = torch.device(device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
            out.append(features_fn((x - m) / s).float().contiguous())
    return torch.cat(out)


def fit_probe(train_feats: torch.Tensor, train_masks: torch.Tensor, test_feats: torch.Tensor,
              test_masks: torch.Tensor, *, classes: int, seed: int = 0, steps: int = PROBE["steps"],
              batch: int = PROBE["batch"], lr: float = PROBE["lr"], momentum: float = PROBE["momentum"]) -> dict:
    """The linear 1×1 probe (module docstring, "Probe") on kept features; scores on the test set."""
    device = train_feats.device
    mu = train_feats.mean((0, 2, 3), keepdim=True)
    # a constant channel stays 0 after standardising instead of dividing by zero
    sd = train_feats.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    scale = sd * math.sqrt(train_feats.shape[1])
    xtr, xte = (train_feats - mu) / scale, (test_feats - mu) / scale
    ytr, yte = train_masks.to(device), test_masks.to(device)
    size = tuple(ytr.shape[-2:])
    head = nn.Conv2d(xtr.shape[1], classes + 1, 1).to(device)
    nn.init.zeros_(head.weight)  # zero init: the probe depends on the seed through the batch order only
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)

    def logits(x):
        out = head(x)
        return out if tuple(out.shape[-2:]) == size else F.interpolate(out, size=size, mode="bilinear",
                                                                      align_corners=False)

    order, at, n = torch.randperm(len(xtr), generator=gen), 0, len(xtr)
    for _ in range(steps):
        if at + batch > n:  # a new permutation per epoch; the tail of the last one is dropped
            order, at = torch.randperm(n, generator=gen), 0
        idx = order[at:at + min(batch, n)].to(device)
        at += batch
        loss = F.cross_entropy(logits(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    cm = torch.zeros(classes + 1, classes + 1, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, len(xte), 64):
            cm += confusion(logits(xte[start:start + 64]).argmax(1), yte[start:start + 64], classes + 1)
    return {**scores(cm.cpu().numpy()), "final_loss": round(loss.item(), 4)}


def probe(features_fn: Callable, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
          classes: int, seed: int = 0, mean=TEACHER_MEAN_STD[0], std=TEACHER_MEAN_STD[1],
          device: torch.device | str = "cpu", extract_batch: int = 64, **schedule) -> dict:
    """miou, pixel_acc (%), per-class iou, the feature map's [C, h, w] and the seconds spent
    extracting and fitting, for `features_fn` (a normalised float batch [B, 3, S, S] ->
    [B, C, h, w]) on (images, masks) pairs from `mosaic_sets`. `schedule` overrides PROBE."""
    t = time.perf_counter()
    ftr, fte = (extract(features_fn, images, mean=mean, std=std, batch=extract_batch, device=device)
                for images, _ in (train, test))
    extract_s = time.perf_counter() - t
    t = time.perf_counter()
    result = fit_probe(ftr, torch.from_numpy(train[1]), fte, torch.from_numpy(test[1]), classes=classes,
                       seed=seed, **schedule)
    return {**result, "map": list(ftr.shape[1:]), "extract_s": round(extract_s, 1),
            "fit_s": round(time.perf_counter() - t, 1)}


# ---------------------------------------------------------------- encoders
def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def _timm_map(model: nn.Module, res: int | None) -> Callable:
    from fastseed.models import resize, token_map
    prefix = getattr(model, "num_prefix_tokens", 0)
    return lambda x: token_map(model.forward_features(resize(x, res)), prefix)


def _teacher_arch(info) -> str | None:
    return info.get("arch") if isinstance(info, dict) else info


def encoder(row: str, *, side: int, device: torch.device, arch: str = "resnet18", seed: int = 0,
            teacher_side: int | None = None, checkpoint: str | Path | None = None,
            res: int | None = None) -> tuple[Callable, tuple, dict]:
    """(features_fn, (mean, std), what the row records) of a row: raw, init, teacher or checkpoint.
    `res` resizes the mosaic for the init and checkpoint rows (and the teacher, without
    `teacher_side`): a stride-32 net's map of a 64 px 2×2 mosaic is 2×2, one vector per cell,
    where most of a cell is background and the probe's best answer is background everywhere."""
    from fastseed.models import student_channels_last
    if row == "raw":
        return (lambda x: x), TEACHER_MEAN_STD, {"encoder": "pixels"}
    if row == "init":
        from fastseed.models import create_student
        torch.manual_seed(seed)
        model = create_student(arch).eval().to(device)
        if student_channels_last(None, model, side, device):
            model = model.to(memory_format=torch.channels_last)
        return _timm_map(model, res), TEACHER_MEAN_STD, {"encoder": arch, "student_side": res or side}
    if row == "teacher":
        from fastseed.teachers import load_teacher
        bundle = load_teacher(TEACHER, use_head=False)
        bundle.prepare(device, res=teacher_side or res or side)
        return (lambda x: bundle.with_tokens(x)[1]), (bundle.mean, bundle.std), \
            {"encoder": TEACHER, "teacher_side": teacher_side or res or side}
    if row == "checkpoint":
        path = Path(checkpoint)
        if (path / "config.json").is_file():
            from fastseed.export import load_encoder
            module, pre = load_encoder(path)
            mean, std = pre.mean.flatten().tolist(), pre.std.flatten().tolist()
            info = {"encoder": json.loads((path / "config.json").read_text())["architecture"], "trained_res": pre.res}
        else:
            from fastseed.export import read_student
            student = read_student(path)
            module, mean, std = student.backbone, list(student.meta["mean"]), list(student.meta["std"])
            info = {"encoder": student.meta["arch"], "method": student.meta["method"],
                    "step": student.meta["step"], "teacher": _teacher_arch(student.meta.get("teacher")),
                    "trained_res": student.res}
        module = module.eval().to(device)
        return _timm_map(module, res), (tuple(mean), tuple(std)), \
            {**info, "checkpoint": str(checkpoint), "student_side": res or side}
    raise ValueError(f"unknown row {row!r}: {', '.join(ROWS)}, checkpoint")


def probe_row(row: str, dataset: str, work: Path, *, grid: int = 2, side: int = 64,
              n_train: int = SIZES["cpu"]["n_train"], n_test: int = SIZES["cpu"]["n_test"], seed: int = 0,
              device: str = "auto", arch: str = "resnet18",
              teacher_side: int | None = None, checkpoint: str | Path | None = None, res: int | None = None,
              **schedule) -> dict:
    """One row's scores on one mosaic layout: the mosaics (cached), the encoder, the probe."""
    dev = _device(device)
    t = time.perf_counter()
    train, test = mosaic_sets(dataset, work, grid=grid, side=side, n_train=n_train, n_test=n_test, seed=seed)
    mosaic_s = time.perf_counter() - t
    fn, (mean, std), info = encoder(row, side=side, device=dev, arch=arch, seed=seed, teacher_side=teacher_side,
                                    checkpoint=checkpoint, res=res)
    result = probe(fn, train, test, classes=num_classes(dataset), seed=seed, mean=mean, std=std, device=dev,
                   **schedule)
    return {"dataset": dataset, "grid": grid, "side": side, "row": row, **info, "seed": seed,
            "n_train": n_train, "n_test": n_test, "classes": num_classes(dataset), **PROBE, **schedule,
            "mosaic_s": round(mosaic_s, 1), **result, "seconds": round(time.perf_counter() - t, 1)}


def probe_checkpoint(path: str | Path, dataset: str, work: Path, **kw) -> dict:
    """`probe_row` of a trained fastseed student (checkpoint file, run folder's checkpoint, or
    export folder); `kw` as probe_row's (grid, side, n_train, n_test, seed, res, schedule)."""
    return probe_row("checkpoint", dataset, work, checkpoint=path, **kw)


# ---------------------------------------------------------------- CLI
def _key(r: dict) -> tuple:
    return (r["dataset"], r["grid"], r["side"], r["row"], r.get("checkpoint") or r["encoder"], r["seed"],
            r.get("teacher_side"), r["n_train"], r["n_test"])


def table(rows: list[dict]) -> str:
    """One line per row measured: layout, row, encoder, feature map, mIoU and pixel accuracy."""
    lines = ["| dataset | grid / px | row | encoder | map C×h×w | train / test | seed | mIoU % | pixel acc % | s |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        name = r["encoder"] + (f" @ {r['teacher_side']} px" if r.get("teacher_side") else "")
        if r.get("checkpoint"):
            name = f"{r['encoder']} {Path(r['checkpoint']).parent.name or r['checkpoint']}"
        lines.append(f"| {r['dataset']} | {r['grid']}×{r['grid']} / {r['side']} | {r['row']} | {name} | "
                     f"{'×'.join(map(str, r['map']))} | {r['n_train']} / {r['n_test']} | {r['seed']} | "
                     f"{r['miou']:.2f} | {r['pixel_acc']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _side(text: str | None, side: int) -> int:
    """--teacher-side: None -> the mosaic's side; '2x' -> twice it; '128' -> 128 px."""
    if text is None:
        return side
    return round(float(text[:-1]) * side) if text.endswith("x") else int(text)


def _layout(text: str) -> tuple[int, int]:
    grid, _, side = text.partition("x")
    return int(grid), int(side)


def main(argv=None) -> list[dict]:
    from fastseed.provenance import append_row, provenance
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS))
    p.add_argument("--checkpoint", nargs="*", default=[], help="trained students: one row each")
    p.add_argument("--size", choices=SIZES, default="cpu")
    p.add_argument("--layouts", nargs="+", type=_layout, default=list(LAYOUTS),
                   help="GRIDxSIDE, e.g. 2x64 3x96 (the default)")
    p.add_argument("--arch", default="resnet18", help="the init row's student (the demo's)")
    p.add_argument("--teacher-side", default=None,
                   help="the teacher's input side: px, or a multiple of the mosaic's side such as 2x (default 1x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--workdir", default=None, help="mosaics (default: data/dense_probe/, git-ignored)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    size = SIZES[a.size]
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"dense_probe_{a.size}.jsonl")
    work = Path(a.workdir or ROOT / "data" / "dense_probe")
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {_key(r) for r in rows}
    jobs = [(row, None) for row in a.rows] + [("checkpoint", c) for c in a.checkpoint]
    for grid, side in a.layouts:
        for row, ckpt in jobs:
            name = str(ckpt) if ckpt else {"raw": "pixels", "init": a.arch, "teacher": TEACHER}[row]
            teacher_side = _side(a.teacher_side, side) if row == "teacher" else None
            if (a.dataset, grid, side, row, name, a.seed, teacher_side, size["n_train"], size["n_test"]) in done:
                continue
            result = probe_row(row, a.dataset, work, grid=grid, side=side, n_train=size["n_train"],
                               n_test=size["n_test"], seed=a.seed, device=a.device, arch=a.arch,
                               teacher_side=_side(a.teacher_side, side), checkpoint=ckpt, steps=size["steps"])
            result = {**result, "size": a.size, "threads": torch.get_num_threads(), **provenance(_device(a.device))}
            rows.append(result)
            done.add(_key(result))
            print(append_row(out, result), file=sys.stderr)
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
