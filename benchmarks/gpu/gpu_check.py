"""The GPU check: every GPU measurement of fastseed, planned to fit a 15-minute GPU window.

    python3 benchmarks/gpu/gpu_check.py --call 1        # the GPU machine, first call (carry .whl/); then --call 2
    python3 benchmarks/gpu/gpu_check.py --steps c,f     # only these steps (a rerun)
    python3 benchmarks/gpu/gpu_check.py --plan          # the plan below, with each step's cap and why
    .venv/bin/python benchmarks/gpu/gpu_check.py --dry  # any CPU, tiny sizes, every call (`make gpu-check-dry`; CI)

The window: 15 minutes of device time for the whole task, the machine's start (a minute or more)
and its idle time between calls counted, at most 10 minutes a command. The plan (CALLS) splits
the steps into calls ordered by what their figures are worth: call 1 the correctness of the
fused kernels and their figures, call 2 end to end with one teacher -> student pair and the demo,
call 3 the rest, only in a window with time left. Calls 1 and 2 with the start fit ~12 minutes
even when every step runs to its cap; each call stops starting steps at its budget, and each
step is killed with its children at its cap (Step.cap_s, each with its reason; the expected
times are estimates for the H200 until a run replaces them).

First it installs, with pip and no index, the carried wheels (`.whl/*.whl` from `make
gpu-wheels`: ffcv, the EfficientNet-Lite0 weights) and then this tree into a scratch folder
(`--target`: the machine's torch, triton, timm, numba and numpy stay as they are), unpacks
the carried Triton cache (`.whl/triton-cache.tar.xz`) into the scratch folder for
TRITON_CACHE_DIR (see prepare_triton_cache) and points FASTSEED_FASHION_MNIST at
`.whl/fashion-mnist`. On the GPU machine the scratch folder is /tmp/fastseed-gpu-check, so that a
later call on the same warm machine reuses the install (same tree and wheels), the JPEGs and
torch.compile's on-disk cache. Each step runs in a process of its own, started outside the tree
(so that only the installed copy can be imported), its output streamed to OUT/gpu_check.log as
it runs; its measurements are appended to OUT/gpu_check.jsonl case by case (a test run's tests
one by one, through gpu_pytest.py), and OUT/summary.md is written again after each step: a cap
or a crash keeps what came before, and a failed step records its error while the check goes on.
OUT is --out, else $OUT, else benchmarks/results/gpu_check/ (the dry run: build/gpu_check_dry/).
Every Triton lookup of the steps is logged (triton_lookups.py), and the summary ends with the
kernels the carried cache served and those compiled during the check. What torch.compile
compiled is saved to OUT/compile-cache/ (compile_cache.py): carry it as .whl/compile-cache/ to a
later window.

The dry run is the same script on the CPU at tiny sizes, every call in one go, with the same
install: the carried wheels that this interpreter can install (the ffcv wheel is a cp312 build;
CI has Python 3.11 and no .whl/: its status line says which were not installed, and the
interpreter's own ffcv and weights serve), the Triton cache unpacked when one is carried. The
CUDA-only parts record "skipped: no CUDA". `make gpu-rehearse` (gpu_rehearse.py) runs it under
the GPU machine's Python 3.12 and versions, where every carried wheel installs.

Adding a step: write `def step_x(ctx) -> dict` (what it measured; `ctx.record(row=...)` keeps a
row as it goes, `"table"` in the returned dict is shown in the summary, `"failed"` says what
failed while the rest of the result is kept, `"note"` is added to its status line; an exception
fails it too) and add a `Step` to STEPS with its expected time on the H200, its cap and why,
and its call in CALLS. A step that runs a benchmark another change adds names it in `needs=`:
until that file exists the step is skipped with a note.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent  # benchmarks/gpu: this tool's modules (compile_cache, gpu_pytest, ...)
BENCHMARKS = HERE.parent                 # the benchmark scripts the steps run, and their _bench
ROOT = BENCHMARKS.parent
WHEELS = ROOT / ".whl"
CACHE_ARCHIVE = WHEELS / "triton-cache.tar.xz"  # make gpu-wheels: kernels compiled ahead for sm_90
COMPILE_CACHE = WHEELS / "compile-cache"        # a previous window's OUT/compile-cache/, carried
JSONL, LOG, SUMMARY = "gpu_check.jsonl", "gpu_check.log", "summary.md"
DEVICE_SCRATCH = Path("/tmp/fastseed-gpu-check")  # kept between the calls of a warm machine
INSTALLED = ".fastseed-install.json"             # in the install: the tree and wheels it holds
WIDTHS = (128, 1280, 2048)  # SEED's projection, EfficientNet-Lite0's and ResNet-50's pooled features
# the fused ops against the float64 oracle: the bounds of tests/test_kernels.py's CUDA cases
LOSS_REL_ERR, GRAD_COS = 1e-2, 0.999


# ---------------------------------------------------------------- what a step sees
@dataclass
class Ctx:
    step: str
    dry: bool
    out: Path      # the results folder
    scratch: Path  # files the steps share: JPEGs, betons, the demo's data
    site: Path     # the offline install
    run_id: str
    all_tests: bool = False  # d: every CUDA case of tests/test_gpu.py, not NO_HOST_SYNC_CASES

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def record(self, **fields) -> None:
        append_json(self.out / JSONL, {"run": self.run_id, "step": self.step, **fields})

    def workers(self) -> int:
        return 2 if self.dry else min(16, len(os.sched_getaffinity(0)))


def append_json(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def benchmark(name: str):
    """benchmarks/<name>.py loaded as a module, once per process: a step calls the benchmark
    scripts' functions (main, run_all, ...) in its own process. The GPU check drives them; they
    share code through _bench and never import one another."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as an import would: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return "–" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows])


# ---------------------------------------------------------------- the steps
def step_environment(ctx: Ctx) -> dict:
    """GPU, driver, versions, commit; and that fastseed imports from the offline install."""
    import importlib.metadata as md
    import platform

    import torch

    import fastseed
    import fastseed.data_prep
    import fastseed.kernels

    where = {m.__name__: Path(m.__file__).parent for m in (fastseed, fastseed.kernels, fastseed.data_prep)}
    outside = [name for name, path in where.items() if not path.is_relative_to(ctx.site)]
    if outside:
        raise RuntimeError(f"{', '.join(outside)} import from outside the offline install {ctx.site}")
    info = {"commit": source_commit(), "python": platform.python_version(), "glibc": platform.libc_ver()[1],
            "cores": len(os.sched_getaffinity(0)), "fastseed": str(where["fastseed"])}
    for name in ("torch", "torchvision", "triton", "timm", "numba", "numpy", "ffcv", "opencv-python-headless"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    try:
        import ffcv
        info["ffcv_from"] = "the install (carried wheel)" if Path(ffcv.__file__).is_relative_to(ctx.site) else \
            f"the interpreter ({Path(ffcv.__file__).parent})"
    except ImportError as e:
        info["ffcv_from"] = f"nowhere: {e}"
    info |= shm_info(ctx)
    notes = []
    cache_note = triton_cache_match(triton_fingerprint(), os.environ.get("TRITON_CACHE_DIR"))
    info["triton_cache_match"] = cache_note
    if not cache_note.startswith(("matches", "no ")):
        notes.append(cache_note)
        print(f"WARNING: {cache_note}", flush=True)
    cache = os.environ.get("TRITON_CACHE_DIR")
    info["triton_cache"] = f"{cache} ({len(os.listdir(cache))} entries)" if cache and os.path.isdir(cache) else None
    from triton import knobs
    manager = knobs.cache.manager_class  # imports it: a step's Triton compile would fail the same way
    info["triton_cache_manager"] = manager and f"{manager.__module__}.{manager.__name__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "sm": f"{props.major}{props.minor}",
                 "gpu_memory_gib": round(props.total_memory / 2**30), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "driver": _driver()}
    elif not ctx.dry:
        raise RuntimeError("no CUDA device visible to torch")
    return info | {"table": md_table(["what", "value"], [[k, v] for k, v in info.items()]),
                   "note": "; ".join(notes) or None}


