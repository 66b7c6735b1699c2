"""Kill a real CLI run with SIGKILL mid-epoch, resume it with `--resume auto`, and check that the
step count, the data position and the queue continue exactly where the last checkpoint left them.

FFCV's random crops are not reproducible across processes, so the resumed values are not
compared with an uninterrupted run; what must continue exactly is the bookkeeping: step,
epoch/batch-in-epoch, the queue pointer, and every queue row not overwritten since the
checkpoint (bit for bit). Also: a checkpoint of another teacher or another student arch is
refused with one `error:` line and exit code 2, and left untouched.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastseed.data_prep import write_beton
from fastseed.train import TrainingError, atomic_save, read_checkpoint

pytestmark = pytest.mark.slow

IMAGES, BATCH, QUEUE, CKPT_EVERY = 1024, 32, 256, 3
STEPS_PER_EPOCH = IMAGES // BATCH
K = 5  # steps after the resume: K * BATCH = 160 of the 256 queue rows are overwritten, 96 are not
CLI = [sys.executable, "-c", "import sys; from fastseed.cli import train_main; sys.exit(train_main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.beton"
    write_beton("fashion-mnist:train", str(path), subset=IMAGES, compress_probability=0.0, progress=False)
    return path


def _args(beton: Path, out: Path, *extra: str, arch: str = "resnet10t") -> list[str]:
    return [*CLI, "--data", str(beton), "--output", str(out), "-a", arch, "-k", "efficientnet_lite0",
            "--res", "32", "--teacher-res", "32", "-b", str(BATCH), "--epochs", "2", "--queue-size", str(QUEUE),
            "--ckpt-every", str(CKPT_EVERY), "--log-every", "1", "--knn-every", "0", "--no-progress",
            "--device", "cpu", "--workers", "2", "--lr", "0.05", "--warmup-epochs", "0", *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def killed(beton, tmp_path_factory):
    """A run SIGKILLed right after it has checkpointed step >= 6 mid-epoch. Returns its output
    dir, the checkpoint on disk after the kill (its bytes and contents), and how many metrics
    lines the killed run had written."""
    out = tmp_path_factory.mktemp("killed") / "run"
    ckpt_path = out / "checkpoint_last.pt"
    log = open(out.parent / "stderr.txt", "w")
    proc = subprocess.Popen(_args(beton, out), stdout=subprocess.DEVNULL, stderr=log, env=_env())
    deadline = time.monotonic() + 120
    seen = None
    try:
        while True:
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before it was killed: " + \
                (out.parent / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no mid-epoch checkpoint at step >= 6 within 120 s"
            try:
                st = os.stat(ckpt_path)
            except FileNotFoundError:
                st = None
            # read only a new file (each save renames a new inode into place): loading the
            # checkpoint 20 times a second would take CPU from the run on a 2-core machine
            if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
                seen = (st.st_ino, st.st_mtime_ns)
                try:  # written by temp file + rename: a successful read is a whole checkpoint
                    step = read_checkpoint(ckpt_path)["fastseed"]["step"]
                except TrainingError:
                    step, seen = 0, None
                if step >= 6 and step % STEPS_PER_EPOCH:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    raw = ckpt_path.read_bytes()  # the run may have checkpointed again before the kill landed
    ckpt = read_checkpoint(ckpt_path)
    return out, raw, ckpt, len(_metrics(out))


def test_sigkill_mid_epoch_then_resume_auto_continues_exactly(beton, killed):
    out, _, ckpt, n_lines_before = killed
    meta = ckpt["fastseed"]
    s = meta["step"]
    assert s >= 6 and s % CKPT_EVERY == 0 and s % STEPS_PER_EPOCH, meta  # mid-epoch, a periodic checkpoint
    assert (meta["epoch"], meta["batch_in_epoch"]) == divmod(s, STEPS_PER_EPOCH)
    q0, p0 = ckpt["buffers"]["queue.keys"], int(ckpt["buffers"]["queue.ptr"])
    assert q0.shape == (QUEUE, 1280) and p0 == (s * BATCH) % QUEUE

    t0 = time.monotonic()
    p = subprocess.run(_args(beton, out, "--resume", "auto", "--max-steps", str(s + K)),
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-4000:]
    resume_s = time.monotonic() - t0

    # it picked up the latest checkpoint, at step S, at the same data position
    want = (f"resumed from {out / 'checkpoint_last.pt'} at step {s} "
            f"(epoch {meta['epoch']}, batch {meta['batch_in_epoch']})")
    assert want in p.stderr, p.stderr[-4000:]

    # metrics: the killed run's lines are kept; the resumed run's steps go S+1 .. S+K,
    # no gap, no repeat, each in the epoch its position says
    new = [r for r in _metrics(out)[n_lines_before:] if "loss" in r]
    assert [r["step"] for r in new] == list(range(s + 1, s + K + 1)), new
    assert [r["epoch"] for r in new] == [(t - 1) // STEPS_PER_EPOCH for t in range(s + 1, s + K + 1)]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in new)  # finite

    end = read_checkpoint(out / "checkpoint_last.pt")
    assert end["fastseed"]["step"] == s + K
    assert (end["fastseed"]["epoch"], end["fastseed"]["batch_in_epoch"]) == divmod(s + K, STEPS_PER_EPOCH)
    q1, p1 = end["buffers"]["queue.keys"], int(end["buffers"]["queue.ptr"])
    assert p1 == (p0 + K * BATCH) % QUEUE

    # the K*B rows written since S are fresh unit-norm teacher keys; every other row is unchanged
    written = torch.tensor([(p0 + j) % QUEUE for j in range(K * BATCH)])
    kept = torch.ones(QUEUE, dtype=torch.bool)
    kept[written] = False
    assert kept.sum() == QUEUE - K * BATCH
    assert torch.equal(q1[kept], q0[kept])
    # (a crop that is one flat colour can give the bundled teacher an exactly zero embedding,
    # which normalises to a zero row: allowed, but rare)
    norms = q1[written].norm(dim=1)
    unit = (norms - 1).abs() < 1e-5
    assert (unit | (norms == 0)).all() and unit.float().mean() > 0.9, norms
    changed = (q1[written] - q0[written]).abs().amax(dim=1) > 1e-3
    assert (changed | ((norms == 0) & (q0[written].norm(dim=1) == 0))).all()
    # the student continued from the checkpoint's weights (trained further, not re-initialised)
    w0, w1 = ckpt["student"]["conv1.0.weight"], end["student"]["conv1.0.weight"]
    assert 0 < (w1 - w0).abs().max() < 0.5 * w0.abs().max()
    print(f"killed at step {s}; resumed run of {K} steps took {resume_s:.1f} s")


def _start_resume(beton: Path, out: Path, arch: str = "resnet10t") -> subprocess.Popen:
    return subprocess.Popen(_args(beton, out, "--resume", "auto", "--max-steps", "99", arch=arch),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _refused(proc: subprocess.Popen, out: Path, before: bytes) -> str:
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    assert "Traceback" not in stderr
    assert (out / "checkpoint_last.pt").read_bytes() == before  # nothing written over
    assert not (out / "metrics.jsonl").exists()
    return errors[0]


def test_resume_refuses_another_teacher_or_arch(beton, killed, tmp_path):
    _, raw, ckpt, _ = killed
    # a checkpoint distilled from another teacher (another hash)
    other = tmp_path / "other_teacher"
    other.mkdir()
    ckpt = {**ckpt, "fastseed": {**ckpt["fastseed"], "teacher": {**ckpt["fastseed"]["teacher"], "sha256": "f" * 64}}}
    atomic_save(ckpt, other / "checkpoint_last.pt")
    # the right checkpoint, but this run asks for another student arch
    arch = tmp_path / "other_arch"
    arch.mkdir()
    (arch / "checkpoint_last.pt").write_bytes(raw)
    # both at once: each is mostly single-threaded start-up
    procs = [_start_resume(beton, other), _start_resume(beton, arch, arch="resnet14t")]
    try:
        line = _refused(procs[0], other, (other / "checkpoint_last.pt").read_bytes())
        assert "teacher sha256 ffffffffffff" in line and "-k" in line, line
        line = _refused(procs[1], arch, raw)
        assert "resnet10t" in line and "resnet14t" in line and "--arch" in line, line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
