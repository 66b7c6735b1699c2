"""Kill a real CLI run with SIGKILL mid-epoch, resume it with `--resume auto`, and check that the
step count, the data position and the queue continue exactly where the last checkpoint left them.

FFCV's random crops are not reproducible across processes, so the resumed values are not
compared with an uninterrupted run; what must continue exactly is the bookkeeping: step,
epoch/batch-in-epoch, the queue pointer, and every queue row not overwritten since the
checkpoint (bit for bit). Also: a checkpoint of another teacher or another student arch is
refused with one `error:` line and exit code 2, and left untouched. A run of two students
(`-a a,b`) continues both exactly, with one queue, one data position and one RNG state.
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
from helpers import refusal

from fastseed.checkpoint import COMMIT_JOURNAL, atomic_save, finish_commit, read_checkpoint
from fastseed.errors import TrainingError

pytestmark = pytest.mark.slow

IMAGES, BATCH, QUEUE, CKPT_EVERY = 1024, 32, 256, 3
STEPS_PER_EPOCH = IMAGES // BATCH
K = 5  # steps after the resume: K * BATCH = 160 of the 256 queue rows are overwritten, 96 are not
CLI = [sys.executable, "-c", "import sys; from fastseed.cli import train_main; sys.exit(train_main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def beton(fmnist):
    return fmnist("train", IMAGES)


def _args(beton: Path, out: Path, *extra: str, arch: str = "resnet10t") -> list[str]:
    return [*CLI, "--method", "seed", "--data", str(beton), "--output", str(out), "-a", arch, "-k",
            "efficientnet_lite0", "--res", "32", "--teacher-res", "32", "-b", str(BATCH), "--epochs", "2",
            "--queue-size", str(QUEUE),
            "--ckpt-every", str(CKPT_EVERY), "--log-every", "1", "--knn-every", "0", "--no-progress",
            "--device", "cpu", "--workers", "2", "--lr", "0.05", "--warmup-epochs", "0", *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _kill_after_mid_epoch_checkpoint(args: list[str], ckpt_path: Path, log_path: Path) -> None:
    """Run the CLI and SIGKILL it right after `ckpt_path` holds a checkpoint of step >= 6 mid-epoch."""
    log = open(log_path, "w")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=_env())
    deadline = time.monotonic() + 120
    seen = None
    try:
        while True:
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before it was killed: " + \
                log_path.read_text()[-3000:]
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


@pytest.fixture(scope="module")
def killed(beton, tmp_path_factory):
    """A run SIGKILLed right after it has checkpointed step >= 6 mid-epoch. Returns its output
    dir, the checkpoint on disk after the kill (its bytes and contents), and how many metrics
    lines the killed run had written."""
    out = tmp_path_factory.mktemp("killed") / "run"
    ckpt_path = out / "checkpoint_last.pt"
    _kill_after_mid_epoch_checkpoint(_args(beton, out), ckpt_path, out.parent / "stderr.txt")
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
    line = refusal(proc.returncode, stderr, alone=False)
    assert (out / "checkpoint_last.pt").read_bytes() == before  # nothing written over
    assert not (out / "metrics.jsonl").exists()
    return line


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
        assert "teacher efficientnet_lite0 (sha256 ffffffffffff)" in line and "-k" in line, line
        line = _refused(procs[1], arch, raw)
        assert "resnet10t" in line and "resnet14t" in line and "--arch" in line, line
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


FAMILY = ("resnet10t", "test_efficientnet")


@pytest.fixture(scope="module")
def killed_family(beton, tmp_path_factory):
    """A two-student run SIGKILLed right after a mid-epoch checkpoint of step >= 6. Returns its
    output dir, each student's checkpoint after the kill, and how many metrics lines it wrote."""
    out = tmp_path_factory.mktemp("family") / "run"
    _kill_after_mid_epoch_checkpoint(_args(beton, out, arch=",".join(FAMILY)), out / FAMILY[0] / "checkpoint_last.pt",
                                     out.parent / "stderr.txt")
    finish_commit(out / COMMIT_JOURNAL)  # what the resumed run does first, should the kill fall between renames
    return out, {a: read_checkpoint(out / a / "checkpoint_last.pt") for a in FAMILY}, len(_metrics(out))


