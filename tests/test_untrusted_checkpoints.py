"""A checkpoint is data: reading one runs no code from it unless --trust-checkpoint says so.

Teacher files, resumed checkpoints, fastseed-eval and --export, and fastseed checkpoints used as
teachers are all read with torch's weights_only unpickler, which allows tensors, plain Python
data and an allow-list of plain-data classes (DINO's argparse.Namespace, numpy's RNG state).
"""
import fractions
import warnings

import pytest
import timm
import torch
from helpers import refusal
from test_cli import run_cli

from fastseed.checkpoint import read_checkpoint, save_checkpoint
from fastseed.cli import config_from_args, eval_main
from fastseed.config import Config
from fastseed.errors import CheckpointReadError, TrainingError
from fastseed.evaluate import load_student
from fastseed.methods.moco import MoCo
from fastseed.optim import build_optimizer
from fastseed.runtime import Env
from fastseed.students import build_method
from fastseed.targets import build_targets
from fastseed.teachers import load_teacher
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD


class Payload:
    """Unpickling this runs code (here: it creates a file), as any pickle may."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def beton(fmnist):
    return fmnist("test", 64)  # test_cli.py's


@pytest.fixture(scope="module")
def r10_state():
    return timm.create_model("resnet10t", num_classes=0).state_dict()


def test_teacher_with_a_payload_runs_nothing(tmp_path, r10_state):
    marker, path = tmp_path / "ran", tmp_path / "teacher.pth"
    torch.save({"state_dict": r10_state, "epoch": 1, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointReadError, match=r"teacher\.pth.*'exec'.*runs code.*--trust-checkpoint"):
        load_teacher("resnet10t", str(path))
    assert not marker.exists()


def test_fastseed_train_refuses_a_payload_in_one_line(tmp_path, beton, r10_state):
    marker, path = tmp_path / "ran", tmp_path / "teacher.pth"
    torch.save({"state_dict": r10_state, "extra": Payload(marker)}, path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_last.pt").write_bytes(b"precious")
    proc = run_cli("--data", str(beton), "--res", "32", "-a", "resnet10t", "-k", "resnet10t", "--distill", str(path),
                   "--output", str(out), "--device", "cpu", cwd=tmp_path)
    refusal(proc.returncode, proc.stderr, "teacher.pth", "--trust-checkpoint")
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last.pt"]
    assert (out / "checkpoint_last.pt").read_bytes() == b"precious"


def test_trust_checkpoint_loads_a_legitimate_old_pickle(tmp_path, r10_state):
    # a training script that kept a non-tensor object beside the weights, as older ones did
    path = tmp_path / "old.pth"
    torch.save({"state_dict": r10_state, "lr_ratio": fractions.Fraction(1, 3)}, path)
    argv = ["--data", "x.beton", "-a", "resnet10t", "-k", "resnet10t", "--distill", str(path), "--queue-size", "64",
            "--device", "cpu"]
    cpu = torch.device("cpu")
    with pytest.raises(CheckpointReadError, match=r"fractions\.Fraction.*--trust-checkpoint"):
        build_targets(config_from_args(argv), cpu, dtype=None, compile_fn=None)
    cfg = config_from_args(argv + ["--trust-checkpoint"])
    assert cfg.trust_checkpoint
    info = build_targets(cfg, cpu, dtype=None, compile_fn=None).info
    assert (info["format"], info["dim"]) == ("plain", 512)


@pytest.fixture(scope="module")
def fastseed_ckpt(tmp_path_factory):
    """A checkpoint as train.save_checkpoint writes it, optimizer state and RNG states included."""
    cfg = Config(method="moco", arch="resnet10t", queue_size=64, device="cpu", dim=32)
    method = build_method(cfg, Env(), 32, MoCo.make_queues(dim=32, queue_size=64))
    info, mean_std = None, (IMAGENET_MEAN, IMAGENET_STD)
    optimizer = build_optimizer(cfg, method, 0.1, torch.device("cpu"))
    for p in method.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()  # momentum buffers
    path = tmp_path_factory.mktemp("run") / "checkpoint_last.pt"
    save_checkpoint(path, cfg=cfg, env=Env(), method=method, optimizer=optimizer, scaler=None, step=3, epoch=0,
                    batch_in_epoch=3, teacher_info=info, aug_gen=torch.Generator(), mean_std=mean_std)
    return path


def test_fastseed_checkpoints_load_with_weights_only(fastseed_ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = read_checkpoint(fastseed_ckpt)
        model, meta = load_student(str(fastseed_ckpt))
        teacher = load_teacher(None, str(fastseed_ckpt))
    assert ckpt["fastseed"]["step"] == meta["step"] == 3
    assert torch.equal(model.state_dict()["conv1.0.weight"], ckpt["student"]["conv1.0.weight"])
    assert (teacher.format, teacher.arch, teacher.dim) == ("fastseed", "resnet10t", 32)


def test_every_reader_of_fastseed_checkpoints_refuses_a_payload(tmp_path, fastseed_ckpt, capsys):
    marker, path = tmp_path / "ran", tmp_path / "checkpoint_last.pt"
    ckpt = read_checkpoint(fastseed_ckpt)
    ckpt["rng"][0]["extra"] = Payload(marker)
    torch.save(ckpt, path)
    for read in (read_checkpoint, load_student):  # resume; fastseed-eval and --export
        with pytest.raises(TrainingError, match=r"'exec'.*--trust-checkpoint"):
            read(str(path))
    with pytest.raises(CheckpointReadError, match=r"'exec'.*--trust-checkpoint"):
        load_teacher(None, str(path))  # a fastseed checkpoint as a teacher
    export = tmp_path / "student.pth"
    assert eval_main(["--checkpoint", str(path), "--export", str(export)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--trust-checkpoint" in err[0], err
    assert not marker.exists() and not export.exists()
