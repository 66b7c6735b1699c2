"""DDP through torchrun on CPU (gloo): 2 ranks train exactly like 1 rank with the same global batch.
SEED runs two students on one teacher and queue (`-a a,b`), each with its own DDP wrapper;
`seed-dense` adds the patch-token loss (--dense-weight): the projectors must agree as the students do;
`seed-local` adds the patch-relation loss (--local-weight), per image and so per rank;
`simreg-std` standardises SimReg's targets with statistics over every rank's keys.

Each run is a subprocess of tests/ddp_worker.py: the 2-rank run is launched by torch's own
engine (`python -m torch.distributed.run --standalone --nproc_per_node 2`), the 1-rank run by
plain `python`. Both see the same fixed uint8 batches (rank r takes rows r*B/2:(r+1)*B/2),
normalisation only as augmentation, a GroupNorm student and a frozen LayerNorm/GroupNorm
teacher, so nothing depends on how the batch is split except the order of fp32 reductions.

Tolerances: DDP averages the two ranks' gradients (sum of two half-batch sums, then / 2) where
the 1-rank run sums one batch; fp32 reassociation gives ~1e-7 relative differences per step
(measured: <= 1.3e-7 on the losses, <= 3e-7 on the weights after 8 steps at lr 0.5). We allow
rtol 1e-4 on losses and 1e-4 absolute on weights: 3 orders of margin for other CPUs' kernels,
still far below what a missing gradient all-reduce, a wrong loss scale (sum vs mean over
ranks) or a wrongly ordered all-gather would produce (those change the values at 1e-2 or more,
or permute whole queue rows). Queues must be bit-identical across ranks (every rank enqueues
the same all-gathered tensor) and within 1e-5 of the 1-rank queue (the teacher's convolutions
may block a batch of 8 differently from a batch of 16).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastseed.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ddp_worker.py")
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
WEIGHT_ATOL = 1e-4
QUEUE_ATOL = 1e-5


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(out: Path, method: str, nproc: int, mode: str = "ddp") -> list[dict]:
    out.mkdir(parents=True)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), method]
    else:  # torch's launcher; --standalone picks a free rendezvous port itself
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(out), method, mode]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@pytest.mark.parametrize("method", ["seed", "moco", "seed-dense", "seed-local", "simreg-std"])
def test_two_gloo_ranks_match_one_rank(tmp_path, method):
    (one,) = _launch(tmp_path / "one", method, 1)
    r0, r1 = _launch(tmp_path / "two", method, 2)

    # the real wrap_model path: DDP, static graph, bucket views, no unused-parameter search
    assert one["ddp"] is None and one["world"] == 1
    for r in (r0, r1):
        assert r["world"] == 2
        assert r["ddp"] == {"is_ddp": True, "static_graph": True, "gradient_as_bucket_view": True,
                            "find_unused_parameters": False, "backend": "gloo"}

    # the two halves really differ, so the mean over ranks is not trivially one rank's loss
    assert r0["local_loss"] != r1["local_loss"]
    assert r0["mean_loss"] == r1["mean_loss"]  # all-reduced: the same number on both ranks
    # loss trajectory of 2 ranks == 1 rank with the same global batch
    torch.testing.assert_close(torch.tensor(r0["mean_loss"]), torch.tensor(one["local_loss"]),
                               rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert len(one["local_loss"]) == 8 and len({tuple(x) for x in one["local_loss"]}) > 1  # it trained
    assert len(one["students"]) == (2 if method.startswith("seed") else 1)
    assert len(one["projectors"]) == (2 if method in ("seed-dense", "seed-local") else 0)

    # gradients were averaged across ranks: the ranks' students agree, with each other and with 1 rank
    for s_one, s0, s1 in zip(one["students"] + one["projectors"], r0["students"] + r0["projectors"],
                             r1["students"] + r1["projectors"]):
        for k, v in s_one.items():
            assert torch.equal(s0[k], s1[k]), k
            torch.testing.assert_close(s0[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)

    if method == "simreg-std":  # no queue; its targets' mean and std were over both ranks' keys (with each
        return                  # rank's own, the 2-rank losses and weights above differ at ~1e-2)
    # teacher/key embeddings all-gathered (in rank order) before the enqueue: identical queues
    # on both ranks, and the same rows in the same places as the 1-rank run (8 steps x 16 keys
    # into a 48-row ring: it wrapped, the pointer is at 128 % 48 = 32)
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["ptr"], r1["ptr"])
    assert int(one["ptr"]) == int(r0["ptr"]) == (8 * 16) % 48
    torch.testing.assert_close(r0["queue"], one["queue"], rtol=0, atol=QUEUE_ATOL)
    # a rank-reversed gather would swap the two 8-row halves of each batch: make sure that differs
    swapped = torch.cat([one["queue"][8:16], one["queue"][0:8]])
    assert (swapped - one["queue"][0:16]).abs().max() > 100 * QUEUE_ATOL


@pytest.mark.parametrize("method", ["seed", "seed-dense", "seed-local"])
def test_two_fsdp2_ranks_match_one_rank(tmp_path, method):
    """--fsdp: fully_shard'ed student and head (and projector: sharded parameters,
    reduce-scattered gradients) train exactly as one rank does; the optimizer must hold the
    shards, not the old tensors."""
    (one,) = _launch(tmp_path / "one", method, 1)
    r0, r1 = _launch(tmp_path / "two", method, 2, mode="fsdp")
    assert r0["ddp"] is None and r0["world"] == 2
    torch.testing.assert_close(torch.tensor(r0["mean_loss"]), torch.tensor(one["local_loss"]),
                               rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert len(one["projectors"]) == (2 if method in ("seed-dense", "seed-local") else 0)
    for s_one, s0, s1 in zip(one["students"] + one["projectors"], r0["students"] + r0["projectors"],
                             r1["students"] + r1["projectors"]):
        for k, v in s_one.items():
            torch.testing.assert_close(s0[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)
            assert torch.equal(s0[k], s1[k]), k
    assert torch.equal(r0["queue"], r1["queue"])
    torch.testing.assert_close(r0["queue"], one["queue"], rtol=0, atol=QUEUE_ATOL)
    # the checkpoint is a DCP folder each rank wrote its shards into, nothing gathered (the
    # sharded state dict, no whole parameter materialised); a fresh sharded run restores it bit for bit
    for r in (r0, r1):
        assert r["during_save"] == [("get_state_dict", False)] * 2, r["during_save"]
    for width in (16, 12):
        folder = tmp_path / "two" / f"tiny{width}" / "checkpoint_last.dcp"
        assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "fastseed.pt"]
        assert not (folder.parent / "checkpoint_last.pt").exists()
    assert r0["restored_equal"] is True and r1["restored_equal"] is True


def _run(out: Path, nproc: int, *options: str, mode: str = "ddp", fails: bool = False) -> list[dict]:
    """tests/ddp_worker.py with checkpoint `options` (key=value) on `nproc` ranks (1: plain python)."""
    out.mkdir(parents=True)
    cmd = [sys.executable, str(WORKER)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER)]
    p = subprocess.run([*cmd, str(out), "seed", mode, *options], env=_env(), capture_output=True, text=True,
                       timeout=120)
    if fails:
        assert p.returncode != 0 and "killed in the middle of a save" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
        return []
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, 8 steps, never stopped: what every resumed run must end as."""
    (one,) = _launch(tmp_path_factory.mktemp("uninterrupted") / "one", "seed", 1)
    return one


