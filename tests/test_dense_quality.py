"""benchmarks/dense_quality.py runs end to end at its tiny size on real Fashion-MNIST images:
SEED, dense and SEED + dense students at equal steps, the table (its accuracies mean nothing at
this size; this keeps the script that made the committed figures working), and a second
invocation skips the finished runs instead of training them again."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_dense_quality_tiny(tmp_path):
    out = tmp_path / "q.jsonl"
    args = [sys.executable, "benchmarks/dense_quality.py", "--size", "tiny", "--datasets", "fashion-mnist",
            "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["objective"] for r in rows] == ["seed", "dense", "seed+dense"]
    assert all(r["steps"] == 4 and 0 < r["knn_top1@20"] <= 100 and r["commit"] for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "| fashion-mnist | 32 / 48 | seed+dense | 1 | 4 |" in table
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 3, again.stderr[-2000:]
