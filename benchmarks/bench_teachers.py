"""Teacher forward speed: fastseed's DINOv2 ViT-S/14 teacher against a plain timm forward of the same model.

    .venv/bin/python benchmarks/bench_teachers.py --out benchmarks/results/teachers_cpu.jsonl
    .venv/bin/python benchmarks/bench_teachers.py --res 28 --batch 2 --repeats 1   # smoke run
    .venv/bin/pytest benchmarks/bench_teachers.py                                   # pytest-benchmark, tiny

Both sides load the same random-weight file in the official hub layout (dinov2_vits14_pretrain.pth):
fastseed through `load_teacher` (the release's position-embedding resampling, redone each forward),
timm as its own `vit_small_patch14_dinov2` built at `--res` with the file converted by timm's filter
(positions resampled once, at load, timm's way). Both return the CLS embedding, run under
inference mode, on the same device, in the same process, alternating (a busy shared machine slows
both alike); the ratio is fastseed's time over timm's. On CUDA both run in bf16 weights, as a
training run holds its teacher.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from _bench.data import official_dinov2_file
from timm.models.vision_transformer import checkpoint_filter_fn

from fastseed.provenance import append_row, provenance
from fastseed.teachers import load_teacher


def timm_vits14(path: Path, res: int) -> torch.nn.Module:
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=res)
    state = checkpoint_filter_fn(torch.load(path, map_location="cpu"), model)
    model.load_state_dict(state)
    return model.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(*, res=224, batch=32, repeats=5, warmup=1, device="cpu"):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dinov2_vits14_pretrain.pth"
        official_dinov2_file(path)
        ours = load_teacher("dinov2_vits14", str(path), res=res).model
        theirs = timm_vits14(path, res)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    models = {"fastseed": ours.to(device, dtype), "timm": theirs.to(device, dtype)}
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    times = {name: [] for name in models}
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(models["fastseed"](x).float(), models["timm"](x).float()).min()
        for i in range(warmup + repeats):
            for name, model in models.items():
                _sync(device)
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"bench": "teacher_forward", "teacher": "dinov2_vits14", "res": res, "batch": batch, "dtype": str(dtype),
            **provenance(device), "repeats": repeats,
            "fastseed_median_s": med["fastseed"], "timm_median_s": med["timm"],
            "fastseed_images_per_s": batch / med["fastseed"], "timm_images_per_s": batch / med["timm"],
            "ratio_fastseed_over_timm_time": med["fastseed"] / med["timm"],
            # not the same forward: timm resamples the positions its own way (the reason fastseed does not)
            "min_cosine_fastseed_vs_timm": float(cos)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    r = run(res=args.res, batch=args.batch, repeats=args.repeats, device=args.device)
    print(f"dinov2_vits14 at {r['res']} px, batch {r['batch']} on {r['device']}: fastseed "
          f"{r['fastseed_images_per_s']:.1f} img/s, timm {r['timm_images_per_s']:.1f} img/s, time ratio "
          f"{r['ratio_fastseed_over_timm_time']:.3f}")
    append_row(args.out, r)
    return r


def test_teacher_forward_speed(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dinov2_vits14_pretrain.pth"
        official_dinov2_file(path)
        model = load_teacher("dinov2_vits14", str(path), res=56).model.to(device)
    x = torch.randn(4, 3, 56, 56, device=device)

    def once():
        with torch.inference_mode():
            out = model(x)
        _sync(device)
        return out

    assert benchmark.pedantic(once, rounds=3, warmup_rounds=1).shape == (4, 384)


if __name__ == "__main__":
    main()