FINGERPRINT_CODE = r"""
import hashlib, json, pathlib, triton
def fingerprint():
    root = pathlib.Path(triton.__file__).parent
    lib = next(iter(sorted(root.glob("_C/libtriton*.so"))), None)
    h = hashlib.sha256()
    if lib is not None:
        with open(lib, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        ptxas = get_ptxas_version(90).strip().splitlines()[-1]
    except Exception as e:
        ptxas = f"unknown ({type(e).__name__})"
    try:
        from triton.runtime.cache import triton_key
        key = hashlib.sha256(triton_key().encode()).hexdigest()
    except Exception as e:
        key = f"unknown ({type(e).__name__})"
    return {"triton": triton.__version__, "libtriton_sha256": h.hexdigest() if lib else None,
            "ptxas": ptxas, "triton_key_sha256": key}
if __name__ == "__main__":
    print(json.dumps(fingerprint()))
"""


def triton_fingerprint() -> dict:
    """What Triton's cache key holds of the install: the triton version, the sha256 of
    libtriton.so, the sm_90 ptxas's version line and (its digest) triton_key(), the hash of
    triton's own sources and library that every entry's key starts from. gpu_wheels.py records
    the same of the triton that compiled the carried cache (SOURCE.json, "triton_cache")."""
    scope: dict = {"__name__": "fingerprint"}
    exec(FINGERPRINT_CODE, scope)
    return scope["fingerprint"]()


def triton_cache_match(here: dict, cache_dir: str | None) -> str:
    """Whether the carried Triton cache can hit here, said before any step compiles."""
    stamp = WHEELS / "SOURCE.json"
    built = json.loads(stamp.read_text()).get("triton_cache") if stamp.is_file() else None
    if not cache_dir:
        return "no Triton cache carried"
    if not built:
        return "cannot tell whether the carried Triton cache can hit: SOURCE.json does not say what built it"
    differ = [f"{k}: carried {built.get(k)}, here {v}" for k, v in here.items() if built.get(k) != v]
    if not differ:
        return f"matches the carried Triton cache (triton {here['triton']}, {here['ptxas']})"
    return "the carried Triton cache cannot hit, every kernel compiles: " + "; ".join(differ)


def shm_info(ctx: Ctx) -> dict:
    """/dev/shm's size, and what the torchvision loaders of the data and training steps will use
    in it (`_bench.data.shm_prefetch` sizes their prefetch to it)."""
    from _bench.data import SHM, shm_prefetch
    try:
        usage = shutil.disk_usage(SHM)
    except OSError:
        return {"shm": f"{SHM}: none"}
    batch, res = (32, 32) if ctx.dry else (256, 224)
    workers, prefetch, note = shm_prefetch(ctx.workers(), batch * 3 * res * res * 4, want=4)
    return {"shm": f"{SHM}: {usage.total / 2**30:.2f} GiB, {usage.free / 2**30:.2f} GiB free",
            "shm_loader": f"torchvision loader at {res} px, batch {batch}: {workers} workers, prefetch {prefetch}"
                          + (f" ({note})" if note else "")}


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def step_correctness(ctx: Ctx) -> dict:
    """The fused losses (bf16 and fp16 queues on CUDA, fp32 and fp16 on the CPU) against the
    float64 oracle at each width of WIDTHS, and enqueue_ against its oracle; then the CUDA cases
    of tests/test_kernels.py."""
    import torch
    import torch.nn.functional as F

    import fastseed.kernels as fk
    from fastseed.kernels import reference as ref
    make_inputs = benchmark("bench_kernels").make_inputs

    b, k = (8, 96) if ctx.dry else (256, 65536)
    dtypes = (torch.float32, torch.float16) if ctx.dry else (torch.bfloat16, torch.float16)
    ops = [("seed_loss", fk.seed_loss, ref.seed_loss, dict(student_temp=0.2, teacher_temp=1e-4)),
           ("info_nce_loss", fk.info_nce_loss, ref.info_nce_loss, dict(temp=0.2))]
    def loss_case(fused, oracle, temps, s, t, q) -> dict:
        s1 = s.detach().clone().requires_grad_()
        loss = fused(s1, t, q, **temps)
        loss.backward()
        s64 = s.detach().double().requires_grad_()
        want = oracle(s64, t.double(), q.double(), **temps)
        want.backward()
        err = abs(loss.item() - want.item()) / abs(want.item())
        cos = F.cosine_similarity(s1.grad.double().flatten(), s64.grad.flatten(), dim=0).item()
        return dict(loss_rel_err=err, grad_cos=cos, ok=err <= LOSS_REL_ERR and cos >= GRAD_COS)

    def enqueue_case(s, t, q) -> dict:
        queue, want = q.clone(), q.clone()
        ptr, want_ptr = (torch.tensor([k - b // 2], device=ctx.device) for _ in range(2))  # wraps around
        fk.enqueue_(queue, ptr, t)
        ref.enqueue_(want, want_ptr, t)
        diff = (queue.float() - want.float()).abs()
        # one ulp of the queue's dtype at each value: the kernel sums the squares in another order
        # than torch's norm and divides with the GPU's fast division, so a row whose float32
        # quotient lies at a rounding boundary may round either way (the H200's first run: fp16
        # rows one ulp apart, bf16 equal); a wrong row, slot or pointer is many ulps off
        info = torch.finfo(q.dtype)
        ulp = info.eps * torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(info.tiny))))
        ulps = (diff / ulp).max().item()
        return dict(max_abs_diff=diff.max().item(), max_ulps=ulps, bit_exact=float(diff.eq(0).float().mean()),
                    ok=ulps <= 1 and ptr.item() == want_ptr.item())

    rows = []
    for d in WIDTHS:
        for dtype in dtypes:
            inputs = make_inputs(b, k, d, ctx.device, dtype)
            # inputs is passed at the call, not captured: `del inputs` below frees them before the next ones are made
            cases = [(name, lambda i, f=fused, o=oracle, tt=temps: loss_case(f, o, tt, *i))
                     for name, fused, oracle, temps in ops] + [("enqueue_", lambda i: enqueue_case(*i))]
            for name, case in cases:
                row = dict(op=name, D=d, dtype=str(dtype).removeprefix("torch."))
                try:
                    row |= case(inputs)
                except Exception as e:  # one case that cannot run must not hide the others
                    row |= dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                ctx.record(row=row)
                rows.append(row)
            del inputs
    tests = run_pytest(ctx, ["tests/test_kernels.py"], per_test_s=60)
    table = md_table(["op", "D", "dtype", "loss rel err", "grad cos", "max abs diff", "max ulps", "ok"],
                     [[r["op"], r["D"], r["dtype"], r.get("loss_rel_err"), r.get("grad_cos"), r.get("max_abs_diff"),
                       r.get("max_ulps"), r.get("error", r["ok"])] for r in rows])
    failed = []
    if any(not r["ok"] for r in rows):
        failed.append(f"{sum(not r['ok'] for r in rows)} case(s) failed or outside loss rel err {LOSS_REL_ERR} / "
                      f"grad cos {GRAD_COS} / enqueue within 1 ulp, pointer exact")
    if not tests["ok"]:
        failed.append(f"tests/test_kernels.py: {tests['summary']}")
    return {"table": table + f"\n\n`pytest tests/test_kernels.py -m gpu`: {tests['summary']}" + tests["table"],
            "failed": "; ".join(failed) or None}


