"""One rank of the distributed-equivalence test (tests/test_distributed.py).

Run under `python -m torch.distributed.run --nproc_per_node N tests/ddp_worker.py OUT METHOD`
(or plain `python` for one rank). Builds the run with the real pieces (setup_env, METHODS,
build_optimizer, wrap_model, Students, TeacherTargets, train_step) around a batch-split-invariant student (GroupNorm, no
BatchNorm) and a frozen LayerNorm/GroupNorm teacher, feeds every run the same fixed global
uint8 batches (rank r takes rows r*B/W:(r+1)*B/W) and writes its losses, queue and weights to
OUT/rank{r}.pt. SEED runs two students (widths 16 and 12) on the shared teacher and queue, each
DDP-wrapped (or sharded) on its own, as `-a a,b` does; `seed-dense` is SEED with --dense-weight
0.5 (the teacher's token map and each student's 1×1 projector, FSDP calling forward_features);
`seed-local` is SEED with --local-weight 0.5 (the patch-relation loss: per image, so nothing crosses ranks);
`simreg-std` is SimReg with one Linear head and --simreg-targets standardize (the statistics over
every rank's keys; no queue).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastseed.augment import Normalize
from fastseed.checkpoint import _read_for_resume, find_resume, restore, resume, save_checkpoints
from fastseed.config import Config
from fastseed.methods import METHODS
from helpers import frozen_teacher
from fastseed.optim import Schedule, build_optimizer
from fastseed.runtime import setup_env, wrap_model
from fastseed.students import Student, Students
from fastseed.targets import TeacherTargets
from fastseed.teachers.base import Teacher
from fastseed.train import Run, train_step

STEPS = 8
GLOBAL_BATCH = 16
RES = 16
DIM = 32
QUEUE = 48  # 3 global batches: the ring wraps twice in 8 steps
EPOCH = 4  # steps per epoch of the checkpoints' data position
WIDTHS = {"seed": (16, 12), "seed-dense": (16, 12), "seed-local": (16, 12)}  # the students' widths (default: 16)
DENSE_WEIGHT = {"seed-dense": 0.5}
LOCAL_WEIGHT = {"seed-local": 0.5}
# Config settings beside the method's
VARIANTS = {"seed-dense": {}, "seed-local": {}, "simreg-std": dict(simreg_targets="standardize")}


class TinyNet(nn.Module):
    """Conv - GroupNorm - ReLU - Conv - GroupNorm - ReLU - pool: per-sample, so its output
    does not depend on how the batch is split across ranks (BatchNorm's would)."""

    def __init__(self, width: int = 16, out: int | None = None):
        super().__init__()
        self.num_features = width
        self.body = nn.Sequential(  # one module: FSDP shards it whole (its slices would not be)
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU())
        self.proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out)) if out else nn.Identity()

    def forward_features(self, x):  # the last map [B, width, RES/4, RES/4], as timm's
        return self.body(x)

    def forward_head(self, x):
        return self.proj(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class FixedAugment(Normalize):
    """Normalisation only (the random augmentation's draws depend on the per-rank batch)."""

    def forward(self, x, generator=None):
        return super().forward(x)


def global_batches() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (STEPS, GLOBAL_BATCH, RES, RES, 3), generator=g, dtype=torch.uint8)


