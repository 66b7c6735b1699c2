"""Ahead-of-time launchability check: compile, on this CPU, every Triton kernel of
fastseed.kernels with every config the dispatcher or the autotuner can launch, for sm_90
and sm_100, and fail when one would not launch or would run badly.

    python -m fastseed.kernels.check                          # the full grid (make kernel-check)
    python -m fastseed.kernels.check --arch 90 --cache-dir .triton-cache   # and fill a Triton cache

The launches are not listed by hand: the loss's own launch code (seed_loss._triton_forward
and _triton_backward, enqueue._launch) runs on meta tensors with a launcher that records
each launch, so every kernel, argument and constexpr is the one a GPU run passes, and each
autotuned kernel adds every config its prune keeps. Launches that specialise alike (B, K
and split sizes are not specialised; D and strides only by divisibility by 16) compile
once. triton.compile runs the real pipeline down to a cubin with the ptxas of the triton
wheel. A compiled kernel fails when it needs more shared memory than the target has
(232,448 B per block on sm_90 and sm_100), more than 512 tensor-memory columns, more
registers than an SM holds for its warps, spills registers, or holds a `trap`.

--cache-dir DIR: the compilations also fill DIR as a Triton cache. A GPU run finds them when
its JIT computes the same keys, i.e. with
- the same kernel source (same commit) and launch specialisation: the queue dtype and the
  embeddings' dtype (the queue's, or as named by a QUEUE/EMBEDDINGS entry of --dtypes), D
  (by divisibility by 16) and contiguous rows, all as enumerated here (B and K are not
  specialised, so any B and K of a listed D hit);
- the same triton wheel for the same Python version: the key hashes libtriton.so, which
  differs between the cp311 and cp312 builds of one release, so for the GPU machine
  (Python 3.12, triton 3.6) run `make kernel-check-triton36`, which compiles with that
  Python and wheel through --python;
- the same ptxas (the wheel's), no TRITON_* variable that changes the key;
- TRITON_CACHE_DIR set to DIR as written here, from the same working directory: each entry
  records the paths of its files as given, so a relative DIR survives a copy of the
  repository to another machine, and a cache unpacked elsewhere needs those paths rewritten
  (benchmarks/gpu/gpu_check.py does, for the GPU check's steps, which run from a scratch folder).
Not covered: launches outside the grid (another D, dtype pair or stride), and the kernels
torch.compile generates for the rest of the model (Inductor's own cache).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

from . import bodies
from .enqueue import _launch as enqueue_launch
from .seed_loss import _CUDA, Launcher, _triton_backward, _triton_forward

SMS = {90: 132, 100: 148}  # SMs of an H100/H200 and a B200: sizes the split plan (not specialised)
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use, sm_90 and sm_100
TMEM_COLUMNS = 512  # tensor memory per SM on sm_100
REGISTERS_PER_SM = 65_536
K = 65_536  # the SEED queue (not specialised: any K compiles the same kernels)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "int64"}
DIMS = (64, 128, 256, 384, 768, 1280, 2048, 4096)
BATCHES = (32, 256)
SHORT = {"BLOCK_B": "BB", "BLOCK_K": "BK", "BLOCK_D": "BD", "BLOCK_M": "BM", "BLOCK_N": "BN"}
WORKER = Path(__file__).with_name("_aot_worker.py")


class Recorder(dict):
    """A launcher's kernel table whose launches are recorded in .calls, not run."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __missing__(self, name):
        return _Recording(self.calls, name)


class _Recording:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


def run_step(kernels, arch: int, dtype: torch.dtype, b: int, d: int, k: int = K,
             embed_dtype: torch.dtype | None = None) -> None:
    """Run the launch code of a training step on meta tensors, with `kernels` as the kernel
    table: the loss forward and backward (SEED and InfoNCE) and the enqueue of the B keys,
    with a queue of `dtype` and embeddings of `embed_dtype` (default: the queue's)."""
    launcher = Launcher(kernels, arch, 2 * SMS[arch])
    emb = dict(dtype=embed_dtype or dtype, device="meta")
    s, t, queue = torch.empty(b, d, **emb), torch.empty(b, d, **emb), torch.empty(k, d, dtype=dtype, device="meta")
    grad = torch.empty((), device="meta")
    for hard, self_logit in ((False, True), (False, False), (True, True)):  # SEED, --batch-in-queue, InfoNCE
        teacher_temp = 1.0 if hard else 1e-4
        _, lse, c = _triton_forward(s, t, queue, 0.2, teacher_temp, hard, launcher, self_logit)
        _triton_backward(grad, s, t, queue, lse, c, 0.2, teacher_temp, hard, launcher)
    enqueue_launch(kernels["enqueue_rows"], queue, torch.empty(1, dtype=torch.int64, device="meta"), t, 0, b)


