"""The GPU check: every GPU measurement of fastseed in one call that cannot waste the window.

    python3 benchmarks/gpu_check.py                 # the GPU machine (`make gpu-check`; carry .whl/)
    python3 benchmarks/gpu_check.py --steps c,g     # only these steps (a rerun)
    .venv/bin/python benchmarks/gpu_check.py --dry  # any CPU, tiny sizes (`make gpu-check-dry`; CI)

First it installs, with pip and no index, the carried wheels (`.whl/*.whl` from `make
gpu-wheels`: ffcv, the EfficientNet-Lite0 weights) and then this tree into a scratch folder
(`--target`: the machine's torch, triton, timm, numba and numpy stay as they are), unpacks
the carried Triton cache (`.whl/triton-cache.tar.xz`) into the scratch folder for
TRITON_CACHE_DIR (see prepare_triton_cache) and points FASTSEED_FASHION_MNIST at
`.whl/fashion-mnist`. Then it runs the steps below in order, each in a process of its own,
started outside the tree (so that only the installed copy can be imported) and killed with its
children at its time cap. The steps append JSON lines to OUT/gpu_check.jsonl, their output goes
to OUT/gpu_check.log, and OUT/summary.md is written again after each step: a cap or a crash
keeps what came before, and a failed step records its error while the check goes on. OUT is
--out, else $OUT, else benchmarks/results/gpu_check/ (the dry run: build/gpu_check_dry/).
The whole check stops starting steps once --budget seconds (default 480) have passed. Every
Triton lookup of the steps is logged (triton_lookups.py), and the summary ends with the
kernels the carried cache served and those compiled during the check.

The dry run is the same script on the CPU at tiny sizes, the offline install of the tree
included (the wheels are cp312 builds for the GPU machine, and CI has none: the interpreter's
own ffcv and weights serve); the CUDA-only parts record "skipped: no CUDA".

Adding a step: write `def step_x(ctx) -> dict` (what it measured; `ctx.record(row=...)` keeps a
row as it goes, `"table"` in the returned dict is shown in the summary, `"failed"` says what
failed while the rest of the result is kept; an exception fails it too) and add a `Step` to STEPS
with its expected time on the H200 and its cap. A step that runs a benchmark another change adds
names it in `needs=`: until that file exists the step is skipped with a note.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = ROOT / ".whl"
CACHE_ARCHIVE = WHEELS / "triton-cache.tar.xz"  # make gpu-wheels: kernels compiled ahead for sm_90
JSONL, LOG, SUMMARY = "gpu_check.jsonl", "gpu_check.log", "summary.md"
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
    for name in ("torch", "triton", "timm", "numba", "numpy", "ffcv", "opencv-python-headless"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
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
    return info | {"table": md_table(["what", "value"], [[k, v] for k, v in info.items()])}


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
    from bench_kernels import make_inputs
    from fastseed.kernels import reference as ref

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
        diff = (queue.float() - want.float()).abs().max().item()
        return dict(max_abs_diff=diff, ok=diff == 0 and ptr.item() == want_ptr.item())

    rows = []
    for d in WIDTHS:
        for dtype in dtypes:
            inputs = make_inputs(b, k, d, ctx.device, dtype)
            cases = [(name, lambda f=fused, o=oracle, tt=temps: loss_case(f, o, tt, *inputs))
                     for name, fused, oracle, temps in ops] + [("enqueue_", lambda: enqueue_case(*inputs))]
            for name, case in cases:
                row = dict(op=name, D=d, dtype=str(dtype).removeprefix("torch."))
                try:
                    row |= case()
                except Exception as e:  # one case that cannot run must not hide the others
                    row |= dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                ctx.record(row=row)
                rows.append(row)
            del inputs
    tests = run_pytest(ctx, "tests/test_kernels.py")
    table = md_table(["op", "D", "dtype", "loss rel err", "grad cos", "max abs diff", "ok"],
                     [[r["op"], r["D"], r["dtype"], r.get("loss_rel_err"), r.get("grad_cos"), r.get("max_abs_diff"),
                       r.get("error", r["ok"])] for r in rows])
    failed = []
    if any(not r["ok"] for r in rows):
        failed.append(f"{sum(not r['ok'] for r in rows)} case(s) failed or outside loss rel err {LOSS_REL_ERR} / "
                      f"grad cos {GRAD_COS} / exact enqueue")
    if not tests["ok"]:
        failed.append(f"tests/test_kernels.py: {tests['summary']}")
    return {"table": table + f"\n\n`pytest tests/test_kernels.py -m gpu`: {tests['summary']}",
            "failed": "; ".join(failed) or None}


def step_kernels(ctx: Ctx) -> dict:
    """benchmarks/bench_kernels.py at B=256, K=65536 and D in (128, 2048): the fused loss against
    the eager reference, torch.compile of it and the SDPA form, with its floors and peak extra
    memory, each timed eagerly and replayed as a CUDA graph."""
    import bench_kernels as bk

    impls = "fused,eager,sdpa" if ctx.dry else "fused,eager,compiled,sdpa"
    rows, errors = [], []
    for d in (128, 2048):
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
    floors = sorted({key for r in rows for key in r if key.startswith("floor")})
    table = md_table(["D", "impl", "eager µs", "CUDA graph µs", "× vs eager", "peak extra MiB", "loss rel err",
                      "grad cos", *floors],
                     [[r["D"], r["impl"], r["us"], r["graph_us"], r.get("x_vs_eager"),
                       None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20,
                       r["loss_rel_err"], r["grad_cos"], *(r.get(f) for f in floors)] for r in rows])
    return {"table": table, "failed": "; ".join(errors) or None}


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


def step_no_host_sync(ctx: Ctx) -> dict:
    """tests/test_gpu.py's CUDA cases: a training step (SEED, MoCo, SimReg; eager and compiled)
    never waits for the device."""
    tests = run_pytest(ctx, "tests/test_gpu.py")
    return {"table": f"`pytest tests/test_gpu.py -m gpu`: {tests['summary']}",
            "failed": None if tests["ok"] else f"tests/test_gpu.py: {tests['summary']}"}


def step_knn(ctx: Ctx) -> dict:
    """benchmarks/bench_knn.py: a 50k x 10k bank of width 512 (tiny on the CPU); target < 1 s."""
    import bench_knn

    res = bench_knn.main(["--device", ctx.device, "--tiny", "--repeats", "1"] if ctx.dry
                         else ["--device", ctx.device, "--repeats", "5"])
    size = f"{res['n_train']} x {res['n_test']} x {res['dim']}"
    return {"median_s": res["median_s"], "target_met": None if ctx.dry else res["median_s"] < 1.0,
            "table": md_table(["size", "median s", "min s", "target < 1 s"],
                              [[size, res["median_s"], res["min_s"], "–" if ctx.dry else res["median_s"] < 1.0]])}


def step_data(ctx: Ctx) -> dict:
    """benchmarks/bench_data.py: the FFCV loader (16 workers) against torchvision on the same
    ~3.8k JPEGs at 224 px, generated here in parallel and kept for the training step."""
    import bench_data

    args = (["--res", "32", "--images", "96", "--batch", "32", "--epochs", "1"] if ctx.dry else
            ["--res", "224", "--images", "3840", "--batch", "256", "--epochs", "2"])
    res = bench_data.main([*args, "--workers", str(ctx.workers()), "--device", ctx.device,
                           "--data-dir", str(ctx.scratch / "jpegs")])
    return {"result": res, "table": md_table(
        ["res", "images", "workers", "fastseed img/s", "torchvision img/s", "ratio"],
        [[res["res"], res["images"], res["workers"], res["fastseed_images_per_s"], res["torchvision_images_per_s"],
          res["speedup"]]])}


def step_train(ctx: Ctx) -> dict:
    """benchmarks/bench_train.py, 224 px, batch 256: ResNet-50 -> ResNet-18 / EfficientNet-B0 /
    MobileNetV3-L, 4 warm-up and 10 timed steps each: fastseed vs the official-style loop vs
    synthetic data (the JPEGs of the data step)."""
    import bench_train

    res = bench_train.run_all(tiny=ctx.dry, steps=2 if ctx.dry else 10, warmup=None if ctx.dry else 4,
                              workers=ctx.workers(), data_dir=str(ctx.scratch / "jpegs"),
                              on_row=lambda row: ctx.record(row=row))
    return {"table": bench_train.table(res)}


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
    proc = subprocess.run([str(bin_dir / "fastseed-train"), *args], cwd=demo, capture_output=True, text=True)
    print(proc.stdout, proc.stderr[-6000:], sep="\n")
    if proc.returncode:
        raise RuntimeError(f"fastseed-train exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    lines = proc.stdout.splitlines()
    table = [line for line in lines if line.startswith(("k-NN", "|", "done:"))]
    return {"stdout": proc.stdout, "table": "\n".join(table)}


def run_optional(script: str, args: list[str]) -> Callable[[Ctx], dict]:
    """A benchmark another change adds, in its program mode (`--out FILE`, JSON)."""
    def step(ctx: Ctx) -> dict:
        out = ctx.scratch / f"{Path(script).stem}.json"
        subprocess.run([sys.executable, str(HERE / script), *args, "--out", str(out)], cwd=ctx.scratch, check=True)
        text = out.read_text()
        try:
            result = json.loads(text)
        except json.JSONDecodeError:  # JSON lines
            result = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {"result": result, "table": f"`{script} {' '.join(args)}`: see {JSONL}"}
    return step


def run_pytest(ctx: Ctx, test_file: str) -> dict:
    """The CUDA cases (-m gpu) of one test file, against the installed copy (started outside the
    tree, so the tree's own folders cannot shadow it)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / test_file), "-m", "gpu", "-q",
                           "-p", "no:cacheprovider", "--rootdir", str(ROOT)],
                          cwd=ctx.scratch, capture_output=True, text=True)
    print(proc.stdout[-8000:], proc.stderr[-4000:], sep="\n")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else f"exit {proc.returncode}, no output"
    ctx.record(pytest=test_file, summary=summary, exit=proc.returncode)
    return {"ok": proc.returncode == 0, "summary": summary}


