"""benchmarks/recipes.py runs end to end at its tiny size on real Fashion-MNIST images: the
demo recipe, the peer's recipe in fastseed (every factor) and SimReg, the table, and a second
invocation that skips the finished runs (its accuracies mean nothing at this size; this keeps
the script that makes the committed figures working)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipes_tiny(tmp_path):
    out = tmp_path / "r.jsonl"
    args = [sys.executable, "benchmarks/recipes.py", "--size", "tiny", "--datasets", "fashion-mnist",
            "--recipes", "demo", "peer", "simreg", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["recipe"] for r in rows] == ["demo", "peer", "simreg"]
    peer = rows[1]
    assert (peer["temp"], peer["distill_t"], peer["batch_in_queue"], peer["head"], peer["mixup"],
            peer["optimizer"], peer["clip_grad"]) == (0.07, 0.07, True, "linear", True, "lars", 1.0)
    assert all(r["steps"] == 4 and 0 < r["knn_top1@20"] <= 100 and r["commit"] for r in rows)
    assert "| fashion-mnist | peer | 1 | 4 |" in out.with_suffix(".md").read_text()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 3, again.stderr[-2000:]
