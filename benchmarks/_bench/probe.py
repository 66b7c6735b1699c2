"""The dense probe: mosaics of real items with per-pixel masks (fashion-mnist, stamps), the
encoders whose last feature map is probed (raw pixels, a random-init student, the bundled
teacher, a trained fastseed student) and the linear probe's mIoU and pixel accuracy.
benchmarks/dense_probe.py describes the mosaics, the probe and the rows, and scores them;
defaults_study.py and recipes_lightly.py probe their students with the same functions.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
    # imported on use: only --dataset stamps needs it (and its PIL)
    from _bench import stamps
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
def device_of(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def timm_map(model: nn.Module, res: int | None) -> Callable:
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
        return timm_map(model, res), TEACHER_MEAN_STD, {"encoder": arch, "student_side": res or side}
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
        return timm_map(module, res), (tuple(mean), tuple(std)), \
            {**info, "checkpoint": str(checkpoint), "student_side": res or side}
    raise ValueError(f"unknown row {row!r}: {', '.join(ROWS)}, checkpoint")


def probe_row(row: str, dataset: str, work: Path, *, grid: int = 2, side: int = 64,
              n_train: int = SIZES["cpu"]["n_train"], n_test: int = SIZES["cpu"]["n_test"], seed: int = 0,
              device: str = "auto", arch: str = "resnet18",
              teacher_side: int | None = None, checkpoint: str | Path | None = None, res: int | None = None,
              **schedule) -> dict:
    """One row's scores on one mosaic layout: the mosaics (cached), the encoder, the probe."""
    dev = device_of(device)
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