def step_kernels(ctx: Ctx) -> dict:
    """benchmarks/bench_kernels.py at B=256, K=65536 and D in (128, 2048): the fused loss against
    the eager reference and the SDPA form, with its floors and peak extra memory, each timed
    eagerly and replayed as a CUDA graph; against torch.compile of the reference at D=128 only,
    where its target (>= 3x compiled) is set: one cold compile instead of two."""
    bk = benchmark("bench_kernels")

    rows, errors = [], []
    for d in (128, 2048):
        impls = "fused,eager,sdpa" if ctx.dry or d != 128 else "fused,eager,compiled,sdpa"
        try:
            measured = bk.main(["--sizes", "8:96" if ctx.dry else "256:65536", "--impls", impls, "--dim", str(d),
                                "--reps", "1" if ctx.dry else "5"])
        except Exception as e:  # one width that cannot run must not hide the other
            errors.append(f"D={d}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            ctx.record(error=errors[-1])
            continue
        for row in measured:
            row["graph_us"] = "skipped: no CUDA" if ctx.dry else _graph_us(bk, row)
            ctx.record(row=row)
            rows.append(row)
    if ctx.dry:
        ctx.record(note="impl compiled: skipped: no CUDA (compiling the reference takes minutes on 2 cores)")
    profile = _fused_profile(bk, ctx)
    floors = sorted({key for r in rows for key in r if key.startswith("floor")})
    table = md_table(["D", "impl", "eager µs", "CUDA graph µs", "× vs eager", "peak extra MiB", "loss rel err",
                      "grad cos", *floors],
                     [[r["D"], r["impl"], r["us"], r["graph_us"], r.get("x_vs_eager"),
                       None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20,
                       r["loss_rel_err"], r["grad_cos"], *(r.get(f) for f in floors)] for r in rows])
    return {"table": table + "\n\n" + profile, "failed": "; ".join(errors) or None}


def _fused_profile(bk, ctx: Ctx) -> str:
    """Where the fused loss's forward+backward spends its time, host and device, at B 256,
    K 65536, D 128, bf16 (torch.profiler, 20 steps after 5): the H200's first run timed it at
    1385 µs eagerly but 116 µs as a CUDA graph, so most of an eager step was the host's."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    b, k = (8, 96) if ctx.dry else (256, 65536)
    fn = bk.impls(ctx.device)["fused"]
    s, t, q = bk.make_inputs(b, k, 128, ctx.device, torch.bfloat16 if not ctx.dry else torch.float32)
    for _ in range(5):
        bk.step(fn, s, t, q)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not ctx.dry else [])
    with profile(activities=acts) as prof:
        for _ in range(20):
            bk.step(fn, s, t, q)
        if not ctx.dry:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]

    def device_us(e):
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    ctx.record(profile=[{"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total / 20,
                         "self_device_us": device_us(e) / 20} for e in rows])
    return "fused loss, one forward+backward (torch.profiler, mean of 20):\n\n" + md_table(
        ["op", "calls / step", "self CPU µs / step", "self device µs / step"],
        [[e.key[:60], e.count / 20, e.self_cpu_time_total / 20, device_us(e) / 20] for e in rows])


def _graph_us(bk, row) -> float | str:
    """Forward+backward replayed as one CUDA graph (no launch overhead), median µs."""
    import torch
    import triton.testing

    fn = bk.impls("cuda")[row["impl"]]
    s, t, q = bk.make_inputs(row["B"], row["K"], row["D"], "cuda", torch.bfloat16)
    try:
        bk.step(fn, s, t, q)  # compile and autotune outside the capture
        return triton.testing.do_bench_cudagraph(lambda: bk.step(fn, s, t, q), grad_to_none=[s],
                                                 return_mode="median") * 1e3
    except Exception as e:  # a host sync or an allocation the capture refuses: say so, go on
        torch.cuda.synchronize()
        return f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


# tests/test_gpu.py's CUDA cases that step d runs: every method eager, and compiled the two whose
# compiled graphs differ in what could sync (SEED's student with the fused loss, MoCo's key
# encoder and its enqueue). Compiled SimReg and the two-student SEED add a cold compile each
# (~25 s) of a student the compiled SEED case already proves; `--steps d --all-tests` runs them.
NO_HOST_SYNC_CASES = [f"tests/test_gpu.py::test_step_has_no_host_sync[{case}]" for case in (
    "off-seed-resnet10t", "off-moco-resnet10t", "off-simreg-resnet10t", "off-seed-resnet10t,mobilenetv3_small_050",
    "on-seed-resnet10t", "on-moco-resnet10t")]


def step_no_host_sync(ctx: Ctx) -> dict:
    """tests/test_gpu.py's CUDA cases (NO_HOST_SYNC_CASES): a training step (SEED, MoCo,
    SimReg; eager and compiled) never waits for the device."""
    tests = run_pytest(ctx, ["tests/test_gpu.py"] if ctx.all_tests else NO_HOST_SYNC_CASES, per_test_s=90)
    return {"table": f"`pytest tests/test_gpu.py -m gpu`: {tests['summary']}" + tests["table"],
            "failed": None if tests["ok"] else f"tests/test_gpu.py: {tests['summary']}"}


def step_knn(ctx: Ctx) -> dict:
    """benchmarks/bench_knn.py: a 50k x 10k bank of width 512 (tiny on the CPU); target < 1 s."""
    bench_knn = benchmark("bench_knn")

    res = bench_knn.main(["--device", ctx.device, "--tiny", "--repeats", "1"] if ctx.dry
                         else ["--device", ctx.device, "--repeats", "5"])
    size = f"{res['n_train']} x {res['n_test']} x {res['dim']}"
    return {"median_s": res["median_s"], "target_met": None if ctx.dry else res["median_s"] < 1.0,
            "commit": res["commit"],
            "table": md_table(["size", "median s", "min s", "target < 1 s"],
                              [[size, res["median_s"], res["min_s"], "–" if ctx.dry else res["median_s"] < 1.0]])}


def step_data(ctx: Ctx) -> dict:
    """benchmarks/bench_data.py: the FFCV loader (16 workers) against torchvision on the same
    ~3.8k JPEGs at 224 px, generated here in parallel and kept for the training step."""
    bench_data = benchmark("bench_data")

    args = (["--res", "32", "--images", "96", "--batch", "32", "--epochs", "1"] if ctx.dry else
            ["--res", "224", "--images", "3840", "--batch", "256", "--epochs", "2"])
    res = bench_data.main([*args, "--workers", str(ctx.workers()), "--device", ctx.device,
                           "--data-dir", str(ctx.scratch / "jpegs")])
    return {"result": res, "table": md_table(
        ["res", "images", "workers", "fastseed img/s", "torchvision img/s", "ratio"],
        [[res["res"], res["images"], res["workers"], res["fastseed_images_per_s"], res["torchvision_images_per_s"],
          res["speedup"]]])}


def train_pairs(pairs: list[tuple[str, str]] | None) -> Callable[[Ctx], dict]:
    """benchmarks/bench_train.py, 224 px, batch 256, these teacher -> student pairs, 4 warm-up and
    10 timed steps each: fastseed vs the official-style loop vs synthetic data, on one set of
    JPEGs that the data step shares (written by the first of them to run)."""
    def step_train(ctx: Ctx) -> dict:
        bench_train = benchmark("bench_train")

        res = bench_train.run_all(tiny=ctx.dry, steps=2 if ctx.dry else 10, warmup=None if ctx.dry else 4,
                                  workers=ctx.workers(), data_dir=str(ctx.scratch / "jpegs"),
                                  pairs=None if ctx.dry else pairs, on_row=lambda row: ctx.record(row=row))
        return {"table": bench_train.table(res)}
    return step_train


def step_demo(ctx: Ctx) -> dict:
    """`fastseed-train` with no arguments, from the installed entry point: the embedded demo on
    Fashion-MNIST with its final k-NN table (on the CPU: one step of 32 and a 256-image k-NN)."""
    bin_dir = ctx.site / "bin"
    demo = ctx.scratch / "demo"
    (demo / "data").mkdir(parents=True, exist_ok=True)
    args = []
    if ctx.dry:
        small = "data/test_256.beton"
        subprocess.run([str(bin_dir / "fastseed-prep"), "fashion-mnist:test", small, "--subset", "256",
                        "--no-progress"], cwd=demo, check=True)
        args = ["--max-steps", "1", "--batch-size", "32", "--val-data", small, "--knn-bank", small]
    # the installed entry point, run as __main__ between compile_cache's load and save; its
    # output streamed line by line to the log (stderr straight through) and kept for the table
    cmd = [sys.executable, "-m", "compile_cache", "run", str(bin_dir / "fastseed-train"), *args]
    lines = []
    with subprocess.Popen(cmd, cwd=demo, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    if proc.returncode:
        raise RuntimeError(f"fastseed-train exited {proc.returncode} (its output is in {LOG})")
    table = [line for line in lines if line.startswith(("k-NN", "|", "done:"))]
    return {"stdout": "\n".join(lines[-200:]), "table": "\n".join(table)}


def _workers_of(agent_pid: int) -> dict[str, int]:
    """torchrun's worker processes under `agent_pid`, by LOCAL_RANK."""
    def children(pid):
        kids = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                kids += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                pass
        return kids + [g for k in kids for g in children(k)]
    found = {}
    for pid in children(agent_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), None)
        if rank is not None:
            found.setdefault(rank, pid)
    return found


