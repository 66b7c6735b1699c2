"""benchmarks/recipes_lightly.py: the teacher it hands LightlyTrain is fastseed's teacher (the same
embedding and map through LightlyTrain's three teacher interfaces, frozen, at 48 px for the grey
sets and 64 px for stamps); the per-dataset plan, the two transform settings, the steady rate read
from LightlyTrain's metrics, the stamps PNG folder (the beton's pixels) and the dense probe of an
exported student; and, where a LightlyTrain venv is named by $LIGHTLY_TRAIN_PYTHON (LightlyTrain
is AGPL and no dependency of fastseed: see the script's docstring), the script end to end at its
tiny size, skipping finished runs when started again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
FASHION = Path("/usr/share/datasets/fashion-mnist")
STAMPS = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(scope="module")
def bundle():
    from fastseed.teachers import load_teacher
    return load_teacher("efficientnet_lite0", None)


@pytest.mark.parametrize("res, side", [(48, 32), (64, 64)])
def test_teacher_at_side_is_fastseeds_teacher(bundle, res, side):
    from recipes_lightly import TeacherAtSide

    from fastseed.evaluate import Resized

    teacher = TeacherAtSide(bundle.model.backbone, res)
    x = torch.randn(4, 3, side, side)
    with torch.no_grad():
        expected = Resized(bundle.model, res)(x)  # what fastseed's teacher embeds
        features = teacher.forward_features(x)["features"]
        pooled = teacher.forward_pool({"features": features})["pooled_features"]
        (blocks,) = teacher.get_intermediate_layers(x, n=1, reshape=True)  # v2's call
        assert features.shape == (4, bundle.dim, 2, 2)  # the 2x2 tokens v2 and v3 distil, at 48 and at 64 px
        torch.testing.assert_close(teacher(x), expected)  # v1's call
        torch.testing.assert_close(pooled.flatten(1), expected, rtol=1e-5, atol=1e-5)  # v3's global
        torch.testing.assert_close(blocks, features)
    assert teacher.embed_dim == teacher.feature_dim() == bundle.dim and teacher.get_model() is teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="n_teacher_blocks must be 1"):
        teacher.get_intermediate_layers(x, n=2, reshape=True)  # LightlyTrain's default: not this teacher's


def test_teacher_stays_in_eval_mode(bundle):
    from recipes_lightly import TeacherAtSide, teacher_digest

    teacher = TeacherAtSide(bundle.model.backbone, 48)
    before = teacher_digest(teacher)
    parent = torch.nn.ModuleDict({"teacher": teacher}).train()  # what a trainer may do to the method holding it
    assert parent.training and not teacher.training and not any(m.training for m in teacher.modules())
    with torch.no_grad():
        teacher(torch.randn(8, 3, 32, 32))  # BatchNorm in train mode would move its statistics
    assert teacher_digest(teacher) == before


def test_plan_transforms_and_options():
    from _bench.lightly import transform_args
    from recipes_lightly import SIZES, parse_args, plan, run_key

    assert plan("stamps", SIZES["cpu"]) == {"res": 64, "teacher_res": 64, "steps": 120, "batch": 64}
    assert plan("stamps", SIZES["tiny"], 4) == {"res": 64, "teacher_res": 64, "steps": 4, "batch": 32}
    for dataset in ("fashion-mnist", "mnist-5k"):  # --steps is stamps' only
        assert plan(dataset, SIZES["cpu"], 4) == {"res": 32, "teacher_res": 48, "steps": 128, "batch": 64}
    own = transform_args("own", 64)
    assert own == {"image_size": (64, 64), "normalize": {"mean": (0.5,) * 3, "std": (0.5,) * 3}}
    crop = transform_args("crop-flip", 32)
    assert crop["image_size"] == (32, 32) and crop["normalize"] == own["normalize"]
    assert crop["random_resize"] == {"min_scale": 0.6, "max_scale": 1.0}
    assert crop["color_jitter"] is crop["random_gray_scale"] is crop["gaussian_blur"] is None
    with pytest.raises(ValueError):
        transform_args("colour", 32)

    a = parse_args([])
    assert (a.transforms, a.steps, a.datasets, a.methods, a.probe_layout) == (
        "crop-flip", 120, ["fashion-mnist", "mnist-5k"], ["distillation", "distillationv2", "distillationv1"], (2, 64))
    a = parse_args(["--datasets", "stamps", "--transforms", "own", "--steps", "7", "--probe-layout", "3x96",
                    "--methods", "distillationv2", "--out", "x.jsonl"])
    assert (a.datasets, a.transforms, a.steps, a.probe_layout, a.methods, a.out) == (
        ["stamps"], "own", 7, (3, 96), ["distillationv2"], "x.jsonl")
    old = {"dataset": "fashion-mnist", "method": "distillation", "seed": 0, "size": "cpu", "steps": 128}
    assert run_key(old) == ("fashion-mnist", "distillation", 0, "cpu", "crop-flip", 128)  # rows before --transforms
    assert run_key({**old, "transforms": "own"})[4] == "own"


def test_steady_rate(tmp_path):
    from recipes_lightly import steady_rate

    metrics = tmp_path / "metrics.jsonl"
    assert steady_rate(metrics, 64) == {"images_per_s_steady": None, "steady_steps": 0}
    lines = [{"epoch": 0, "step": 19, "profiling/data_time": 0.1, "profiling/batch_time": 0.3},
             {"epoch": 0, "step": 19, "train_loss": 1.0},
             {"epoch": 1, "step": 39, "profiling/data_time": 0.0, "profiling/batch_time": 0.4}]
    metrics.write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert steady_rate(metrics, 64) == {"images_per_s_steady": 160.0, "steady_steps": 2}


def test_stamps_png_folder_holds_the_betons_pixels(tmp_path):
    """The stamps PNGs are the train beton's images, in order, pixel for pixel (a small fake
    beton stands in for stamps_betons' so that no stamps package is needed)."""
    from PIL import Image
    from recipes_lightly import png_folder

    from fastseed.data_prep import write_beton

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "fake.npz", images=images, labels=np.arange(37) % 3)
    write_beton(str(tmp_path / "fake.npz"), str(tmp_path / "stamps_train.beton"), compress_probability=0.0,
                progress=False)
    folder = png_folder("stamps", {}, tmp_path)
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(37)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(f)) for f in files]), images)
    assert png_folder("stamps", {}, tmp_path) == folder  # written once