def _configs(name: str, args, kwargs) -> list[dict]:
    """Launch options of each config the kernel can run with: the autotuner's configs after
    its own prune, or the plain launch."""
    kernel = _CUDA.get(name)
    if not isinstance(kernel, Autotuner):
        return [{}]
    kernel.nargs = dict(zip(kernel.arg_names, args))  # as Autotuner.run and .warmup set it
    try:
        return [config.all_kwargs() for config in kernel.prune_configs(kwargs)]
    finally:
        kernel.nargs = None


def _spec(x):
    return {"tensor": TRITON_NAMES[x.dtype]} if isinstance(x, torch.Tensor) else x


def _label(kernel: str, kwargs: dict) -> tuple[str, str]:
    flags = [flag.lower() for flag in ("HARD", "FP32") if kwargs.get(flag)]
    flags += ["noself"] if kwargs.get("SELF") is False else []
    name = kernel + (f"[{','.join(flags)}]" if flags else "")
    tiles = " ".join(f"{SHORT[k]}{v}" for k, v in sorted(kwargs.items()) if k in SHORT)
    options = f" w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"
    return name, tiles + options


def dtype_pair(name: str) -> tuple[torch.dtype, torch.dtype]:
    """(queue, embeddings) of a --dtypes entry: 'bf16' for both, 'fp16/bf16' for an fp16
    queue with bf16 embeddings (the fused kernels specialise on both pointer types)."""
    queue, _, embeddings = name.partition("/")
    return DTYPES[queue], DTYPES[embeddings or queue]