@dataclass
class Step:
    name: str
    run: Callable[[Ctx], dict]
    expected_s: int           # on the H200, after the install (estimates until a run replaces them)
    cap_s: int
    needs: str | None = None  # a file another change adds: skipped with a note until it exists
    cuda_only: bool = False   # the dry run records "skipped: no CUDA"


STEPS = [
    Step("a-environment", step_environment, 10, 60),
    Step("b-correctness", step_correctness, 40, 120),   # 6 widths x dtypes of both losses; oracle in fp64
    Step("c-kernels", step_kernels, 60, 150),           # torch.compile of the reference: ~20 s per width
    Step("d-no-host-sync", step_no_host_sync, 50, 150),  # 3 compiled resnet10t steps
    Step("e-knn", step_knn, 10, 60),
    Step("f-data", step_data, 40, 120),                 # 3840 JPEGs on 16 cores, 3 epochs each way
    Step("g-train", step_train, 150, 240),              # 3 pairs: compile of student and teacher dominates
    Step("h-demo", step_demo, 90, 180),                 # betons, compile at 32/48 px, 500 steps, 4 k-NN
    # late, optional: run when their benchmark is in the tree and time is left
    Step("i-multi", run_optional("bench_multi.py", ["--res", "224", "--device", "cuda"]), 60, 120,
         needs="benchmarks/bench_multi.py", cuda_only=True),
    Step("j-cache", run_optional("bench_cache.py", ["--res", "224", "--device", "cuda", "--epochs", "1",
                                                    "--compile", "off"]), 60, 120,
         needs="benchmarks/bench_cache.py", cuda_only=True),
]
EXPECTED_S = {"install": 20}  # what is not a step: pip and no index, the wheels and the tree


