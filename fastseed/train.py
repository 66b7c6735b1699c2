"""A run: its assembly (`prepare`), one step (`train_step`), and the loop (`train`).

A run has one target source (`fastseed.targets`: the frozen teacher, asked once per batch, or a
teacher cache's stored keys) and one or more students (`fastseed.students`: `-a` takes a comma
list), which share the loader, the augmentation, the targets and the queues, and own the rest.
What each piece does and where it lives: docs/ARCHITECTURE.md.

Speed choices (each measured or explained where it is made): teacher frozen in eval +
inference_mode and never in the optimizer/DDP/checkpoint; student channels-last under bf16
autocast and torch.compile; fused/foreach optimizer; no host sync inside a step (loss and the
NaN guard are read only at log and checkpoint steps); queue enqueue without a host sync.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastseed.augment import preset_augment
from fastseed.checkpoint import check_not_stopped, mark_stopped, resume, save_checkpoints
from fastseed.config import Config
from fastseed.configfile import settings_of, write_config
from fastseed.data import replay_loader, ssl_loader
from fastseed.errors import ConfigError, TrainingError
from fastseed.evaluate import KnnMonitor, Resized
from fastseed.logs import Logger, Throughput, progress_bar
from fastseed.methods import Method, method_of, resolve_preset, resolve_queue_size
from fastseed.optim import Schedule
from fastseed.mixing import check_mixup, mixup
from fastseed.runtime import (Env, Preemption, amp_dtype, autocast, compiler, phase, restart_count, seed_everything,
                              setup_env, teacher_dtype, teardown)
from fastseed.students import Students, build_student, oom_advice, student_configs
from fastseed.targets import CachedTargets, SeveralTargets, build_targets, resolve_teacher_res
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Run:
    """Everything a step needs, built once by `prepare`."""
    cfg: Config
    env: Env
    method: type[Method]       # the run's objective (fastseed.methods), resolved once
    students: Students
    targets: object            # the target source: targets(views, batch) -> keys (fastseed.targets)
    queues: nn.Module | None   # the keys every student compares against; None for SimReg
    teacher_info: dict | None
    mean_std: tuple
    loader: object
    augment: nn.Module
    aug_gen: torch.Generator
    dtype: torch.dtype | None
    schedule: Schedule         # schedule(step, peak lr) -> lr
    total: int
    steps_per_epoch: int
    resumed_at: int = 0        # the step the run started (or resumed) from
    preemption: Preemption | None = None  # SIGTERM / SIGUSR1 noted while `train` runs
    teacher_dtype: torch.dtype | None = None  # the target source's autocast (`runtime.teacher_dtype`)
    keep: Callable[[int], torch.Tensor] | None = None  # several teachers: whose losses count at a step

    def autocast(self):
        return autocast(self.env.device, self.dtype)


class Preempted(Exception):
    """A scheduler's signal arrived; every student was checkpointed at a step boundary."""


def build_loader(cfg: Config, env: Env, source, method: type[Method]):
    """The FFCV loader of `cfg.data`: with a teacher cache, each image's stored crop of the
    epoch and its keys (`(views, labels, keys)`); else fresh random crops (`(views, labels)`),
    as many global crops as the `method` takes."""
    common = dict(batch_size=cfg.batch_size // env.world, res=cfg.res, device=env.device, num_workers=cfg.workers,
                  seed=cfg.seed, distributed=env.world > 1)
    if isinstance(source, CachedTargets):
        return replay_loader(cfg.data, source.cache, **common)
    return ssl_loader(cfg.data, scale=cfg.crop_scale, num_global=method.global_views,
                      num_small=cfg.small_crops, small_res=cfg.small_res, small_scale=cfg.small_scale, **common)


