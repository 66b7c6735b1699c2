"""fastseed.kernels.check: the ahead-of-time launchability check and the Triton cache it fills.

The full grid (both archs, every D, B and dtype) is `make kernel-check`, its own CI step; here
one slice of it compiles for sm_90, and a second process that plays the GPU run's JIT (a
stand-in driver reporting sm_90, the kernels' own warmup path) must find every kernel of a
B=256, K=65536 step at D=128 (fused) and D=2048 (tiled) in that cache, after the repository
was copied elsewhere; and a cache made as `make gpu-wheels` makes it must be found by such a
process run as `make gpu-check` runs its steps.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastseed.kernels import check

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"  # the GPU check's tooling
sys.path.insert(0, str(BENCHMARKS))

JIT_RUN = r'''
import sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class Sm90:
    """What JITFunction.run asks of the active driver before it looks up its cache."""
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


driver.set_active(Sm90())
from fastseed.kernels import bodies, check
from fastseed.kernels.enqueue import _launch
from fastseed.kernels.seed_loss import _CUDA


class Warmup(dict):
    """Kernel table whose launches compile (or find in the cache) without running."""
    def __missing__(self, name):
        kernel = _CUDA.get(name) or getattr(bodies, name)

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: kernel.warmup(*args, grid=grid, **kwargs)
        return Launch()


for action in sys.argv[1:]:
    if action == "fp16":  # an enqueue into an fp16 queue, which the check was not asked for
        meta = dict(dtype=torch.float16, device="meta")
        _launch(Warmup()["enqueue_rows"], torch.empty(65536, 128, **meta),
                torch.empty(1, dtype=torch.int64, device="meta"), torch.empty(256, 128, **meta), 0, 256)
    else:  # a bf16 training step at each D listed, e.g. "128,2048"
        for d in map(int, action.split(",")):
            check.run_step(Warmup(), 90, torch.bfloat16, 256, d, k=65536)
'''


def test_problems_names_each_limit():
    ok = dict(shared=98304, tmem=0, regs=214, num_warps=4, spill_stores=0, spill_loads=0, trap=False)
    assert check.problems(ok) == []
    for change, words in [(dict(shared=232_449), "shared memory"), (dict(tmem=544), "tensor memory"),
                          (dict(regs=255, num_warps=16), "registers"), (dict(spill_stores=24), "spills"),
                          (dict(spill_loads=8), "spills"), (dict(trap=True), "trap")]:
        found = check.problems({**ok, **change})
        assert len(found) == 1 and words in found[0], (change, found)
    assert check.problems({"error": "PTXASError: ptxas failed"}) == ["PTXASError: ptxas failed"]


@pytest.mark.parametrize("args,needle", [(["--arch", "80"], "--arch"), (["--dims", "0"], "--dims"),
                                         (["--dtypes", "fp8"], "--dtypes"), (["--dtypes", "fp16/fp8"], "--dtypes"),
                                         (["--dtypes", "fp16/bf16/fp32"], "--dtypes"), (["--batch", "x"], "--batch"),
                                         (["--python", "no-such-python"], "--python")])
def test_bad_arguments_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:
        check.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_queue_and_embedding_dtypes_are_compiled_as_named():
    """A QUEUE/EMBEDDINGS entry compiles the launches of bf16 embeddings against an fp16 queue
    (the fused kernels take both pointers); a plain entry has embeddings of the queue's dtype."""
    def pointers(entry):
        jobs, _ = check.build_jobs([90], [entry], [256], [128])
        split = next(j for j in jobs if j["kernel"] == "fused_fwd_split")
        enqueue = next(j for j in jobs if j["kernel"] == "enqueue_rows")
        return [a["tensor"] for a in split["args"][:3]], [a["tensor"] for a in enqueue["args"][:3]]

    assert pointers("fp16") == (["fp16", "fp16", "fp16"], ["fp16", "int64", "fp16"])
    assert pointers("fp16/bf16") == (["bf16", "bf16", "fp16"], ["fp16", "int64", "bf16"])