def step_restart(ctx: Ctx) -> dict:
    """Kill one of two ranks mid-run under `torchrun --max-restarts 1` and time the restarted
    group back to a logged step (it resumes by itself from the last checkpoint). Needs two
    devices: on a machine with one it says so and runs nothing (two NCCL ranks cannot share a
    GPU). The dry run does it on the CPU with two gloo ranks."""
    import torch

    n = torch.cuda.device_count() if not ctx.dry else 0
    if not ctx.dry and n < 2:
        return {"devices": n, "note": f"single device ({n} CUDA device): the kill/restart of one of several ranks "
                                      "needs two; tests/test_cluster.py does it on the CPU with gloo ranks",
                "table": f"not run: {n} CUDA device on this machine"}
    bin_dir = ctx.site / "bin"
    work = ctx.scratch / "restart"
    (work / "data").mkdir(parents=True, exist_ok=True)
    beton = work / "data" / "train_2048.beton"
    if not beton.is_file():
        subprocess.run([str(bin_dir / "fastseed-prep"), "fashion-mnist:train", str(beton), "--subset", "2048",
                        "--no-progress"], cwd=work, check=True)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    steps = 24
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", str(bin_dir / "fastseed-train"), "--data", str(beton), "--output", str(out),
           "-a", "resnet18", "-k", "efficientnet_lite0", "--res", "32", "--teacher-res", "48", "-b", "64",
           "--max-steps", str(steps), "--ckpt-every", "10", "--log-every", "1", "--knn-every", "0",
           "--no-progress", "--device", ctx.device, "--workers", "2"]
    metrics = out / "metrics.jsonl"

    def logged() -> list[dict]:
        try:
            return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        except (OSError, json.JSONDecodeError):
            return []

    agent = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + (DRY_CAP_S if ctx.dry else 150)
    while not any(r.get("step", 0) > 12 and "loss" in r for r in logged()):  # past the first checkpoint
        if agent.poll() is not None or time.monotonic() > deadline:
            agent.kill()
            return {"failed": "the run ended or stalled before step 12: " + (agent.stderr.read() or "")[-500:]}
        time.sleep(0.05)
    victim = _workers_of(agent.pid)["1"]
    killed_wall = time.time()
    os.kill(victim, signal.SIGKILL)
    _, stderr = agent.communicate(timeout=max(10.0, deadline - time.monotonic()))
    after = [r for r in logged() if "loss" in r and r.get("time", 0) > killed_wall]
    resumed = [x for x in stderr.splitlines() if "resumed from" in x]
    if agent.returncode or not after or not resumed:
        return {"failed": f"torchrun exited {agent.returncode}; resumed lines {len(resumed)}; "
                          f"steps logged after the kill {len(after)}: {stderr[-500:]}"}
    back_s = min(r["time"] for r in after) - killed_wall
    row = {"devices": n or "2 gloo ranks (CPU)", "kill_to_first_step_s": round(back_s, 1),
           "resumed": resumed[0].strip(), "final_step": max(r["step"] for r in after)}
    ctx.record(row=row)
    return {**row, "table": md_table(["devices", "SIGKILL -> first logged step s", "resumed", "last step"],
                                     [[row["devices"], row["kill_to_first_step_s"], row["resumed"],
                                       row["final_step"]]])}


def run_optional(script: str, args: list[str], dry_args: list[str] | None = None) -> Callable[[Ctx], dict]:
    """A benchmark another change adds, in its program mode (`--out FILE`, JSON); the dry run
    passes `dry_args` instead (CPU, tiny sizes), where the step has them."""
    def step(ctx: Ctx) -> dict:
        args_ = dry_args if ctx.dry and dry_args is not None else args
        out = ctx.scratch / f"{Path(script).stem}.json"
        # between compile_cache's load and save, like the demo; its output straight to the log
        subprocess.run([sys.executable, "-m", "compile_cache", "run", str(BENCHMARKS / script), *args_,
                        "--out", str(out)], cwd=ctx.scratch, check=True)
        text = out.read_text()
        try:
            result = json.loads(text)
        except json.JSONDecodeError:  # JSON lines
            result = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {"result": result, "table": f"`{script} {' '.join(args_)}`: see {JSONL}"}
    return step


