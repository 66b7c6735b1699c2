"""Every benchmark script runs end to end at a tiny size on CPU (speed is measured elsewhere:
these only keep the scripts working; their numbers mean nothing on a shared 2-core CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_kernels_tiny(tmp_path):
    out = run("benchmarks/bench_kernels.py", "--sizes", "8:96", "--impls", "fused,eager,sdpa", "--reps", "1",
              "--out", str(tmp_path / "k.json"))
    assert "fused" in out and "eager" in out
    assert json.loads((tmp_path / "k.json").read_text())


def test_bench_knn_tiny():
    run("benchmarks/bench_knn.py", "--tiny", "--repeats", "1")


def test_bench_data_tiny(tmp_path):
    run("benchmarks/bench_data.py", "--res", "32", "--images", "96", "--batch", "32", "--epochs", "1",
        "--workdir", str(tmp_path))


def test_bench_train_tiny(tmp_path):
    out = run("benchmarks/bench_train.py", "--tiny", "--steps", "2", "--out", str(tmp_path / "t.json"))
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert rows and all(r["official_img_s"] > 0 and r["fastseed_img_s"] > 0 for r in rows)
    assert "| pair |" in out