def build_jobs(archs, dtypes, batches, dims):
    """Unique compile jobs and the rows (shape → job) they serve."""
    jobs, rows, seen = [], [], {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for dtype_name in dtypes:
            queue_dtype, embed_dtype = dtype_pair(dtype_name)
            for b in batches:
                for d in dims:
                    calls = Recorder()
                    run_step(calls, arch, queue_dtype, b, d, embed_dtype=embed_dtype)
                    for name, args, kwargs in calls.calls:
                        fn = getattr(bodies, name)
                        binder = create_function_from_signature(fn.signature, fn.params, backend)
                        for options in _configs(name, args, kwargs):
                            call = {**kwargs, **options}
                            _, specialization, _ = binder(*args, **call)
                            key = repr((name, arch, specialization, sorted(call.items())))
                            if key not in seen:
                                seen[key] = len(jobs)
                                jobs.append({"id": len(jobs), "kernel": name, "arch": arch,
                                             "args": [_spec(x) for x in args], "kwargs": call})
                            rows.append({"job": seen[key], "arch": arch, "dtype": dtype_name, "B": b, "D": d,
                                         "kernel": _label(name, call)[0], "config": _label(name, call)[1]})
    return jobs, rows


def _worker_versions(python: list[str]) -> dict | str:
    """{'triton', 'python'} versions the workers will compile with, or why they cannot."""
    probe = "import platform, triton; print(triton.__version__, platform.python_version())"
    try:
        done = subprocess.run(python + ["-c", probe], capture_output=True, text=True)
    except OSError as e:
        return str(e)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    triton_version, python_version = done.stdout.split()
    return {"triton": triton_version, "python": python_version}


def compile_jobs(jobs, python: list[str], workers: int, cache_dir: str) -> dict:
    """Results by job id, compiled by `workers` processes of `python` running _aot_worker.py."""
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    shares = [jobs[i::workers] for i in range(workers)]

    def run(share):
        done = subprocess.run(python + [str(WORKER)], input=json.dumps(share), env=env,
                              capture_output=True, text=True)
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
            failed = {r["id"] for r in results}
            results += [{"id": j["id"], "error": f"worker exited {done.returncode}: {tail[0]}"}
                        for j in share if j["id"] not in failed]
        return results

    with ThreadPoolExecutor(workers) as pool:
        return {r["id"]: r for share in pool.map(run, [s for s in shares if s]) for r in share}


def problems(result: dict) -> list[str]:
    if "error" in result:
        return [result["error"]]
    found = []
    if result["shared"] > SHARED_LIMIT:
        found.append(f"shared memory {result['shared']} B > {SHARED_LIMIT} B")
    if result["tmem"] > TMEM_COLUMNS:
        found.append(f"tensor memory {result['tmem']} > {TMEM_COLUMNS} columns")
    if result["regs"] * 32 * result["num_warps"] > REGISTERS_PER_SM:
        found.append(f"{result['regs']} registers × {32 * result['num_warps']} threads > {REGISTERS_PER_SM}")
    if result["spill_stores"] or result["spill_loads"]:
        found.append(f"spills ({result['spill_stores']} B stored, {result['spill_loads']} B loaded)")
    if result["trap"]:
        found.append("trap in the kernel")
    return found


def _ranges(values) -> str:
    return ",".join(str(v) for v in sorted(values))


def summarise(rows, results) -> list[dict]:
    """One line per compiled kernel and the shapes it serves (same kernel, arch, dtype, config)."""
    lines = {}
    for row in rows:
        key = (row["kernel"], row["arch"], row["dtype"], row["config"], row["job"])
        line = lines.setdefault(key, {**{k: row[k] for k in ("kernel", "arch", "dtype", "config")},
                                      "B": set(), "D": set(), **results[row["job"]]})
        line["B"].add(row["B"])
        line["D"].add(row["D"])
    out = []
    for line in lines.values():
        line["problems"] = problems(line)
        out.append({**line, "B": sorted(line["B"]), "D": sorted(line["D"])})
    return sorted(out, key=lambda x: (x["arch"], x["dtype"], x["kernel"], x["D"], x["config"]))


def table(lines) -> str:
    out = ["| kernel | arch | dtype | B | D | config | regs | spills (B) | shared (B) | MMA | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in lines:
        if "error" in x:
            out.append(f"| {x['kernel']} | sm_{x['arch']} | {x['dtype']} | {_ranges(x['B'])} | {_ranges(x['D'])} "
                       f"| {x['config']} | – | – | – | – | FAIL: {x['error']} |")
            continue
        spills = x["spill_stores"] + x["spill_loads"]
        status = "ok" if not x["problems"] else "FAIL: " + "; ".join(x["problems"])
        out.append(f"| {x['kernel']} | sm_{x['arch']} | {x['dtype']} | {_ranges(x['B'])} | {_ranges(x['D'])} "
                   f"| {x['config']} | {x['regs']} | {spills} | {x['shared']} | {x['mma']} | {status} |")
    return "\n".join(out)


def _int_list(allowed=None, low=1, high=4096):
    def parse(text):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        bad = [v for v in values if (allowed and v not in allowed) or not allowed and not low <= v <= high]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: each value must be {'one of ' + str(sorted(allowed)) if allowed else f'in {low}..{high}'}")
        return values
    return parse


def _dtype_list(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(not 1 <= len(v.split("/")) <= 2 or not set(v.split("/")) <= set(DTYPES) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each entry must be a queue dtype ({', '.join(DTYPES)}), "
                                         "optionally /the embeddings' dtype, e.g. fp16/bf16")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the problem, exit code 2, as the other CLIs
        self.exit(2, f"error: {message}\n")


def main(argv=None) -> int:
    p = _Parser(prog="python -m fastseed.kernels.check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=_int_list(allowed=SMS), default=sorted(SMS), help="compute capabilities (90,100)")
    p.add_argument("--dims", type=_int_list(), default=list(DIMS), help="embedding widths D (1..4096)")
    p.add_argument("--batch", type=_int_list(), default=list(BATCHES), help="batch sizes B (1..4096)")
    p.add_argument("--dtypes", type=_dtype_list, default=list(DTYPES),
                   help="queue dtypes (bf16,fp16,fp32); QUEUE/EMBEDDINGS (e.g. fp16/bf16) for embeddings of "
                        "another dtype (default: the queue's)")
    p.add_argument("--cache-dir", help="also fill this Triton cache for a GPU run (see the module doc)")
    p.add_argument("--json", help="write the environment, limits and every compiled kernel to this file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    p.add_argument("--python", default=sys.executable,
                   help="command running the compile workers, e.g. 'env PYTHONPATH=.triton36 python3.12' "
                        "(default: this Python)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    python = shlex.split(args.python)
    versions = _worker_versions(python)
    if isinstance(versions, str):
        p.error(f"--python {args.python!r} cannot compile: {versions}")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        p.error(f"--cache-dir {args.cache_dir} exists and is not a directory")

    start = time.perf_counter()
    jobs, rows = build_jobs(args.arch, args.dtypes, args.batch, args.dims)
    with tempfile.TemporaryDirectory(prefix="fastseed-kernel-check-") as scratch:
        results = compile_jobs(jobs, python, min(args.jobs, len(jobs)), args.cache_dir or scratch)
    lines = summarise(rows, results)
    failed = [x for x in lines if x["problems"]]
    wall = time.perf_counter() - start
    print(table(lines))
    print(f"\n{len(jobs)} compilations (triton {versions['triton']}, Python {versions['python']}) "
          f"for {len(rows)} launches in {wall:.0f} s; {len(failed)} of {len(lines)} kernels fail")
    if args.json:
        from fastseed.provenance import provenance
        record = {"environment": {**provenance("cpu"), "compile_triton": versions["triton"],
                                  "compile_python": versions["python"]},
                  "limits": {"shared_bytes": SHARED_LIMIT, "tmem_columns": TMEM_COLUMNS,
                             "registers_per_sm": REGISTERS_PER_SM},
                  "grid": {"arch": args.arch, "dtypes": args.dtypes, "batch": args.batch, "dims": args.dims, "K": K},
                  "compilations": len(jobs), "wall_s": round(wall, 1), "kernels": lines}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