def full(v: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) gathered whole; a plain tensor as it is."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def main(out_dir: str, method_name: str, mode: str = "ddp", *options: str) -> None:
    """`options` (key=value), for the checkpoint tests: ckpt=DIR (the run's output: each student
    writes DIR/tiny<width>/), save=S (checkpoint after step S), kill=S (die in the middle of the
    checkpoint after step S), stop=S (train to step S), resume=1 (resume from DIR first)."""
    opts = dict(o.split("=", 1) for o in options)
    ckpt_dir = Path(opts.get("ckpt", out_dir))
    base, variant = method_name.split("-")[0], VARIANTS.get(method_name, {})
    cfg = Config(method=base, **variant, device="cpu", compile="off", precision="fp32", batch_size=GLOBAL_BATCH,
                 optimizer="sgd", momentum=0.9, weight_decay=1e-4, queue_size=QUEUE, fsdp=mode == "fsdp",
                 output=str(ckpt_dir), resume="auto" if opts.get("resume") else None)
    env = setup_env(cfg)  # reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK, inits gloo when WORLD_SIZE > 1
    cls = METHODS[base]
    dense = dict(dense_weight=DENSE_WEIGHT.get(method_name, 0.0), local_weight=LOCAL_WEIGHT.get(method_name, 0.0),
                 token_dim=24)
    queues = cls.make_queues(dim=DIM, queue_size=QUEUE)
    lr = 0.5
    members = []
    for width in WIDTHS.get(method_name, (16,)):
        torch.manual_seed(0)  # same init on every rank and in the 1-rank run
        method = cls(TinyNet(width), queues, dim=DIM, temp=0.2, distill_t=0.05, moco_m=0.99,
                     bn_groups=2, head="linear" if base == "simreg" else "mlp", **dense).to(env.device)
        model = wrap_model(method, cfg, env)
        optimizer = build_optimizer(cfg, method, lr, env.device)  # after fully_shard replaced the params
        scfg = cfg.replace(arch=f"tiny{width}", output=str(ckpt_dir / f"tiny{width}"))
        if env.main:
            scfg.out_dir.mkdir(parents=True, exist_ok=True)
        members.append(Student(scfg, method, model, optimizer, None, lr))
    method, model, optimizer = members[0].method, members[0].model, members[0].optimizer
    targets = method  # MoCo: its own key encoder
    if cls.needs_teacher:
        tnet = TinyNet(width=24, out=DIM).eval()
        for p in tnet.parameters():
            p.requires_grad_(False)
        targets = TeacherTargets(frozen_teacher(Teacher(tnet), res=RES), cls.teacher_inputs, DIM,
                                 ((0.5,) * 3, (0.25,) * 3), {},
                                 tokens=dense["dense_weight"] > 0 or dense["local_weight"] > 0)
    ddp = None
    if env.world > 1 and mode == "ddp":
        ddp = {"is_ddp": isinstance(model, nn.parallel.DistributedDataParallel),
               "static_graph": bool(getattr(model, "static_graph", False)),
               "gradient_as_bucket_view": bool(getattr(model, "gradient_as_bucket_view", False)),
               "find_unused_parameters": bool(getattr(model, "find_unused_parameters", True)),
               "backend": dist.get_backend()}
    augment = FixedAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    students = Students(members)
    # 2 warm-up steps, then the cosine over the STEPS steps; the checkpoints' data position
    # counts epochs of EPOCH steps (the resume tests checkpoint at an epoch's end)
    schedule = Schedule(cfg.replace(warmup_epochs=2 / STEPS), steps_per_epoch=STEPS, total=STEPS)
    run = Run(cfg, env, cls, students, targets, queues, None, ((0.5,) * 3, (0.25,) * 3), None, augment,
              torch.Generator().manual_seed(0), None, schedule=schedule, total=STEPS, steps_per_epoch=EPOCH)
    start = resume(run) if cfg.resume else 0
    saves = watch_saves()

    per_rank = GLOBAL_BATCH // env.world
    batches = global_batches()[:, env.rank * per_rank:(env.rank + 1) * per_rank]
    local, mean = [], []
    students.train()
    for step in range(start, int(opts.get("stop", STEPS))):
        x = batches[step]
        # MoCo's second view: a fixed flip of the first (deterministic, per sample)
        views = [x, x.flip(2)] if method_name == "moco" else [x]
        loss = torch.stack(train_step(run, views, step))  # one per student
        local.append(loss.tolist())
        g = loss.clone()
        if env.world > 1:
            dist.all_reduce(g)  # equal per-rank batches: the global mean is the mean of rank means
            g /= env.world
        mean.append(g.tolist())
        if step + 1 == int(opts.get("kill", -1)):
            die_in_the_middle_of_the_next_save(env)
        if step + 1 in (int(opts.get("save", -1)), int(opts.get("kill", -1))):
            save_checkpoints(run, step + 1, *divmod(step + 1, EPOCH))
    students.stop_non_finite(STEPS, weights=True)  # the NaN guard's collective: every rank agrees
    assert not students.failures()
    restored, during_save = None, None
    if mode == "fsdp" and not options:  # checkpoint round trip: write shards, load into a fresh sharded run
        n = len(saves)
        save_checkpoints(run, STEPS, *divmod(STEPS, EPOCH))
        during_save = saves[n:]
        torch.manual_seed(1)  # a different init: everything must come from the folder
        fresh = cls(TinyNet(WIDTHS.get(method_name, (16,))[0]), cls.make_queues(dim=DIM, queue_size=QUEUE),
                    dim=DIM, temp=0.2, distill_t=0.05, **dense)
        wrap_model(fresh, cfg, env)
        fresh_opt = build_optimizer(cfg, fresh, lr, env.device)
        folder = find_resume(members[0].cfg.replace(resume="auto"))
        restore(_read_for_resume(folder, False), members[0].cfg, fresh, fresh_opt, None, None, torch.Generator(), env)
        restored = all(torch.equal(full(a), full(b)) for a, b in
                       zip(method.state_dict().values(), fresh.state_dict().values()))
    queue = getattr(method, "queue", None)  # SimReg has none
    torch.save({"rank": env.rank, "restored_equal": restored, "world": env.world, "local_loss": local,
                "mean_loss": mean, "ddp": ddp, "queue": None if queue is None else queue.keys.clone(),
                "ptr": None if queue is None else queue.ptr.clone(),
                "start": start, "during_save": during_save,
                "students": [{k: full(v).clone() for k, v in s.method.student.state_dict().items()}
                             for s in members],
                "projectors": [{k: full(v).clone() for k, v in getattr(s.method, head).state_dict().items()}
                               for s in members for head in ("dense", "local") if hasattr(s.method, head)]},
               Path(out_dir) / f"rank{env.rank}.pt")
    if env.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def watch_saves() -> list:
    """Every get_state_dict call's full_state_dict option and every DTensor.full_tensor call
    (a gather of a whole parameter) from here on, as a list the worker's result holds."""
    import torch.distributed.checkpoint.state_dict as sd
    from torch.distributed.tensor import DTensor
    seen = []
    get, gather = sd.get_state_dict, DTensor.full_tensor

    def get_state_dict(*args, options=None, **kwargs):
        seen.append(("get_state_dict", options.full_state_dict if options is not None else False))
        return get(*args, options=options, **kwargs)

    def full_tensor(self, *args, **kwargs):
        seen.append(("full_tensor", tuple(self.shape)))
        return gather(self, *args, **kwargs)

    sd.get_state_dict, DTensor.full_tensor = get_state_dict, full_tensor
    return seen


def die_in_the_middle_of_the_next_save(env) -> None:
    """The last rank exits at once after writing its shards of the next checkpoint, as a
    SIGKILL would stop it: rank 0 never writes the index, torchrun stops the group."""
    import os

    from torch.distributed.checkpoint import FileSystemWriter
    write = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        done = write(self, plan, planner)
        if env.rank == env.world - 1:
            done.wait()
            print(f"rank {env.rank}: killed in the middle of a save", flush=True)
            os._exit(9)
        return done

    FileSystemWriter.write_data = write_data


if __name__ == "__main__":
    main(*sys.argv[1:])
