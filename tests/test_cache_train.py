"""Training from a teacher cache (`--teacher-cache`): the targets are the stored keys of the
replayed crops (no teacher forward), they enter the queue, checkpoints record the cache, a run
SIGKILLed mid-epoch resumes to the same weights as a run never stopped (the crops of an epoch
are a function of seed, epoch and index), and a cache that does not fit the run is refused in
one line, exit code 2.

One cache (bundled EfficientNet-Lite0 at 32 px, R = 2) of the beton of tests/test_resume.py's
size serves the module: its kill helper expects 32 steps an epoch.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import build_teacher_cache, refusal
from test_resume import BATCH, CLI, IMAGES, _env, _kill_after_mid_epoch_checkpoint

from fastseed.cache import TeacherCache
from fastseed.checkpoint import read_checkpoint
from fastseed.cli import train_main
from fastseed.config import Config
from fastseed.errors import CacheError
from fastseed.targets import CachedTargets
from fastseed.train import prepare, train, train_step

pytestmark = pytest.mark.slow

QUEUE, STEPS = 256, 16  # the killed, resumed and reference runs all stop at step 16 (one lr schedule)


@pytest.fixture(scope="module")
def data(tmp_path_factory, fmnist):
    d = tmp_path_factory.mktemp("cachetrain")  # the cache beside links to the session's betons
    (d / "train.beton").symlink_to(fmnist("train", IMAGES))
    (d / "other.beton").symlink_to(fmnist("test", 256))
    cfg = Config(method="seed", data=str(d / "train.beton"), teacher_arch="efficientnet_lite0", res=32, teacher_res=32,
                 device="cpu", workers=2, progress=False)
    cache = build_teacher_cache(cfg, d / "train.tcache", crops=2, chunk=256, batch_size=256, progress=False)
    return d, cache


def _cfg(d: Path, out: Path, **kw) -> Config:
    return Config(method="seed", data=str(d / "train.beton"), teacher_cache=str(d / "train.tcache"), arch="resnet10t",
                  teacher_arch="efficientnet_lite0", res=32, teacher_res=32, batch_size=BATCH, epochs=2,
                  queue_size=QUEUE, lr=0.05, warmup_epochs=0, output=str(out), log_every=1, knn_every=0,
                  progress=False, device="cpu", workers=2).replace(**kw)


def _args(d: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "--method", "seed", "--data", str(d / "train.beton"), "--teacher-cache", str(d / "train.tcache"),
            "--output", str(out), "-a", "resnet10t", "--res", "32", "-b", str(BATCH), "--epochs", "2", "--queue-size",
            str(QUEUE), "--ckpt-every", "3", "--log-every", "1", "--knn-every", "0", "--no-progress", "--device",
            "cpu", "--workers", "2", "--lr", "0.05", "--warmup-epochs", "0", *extra]


def test_step_takes_the_stored_keys_and_enqueues_them(data, tmp_path):
    d, cache = data
    run = prepare(_cfg(d, tmp_path / "run"))
    assert isinstance(run.targets, CachedTargets) and run.targets.teacher is None  # no teacher loaded
    assert run.targets.dim == cache.dim == 1280 and run.teacher_info["cache"]["sha256"] == cache.identity
    views, labels, keys = next(iter(run.loader))
    ptr = int(run.queues.queue.ptr)
    losses = train_step(run, views, 0, [labels, keys])
    assert torch.isfinite(losses[0])
    rows = run.queues.queue.keys[ptr:ptr + BATCH]  # fp32 on the CPU, as the live teacher's keys
    assert keys.dtype == torch.bfloat16 and torch.equal(rows, F.normalize(keys.float(), dim=1))


def test_simreg_family_trains_from_the_cache(data, tmp_path):
    """SimReg distils the pooled feature: the bundled teacher has no head, so the keys built
    for SEED are that feature; two students share them."""
    d, _ = data
    result = train(_cfg(d, tmp_path / "run", method="simreg", arch="resnet10t,test_efficientnet", max_steps=2))
    assert result["step"] == 2 and not result["failed"]
    ckpt = read_checkpoint(tmp_path / "run" / "test_efficientnet" / "checkpoint_last.pt")
    assert ckpt["fastseed"]["method"] == "simreg" and ckpt["fastseed"]["teacher"]["cache"]["path"].endswith(".tcache")


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    d, _ = data
    out = tmp_path_factory.mktemp("killed") / "run"
    _kill_after_mid_epoch_checkpoint(_args(d, out, "--max-steps", str(STEPS)), out / "checkpoint_last.pt",
                                     out.parent / "stderr.txt")
    return out, read_checkpoint(out / "checkpoint_last.pt")


def test_sigkill_mid_epoch_then_resume_matches_a_run_never_stopped(data, killed, tmp_path):
    d, cache = data
    out, ckpt = killed
    meta = ckpt["fastseed"]
    assert meta["step"] < STEPS and meta["teacher"]["cache"]["sha256"] == cache.identity
    assert meta["teacher"]["arch"] == "efficientnet_lite0" and meta["teacher"]["sha256"] == cache.header["teacher"][
        "sha256"]
    p = subprocess.run(_args(d, out, "--resume", "auto", "--max-steps", str(STEPS)), capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"resumed from {out / 'checkpoint_last.pt'} at step {meta['step']}" in p.stderr
    # the same run, never stopped, in this process
    ref = tmp_path / "ref"
    train(_cfg(d, ref, ckpt_every=3, max_steps=STEPS))
    end, want = read_checkpoint(out / "checkpoint_last.pt"), read_checkpoint(ref / "checkpoint_last.pt")
    assert end["fastseed"]["step"] == want["fastseed"]["step"] == STEPS
    for part in ("student", "head", "buffers"):
        for name, tensor in want[part].items():
            assert torch.equal(end[part][name], tensor), f"{part}.{name}"


def _refused(capsys, argv, *needles) -> str:
    return refusal(train_main(argv), capsys.readouterr().err, *needles)


def test_a_cache_that_does_not_fit_the_run_is_refused(data, killed, tmp_path, capsys):
    d, _ = data
    base = _args(d, tmp_path / "x")[len(CLI):]
    _refused(capsys, [*base, "--data", str(d / "other.beton")], "another beton", "num_samples")
    _refused(capsys, [*base, "-k", "efficientnet_lite1"], "another teacher", "teacher.arch")
    # --distill is hashed, not loaded: any other file is another teacher
    _refused(capsys, [*base, "--distill", str(d / "other.beton")], "another teacher", "teacher.sha256")
    _refused(capsys, [*base, "--teacher-res", "48"], "teacher_res 32", "--teacher-res 32")
    _refused(capsys, [*base, "--crop-scale", "0.5,1"], "crop_scale", "--crop-scale 0.2,1.0")
    _refused(capsys, [*base, "--small-crops", "6"], "--small-crops")
    _refused(capsys, [*base, "--method", "moco"], "--method moco has no teacher")
    _refused(capsys, [*base, "--teacher-cache", str(d / "missing.tcache")], "missing.tcache not found")
    # resuming a cache run without the cache (or with another) would replay other crops
    out, _ = killed
    before = (out / "checkpoint_last.pt").read_bytes()
    _refused(capsys, [a for a in _args(d, out, "--resume", "auto")[len(CLI):]
                      if a not in ("--teacher-cache", str(d / "train.tcache"))] + ["-k", "efficientnet_lite0"],
             "from teacher cache", "with the live teacher", "--teacher-cache")
    assert (out / "checkpoint_last.pt").read_bytes() == before


def test_the_target_the_run_distils_must_be_the_stored_one(data):
    """Keys built for a teacher's backbone feature cannot serve a run that distils its head and
    the reverse; a headless teacher's feature (built for the head) serves both."""
    _, cache = data
    fake = TeacherCache(cache.path, cache.header)
    cache.check(target="head")
    cache.check(target="backbone")  # the bundled teacher has no head
    fake.header = {**cache.header, "target": "backbone"}
    fake.check(target="backbone")
    with pytest.raises(CacheError, match="holds the teacher's pooled backbone features.*distils its projection"):
        fake.check(target="head")
    fake.header = {**cache.header, "teacher": {**cache.header["teacher"], "head": True}}
    fake.check(target="head")
    with pytest.raises(CacheError, match="holds the teacher's projection-head embeddings.*distils its pooled"):
        fake.check(target="backbone")
