"""Compile worker of check.py: reads a JSON list of compile jobs on stdin, compiles each for
its GPU target through triton's own JIT specialisation, prints one JSON result per job.

It runs by path (`python kernels/_aot_worker.py`) and imports triton and bodies.py only, so
it also runs under a Python that has no torch: the GPU machine's Python 3.12 with its
triton, whose cache keys are the ones that machine's JIT computes (they hash libtriton.so,
which differs between the builds for each Python version).

Resources come from ptxas itself (`ptxas -v`, which triton runs and prints when asked):
registers and spill bytes. Shared and tensor memory come from the kernel's metadata.
"""

import contextlib
import io
import json
import re
import sys
import time

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import bodies

MMA = [("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"), ("mma.sync", "mma.sync")]


class Pointer:
    """What the JIT's specialisation reads of a tensor: its dtype and its address (0 is
    16-byte aligned, like every fresh allocation)."""

    def __init__(self, dtype: str):
        self.dtype = tl.dtype(dtype)

    def data_ptr(self) -> int:
        return 0


def _ptxas_number(pattern: str, log: str) -> int:
    found = re.findall(pattern, log)
    if not found:
        raise RuntimeError(f"no '{pattern}' in the ptxas log: {log[-500:]!r}")
    return max(int(x) for x in found)


def compile_job(job: dict) -> dict:
    fn = getattr(bodies, job["kernel"])
    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    args = [Pointer(a["tensor"]) if isinstance(a, dict) else a for a in job["args"]]
    kwargs = dict(job["kwargs"])
    # What JITFunction.run adds before it specialises the call.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = kernel.asm["ptx"]
    log = log.getvalue()
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "regs": _ptxas_number(r"Used (\d+) registers", log),
        "spill_stores": _ptxas_number(r"(\d+) bytes spill stores", log),
        "spill_loads": _ptxas_number(r"(\d+) bytes spill loads", log),
        "shared": kernel.metadata.shared,
        "tmem": getattr(kernel.metadata, "tmem_size", None) or 0,
        "num_warps": kernel.metadata.num_warps,
        "mma": next((name for name, op in MMA if op in ptx), "none"),
        "trap": "trap;" in ptx,
        "cache_key": kernel.hash,
    }


def main() -> None:
    # Every job compiles (no cache hit), so that ptxas runs and prints its resource report.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    for job in json.load(sys.stdin):
        try:
            result = compile_job(job)
        except Exception as e:  # reported as that row's failure; the other jobs go on
            result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        print(json.dumps({"id": job["id"], **result}), flush=True)


if __name__ == "__main__":
    main()
