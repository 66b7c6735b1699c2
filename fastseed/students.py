"""The students of a run: `-a resnet18,efficientnet_b0,mobilenetv3_large_100` distils them all
from one loader, one augmentation of each view, one teacher forward and one queue per step.

Each `Student` has what a solo run of it has: backbone and head, optimizer, base lr (`--lr`
takes one value per student, or one for all), DDP/FSDP wrapper and compile, NaN guard, k-NN
monitor and checkpoint directory. A step (`fastseed.train.train_step`) augments the views and
asks the target source (`fastseed.targets`) once, then steps each live student in turn
(forward, backward, optimizer), then updates the shared queues once; those hold teacher keys
only, the same for every student.

Sharing changes nothing but the cost: a student's init depends only on the seed
(`build_method`), and its views, targets and queue are those of its solo run,
so it matches its solo run step for step (tests/test_multi.py). A student that draws random
numbers in its forward (dropout, drop-path) would draw from the one global generator after the
students before it; the timm students here (ResNet, EfficientNet, MobileNetV3) draw none.

A student whose loss or weights go NaN/inf stops alone: it is no longer stepped or saved, so
its last good checkpoint stays as it was; the others go on, and the run names it at the end.

Files: one student keeps the solo layout (OUTPUT/checkpoint_last.pt, metrics keys `loss`,
`lr`); with several, each student's files are its solo run's, under OUTPUT/<arch>/ (loadable
by fastseed-eval, --export, and --resume of that student alone), and OUTPUT/metrics.jsonl keys
its numbers `loss/<arch>`, `lr/<arch>`, `knn_top1@20/<arch>`.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastseed.config import Config
from fastseed.errors import ConfigError
from fastseed.methods import Method, method_of
from fastseed.models import create_student, student_channels_last, to_channels_last
from fastseed.optim import build_optimizer, peak_lr
from fastseed.runtime import Env, compiler, main_rank, phase, wrap_model


def student_configs(cfg: Config, method: type[Method] | None = None) -> list[Config]:
    """One solo run's config per student of `cfg` (`arch` a comma list, `lr` one value or one
    per student), checked by the run's `method` (default: `cfg`'s). One student: `cfg` as it is.
    Several: each writes under OUTPUT/<arch>/, and `--resume PATH` names the earlier run's OUTPUT."""
    archs = [a.strip() for a in cfg.arch.split(",")]
    lrs = list(cfg.lr) if isinstance(cfg.lr, (list, tuple)) else [cfg.lr]
    if len(lrs) not in (1, len(archs)):
        raise ConfigError(f"--lr has {len(lrs)} values for {len(archs)} student(s) ({','.join(archs)}): "
                          "give one for all, or one per student")
    if "" in archs or len(set(archs)) < len(archs):
        raise ConfigError(f"-a {cfg.arch}: name each student once, comma-separated (e.g. -a resnet18,efficientnet_b0)")
    (method or method_of(cfg)).check(cfg, len(archs))
    if len(archs) == 1:
        return [cfg.replace(arch=archs[0], lr=lrs[0])]
    lrs = lrs * len(archs) if len(lrs) == 1 else lrs
    return [cfg.replace(arch=a, lr=lr, output=str(cfg.out_dir / a),
                        resume=cfg.resume if cfg.resume in (None, "auto")
                        else str(Path(cfg.resume) / a / "checkpoint_last.pt"))
            for a, lr in zip(archs, lrs)]


