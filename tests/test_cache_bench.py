"""benchmarks/bench_cache.py runs end to end at a tiny size on CPU and records what it promises
(its numbers mean nothing on a shared 2-core CPU: this only keeps the script working)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_cache_tiny(tmp_path):
    out = tmp_path / "c.jsonl"
    args = ["--res", "32", "--images", "128", "--crops", "2", "--batch", "32", "--chunk", "32", "--epochs", "1",
            "-a", "resnet10t", "--steps", "1", "--rounds", "2", "--queue", "256", "--device", "cpu", "--workdir",
            str(tmp_path), "--out", str(out)]
    proc = subprocess.run([sys.executable, "benchmarks/bench_cache.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(out.read_text())
    assert row["build_images_per_s"] > 0 and row["chunks_timed"] == 3  # 4 chunks: the first is start-up
    assert row["live_crops_images_per_s"] > 0 and row["replay_images_per_s"] > 0
    assert row["train_live_images_per_s"] > 0 and row["train_cache_images_per_s"] > 0 and len(row["train_ratios"]) == 2
    assert "saved_s_per_epoch" in row and "break_even_epochs" in row
    assert row["cache_bytes_per_image"] > 2 * 1280 * 2 and row["imagenet_bytes_r10_d128"] > 1281167 * 10 * 128 * 2
    assert row["commit"] and row["device"]