def prepare(cfg: Config, loader=None) -> Run:
    """Build everything a run needs. `loader` replaces the FFCV loader of `cfg.data` (tests,
    synthetic-data benchmarks): any sized iterable of `(views, labels)` (with a teacher cache,
    `(views, labels, keys)`) with `resume(epoch, batch)`."""
    env = setup_env(cfg)
    check_not_stopped(cfg.out_dir)  # a restarted group must not run into the same NaN again
    if restart_count() and cfg.resume is None:  # torchrun's agent restarted the group after a failure
        cfg = cfg.replace(resume="auto")
    method = method_of(cfg)  # once: passed on to the loader, the targets, the students and the step
    configs = student_configs(cfg, method)  # validates -a / --lr and the method's settings before anything is written
    check_mixup(cfg)
    if env.main:
        for c in (cfg, *configs):
            c.out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + env.rank)
    dtype = amp_dtype(cfg, env.device)
    tdtype = teacher_dtype(cfg, env.device) if method.needs_teacher else dtype  # MoCo: its key encoder's
    cfg = resolve_teacher_res(cfg)
    source = build_targets(cfg, env.device, dtype=tdtype, compile_fn=compiler(cfg, env), method=method)
    dim = source.dim if source is not None else cfg.dim or 128
    if cfg.dim is not None and method.needs_teacher and cfg.dim != dim:
        raise ConfigError(f"--dim {cfg.dim} does not match the teacher's embedding dim {dim}")
    mean_std = source.mean_std if source is not None else (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    # the preset and its crop scale (an explicit one wins), resolved here so checkpoints record them
    cfg = resolve_preset(cfg, source and source.info["format"])
    if loader is None:
        loader = build_loader(cfg, env, source, method)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data} holds fewer images than one batch of {cfg.batch_size // env.world} "
                          "per rank: lower --batch-size")
    cfg, queue_note = resolve_queue_size(cfg, steps_per_epoch * cfg.batch_size, dim)
    queues = method.queues_for(cfg, dim, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    augment = preset_augment(cfg.aug, mean_std[0], mean_std[1]).to(env.device)
    aug_gen = torch.Generator(env.device).manual_seed(cfg.seed * 1000 + env.rank)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
    schedule = Schedule(cfg, steps_per_epoch, total)
    if env.main:  # what was chosen for the user, said once
        for note in (queue_note if queues is not None else None, schedule.note()):
            if note:
                print(note, file=sys.stderr)
    token_dim = source.token_dim if source is not None else None  # the patch-token projectors' output
    several = isinstance(source, SeveralTargets)  # several teachers: a head, a key width and a loss each
    students = Students([build_student(c, env, source.dims if several else dim, queues, dtype, token_dim, method)
                         for c in student_configs(cfg, method)])
    targets = source if source is not None else students.members[0].method  # MoCo: its own key encoder
    return Run(cfg, env, method, students, targets, queues, source.info if source is not None else None, mean_std,
               loader, augment, aug_gen, dtype, schedule, total, steps_per_epoch,
               teacher_dtype=tdtype, keep=source.keep if several else None)


def train_step(run: Run, views: list[torch.Tensor], step: int, batch=None) -> list[torch.Tensor]:
    """One optimisation step of every live student on one augmentation of `views` and one ask
    of the target source; returns their losses on the device (no host sync). `batch` is what
    the loader yielded beside the views (a list: labels, and a cache's keys). Its parts are
    marked for a profiler (`runtime.phase`)."""
    for s in run.students.live:
        for g in s.optimizer.param_groups:
            g["lr"] = run.schedule(step, s.lr)
    phase("augment")
    views = [run.augment(v, generator=run.aug_gen) for v in views]
    if run.cfg.mixup:
        views = mixup(views, run.aug_gen)
    phase("teacher")
    with autocast(run.env.device, run.teacher_dtype):
        targets = run.targets.targets(views, batch)
    if run.teacher_dtype != run.dtype:  # e.g. a bf16 teacher on an AMX CPU: keys in the students' dtype
        targets = tuple(t.to(run.dtype or torch.float32) for t in targets)
    first = run.queues is not None and run.cfg.batch_in_queue
    if first:  # --batch-in-queue: the losses' logits are the queue's, the batch's keys among them
        phase("enqueue")
        run.queues.update(targets)
    seen = run.method.loss_targets(run.cfg, targets)  # what the losses compare against
    if run.keep is not None:  # several teachers: the mask of those whose losses count, a function of (seed, step)
        seen = (*seen, run.keep(step))
    losses = run.students.step(views, seen, step, run.autocast)
    if run.queues is not None and not first:
        phase("enqueue")
        run.queues.update(targets)  # after every backward: the losses' backward re-reads the queue
    return losses


def guard(run: Run, step: int, weights: bool = False) -> None:
    """Stop the students whose loss (or, with `weights`, weights) went NaN/inf; TrainingError
    when none is left."""
    run.students.stop_non_finite(step, weights)
    if not run.students.live:
        message = " | ".join(run.students.failures())
        if run.env.main:
            mark_stopped(run.cfg.out_dir, message)  # a restarted worker group refuses at once
        raise TrainingError(message)


def checkpoint(run: Run, step: int, epoch: int, batch_in_epoch: int) -> None:
    guard(run, step, weights=True)  # never write NaN weights over a good checkpoint
    save_checkpoints(run, step, epoch, batch_in_epoch)


def train_epoch(run: Run, epoch: int, skip: int, step: int, logger: Logger, meter: Throughput) -> int:
    """Epoch `epoch` from its batch `skip` on: steps, log records, step checkpoints. Returns
    the step reached (the epoch's end, or the run's total)."""
    cfg = run.cfg
    run.loader.resume(epoch, skip)
    bar = progress_bar(cfg.progress and run.env.main, run.steps_per_epoch, skip, f"epoch {epoch + 1}/{cfg.epochs}")
    for i, (views, *batch) in enumerate(run.loader, start=skip):
        try:
            train_step(run, views, step, batch)
        except torch.OutOfMemoryError:
            if step > run.resumed_at:
                raise
            advice = oom_advice(run.students, views, batch, lambda v, b: train_step(run, v, 0, b), run.env.world,
                                cfg.lr is not None)
            raise TrainingError(advice) from None
        step += 1
        meter.add(views[0].shape[0] * run.env.world)
        if bar is not None:
            bar.update(1)
        if step % cfg.log_every == 0 or step == run.total:
            guard(run, step)
            record = {"step": step, "epoch": epoch, **run.students.log_fields(meter.steps), "img_per_s": meter.rate()}
            logger.log(record)
            if bar is not None:
                bar.set_postfix(run.students.postfix(record))
            meter.reset()
            if run.preemption is not None and run.preemption.agreed(run.env.device):
                checkpoint(run, step, epoch, i + 1)
                raise Preempted(step)
        if step % cfg.ckpt_every == 0:
            checkpoint(run, step, epoch, i + 1)
        if step >= run.total:
            break
    if bar is not None:
        bar.close()
    return step


def final_knn(run: Run, monitor: KnnMonitor) -> dict:
    """k-NN of each live student; with the table, of raw pixels and of the teacher too."""
    results = {s.key("student"): monitor(s.method.encoder) for s in run.students.live}
    if run.cfg.final_table:
        results["raw_pixels"] = monitor(None)
        t = getattr(run.targets, "teacher", None)
        if t is not None:
            results["teacher"] = monitor(Resized(t.model, t.res), dtype=run.teacher_dtype or torch.float32)
        if isinstance(run.targets, SeveralTargets):  # a row per teacher, in -k order
            for i, model in enumerate(run.targets.knn_models()):
                results[f"teacher/{i}"] = monitor(model, dtype=run.teacher_dtype or torch.float32)
    return results


def train(cfg: Config, loader=None) -> dict:
    """Run `cfg` to its end (`loader`: as `prepare`). Returns {"step", "results" (k-NN), "failed"
    (one line per student stopped on NaN/inf while others went on), "preempted" (the signal's
    name when SIGTERM/SIGUSR1 stopped it after a checkpoint, else None)}; raises TrainingError
    when no student is left. Every rank evaluates its shard; the main rank logs."""
    run = prepare(cfg, loader)
    cfg, env, students, spe = run.cfg, run.env, run.students, run.steps_per_epoch  # cfg: preset resolved
    logger = Logger(cfg.out_dir, env.main, cfg.log, settings_of(cfg))
    meter, preempted, results, status = Throughput(), None, {}, "FAILED"
    try:
        step = run.resumed_at = resume(run)
        if env.main:  # once the teacher, the data and any checkpoint were read: a refused run writes nothing
            write_config(run.cfg, cfg.out_dir / "config.yaml")  # --config of it reruns the run
        monitor = KnnMonitor(cfg, env.device, run.mean_std, run.dtype, rank=env.rank, world=env.world)
        evaluate = monitor.enabled
        if cfg.final_table and evaluate and step == 0:
            results = {s.key("student_init"): monitor(s.method.encoder) for s in students}
        students.train()
        start_epoch, skip = divmod(step, spe)
        with Preemption() as run.preemption:
            for epoch in range(start_epoch, cfg.epochs):
                if step >= run.total:
                    break
                step, skip = train_epoch(run, epoch, skip, step, logger, meter), 0
                if step % spe == 0:
                    checkpoint(run, step, epoch + 1, 0)
                    if evaluate and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and step < run.total:
                        knn = {s.key(k): v for s in students.live for k, v in monitor(s.method.encoder).items()}
                        logger.log({"step": step, "epoch": epoch + 1, **knn})
                        students.train()
        if step % spe:  # stopped mid-epoch (max_steps): epoch ends were saved above
            checkpoint(run, step, step // spe, step % spe)
        guard(run, step)
        if evaluate:
            results |= final_knn(run, monitor)
            logger.log({"step": step, "final": True, **{f"{k}/{m}": v for k, r in results.items()
                                                        for m, v in r.items()}})
        status = "FINISHED"
    except Preempted as stop:  # every rank agreed; this one may not have had the signal itself
        sig = run.preemption.signal
        step, preempted, status = stop.args[0], signal.Signals(sig).name if sig else "another rank's signal", "KILLED"
    finally:
        logger.close(status)
        teardown(env)
    return {"step": step, "results": results, "failed": students.failures(), "preempted": preempted}
