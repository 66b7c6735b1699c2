"""Checkpoints: reading files safely, writing them atomically, and a run's save and resume.

Reading (`read_file`): torch's weights_only unpickler, so a file runs no code unless the user
passes --trust-checkpoint. Writing (`atomic_save`): a temp file beside the target, fsynced,
renamed; several files of one step (a family of students) are committed together through a
journal (`commit_all`, `finish_commit`), so a kill never leaves files of two different steps.

A checkpoint (`checkpoint_state`) holds one student: backbone, head, the queue buffers, the
optimizer, step and data position, every rank's RNG state, the teacher's identity and the
config. `resume(run)` restores every student of a run and returns the step to go on from.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastseed.config import Config
from fastseed.errors import CheckpointReadError, TrainingError
from fastseed.runtime import Env, restart_count, sharded

CHECKPOINT_VERSION = 1
COMMIT_JOURNAL = "checkpoint_commit.pt"
STOP_MARKER = "stopped.txt"  # why the run stopped for good (NaN/inf): no automatic restart goes on


# ---------------------------------------------------------------- reading and writing files
def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# Besides tensors and plain Python data, checkpoints hold only these, plain data themselves:
# DINO keeps its argparse.Namespace under 'args'; fastseed keeps numpy's RNG state (a uint32 array).
_SAFE_GLOBALS = [argparse.Namespace, np.ndarray, np.dtype, np.zeros(0).__reduce__()[0], type(np.dtype(np.uint32))]


def read_file(path: Path, trust: bool = False) -> object:
    """torch.load of a checkpoint that runs no code from it, unless ``trust`` (--trust-checkpoint).

    Unpickling an arbitrary object means calling whatever function the file names, so by default
    torch's weights_only unpickler reads tensors, plain data and ``_SAFE_GLOBALS`` only; a file
    naming anything else is refused, and nothing from it has run.
    """
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module is blocked"
        found = re.search(r"unsupported global:? GLOBAL (\S+)", str(e), re.IGNORECASE)
        if found is None:
            raise CheckpointReadError(f"cannot read {path}: the file is truncated or corrupt (unreadable "
                                      "pickle): use another copy") from None
        raise CheckpointReadError(
            f"{path} refers to '{found[1]}', which only full unpickling can load, and that runs code "
            "from the file: not loaded; if you trust the file, pass --trust-checkpoint") from None
    except Exception as e:  # truncated zip, EOF, not a torch file at all
        raise CheckpointReadError(f"cannot read {path}: {type(e).__name__}: {e}; the file is truncated or "
                                  "corrupt: use another copy") from None


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



# ---------------------------------------------------------------- a run's checkpoints
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


def _full_state(method, optimizer, cfg: Config, env: Env) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state: FSDP2 shards are gathered (every rank must
    call this), so the model state loads on any number of ranks, with or without FSDP; the
    optimizer state (keyed by parameter name under FSDP) resumes under FSDP."""
    if not sharded(cfg, env):
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


def save_checkpoints(run, step: int, epoch: int, batch_in_epoch: int) -> None:
    """Every live student's checkpoint (its solo run's file), committed together. `run` is a
    fastseed.train.Run: its students, env, cfg, teacher_info, aug_gen and mean_std are read."""
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
        ckpt = read_file(path, trust)
    except CheckpointReadError as e:  # to a run, any checkpoint that cannot be resumed is a TrainingError
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
    if sharded(cfg, env):
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


def mark_stopped(out_dir: Path, message: str) -> None:
    """Leave `message` (why the run cannot go on) where a restarted worker group finds it."""
    tmp = Path(out_dir) / f".{STOP_MARKER}.tmp{os.getpid()}"
    tmp.write_text(message + "\n")
    os.replace(tmp, Path(out_dir) / STOP_MARKER)


def check_not_stopped(out_dir: Path) -> None:
    """A worker group torchrun restarted after a NaN/inf stop refuses at once with that stop's
    message (restarting would reach the same NaN); a run started by hand clears the marker."""
    marker = Path(out_dir) / STOP_MARKER
    if not marker.is_file():
        return
    if restart_count() > 0:
        raise TrainingError(marker.read_text().strip())
    marker.unlink(missing_ok=True)


def resume(run) -> int:
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


