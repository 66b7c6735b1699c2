"""The GPU check rehearsed here on the CPU under the GPU machine's own stack (`make gpu-rehearse`,
by hand, not in CI: it downloads ~4 GB once).

    make gpu-wheels && make gpu-rehearse        # .venv/bin/python benchmarks/gpu/gpu_rehearse.py

1. A Python 3.12 virtual environment, build/gpu-rehearse/py312 (git-ignored), with the GPU
   image's versions (PINS: PyPI's torch 2.11.0 for cp312 is its CUDA build, which runs on the
   CPU) and nothing of fastseed's: no ffcv, no weights, exactly what the image lacks.
2. A copy of the tree as the device receives it (build/gpu-rehearse/tree): the files git
   tracks or does not ignore, then the carried `.whl/`; no `.git`, no `.venv`, no build/.
3. In that copy, with that environment's python3 first on PATH and no PYTHONPATH, every call of
   the plan (gpu_check.CALLS) one after the other, as the GPU checklist runs them:
   `python3 benchmarks/gpu/gpu_check.py --call N --dry --scratch S` (one scratch folder: the second
   call reuses the first's install, as on a warm machine). The install is the real one (the
   carried wheels, the tree, the Triton cache), only the sizes are the dry run's.
4. Checks that the carried wheels were installed and used (ffcv imported from the install, not
   from the interpreter) and prints each step's time against the H200 plan.

Exits non-zero when a call fails, a step fails or a wheel was not installed. Prints the table
benchmarks/gpu/README.md quotes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "gpu-rehearse"
VENV = BUILD / "py312"
TREE = BUILD / "tree"
# The GPU image's packages (its python3 holds them; pip's resolver brings their dependencies).
# numpy 2.5 with triton 3.6 is the pair whose interpreter needs kernels/_interpret.py's shim.
PINS = ["torch==2.11.0", "torchvision==0.26.0", "triton==3.6.0", "numpy==2.5.2", "timm==1.0.31", "numba==0.68.1",
        "opencv-python-headless", "pytest", "tqdm", "psutil", "setuptools"]
PY312_CANDIDATES = ("python3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12")


def python312() -> str:
    for candidate in filter(None, (os.environ.get("PY312"), *PY312_CANDIDATES)):
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
        except OSError:
            continue
        if out == "True":
            return candidate
    sys.exit("error: no Python 3.12 found: set PY312=/path/to/python3.12")


def build_venv() -> Path:
    """The environment, made once; made again when PINS change (its stamp lists them)."""
    py, stamp = VENV / "bin" / "python", VENV / ".pins"
    if py.exists() and stamp.is_file() and stamp.read_text().split() == PINS:
        return py
    t0 = time.monotonic()
    subprocess.run([python312(), "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS], check=True)
    stamp.write_text("\n".join(PINS) + "\n")
    print(f"[rehearse] {VENV.relative_to(ROOT)}: {', '.join(PINS)} ({time.monotonic() - t0:.0f} s)", flush=True)
    return py


def versions(py: Path) -> str:
    code = ("import importlib.metadata as m, sys; print(f'Python {sys.version.split()[0]}, ' + ', '.join("
            "f'{n} {m.version(n)}' for n in ('torch', 'torchvision', 'triton', 'numpy', 'timm', 'numba')))")
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def copy_tree() -> Path:
    """The tree as the run tool lays it on the device: what git tracks or does not ignore (so an
    uncommitted change travels too), links kept as links, then .whl/; nothing else."""
    wheels = ROOT / ".whl"
    if not any(wheels.glob("*.whl")):
        sys.exit("error: no wheels in .whl/: run `make gpu-wheels` first (the rehearsal installs what the device gets)")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    shutil.rmtree(TREE, ignore_errors=True)
    for rel in filter(None, listed):
        src, dst = ROOT / rel, TREE / rel
        if not src.exists() and not src.is_symlink():  # deleted, not yet committed
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(wheels, TREE / ".whl", symlinks=True)
    return TREE


def tree_mib(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def run_call(py: Path, call: int, out: Path, scratch: Path) -> tuple[int, float, str]:
    """One call of the plan in the copied tree, as the device runs it: `python3` found on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "FASTSEED_", "TRITON_",
                                                                        "TORCHINDUCTOR_"))}
    env["PATH"] = f"{py.parent}{os.pathsep}{env.get('PATH', '')}"
    # the device's tree has no history: git must not find this checkout above the copy
    env["GIT_CEILING_DIRECTORIES"] = str(BUILD)
    cmd = ["python3", "benchmarks/gpu/gpu_check.py", "--call", str(call), "--dry", "--out", str(out),
           "--scratch", str(scratch)]
    print(f"[rehearse] call {call}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    lines = []
    with subprocess.Popen(cmd, cwd=TREE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:  # as it comes, like the run tool's output
            print(line, end="", flush=True)
            lines.append(line)
    return proc.returncode, time.monotonic() - t0, "".join(lines)


def table(out: Path) -> tuple[list[list], list[str]]:
    """Each step of each call: its status, its time here, and the plan's expected time and cap."""
    from gpu_check import CALLS, EXPECTED_S, STEPS
    plan = {s.name: s for s in STEPS}
    rows, problems = [], []
    for r in map(json.loads, (out / "gpu_check.jsonl").read_text().splitlines()):
        if "status" not in r:
            continue
        call = next((n for n, c in CALLS.items() if r["step"] in c.steps), None)
        if r["run"].endswith(tuple(f"-call{n}" for n in CALLS)):
            call = int(r["run"].rsplit("call", 1)[1])
        step = plan.get(r["step"])
        rows.append([call, r["step"], r["status"][:110], r["wall_s"],
                     step.expected_s if step else EXPECTED_S.get(r["step"]), step.cap_s if step else r.get("cap_s")])
        if not r["status"].startswith(("ok", "skipped: no CUDA", "skipped: dry, ")) and r["step"] != "triton-cache":
            problems.append(f"{r['step']}: {r['status']}")
    return rows, problems


def main() -> int:
    t_all = time.monotonic()
    py = build_venv()
    stack = versions(py)
    tree = copy_tree()
    print(f"[rehearse] {stack}", flush=True)
    print(f"[rehearse] tree as carried: {tree_mib(tree):.1f} MiB ({tree_mib(tree / '.whl'):.1f} MiB of .whl/; "
          f"limit 64 MiB)", flush=True)
    out, scratch = BUILD / "out", BUILD / "scratch"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    from gpu_check import CALLS
    calls = []
    for n in CALLS:
        rc, wall, stdout = run_call(py, n, out, scratch)
        calls.append((n, rc, wall))
    rows, problems = table(out)
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    env = next((r["result"] for r in records if r.get("step") == "a-environment" and "result" in r), {})
    installs = [r["status"] for r in records if r.get("step") == "install"]
    if "the install" not in str(env.get("ffcv_from")):
        problems.append(f"ffcv came from {env.get('ffcv_from')}, not from the carried wheel")
    if not installs or not any("ffcv-" in s for s in installs[:1]):
        problems.append(f"the first call did not install the ffcv wheel: {installs[:1]}")
    if len(installs) > 1 and not all(s.startswith("ok: reused") for s in installs[1:]):
        problems.append(f"a later call did not reuse the install: {installs[1:]}")
    problems += [f"call {n} exited {rc}" for n, rc, _ in calls if rc]
    print("\n| call | step | status | s here (CPU, dry sizes) | expected s (H200) | cap s |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join("–" if x is None else str(x) for x in row) + " |")
    print("\n" + ", ".join(f"call {n}: {wall:.0f} s" for n, _, wall in calls) +
          f"; environment, copy and calls: {time.monotonic() - t_all:.0f} s")
    print(f"{stack}; ffcv from {env.get('ffcv_from')}; commit {env.get('commit')}; {env.get('triton_cache_match')}; "
          f"{env.get('shm')}")
    if problems:
        print("\nerror: the rehearsal failed:\n  " + "\n  ".join(problems))
        return 1
    print("\nrehearsal passed: every call ran, every step ok (or skipped: no CUDA, or dry), the carried wheels used")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--venv"]:
        print(versions(build_venv()))
        sys.exit(0)
    sys.exit(main())
