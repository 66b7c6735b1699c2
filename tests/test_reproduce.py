"""The Fashion-MNIST reproduction script end to end at its tiny size (CPU). It checks the
pipeline and the output files, not the scientific claim: a few steps decide nothing; the
full-size GPU run does (benchmarks/results/reproduce_full.*)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce_fashion_mnist.py"


def load_script():
    if str(SCRIPT.parent) not in sys.path:  # as `python benchmarks/...` has it: the script's _bench
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("reproduce_fashion_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_reproduction_writes_every_row(tmp_path):
    repro = load_script()
    out = tmp_path / "reproduce_tiny.json"
    repro.main(["--size", "tiny", "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    assert result["size"] == "tiny" and result["torch"] and result["commit"]

    names = [r["name"] for r in result["rows"]]
    expected = ["raw_pixels", "teacher_moco_resnet50", "teacher_lite0"] + [
        f"{arch}/{v}" for arch in repro.STUDENTS
        for v in ("moco", "seed_moco_rn50", "simreg_moco_rn50", "seed_lite0")]
    assert sorted(names) == sorted(expected)
    assert "mobilenetv3_large_100" in repro.STUDENTS and "resnet18" in repro.STUDENTS
    for row in result["rows"]:
        for metric in ("knn@20", "knn@1", "linear_top1"):
            v = row[metric]
            assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 100.0, (row["name"], metric, v)
    by = {r["name"]: r for r in result["rows"]}
    # labels aligned with images through the cached eval batches: raw pixels far above chance (10%)
    assert by["raw_pixels"]["knn@20"] > 50, by["raw_pixels"]
    # the students and teacher of each run are what their names say
    assert by["teacher_moco_resnet50"]["feature_dim"] == 2048
    assert by["resnet18/seed_moco_rn50"]["feature_dim"] == 512
    assert by["resnet18/moco"]["step"] == by["resnet18/seed_moco_rn50"]["step"] > 0  # equal student schedules
    assert set(result["gap_seed_minus_moco"]) == set(repro.STUDENTS)

    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(expected) + 1  # header + one line per row
    assert "SEED←MoCo-RN50 minus MoCo-from-scratch" in table

    # a second invocation reuses every finished run (the GPU run may be split over calls)
    done = {p: p.stat().st_mtime for p in (tmp_path / "work").rglob("checkpoint_last.pt")}
    assert len(done) == 9
    runs = repro.run_configs(result["sizes"], {"train": str(next((tmp_path / "work" / "data").glob("*train*"))),
                                               "test": ""}, tmp_path / "work", "cpu")
    trained = repro.train_all(runs, log=lambda m: None)
    assert len(trained) == 9 and all(p.stat().st_mtime == t for p, t in done.items())
