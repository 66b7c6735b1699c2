"""Fused SEED loss, forward+backward: time, peak extra memory and accuracy against its peers.

    .venv/bin/python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json
    .venv/bin/pytest benchmarks/bench_kernels.py --benchmark-only

Peers, measured in the same run on the same inputs: the eager reference
(fastseed.kernels.reference.seed_loss), torch.compile of it, and the two-pass attention
formulation L = LSE(a) − ŝ·v/τS with v = softmax(b)·Q̃ (two scaled_dot_product_attention
calls; see `sdpa_seed_loss`). On CUDA the grid is B ∈ {128, 256, 1024} × K ∈ {4096, 16384,
65536}, D=128 (--dim), bf16 student/teacher/queue, τS=0.2, τT=1e-4; on CPU one tiny size.

Roofline floors, from the device's dense bf16 peak and memory bandwidth (the queue read at
least twice, forward and backward; a floor is max(FLOP/peak, bytes/bandwidth)):
  math       8·B·K·D FLOP: the four B×K×D GEMM passes the loss needs (student and teacher
             logits forward; student logits and dS backward);
  algorithm  what the kernels on the dispatched path issue to the tensor cores
             (fastseed.kernels.seed_loss.algorithm_flops): 12·B·K·D on the fused path (the
             teacher dot as hi+lo, v accumulated forward), 14·B·K·D on the D-tiled one.
"of math" / "of alg." are floor/time. On CUDA, --dim above 128 runs the D-tiled path
(e.g. --dim 2048, a ResNet-50 teacher's width).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _bench.tables import markdown

import fastseed.kernels as fk
from fastseed.kernels import reference
from fastseed.kernels.seed_loss import algorithm_flops
from fastseed.provenance import provenance

D = 128
TEMPS = dict(student_temp=0.2, teacher_temp=1e-4)
CUDA_GRID = [(b, k) for b in (128, 256, 1024) for k in (4096, 16384, 65536)]
CPU_GRID = [(8, 512)]

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s and memory bandwidth in TB/s, from the
# vendors' data sheets. Matched by substring of torch.cuda.get_device_name, first match wins.
PEAKS = [
    ("H200", 989.4, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100 NVL", 835.0, 3.9),
    ("H100", 989.4, 3.35),  # SXM
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100", 312.0, 1.555),
]


def device_peak(device) -> tuple[float, float] | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops, tbps in PEAKS:
        if key in name:
            return tflops * 1e12, tbps * 1e12
    return None


def floor_seconds(flops, k, d, queue_bytes, peak) -> float | None:
    if peak is None:
        return None
    peak_flops, bandwidth = peak
    return max(flops / peak_flops, 2 * k * d * queue_bytes / bandwidth)


def sdpa_seed_loss(student, teacher, queue, *, student_temp=0.2, teacher_temp=1e-4):
    """The two-pass attention formulation, computed in the queue's dtype.

    Keys = values = [e_D; Q_1 … Q_K; e_(D+1)] (padded to D+8): the extra dimension D carries
    column 0 (the query puts t̂·t̂ = 1 or ŝ·t̂ there, so b_0 = 1/τT, a_0 = ŝ·t̂/τS, and the
    output's dimension D is the weight of column 0); dimension D+1 is a sink with logit C
    whose output weight z gives LSE(a) = C + log((1−z)/z), which SDPA does not return.
    No attention backward is needed: ∂L/∂ŝ = (softmax(a)·Q̃ − v)/τS, both from forward outputs.
    """
    b, d = student.shape
    dt = queue.dtype
    e = d + 8
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.detach().float(), dim=1)
    with torch.no_grad():
        keys = torch.zeros(queue.shape[0] + 2, e, dtype=dt, device=queue.device)
        keys[1:-1, :d] = queue
        keys[0, d] = 1
        keys[-1, d + 1] = 1
        # Sink logit C ≈ LSE(a) keeps z = O(1/K); C·τS is rounded to the query dtype first so
        # that the logit SDPA sees is exactly C.
        sink_q = float(torch.tensor(torch.log(torch.tensor(queue.shape[0] + 1.0)).item() * student_temp).to(dt))
        sink = sink_q / student_temp
        qt = torch.zeros(b, e, dtype=torch.float32, device=queue.device)
        qt[:, :d], qt[:, d], qt[:, d + 1] = t, 1.0, -1e4 * teacher_temp  # sink logit −1e4
        out_t = F.scaled_dot_product_attention(qt.to(dt)[None, None], keys[None, None], keys[None, None],
                                               scale=1.0 / teacher_temp)[0, 0].float()
        v = out_t[:, :d] + out_t[:, d:d + 1] * t
        qs = torch.zeros(b, e, dtype=torch.float32, device=queue.device)
        qs[:, :d], qs[:, d], qs[:, d + 1] = s, (s * t).sum(1), sink_q
        out_s = F.scaled_dot_product_attention(qs.to(dt)[None, None], keys[None, None], keys[None, None],
                                               scale=1.0 / student_temp)[0, 0].float()
        z = out_s[:, d + 1]
        o = (out_s[:, :d] + out_s[:, d:d + 1] * t) / (1 - z)[:, None]
        lse = sink + torch.log((1 - z) / z)
    so = (s * o).sum(1)
    rows = lse + (so - so.detach()) / student_temp - (s * v).sum(1) / student_temp
    return rows.mean()


def impls(device):
    return {
        "fused": fk.seed_loss,
        "eager": reference.seed_loss,
        "compiled": torch.compile(reference.seed_loss),
        "sdpa": sdpa_seed_loss,
    }


def make_inputs(b, k, d, device, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, d, generator=g).to(device, dtype).requires_grad_()
    t = torch.randn(b, d, generator=g).to(device, dtype)
    q = F.normalize(torch.randn(k, d, generator=g), dim=1).to(device, dtype)
    return s, t, q


def step(fn, s, t, q):
    s.grad = None
    loss = fn(s, t, q, **TEMPS)
    loss.backward()
    return loss


def time_step(fn, s, t, q, device, reps) -> float:
    """Seconds per forward+backward (median)."""
    if torch.device(device).type == "cuda":
        import triton.testing
        return triton.testing.do_bench(lambda: step(fn, s, t, q), grad_to_none=[s],
                                       return_mode="median") * 1e-3
    step(fn, s, t, q)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(fn, s, t, q)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn, s, t, q, device) -> int | None:
    """Peak memory allocated during one forward+backward beyond what was live before it."""
    if torch.device(device).type != "cuda":
        return None
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, s, t, q)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def accuracy(fn, s, t, q):
    """(loss relative error, gradient cosine) against the float64 reference."""
    loss = step(fn, s, t, q).item()
    grad = s.grad.double().flatten()
    s64 = s.detach().double().requires_grad_()
    want = reference.seed_loss(s64, t.double(), q.double(), **TEMPS)
    want.backward()
    cos = F.cosine_similarity(grad, s64.grad.flatten(), dim=0).item()
    return abs(loss - want.item()) / abs(want.item()), cos


def run(device, grid, names, reps=5, d=D):
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    peak = device_peak(device)
    fns = impls(device)
    rows = []
    for b, k in grid:
        s, t, q = make_inputs(b, k, d, device, dtype)
        flops = {"math": 8 * b * k * d, "algorithm": algorithm_flops(b, k, d, q.dtype)}
        floors = {name: floor_seconds(f, k, d, q.element_size(), peak) for name, f in flops.items()}
        eager_t = eager_mem = None
        for name in names:
            fn = fns[name]
            err, cos = accuracy(fn, s, t, q)
            sec = time_step(fn, s, t, q, device, reps)
            mem = peak_extra_bytes(fn, s, t, q, device)
            if name == "eager":
                eager_t, eager_mem = sec, mem
            rows.append(dict(B=b, K=k, D=d, impl=name, us=sec * 1e6, peak_extra_bytes=mem,
                             loss_rel_err=err, grad_cos=cos, flops_math=flops["math"],
                             flops_algorithm=flops["algorithm"],
                             floor_math_us=None if floors["math"] is None else floors["math"] * 1e6,
                             floor_algorithm_us=None if floors["algorithm"] is None else floors["algorithm"] * 1e6,
                             of_math_floor=None if floors["math"] is None else floors["math"] / sec,
                             of_algorithm_floor=None if floors["algorithm"] is None else floors["algorithm"] / sec))
        for row in rows:
            if row["B"] == b and row["K"] == k:
                row["x_vs_eager"] = eager_t / (row["us"] * 1e-6) if eager_t else None
                row["mem_vs_eager"] = (row["peak_extra_bytes"] / eager_mem
                                       if eager_mem and row["peak_extra_bytes"] is not None else None)
    return rows


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def table(rows) -> str:
    def cells(r):
        mib = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        pct = None if r.get("mem_vs_eager") is None else 100 * r["mem_vs_eager"]
        return [r["B"], r["K"], r["D"], r["impl"], f"{r['us']:.1f}", _fmt(r.get("x_vs_eager"), ".2f"), _fmt(mib, ".2f"),
                _fmt(pct, ".2f"), f"{r['loss_rel_err']:.1e}", f"{r['grad_cos']:.5f}",
                f"{_fmt(r['floor_math_us'], '.1f')} / {_fmt(r['floor_algorithm_us'], '.1f')}",
                f"{_fmt(r['of_math_floor'], '.0%')} / {_fmt(r['of_algorithm_floor'], '.0%')}"]
    return markdown(["B", "K", "D", "impl", "fwd+bwd µs", "× vs eager", "peak extra MiB", "% of eager mem",
                     "loss rel err", "grad cos", "floor µs (math / alg.)", "of math / alg. floor"], map(cells, rows))


def environment(device) -> dict:
    on_cuda = torch.device(device).type == "cuda"
    peak = device_peak(device)
    return provenance(device) | {
        "cpu_kernels": None if on_cuda else fk.cpu_backend(),
        "peak_bf16_flops": None if peak is None else peak[0],
        "peak_bandwidth": None if peak is None else peak[1],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default="fused,eager,compiled,sdpa", help="comma-separated subset")
    p.add_argument("--sizes", help="B:K pairs, e.g. 256:65536,128:4096 (default: grid for the device)")
    p.add_argument("--dim", type=int, default=D, help="embedding width D (default 128; 2048 runs the tiled path)")
    p.add_argument("--reps", type=int, default=5, help="timed repeats on CPU (CUDA uses do_bench)")
    p.add_argument("--threads", type=int, help="torch CPU threads (a shared CPU times better with 1)")
    p.add_argument("--out", help="write the environment and rows as JSON to this path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes:
        grid = [tuple(int(x) for x in pair.split(":")) for pair in args.sizes.split(",")]
    else:
        grid = CUDA_GRID if torch.device(args.device).type == "cuda" else CPU_GRID
    rows = run(args.device, grid, args.impls.split(","), args.reps, args.dim)
    env = environment(args.device)
    print(f"fused SEED loss fwd+bwd, D={args.dim}, {env['device']}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']}\n")
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    return rows


_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["fused", "eager", "compiled", "sdpa"])
@pytest.mark.parametrize("b,k", CUDA_GRID if _DEVICE == "cuda" else CPU_GRID)
def test_seed_loss_fwd_bwd(benchmark, impl, b, k):
    s, t, q = make_inputs(b, k, D, _DEVICE, torch.bfloat16 if _DEVICE == "cuda" else torch.float32)
    fn = impls(_DEVICE)[impl]
    step(fn, s, t, q)  # compile / autotune outside the timed rounds

    def once():
        loss = step(fn, s, t, q)
        if _DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = benchmark.pedantic(once, rounds=20 if _DEVICE == "cuda" else 3, warmup_rounds=2)
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(fn, s, t, q, _DEVICE)
    assert torch.isfinite(loss)


if __name__ == "__main__":
    main()
