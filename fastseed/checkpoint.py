"""Checkpoints: reading files safely, writing them atomically, and a run's save and resume.

Reading (`read_file`): torch's weights_only unpickler, so a file runs no code unless the user
passes --trust-checkpoint. Writing (`atomic_save`): a temp file beside the target, fsynced,
renamed; several files of one step (a family of students) are committed together through a
journal (`commit_all`, `finish_commit`), so a kill never leaves files of two different steps.

A checkpoint (`checkpoint_state`) holds one student: backbone, head, the queue buffers, the
optimizer, step and data position, every rank's RNG state, the teacher's identity and the
config. `resume(run)` restores every student of a run and returns the step to go on from.

Two layouts. One file, `checkpoint_last.pt`, written by the main rank (one process, DDP). Under
FSDP2 (`runtime.sharded`) a folder, `checkpoint_last.dcp/`, written with
torch.distributed.checkpoint: every rank writes its own shards of the model and optimizer
(`__<rank>_0.distcp`; nothing is gathered to any rank), rank 0 writes DCP's index (`.metadata`)
and the run's other state (`fastseed.pt`: the same entries as the file, less the tensors).
Either layout resumes at any world size, with or without FSDP (DCP reshards on load).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastseed.config import Config
from fastseed.errors import CheckpointReadError, TrainingError
from fastseed.runtime import Env, restart_count, seed_everything, sharded

CHECKPOINT_VERSION = 1
COMMIT_JOURNAL = "checkpoint_commit.pt"
DCP_SUFFIX = ".dcp"       # checkpoint_last.pt's sharded twin is the folder checkpoint_last.dcp
RUN_STATE = "fastseed.pt"  # in a DCP folder: everything of the checkpoint but the model's and optimizer's tensors
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
    """Rename written temps (temp, target) into place as one step. With several, or a folder
    (which takes two renames: the old one aside, the new one in), a journal naming them is saved
    first (atomically): a kill between two renames leaves it, and `finish_commit` completes the
    renames at the next start, so the targets never mix steps."""
    if len(temps) > 1 or any(Path(t).is_dir() for t, _ in temps):
        atomic_save([[str(t), str(p)] for t, p in temps], journal)
    for tmp, path in temps:
        _replace(Path(tmp), Path(path))
    journal.unlink(missing_ok=True)


def finish_commit(journal: Path) -> None:
    """Complete the renames of a commit a kill interrupted (every temp it names was whole)."""
    if not journal.is_file():
        return
    for tmp, path in torch.load(journal, weights_only=True):
        if Path(tmp).exists():
            _replace(Path(tmp), Path(path))
        _remove(_aside(Path(path)))
    journal.unlink()


def _replace(tmp: Path, path: Path) -> None:
    """os.replace, also of a folder over a folder: the old one is renamed aside first (rename
    cannot replace a non-empty folder) and removed once the new one is in place."""
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)
        return
    old = _aside(path)
    _remove(old)
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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


def save_checkpoint(path: Path, **state) -> None:
    """One student's checkpoint (`checkpoint_state`), written atomically by the main rank."""
    ckpt = checkpoint_state(**state)
    if ckpt is not None:
        atomic_save(ckpt, path)


def _run_state(*, cfg: Config, env: Env, scaler, step: int, epoch: int, batch_in_epoch: int, teacher_info,
               aug_gen, mean_std) -> dict | None:
    """Everything of a checkpoint but the model's and optimizer's tensors. Every rank calls it
    (it gathers every rank's RNG state); the main rank gets the dict, the others None."""
    rngs = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(rngs, _rng_state(aug_gen))
    else:
        rngs = [_rng_state(aug_gen)]
    if not env.main:
        return None
    return {
        "fastseed": {"version": CHECKPOINT_VERSION, "step": step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "teacher": teacher_info,
                     "mean": mean_std[0], "std": mean_std[1], "arch": cfg.arch, "method": cfg.method,
                     "augment": cfg.aug},
        "config": cfg.to_dict() | {"mean": list(mean_std[0]), "std": list(mean_std[1])},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs,
    }


