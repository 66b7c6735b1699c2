"""Bad input: one clear line naming the problem, exit code 2, no traceback, nothing written."""
import subprocess
import sys

import pytest
import torch

from helpers import refusal

from fastseed.cli import config_from_args


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-c", "import sys; from fastseed.cli import train_main; "
                           "sys.exit(train_main(sys.argv[1:]))", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def beton(fmnist):
    return fmnist("test", 64)


def test_missing_data(tmp_path):
    proc = run_cli("--data", str(tmp_path / "nope.beton"), "-k", "efficientnet_lite0", "--output",
                   str(tmp_path / "out"), cwd=tmp_path)
    refusal(proc.returncode, proc.stderr, "nope.beton", "fastseed-prep")
    assert not (tmp_path / "out").exists()


def test_unreadable_data(tmp_path):
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"this is not a beton")
    proc = run_cli("--data", str(bad), "-k", "efficientnet_lite0", "--output", str(tmp_path / "out"),
                   "--device", "cpu", cwd=tmp_path)
    refusal(proc.returncode, proc.stderr, "bad.beton")


def test_unknown_arch(tmp_path, beton):
    proc = run_cli("--data", str(beton), "-a", "resnet18x", "-k", "efficientnet_lite0", "--output",
                   str(tmp_path / "out"), cwd=tmp_path)
    refusal(proc.returncode, proc.stderr, "resnet18x", "--arch")
    assert not (tmp_path / "out").exists()


def test_teacher_checkpoint_of_other_arch(tmp_path, beton):
    import timm
    ckpt = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_last.pt").write_bytes(b"precious")
    proc = run_cli("--data", str(beton), "--res", "32", "-k", "resnet50", "--distill", str(ckpt), "--output",
                   str(out), "--device", "cpu", cwd=tmp_path)
    refusal(proc.returncode, proc.stderr, "r18.pth")
    assert (out / "checkpoint_last.pt").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pt"]


def test_official_flag_names_map_to_config():
    cfg = config_from_args(["--data", "x.beton", "-a", "mobilenetv3_large_100", "-k", "resnet50", "--teacher-ssl",
                            "moco", "--distill", "t.pth", "--lr", "0.1", "--batch-size", "64", "--epochs", "3",
                            "--temp", "0.1", "--distill-t", "0.001", "--moco-k", "1024", "--output", "o",
                            "--method", "simreg", "--val-data", "v.beton", "--device", "cpu", "--resume", "auto"])
    assert (cfg.arch, cfg.teacher_arch, cfg.teacher_ssl, cfg.distill) == ("mobilenetv3_large_100", "resnet50",
                                                                         "moco", "t.pth")
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.temp, cfg.distill_t, cfg.queue_size) == (0.1, 64, 3, 0.1,
                                                                                             0.001, 1024)
    assert (cfg.output, cfg.method, cfg.val_data, cfg.device, cfg.resume) == ("o", "simreg", "v.beton", "cpu",
                                                                              "auto")
    assert config_from_args(["--data", "x.beton", "--queue-size", "7"]).queue_size == 7
    assert config_from_args(["--data", "x.beton"]).epochs == 200  # the paper's defaults with user data


def test_no_arguments_is_the_demo():
    cfg = config_from_args([])
    assert cfg.data.endswith("fashion_mnist_train_32k.beton") and cfg.teacher_arch == "efficientnet_lite0"
    assert cfg.final_table


def test_student_side_comes_from_the_data_when_res_is_not_given(beton):
    """28-px Fashion-MNIST trains at 28 px, not upsampled to 224; --res given wins."""
    notes = []
    assert config_from_args(["--data", str(beton)], notes).res == 28
    assert notes == [f"--res not given: training at 28 px (the largest side in {beton} is 28 px)"]
    assert config_from_args(["--data", str(beton), "--res", "64"]).res == 64
    assert config_from_args(["--data", "missing.beton"]).res == 224  # check_inputs names the missing file
