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


def test_recipes_speed_alternates_the_tools_and_rates_the_steady_steps(tmp_path, monkeypatch):
    """benchmarks/recipes_speed.py: the tools alternate, the order flips every repetition, a rate
    is S x batch / (t(2S) - t(S)) with the fixed costs (imports, JIT, set-up) taken out, and the
    ratio is against LightlyTrain's fastest row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipes_speed
    fixed = {"default": 30.0, "distillationv1": 5.0, "distillationv1+bf16-mixed": 6.0}  # set-up per process
    per_step = {"default": 0.25, "distillationv1": 0.5, "distillationv1+bf16-mixed": 0.4}
    calls = []

    def fake(python, tool, recipe, a, steps):
        calls.append((recipe, steps))
        return {"tool": tool, "recipe": recipe, "steps": steps,
                "train_s": fixed[recipe] + per_step[recipe] * steps + 0.01 * len(calls), "load_before": 0.0}

    monkeypatch.setattr(recipes_speed, "timed", fake)
    out = tmp_path / "speed.jsonl"
    recipes_speed.main(["--size", "tiny", "--reps", "2", "--lightly-python", sys.executable,
                        "--workdir", str(tmp_path), "--out", str(out)])
    s = recipes_speed.SIZES["tiny"]["steps"]
    order = ["default", "distillationv1", "distillationv1+bf16-mixed"]
    assert calls == [(r, n) for r in order + order[::-1] for n in (s, 2 * s)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rep"] for r in rows] == [0] * 6 + [1] * 6 and all(r["commit"] for r in rows)
    batch = recipes_speed.SIZES["tiny"]["batch"]
    md = out.with_suffix(".md").read_text()
    assert f"`benchmarks/recipes_speed.py --size tiny --reps 2 --lightly-python {sys.executable}" in md  # the command
    assert all(r["command"].startswith("benchmarks/recipes_speed.py --size tiny") for r in rows)
    lines = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("|")}
    rate = {r: s * batch / (per_step[r] * s + 0.01) for r in per_step}
    fastest = rate["distillationv1+bf16-mixed"]
    # its set-up is 6x longer
    assert f"| {rate['default']:.0f} | {rate['default'] / fastest:.2f}x |" in lines["default"]
    assert f"| {rate['distillationv1']:.0f} | {rate['distillationv1'] / fastest:.2f}x |" in lines["distillationv1"]
    assert f"| {fastest:.0f} | 1.00x |" in lines["distillationv1+bf16-mixed"]
