"""benchmarks/recipes_lightly.py: the teacher it hands LightlyTrain is fastseed's teacher (the same
embedding at 48 px through both of LightlyTrain's teacher interfaces, frozen), and, where a
LightlyTrain venv is named by $LIGHTLY_TRAIN_PYTHON (LightlyTrain is AGPL and no dependency of
fastseed: see the script's docstring), the script runs end to end at its tiny size and skips
finished runs when started again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_teacher_at_side_is_fastseeds_teacher():
    from recipes_lightly import TEACHER_RES, TeacherAtSide

    from fastseed.evaluate import Resized
    from fastseed.teachers import load_teacher

    bundle = load_teacher("efficientnet_lite0", None)
    teacher = TeacherAtSide(bundle.model.backbone, TEACHER_RES)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = Resized(bundle.model, TEACHER_RES)(x)  # what fastseed's teacher embeds
        features = teacher.forward_features(x)["features"]
        pooled = teacher.forward_pool({"features": features})["pooled_features"]
        assert features.shape == (4, bundle.dim, 2, 2)  # the 2x2 tokens v3 distils at 48 px
        torch.testing.assert_close(teacher(x), expected)  # v1's call
        torch.testing.assert_close(pooled.flatten(1), expected, rtol=1e-5, atol=1e-5)  # v3's global
    assert teacher.embed_dim == teacher.feature_dim() == bundle.dim and teacher.get_model() is teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LIGHTLY_TRAIN_PYTHON"), reason="needs a LightlyTrain venv's python "
                    "in $LIGHTLY_TRAIN_PYTHON (benchmarks/recipes_lightly.py)")
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipes_lightly_tiny(tmp_path):
    out = tmp_path / "rows.jsonl"
    args = [os.environ["LIGHTLY_TRAIN_PYTHON"], "benchmarks/recipes_lightly.py", "--size", "tiny", "--datasets",
            "fashion-mnist", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["distillation", "distillationv1"]
    assert [r["optimizer"] for r in rows] == ["adamw", "lars"]
    assert all(r["steps_run"] == r["steps"] == 4 and 0 < r["knn_top1@20"] <= 100 and r["commit"]
               and r["lightly_train"] for r in rows)
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 2, again.stderr[-2000:]