def _ends_as(resumed: list[dict], one: dict, start: int) -> None:
    """Resumed at `start`, each rank trained the steps left and ends as the uninterrupted run."""
    for r in resumed:
        assert r["start"] == start
        torch.testing.assert_close(torch.tensor(r["mean_loss"]), torch.tensor(one["local_loss"][start:]),
                                   rtol=LOSS_RTOL, atol=LOSS_ATOL)
        for s_one, s in zip(one["students"], r["students"], strict=True):
            for k, v in s_one.items():
                torch.testing.assert_close(s[k], v, rtol=0, atol=WEIGHT_ATOL, msg=k)
        torch.testing.assert_close(r["queue"], one["queue"], rtol=0, atol=QUEUE_ATOL)
        assert int(r["ptr"]) == int(one["ptr"])


def test_fsdp2_checkpoint_resumes_on_one_plain_rank_and_a_killed_save_leaves_it(tmp_path, uninterrupted):
    """2 FSDP2 ranks checkpoint after step 4 (a DCP folder), go on, and die in the middle of the
    step-6 checkpoint (rank 1 wrote its shards, rank 0 no index). The step-4 folder is untouched;
    one plain process resumes from it and ends as the run that never stopped."""
    ckpt = tmp_path / "run"
    _run(tmp_path / "two", 2, f"ckpt={ckpt}", "save=4", "kill=6", mode="fsdp", fails=True)
    for width in (16, 12):
        folder = ckpt / f"tiny{width}" / "checkpoint_last.dcp"
        assert read_checkpoint(folder)["fastseed"]["step"] == 4  # whole, and readable in one process
    assert (ckpt / "tiny16" / ".checkpoint_last.dcp.tmp" / "__1_0.distcp").is_file()  # the killed save's shards
    (resumed,) = _run(tmp_path / "one", 1, f"ckpt={ckpt}", "resume=1")
    _ends_as([resumed], uninterrupted, 4)


def test_one_process_checkpoint_resumes_on_two_fsdp2_ranks(tmp_path, uninterrupted):
    ckpt = tmp_path / "run"
    _run(tmp_path / "one", 1, f"ckpt={ckpt}", "save=4", "stop=4")
    assert (ckpt / "tiny16" / "checkpoint_last.pt").is_file()  # one process: the one-file checkpoint
    resumed = _run(tmp_path / "two", 2, f"ckpt={ckpt}", "resume=1", mode="fsdp")
    _ends_as(resumed, uninterrupted, 4)
