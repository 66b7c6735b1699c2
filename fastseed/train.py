"""The training loop: one screen of `train()`, the pieces it calls above it.

A run has one target source (`fastseed.targets`: the frozen teacher, asked once per batch) and
one or more students (`fastseed.students`: `-a` takes a comma list), which share the loader,
the augmentation, the targets and the queues, and own the rest.

Speed choices (each measured or explained where it is made): teacher frozen in eval +
inference_mode and never in the optimizer/DDP/checkpoint; student channels-last under bf16
autocast and torch.compile; fused/foreach optimizer; no host sync inside a step (loss and the
NaN guard are read only at log and checkpoint steps); queue enqueue without a host sync.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastseed.augment import Normalize, preset_augment, resolve_preset
from fastseed.config import Config
from fastseed.data import eval_loader, replay_loader, ssl_loader
from fastseed.evaluate import extract_features, knn_classify
from fastseed.methods import METHODS
from fastseed.models import ConfigError, create_student, to_channels_last
from fastseed.students import NO_PHASES, Phases, Student, Students, student_configs
from fastseed.targets import CachedTargets, build_targets
from fastseed.teachers import IMAGENET_MEAN, IMAGENET_STD, CheckpointReadError, read_checkpoint_file

CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, bad resume); the message says what to do."""


# ---------------------------------------------------------------- environment
@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: Config) -> Env:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run is one rank."""
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world, local, device)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    p = cfg.precision
    if p == "auto":
        # CPUs without AMX run bf16 convolutions slower than fp32: autocast only on CUDA.
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- building
def build_method(cfg: Config, env: Env, dim: int, queues) -> nn.Module:
    """One student's backbone + head around the run's shared `queues`. Its init depends only on
    `cfg.seed` (the global generator is forked and seeded with it, the same on every rank), not
    on what was built before it: a student of a joint run starts as its solo run does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # channels-last before the method copies it: MoCo's key encoder is a deep copy of the student
        student = to_channels_last(create_student(cfg.arch), cfg.channels_last)
        method = METHODS[cfg.method](student, queues, dim=dim, temp=cfg.temp, distill_t=cfg.distill_t,
                                     moco_m=cfg.moco_m, compile_fn=compiler(cfg, env))
    return method.to(env.device)


