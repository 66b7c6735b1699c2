"""Several students in one run (`-a a,b`): each matches its solo run step for step, one going
NaN stops alone, out-of-memory advice per student, multi-file checkpoint commits, and the
benchmark of a joint run against the solo runs (tiny).

The runs here feed `train()` fixed uint8 batches (FFCV's random crops differ from run to run,
so they could not be compared) and use timm's tiny test models as students and teacher.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import refusal

from fastseed.checkpoint import COMMIT_JOURNAL, commit_all, finish_commit, read_checkpoint
from fastseed.cli import eval_main
from fastseed.config import Config
from fastseed.errors import ConfigError, TrainingError
from fastseed.students import student_configs
from fastseed.train import train

pytestmark = pytest.mark.slow

ARCHS = ("test_resnet", "test_efficientnet")
STEPS, BATCH, RES, SMALL = 4, 8, 32, 16


class FixedLoader:
    """The same uint8 NHWC views in every run, `steps` batches an epoch."""

    def __init__(self, sizes, steps=STEPS, batch=BATCH):
        g = torch.Generator().manual_seed(0)
        self.batches = [([torch.randint(0, 256, (batch, s, s, 3), generator=g, dtype=torch.uint8) for s in sizes],
                         torch.zeros(batch, dtype=torch.long)) for _ in range(steps)]
        self.skip = 0

    def __len__(self):
        return len(self.batches)

    def resume(self, epoch, batch=0):
        self.skip = batch

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.batches[skip:])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    return path


def tiny(teacher_ckpt, out, **kw) -> Config:
    cfg = Config(method="seed", arch=",".join(ARCHS), teacher_arch="test_resnet", distill=str(teacher_ckpt),
                 data="fixed", res=RES, epochs=1, batch_size=BATCH, lr=(0.1, 0.05), warmup_epochs=0,
                 queue_size=2 * BATCH, output=str(out), log_every=1, ckpt_every=1000, knn_every=0, progress=False,
                 device="cpu", compile="off")
    return cfg.replace(**kw)


def losses(out, key="loss"):
    return [r[key] for r in map(json.loads, open(out / "metrics.jsonl")) if key in r]


@pytest.mark.parametrize("method", ["seed-small-patch", "simreg"])
def test_each_student_of_a_joint_run_matches_its_solo_run(teacher_ckpt, tmp_path, method):
    """Same seed, same batches: each student's losses, weights, head and queue after 4 steps
    (the queue wraps twice) equal its solo run's. Only fp32 reassociation could differ."""
    kw, sizes = {"seed-small-patch": (dict(method="seed", small_crops=2, small_res=SMALL), [RES, SMALL, SMALL]),
                 "simreg": (dict(method="simreg"), [RES])}[method]
    joint = tmp_path / "joint"
    assert train(tiny(teacher_ckpt, joint, **kw), loader=FixedLoader(sizes))["failed"] == []
    for arch, lr in zip(ARCHS, (0.1, 0.05)):
        solo = tmp_path / arch
        train(tiny(teacher_ckpt, solo, arch=arch, lr=lr, **kw), loader=FixedLoader(sizes))
        mine, alone = losses(joint, f"loss/{arch}"), losses(solo)
        assert len(mine) == STEPS and len(set(mine)) == STEPS  # it trained
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(alone), rtol=1e-5, atol=1e-6)
        a, b = read_checkpoint(joint / arch / "checkpoint_last.pt"), read_checkpoint(solo / "checkpoint_last.pt")
        assert (a["fastseed"]["arch"], a["config"]["arch"], a["config"]["lr"]) == (arch, arch, lr)
        for part in ("student", "head", "buffers"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{arch} {part}.{k}")
    # a joint run's student file is a solo run's: --export writes its timm backbone
    assert eval_main(["--checkpoint", str(joint / ARCHS[1] / "checkpoint_last.pt"), "--export",
                      str(tmp_path / "e.pth")]) == 0
    timm.create_model(ARCHS[1], num_classes=0).load_state_dict(torch.load(tmp_path / "e.pth"), strict=True)
    # not vacuous: the two students differ, and a queue was shared (SEED) and moved
    r, e = (read_checkpoint(joint / a / "checkpoint_last.pt") for a in ARCHS)
    assert r["student"].keys() != e["student"].keys()
    if method != "simreg":
        assert torch.equal(r["buffers"]["queue.keys"], e["buffers"]["queue.keys"])
        assert int(r["buffers"]["queue.ptr"]) == int(r["buffers"]["small_queue.ptr"]) == STEPS * BATCH % (2 * BATCH)


def test_a_student_gone_nan_stops_alone(teacher_ckpt, tmp_path):
    """--lr nan for one student: its loss goes NaN, it stops, its last good checkpoint keeps
    its bytes; the other trains on to the end and checkpoints; the run names it and its step."""
    out = tmp_path / "run"
    sizes = [RES]
    train(tiny(teacher_ckpt, out, max_steps=2), loader=FixedLoader(sizes, steps=8))
    bad, good = (out / a / "checkpoint_last.pt" for a in ARCHS)
    before = bad.read_bytes()
    result = train(tiny(teacher_ckpt, out, lr=(float("nan"), 0.05), resume="auto", log_every=2, ckpt_every=2),
                   loader=FixedLoader(sizes, steps=8))
    assert result["step"] == 8
    (line,) = result["failed"]
    # step 3 (0-based), the first after its first nan update, is the first with a NaN loss
    assert line.startswith(f"student {ARCHS[0]}: loss became NaN/inf at step 3;") and str(bad) in line, line
    assert bad.read_bytes() == before
    assert read_checkpoint(good)["fastseed"]["step"] == 8
    healthy = losses(out, f"loss/{ARCHS[1]}")
    assert len(healthy) == 2 + 3 and all(math.isfinite(v) for v in healthy)  # steps 1, 2, then 4, 6, 8
    assert len(losses(out, f"loss/{ARCHS[0]}")) == 2  # the first run's only


def test_every_student_gone_nan_ends_the_run(teacher_ckpt, tmp_path):
    with pytest.raises(TrainingError, match=rf"student {ARCHS[0]}: loss became NaN.* \| student {ARCHS[1]}: loss"):
        train(tiny(teacher_ckpt, tmp_path, lr=float("nan"), max_steps=2), loader=FixedLoader([RES]))
    assert not list(tmp_path.glob("*/checkpoint_last.pt"))


def test_out_of_memory_at_start_says_which_students_fit_at_which_batch(teacher_ckpt, tmp_path, monkeypatch):
    """Simulated memory: test_resnet fits 4 images beside the other, test_efficientnet 2."""
    import fastseed.train as T
    real_step = T.train_step
    limit = dict(zip(ARCHS, (4, 2)))

    def small_memory_step(run, views, step, batch=None):
        if views[0].shape[0] > min(limit[s.name] for s in run.students.live):
            raise torch.OutOfMemoryError("simulated")
        return real_step(run, views, step, batch)

    monkeypatch.setattr(T, "train_step", small_memory_step)
    with pytest.raises(TrainingError, match=r"with --batch-size 8; the largest batch each student fits beside the "
                                            r"others: test_resnet 4, test_efficientnet 2: rerun with --batch-size 2 "
                                            r"\(and scale --lr with it\)$"):
        train(tiny(teacher_ckpt, tmp_path), loader=FixedLoader([RES]))
    assert not list(tmp_path.glob("*/checkpoint_last.pt"))


def test_student_configs_split_arch_and_lr_and_refuse_what_cannot_work():
    cfg = Config(arch="resnet18, efficientnet_b0", lr=(0.1, 0.2), output="o", resume="runs/x")
    a, b = student_configs(cfg)
    assert (a.arch, a.lr, a.output, a.resume) == ("resnet18", 0.1, "o/resnet18", "runs/x/resnet18/checkpoint_last.pt")
    assert (b.arch, b.lr, b.output) == ("efficientnet_b0", 0.2, "o/efficientnet_b0")
    one = Config(arch="resnet18", lr=0.1, output="o", resume="ck.pt")
    assert student_configs(one) == [one]  # a single student: today's layout, untouched
    for bad, msg in [(dict(arch="resnet18,resnet18"), "each student once"), (dict(arch="resnet18,"), "once"),
                     (dict(arch="resnet18,efficientnet_b0", lr=(0.1, 0.2, 0.3)), "3 values for 2 student"),
                     (dict(arch="resnet18,efficientnet_b0", method="moco"), "moco trains one student")]:
        with pytest.raises(ConfigError, match=msg):
            student_configs(Config(**bad))


def test_cli_refuses_moco_with_several_students_in_one_line(tmp_path, capsys, fmnist):
    from fastseed.cli import train_main
    beton = fmnist("test", 64)
    capsys.readouterr()
    code = train_main(["--data", str(beton), "--method", "moco", "-a", "resnet18,efficientnet_b0",
                       "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert refusal(code, capsys.readouterr().err).startswith("error: --method moco trains one student")
    assert not (tmp_path / "out").exists()


def test_commit_of_several_files_is_finished_after_a_kill_between_renames(tmp_path, monkeypatch):
    """A kill between two renames leaves the journal; the next start finishes the renames."""
    paths = [tmp_path / "a" / "ck.pt", tmp_path / "b" / "ck.pt"]
    temps = []
    for p in paths:
        p.parent.mkdir()
        torch.save("old", p)
        torch.save("new", p.with_name(".ck.tmp"))
        temps.append((p.with_name(".ck.tmp"), p))
    journal = tmp_path / COMMIT_JOURNAL
    real_replace, calls = os.replace, []

    def killed_after_first(src, dst):
        calls.append(dst)
        if str(dst).endswith("ck.pt") and len([c for c in calls if str(c).endswith("ck.pt")]) == 2:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        commit_all(temps, journal)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [torch.load(p) for p in paths] == ["new", "old"] and journal.is_file()  # mixed: one step apart
    finish_commit(journal)
    assert [torch.load(p) for p in paths] == ["new", "new"] and not journal.exists()
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["ck.pt", "ck.pt"]


def test_bench_multi_runs_tiny(tmp_path):
    """benchmarks/bench_multi.py end to end at a tiny size (its numbers mean nothing here)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "m.jsonl"
    p = subprocess.run([sys.executable, "benchmarks/bench_multi.py", "--tiny", "--res", "32", "--batch", "16",
                        "--steps", "1", "--rounds", "1", "--images", "64", "--phase-steps", "1", "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    (r,) = map(json.loads, out.read_text().splitlines())
    assert r["joint_images_per_s"] > 0 and r["solo_sequence_images_per_s"] > 0 and r["commit"]
    assert set(r["phase_ms_per_step"]) == {"joint", *r["students"]}
    assert r["phase_ms_per_step"]["joint"]["teacher"] > 0 and r["phase_ms_per_step"]["joint"]["students"] > 0