def run_pytest(ctx: Ctx, tests: list[str], per_test_s: float) -> dict:
    """The CUDA cases (-m gpu) of these test files or node ids, against the installed copy (started
    outside the tree, so the tree's own folders cannot shadow it). Its output goes straight to
    the log as it runs (-rA: every test's outcome in the closing summary too); gpu_pytest.py
    fails a test that runs past `per_test_s` and appends each test's outcome to the JSON lines
    as it ends, so a capped run keeps every finished test. The ini's addopts are dropped: they
    name pytest-timeout's --timeout, which the GPU image lacks."""
    env = dict(os.environ, FASTSEED_TEST_TIMEOUT_S=str(per_test_s), FASTSEED_TEST_RESULTS=str(ctx.out / JSONL),
               FASTSEED_CHECK_RUN=ctx.run_id, FASTSEED_CHECK_STEP=ctx.step)
    cmd = [sys.executable, "-m", "pytest", *(str(ROOT / t) for t in tests), "-m", "gpu", "-rA", "-v",
           "-p", "no:cacheprovider", "-p", "gpu_pytest", "-o", "addopts=", "--rootdir", str(ROOT)]
    rc = subprocess.run(cmd, cwd=ctx.scratch, env=env).returncode
    records = [r for r in map(json.loads, (ctx.out / JSONL).read_text().splitlines())
               if r.get("run") == ctx.run_id and r.get("step") == ctx.step and "test" in r]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no test ran"
    summary += f" (pytest exit {rc})"
    ctx.record(pytest=tests, summary=summary, exit=rc)
    failed = [r for r in records if r["outcome"] in ("failed", "error")]
    table = ("\n\n" + md_table(["failed test", "s", "error"], [[r["test"], r["s"], r.get("error")] for r in failed])
             if failed else "")
    return {"ok": rc == 0, "summary": summary, "table": table}


@dataclass
class Step:
    name: str
    run: Callable[[Ctx], dict]
    expected_s: int           # on the H200 with cold caches, after the install (estimates until a run replaces them)
    cap_s: int
    why: str                  # where the expected time and the cap come from
    needs: str | None = None  # a file another change adds: skipped with a note until it exists
    cuda_only: bool = False   # the dry run records "skipped: no CUDA"
    compiles: bool = False    # loads the carried torch.compile artifacts first, saves its own after
    dry_as: str | None = None # a step whose dry run would repeat this one's (CI's time): skipped in it


# Expected times: a-e as measured on the H200's first run (2026-12-04: the machine started in ~30 s,
# the install took 3.7 s); the rest estimates for the H200 with cold compile caches; each step's
# process pays ~8 s of torch import and CUDA start. Caps leave room for a slow start, not for a
# second cold compile the estimate does not hold.
STEPS = [
    Step("a-environment", step_environment, 16, 45,
         "measured 15.9 s on the H200 (2026-12-04); torch import and CUDA start ~8 s; sha256 of libtriton.so "
         "(~0.5 GB) ~1 s; ptxas --version"),
    Step("b-correctness", step_correctness, 64, 110,
         "measured 64.0 s on the H200 (65 of 80 carried kernels found, 3 compiled); 18 cases at B 256, K 65536 "
         "against float64 (< 1 s each), then 23 CUDA tests of test_kernels.py "
         "(~1 s each, pytest start ~10 s), their 80 kernels from the carried cache; a cache miss costs 1-3 s of "
         "ptxas per kernel: the cap covers ~30 misses", compiles=False),
    Step("c-kernels", step_kernels, 40, 100,
         "measured 37.1 s on the H200, before its ~2 s profile of the fused op; 7 timings (fused, eager, SDPA at "
         "D 128 and 2048; compiled at 128) of ~1 s each by do_bench, a CUDA-graph "
         "replay of each; one cold torch.compile of the reference's forward and backward, 20-30 s",
         compiles=True),
    Step("d-no-host-sync", step_no_host_sync, 88, 130,
         "measured 88.1 s on the H200 (pytest 79.6 s of it); 6 cases: 4 eager (~3 s each after the first), "
         "2 compiled with a cold compile of resnet10t's "
         "training step at 64 px each (20-30 s); pytest start ~10 s"),
    Step("e-knn", step_knn, 10, 40,
         "measured 10.1 s on the H200; 5 repeats of a 50k x 10k x 512 k-NN (< 1 s each) after the start"),
    Step("f-train", train_pairs([("resnet50", "resnet18")]), 130, 210,
         "ResNet-50 -> ResNet-18: 3840 JPEGs at 400 px by 16 processes and their beton (~20 s), the official "
         "loop's 14 steps with its loader's start (~15 s), cold compiles of the teacher's forward and the "
         "student's step at 224 px (60-90 s), shared by the synthetic and the loader runs (28 steps, ~10 s)",
         compiles=True),
    Step("g-demo", step_demo, 100, 170,
         "fastseed-train with no arguments: three Fashion-MNIST betons (~15 s), cold compiles of Lite0 at 48 px and "
         "ResNet-18 at 32 px (~40 s), 500 steps of 128 (~30 s), its k-NN evaluations (~10 s)"),
    Step("h-vit-teacher", train_pairs([("dinov2_vitb14", "resnet18")]), 100, 180,
         "DINOv2 ViT-B/14 (random weights, hub layout) -> ResNet-18 at 224 px: a cold compile of the ViT's forward "
         "(30-60 s); the student's step from the on-disk Inductor cache f-train filled; f-train's ResNet-50 row is "
         "the figure to compare", compiles=True, dry_as="f-train"),
    Step("i-restart", step_restart, 5, 150,
         "one CUDA device: says so and ends (~5 s); with two: a 2-rank run of 24 steps at 32 px, one rank "
         "SIGKILLed after step 12, torchrun's restart and resume (~60 s)"),
    Step("j-data", step_data, 40, 100,
         "the JPEGs of f-train reused; one warm-up and 2 timed epochs of 3840 images each way, the torchvision "
         "loader's 16 worker starts (~5 s)"),
    Step("k-train-pairs", train_pairs([("resnet50", "efficientnet_b0"), ("resnet50", "mobilenetv3_large_100")]),
         150, 240, "two more students, a cold compile each (60-90 s); ResNet-50's forward from the on-disk "
         "Inductor cache f-train filled (~15 s)", compiles=True, dry_as="f-train"),
    Step("l-cache", run_optional("bench_cache.py", ["--res", "224", "--device", "cuda", "--epochs", "1",
                                                    "--compile", "off"]), 60, 120,
         "eager ResNet-50 -> ResNet-18 at 224 px: cache build of 8192 images, both loaders, 5 rounds of training",
         needs="benchmarks/bench_cache.py", cuda_only=True),
    Step("m-multi", run_optional("bench_multi.py", ["--res", "224", "--device", "cuda"]), 60, 120,
         "one joint and three solo runs at 224 px, each compiled", needs="benchmarks/bench_multi.py",
         cuda_only=True),
    Step("n-local", run_optional("bench_local.py", ["--device", "cuda", "--res", "224", "--batch", "256",
                                                    "--teacher", "resnet50"],
                                 dry_args=["--device", "cpu", "-a", "resnet10t", "--res", "32", "--teacher-res", "64",
                                           "--batch", "4", "--steps", "1", "--rounds", "2", "--micro-batch", "4",
                                           "--micro-width", "16", "--micro-grids", "3", "--micro-queues", "64"]),
         150, 240,
         "ResNet-50 (random weights) -> ResNet-18 at 224 px, batch 256, bf16: SEED against SEED + --local-weight 1 "
         "(7x7 tokens), each compiled: the SEED run's graphs may come from the on-disk Inductor cache f-train "
         "filled, the teacher's token pass and the local run's step are cold compiles (60-90 s each); 3 warm-up, "
         "5 rounds of 5 steps each way and 3 phase-timed eager steps (~10 s); the losses alone at 7x7 and 16x16 "
         "and K 512 and 65536 (~5 s)"),
]
# what is not a step: pip and no index, the wheels and the tree (a reuse: ~1 s)
EXPECTED_S = {"install": 20}  # measured 3.7 s on the H200; 20 kept for a slower disk
DRY_CAP_S = 600              # a dry step's cap (CPU, tiny sizes): a hang must end, a slow CPU must not
INSTALL_CAP_S = 120           # pip startup twice, 37 MiB of wheels and the tree unpacked


