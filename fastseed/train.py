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

from dataclasses import dataclass

import torch
from torch import nn

from fastseed.augment import preset_augment
from fastseed.checkpoint import resume, save_checkpoints
from fastseed.config import Config
from fastseed.data import replay_loader, ssl_loader
from fastseed.errors import ConfigError, TrainingError
from fastseed.evaluate import KnnMonitor, Resized
from fastseed.logs import Logger, Throughput, progress_bar
from fastseed.methods import method_class, resolve_preset
from fastseed.optim import Schedule
from fastseed.runtime import Env, amp_dtype, autocast, compiler, phase, seed_everything, setup_env
from fastseed.students import Students, build_student, student_configs
from fastseed.targets import CachedTargets, build_targets, resolve_teacher_res
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD


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
    schedule: Schedule         # schedule(step, peak lr) -> lr
    total: int
    steps_per_epoch: int
    resumed_at: int = 0        # the step the run started (or resumed) from

    def autocast(self):
        return autocast(self.env.device, self.dtype)


def build_loader(cfg: Config, env: Env, source):
    """The FFCV loader of `cfg.data`: with a teacher cache, each image's stored crop of the
    epoch and its keys (`(views, labels, keys)`); else fresh random crops (`(views, labels)`)."""
    common = dict(batch_size=cfg.batch_size // env.world, res=cfg.res, device=env.device, num_workers=cfg.workers,
                  seed=cfg.seed, distributed=env.world > 1)
    if isinstance(source, CachedTargets):
        return replay_loader(cfg.data, source.cache, **common)
    return ssl_loader(cfg.data, scale=cfg.crop_scale, num_global=method_class(cfg.method).global_views,
                      num_small=cfg.small_crops, small_res=cfg.small_res, small_scale=cfg.small_scale, **common)


def prepare(cfg: Config, loader=None) -> Run:
    """Build everything a run needs. `loader` replaces the FFCV loader of `cfg.data` (tests,
    synthetic-data benchmarks): any sized iterable of `(views, labels)` (with a teacher cache,
    `(views, labels, keys)`) with `resume(epoch, batch)`."""
    env = setup_env(cfg)
    method = method_class(cfg.method)
    configs = student_configs(cfg)  # validates -a / --lr before anything is written
    if env.main:
        for c in (cfg, *configs):
            c.out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + env.rank)
    dtype = amp_dtype(cfg, env.device)
    cfg = resolve_teacher_res(cfg)
    source = build_targets(cfg, env.device, dtype=dtype, compile_fn=compiler(cfg, env))
    dim = source.dim if source is not None else cfg.dim or 128
    if cfg.dim is not None and method.needs_teacher and cfg.dim != dim:
        raise ConfigError(f"--dim {cfg.dim} does not match the teacher's embedding dim {dim}")
    mean_std = source.mean_std if source is not None else (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    # the preset and its crop scale (an explicit one wins), resolved here so checkpoints record them
    cfg = resolve_preset(cfg, source and source.info["format"])
    queues = method.queues_for(cfg, dim, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    if loader is None:
        loader = build_loader(cfg, env, source)
    augment = preset_augment(cfg.aug, mean_std[0], mean_std[1]).to(env.device)
    aug_gen = torch.Generator(env.device).manual_seed(cfg.seed * 1000 + env.rank)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.data} holds fewer images than one batch of {cfg.batch_size // env.world} "
                          "per rank: lower --batch-size")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
    students = Students([build_student(c, env, dim, queues, dtype) for c in student_configs(cfg)])
    targets = source if source is not None else students.members[0].method  # MoCo: its own key encoder
    return Run(cfg, env, students, targets, queues, source.info if source is not None else None, mean_std,
               loader, augment, aug_gen, dtype, Schedule(cfg, steps_per_epoch, total), total, steps_per_epoch)


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
    phase("teacher")
    with run.autocast():
        targets = run.targets.targets(views, batch)
    losses = run.students.step(views, targets, step, run.autocast)
    phase("enqueue")
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


def guard(run: Run, step: int, weights: bool = False) -> None:
    """Stop the students whose loss (or, with `weights`, weights) went NaN/inf; TrainingError
    when none is left."""
    run.students.stop_non_finite(step, weights)
    if not run.students.live:
        raise TrainingError(" | ".join(run.students.failures()))


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
            raise TrainingError(oom_advice(run, views, batch)) from None
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
            results["teacher"] = monitor(Resized(t.model, t.res))
    return results


def train(cfg: Config, loader=None) -> dict:
    """Run `cfg` to its end (`loader`: as `prepare`). Returns {"step", "results" (k-NN), "failed"
    (one line per student stopped on NaN/inf while others went on)}; raises TrainingError when
    no student is left."""
    run = prepare(cfg, loader)
    cfg, env, students, spe = run.cfg, run.env, run.students, run.steps_per_epoch  # cfg: preset resolved
    step = run.resumed_at = resume(run)
    monitor = KnnMonitor(cfg, env.device, run.mean_std, run.dtype)
    evaluate = monitor.enabled and env.main
    results = ({s.key("student_init"): monitor(s.method.encoder) for s in students}
               if cfg.final_table and evaluate and step == 0 else {})
    logger, meter = Logger(cfg.out_dir, env.main, cfg.log), Throughput()
    try:
        students.train()
        start_epoch, skip = divmod(step, spe)
        for epoch in range(start_epoch, cfg.epochs):
            if step >= run.total:
                break
            step, skip = train_epoch(run, epoch, skip, step, logger, meter), 0
            if step % spe == 0:
                checkpoint(run, step, epoch + 1, 0)
                if evaluate and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and step < run.total:
                    logger.log({"step": step, "epoch": epoch + 1, **{s.key(k): v for s in students.live
                                                                     for k, v in monitor(s.method.encoder).items()}})
                    students.train()
        if step % spe:  # stopped mid-epoch (max_steps): epoch ends were saved above
            checkpoint(run, step, step // spe, step % spe)
        guard(run, step)
        if evaluate:
            results |= final_knn(run, monitor)
            logger.log({"step": step, "final": True, **{f"{k}/{m}": v for k, r in results.items()
                                                        for m, v in r.items()}})
    finally:
        logger.close()
    return {"step": step, "results": results, "failed": students.failures()}
