"""End-to-end distillation throughput (images/s), three ways in one run, per teacher->student pair:

  official   the official SEED recipe: fp16 autocast + GradScaler, NCHW, eager, the literal
             loss over B x (K+1) logits, an enqueue that reads the queue pointer on the host
             (a sync per step), torchvision ImageFolder + DataLoader with PIL augmentation
  synthetic  fastseed's step (bf16, channels-last, compile, fused loss, sync-free enqueue) on
             uint8 batches already on the device: the compute limit
  fastseed   the same step fed by fastseed's FFCV loader from a .beton of the same JPEGs

    python benchmarks/bench_train.py --out benchmarks/results/train.json          # CUDA: full size
    python benchmarks/bench_train.py --pairs resnet50:resnet18 --steps 10 --warmup 4   # a subset, a short window
    python benchmarks/bench_train.py --tiny                                       # CPU: seconds
Also a pytest-benchmark test (tiny on CPU) so that CI exercises every path.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _bench.data import DINO_TIMM, jpeg_set, shm_prefetch, teacher_checkpoint
from _bench.tables import markdown

from fastseed.provenance import provenance

PAIRS = [("resnet50", "resnet18"), ("resnet50", "efficientnet_b0"), ("resnet50", "mobilenetv3_large_100")]
TINY_PAIRS = [("resnet10t", "resnet10t")]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step_fn, steps: int, warmup: int, device, batch: int) -> float:
    for _ in range(warmup):
        step_fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


# ------------------------------------------------------------------ official-style loop
def official_loop(teacher_arch, student_arch, image_dir, *, batch, res, queue, steps, warmup, workers, device):
    import timm
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from fastseed.kernels.reference import seed_loss

    aug = T.Compose([
        T.RandomResizedCrop(res, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23 if res >= 224 else 3, (0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    workers, prefetch, note = shm_prefetch(workers, batch * 3 * res * res * 4, want=2)
    if note:
        print(f"official loop's loader: {note}", flush=True)
    loader = torch.utils.data.DataLoader(ImageFolder(str(image_dir), aug), batch_size=batch, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0, prefetch_factor=prefetch)
    teacher = (timm.create_model(DINO_TIMM[teacher_arch], num_classes=0, img_size=res) if teacher_arch in DINO_TIMM
               else timm.create_model(teacher_arch, num_classes=128)).to(device).eval()
    student = timm.create_model(student_arch, num_classes=0)
    head = torch.nn.Sequential(torch.nn.Linear(student.num_features, student.num_features), torch.nn.ReLU(),
                               torch.nn.Linear(student.num_features, 128))
    model = torch.nn.Sequential(student, head).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    dim = 128 if teacher_arch not in DINO_TIMM else teacher.num_features
    if dim != 128:  # the student's head regresses into the teacher's space
        head[-1] = torch.nn.Linear(student.num_features, dim).to(device)
    q = F.normalize(torch.randn(queue, dim, device=device), dim=1)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    it = iter(loader)

    def step():
        nonlocal it
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            with torch.no_grad():
                t = teacher(x)
            s = model(x)
            loss = seed_loss(s.float(), t.float(), q, student_temp=0.2, teacher_temp=1e-4)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():  # the official enqueue: pointer read on the host every step
            p = int(ptr)
            n = min(t.shape[0], queue - p)
            q[p:p + n] = F.normalize(t[:n].float(), dim=1)
            ptr[0] = (p + n) % queue

    return _timed(step, steps, warmup, device, batch)


# ------------------------------------------------------------------ fastseed
def fastseed_run(teacher_ckpt, teacher_arch, student_arch, beton, *, batch, res, queue, steps, warmup,
                 workers, device, compile_):
    from fastseed.config import Config
    from fastseed.train import prepare, train_step

    cfg = Config(method="seed", arch=student_arch, teacher_arch=teacher_arch, distill=str(teacher_ckpt),
                 teacher_use_head=teacher_arch not in DINO_TIMM, data=str(beton), res=res, batch_size=batch,
                 queue_size=queue, workers=workers, device=device.type, compile="on" if compile_ else "off",
                 output=tempfile.mkdtemp(), progress=False, epochs=10**6)
    run = prepare(cfg)
    run.students.train()
    g = torch.Generator(device).manual_seed(0)
    synthetic = [torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, device=device, generator=g)]
    counter = {"step": 0}

    def synthetic_step():
        train_step(run, synthetic, counter["step"])
        counter["step"] += 1

    it = iter(run.loader)

    def loader_step():
        nonlocal it
        try:
            views, _ = next(it)
        except StopIteration:
            it = iter(run.loader)
            views, _ = next(it)
        train_step(run, views, counter["step"])
        counter["step"] += 1

    syn = _timed(synthetic_step, steps, warmup, device, batch)
    real = _timed(loader_step, steps, warmup, device, batch)
    return syn, real


def run_all(tiny: bool, out: str | None = None, steps: int | None = None, workers: int | None = None,
            pairs: list[tuple[str, str]] | None = None, warmup: int | None = None, data_dir: str | None = None,
            on_row=None) -> dict:
    """`pairs` (teacher, student) default to all; `data_dir` keeps the JPEGs and their beton for
    a later run (`_bench.data.jpeg_set`); `on_row(row)` sees each pair's row as it is measured."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    pairs = pairs or (TINY_PAIRS if tiny else PAIRS)
    batch, res, queue = (16, 32, 256) if tiny else (256, 224, 65536)
    steps = steps or (3 if tiny else 30)
    warmup = warmup if warmup is not None else (1 if tiny else 10)
    workers = workers if workers is not None else (2 if tiny else min(16, len(os.sched_getaffinity(0))))
    n_images = batch * (steps + warmup + 1)  # one epoch: no epoch restart inside the timed window
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images, beton = jpeg_set(Path(data_dir or tmp), n_images, 64 if tiny else 400, compress=True,
                                 workers=workers)
        for teacher_arch, student_arch in pairs:
            ckpt = teacher_checkpoint(teacher_arch, Path(tmp) / f"{teacher_arch}.pth")
            official = official_loop(teacher_arch, student_arch, images, batch=batch, res=res, queue=queue,
                                     steps=steps, warmup=warmup, workers=workers, device=device)
            syn, real = fastseed_run(ckpt, teacher_arch, student_arch, beton, batch=batch, res=res, queue=queue,
                                     steps=steps, warmup=warmup, workers=workers, device=device,
                                     compile_=device.type == "cuda")
            rows.append({"pair": f"{teacher_arch}->{student_arch}", "official_img_s": official,
                         "synthetic_img_s": syn, "fastseed_img_s": real, "speedup_vs_official": real / official,
                         "loader_vs_synthetic": real / syn})
            if on_row is not None:
                on_row(rows[-1])
    result = {"env": provenance(), "batch": batch, "res": res, "queue": queue, "steps": steps, "warmup": warmup,
              "workers": workers, "rows": rows}
    print(table(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        Path(out).with_suffix(".md").write_text(table(result) + "\n")
    return result


def table(result: dict) -> str:
    e = result["env"]
    rows = [[r["pair"], f"{r['official_img_s']:.0f}", f"{r['synthetic_img_s']:.0f}", f"{r['fastseed_img_s']:.0f}",
             f"{r['speedup_vs_official']:.2f}x", f"{r['loader_vs_synthetic']:.0%}"] for r in result["rows"]]
    return "\n".join([f"device {e['device']} ({e['cpu_count']} CPUs), torch {e['torch']}, triton {e['triton']}, "
                      f"commit {e['commit']}; batch {result['batch']}, {result['res']} px, K={result['queue']}, "
                      f"{result['steps']} timed steps, {result['workers']} workers", "",
                      markdown(["pair", "official img/s", "fastseed synthetic img/s", "fastseed img/s", "vs official",
                                "loader / synthetic"], rows, "lrrrrr")])


def test_train_throughput_tiny(benchmark):
    result = benchmark.pedantic(run_all, kwargs={"tiny": True}, rounds=1, iterations=1)
    for r in result["rows"]:
        assert r["official_img_s"] > 0 and r["synthetic_img_s"] > 0 and r["fastseed_img_s"] > 0


def _pair(text: str) -> tuple[str, str]:
    teacher, student = text.split(":")
    return teacher, student


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized run (default when there is no GPU)")
    ap.add_argument("--pairs", type=_pair, nargs="+", metavar="TEACHER:STUDENT", help="a subset (default: all)")
    ap.add_argument("--steps", type=int, help="timed steps per loop")
    ap.add_argument("--warmup", type=int, help="untimed steps before them (compile, cuDNN autotune)")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--data-dir", help="keep the JPEGs and the beton here, reused by a later run")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    return run_all(a.tiny or not torch.cuda.is_available(), a.out, a.steps, a.workers, a.pairs, a.warmup, a.data_dir)


if __name__ == "__main__":
    main()