@dataclass
class Call:
    steps: list[str]
    budget_s: int  # no step of the call starts after this; `run` with timeout_s = budget_s + 60
    why: str


# The window: 15 minutes of device time, the machine's start (a minute or more: 90 s planned) and
# the time between calls (~30 s to read a call's output and start the next) counted. Calls 1 and 2
# at their budgets take 90 + 270 + 30 + 300 = 690 s (11.5 min) even when every step runs to its
# cap; as expected (214 s and 231 s) ~9 min, which leaves call 3 a few minutes: run it with
# --budget set to what `status` says is left, less 90 s.
CALLS = {
    1: Call(["a-environment", "b-correctness", "c-kernels", "d-no-host-sync", "e-knn"], 270,
            "the fused kernels' correctness and figures, a step with no host sync, the k-NN target"),
    2: Call(["f-train", "g-demo"], 300, "end to end with one pair (the headline pair), then the demo"),
    3: Call(["h-vit-teacher", "i-restart", "j-data", "k-train-pairs", "l-cache", "m-multi", "n-local"], 420,
            "the rest, in a window with time left: the ViT teacher and the restart first"),
}


def plan() -> str:
    """The plan as a table: per call its steps, expected seconds, caps and why."""
    rows = []
    for n, call in CALLS.items():
        steps = [s for s in STEPS if s.name in call.steps]
        expected = EXPECTED_S["install"] + sum(s.expected_s for s in steps)
        rows.append([f"**call {n}**", f"budget {call.budget_s} s", f"{expected} expected", "", call.why])
        rows.append(["", "install (or its reuse)", EXPECTED_S["install"], INSTALL_CAP_S,
                     "pip with no index: the carried wheels, then the tree"])
        rows += [["", s.name, s.expected_s, s.cap_s, s.why] for s in steps]
    return md_table(["call", "step", "expected s (H200)", "cap s", "why"], rows)


# ---------------------------------------------------------------- install, Triton cache, provenance
class InstallError(RuntimeError):
    pass


def wheel_fits(wheel: Path) -> bool:
    """Whether pip can install this wheel into this interpreter (its tags against sys_tags)."""
    try:
        from packaging.tags import parse_tag, sys_tags
    except ImportError:  # the GPU image may lack packaging; pip carries it
        from pip._vendor.packaging.tags import parse_tag, sys_tags
    parts = wheel.name[:-len(".whl")].split("-")
    wanted = parse_tag("-".join(parts[-3:]))
    return any(tag in wanted for tag in sys_tags())


def install(site: Path, dry: bool, log: Path, wheels_dir: Path = WHEELS) -> str:
    """The carried wheels and then this tree, with pip and no index, into `site`; reused when
    `site` already holds this tree and these wheels (a later call on a warm machine). Returns
    what it did. On the GPU machine every wheel must install; in the dry run those that this
    interpreter cannot take (the cp312 ffcv under another Python) are named and left out."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not dry and not wheels:
        raise InstallError(f"no wheels in {wheels_dir}: run `make gpu-wheels` where PyPI is reachable and carry .whl/")
    fit = [w for w in wheels if wheel_fits(w)]
    unfit = [w.name for w in wheels if w not in fit]
    if unfit and not dry:
        raise InstallError(f"{', '.join(unfit)} cannot install under Python {sys.version.split()[0]} here: "
                           "rebuild .whl/ with `make gpu-wheels` for this machine's Python")
    stamp = {"tree": tree_digest(), "wheels": [[w.name, w.stat().st_size] for w in fit]}
    if (site / INSTALLED).is_file() and json.loads((site / INSTALLED).read_text()) == stamp:
        return "reused: " + (", ".join(w.name for w in fit) + " and " if fit else "") + "this tree, installed before"
    shutil.rmtree(site, ignore_errors=True)
    # pip builds in the source folder: a copy keeps build/ and *.egg-info out of the tree
    src = site.with_name("src")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copy2(ROOT / "setup.py", src)
    for package in (p.parent for p in ROOT.glob("*/__init__.py")):
        shutil.copytree(package, src / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(site)]
    for what in ([str(w) for w in fit], ["--no-build-isolation", str(src)]):
        if not what:
            continue
        with open(log, "a") as f:
            f.write(f"\n===== pip install {' '.join(Path(w).name for w in what)} =====\n")
            f.flush()
            try:
                proc = subprocess.run([*pip, *what], stdout=f, stderr=subprocess.STDOUT, timeout=INSTALL_CAP_S)
            except subprocess.TimeoutExpired:
                raise InstallError(f"pip install ran past {INSTALL_CAP_S} s (see {log.name})") from None
        if proc.returncode:
            raise InstallError(f"pip install {' '.join(Path(w).name for w in what)} exited {proc.returncode} "
                               f"(see {log.name})")
    (site / INSTALLED).write_text(json.dumps(stamp))
    done = [w.name for w in fit] + ["fastseed (this tree)"]
    if not wheels:
        done.append(f"no carried wheels ({wheels_dir.name}/ absent or empty: make gpu-wheels); the interpreter's "
                    "own ffcv and weights serve")
    elif unfit:
        done.append(f"not installable under Python {sys.version.split()[0]}: {', '.join(unfit)} (the interpreter's "
                    "own serve; make gpu-rehearse installs them under 3.12)")
    return ", ".join(done)


def prepare_triton_cache(archive: Path, dest: Path) -> dict[str, str]:
    """Unpack the carried Triton cache at `dest` so that the steps' JIT finds it; returns the
    kernel of each entry ({entry: kernel}).

    An entry's group file (__grp__KERNEL.json) lists its files as os.path.join(TRITON_CACHE_DIR,
    entry, file), with the folder as the compiling process was given it, and Triton takes a
    listed file that does not exist, seen from the current directory, for a miss. The cache
    was compiled in another folder on another machine and the steps run from the scratch
    folder, so the files are listed again by their absolute paths under `dest`, which every
    step sees alike. Unpacked once per machine: a later call of a warm machine finds it as the
    earlier calls left it, with what they compiled into it (Inductor's kernels too)."""
    dest = dest.resolve()
    # the archive by its content: each call gets a new copy of the tree, with new times
    prepared = dest.with_name(f".{dest.name}.carried.json")  # beside it: the folder holds entries only
    this = {"archive": [archive.name, hashlib.sha256(archive.read_bytes()).hexdigest()]}
    if (dest.is_dir() and prepared.is_file()
            and (done := json.loads(prepared.read_text()))["archive"] == this["archive"]):
        return done["kernels"]  # a later call of a warm machine: the entries and what its steps compiled
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    kernels = {}
    for group in sorted(dest.glob("*/__grp__*.json")):
        listed = json.loads(group.read_text())["child_paths"]
        files = {name: group.parent / Path(path).name for name, path in listed.items()}
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise ValueError(f"{archive.name}: entry {group.parent.name} lacks {', '.join(missing)}")
        group.write_text(json.dumps({"child_paths": {name: str(p) for name, p in files.items()}}))
        kernels[group.parent.name] = group.name.removeprefix("__grp__").removesuffix(".json")
    prepared.write_text(json.dumps(this | {"kernels": kernels}))
    return kernels


def triton_env(cache: Path | None, lookups: Path) -> dict:
    """The steps' Triton variables: the cache (when one was carried) and the lookup log."""
    import triton_lookups
    env = {"TRITON_CACHE_MANAGER": "triton_lookups:LoggedCache", triton_lookups.LOG: str(lookups)}
    return env | ({"TRITON_CACHE_DIR": str(cache)} if cache else {})


def fastseed_kernels() -> set[str]:
    """The names of fastseed's Triton kernels (the jitted functions of kernels/bodies.py)."""
    tree = ast.parse((ROOT / "kernels" / "bodies.py").read_text())
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.decorator_list}


