"""Where and how a run executes: ranks and device, precision, compile policy, seeding, the
DDP/FSDP2 wrapper, collectives, preemption signals, and the phase marks a profiler can hook.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (on one node or many: its c10d rendezvous assigns
the ranks), and TORCHELASTIC_RESTART_COUNT when its agent restarts a failed worker group; a
plain `python` run is one rank. Every collective of the process group times out after
`--dist-timeout` seconds instead of hanging, and `teardown` destroys the group at the end.
Nothing here knows which method, teacher or student a run has.
"""
from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastseed.config import Config
from fastseed.errors import ConfigError


@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup_env made the process group: teardown destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: Config) -> Env:
    """The rank's device (TF32 and cuDNN autotuning on CUDA) and, under torchrun, the process group."""
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible: use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if want.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    owns = world > 1 and not dist.is_initialized()
    if owns:
        timeout = timedelta(seconds=cfg.dist_timeout)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                store=_attempt_store(world, timeout), rank=rank, world_size=world)
    return Env(rank, world, local, device, owns)


def _attempt_store(world: int, timeout: timedelta):
    """Under torchrun's agent store, this attempt's own key space in it. The agent keeps one
    store across restarts, and the keys a killed group left there (its ranks' gloo addresses)
    would send a restarted group's ranks to ports nobody listens on (seen: 'Gloo connectFullMesh
    failed ... Connection refused' after a restart); None elsewhere (env:// as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"fastseed/attempt{restart_count()}", store)


def teardown(env: Env) -> None:
    """Destroy the process group setup_env made (at the end of a run, or on its failure)."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def restart_count() -> int:
    """How often torchrun's elastic agent restarted this worker group (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_main() -> bool:
    """True on the first rank of each machine (and outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def main_rank() -> bool:
    """True outside torchrun and on rank 0 under it."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # a --precision's autocast dtype


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `cfg.precision` on `device` (None: fp32, no autocast)."""
    p = cfg.precision
    if p == "auto":
        # CPUs without AMX run bf16 convolutions slower than fp32: autocast only on CUDA.
        p = "bf16" if device.type == "cuda" else "fp32"
    return AUTOCAST[p]


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN runs bf16 matmuls and convolutions on them)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the frozen teacher, `cfg.teacher_precision` on `device` (None: fp32);
    student: the students' (`amp_dtype`).

    auto: the students' (`amp_dtype`) on CUDA. On a CPU, bf16 where it has AMX tiles: a forward
    in inference mode needs no bf16 backward (which oneDNN runs slower than fp32 even there), and
    the teacher's forward is about a fifth of a CPU step (docs/profiling.md, "--profile");
    without AMX, fp32. A teacher key in bf16 is what every CUDA run distils from already."""
    p = cfg.teacher_precision
    if p == "student" or (p == "auto" and device.type != "cpu"):
        return amp_dtype(cfg, device)
    if p == "auto":
        p = "bf16" if has_amx() else "fp32"
    return AUTOCAST[p]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_compile(cfg: Config, env: Env) -> bool:
    if cfg.compile == "auto":
        # compiling a ResNet takes minutes on a 2-core CPU: more than a CPU run gains
        return env.device.type == "cuda"
    return cfg.compile == "on"


def compiler(cfg: Config, env: Env) -> Callable[[nn.Module], nn.Module] | None:
    """torch.compile with the run's mode when compiling is on, else None."""
    return (lambda m: torch.compile(m, mode=cfg.compile_mode)) if use_compile(cfg, env) else None


def sharded(cfg: Config, env: Env) -> bool:
    """FSDP2 shards the students' parameters (and checkpoints gather them)."""
    return cfg.fsdp and env.world > 1


def wrap_model(method: nn.Module, cfg: Config, env: Env) -> nn.Module:
    """What a step calls: `method` under DDP (or FSDP2-sharded: its `student` block by block,
    then `student`, then each other trainable part: `head`, a patch-token projector), compiled
    as configured."""
    model = method
    if env.world > 1 and not cfg.fsdp:
        # static graph + bucket views: no unused-parameter search, no gradient copies
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            static_graph=True, gradient_as_bucket_view=True, broadcast_buffers=False)
    elif env.world > 1:
        from torch.distributed.fsdp import fully_shard
        for block in method.student.children():
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block)
        fully_shard(method.student)
        for name, part in method.named_children():
            if name != "student" and any(p.requires_grad for p in part.parameters()):
                fully_shard(part)
        # a patch-token loss calls the student's forward_features and forward_head, not its
        # forward: their calls must gather and free the shards as a forward's do
        from torch.distributed.fsdp import register_fsdp_forward_method
        for name in ("forward_features", "forward_head"):
            if hasattr(method.student, name):
                register_fsdp_forward_method(method.student, name)
    if use_compile(cfg, env):
        model = torch.compile(model, mode=cfg.compile_mode)
    return model


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` (the same count on each) concatenated in rank order, on every rank:
    the keys every rank enqueues alike, the k-NN monitor's feature shards."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    out = rows.new_empty((dist.get_world_size() * rows.shape[0], *rows.shape[1:]))
    dist.all_gather_into_tensor(out, rows.contiguous())
    return out


# ---------------------------------------------------------------- preemption
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's notice: SLURM sends SIGUSR1
                                                    # with --signal, SIGTERM at the end of a job


class Preemption:
    """Notes SIGTERM / SIGUSR1 while a run trains (`with Preemption() as p:`): the first one sets
    a flag instead of killing the process, so the loop can checkpoint at a step boundary and
    exit cleanly; a second one kills as usual. `agreed()` is a collective: every rank calls it
    at the same step and all get True when any rank got the signal."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        for sig in PREEMPT_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._note)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one kills

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------- phase marks
# A step says where it is with `phase(name)`: from now on its time belongs to `name`. Nothing
# listens by default (a call costs one global lookup); fastseed.profile installs a timer for
# the profiled steps with `phase_hook`, so no timer is passed through the step's arguments.
_phase_hook: Callable[[str | None], None] | None = None


def phase(name: str | None) -> None:
    if _phase_hook is not None:
        _phase_hook(name)


class phase_hook:
    """`with phase_hook(fn):` sends every `phase(name)` of the block to `fn`."""

    def __init__(self, fn: Callable[[str | None], None]):
        self.fn = fn

    def __enter__(self):
        global _phase_hook
        self.previous, _phase_hook = _phase_hook, self.fn
        return self.fn

    def __exit__(self, *exc):
        global _phase_hook
        _phase_hook = self.previous