# ---------------------------------------------------------------- install, Triton cache, provenance
class InstallError(RuntimeError):
    pass


def install(site: Path, dry: bool, log: Path) -> list[str]:
    """The carried wheels (not in the dry run) and then this tree, with pip and no index, into
    `site`. Returns what was installed."""
    shutil.rmtree(site, ignore_errors=True)
    wheels = [] if dry else sorted(WHEELS.glob("*.whl"))
    if not dry and not wheels:
        raise InstallError(f"no wheels in {WHEELS}: run `make gpu-wheels` where PyPI is reachable and carry .whl/")
    # pip builds in the source folder: a copy keeps build/ and *.egg-info out of the tree
    src = site.with_name("src")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copy2(ROOT / "setup.py", src)
    for package in (p.parent for p in ROOT.glob("*/__init__.py")):
        shutil.copytree(package, src / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(site)]
    for what in ([str(w) for w in wheels], ["--no-build-isolation", str(src)]):
        if not what:
            continue
        with open(log, "a") as f:
            proc = subprocess.run([*pip, *what], stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise InstallError(f"pip install {' '.join(Path(w).name for w in what)} exited {proc.returncode} "
                               f"(see {log.name})")
    return [Path(w).name for w in wheels] + ["fastseed (this tree)"]


def prepare_triton_cache(archive: Path, dest: Path) -> dict[str, str]:
    """Unpack the carried Triton cache at `dest` so that the steps' JIT finds it; returns the
    kernel of each entry ({entry: kernel}).

    An entry's group file (__grp__KERNEL.json) lists its files as os.path.join(TRITON_CACHE_DIR,
    entry, file), with the folder as the compiling process was given it, and Triton takes a
    listed file that does not exist, seen from the current directory, for a miss. The cache
    was compiled in another folder on another machine and the steps run from the scratch
    folder, so the files are listed again by their absolute paths under `dest`, which every
    step sees alike."""
    dest = dest.resolve()
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
    `make gpu-wheels` left in .whl/ when the tree is still the one it stamped."""
    from fastseed.provenance import git_commit
    commit = git_commit(ROOT)
    stamp = WHEELS / "SOURCE.json"
    if commit or not stamp.is_file():
        return commit
    stamped = json.loads(stamp.read_text())
    if stamped["tree"] == tree_digest():
        return stamped["commit"]
    return f"unknown: the tree differs from {stamped['commit']}, stamped by make gpu-wheels"


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


def step_env(site: Path, cache: Path | None, lookups: Path) -> dict:
    # HERE: triton_lookups, the cache manager every Triton compile of the steps loads
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{HERE}", PYTHONUNBUFFERED="1",
               PATH=f"{site / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", **triton_env(cache, lookups))
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


def select(names: str | None) -> list[Step]:
    if not names:
        return STEPS
    wanted = names.split(",")
    unknown = [w for w in wanted if not any(s.name == w or s.name.split("-")[0] == w for s in STEPS)]
    if unknown:
        raise SystemExit(f"error: unknown step(s) {', '.join(unknown)}: choose from {', '.join(s.name for s in STEPS)}")
    return [s for s in STEPS if s.name in wanted or s.name.split("-")[0] in wanted]


def drive(args) -> int:
    dry = args.dry
    out = Path(args.out or os.environ.get("OUT") or (ROOT / "build" / "gpu_check_dry" if dry
                                                      else HERE / "results" / "gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fastseed-gpu-check-")).resolve()
    site = scratch / "site"
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    steps = select(args.steps)
    deadline = time.monotonic() + args.budget
    log = out / LOG

    def done(name, status, t0=None, step=None):
        append_json(out / JSONL, {"run": run_id, "step": name, "status": status,
                                  "wall_s": None if t0 is None else round(time.monotonic() - t0, 1),
                                  "expected_s": step.expected_s if step else EXPECTED_S.get(name),
                                  "cap_s": step.cap_s if step else None})
        write_summary(out, run_id, dry)
        print(f"[gpu-check] {name}: {status}", flush=True)

    t0 = time.monotonic()
    try:
        installed = install(site, dry, log)
    except InstallError as e:
        done("install", f"failed: {e}", t0)
        return 1
    done("install", "ok: " + ", ".join(installed), t0)
    cache, carried, no_cache = None, {}, f"no {CACHE_ARCHIVE.name} (make gpu-wheels)"
    if not dry and CACHE_ARCHIVE.is_file():
        try:
            carried = prepare_triton_cache(CACHE_ARCHIVE, scratch / "triton-cache")
            cache = scratch / "triton-cache"
        except (OSError, tarfile.TarError, ValueError, KeyError) as e:  # the steps can still compile
            no_cache = f"{CACHE_ARCHIVE.name} unusable: {e}"
    lookups = scratch / "triton_lookups.jsonl"
    env = step_env(site, cache, lookups)
    failed = []
    for step in steps:
        left = deadline - time.monotonic()
        if step.needs and not (ROOT / step.needs).is_file():
            done(step.name, f"skipped: {step.needs} is not in this tree", step=step)
            continue
        if dry and step.cuda_only:
            done(step.name, "skipped: no CUDA", step=step)
            continue
        if left < 10:
            done(step.name, f"skipped: the {args.budget} s budget is spent (run it alone: --steps {step.name})",
                 step=step)
            continue
        cap = min(step.cap_s, left)
        t0 = time.monotonic()
        with open(log, "a") as f:
            f.write(f"\n===== {step.name} (cap {cap:.0f} s) =====\n")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--in-step", step.name, "--out", str(out),
               "--scratch", str(scratch), "--run-id", run_id, *(["--dry"] if dry else [])]
        rc = run_capped(cmd, cap_s=cap, env=env, cwd=scratch, log=log)
        status = "ok" if rc == 0 else (f"capped at {cap:.0f} s" if rc is None else
                                       "failed: " + _failure(out, run_id, step.name, log))
        if rc != 0:
            failed.append(step.name)
        done(step.name, status, t0, step)
    if not dry:
        found = cache_lookups(lookups, carried)
        append_json(out / JSONL, {"run": run_id, "step": "triton-cache", "result": found})
        done("triton-cache", found["status"] if cache else f"none carried, {no_cache}: {found['status']}")
    print(f"[gpu-check] {out / SUMMARY}")
    return 1 if failed else 0


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
    ctx = Ctx(step.name, args.dry, Path(args.out), Path(args.scratch), Path(args.scratch) / "site", args.run_id)
    result = step.run(ctx)
    ctx.record(result=result)
    return 1 if result.get("failed") else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes (CI)")
    p.add_argument("--steps", help="comma-separated step names or letters (default: all)")
    p.add_argument("--out", help="results folder (default: $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--scratch", help="work folder (default: a new temporary one)")
    p.add_argument("--budget", type=float, default=480, help="start no step after this many seconds")
    p.add_argument("--in-step", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return in_step(args) if args.in_step else drive(args)


if __name__ == "__main__":
    sys.exit(main())