def cache_lookups(log: Path, carried: dict[str, str]) -> dict:
    """What the steps' Triton lookups (the log of triton_lookups.LoggedCache) found, per kernel
    of fastseed: entries of the carried cache they found, and entries they compiled (an
    entry's first lookup decides: later ones, from other processes, find what the first
    compiled). Other kernels (Inductor's, for the models; never carried) are counted together."""
    first = {}
    for r in map(json.loads, log.read_text().splitlines() if log.is_file() else []):
        first.setdefault(r["entry"], r)
    ours, other = fastseed_kernels(), "other kernels (Inductor's; not carried)"
    kernels = sorted(set(carried.values()) | {r["kernel"] for r in first.values() if r["kernel"] in ours})
    rows = {k: {"carried": 0, "found": 0, "compiled": 0} for k in [*kernels, other]}
    for kernel in carried.values():
        rows[kernel]["carried"] += 1
    for entry, r in first.items():
        row = rows[r["kernel"] if r["kernel"] in ours else other]
        if not r["hit"]:
            row["compiled"] += 1
        elif entry in carried:
            row["found"] += 1
    missed = {k: v["compiled"] for k, v in rows.items() if k != other and v["compiled"]}
    found = sum(v["found"] for v in rows.values())
    status = (f"{len(carried)} entries carried, {found} found by the steps; compiled during the check: "
              f"{sum(missed.values())} of fastseed's kernels"
              + (f" ({', '.join(f'{k} {n}' for k, n in missed.items())})" if missed else "")
              + f", {rows[other]['compiled']} others")
    table = md_table(["kernel", "carried entries", "found", "compiled during the check"],
                     [[k, v["carried"], v["found"], v["compiled"]] for k, v in rows.items()])
    return {"status": status, "found": found, "missed": missed, "others_compiled": rows[other]["compiled"],
            "table": table}


def tree_digest(root: Path = ROOT) -> str:
    """sha256 of what a check runs (setup.py, Makefile, every .py of the packages, benchmarks and
    tests): tells whether a carried tree is the one `make gpu-wheels` stamped."""
    h = hashlib.sha256()
    files = [root / "setup.py", root / "Makefile"]
    files += sorted(p for d in ("fastseed", "kernels", "data_prep", "benchmarks", "tests")
                    for p in (root / d).rglob("*.py"))
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_commit() -> str | None:
    """The tree's commit: from git where the checkout came with its history, else from the stamp
    `make gpu-wheels` left in .whl/ when the tree is still the one it stamped. The steps get it
    as FASTSEED_COMMIT, which fastseed.provenance records where git cannot tell (the installed
    copy and the carried tree have no history)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    stamp = WHEELS / "SOURCE.json"
    if (commit and not commit.endswith("-dirty")) or not stamp.is_file():
        return commit
    # the device's copy can carry the history of the session's first commit with later ones as
    # changes ("-dirty", as on the H200): the stamp names the commit when the tree is the stamped one
    stamped = json.loads(stamp.read_text())
    if stamped["tree"] == tree_digest():
        return stamped["commit"]
    return commit or f"unknown: the tree differs from {stamped['commit']}, stamped by make gpu-wheels"


# ---------------------------------------------------------------- the driver
def run_capped(cmd: list[str], *, cap_s: float, env: dict, cwd: Path, log: Path) -> int | None:
    """Run `cmd` in a process group of its own, output appended to `log`; at `cap_s` the whole
    group is killed (DataLoader workers, pytest, fastseed-train included). None when capped."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            rc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it left running
        except ProcessLookupError:
            pass
        proc.wait()
    return rc


