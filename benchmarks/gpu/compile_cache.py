"""torch.compile's work carried from one GPU window to the next (torch.compiler's cache artifacts).

Every process of the GPU check that compiles (a step's own process, its pytest run, the demo's
fastseed-train) saves what it compiled with torch.compiler.save_cache_artifacts() to
$FASTSEED_COMPILE_CACHE_OUT/<name>.bin (the check's output folder, compile-cache/): Inductor's
graphs with their Triton kernels, AOTAutograd's entries, the autotuner's picks. A later window
carries that folder as .whl/compile-cache/ ($FASTSEED_COMPILE_CACHE_IN): the first compiling
process of the check loads every file into the machine's on-disk caches
(torch.compiler.load_cache_artifacts; TORCHINDUCTOR_CACHE_DIR), where the later processes find
them, and a marker there keeps the others from loading them again. An artifact is found only under
the same torch, triton, GPU and code; anything else compiles as if nothing was carried.

A process killed at its cap saves nothing; the pytest plugin saves after each test, so a
capped test run keeps what its finished tests compiled.

    python -m compile_cache run SCRIPT [ARGS...]   # runs SCRIPT as __main__ between a load and a save
"""
from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path

IN, OUT = "FASTSEED_COMPILE_CACHE_IN", "FASTSEED_COMPILE_CACHE_OUT"
MARKER = ".fastseed-compile-cache-loaded"


def _cache_dir() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path(tempfile.gettempdir()) / "torchinductor_fastseed")


def load_once() -> str | None:
    """Load the carried artifacts into this machine's caches, unless a process already did.
    Returns what was loaded (None: nothing carried, or loaded before)."""
    src = os.environ.get(IN)
    files = sorted(Path(src).glob("*.bin")) if src and Path(src).is_dir() else []
    marker = _cache_dir() / MARKER
    if not files or marker.exists():
        return None
    import torch
    loaded = []
    for f in files:
        try:
            info = torch.compiler.load_cache_artifacts(f.read_bytes())
        except Exception as e:  # a file from another torch: say so, compile instead
            loaded.append(f"{f.name}: not loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        kinds = dict(getattr(info, "artifacts", None) or {})
        loaded.append(f"{f.name}: " + (", ".join(f"{len(v)} {k}" for k, v in sorted(kinds.items())) or "nothing"))
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("\n".join(loaded) + "\n")
    note = "torch.compile artifacts carried: " + "; ".join(loaded)
    print(f"[compile-cache] {note}", flush=True)
    return note


def save(name: str) -> str | None:
    """Write what this process compiled so far to $FASTSEED_COMPILE_CACHE_OUT/<name>.bin (again
    after each call: the artifacts only grow). Returns a note, None when there was nothing."""
    dst = os.environ.get(OUT)
    if not dst or "torch" not in sys.modules:
        return None
    import torch
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _ = saved
    path = Path(dst) / f"{name}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return f"{path.name}: {len(data) / 2**20:.2f} MiB"


def run(script: str, argv: list[str], name: str) -> int:
    """`script` (an installed console script) as __main__ with `argv`, between load_once and save."""
    load_once()
    sys.argv = [script, *argv]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        note = save(name)
        if note:
            print(f"[compile-cache] saved {note}", flush=True)
    return code


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "run":
        sys.exit("usage: python -m compile_cache run SCRIPT [ARGS...]")
    sys.exit(run(sys.argv[2], sys.argv[3:], name=os.environ.get("FASTSEED_CHECK_STEP", Path(sys.argv[2]).name)))
