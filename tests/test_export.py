"""fastseed-export, fastseed-embed and load_encoder: each format's round trip (the same features
as the student in fastseed), the preprocessing and provenance each file carries, the ONNX check
and int8 copy on real Fashion-MNIST images, and the refusals (one line, exit 2, nothing written).

The students are timm's tiny test models, saved as train.save_checkpoint saves them; the betons
hold a few hundred Fashion-MNIST images, written once per module.
"""
from __future__ import annotations

import fractions
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm.models import register_model

import fastseed
from fastseed.checkpoint import read_checkpoint, save_checkpoint
from fastseed.cli import embed_main, export_main
from fastseed.config import Config
from fastseed.export import CROP_RATIO, Preprocess, beton_images, read_onnx_metadata
from fastseed.methods.seed import SEED
from fastseed.optim import build_optimizer
from fastseed.provenance import git_commit
from fastseed.runtime import Env
from fastseed.students import build_method

MEAN, STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)
TEACHER = {"arch": "efficientnet_lite0", "format": "bundled", "sha256": "ab" * 32, "dim": 32}
RES = 32


@register_model
def untraceable_resnet(pretrained=False, **kwargs):
    """test_resnet whose pooled features go through a Bessel function, which ONNX has no op for."""
    model = timm.create_model("test_resnet", pretrained=pretrained, **kwargs)
    forward = model.forward
    model.forward = lambda x: torch.special.i0(forward(x))
    return model