def build_method(cfg: Config, env: Env, dim: int, queues, token_dim: int | None = None,
                 method: type[Method] | None = None) -> Method:
    """One student's backbone + head of the run's `method` (default: `cfg`'s) around the run's
    shared `queues` (`token_dim`: the teacher's token width, for a method that distils tokens). Its init depends only on
    `cfg.seed` (the global generator is forked and seeded with it, the same on every rank), not
    on what was built before it: a student of a joint run starts as its solo run does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # channels-last before the method copies it: MoCo's key encoder is a deep copy of the student
        student = create_student(cfg.arch)
        student = to_channels_last(student, channels_last(cfg, student, env))
        objective = (method or method_of(cfg)).from_config(student, queues, dim, cfg, compiler(cfg, env),
                                                           token_dim=token_dim)
    return objective.to(env.device)


def build_student(cfg: Config, env: Env, dim: int, queues, dtype: torch.dtype | None,
                  token_dim: int | None = None, method: type[Method] | None = None) -> "Student":
    """`cfg` is the student's solo config (`student_configs`): its method, wrapper, optimizer."""
    method = build_method(cfg, env, dim, queues, token_dim, method)
    model = wrap_model(method, cfg, env)
    # after wrapping: fully_shard swaps the parameters for DTensor shards
    lr = peak_lr(cfg)
    optimizer = build_optimizer(cfg, method, lr, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
    return Student(cfg, method, model, optimizer, scaler, lr, channels_last=channels_last(cfg, method.encoder, env))


def channels_last(cfg: Config, student: nn.Module, env: Env) -> bool:
    """Whether `student` runs channels-last (`models.student_channels_last`, at its largest crop)."""
    res = max(cfg.res, cfg.small_res if cfg.small_crops else 0)
    return student_channels_last(cfg.channels_last, student, res, env.device)


@dataclass(eq=False)  # compared and hashed by identity
class Student:
    """One student and everything its solo run would own."""
    cfg: Config                   # its solo run's config: arch, lr, output
    method: nn.Module             # backbone + head (+ the shared queues)
    model: nn.Module              # what the step calls: method, DDP(method), compiled
    optimizer: torch.optim.Optimizer
    scaler: object                # GradScaler (fp16) or None
    lr: float                     # base lr of the schedule
    channels_last: bool = True    # its memory format; False: its views are made NCHW before its forward
    tag: str = ""                 # "" alone; its arch beside others (metrics keys, phases, messages)
    failed: str | None = None     # why it stopped (one line)
    first_bad: torch.Tensor = field(init=False)  # first step with a non-finite loss, -1: none
    loss_sum: torch.Tensor = field(init=False)   # since the last log

    def __post_init__(self):
        device = next(self.method.parameters()).device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)

    @property
    def name(self) -> str:
        return self.cfg.arch

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.out_dir / "checkpoint_last.pt"

    def key(self, name: str) -> str:
        return f"{name}/{self.tag}" if self.tag else name

    def phase(self, name: str) -> str:
        return f"{self.tag}: {name}" if self.tag else name