def test_sigkill_mid_epoch_then_resume_auto_continues_every_student_exactly(beton, killed_family):
    out, ckpts, n_lines_before = killed_family
    first, second = (ckpts[a] for a in FAMILY)
    meta = first["fastseed"]
    s = meta["step"]
    assert s >= 6 and s % STEPS_PER_EPOCH and (meta["epoch"], meta["batch_in_epoch"]) == divmod(s, STEPS_PER_EPOCH)
    # one commit: both students at the same step, with one queue, pointer and RNG state
    assert {k: second["fastseed"][k] for k in ("step", "epoch", "batch_in_epoch")} == \
        {k: meta[k] for k in ("step", "epoch", "batch_in_epoch")}
    assert torch.equal(first["buffers"]["queue.keys"], second["buffers"]["queue.keys"])
    assert first["rng"][0]["augment"].equal(second["rng"][0]["augment"])
    q0, p0 = first["buffers"]["queue.keys"], int(first["buffers"]["queue.ptr"])
    assert p0 == (s * BATCH) % QUEUE

    p = subprocess.run(_args(beton, out, "--resume", "auto", "--max-steps", str(s + K), arch=",".join(FAMILY)),
                       capture_output=True, text=True, env=_env(), timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    for a in FAMILY:
        want = f"resumed from {out / a / 'checkpoint_last.pt'} at step {s} (epoch {meta['epoch']}, " \
               f"batch {meta['batch_in_epoch']})"
        assert want in p.stderr, p.stderr[-4000:]

    # metrics: steps S+1 .. S+K, each with both students' losses, in the epoch its position says
    new = [r for r in _metrics(out)[n_lines_before:] if "step" in r and "final" not in r]
    assert [r["step"] for r in new] == list(range(s + 1, s + K + 1)), new
    assert [r["epoch"] for r in new] == [(t - 1) // STEPS_PER_EPOCH for t in range(s + 1, s + K + 1)]
    assert all(r[f"loss/{a}"] > 0 for r in new for a in FAMILY)

    ends = [read_checkpoint(out / a / "checkpoint_last.pt") for a in FAMILY]
    for end, start in zip(ends, (first, second)):
        assert (end["fastseed"]["step"], end["fastseed"]["batch_in_epoch"]) == (s + K, (s + K) % STEPS_PER_EPOCH)
        assert int(end["buffers"]["queue.ptr"]) == (p0 + K * BATCH) % QUEUE
        # the student continued from its checkpoint's weights (trained further, not re-initialised)
        name = next(k for k, v in start["student"].items() if v.dim() == 4)  # its first conv
        w0, w1 = start["student"][name], end["student"][name]
        assert 0 < (w1 - w0).abs().max() < 0.5 * w0.abs().max(), name
    assert torch.equal(ends[0]["buffers"]["queue.keys"], ends[1]["buffers"]["queue.keys"])
    # the rows written since S are new; every other row is the checkpoint's, bit for bit
    kept = torch.ones(QUEUE, dtype=torch.bool)
    kept[torch.tensor([(p0 + j) % QUEUE for j in range(K * BATCH)])] = False
    q1 = ends[0]["buffers"]["queue.keys"]
    assert torch.equal(q1[kept], q0[kept]) and not torch.equal(q1[~kept], q0[~kept])
    # the augmentation's generator went on from the checkpoint's state: K batches' draws from
    # it (they do not depend on the pixels) give the resumed run's final state
    assert ends[0]["rng"][0]["augment"].equal(ends[1]["rng"][0]["augment"])
    assert ends[0]["rng"][0]["augment"].equal(_augment_state_after(first, K))


def _augment_state_after(ckpt: dict, steps: int) -> torch.Tensor:
    """The augmentation generator's state after `steps` batches drawn from `ckpt`'s state, with
    the augmentation `prepare` builds for this run's config (a stand-in loader: no FFCV)."""
    from fastseed.config import Config
    from fastseed.train import prepare

    class OneBatch(list):
        def resume(self, epoch, batch=0):
            pass

    x = torch.zeros(BATCH, 32, 32, 3, dtype=torch.uint8)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k not in ("mean", "std")})
    run = prepare(cfg.replace(output=str(Path(cfg.output).parent / "replay")), loader=OneBatch([([x], None)]))
    run.aug_gen.set_state(ckpt["rng"][0]["augment"])
    for _ in range(steps):
        run.augment(x, generator=run.aug_gen)
    return run.aug_gen.get_state()
