"""Deployed students, speed and quality read together: ms per batch and images/s at 224 px,
batch 1 and 32, of PyTorch eager, torch.compile, ONNX Runtime fp32 and ONNX Runtime int8 (static,
calibrated), each row beside the k-NN top-1 of the same backend on real images (Fashion-MNIST).

The students are those of a run of several (`-a a,b,c`, OUTPUT/<arch>/checkpoint_last.pt), here
the demo's SEED setup (bundled ImageNet EfficientNet-Lite0 teacher, 32 px student crops):

    .venv/bin/fastseed-train -a resnet18,efficientnet_b0,mobilenetv3_large_100 --epochs 1 \\
        --max-steps 120 -b 64 --ckpt-every 20 --output output/export-bench
    .venv/bin/python benchmarks/bench_export.py --run output/export-bench     # resumable

The k-NN (k = 20, T = 0.07) runs at the students' training resolution (32 px) on the first
--knn-images of the demo's test beton against as many of its 10k train bank; speed is timed at
--res on random inputs (a CNN's time does not depend on the pixels). The ONNX models are
`fastseed-export`'s (dynamic batch and size; the int8 copy calibrated on --calib-images bank
images). Torch and ONNX Runtime both get the process's torch thread count. The machine may be
shared: every row records the load average before and after it, and `uptime`.

Rows already in --out (arch, backend, batch, res) are skipped when started again; the table is
written beside it with the suffix .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench.rows import Grid
from _bench.tables import markdown

from fastseed.export import beton_images, export, knn_top1, onnx_features, onnx_session, read_student
from fastseed.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("resnet18", "efficientnet_b0", "mobilenetv3_large_100")
BACKENDS = ("eager", "compile", "ort-fp32", "ort-int8")


def timed(fn, x, min_time: float, min_repeats: int) -> list[float]:
    """Seconds per call of fn(x), after two warm-up calls (torch.compile compiles in the first)."""
    for _ in range(2):
        fn(x)
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def backends(student, onnx_dir: Path, threads: int) -> dict:
    """backend -> (features of a normalised NCHW float batch, as a float tensor)."""
    module = student.module
    # static shapes: one graph per input shape (the k-NN's 32 px batches, then each timed batch),
    # as a deployment at a fixed batch size compiles it; automatic dynamic shapes would time the
    # 224 px batches through a shape-generic graph
    compiled = torch.compile(module, dynamic=False)
    fp32, int8 = onnx_session(onnx_dir / "student.onnx", threads), onnx_session(onnx_dir / "student.int8.onnx", threads)

    def torch_fn(m):
        def run(x):
            with torch.inference_mode():
                return m(x)
        return run
    return {"eager": torch_fn(module), "compile": torch_fn(compiled),
            "ort-fp32": lambda x: onnx_features(fp32, x, batch_size=len(x)),
            "ort-int8": lambda x: onnx_features(int8, x, batch_size=len(x))}


def knn(fn, bank, bank_labels, queries, query_labels, batch: int = 250) -> float:
    def feats(images):
        return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])
    return knn_top1(feats(bank), bank_labels, feats(queries), query_labels)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def table(rows: list[dict]) -> str:
    order = {b: i for i, b in enumerate(BACKENDS)}
    rows = sorted(rows, key=lambda r: (ARCHS.index(r["arch"]) if r["arch"] in ARCHS else 9, r["batch"],
                                       order.get(r["backend"], 9)))
    return markdown(["student (steps)", "backend", "batch", "ms / batch (median, min)", "images/s (median)",
                     "k-NN top-1 (32 px)", "load avg 1 min"],
                    [[f"{r['arch']} ({r['step']})", r["backend"], r["batch"],
                      f"{r['ms_per_batch']:.1f}, {r['min_ms']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{r['knn_top1@20']:.2f}", f"{r['loadavg_before'][0]:.1f} → {r['loadavg_after'][0]:.1f}"]
                     for r in rows])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="output/export-bench", help="run folder with OUTPUT/<arch>/checkpoint_last.pt")
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--bank", default="data/fashion_mnist_train_10k.beton")
    p.add_argument("--queries", default="data/fashion_mnist_test.beton")
    p.add_argument("--knn-images", type=int, default=2000)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds timed per row (at least --min-repeats calls)")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_cpu.jsonl"))
    a = p.parse_args(argv)
    out = Path(a.out)
    results = Grid(out, key=lambda r: (r["arch"], r["backend"], r["batch"], r["res"]))
    threads = torch.get_num_threads()
    for arch in a.archs:
        todo = [(c["backend"], c["batch"]) for c in results.todo({"arch": arch, "backend": b, "batch": n, "res": a.res}
                                                                 for b in a.backends for n in a.batches)]
        if not todo:
            continue
        student = read_student(a.run, arch=arch)
        mean, std = student.meta["mean"], student.meta["std"]
        bank = beton_images(a.bank, student.res, mean, std, a.knn_images)
        queries = beton_images(a.queries, student.res, mean, std, a.knn_images)
        with tempfile.TemporaryDirectory() as tmp:
            export(a.run, "onnx", Path(tmp) / "student.onnx", arch=arch, check_data=a.queries, calib_data=a.bank,
                   images=a.calib_images, log=lambda line, arch=arch: print(f"{arch}: {line}", file=sys.stderr))
            fns = backends(student, Path(tmp), threads)
            scores = {}
            for backend, batch in todo:
                fn = fns[backend]
                if backend not in scores:
                    scores[backend] = knn(fn, *bank, *queries)
                x = torch.randn(batch, 3, a.res, a.res, generator=torch.Generator().manual_seed(0))
                load_before = list(os.getloadavg())
                times = timed(fn, x, a.min_time, a.min_repeats)
                ms = statistics.median(times) * 1e3
                row = {"bench": "export", "arch": arch, "backend": backend, "batch": batch, "res": a.res,
                       "ms_per_batch": ms, "images_per_s": batch / ms * 1e3, "repeats": len(times),
                       "min_ms": min(times) * 1e3, "knn_top1@20": scores[backend], "knn_res": student.res,
                       "knn_images": a.knn_images, "step": student.meta["step"],
                       "method": student.meta["method"], "teacher": student.meta["teacher"]["arch"],
                       "threads": threads, "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
                       "uptime": uptime(), **provenance("cpu")}
                results.add(row)
    rows = results.rows
    text = table(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