def build_student(cfg: Config, env: Env, dim: int, queues, dtype: torch.dtype | None) -> Student:
    """`cfg` is the student's solo config (`student_configs`): its method, wrapper, optimizer."""
    method = build_method(cfg, env, dim, queues)
    model = wrap_model(method, cfg, env)
    # after wrapping: fully_shard swaps the parameters for DTensor shards
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 256
    optimizer = build_optimizer(cfg, method, lr, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
    return Student(cfg, method, model, optimizer, scaler, lr)


def use_compile(cfg: Config, env: Env) -> bool:
    if cfg.compile == "auto":
        # compiling a ResNet takes minutes on a 2-core CPU: more than a CPU run gains
        return env.device.type == "cuda"
    return cfg.compile == "on"


def compiler(cfg: Config, env: Env):
    """torch.compile with the run's mode when compiling is on, else None."""
    return (lambda m: torch.compile(m, mode=cfg.compile_mode)) if use_compile(cfg, env) else None


def build_optimizer(cfg: Config, method: nn.Module, lr: float, device: torch.device):
    params = [p for p in method.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None, foreach=None if fused else True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer == "lars":
        from timm.optim import Lars
        return Lars(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown --optimizer {cfg.optimizer!r}: choose sgd, lars or adamw")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine to zero, per step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_lr(epoch: int, epochs: int, warmup_epochs: float, peak: float, start: float) -> float:
    """The official schedule, one value per epoch (jacobswan1/SEED tools/utils.py:89-101; with no
    warm-up it is MoCo's main_moco.py:372-381 and SimReg's tools.py:13-18):

        epoch < W:  start + (peak - start) / W * epoch     SEED: start = lr, peak = lr x batch/256
        otherwise:  peak * (1 + cos(pi * epoch / epochs)) / 2

    The cosine counts the warm-up epochs too, so it resumes below `peak` after the warm-up."""
    if epoch < warmup_epochs:
        return start + (peak - start) / warmup_epochs * epoch
    return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# ---------------------------------------------------------------- checkpoints
def atomic_save(obj, path: Path) -> None:
    """Write to a temp file beside the target, fsync, rename: a kill leaves the old file."""
    os.replace(_write_temp(obj, path), path)


def _write_temp(obj, path: Path) -> Path:
    """`obj` in a temp file beside `path`, fsynced, for the caller to rename into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        aliases = _dtype_aliases(obj) if isinstance(e, RuntimeError) else []
        if aliases:  # torch.save's own message names no tensor
            raise TrainingError(f"cannot write {path}: tensors share memory under different dtypes: "
                                f"{'; '.join(aliases)}. {path.name} is untouched") from e
        raise
    return tmp


def commit_all(temps: list[tuple[Path, Path]], journal: Path) -> None:
    """Rename written temp files (temp, target) into place as one step. With several, a journal
    naming them is saved first (atomically): a kill between two renames leaves it, and
    `finish_commit` completes the renames at the next start, so the targets never mix steps."""
    if len(temps) > 1:
        atomic_save([[str(t), str(p)] for t, p in temps], journal)
    for tmp, path in temps:
        os.replace(tmp, path)
    journal.unlink(missing_ok=True)


def finish_commit(journal: Path) -> None:
    """Complete the renames of a commit a kill interrupted (every temp it names was whole)."""
    if not journal.is_file():
        return
    for tmp, path in torch.load(journal, weights_only=True):
        if Path(tmp).is_file():
            os.replace(tmp, path)
    journal.unlink()


def _dtype_aliases(obj) -> list[str]:
    """The tensors of `obj` (nested dicts, lists, tuples) whose storages start at one address
    with different dtypes, which torch.save refuses: 'path=dtype, path=dtype' per address."""
    by_ptr: dict[int, list[tuple[str, torch.dtype]]] = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            if ptr:
                by_ptr.setdefault(ptr, []).append((path, x.dtype))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(obj, "")
    return [", ".join(f"{p}={str(d).removeprefix('torch.')}" for p, d in group)
            for group in by_ptr.values() if len({d for _, d in group}) > 1]


def _rng_state(aug_gen: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "augment": aug_gen.get_state()}


def _set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    aug_gen.set_state(state["augment"])


def _sharded(cfg: Config, env: Env) -> bool:
    return cfg.fsdp and env.world > 1


def _full_state(method, optimizer, cfg: Config, env: Env) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state: FSDP2 shards are gathered (every rank must
    call this), so the model state loads on any number of ranks, with or without FSDP; the
    optimizer state (keyed by parameter name under FSDP) resumes under FSDP."""
    if not _sharded(cfg, env):
        return method.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(method, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: Path, **state) -> None:
    """One student's checkpoint (`checkpoint_state`), written atomically by the main rank."""
    ckpt = checkpoint_state(**state)
    if ckpt is not None:
        atomic_save(ckpt, path)


def checkpoint_state(*, cfg: Config, env: Env, method, optimizer, scaler, step: int, epoch: int,
                     batch_in_epoch: int, teacher_info, aug_gen, mean_std) -> dict | None:
    """Student, head, queue + pointer, optimizer, step, data position, every rank's RNG. Every
    rank calls it (it gathers); the main rank gets the dict, the others None."""
    rngs = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(rngs, _rng_state(aug_gen))
    else:
        rngs = [_rng_state(aug_gen)]
    state, optim_state = _full_state(method, optimizer, cfg, env)  # collective under FSDP
    if not env.main:
        return None
    return {
        "fastseed": {"version": CHECKPOINT_VERSION, "step": step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "teacher": teacher_info,
                     "mean": mean_std[0], "std": mean_std[1], "arch": cfg.arch, "method": cfg.method,
                     "augment": cfg.aug},
        "config": cfg.to_dict() | {"mean": list(mean_std[0]), "std": list(mean_std[1])},
        "student": {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")},
        "head": {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")},
        "buffers": {k: v for k, v in state.items() if not k.startswith(("student.", "head."))},
        "optimizer": optim_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs,
    }


COMMIT_JOURNAL = "checkpoint_commit.pt"


def save_checkpoints(run: "Run", step: int, epoch: int, batch_in_epoch: int) -> None:
    """Every live student's checkpoint (its solo run's file), committed together."""
    temps = []
    try:
        for s in run.students.live:
            ckpt = checkpoint_state(cfg=s.cfg, env=run.env, method=s.method, optimizer=s.optimizer,
                                    scaler=s.scaler, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                                    teacher_info=run.teacher_info, aug_gen=run.aug_gen, mean_std=run.mean_std)
            if ckpt is not None:
                temps.append((_write_temp(ckpt, s.checkpoint_path), s.checkpoint_path))
        if run.env.main:
            commit_all(temps, run.cfg.out_dir / COMMIT_JOURNAL)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """A fastseed checkpoint, unpickled without running code from it unless ``trust``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        ckpt = read_checkpoint_file(path, trust)
    except CheckpointReadError as e:  # to callers, any checkpoint that cannot be resumed is a TrainingError
        raise TrainingError(str(e)) from None
    if not isinstance(ckpt, dict) or "fastseed" not in ckpt or "student" not in ckpt:
        raise TrainingError(f"{path} is not a fastseed checkpoint (no 'fastseed' entry)")
    return ckpt


def restore(ckpt: dict, cfg: Config, method, optimizer, scaler, teacher_info, aug_gen, env: Env) -> dict:
    meta = ckpt["fastseed"]
    if meta["arch"] != cfg.arch or meta["method"] != cfg.method:
        raise TrainingError(f"checkpoint is {meta['method']} of {meta['arch']}, this run is "
                            f"{cfg.method} of {cfg.arch}: pass the same --arch/--method or another --output")
    want, have = (meta.get("teacher") or {}).get("sha256"), (teacher_info or {}).get("sha256")
    if want != have:
        raise TrainingError(f"checkpoint was distilled from teacher sha256 {str(want)[:12]}, this run "
                            f"loads {str(have)[:12]}: pass the same --distill / -k")
    # the crops of an epoch are a function of the cache (and seed, epoch, index): the same cache, or none
    want, have = ((info or {}).get("cache") for info in (meta.get("teacher"), teacher_info))
    if (want or {}).get("sha256") != (have or {}).get("sha256"):
        raise TrainingError(f"checkpoint was trained {_keys_from(want)}, this run {_keys_from(have)}: pass the "
                            "same --teacher-cache (or none), or another --output")
    state = {f"student.{k}": v for k, v in ckpt["student"].items()}
    state |= {f"head.{k}": v for k, v in ckpt["head"].items()} | ckpt["buffers"]
    if _sharded(cfg, env):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(method, optimizer, model_state_dict=state, optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        method.load_state_dict(state, strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if len(rngs) == env.world:
        _set_rng_state(rngs[env.rank], aug_gen)
    elif env.main:
        print(f"resume: checkpoint has {len(rngs)} ranks' RNG, this run {env.world}: "
              "augmentation randomness restarts", file=sys.stderr)
    return meta


def _keys_from(cache: dict | None) -> str:
    return f"from teacher cache {cache['path']} ({cache['sha256'][:12]})" if cache else "with the live teacher"


def find_resume(cfg: Config) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        p = cfg.out_dir / "checkpoint_last.pt"
        return p if p.is_file() else None
    return Path(cfg.resume)


def resume(run: "Run") -> int:
    """Restore every student from its checkpoint and return their step (0: nothing to resume).
    A student whose checkpoint is behind the others' stopped in an earlier run: it stays stopped."""
    if run.env.main:
        finish_commit(run.cfg.out_dir / COMMIT_JOURNAL)
    if run.env.world > 1:
        dist.barrier()
    paths = {s: find_resume(s.cfg) for s in run.students}
    if not any(paths.values()):
        return 0
    missing = [s.name for s, p in paths.items() if p is None]
    if missing:
        raise TrainingError(f"no checkpoint of {', '.join(missing)} under {run.cfg.out_dir}, but of the other "
                            "students: resume with that run's -a list, or start these in another --output")
    ckpts = {s: read_checkpoint(p, run.cfg.trust_checkpoint) for s, p in paths.items()}
    step = max(c["fastseed"]["step"] for c in ckpts.values())
    for s, ckpt in ckpts.items():
        meta = ckpt["fastseed"]
        if meta["step"] < step:
            run.students.stale(s, meta["step"], step)
            continue
        restore(ckpt, s.cfg, s.method, s.optimizer, s.scaler, run.teacher_info, run.aug_gen, run.env)
        if run.env.main:
            print(f"resumed from {paths[s]} at step {step} (epoch {meta['epoch']}, "
                  f"batch {meta['batch_in_epoch']})", file=sys.stderr)
    return step


# ---------------------------------------------------------------- logging
class Logger:
    """metrics.jsonl (one JSON object a line), TensorBoard scalars when installed."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


# ---------------------------------------------------------------- evaluation
def knn_loaders(cfg: Config, env: Env, *, bank_path: str, val_path: str, res: int, batch_size: int = 512):
    """The k-NN bank and val loaders, built once per run (each FFCV loader JIT-compiles)."""
    return [eval_loader(p, batch_size=batch_size, res=res, device=env.device, num_workers=cfg.workers)
            for p in (bank_path, val_path)]


def knn_eval(encoder, cfg: Config, env: Env, mean_std, loaders) -> dict:
    """k-NN top-1 of `encoder` (None: raw pixels) with the train bank and the val split."""
    if encoder is None:
        encoder, norm, dtype = nn.Flatten(), None, torch.float32  # pixels in [0, 1]
    else:
        norm, dtype = Normalize(mean_std[0], mean_std[1]).to(env.device), amp_dtype(cfg, env.device) or torch.float32
    (ftr, ytr), (fte, yte) = (extract_features(encoder, loader, device=env.device, transform=norm, dtype=dtype)
                              for loader in loaders)
    return knn_classify(ftr, ytr, fte, yte, ks=sorted({1, cfg.knn_k}), temperature=cfg.knn_t)


class _Resized(nn.Module):
    def __init__(self, model, res):
        super().__init__()
        self.model, self.res = model, res

    def forward(self, x):
        from fastseed.methods._common import resize
        return self.model(resize(x, self.res))


# ---------------------------------------------------------------- the loop
@dataclass
class Run:
    """Everything a step needs, built once by `prepare`."""
    cfg: Config
    env: Env
    students: Students
    targets: object            # the target source: targets(views, batch) -> keys (fastseed.targets)
    queues: nn.Module | None   # the keys every student compares against; None for SimReg
    teacher_info: dict | None
    mean_std: tuple
    loader: object
    augment: nn.Module
    aug_gen: torch.Generator
    dtype: torch.dtype | None
    warmup: int
    total: int
    steps_per_epoch: int

    def autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def schedule(self, step: int, lr: float) -> float:
        """The learning rate of `step` for a student of peak `lr`: fastseed's per-step schedule, or
        the official per-epoch one warming up from the lr of batch 256 (SEED's lr) to `lr` (its
        lr x batch/256)."""
        if self.cfg.lr_schedule == "epoch":
            return epoch_lr(step // self.steps_per_epoch, self.cfg.epochs, self.cfg.warmup_epochs, lr,
                            lr * 256 / self.cfg.batch_size)
        if self.cfg.lr_schedule == "step":
            return lr_at(step, self.total, self.warmup, lr)
        raise ConfigError(f"unknown lr_schedule {self.cfg.lr_schedule!r}: step or epoch")


def wrap_model(method: nn.Module, cfg: Config, env: Env) -> nn.Module:
    """What the step calls: DDP (or FSDP2-sharded) and compiled as configured."""
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
        fully_shard(method.head)
    if use_compile(cfg, env):
        model = torch.compile(model, mode=cfg.compile_mode)
    return model


def build_loader(cfg: Config, env: Env, source):
    """The FFCV loader of `cfg.data`: with a teacher cache, each image's stored crop of the
    epoch and its keys (`(views, labels, keys)`); else fresh random crops (`(views, labels)`)."""
    common = dict(batch_size=cfg.batch_size // env.world, res=cfg.res, device=env.device, num_workers=cfg.workers,
                  seed=cfg.seed, distributed=env.world > 1)
    if isinstance(source, CachedTargets):
        return replay_loader(cfg.data, source.cache, **common)
    return ssl_loader(cfg.data, scale=cfg.crop_scale, num_global=2 if cfg.method == "moco" else 1,
                      num_small=cfg.small_crops, small_res=cfg.small_res, small_scale=cfg.small_scale, **common)


def prepare(cfg: Config, loader=None) -> Run:
    """Build everything a run needs. `loader` replaces the FFCV loader of `cfg.data` (tests,
    synthetic-data benchmarks): any sized iterable of `(views, labels)` (with a teacher cache,
    `(views, labels, keys)`) with `resume(epoch, batch)`."""
    env = setup_env(cfg)
    configs = student_configs(cfg)  # validates -a / --lr before anything is written
    if env.main:
        for c in (cfg, *configs):
            c.out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + env.rank)
    dtype = amp_dtype(cfg, env.device)
    source = build_targets(cfg, env.device, dtype=dtype, compile_fn=compiler(cfg, env))
    dim = source.dim if source is not None else cfg.dim or 128
    if cfg.dim is not None and cfg.method != "moco" and cfg.dim != dim:
        raise ConfigError(f"--dim {cfg.dim} does not match the teacher's embedding dim {dim}")
    mean_std = source.mean_std if source is not None else (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    # the preset and its crop scale (an explicit one wins), resolved here so checkpoints record them
    cfg = resolve_preset(cfg, source and source.info["format"])
    configs = student_configs(cfg)
    queue_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    queues = METHODS[cfg.method].make_queues(dim=dim, queue_size=cfg.queue_size, queue_dtype=queue_dtype,
                                             small_crops=cfg.small_crops, small_enqueue=cfg.small_enqueue)
    if loader is None:
        loader = build_loader(cfg, env, source)
    augment = preset_augment(cfg.aug, mean_std[0], mean_std[1]).to(env.device)
    aug_gen = torch.Generator(env.device).manual_seed(cfg.seed * 1000 + env.rank)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data} holds fewer images than one batch of {cfg.batch_size // env.world} "
                          "per rank: lower --batch-size")
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    students = Students([build_student(c, env, dim, queues, dtype) for c in configs])
    targets = source if source is not None else students.members[0].method  # MoCo: its own key encoder
    return Run(cfg, env, students, targets, queues, source.info if source is not None else None, mean_std,
               loader, augment, aug_gen, dtype, int(cfg.warmup_epochs * steps_per_epoch), total, steps_per_epoch)


def train_step(run: Run, views: list[torch.Tensor], step: int, batch=None,
               phases: Phases = NO_PHASES) -> list[torch.Tensor]:
    """One optimisation step of every live student on one augmentation of `views` and one ask
    of the target source; returns their losses on the device (no host sync). `batch` is what
    the loader yielded beside the views (a list: labels, and a cache's keys); `phases` marks the step's
    phases (`fastseed.profile`)."""
    for s in run.students.live:
        for g in s.optimizer.param_groups:
            g["lr"] = run.schedule(step, s.lr)
    phases.phase("augment")
    views = [run.augment(v, generator=run.aug_gen) for v in views]
    phases.phase("teacher")
    with run.autocast():
        targets = run.targets.targets(views, batch)
    losses = run.students.step(views, targets, step, run.autocast, phases)
    phases.phase("enqueue")
    if run.queues is not None:
        run.queues.update(targets)  # after every backward: the losses' backward re-reads the queue
    return losses


def oom_advice(run: Run, views: list[torch.Tensor], batch) -> str:
    """The first step ran out of memory: for each student, beside the others, find the largest
    per-rank batch that fits by halving, on copies of this batch's views, and say what to pass."""
    per_rank = views[0].shape[0]
    fits = {}
    for s in run.students.live:
        b = per_rank // 2
        while b >= 1:
            for other in run.students:
                other.optimizer.zero_grad(set_to_none=True)
            if run.env.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                with run.students.only(s):
                    train_step(run, [v[:b].clone() for v in views], 0,
                               None if batch is None else [x[:b].clone() for x in batch])
                break
            except torch.OutOfMemoryError:
                b //= 2
        fits[s.name] = b * run.env.world
    asked = per_rank * run.env.world
    lr_hint = "" if run.cfg.lr is None else " (and scale --lr with it)"
    if len(fits) == 1:
        (fit,) = fits.values()
        if fit < 1:
            return "out of memory at the first step even with 1 image per rank: use a smaller --arch or --res"
        return (f"out of memory at the first step with --batch-size {asked}; the largest batch "
                f"that fits is {fit}: rerun with --batch-size {fit}{lr_hint}")
    none = [n for n, f in fits.items() if f < 1]
    advice = (f"leave out {', '.join(none)} (not even 1 image per rank fits) or use a smaller --res" if none
              else f"rerun with --batch-size {min(fits.values())}{lr_hint}")
    return (f"out of memory at the first step with --batch-size {asked}; the largest batch each student fits "
            f"beside the others: {', '.join(f'{n} {f}' for n, f in fits.items())}: {advice}")


def train(cfg: Config, loader=None) -> dict:
    """Run `cfg` to its end (`loader`: as `prepare`). Returns {"step", "results" (k-NN), "failed"
    (one line per student stopped on NaN/inf while others went on)}; raises TrainingError when
    no student is left."""
    run = prepare(cfg, loader)
    cfg = run.cfg  # with the augmentation preset resolved
    env, students, out = run.env, run.students, cfg.out_dir
    step = resume(run)
    logger = Logger(out, env.main)
    results: dict = {}
    eval_res = cfg.eval_res or cfg.res

    loaders = []

    def knn(encoder):
        if not loaders:
            loaders.extend(knn_loaders(cfg, env, bank_path=cfg.knn_bank or cfg.data, val_path=cfg.val_data,
                                       res=eval_res))
        return knn_eval(encoder, cfg, env, run.mean_std, loaders)

    if cfg.final_table and cfg.val_data and env.main and step == 0:
        results |= {s.key("student_init"): knn(s.method.encoder) for s in students}
    students.train()

    def guard(weights: bool = False) -> None:
        students.stop_non_finite(step, weights)
        if not students.live:
            raise TrainingError(" | ".join(students.failures()))

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        guard(weights=True)  # never write NaN weights over a good checkpoint
        save_checkpoints(run, step, epoch, batch_in_epoch)

    spe = run.steps_per_epoch
    start_step = step
    start_epoch, skip = divmod(step, spe)
    t_log, n_img, n_log = time.perf_counter(), 0, 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if step >= run.total:
                break
            run.loader.resume(epoch, skip)
            bar = _progress(cfg, env, spe, epoch, skip)
            for i, (views, *batch) in enumerate(run.loader, start=skip):
                try:
                    train_step(run, views, step, batch)
                except torch.OutOfMemoryError:
                    if n_log or step > start_step:
                        raise
                    raise TrainingError(oom_advice(run, views, batch)) from None
                step += 1
                n_log += 1
                n_img += views[0].shape[0] * env.world
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == run.total:
                    guard()
                    rec = {"step": step, "epoch": epoch, **students.log_fields(n_log),
                           "img_per_s": n_img / (time.perf_counter() - t_log)}
                    logger.log(rec)
                    if bar is not None:
                        bar.set_postfix(students.postfix(rec))
                    t_log, n_img, n_log = time.perf_counter(), 0, 0
                if step % cfg.ckpt_every == 0:
                    checkpoint(epoch, i + 1)
                if step >= run.total:
                    break
            if bar is not None:
                bar.close()
            skip = 0
            if step % spe == 0:
                checkpoint(epoch + 1, 0)
                if (cfg.val_data and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and env.main
                        and step < run.total):
                    logger.log({"step": step, "epoch": epoch + 1, **{s.key(k): v for s in students.live
                                                                     for k, v in knn(s.method.encoder).items()}})
                    students.train()
        if step % spe:  # stopped mid-epoch (max_steps): epoch ends were saved above
            checkpoint(step // spe, step % spe)
        guard()

        if cfg.val_data and env.main:
            results |= {s.key("student"): knn(s.method.encoder) for s in students.live}
            if cfg.final_table:
                results["raw_pixels"] = knn(None)
                t = getattr(run.targets, "teacher", None)
                if t is not None:
                    results["teacher"] = knn(_Resized(t.model, t.res))
            logger.log({"step": step, "final": True, **{f"{k}/{m}": v for k, r in results.items()
                                                        for m, v in r.items()}})
    finally:
        logger.close()
    return {"step": step, "results": results, "failed": students.failures()}


def _progress(cfg: Config, env: Env, total: int, epoch: int, initial: int):
    if not (cfg.progress and env.main):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                dynamic_ncols=True, file=sys.stderr)