class Students:
    """The run's students, stepped in `-a` order on the same views and targets."""

    def __init__(self, members: list[Student]):
        if len(members) > 1:
            for s in members:
                s.tag = s.name
        self.members = members
        self._only = None

    def __iter__(self):
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def live(self) -> list[Student]:
        if self._only is not None:
            return [self._only]
        return [s for s in self.members if s.failed is None]

    @contextmanager
    def only(self, student: Student):
        """Step `student` alone (the out-of-memory search tries each student beside the others)."""
        self._only = student
        try:
            yield
        finally:
            self._only = None

    def train(self) -> None:
        for s in self.members:
            s.method.train()

    def step(self, views, targets, step: int, autocast) -> list[torch.Tensor]:
        """Forward, backward and optimizer step of each live student; their losses on the device.
        Each part is marked for a profiler (`runtime.phase`)."""
        losses, nchw = [], None
        for s in self.live:
            phase(s.phase("loss"))
            if not s.channels_last:  # the augmentation writes channels-last; once for every NCHW student
                nchw = nchw or [v.contiguous() for v in views]
            with autocast():
                loss = s.model(views if s.channels_last else nchw, targets)
            phase(s.phase("backward"))
            if s.scaler is not None:
                s.scaler.scale(loss).backward()
                phase(s.phase("optimizer"))
                if s.cfg.clip_grad:
                    s.scaler.unscale_(s.optimizer)
                    clip(s)
                s.scaler.step(s.optimizer)
                s.scaler.update()
            else:
                loss.backward()
                phase(s.phase("optimizer"))
                if s.cfg.clip_grad:
                    clip(s)
                s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            # NaN guard without a host sync: the first bad step is remembered on the device
            s.first_bad.copy_(torch.where((s.first_bad < 0) & ~torch.isfinite(loss), step, s.first_bad))
            s.loss_sum += loss.float()
            losses.append(loss)
        return losses

    def stop_non_finite(self, step: int, weights: bool = False) -> None:
        """Stop each live student whose loss went NaN/inf (and, with `weights`, whose weights did:
        a bad update shows in the weights one step before it shows in a loss). One host sync;
        ranks agree (a min over ranks), so every rank stops the same students."""
        live = self.live
        if not live:
            return
        never = torch.iinfo(torch.long).max
        flags = torch.stack([torch.stack([torch.where(s.first_bad < 0, never, s.first_bad),
                                          -_non_finite(s.method.parameters()).long() if weights
                                          else torch.zeros((), dtype=torch.long, device=s.first_bad.device)])
                             for s in live])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        for s, (bad, w) in zip(live, flags.tolist()):
            if bad != never:
                s.failed = (f"{self._who(s)}loss became NaN/inf at step {bad}; stopped. The last good checkpoint "
                            f"{s.checkpoint_path} is untouched: {self._fix(s, 'lower --lr or check the data')}")
            elif w:
                s.failed = (f"{self._who(s)}weights became NaN/inf by step {step} (the loss was still finite); "
                            f"stopped. The last good checkpoint {s.checkpoint_path} is untouched: "
                            f"{self._fix(s, 'lower --lr')}")
            if s.failed and self.live and main_rank():
                print(f"{s.failed} (the other students go on)", file=sys.stderr)

    def _who(self, s: Student) -> str:
        return f"student {s.name}: " if s.tag else ""

    def _fix(self, s: Student, what: str) -> str:
        if not s.tag:
            return f"{what}, then --resume auto"
        return f"{what}, then resume it alone: -a {s.name} --output {s.cfg.out_dir} --resume auto"

    def stale(self, s: Student, step: int, run_step: int) -> None:
        """Resuming: `s`'s checkpoint is behind the others', so it stopped in an earlier run."""
        s.failed = (f"{self._who(s)}stopped at step {step} in an earlier run (the others resumed at step "
                    f"{run_step}); its checkpoint {s.checkpoint_path} is untouched: "
                    f"{self._fix(s, 'fix what stopped it')}")
        if main_rank():
            print(s.failed, file=sys.stderr)

    def failures(self) -> list[str]:
        return [s.failed for s in self.members if s.failed]

    def log_fields(self, n_steps: int) -> dict:
        """Mean loss since the last call and current lr of each live student (one host sync)."""
        live = self.live
        if not live:
            return {}
        losses = (torch.stack([s.loss_sum for s in live]) / n_steps).tolist()
        out = {}
        for s, loss in zip(live, losses):
            out[s.key("loss")] = loss
            out[s.key("lr")] = s.optimizer.param_groups[0]["lr"]
            s.loss_sum.zero_()
        return out

    def postfix(self, record: dict) -> dict:
        """The progress bar's: loss and lr of each student in `-a` order (× once stopped)."""
        def show(name, fmt):
            return "/".join(format(record[s.key(name)], fmt) if s.key(name) in record else "×" for s in self.members)
        return {"loss": show("loss", ".3f"), "lr": show("lr", ".3g"), "img_s": f"{record['img_per_s']:.0f}"}


def clip(s: "Student") -> None:
    """`--clip-grad N`: the student's gradients scaled to a global L2 norm of at most N (no host
    sync: the norm stays on the device; sharded gradients are reduced over the ranks)."""
    params = [p for g in s.optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, s.cfg.clip_grad, foreach=True)


def _non_finite(params) -> torch.Tensor:
    """True (on the device) when any element of `params` (this rank's shards under FSDP) is NaN/inf."""
    flags = [~torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all()
             for p in params]
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)


def oom_advice(students: Students, views: list[torch.Tensor], batch, step_fn, world: int, lr_given: bool) -> str:
    """The first step ran out of memory: for each student, beside the others, find the largest
    per-rank batch that fits by halving, on copies of this batch's views (`step_fn(views, batch)`
    runs one step), and say what to pass."""
    per_rank = views[0].shape[0]
    fits = {}
    for s in students.live:
        b = per_rank // 2
        while b >= 1:
            for other in students:
                other.optimizer.zero_grad(set_to_none=True)
            if views[0].device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                with students.only(s):
                    step_fn([v[:b].clone() for v in views], None if batch is None else [x[:b].clone() for x in batch])
                break
            except torch.OutOfMemoryError:
                b //= 2
        fits[s.name] = b * world
    asked = per_rank * world
    lr_hint = " (and scale --lr with it)" if lr_given else ""
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
