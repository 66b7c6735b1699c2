"""benchmarks/bench_local.py at a tiny size on the CPU: ResNet-10t at 32 px, the bundled
EfficientNet-Lite0 teacher at 64 px (a 2x2 token grid), 2 timed steps each way, the losses alone
on a few small maps. Its rows must hold what the script promises; its numbers mean nothing on a
shared 2-core CPU (this keeps the script that makes the committed figures working)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ARGS = ["--device", "cpu", "-a", "resnet10t", "--res", "32", "--teacher-res", "64", "--batch", "4", "--steps", "1",
        "--rounds", "2", "--warmup", "0", "--phase-steps", "1", "--micro-batch", "4", "--micro-width", "16",
        "--micro-grids", "3", "--micro-queues", "64", "--micro-reps", "1"]


def test_bench_local_tiny_rows_and_table(tmp_path):
    import bench_local
    out = tmp_path / "local.jsonl"
    bench_local.main([*ARGS, "--out", str(out)])
    step, *losses = [json.loads(line) for line in out.read_text().splitlines()]

    assert step["bench"] == "local_cost" and (step["student"], step["teacher"], step["teacher_weights"]) == (
        "resnet10t", "efficientnet_lite0", "bundled")
    grid = (step["res"], step["teacher_res"], step["grid"], step["tokens"], step["token_dim"])
    assert grid == (32, 64, "2x2", 4, 1280)
    assert step["queue"] == 4096  # auto, for an ImageNet-long epoch of 1280-d keys
    seed, local = step["seed_ms_per_step"], step["local_ms_per_step"]
    assert seed > 0 and local > 0
    assert step["local_extra_ms"] == pytest.approx(local - seed, abs=0.02)
    assert step["local_share"] == pytest.approx((local - seed) / local, abs=1e-3)
    assert step["seed_images_per_s"] == pytest.approx(1e3 * 4 / seed, abs=0.1)  # rounded to 0.1 (~4 img/s here)
    assert step["local_images_per_s"] == pytest.approx(1e3 * 4 / local, abs=0.1)
    assert len(step["ratios"]) == 2 and step["ratio_min"] <= step["ratio_median"] <= step["ratio_max"]
    assert {k: len(v) for k, v in step["window_s"].items()} == {"seed": 2, "local": 2}
    assert {k: len(v) for k, v in step["window_cpu_s"].items()} == {"seed": 2, "local": 2}
    cpu_seed, cpu_local = step["seed_cpu_ms_per_step"], step["local_cpu_ms_per_step"]
    assert cpu_seed > 0 and cpu_local > 0
    assert step["local_cpu_share"] == pytest.approx((cpu_local - cpu_seed) / cpu_local, abs=1e-3)
    phases = step["phase_ms_per_step"]
    assert set(phases) == {"seed", "local"} and all(p["teacher"] > 0 and p["student"] > 0 and p["backward"] > 0
                                                     for p in phases.values())
    command = "benchmarks/bench_local.py " + " ".join([*ARGS, "--out", str(out)])
    assert all(r["command"] == command and r["commit"] and r["device"] and r["torch"] for r in [step, *losses])

    assert [(r["loss"], r["grid"], r["queue"]) for r in losses] == [("local", "3x3", None), ("seed", None, 64)]
    assert all(r["ms"] > 0 and (r["batch"], r["width"], r["dtype"]) == (4, 16, "float32") for r in losses)

    md = out.with_suffix(".md").read_text()
    assert "| 32 | 2x2 (1280-d) | 4096 |" in md and f"| {cpu_seed:.1f}, {cpu_local:.1f}: " in md
    assert "| local | grid 3x3 |" in md and "| seed | K 64 |" in md
    assert f"`{command}`" in md