def _with_tensors(run_state: dict, state: dict, optim_state: dict) -> dict:
    """The one-file checkpoint: `run_state` with the model's state split into student, head and
    buffers, and the optimizer's, in the file's order of entries."""
    return {
        "fastseed": run_state["fastseed"], "config": run_state["config"],
        "student": {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")},
        "head": {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")},
        "buffers": {k: v for k, v in state.items() if not k.startswith(("student.", "head."))},
        "optimizer": optim_state, "scaler": run_state["scaler"], "rng": run_state["rng"],
    }


def checkpoint_state(*, cfg: Config, env: Env, method, optimizer, **run) -> dict | None:
    """Student, head, queue + pointer, optimizer, step, data position, every rank's RNG (`run`:
    `_run_state`'s arguments). Every rank calls it (it gathers); the main rank gets the dict."""
    if sharded(cfg, env):  # a sharded state is written by every rank: `save_checkpoints`
        raise TrainingError("an FSDP2-sharded student's checkpoint is a DCP folder: save it with save_checkpoints")
    run_state = _run_state(cfg=cfg, env=env, **run)
    if run_state is None:
        return None
    return _with_tensors(run_state, method.state_dict(), optimizer.state_dict())


def dcp_folder(path: Path) -> Path:
    """The sharded (DCP) checkpoint folder of a checkpoint file's path."""
    return Path(path).with_suffix(DCP_SUFFIX)


def _write_dcp_temp(path: Path, *, cfg: Config, env: Env, method, optimizer, **run) -> Path:
    """A sharded checkpoint in a temp folder beside `dcp_folder(path)`, for the main rank to
    rename into place; every rank calls it. Each rank writes only its own shards: the state
    dict holds the FSDP2 DTensor shards (full_state_dict=False), nothing is gathered."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    folder = dcp_folder(path)
    tmp = folder.with_name(f".{folder.name}.tmp")  # one name every rank agrees on
    run_state = _run_state(cfg=cfg, env=env, **run)  # collective
    if env.main:
        _remove(tmp)  # what a save killed half-way left
        tmp.mkdir()
    if env.world > 1:
        dist.barrier()
    model_state, optim_state = get_state_dict(method, optimizer, options=StateDictOptions(full_state_dict=False))
    # collective: returns once every rank's shards are written (and fsynced) and rank 0 has
    # written the index of them all
    dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=FileSystemWriter(tmp),
             no_dist=env.world == 1)
    if env.main:
        atomic_save(run_state, tmp / RUN_STATE)  # last: a folder with it is whole
    return tmp


def save_checkpoints(run, step: int, epoch: int, batch_in_epoch: int) -> None:
    """Every live student's checkpoint (its solo run's file, or folder under FSDP2), committed
    together. `run` is a fastseed.train.Run: its students, env, cfg, teacher_info, aug_gen and
    mean_std are read.

    Atomic under FSDP2 too: every rank writes into `.checkpoint_last.dcp.tmp`, which no resume
    reads; after `dcp.save` returned on every rank (it ends in a collective) and rank 0 wrote
    fastseed.pt last, rank 0 renames the folder into place through the commit journal
    (`commit_all`: the old folder aside, the new one in, the old one deleted; a kill between
    the renames is completed by `finish_commit` at the next start). A kill before that leaves
    the previous checkpoint as it was. A barrier keeps every rank until the rename is done."""
    temps, env = [], run.env
    try:
        for s in run.students.live:
            state = dict(cfg=s.cfg, env=env, method=s.method, optimizer=s.optimizer, scaler=s.scaler, step=step,
                         epoch=epoch, batch_in_epoch=batch_in_epoch, teacher_info=run.teacher_info,
                         aug_gen=run.aug_gen, mean_std=run.mean_std)
            if sharded(s.cfg, env):
                tmp = _write_dcp_temp(s.checkpoint_path, **state)
                if env.main:
                    temps.append((tmp, dcp_folder(s.checkpoint_path)))
                continue
            ckpt = checkpoint_state(**state)
            if ckpt is not None:
                temps.append((_write_temp(ckpt, s.checkpoint_path), s.checkpoint_path))
        if env.main:
            commit_all(temps, run.cfg.out_dir / COMMIT_JOURNAL)
        if env.world > 1 and any(sharded(s.cfg, env) for s in run.students.live):
            dist.barrier()
    except BaseException:
        for tmp, _ in temps:
            _remove(tmp)
        raise


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """A fastseed checkpoint, unpickled without running code from it unless ``trust``. A DCP
    folder (an FSDP2 run's) is read whole into this one process, as the one file holds it."""
    path = Path(path)
    if path.is_dir():
        ckpt = _read_run_state(path, trust)
        state = _load_dcp(path, None, None)
        return _with_tensors(ckpt, state["model"], state["optimizer"])
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        ckpt = read_file(path, trust)
    except CheckpointReadError as e:  # to a run, any checkpoint that cannot be resumed is a TrainingError
        raise TrainingError(str(e)) from None
    if not isinstance(ckpt, dict) or "fastseed" not in ckpt or "student" not in ckpt:
        raise TrainingError(f"{path} is not a fastseed checkpoint (no 'fastseed' entry)")
    return ckpt


def _read_run_state(folder: Path, trust: bool) -> dict:
    """A DCP folder's fastseed.pt (all but the tensors), with the folder under 'dcp'."""
    path = folder / RUN_STATE
    if not path.is_file():
        raise TrainingError(f"{folder} is not a fastseed checkpoint folder (no {RUN_STATE}: a save that "
                            "was killed, or another program's folder)")
    try:
        ckpt = read_file(path, trust)
    except CheckpointReadError as e:
        raise TrainingError(str(e)) from None
    if not isinstance(ckpt, dict) or "fastseed" not in ckpt:
        raise TrainingError(f"{path} is not a fastseed checkpoint (no 'fastseed' entry)")
    return ckpt | {"dcp": folder}


# DCP's index (.metadata) is a pickle that torch.distributed.checkpoint reads with pickle.load:
# a folder from elsewhere could run code. `_IndexUnpickler` allows only DCP's own metadata
# classes, torch's sizes, dtypes and layouts, and a path (the folder it was saved to), as
# read_file allows only tensors and plain data.
_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                  ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module.startswith("torch.distributed.checkpoint.") or (module, name) in _INDEX_GLOBALS
                or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which only full unpickling loads, and that "
                                     "runs code from the file: not loaded")


def _index_reader(folder: Path):
    """A FileSystemReader of `folder` whose index is read here, by `_IndexUnpickler` (a refusal
    is one TrainingError line, before DCP starts)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    try:
        with open(folder / ".metadata", "rb") as f:
            index = _IndexUnpickler(f).load()
    except (pickle.UnpicklingError, OSError, EOFError) as e:
        raise TrainingError(f"cannot read the index of {folder}: {e}") from None

    class IndexReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return IndexReader(folder)


def _load_dcp(folder: Path, method, optimizer) -> dict:
    """The tensors of a DCP folder: into `method`'s and `optimizer`'s own (sharded or plain)
    state dicts, so each rank reads only the parts it holds (DCP reshards from any world size);
    with no method, everything into this one process (what `dcp_to_torch_save` reads)."""
    import torch.distributed.checkpoint as dcp
    if method is None:  # what torch's dcp_to_torch_save reads, through the restricted index reader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
        state: dict = {}
        _load_state_dict(state, storage_reader=_index_reader(folder), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        return state
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(method, optimizer)  # the templates DCP fills in place
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=_index_reader(folder))
    return state


def restore(ckpt: dict, cfg: Config, method, optimizer, scaler, teacher_info, aug_gen, env: Env) -> dict:
    meta = ckpt["fastseed"]
    if meta["arch"] != cfg.arch or meta["method"] != cfg.method:
        raise TrainingError(f"checkpoint is {meta['method']} of {meta['arch']}, this run is "
                            f"{cfg.method} of {cfg.arch}: pass the same --arch/--method or another --output")
    want, have = (meta.get("teacher") or {}), (teacher_info or {})
    if want.get("sha256") != have.get("sha256"):
        raise TrainingError(f"checkpoint was distilled from teacher {want.get('arch')} (sha256 "
                            f"{str(want.get('sha256'))[:12]}), this run loads {have.get('arch')} (sha256 "
                            f"{str(have.get('sha256'))[:12]}): pass the same --distill / -k, in the same order")
    # the crops of an epoch are a function of the cache (and seed, epoch, index): the same cache, or none
    want, have = ((info or {}).get("cache") for info in (meta.get("teacher"), teacher_info))
    if (want or {}).get("sha256") != (have or {}).get("sha256"):
        raise TrainingError(f"checkpoint was trained {_keys_from(want)}, this run {_keys_from(have)}: pass the "
                            "same --teacher-cache (or none), or another --output")
    # how this run steps (fused or foreach kernels: build_optimizer's choice for its device and
    # sharding) is not training state: a loaded param group would bring the saving run's
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    if "dcp" in ckpt:  # a sharded checkpoint, into this run's sharded or plain state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        state = _load_dcp(ckpt["dcp"], method, optimizer)
        set_state_dict(method, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=True))
    else:
        state = {f"student.{k}": v for k, v in ckpt["student"].items()}
        state |= {f"head.{k}": v for k, v in ckpt["head"].items()} | ckpt["buffers"]
        if sharded(cfg, env) or _by_name(ckpt["optimizer"]):  # every rank keeps its shards; or a converted folder
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(method, optimizer, model_state_dict=state,
                           optim_state_dict=_optim_by_name(ckpt["optimizer"], method, optimizer),
                           options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            method.load_state_dict(state, strict=True)
            groups = len(ckpt["optimizer"].get("param_groups", []))
            if groups != len(optimizer.param_groups):  # torch's own error names neither the file nor a way out
                raise CheckpointReadError(
                    f"the checkpoint's optimizer has {groups} parameter group(s), this run's --optimizer "
                    f"{cfg.optimizer} has {len(optimizer.param_groups)} (LARS keeps biases and norms in a group of "
                    "their own): resume with the optimizer it was written with, or start in a new --output")
            optimizer.load_state_dict(ckpt["optimizer"])
    for group, kernels in zip(optimizer.param_groups, impl):
        group.update(kernels)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    _restore_rng(ckpt["rng"], cfg, meta["step"], aug_gen, env)
    return meta


def _optim_by_name(optim_state: dict, method, optimizer) -> dict:
    """A plain optimizer state dict (parameters numbered in the order of its param groups, as
    a one-process or DDP run saves it) keyed by parameter name, as set_state_dict reads it."""
    if _by_name(optim_state):
        return optim_state
    names = {id(p): n for n, p in method.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    number = {i: order[k] for k, i in enumerate(i for g in optim_state["param_groups"] for i in g["params"])}
    return {"state": {number[i]: v for i, v in optim_state["state"].items()},
            "param_groups": [g | {"params": [number[i] for i in g["params"]]} for g in optim_state["param_groups"]]}


def _by_name(optim_state: dict) -> bool:
    """Whether an optimizer state dict names its parameters (a DCP folder's, read whole)."""
    return all(isinstance(p, str) for g in optim_state["param_groups"] for p in g["params"])


def _restore_rng(rngs: list, cfg: Config, step: int, aug_gen, env: Env) -> None:
    """Rank r takes rank r's saved RNG state. A rank the saving run did not have (the world
    grew) seeds every generator from numpy's SeedSequence of (seed, rank, step): its draws are
    its own, and neither another rank's nor its own from step 0 again."""
    if env.rank < len(rngs):
        _set_rng_state(rngs[env.rank], aug_gen)
    else:
        seed = int(np.random.SeedSequence([cfg.seed, env.rank, step]).generate_state(1)[0])
        seed_everything(seed)
        aug_gen.manual_seed(seed)
    if env.main and len(rngs) != env.world:
        kept = min(len(rngs), env.world)
        print(f"resume: checkpoint of {len(rngs)} rank(s), this run has {env.world}: ranks 0-{kept - 1} go on with "
              f"their saved RNG states{'' if kept == env.world else ', the others seed new ones'}", file=sys.stderr)


def _keys_from(cache: dict | None) -> str:
    return f"from teacher cache {cache['path']} ({cache['sha256'][:12]})" if cache else "with the live teacher"


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint file or DCP folder a run resumes from. With 'auto', OUTPUT's
    checkpoint_last.pt or checkpoint_last.dcp; both there (the run changed between FSDP2 and
    not), the one of the later step. A named file whose DCP folder exists instead: the folder."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        return dcp_folder(path) if not path.exists() and dcp_folder(path).is_dir() else path
    file, folder = cfg.out_dir / "checkpoint_last.pt", dcp_folder(cfg.out_dir / "checkpoint_last.pt")
    found = [p for p in (file, folder) if p.is_file() or (p / RUN_STATE).is_file()]
    if len(found) == 2:
        steps = [read_checkpoint(file, cfg.trust_checkpoint)["fastseed"]["step"],
                 _read_run_state(folder, cfg.trust_checkpoint)["fastseed"]["step"]]
        return found[steps[1] > steps[0]]
    return found[0] if found else None


def _read_for_resume(path: Path, trust: bool) -> dict:
    """A checkpoint to restore: a file whole; of a DCP folder only fastseed.pt, since each rank
    reads its own shards of the tensors in `restore`."""
    return _read_run_state(path, trust) if path.is_dir() else read_checkpoint(path, trust)


def _check_position(ckpt: dict, path: Path, run) -> None:
    """A resumed run goes on from `divmod(step, steps_per_epoch)`: it must be the checkpoint's
    (epoch, batch). Another world size reads an epoch in another order (each rank its shard of
    the permutation of seed + epoch): only a checkpoint at an epoch's end resumes on it."""
    meta, world = ckpt["fastseed"], len(ckpt["rng"])
    here = divmod(meta["step"], run.steps_per_epoch)
    if here != (meta["epoch"], meta["batch_in_epoch"]):
        raise TrainingError(f"{path} is at epoch {meta['epoch']}, batch {meta['batch_in_epoch']} "
                            f"(step {meta['step']}), which this run's {run.steps_per_epoch} batches per epoch put at "
                            f"epoch {here[0]}, batch {here[1]}: resume with the run's --batch-size and --data")
    if world != run.env.world and meta["batch_in_epoch"]:
        raise TrainingError(f"{path} is in the middle of epoch {meta['epoch']} of a {world}-rank run, whose data "
                            f"order this {run.env.world}-rank run cannot continue: resume it on {world} rank(s), or "
                            "from a checkpoint at an epoch's end")


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
    ckpts = {s: _read_for_resume(p, run.cfg.trust_checkpoint) for s, p in paths.items()}
    step = max(c["fastseed"]["step"] for c in ckpts.values())
    for s, ckpt in ckpts.items():
        meta = ckpt["fastseed"]
        if meta["step"] < step:
            run.students.stale(s, meta["step"], step)
            continue
        _check_position(ckpt, paths[s], run)
        restore(ckpt, s.cfg, s.method, s.optimizer, s.scaler, run.teacher_info, run.aug_gen, run.env)
        if run.env.main:
            print(f"resumed from {paths[s]} at step {step} (epoch {meta['epoch']}, "
                  f"batch {meta['batch_in_epoch']})", file=sys.stderr)
    return step


