"""Beyond one process: several nodes through torchrun's c10d rendezvous, an elastic restart
after a rank is SIGKILLed, a scheduler's SIGTERM / SIGUSR1, the NaN stop that a restarted group
must not repeat, and the k-NN monitor shared out over the ranks. All on the CPU with gloo over
loopback, as CI runs them.

Exactness: a resumed run (after a kill and torchrun's restart, or after a preemption) must end
with weights, heads and queues equal bit for bit to a run never interrupted: on the CPU every
step is deterministic given the checkpoint (data order from seed and epoch, every rank's RNG
state restored), so any difference is a resume bug, not noise.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import refusal, same_weights
from test_distributed import LOSS_ATOL, LOSS_RTOL, QUEUE_ATOL, WEIGHT_ATOL, WORKER, _env, _launch
from test_resume import BATCH, IMAGES, STEPS_PER_EPOCH, _args, _metrics

from fastseed.checkpoint import STOP_MARKER, read_checkpoint
from fastseed.config import Config
from fastseed.errors import TrainingError
from fastseed.train import train

pytestmark = pytest.mark.slow

TRAIN = Path(sys.executable).with_name("fastseed-train")  # the console script torchrun runs
STOP_AT = 12  # every run here ends at this step (the same lr schedule for all of them)


@pytest.fixture(scope="module")
def beton(fmnist):
    return fmnist("train", IMAGES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(beton, tmp_path_factory):
    """One process, never interrupted, to STOP_AT."""
    out = tmp_path_factory.mktemp("reference") / "run"
    p = subprocess.run(_args(beton, out, "--max-steps", str(STOP_AT)), capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "checkpoint_last.pt"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_schedulers_signal_checkpoints_at_a_step_boundary_and_resume_is_exact(beton, reference, tmp_path, sig):
    out = tmp_path / "run"
    # no periodic checkpoint: the only one is the signal's
    proc = subprocess.Popen(_args(beton, out, "--max-steps", str(STOP_AT), "--ckpt-every", "1000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() or len(_metrics(out)) < 2:  # a few steps in, mid-epoch
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]  # a clean exit, not a kill
    ckpt = read_checkpoint(out / "checkpoint_last.pt")
    step = ckpt["fastseed"]["step"]
    assert f"stopped by {sig.name} at step {step}: every student is checkpointed" in stderr, stderr[-3000:]
    assert 2 <= step < STOP_AT
    assert (ckpt["fastseed"]["epoch"], ckpt["fastseed"]["batch_in_epoch"]) == divmod(step, STEPS_PER_EPOCH)
    assert max(r["step"] for r in _metrics(out)) == step  # nothing trained past the checkpoint
    p = subprocess.run(_args(beton, out, "--resume", "auto", "--max-steps", str(STOP_AT)), capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert p.returncode == 0 and f"at step {step} " in p.stderr, p.stderr[-3000:]
    same_weights(out / "checkpoint_last.pt", reference, STOP_AT)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids + [g for k in kids for g in _children(k)]


def _local_rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), None)


def _torchrun(beton: Path, out: Path, *extra: str) -> list[str]:
    script = _args(beton, out, "--max-steps", str(STOP_AT), "--workers", "1")[3:]  # without `python -c ...`
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
            str(TRAIN), *script]


def test_elastic_restart_after_a_rank_is_killed_resumes_by_itself_and_ends_as_if_never_stopped(beton, tmp_path):
    env = dict(_env(), OMP_NUM_THREADS="1")
    ref = tmp_path / "uninterrupted"
    p = subprocess.run(_torchrun(beton, ref), capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]

    out = tmp_path / "killed"
    agent = subprocess.Popen(_torchrun(beton, out, "--max-restarts", "1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    ckpt, deadline, seen = out / "checkpoint_last.pt", time.monotonic() + 600, None
    while True:  # a mid-epoch checkpoint of step >= 6, then SIGKILL rank 1
        assert agent.poll() is None and time.monotonic() < deadline, agent.stderr.read()[-4000:]
        st = ckpt.stat() if ckpt.is_file() else None
        if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
            seen = (st.st_ino, st.st_mtime_ns)
            try:
                if read_checkpoint(ckpt)["fastseed"]["step"] >= 6:
                    break
            except TrainingError:
                seen = None
        time.sleep(0.05)
    victim = next(k for k in _children(agent.pid) if _local_rank(k) == "1")
    killed_at, killed_wall = time.monotonic(), time.time()
    os.kill(victim, signal.SIGKILL)
    _, stderr = agent.communicate(timeout=600)
    (tmp_path / "agent_stderr.txt").write_text(stderr)
    assert agent.returncode == 0, stderr[-4000:]
    resumed = [line for line in stderr.splitlines() if "resumed from" in line]
    assert resumed, stderr[-4000:]  # the restarted group resumed with no --resume given
    again = min(r["time"] for r in _metrics(out) if r["time"] > killed_wall and "loss" in r)
    print(f"SIGKILL to the restarted group's first logged step: {again - killed_wall:.1f} s; to the end of "
          f"the run: {time.monotonic() - killed_at:.1f} s; {resumed[0]}")
    same_weights(out / "checkpoint_last.pt", ref / "checkpoint_last.pt", STOP_AT)


def test_two_nodes_of_one_rank_train_as_one_node_of_two(tmp_path):
    """torchrun's c10d rendezvous on loopback: two agents, one rank each, as two machines would."""
    one_node = _launch(tmp_path / "one_node", "seed", 2)
    out = tmp_path / "two_nodes"
    out.mkdir()
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastseed-test",
           str(WORKER), str(out), "seed", "ddp"]
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-3000:] for log in logs)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in range(2))
    for two, one in zip((r0, r1), one_node):
        torch.testing.assert_close(torch.tensor(two["mean_loss"]), torch.tensor(one["mean_loss"]),
                                   rtol=LOSS_RTOL, atol=LOSS_ATOL)
        for s_two, s_one in zip(two["students"], one["students"]):
            for k, v in s_one.items():
                torch.testing.assert_close(s_two[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)
        torch.testing.assert_close(two["queue"], one["queue"], rtol=0, atol=QUEUE_ATOL)
    assert torch.equal(r0["queue"], r1["queue"]) and r0["world"] == r1["world"] == 2


def test_a_nan_stop_is_not_repeated_by_a_restarted_group(beton, tmp_path, monkeypatch):
    cfg = Config(method="seed", arch="resnet10t", teacher_arch="efficientnet_lite0", data=str(beton), res=32,
                 teacher_res=32, batch_size=BATCH, epochs=1, max_steps=2, lr=float("nan"), queue_size=256,
                 output=str(tmp_path / "run"), log_every=1, knn_every=0, progress=False, device="cpu", workers=2)
    with pytest.raises(TrainingError, match="NaN/inf") as first:
        train(cfg)
    marker = tmp_path / "run" / STOP_MARKER
    assert marker.read_text().strip() == str(first.value)
    # torchrun's agent restarts the group: it refuses at once, with the same line, before a step
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as again:
        train(cfg.replace(lr=0.05))
    assert str(again.value) == str(first.value) and marker.is_file()
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
    # the CLI says it in one line, exit code 2
    code = subprocess.run([sys.executable, str(TRAIN), *_args(beton, tmp_path / "run")[3:]], capture_output=True,
                          text=True, env=dict(_env(), TORCHELASTIC_RESTART_COUNT="1"), timeout=300)
    assert refusal(code.returncode, code.stderr, "NaN/inf") == f"error: {first.value}"
    print(f"refused in {time.monotonic() - t0:.1f} s")
    # a run started by hand (the fix made) clears the marker and trains
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert train(cfg.replace(lr=0.05))["step"] == 2 and not marker.exists()


KNN_WORKER = """
import sys, torch
from torch import nn
from fastseed.config import Config
from fastseed.evaluate import KnnMonitor
from fastseed.runtime import setup_env, teardown
cfg = Config(data=sys.argv[1], val_data=sys.argv[2], res=16, workers=1, device="cpu")
env = setup_env(cfg)
monitor = KnnMonitor(cfg, env.device, ((0.5,) * 3, (0.25,) * 3), None, batch_size=64, rank=env.rank, world=env.world)
torch.manual_seed(0)
encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
torch.save({"pixels": monitor(None), "encoder": monitor(encoder)}, f"{sys.argv[3]}/rank{env.rank}.pt")
teardown(env)
"""


def test_knn_over_two_ranks_equals_one_rank(fmnist, tmp_path):
    """Each rank extracts its shard (an odd count: 333 bank images over 2 ranks pads one), the
    shards are gathered in order, and every rank gets the one-rank scores."""
    bank, val = fmnist("train", 333), fmnist("test", 64)
    (tmp_path / "worker.py").write_text(KNN_WORKER)
    results = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        p = subprocess.run([*cmd, str(tmp_path / "worker.py"), str(bank), str(val), str(out)], env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        results[n] = [torch.load(out / f"rank{r}.pt") for r in range(n)]
    (one,) = results[1]
    assert results[2][0] == results[2][1] == one, (results[2], one)
    assert 10 < one["pixels"]["knn_top1@20"] < 100 and one["encoder"] != one["pixels"]