def save_student(path, arch, method="seed", step=5):
    cfg = Config(method=method, arch=arch, queue_size=16, device="cpu", res=RES)
    method_module = build_method(cfg, Env(), TEACHER["dim"], SEED.make_queues(dim=TEACHER["dim"], queue_size=16))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, cfg=cfg, env=Env(), method=method_module, step=step, epoch=0, batch_in_epoch=step,
                    optimizer=build_optimizer(cfg, method_module, 0.1, torch.device("cpu")), scaler=None,
                    teacher_info=TEACHER, aug_gen=torch.Generator(), mean_std=(MEAN, STD))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of two students: RUN/<arch>/checkpoint_last.pt."""
    root = tmp_path_factory.mktemp("run")
    for arch in ("test_resnet", "test_efficientnet"):
        save_student(root / arch / "checkpoint_last.pt", arch)
    return root


@pytest.fixture(scope="module")
def ckpt(run):
    return run / "test_resnet" / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """(test, train): 160 Fashion-MNIST test images to check on, 160 train images to calibrate on."""
    from fastseed.data_prep import write_beton
    root = tmp_path_factory.mktemp("betons")
    paths = root / "test.beton", root / "train.beton"
    for split, path in zip(("test", "train"), paths):
        write_beton(f"fashion-mnist:{split}", str(path), subset=160, progress=False)
    return tuple(map(str, paths))


@pytest.fixture(scope="module")
def test_images(betons):
    return beton_images(betons[0], RES, MEAN, STD, 160)


def features(module, images):
    with torch.inference_mode():
        return module.eval()(images)


def student(path):
    from fastseed.evaluate import load_student
    return load_student(str(path))[0].eval()


def one_line_error(capsys, *needles):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


def test_onnx_round_trip_metadata_check_and_int8(ckpt, betons, test_images, tmp_path, capsys):
    out = tmp_path / "r.onnx"
    assert export_main([str(ckpt), "--format", "onnx", "--output", str(out), "--check-data", betons[0],
                        "--calib-data", betons[1], "--images", "160"]) == 0
    err = capsys.readouterr().err
    assert "ONNX Runtime vs PyTorch on 160 images of" in err and "fp32, 0.0001 x max(1, largest |feature|" in err, err
    assert "int8 (calibrated on 160 images" in err and "points)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.int8.onnx", "r.onnx"]

    import onnxruntime as ort
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images, _ = test_images
    ref = features(student(ckpt), images)
    for batch in (images[:1], images[:7], images):  # dynamic batch
        got = session.run(None, {"image": batch.numpy()})[0]
        assert np.abs(got - ref[:len(batch)].numpy()).max() <= 1e-4
    bigger = torch.nn.functional.interpolate(images[:4], size=48)  # dynamic height and width
    got = session.run(None, {"image": bigger.numpy()})[0]
    assert np.abs(got - features(student(ckpt), bigger).numpy()).max() <= 1e-4

    meta = read_onnx_metadata(out)
    assert meta["arch"] == "test_resnet" and meta["output"] == "backbone" and meta["num_features"] == ref.shape[1]
    assert meta["input_size"] == [3, RES, RES] and meta["channel_order"] == "RGB" and meta["layout"] == "NCHW"
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD) and meta["crop_pct"] == CROP_RATIO
    assert (meta["method"], meta["teacher"], meta["step"]) == ("seed", TEACHER, 5)
    assert meta["commit"] == git_commit() and meta["dynamic_spatial"] is True and meta["precision"] == "fp32"
    int8 = read_onnx_metadata(tmp_path / "r.int8.onnx")
    assert int8["precision"] == "int8" and int8["calibration_images"] == 160 and int8["arch"] == "test_resnet"
    q = ort.InferenceSession(str(tmp_path / "r.int8.onnx"), providers=["CPUExecutionProvider"])
    assert q.run(None, {"image": images[:2].numpy()})[0].shape == (2, ref.shape[1])


def test_onnx_fp16_with_head(ckpt, tmp_path, capsys):
    out = tmp_path / "h.onnx"
    assert export_main([str(ckpt), "--format", "onnx", "--output", str(out), "--with-head", "--fp16"]) == 0
    assert "fp16, 0.01 x max(1, largest |feature|" in capsys.readouterr().err
    import onnxruntime as ort
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"image": x.numpy()})[0]
    ck = read_checkpoint(ckpt)
    method = build_method(Config(method="seed", arch="test_resnet", queue_size=16, device="cpu"), Env(),
                          TEACHER["dim"], SEED.make_queues(dim=TEACHER["dim"], queue_size=16))
    method.student.load_state_dict(ck["student"])
    method.head.load_state_dict(ck["head"])
    ref = features(torch.nn.Sequential(method.student, method.head), x).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape == (3, TEACHER["dim"])
    assert np.abs(got - ref).max() <= 1e-2 * max(1, np.abs(ref).max())
    meta = read_onnx_metadata(out)
    assert (meta["output"], meta["precision"], meta["num_features"]) == ("backbone+head", "fp16", TEACHER["dim"])


def test_onnx_check_failure_leaves_the_target_untouched(ckpt, tmp_path, monkeypatch, capsys):
    import fastseed.export
    monkeypatch.setitem(fastseed.export.TOLERANCE, "fp32", 0.0)  # any rounding difference now fails
    out = tmp_path / "r.onnx"
    out.write_bytes(b"earlier export")
    assert export_main([str(ckpt), "--format", "onnx", "--output", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: the ONNX model's features differ from PyTorch's") and "untouched" in err[-1]
    assert out.read_bytes() == b"earlier export" and [p.name for p in tmp_path.iterdir()] == ["r.onnx"]


@pytest.mark.parametrize("fmt,weights", [("timm", "pytorch_model.bin"), ("safetensors", "model.safetensors")])
def test_timm_folder_round_trip(run, tmp_path, fmt, weights):
    out = tmp_path / "student"
    assert export_main([str(run), "--arch", "test_efficientnet", "--format", fmt, "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", weights])
    model = timm.create_model("test_efficientnet", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out / weights)))
    x = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    ref = features(student(run / "test_efficientnet" / "checkpoint_last.pt"), x)
    assert torch.equal(features(model, x), ref)
    local = timm.create_model(f"local-dir:{out}", pretrained=True)  # config.json: arch, classes, preprocessing
    assert torch.equal(features(local, x), ref)
    cfg = timm.data.resolve_data_config(model=local)
    assert tuple(cfg["input_size"]) == (3, RES, RES) and tuple(cfg["mean"]) == MEAN and tuple(cfg["std"]) == STD
    assert cfg["crop_pct"] == CROP_RATIO and cfg["crop_mode"] == "center"
    info = json.loads((out / "config.json").read_text())["fastseed"]
    assert (info["arch"], info["method"], info["teacher"], info["commit"]) == (
        "test_efficientnet", "seed", TEACHER, git_commit())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(ckpt, tmp_path):
    out = tmp_path / "r.pt"
    assert export_main([str(ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    extra = {"fastseed.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    x = torch.randn(5, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(features(loaded, x), features(student(ckpt), x), rtol=0, atol=1e-5)
    info = json.loads(extra["fastseed.json"])
    assert info["arch"] == "test_resnet" and info["input_size"] == [3, RES, RES] and info["mean"] == list(MEAN)


def test_refusals_are_one_line_and_write_nothing(run, ckpt, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), plain)
    payload = tmp_path / "payload.pt"
    checkpoint = read_checkpoint(ckpt)
    checkpoint["rng"][0]["extra"] = fractions.Fraction(1, 3)  # only full unpickling loads it
    torch.save(checkpoint, payload)
    untraceable = save_student(tmp_path / "untraceable" / "checkpoint_last.pt", "untraceable_resnet")
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ([str(plain), "--format", "timm"], "not a fastseed checkpoint"),
        ([str(payload), "--format", "safetensors"], "--trust-checkpoint"),
        ([str(untraceable), "--format", "onnx"], "untraceable_resnet cannot be exported to ONNX"),
        ([str(run), "--format", "timm"], "pick one with --arch"),
        ([str(ckpt), "--format", "timm", "--with-head"], "use --format onnx or torchscript"),
        ([str(ckpt), "--format", "torchscript", "--output", str(tmp_path / "missing" / "r.pt")], "does not exist"),
        ([str(ckpt), "--format", "timm", "--output", str(plain)], "is a file"),
    ]
    for argv, needle in cases:
        argv = argv if "--output" in argv else [*argv, "--output", str(out)]
        assert export_main(argv) == 2, argv
        one_line_error(capsys, needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the export extra not installed
    assert export_main([str(ckpt), "--format", "onnx", "--output", str(out)]) == 2
    one_line_error(capsys, "pip install -e '.[export]'")
    assert export_main([str(payload), "--format", "safetensors", "--output", str(out), "--trust-checkpoint"]) == 0


def test_load_encoder_and_embed_match_the_eval_pipeline(ckpt, betons, test_images, tmp_path):
    from fastseed.data_prep.sources import open_source, subset_indices
    module, preprocess = fastseed.load_encoder(ckpt)
    assert not module.training and isinstance(preprocess, Preprocess) and preprocess.res == RES
    source = open_source("fashion-mnist:test")
    index = subset_indices(len(source), 160)  # the beton's images, in its order
    images, _ = test_images
    mine = torch.stack([preprocess(source.load(int(i))[0]) for i in index[:16]])
    assert torch.allclose(mine, images[:16], rtol=0, atol=1e-5)  # the same pixels as FFCV's eval crop

    out = tmp_path / "feats.npy"
    assert embed_main(["--checkpoint", str(ckpt), "--data", betons[0], "--output", str(out),
                       "--batch-size", "64", "--no-progress"]) == 0
    feats = np.load(out)
    ref = torch.nn.functional.normalize(features(module, images), dim=1).numpy()
    assert feats.shape == ref.shape and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5) and np.abs(feats - ref).max() <= 1e-5


def test_importing_fastseed_stays_light():
    code = "import sys, fastseed; print('torch' in sys.modules, callable(fastseed.load_encoder))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_bench_export_tiny_appends_and_resumes(run, betons, tmp_path):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_export.py"
    if str(path.parent) not in sys.path:  # as `python benchmarks/bench_export.py` has it: the script's _bench
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_export", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "export.jsonl"
    argv = ["--run", str(run), "--archs", "test_resnet", "--backends", "eager", "ort-int8", "--batches", "2",
            "--res", "40", "--bank", betons[1], "--queries", betons[0], "--knn-images", "64", "--calib-images", "32",
            "--min-time", "0", "--min-repeats", "2", "--out", str(out)]
    rows = bench.main(argv)
    assert [(r["backend"], r["batch"], r["res"], r["knn_res"]) for r in rows] == [("eager", 2, 40, RES),
                                                                                 ("ort-int8", 2, 40, RES)]
    assert all(r["ms_per_batch"] > 0 and 0 <= r["knn_top1@20"] <= 100 and len(r["loadavg_before"]) == 3
               and "load average" in r["uptime"] and r["commit"] == git_commit() for r in rows)
    assert bench.main(argv) == rows and len(out.read_text().splitlines()) == 2  # done rows are not run again
    assert "| test_resnet (5) | ort-int8 | 2 |" in out.with_suffix(".md").read_text()