@pytest.mark.slow
def test_check_slice_launches_and_fills_the_cache_the_jit_finds(tmp_path):
    repo = tmp_path / "here"
    repo.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fastseed.kernels.check", "--arch", "90", "--dims", "128,2048",
                           "--batch", "256", "--dtypes", "bf16", "--cache-dir", "triton-cache", "--json", "out.json"],
                          cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = json.loads((repo / "out.json").read_text())["kernels"]
    assert all(not k["problems"] for k in kernels)
    names = {k["kernel"] for k in kernels}
    assert {"fused_fwd_split", "fused_fwd_split[hard]", "fused_bwd_split", "fused_fwd_merge", "fused_bwd_reduce",
            "tiled_stats", "tiled_stats[hard]", "tiled_probs", "tiled_probs[hard]", "enqueue_rows"} <= names
    # Every autotuner config of the split kernels is there, on Hopper's tensor cores.
    splits = [k for k in kernels if k["kernel"].split("[")[0] in ("fused_fwd_split", "fused_bwd_split",
                                                                  "tiled_stats", "tiled_probs")]
    assert {k["config"].split(" BK")[1].split(" s")[0] for k in splits} == {"64 w4", "128 w8"}
    assert all(k["mma"] == "wgmma" for k in splits)

    # The repository moves (as it does to the GPU machine); the JIT looks in the same relative dir.
    moved = tmp_path / "there"
    shutil.copytree(repo, moved)
    shutil.rmtree(repo)
    cache = moved / "triton-cache"
    env = dict(os.environ, TRITON_CACHE_DIR="triton-cache")
    before = set(os.listdir(cache))
    jit = subprocess.run([sys.executable, "-c", JIT_RUN, "128,2048"], cwd=moved, env=env, capture_output=True,
                         text=True, timeout=900)
    assert jit.returncode == 0, jit.stderr[-3000:]
    assert set(os.listdir(cache)) == before, "the JIT compiled kernels the check had not cached"
    # The control: a launch the check was not asked for (fp16 queue) does compile a new entry.
    jit = subprocess.run([sys.executable, "-c", JIT_RUN, "fp16"], cwd=moved, env=env, capture_output=True,
                         text=True, timeout=900)
    assert jit.returncode == 0, jit.stderr[-3000:]
    assert len(set(os.listdir(cache)) - before) == 1


@pytest.mark.slow
def test_gpu_wheels_cache_is_found_by_the_gpu_check_steps(tmp_path):
    """A cache compiled and packed by gpu_wheels.triton_cache (the check under this Python's
    triton: make gpu-wheels runs it under the GPU machine's), carried to another folder and
    unpacked by gpu_check.prepare_triton_cache, with the Triton variables of the GPU check's
    steps: a JIT process run from a third folder finds every entry of a D=128 step, and the
    lookup log the check summarises says so and names the one launch outside the cache."""
    import gpu_check
    import gpu_wheels

    built, carried, steps = tmp_path / "built", tmp_path / "carried", tmp_path / "steps"
    for d in (built, carried, steps):
        d.mkdir()

    def compile_here(args):  # this Python's triton (make gpu-wheels: the GPU machine's, under its Python)
        return [sys.executable, "-m", "fastseed.kernels.check", *args]

    gpu_wheels.triton_cache(built / "triton-cache", built / "triton-cache.tar.xz", check=compile_here,
                            grid=["--arch", "90", "--dims", "128", "--batch", "256", "--dtypes", "bf16"])
    archive = Path(shutil.move(built / "triton-cache.tar.xz", carried))
    shutil.rmtree(built)  # where it was compiled is gone, as on the GPU machine

    cache, lookups = carried / "unpacked", tmp_path / "lookups.jsonl"
    kernels = gpu_check.prepare_triton_cache(archive, cache)
    env = dict(os.environ, PYTHONPATH=str(BENCHMARKS), **gpu_check.triton_env(cache, lookups))
    jit = subprocess.run([sys.executable, "-c", JIT_RUN, "128", "fp16"], cwd=steps, env=env, capture_output=True,
                         text=True, timeout=900)
    assert jit.returncode == 0, jit.stderr[-3000:]
    found = gpu_check.cache_lookups(lookups, kernels)
    assert len(kernels) >= 9 and found["found"] == len(kernels), found["table"]
    assert found["missed"] == {"enqueue_rows": 1} and found["others_compiled"] == 0, found["table"]
    assert len(os.listdir(cache)) == len(kernels) + 1