def step_env(site: Path, cache: Path | None, lookups: Path, scratch: Path, out: Path) -> dict:
    """The steps' environment: the install, benchmarks/gpu (triton_lookups, the cache manager every
    Triton compile of the steps loads; compile_cache; gpu_pytest) and benchmarks/ (the scripts
    and their _bench) before whatever PYTHONPATH was already set, the commit, the Triton cache and
    its lookup log, torch.compile's on-disk cache in the scratch folder (kept between the calls of
    a warm machine) with the carried artifacts and where to save new ones."""
    path = os.pathsep.join(filter(None, (str(site), str(HERE), str(BENCHMARKS), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
               PATH=f"{site / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", **triton_env(cache, lookups))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor-cache")
    env["FASTSEED_COMPILE_CACHE_OUT"] = str(out / "compile-cache")
    if COMPILE_CACHE.is_dir():
        env["FASTSEED_COMPILE_CACHE_IN"] = str(COMPILE_CACHE)
    commit = source_commit()
    if commit:
        env["FASTSEED_COMMIT"] = commit
    if (WHEELS / "fashion-mnist").is_dir():
        env["FASTSEED_FASHION_MNIST"] = str(WHEELS / "fashion-mnist")
    return env


def write_summary(out: Path, run_id: str, dry: bool) -> None:
    records = [r for r in map(json.loads, (out / JSONL).read_text().splitlines()) if r.get("run") == run_id]
    status = [r for r in records if "status" in r]
    results = {r["step"]: r["result"] for r in records if "result" in r}
    env = results.get("a-environment", {})
    lines = [f"# GPU check {run_id}{' (dry run, CPU)' if dry else ''}", "",
             f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"commit {env.get('commit')}", "",
             md_table(["step", "status", "s", "expected s", "cap s"],
                      [[r["step"], r["status"], r.get("wall_s"), r.get("expected_s"), r.get("cap_s")] for r in status])]
    for name, result in results.items():
        if result.get("table"):
            lines += ["", f"## {name}", "", result["table"]]
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / SUMMARY)


def select(names: str | None, call: int | None) -> list[tuple[int | None, list[Step]]]:
    """The steps to run, grouped by call (each group under its call's budget): --steps names
    (one group, no call budget), else --call N, else every call in order."""
    if names:
        wanted = names.split(",")
        unknown = [w for w in wanted if not any(s.name == w or s.name.split("-")[0] == w for s in STEPS)]
        if unknown:
            raise SystemExit(f"error: unknown step(s) {', '.join(unknown)}: choose from "
                             f"{', '.join(s.name for s in STEPS)}")
        return [(None, [s for s in STEPS if s.name in wanted or s.name.split("-")[0] in wanted])]
    if call is not None and call not in CALLS:
        raise SystemExit(f"error: no call {call}: the plan has calls {', '.join(map(str, CALLS))} (see --plan)")
    return [(n, [s for s in STEPS if s.name in c.steps]) for n, c in CALLS.items() if call in (None, n)]


def drive(args) -> int:
    dry = args.dry
    out = Path(args.out or os.environ.get("OUT") or (ROOT / "build" / "gpu_check_dry" if dry
                                                      else BENCHMARKS / "results" / "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    groups = select(args.steps, args.call)
    scratch = Path(args.scratch or (tempfile.mkdtemp(prefix="fastseed-gpu-check-") if dry else DEVICE_SCRATCH))
    scratch = scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    site = scratch / "site"
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S") + (f"-call{args.call}" if args.call else "")
    log = out / LOG
    started = time.monotonic()

    def done(name, status, t0=None, step=None, cap=None):
        append_json(out / JSONL, {"run": run_id, "step": name, "status": status,
                                  "wall_s": None if t0 is None else round(time.monotonic() - t0, 1),
                                  "expected_s": step.expected_s if step else EXPECTED_S.get(name),
                                  "cap_s": cap if cap is not None else (step.cap_s if step else None)})
        write_summary(out, run_id, dry)
        print(f"[gpu-check] {time.monotonic() - started:6.1f} s  {name}: {status}", flush=True)

    t0 = time.monotonic()
    try:
        installed = install(site, dry, log)
    except InstallError as e:
        done("install", f"failed: {e}", t0, cap=INSTALL_CAP_S)
        return 1
    done("install", "ok: " + installed, t0, cap=INSTALL_CAP_S)
    cache, carried, no_cache = None, {}, f"no {CACHE_ARCHIVE.name} (make gpu-wheels)"
    if CACHE_ARCHIVE.is_file():
        try:
            carried = prepare_triton_cache(CACHE_ARCHIVE, scratch / "triton-cache")
            cache = scratch / "triton-cache"
        except (OSError, tarfile.TarError, ValueError, KeyError) as e:  # the steps can still compile
            no_cache = f"{CACHE_ARCHIVE.name} unusable: {e}"
    lookups = scratch / "triton_lookups.jsonl"
    lookups.unlink(missing_ok=True)  # this call's lookups only
    env = step_env(site, cache, lookups, scratch, out)
    failed = []
    for call, steps in groups:
        # the dry run on a 2-core CPU keeps the plan's order but not its times: DRY_CAP_S a step
        budget = args.budget or (CALLS[call].budget_s if call and not dry else float("inf"))
        # one group: its budget counts from the start (the install included); several (the dry
        # run's every call): each from where it begins
        deadline = (started if len(groups) == 1 else time.monotonic()) + budget
        for step in steps:
            left = deadline - time.monotonic()
            if step.needs and not (ROOT / step.needs).is_file():
                done(step.name, f"skipped: {step.needs} is not in this tree", step=step)
                continue
            if dry and step.cuda_only:
                done(step.name, "skipped: no CUDA", step=step)
                continue
            if dry and step.dry_as:
                done(step.name, f"skipped: dry, {step.dry_as} ran the same code at the same tiny size", step=step)
                continue
            if left < 10:
                whose = f"call {call}'s" if call else "the"
                done(step.name, f"skipped: {whose} {budget:.0f} s budget is spent (run it alone: "
                                f"--steps {step.name.split('-')[0]})", step=step)
                continue
            cap = min(DRY_CAP_S if dry else step.cap_s, left)
            t0 = time.monotonic()
            with open(log, "a") as f:
                f.write(f"\n===== {step.name} (cap {cap:.0f} s) =====\n")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--in-step", step.name, "--out", str(out),
                   "--scratch", str(scratch), "--run-id", run_id, *(["--dry"] if dry else []),
                   *(["--all-tests"] if args.all_tests else [])]
            rc = run_capped(cmd, cap_s=cap, env=dict(env, FASTSEED_CHECK_STEP=step.name), cwd=scratch, log=log)
            note = _result(out, run_id, step.name).get("note")
            status = ("ok" if rc == 0 else (f"capped at {cap:.0f} s" if rc is None else
                                            "failed: " + _failure(out, run_id, step.name, log)))
            if rc != 0:
                failed.append(step.name)
            done(step.name, status + (f"; {note}" if note else ""), t0, step, cap=round(cap))
    found = cache_lookups(lookups, carried)
    append_json(out / JSONL, {"run": run_id, "step": "triton-cache", "result": found})
    done("triton-cache", found["status"] if cache else f"none carried, {no_cache}: {found['status']}")
    saved = sorted((out / "compile-cache").glob("*.bin"))
    if saved:
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in saved)
        print(f"[gpu-check] torch.compile artifacts: {sizes}"
              f" in {out / 'compile-cache'} (carry as .whl/compile-cache/)")
    print(f"[gpu-check] {out / SUMMARY}")
    return 1 if failed else 0


def _result(out: Path, run_id: str, name: str) -> dict:
    for line in reversed((out / JSONL).read_text().splitlines()):
        r = json.loads(line)
        if r.get("run") == run_id and r.get("step") == name and "result" in r:
            return r["result"]
    return {}


def _failure(out: Path, run_id: str, name: str, log: Path) -> str:
    """What the step said went wrong, else the last line of its output that names an error."""
    for line in reversed((out / JSONL).read_text().splitlines()):
        r = json.loads(line)
        if r.get("run") == run_id and r.get("step") == name and "result" in r:
            return str(r["result"].get("failed"))
    tail = log.read_bytes()[-20000:].decode(errors="replace").splitlines()
    errors = [line for line in tail if "Error" in line or "error" in line]
    return (errors or tail or ["(no output)"])[-1].strip()[:300]


def in_step(args) -> int:
    step = next(s for s in STEPS if s.name == args.in_step)
    ctx = Ctx(step.name, args.dry, Path(args.out), Path(args.scratch), Path(args.scratch) / "site", args.run_id,
              args.all_tests)
    if step.compiles:
        import compile_cache
        compile_cache.load_once()
    try:
        result = step.run(ctx)
    finally:
        if step.compiles:
            saved = compile_cache.save(step.name)
            if saved:
                print(f"[compile-cache] saved {saved}", flush=True)
    ctx.record(result=result)
    return 1 if result.get("failed") else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes (CI)")
    p.add_argument("--call", type=int, help=f"one call of the plan: {', '.join(map(str, CALLS))} (default: all, "
                                            "each under its budget)")
    p.add_argument("--steps", help="comma-separated step names or letters instead of a call (no budget but --budget)")
    p.add_argument("--plan", action="store_true", help="print the plan (calls, steps, caps and why) and exit")
    p.add_argument("--all-tests", action="store_true", help="step d: every CUDA case of tests/test_gpu.py")
    p.add_argument("--out", help="results folder (default: $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--scratch", help=f"work folder (default: {DEVICE_SCRATCH}, the dry run a new temporary one)")
    p.add_argument("--budget", type=float, help="start no step after this many seconds (default: the call's)")
    p.add_argument("--in-step", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plan:
        print(plan())
        return 0
    if args.call is not None and args.steps:
        raise SystemExit("error: --call and --steps exclude each other: a call is a list of steps")
    return in_step(args) if args.in_step else drive(args)


if __name__ == "__main__":
    sys.exit(main())
