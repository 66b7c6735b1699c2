"""Sharded (DCP) checkpoint folders in one process: the folder commit and a kill between its
renames, the tools that read a student (fastseed-eval's load_student, fastseed-export's
load_encoder, `--resume auto`) on a folder, and a folder whose index names code. The runs of
several ranks that write and resume them are in tests/test_distributed.py."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from fastseed import checkpoint
from fastseed.checkpoint import (COMMIT_JOURNAL, RUN_STATE, _write_dcp_temp, atomic_save, commit_all, dcp_folder,
                                 find_resume, finish_commit, read_checkpoint, restore, save_checkpoint)
from fastseed.config import Config
from fastseed.errors import TrainingError
from fastseed.evaluate import load_student
from fastseed.export import checkpoint_file, load_encoder
from fastseed.methods.seed import SEED
from fastseed.optim import build_optimizer
from fastseed.runtime import Env
from fastseed.students import build_method

TEACHER = {"arch": "efficientnet_lite0", "format": "bundled", "sha256": "ab" * 32, "dim": 32}


def _state(step: int):
    cfg = Config(method="seed", arch="test_resnet", queue_size=16, device="cpu", res=32)
    method = build_method(cfg, Env(), 32, SEED.make_queues(dim=32, queue_size=16))
    return dict(cfg=cfg, env=Env(), method=method, optimizer=build_optimizer(cfg, method, 0.1, torch.device("cpu")),
                scaler=None, step=step, epoch=0, batch_in_epoch=step, teacher_info=TEACHER,
                aug_gen=torch.Generator(), mean_std=((0.5,) * 3, (0.25,) * 3))


def _save_folder(run_dir, step: int) -> dict:
    """A DCP checkpoint folder of step `step` committed as save_checkpoints does; its state."""
    state = _state(step)
    path = run_dir / "checkpoint_last.pt"
    commit_all([(_write_dcp_temp(path, **state), dcp_folder(path))], run_dir / COMMIT_JOURNAL)
    return state


def test_a_folder_and_its_tools(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = _save_folder(run, 3)
    folder = run / "checkpoint_last.dcp"
    ckpt = read_checkpoint(folder)
    assert ckpt["fastseed"]["step"] == 3 and ckpt["fastseed"]["arch"] == "test_resnet"
    want = state["method"].state_dict()
    assert {f"student.{k}" for k in ckpt["student"]} | {f"head.{k}" for k in ckpt["head"]} | set(ckpt["buffers"]) \
        == set(want)
    for k, v in ckpt["student"].items():
        assert torch.equal(v, want[f"student.{k}"]), k
    # fastseed-eval and fastseed-export read the folder, or the run folder holding it
    model, meta = load_student(str(folder))
    assert meta["step"] == 3 and all(torch.equal(v, ckpt["student"][k]) for k, v in model.state_dict().items())
    assert checkpoint_file(folder) == folder and checkpoint_file(run) == folder
    module, pre = load_encoder(run)
    assert pre.res == 32 and module(torch.zeros(1, 3, 32, 32)).shape == (1, model.num_features)
    # converted to one file (docs/clusters.md's one-liner), it resumes a plain run: weights and optimizer
    atomic_save(read_checkpoint(folder), tmp_path / "student.pt")
    fresh = _state(0)
    torch.manual_seed(1)
    for p in fresh["method"].parameters():
        p.data.normal_()
    restore(read_checkpoint(tmp_path / "student.pt"), fresh["cfg"], fresh["method"], fresh["optimizer"], None,
            TEACHER, torch.Generator(), Env())
    assert all(torch.equal(v, want[k]) for k, v in fresh["method"].state_dict().items())
    assert len(fresh["optimizer"].state) == len(list(fresh["method"].parameters()))
    # --resume auto finds it; with a one-file checkpoint beside it, the later step wins
    cfg = Config(output=str(run), resume="auto")
    assert find_resume(cfg) == folder
    save_checkpoint(run / "checkpoint_last.pt", **_state(5))
    assert find_resume(cfg) == run / "checkpoint_last.pt"
    _save_folder(run, 7)  # over the old folder
    assert find_resume(cfg) == folder and read_checkpoint(folder)["fastseed"]["step"] == 7
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_last.dcp", "checkpoint_last.pt"]


def test_a_kill_between_the_folder_renames_is_completed_at_the_next_start(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _save_folder(run, 3)
    rename = os.replace

    def replace(src, dst):  # the kill: after the old folder went aside, before the new one came in
        if src.name == ".checkpoint_last.dcp.tmp":
            assert (run / ".checkpoint_last.dcp.old").is_dir()
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save_folder(run, 4)
    monkeypatch.undo()
    assert not (run / "checkpoint_last.dcp").exists() and (run / COMMIT_JOURNAL).is_file()
    assert read_checkpoint(run / ".checkpoint_last.dcp.old")["fastseed"]["step"] == 3  # both whole
    finish_commit(run / COMMIT_JOURNAL)  # what resume does first
    assert read_checkpoint(run / "checkpoint_last.dcp")["fastseed"]["step"] == 4
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_last.dcp"]


def test_a_save_killed_before_its_commit_leaves_the_previous_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _save_folder(run, 3)
    monkeypatch.setattr(checkpoint, "atomic_save", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the shards are written, fastseed.pt is not
        _save_folder(run, 4)
    assert (run / ".checkpoint_last.dcp.tmp").is_dir() and not (run / ".checkpoint_last.dcp.tmp" / RUN_STATE).exists()
    assert find_resume(Config(output=str(run), resume="auto")) == run / "checkpoint_last.dcp"
    assert read_checkpoint(run / "checkpoint_last.dcp")["fastseed"]["step"] == 3


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_an_index_that_names_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _save_folder(run, 3)
    monkeypatch.chdir(tmp_path)
    (run / "checkpoint_last.dcp" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(TrainingError, match="posix.system.*runs code from the file: not loaded"):
        read_checkpoint(run / "checkpoint_last.dcp")
    assert not (tmp_path / "pwned").exists()


def test_a_mid_epoch_checkpoint_resumes_only_on_as_many_ranks_as_wrote_it():
    from pathlib import Path
    from types import SimpleNamespace

    from fastseed.checkpoint import _check_position
    mid = {"fastseed": {"step": 6, "epoch": 1, "batch_in_epoch": 2}, "rng": [None]}  # of 1 rank
    end = {"fastseed": {"step": 8, "epoch": 2, "batch_in_epoch": 0}, "rng": [None]}
    two, one = (SimpleNamespace(steps_per_epoch=4, env=Env(world=w)) for w in (2, 1))
    with pytest.raises(TrainingError, match="middle of epoch 1 of a 1-rank run.*resume it on 1 rank"):
        _check_position(mid, Path("ckpt"), two)
    _check_position(mid, Path("ckpt"), one)
    _check_position(end, Path("ckpt"), two)  # an epoch's end: any number of ranks
    with pytest.raises(TrainingError, match="5 batches per epoch put at epoch 1, batch 1"):
        _check_position(mid, Path("ckpt"), SimpleNamespace(steps_per_epoch=5, env=Env()))
