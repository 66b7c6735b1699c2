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
  stamps: the colour cut-outs of benchmarks/_bench/stamps.py (its `CLASSES`, `cutouts`, `split` with
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
from pathlib import Path

import torch
from _bench.probe import DATASETS, LAYOUTS, ROWS, SIZES, TEACHER, device_of, probe_row
from _bench.rows import Grid
from _bench.tables import markdown

ROOT = Path(__file__).resolve().parent.parent


def _key(r: dict) -> tuple:
    return (r["dataset"], r["grid"], r["side"], r["row"], r.get("checkpoint") or r["encoder"], r["seed"],
            r.get("teacher_side"), r["n_train"], r["n_test"])


def table(rows: list[dict]) -> str:
    """One line per row measured: layout, row, encoder, feature map, mIoU and pixel accuracy."""
    def encoder(r):
        if r.get("checkpoint"):
            return f"{r['encoder']} {Path(r['checkpoint']).parent.name or r['checkpoint']}"
        return r["encoder"] + (f" @ {r['teacher_side']} px" if r.get("teacher_side") else "")

    return markdown(["dataset", "grid / px", "row", "encoder", "map C×h×w", "train / test", "seed", "mIoU %",
                     "pixel acc %", "s"],
                    [[r["dataset"], f"{r['grid']}×{r['grid']} / {r['side']}", r["row"], encoder(r),
                      "×".join(map(str, r["map"])), f"{r['n_train']} / {r['n_test']}", r["seed"], f"{r['miou']:.2f}",
                      f"{r['pixel_acc']:.2f}", f"{r['seconds']:.0f}"] for r in rows], "llllllrrrr")


def _side(text: str | None, side: int) -> int:
    """--teacher-side: None -> the mosaic's side; '2x' -> twice it; '128' -> 128 px."""
    if text is None:
        return side
    return round(float(text[:-1]) * side) if text.endswith("x") else int(text)


def _layout(text: str) -> tuple[int, int]:
    grid, _, side = text.partition("x")
    return int(grid), int(side)


def main(argv=None) -> list[dict]:
    from fastseed.provenance import provenance
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
    results = Grid(out, key=_key)
    jobs = [(row, None) for row in a.rows] + [("checkpoint", c) for c in a.checkpoint]
    cells = ({"dataset": a.dataset, "grid": grid, "side": side, "row": row, "checkpoint": ckpt and str(ckpt),
              "encoder": {"raw": "pixels", "init": a.arch, "teacher": TEACHER, "checkpoint": None}[row],
              "seed": a.seed, "teacher_side": _side(a.teacher_side, side) if row == "teacher" else None,
              "n_train": size["n_train"], "n_test": size["n_test"]}
             for grid, side in a.layouts for row, ckpt in jobs)
    for cell in results.todo(cells):
        result = probe_row(cell["row"], a.dataset, work, grid=cell["grid"], side=cell["side"], n_train=size["n_train"],
                           n_test=size["n_test"], seed=a.seed, device=a.device, arch=a.arch,
                           teacher_side=_side(a.teacher_side, cell["side"]), checkpoint=cell["checkpoint"],
                           steps=size["steps"])
        results.add({**result, "size": a.size, "threads": torch.get_num_threads(), **provenance(device_of(a.device))})
    rows = results.rows
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
