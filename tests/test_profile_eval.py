"""`--profile` reports and `fastseed-eval` on a real (tiny) checkpoint."""
import json

import pytest
import timm
import torch

from fastseed.cli import eval_main, train_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def beton(fmnist):
    return fmnist("test", 256)


def args(beton, out, *extra):
    return ["--method", "seed", "--data", str(beton), "-a", "resnet10t", "-k", "efficientnet_lite0", "--res", "32",
            "--teacher-res", "32", "--batch-size", "32", "--queue-size", "64", "--output", str(out), "--device", "cpu",
            "--workers", "2", "--no-progress", *extra]


def test_profile_writes_trace_table_phases_and_chart(beton, tmp_path):
    out = tmp_path / "prof"
    assert train_main(args(beton, out, "--profile")) == 0
    trace = json.loads((out / "profile_trace.json").read_text())
    assert trace["traceEvents"]
    assert "Self CPU" in (out / "profile_kernels.txt").read_text()
    phases = json.loads((out / "profile_phases.json").read_text())["phase_ms"]
    for name in ("data wait", "augment", "teacher", "student forward", "loss", "backward", "optimizer", "enqueue"):
        assert phases[name] >= 0
    assert phases["student forward"] > 0 and phases["backward"] > 0
    assert (out / "profile_phases.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_prints_knn_json_and_student_is_timm_loadable(beton, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(args(beton, out, "--max-steps", "2", "--epochs", "1")) == 0
    capsys.readouterr()
    ckpt = out / "checkpoint_last.pt"
    assert eval_main(["--checkpoint", str(ckpt), "--train-data", str(beton), "--val-data", str(beton),
                      "--device", "cpu", "--k", "1", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["arch"] == "resnet10t" and result["step"] == 2
    # the bank is the val set itself: every image's nearest neighbour is itself
    assert result["knn_top1@1"] == 100.0 and 0 <= result["knn_top1@20"] <= 100
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(b"not a beton at all" * 10)
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(ckpt), "--train-data", str(beton), "--val-data", str(garbage),
                      "--device", "cpu"]) == 2
    assert "garbage.beton is not an FFCV .beton" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(ckpt), "--export", str(tmp_path / "r10t.pth")]) == 0
    state = torch.load(tmp_path / "r10t.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("head") for k in state)
    timm.create_model("resnet10t", num_classes=0).load_state_dict(state, strict=True)


def test_eval_rejects_a_non_checkpoint(beton, tmp_path, capsys):
    bad = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    assert eval_main(["--checkpoint", str(bad), "--train-data", str(beton), "--val-data", str(beton)]) == 2
    assert "not a fastseed checkpoint" in capsys.readouterr().err