def test_dense_probe_of_an_exported_student(tmp_path):
    import timm
    from recipes_lightly import dense

    torch.manual_seed(0)
    student = tmp_path / "exported_last.pt"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), student)
    skipped = dense(student, "mnist-5k", "tiny", tmp_path)  # no mosaics of MNIST-5k
    assert skipped["miou"] is None and skipped["pixel_acc"] is None and not list(tmp_path.glob("mosaics_*"))
    if not FASHION.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    row = dense(student, "fashion-mnist", "tiny", tmp_path)
    assert 0 < row["miou"] <= 100 and 0 < row["pixel_acc"] <= 100
    assert row["probe_map"] == [512, 2, 2] and (row["probe_grid"], row["probe_side"]) == (2, 64)
    assert (row["probe_train"], row["probe_test"], row["probe_steps"]) == (48, 24, 20)


def _run(args, timeout):
    # as its docstring runs it: PYTHONPATH=. (LightlyTrain's venv has no fastseed installed)
    return subprocess.run([os.environ["LIGHTLY_TRAIN_PYTHON"], "benchmarks/recipes_lightly.py", *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH="."), capture_output=True, text=True, timeout=timeout,
                          check=False)


LIGHTLY = pytest.mark.skipif(not os.environ.get("LIGHTLY_TRAIN_PYTHON"), reason="needs a LightlyTrain venv's "
                             "python in $LIGHTLY_TRAIN_PYTHON (benchmarks/recipes_lightly.py)")


@pytest.mark.slow
@LIGHTLY
@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_recipes_lightly_tiny(tmp_path):
    out = tmp_path / "rows.jsonl"
    args = ["--size", "tiny", "--datasets", "fashion-mnist", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = _run(args, 1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["distillation", "distillationv2", "distillationv1"]
    assert [r["optimizer"] for r in rows] == ["adamw", "lars", "lars"]
    assert rows[1]["n_teacher_blocks"] == 1
    assert all(r["steps_run"] == r["steps"] == 4 and 0 < r["knn_top1@20"] <= 100 and r["commit"]
               and r["lightly_train"] and r["transforms"] == "crop-flip" and (r["res"], r["teacher_res"]) == (32, 48)
               and r["transform_args"]["random_resize"]["min_scale"] == 0.6 and 0 < r["miou"] <= 100
               and 0 < r["pixel_acc"] <= 100 for r in rows)
    again = _run(args, 300)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 3, again.stderr[-2000:]


@pytest.mark.slow
@LIGHTLY
@pytest.mark.skipif(not STAMPS.exists(), reason="needs Debian's tuxpaint-stamps-default")
def test_recipes_lightly_stamps_own_transforms(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = _run(["--size", "tiny", "--datasets", "stamps", "--methods", "distillationv2", "--transforms", "own",
                 "--steps", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)], 900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["train"], row["test"], row["res"], row["teacher_res"], row["steps_run"]) == (1326, 444, 64, 64, 3)
    assert row["transforms"] == "own" and row["transform_args"]["random_resize"]["min_scale"] == 0.14
    assert row["transform_args"]["color_jitter"]["prob"] == 0.8 and row["transform_args"]["random_gray_scale"] == 0.2
    assert 0 < row["knn_top1@20"] <= 100 and 0 < row["miou"] <= 100 and row["probe_map"] == [512, 2, 2]
