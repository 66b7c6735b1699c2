"""k-NN evaluation speed: a 50k-row bank against 10k queries of dimension 512, k in (1, 20, 200).

    .venv/bin/python benchmarks/bench_knn.py            # full size on CUDA, tiny on CPU
    .venv/bin/python benchmarks/bench_knn.py --full --out benchmarks/results/knn.json
    .venv/bin/pytest benchmarks/bench_knn.py            # pytest-benchmark, tiny on CPU

Target on one H100: the full size in under 1 s. The time covers normalisation, the chunked
similarity matmuls, top-k, the votes and the single host sync at the end; features are already
on the device (as `extract_features` leaves them).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastseed.evaluate import knn_classify
from fastseed.provenance import append_row, provenance

FULL = dict(n_train=50_000, n_test=10_000, dim=512, classes=1000)
TINY = dict(n_train=5_000, n_test=1_000, dim=512, classes=100)


def make_features(n_train, n_test, dim, classes, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g).to(device)
    test = torch.randn(n_test, dim, generator=g).to(device)
    train_y = torch.randint(0, classes, (n_train,), generator=g).to(device)
    test_y = torch.randint(0, classes, (n_test,), generator=g).to(device)
    return train, train_y, test, test_y


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(*, n_train, n_test, dim, classes, device, chunk_size=1024, repeats=5, warmup=1):
    feats = make_features(n_train, n_test, dim, classes, device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        result = knn_classify(*feats, ks=(1, 20, 200), num_classes=classes, chunk_size=chunk_size)
        _sync(device)  # knn_classify already syncs once (.item()); this keeps timing honest
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "bench": "knn_classify", "n_train": n_train, "n_test": n_test, "dim": dim,
        "classes": classes, "chunk_size": chunk_size, **provenance(device), "repeats": repeats,
        "median_s": statistics.median(times), "min_s": min(times), "result": result,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="full size even on CPU (slow)")
    p.add_argument("--tiny", action="store_true", help="tiny size even on CUDA")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    size = FULL if args.full or (on_cuda and not args.tiny) else TINY
    res = run(**size, device=args.device, chunk_size=args.chunk_size, repeats=args.repeats)
    print(f"knn {res['n_train']}x{res['n_test']} d={res['dim']} on {res['device']}: "
          f"median {res['median_s'] * 1e3:.1f} ms (min {res['min_s'] * 1e3:.1f} ms)")
    append_row(args.out, res)
    return res


def test_knn_speed(benchmark):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = FULL if device == "cuda" else dict(n_train=2_000, n_test=500, dim=512, classes=100)
    feats = make_features(**size, device=device)

    def once():
        out = knn_classify(*feats, ks=(1, 20, 200), num_classes=size["classes"])
        _sync(device)
        return out

    result = benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    assert set(result) == {"knn_top1@1", "knn_top1@20", "knn_top1@200"}
    assert all(0.0 <= v <= 100.0 for v in result.values())


if __name__ == "__main__":
    main()
