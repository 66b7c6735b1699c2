"""What a measurement ran on: commit, versions and device, recorded beside every benchmark figure
(a number without them cannot be compared with the next one)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's hash, with '-dirty' when tracked files other than recorded results (the file a
    benchmark is appending to) differ from it; outside a checkout, $FASTSEED_COMMIT (what the GPU
    check sets for its steps, from .whl/SOURCE.json: the installed copy has no history), else None."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTSEED_COMMIT") or None
    return head + ("-dirty" if dirty else "")


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} "
            f"(torch threads {torch.get_num_threads()})")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def provenance(device: torch.device | str | None = None) -> dict:
    return {"device": device_name(device), "cpu_count": os.cpu_count(), "commit": git_commit(),
            "torch": torch.__version__, "triton": _version("triton"), "numba": _version("numba"),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def append_row(path: str | os.PathLike | None, row: dict) -> str:
    """`row` as one JSON line, appended to the results file `path` when one is given (a
    benchmark's --out); returns the line."""
    line = json.dumps(row)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    return line
